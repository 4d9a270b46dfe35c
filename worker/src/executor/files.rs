//! A task's secret and config files: written, with the uid, gid and mode the service asked
//! for, to a directory on tmpfs (never to disk) and bind-mounted read-only at their targets
//! before the container's process starts; removed with the task's container.
//!
//! The plaintext lives in the agent's memory (the dispatcher's last set, only what the
//! node's tasks use) and in these tmpfs files while a task that uses it exists. The bind
//! mounts are made inside the container's mount namespace by the runtime, so the host holds
//! none (as docker's bind of a host tmpfs file, without the host mount).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use shoal_proto::v1::{ContainerSpec, Dependencies};

use super::ExecError;

/// Where each agent keeps its tasks' files (`<root>/<agent>/<task id>/`): tmpfs on every
/// Linux system shoal supports. Checked at each write: a root not on tmpfs is refused.
pub const FILES_ROOT: &str = "/dev/shm/shoal-files";
/// `statfs` magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The secrets (plaintext) and configs the dispatcher last sent, by id.
#[derive(Default)]
pub struct Held {
    secrets: HashMap<String, Vec<u8>>,
    configs: HashMap<String, Vec<u8>>,
}

impl Held {
    /// Replaces everything held with `d`.
    pub fn replace(&mut self, d: Dependencies) {
        let id = |m: Option<&shoal_proto::v1::Meta>| m.map_or(String::new(), |m| m.id.clone());
        self.secrets = d
            .secrets
            .into_iter()
            .map(|s| {
                (
                    id(s.meta.as_ref()),
                    s.spec.map(|s| s.data).unwrap_or_default(),
                )
            })
            .collect();
        self.configs = d
            .configs
            .into_iter()
            .map(|c| {
                (
                    id(c.meta.as_ref()),
                    c.spec.map(|s| s.data).unwrap_or_default(),
                )
            })
            .collect();
    }
}

/// One file to write and bind.
pub struct File {
    data: Vec<u8>,
    uid: u32,
    gid: u32,
    mode: u32,
    target: String,
}

/// The files a task's container needs, from what is held; a secret or config the node was
/// not sent is an error naming it.
pub fn wanted(held: &Held, c: &ContainerSpec) -> Result<Vec<File>, ExecError> {
    let mut out = Vec::new();
    for (kind, refs, map) in [
        ("secret", &c.secrets, &held.secrets),
        ("config", &c.configs, &held.configs),
    ] {
        for r in refs {
            let data = map.get(&r.id).ok_or_else(|| {
                ExecError::Invalid(format!(
                    "{kind} {} ({}) was not delivered to this node",
                    r.name, r.id
                ))
            })?;
            out.push(File {
                data: data.clone(),
                uid: r.uid,
                gid: r.gid,
                mode: r.mode & 0o7777,
                target: r.target.clone(),
            });
        }
    }
    Ok(out)
}

/// This agent's directory under [`FILES_ROOT`] (agents on one host keep apart by data dir).
pub fn agent_root(data_dir: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(FILES_ROOT).join(format!("{h:016x}"))
}

fn err(what: &str, p: &Path, e: impl std::fmt::Display) -> ExecError {
    ExecError::Runtime(format!("{what} {}: {e}", p.display()))
}

/// Makes `p` (and its missing parents) a root-owned directory of mode 0700 that is no
/// symlink, on tmpfs.
fn private_dir(p: &Path) -> Result<(), ExecError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
    {
        Ok(()) => {}
        Err(e) => return Err(err("create", p, e)),
    }
    let md = std::fs::symlink_metadata(p).map_err(|e| err("stat", p, e))?;
    if !md.is_dir() || md.uid() != 0 {
        return Err(ExecError::Runtime(format!(
            "{} is not a root-owned directory: refusing to keep secrets there",
            p.display()
        )));
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("chmod", p, e))?;
    if fs_type(p)? != TMPFS_MAGIC {
        return Err(ExecError::Runtime(format!(
            "{} is not on tmpfs: secrets are never written to disk",
            p.display()
        )));
    }
    Ok(())
}

/// The `statfs` type of the filesystem holding `p`.
fn fs_type(p: &Path) -> Result<i64, ExecError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| err("statfs", p, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs the call fills in.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(err("statfs", p, std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it filled `st` in.
    let t = unsafe { st.assume_init() }.f_type;
    // Its C type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    Ok(t as i64)
}

/// Writes `files` into `dir` (made afresh: the task's), each owned and moded as asked, and
/// returns the spec's bind mounts for them.
pub fn write(dir: &Path, files: &[File]) -> Result<Vec<Value>, ExecError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    // Each level checked: a directory someone else made in /dev/shm is refused.
    for d in dir
        .ancestors()
        .skip(1)
        .take_while(|d| d.starts_with(FILES_ROOT))
    {
        private_dir(d)?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("remove", dir, e)),
    }
    private_dir(dir)?;
    let mut mounts = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let p = dir.join(i.to_string());
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(|e| err("create", &p, e))?;
        out.write_all(&f.data).map_err(|e| err("write", &p, e))?;
        std::os::unix::fs::fchown(&out, Some(f.uid), Some(f.gid))
            .map_err(|e| err("chown", &p, e))?;
        out.set_permissions(std::fs::Permissions::from_mode(f.mode))
            .map_err(|e| err("chmod", &p, e))?;
        mounts.push(json!({
            "destination": f.target,
            "type": "bind",
            "source": p,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec", "rprivate"],
        }));
    }
    Ok(mounts)
}

/// Removes a task's files; none there is not an error.
pub fn remove(dir: &Path) -> Result<(), ExecError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err("remove", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::v1 as pb;

    #[test]
    fn files_land_on_tmpfs_with_their_owner_and_mode() {
        let root = Path::new(FILES_ROOT).join(format!("unit-{}", std::process::id()));
        let dir = root.join("task");
        let files = vec![File {
            data: b"s3cr3t".to_vec(),
            uid: 1000,
            gid: 1001,
            mode: 0o400,
            target: "/run/secrets/db".into(),
        }];
        let mounts = write(&dir, &files).unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0]["destination"], "/run/secrets/db");
        let p = dir.join("0");
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1000, 1001, 0o400)
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"s3cr3t");
        remove(&dir).unwrap();
        assert!(!dir.exists());
        let _ = std::fs::remove_dir_all(&root);
        // The shared root too, unless an agent uses it.
        let _ = std::fs::remove_dir(FILES_ROOT);
    }

    #[test]
    fn a_file_not_delivered_is_named() {
        let mut held = Held::default();
        held.replace(pb::Dependencies::default());
        let c = pb::ContainerSpec {
            secrets: vec![pb::FileReference {
                id: "abc".into(),
                name: "db".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = wanted(&held, &c).err().unwrap().to_string();
        assert!(e.contains("secret db (abc) was not delivered"), "{e}");
    }

    #[test]
    fn a_root_off_tmpfs_is_refused() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        if fs_type(d.path()).unwrap() == TMPFS_MAGIC {
            eprintln!("/var/tmp is tmpfs here: no disk to refuse");
            return;
        }
        let e = private_dir(&d.path().join("x")).unwrap_err().to_string();
        assert!(e.contains("not on tmpfs"), "{e}");
    }
}
