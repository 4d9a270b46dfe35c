//! Keeping the runtime binary out of a container's reach (the CVE-2019-5736 class).
//!
//! shoal never re-executes itself inside a container: the monitor and the container's init are
//! forks of the calling process, and `exec` enters the namespaces from a fork too. So what a
//! container could reach through `/proc/<pid>/exe` (or a `#!/proc/self/exe` script) is the
//! binary the *caller* runs. [`reexec_protected`] makes that binary an immutable copy
//! (`FS_IMMUTABLE_FL`, which even root cannot write through without `CAP_LINUX_IMMUTABLE`, a
//! capability no default container has) and re-executes the caller from it once, before any
//! container work. [`crate::container::Container::create`] refuses to run from anything else.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the immutable copies live (one per binary version).
pub const PROTECTED_EXE_DIR: &str = "/run/shoal/exe";
/// Set in the environment of the re-executed process so a failure cannot loop.
const REEXEC_MARK: &str = "_SHOAL_EXE_REEXEC";

const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// Errors from protecting the runtime binary.
#[derive(Debug, thiserror::Error)]
pub enum ExeError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("re-executed from {0} but it is still not protected")]
    StillUnprotected(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ExeError + 'a {
    move |source| ExeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn flags(f: &File) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the pointer we pass.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut v) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn set_immutable(path: &Path) -> Result<(), ExeError> {
    let f = File::open(path).map_err(io("open", path))?;
    let v = flags(&f).map_err(io("read flags of", path))?;
    if v & FS_IMMUTABLE_FL != 0 {
        return Ok(());
    }
    let nv = v | FS_IMMUTABLE_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer we pass.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &nv) } < 0 {
        return Err(io("set immutable flag on", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// True when the running binary is an immutable file, so nothing can write it through
/// `/proc/<pid>/exe`.
pub fn is_protected() -> bool {
    File::open("/proc/self/exe")
        .and_then(|f| flags(&f))
        .is_ok_and(|v| v & FS_IMMUTABLE_FL != 0)
}

/// The immutable copy of the running binary, made once per binary version (by device, inode,
/// size and mtime of the original); stale copies of other versions are removed.
pub fn protected_copy() -> Result<PathBuf, ExeError> {
    let me = Path::new("/proc/self/exe");
    let src = File::open(me).map_err(io("open", me))?;
    let md = src.metadata().map_err(io("stat", me))?;
    let dir = Path::new(PROTECTED_EXE_DIR);
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let name = std::fs::read_link(me)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "exe".into());
    let name = name.trim_end_matches(" (deleted)").to_string();
    let key = format!(
        "{name}-{:x}-{:x}-{:x}-{:x}.{:x}",
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec()
    );
    let target = dir.join(&key);
    if !target.exists() {
        let tmp = dir.join(format!(".{key}.{}", std::process::id()));
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o555)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let copied = std::io::copy(&mut &src, &mut out)
            .and_then(|_| out.flush())
            .and_then(|_| out.sync_all());
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("copy to", &tmp)(e));
        }
        drop(out);
        if let Err(e) = std::fs::rename(&tmp, &target) {
            let _ = std::fs::remove_file(&tmp);
            // Another process may have won the race and made it immutable already.
            if !target.exists() {
                return Err(io("rename", &target)(e));
            }
        }
        remove_stale(dir, &name, &key);
    }
    set_immutable(&target)?;
    let perm = std::fs::metadata(&target)
        .map_err(io("stat", &target))?
        .permissions();
    if perm.mode() & 0o222 != 0 {
        return Err(io("check mode of", &target)(std::io::Error::other(
            "copy is writable",
        )));
    }
    Ok(target)
}

/// Remove older copies of the same binary name that no process runs. A copy still running
/// is kept: its process (a daemon of the previous version, say) starts helpers such as
/// `shoal runtime create` from that path, so removing it would break the daemon until its
/// restart.
fn remove_stale(dir: &Path, name: &str, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let running = running_exes();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n != keep && n.starts_with(&format!("{name}-")) && !running.contains(&e.path()) {
            if let Ok(f) = File::open(e.path()) {
                if let Ok(v) = flags(&f) {
                    let nv = v & !FS_IMMUTABLE_FL;
                    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer we pass.
                    unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &nv) };
                }
            }
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The executables of every process on the host (as `/proc/<pid>/exe` names them).
fn running_exes() -> std::collections::HashSet<PathBuf> {
    let mut out = std::collections::HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let n = p.file_name();
        if !n.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        if let Ok(exe) = std::fs::read_link(p.path().join("exe")) {
            out.insert(exe);
        }
    }
    out
}

/// Re-execute the calling program from its immutable copy unless it already runs from one.
/// Call it first thing in `main` of a program that creates containers (single-threaded there).
/// Returns only when the process is protected, or with an error.
pub fn reexec_protected() -> Result<(), ExeError> {
    if is_protected() {
        return Ok(());
    }
    let copy = protected_copy()?;
    if std::env::var_os(REEXEC_MARK).is_some() {
        return Err(ExeError::StillUnprotected(copy));
    }
    let path = CString::new(copy.as_os_str().as_bytes())
        .map_err(|e| io("name", &copy)(std::io::Error::other(e)))?;
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{REEXEC_MARK}=1")).expect("no nul in constant"));
    let err = nix::unistd::execve(&path, &args, &env).unwrap_err();
    Err(io("execute", &copy)(std::io::Error::from(err)))
}

/// Drop the re-exec mark from the environment so containers never see it.
pub fn forget_reexec_mark() {
    std::env::remove_var(REEXEC_MARK);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_copies_go_unless_a_process_runs_them() {
        let dir = tempfile::tempdir().unwrap();
        let running = dir.path().join("tool-1");
        let idle = dir.path().join("tool-2");
        let other = dir.path().join("else-1");
        for p in [&running, &idle, &other] {
            std::fs::copy("/bin/sleep", p).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut child = std::process::Command::new(&running)
            .arg("30")
            .spawn()
            .unwrap();
        // The child has exec'd once its exe link names the copy.
        let link = PathBuf::from(format!("/proc/{}/exe", child.id()));
        for _ in 0..200 {
            if std::fs::read_link(&link).is_ok_and(|p| p == running) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(running_exes().contains(&running));
        remove_stale(dir.path(), "tool", "tool-3");
        let _ = child.kill();
        let _ = child.wait();
        assert!(running.exists(), "a running copy was removed");
        assert!(!idle.exists(), "an idle stale copy was kept");
        assert!(other.exists(), "another binary's copy was touched");
    }
}
