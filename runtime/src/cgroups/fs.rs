//! File helpers shared by both hierarchies: write/read control files, make and remove
//! cgroup directories, kill what is left in them.

use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::CgroupError;

/// rmdir of a cgroup whose last task is still exiting fails with EBUSY for a moment.
pub(super) const RMDIR_RETRIES: u32 = 50;
/// Pause between rmdir attempts.
pub(super) const RMDIR_BACKOFF: Duration = Duration::from_millis(10);
/// Rounds of "list pids, SIGKILL them" before giving up on a cgroup that keeps forking.
pub(super) const KILL_ROUNDS: u32 = 200;
/// Pause between kill rounds (lets the kernel finish exits so cgroup.procs empties).
pub(super) const KILL_BACKOFF: Duration = Duration::from_millis(5);
/// Polls of the freezer state before giving up.
pub(super) const FREEZE_POLLS: u32 = 400;
/// Pause between freezer polls (FREEZE_POLLS × this = the freeze timeout, 2 s).
pub(super) const FREEZE_BACKOFF: Duration = Duration::from_millis(5);
/// Deepest cgroup subtree walked when listing descendants (a container may nest cgroups).
pub(super) const MAX_SUBTREE_DEPTH: usize = 32;

/// Write a control file (created when absent, which only happens in a fake tree).
pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Read a control file.
pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a control file that may legitimately be missing (older kernels, absent controllers).
pub(super) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Parse a single-number file; "max" reads as `None`.
pub(super) fn parse_u64_or_max(path: &Path, s: &str) -> Result<Option<u64>, CgroupError> {
    let t = s.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse::<u64>().map(Some).map_err(|e| CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("{t:?}: {e}"),
    })
}

/// Read a single-number file that may be absent; absent → 0.
pub(super) fn read_u64_or_zero(path: &Path) -> Result<u64, CgroupError> {
    match read_opt(path)? {
        Some(s) => Ok(parse_u64_or_max(path, &s)?.unwrap_or(u64::MAX)),
        None => Ok(0),
    }
}

/// Value of `key` in a flat keyed file ("key value" per line).
pub(super) fn keyed_value(
    path: &Path,
    content: &str,
    key: &str,
) -> Result<Option<u64>, CgroupError> {
    for line in content.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            let v = it.next().unwrap_or("");
            return v.parse::<u64>().map(Some).map_err(|e| CgroupError::Parse {
                path: path.to_path_buf(),
                reason: format!("{key} {v:?}: {e}"),
            });
        }
    }
    Ok(None)
}

/// Make `root/rel` and any missing ancestors; returns the directories this call created,
/// outermost first, so a failed create can remove exactly those. An existing leaf is an error.
pub(super) fn mkdir_tracked(root: &Path, rel: &str) -> Result<Vec<PathBuf>, CgroupError> {
    let mut created = Vec::new();
    let mut cur = root.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        let leaf = i + 1 == comps.len();
        match std::fs::create_dir(&cur) {
            Ok(()) => created.push(cur.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !leaf => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                remove_created(&created);
                return Err(CgroupError::AlreadyExists(cur));
            }
            Err(source) => {
                remove_created(&created);
                return Err(CgroupError::Mkdir { path: cur, source });
            }
        }
    }
    Ok(created)
}

/// Best-effort removal of directories made by [`mkdir_tracked`], innermost first.
pub(super) fn remove_created(created: &[PathBuf]) {
    for d in created.iter().rev() {
        if let Err(e) = rmdir_retry(d) {
            tracing::warn!("cleanup after failed cgroup create: {e}");
        }
    }
}

/// `dir` and every cgroup below it, deepest first (the order they can be removed in).
pub(super) fn subtree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if depth < MAX_SUBTREE_DEPTH {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), depth + 1, out);
                    }
                }
            }
        }
        out.push(d.to_path_buf());
    }
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(dir, 0, &mut out);
    }
    out
}

/// rmdir with bounded retries on EBUSY. A plain directory (the fake cgroupfs of unit tests)
/// holds ordinary files, which a real cgroupfs directory never needs removed; those are
/// deleted first so the same teardown code runs against both.
pub(super) fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && is_plain_dir(dir) => {
                remove_plain_files(dir);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_RETRIES => {
                sleep(RMDIR_BACKOFF);
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
        attempt += 1;
        if attempt > RMDIR_RETRIES {
            return Err(CgroupError::Remove {
                path: dir.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
    }
}

/// True when `dir` is on an ordinary filesystem (not cgroupfs/cgroup2fs).
fn is_plain_dir(dir: &Path) -> bool {
    const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    match nix::sys::statfs::statfs(dir) {
        Ok(st) => {
            #[allow(clippy::unnecessary_cast)]
            let m = st.filesystem_type().0 as i64;
            m != CGROUP_SUPER_MAGIC && m != CGROUP2_SUPER_MAGIC
        }
        Err(_) => false,
    }
}

fn remove_plain_files(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Pids listed in `dir/cgroup.procs` (absent file → none).
pub(super) fn procs(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let Some(s) = read_opt(&path)? else {
        return Ok(Vec::new());
    };
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse::<i32>().map_err(|e| CgroupError::Parse {
                path: path.clone(),
                reason: format!("{l:?}: {e}"),
            })
        })
        .collect()
}

/// Pids in `dir` and its descendants.
pub(super) fn procs_recursive(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let mut all = Vec::new();
    for d in subtree_deepest_first(dir) {
        all.extend(procs(&d)?);
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// SIGKILL each pid; a pid already gone is fine.
pub(super) fn kill_all(pids: &[i32]) -> Result<(), CgroupError> {
    for &pid in pids {
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => return Err(CgroupError::Kill { pid, source }),
        }
    }
    Ok(())
}

/// Kill until `dir`'s subtree lists no process, bounded by [`KILL_ROUNDS`].
pub(super) fn kill_until_empty(dir: &Path) -> Result<(), CgroupError> {
    for _ in 0..KILL_ROUNDS {
        let pids = procs_recursive(dir)?;
        if pids.is_empty() {
            return Ok(());
        }
        kill_all(&pids)?;
        sleep(KILL_BACKOFF);
    }
    if procs_recursive(dir)?.is_empty() {
        Ok(())
    } else {
        Err(CgroupError::KillTimeout(dir.to_path_buf()))
    }
}

/// Remove `dir` and its descendant cgroups, leaves first.
pub(super) fn remove_subtree(dir: &Path) -> Result<(), CgroupError> {
    for d in subtree_deepest_first(dir) {
        rmdir_retry(&d)?;
    }
    Ok(())
}
