//! Real file systems for disk faults: ext4 on a loop device, mounted on a directory (a test
//! bed host's data dir), filled to ENOSPC by a file ([`fill`]) and frozen ([`LoopFs::freeze`]:
//! every write and fsync on it blocks until it is thawed — a stuck disk).
//!
//! Nothing is left behind on any path: the loop device is detached right after the mount
//! (the kernel frees it when the file system is unmounted) and its backing file is unlinked
//! at once (the loop device keeps it open); dropping a [`LoopFs`] thaws and unmounts it (lazily
//! if a process still has files open there; `testbed.sh down` unmounts whatever is under a
//! host's directory too).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::testbed::{describe, tail, TestbedError};

/// [`fill`] writes in chunks of this size, up to [`MAX_FILL`].
const FILL_CHUNK: usize = 1 << 20;
/// Most bytes [`fill`] writes (a file system larger than this is not filled).
pub const MAX_FILL: u64 = 4 << 30;
/// Smallest loop file system made: ext4's journal and metadata need a few MiB.
const MIN_SIZE_MIB: u64 = 16;

fn run_ok(cmd: &mut Command) -> Result<String, TestbedError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Failed {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: tail(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `dir` is a mount point now (by /proc/self/mountinfo).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(dir) else {
        return false;
    };
    let want = canon.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// An ext4 file system on a loop device, mounted on a directory; unmounted when dropped.
#[derive(Debug)]
pub struct LoopFs {
    dir: PathBuf,
    device: String,
    size_mib: u64,
    frozen: AtomicBool,
}

impl LoopFs {
    /// Makes a `size_mib` MiB ext4 file system (no blocks reserved for root) on a new loop
    /// device and mounts it on `dir` (made if missing, mode 0700). Needs root.
    pub fn mount(dir: &Path, size_mib: u64) -> Result<LoopFs, TestbedError> {
        let size_mib = size_mib.max(MIN_SIZE_MIB);
        let io = |what: String| move |source| TestbedError::Io { what, source };
        fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        if is_mount_point(dir) {
            return Err(TestbedError::BadOutput {
                cmd: "mount".into(),
                output: format!("{} is already a mount point", dir.display()),
            });
        }
        let backing = std::env::temp_dir().join(format!(
            "shoal-loopfs-{}-{}.img",
            std::process::id(),
            dir.to_string_lossy().replace('/', "_")
        ));
        let f =
            fs::File::create(&backing).map_err(io(format!("creating {}", backing.display())))?;
        f.set_len(size_mib << 20)
            .map_err(io(format!("sizing {}", backing.display())))?;
        drop(f);
        let attached = run_ok(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&backing),
        );
        // The loop device holds the file open: its name can go now, whatever happens next.
        let _ = fs::remove_file(&backing);
        let device = attached?.trim().to_string();
        let made = run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-L", "shoal-loopfs"])
                .arg(&device),
        )
        .and_then(|_| run_ok(Command::new("mount").args(["-t", "ext4", &device]).arg(dir)));
        // Detached while mounted, the device is freed by the kernel at the unmount; not
        // mounted, it is freed now.
        let detached = run_ok(Command::new("losetup").args(["-d", &device]));
        made?;
        detached?;
        let lfs = LoopFs {
            dir: dir.to_path_buf(),
            device,
            size_mib,
            frozen: AtomicBool::new(false),
        };
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", dir.display())))?;
        Ok(lfs)
    }

    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loop device (`/dev/loopN`).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Its size in MiB.
    pub fn size_mib(&self) -> u64 {
        self.size_mib
    }

    /// Freezes the file system: every write and fsync on it blocks until [`LoopFs::thaw`].
    pub fn freeze(&self) -> Result<(), TestbedError> {
        run_ok(Command::new("fsfreeze").arg("--freeze").arg(&self.dir))?;
        self.frozen.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Thaws a frozen file system (nothing to do when it is not frozen).
    pub fn thaw(&self) -> Result<(), TestbedError> {
        if !self.frozen.load(Ordering::SeqCst) {
            return Ok(());
        }
        run_ok(Command::new("fsfreeze").arg("--unfreeze").arg(&self.dir))?;
        self.frozen.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether it is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Thaws and unmounts it (lazily when busy); nothing to do once unmounted.
    pub fn unmount(&self) -> Result<(), TestbedError> {
        // A frozen file system that is unmounted lazily can never be thawed again.
        self.thaw()?;
        if !is_mount_point(&self.dir) {
            return Ok(());
        }
        if run_ok(Command::new("umount").arg(&self.dir)).is_ok() {
            return Ok(());
        }
        run_ok(Command::new("umount").arg("-l").arg(&self.dir)).map(drop)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("loop file system on {}: {e}", self.dir.display());
        }
    }
}

/// Writes zeros to `path` until its file system is full (ENOSPC) or [`MAX_FILL`] bytes are
/// written; returns the bytes written. The file stays: removing it frees the space.
pub fn fill(path: &Path) -> Result<u64, TestbedError> {
    let io = |what: String| move |source| TestbedError::Io { what, source };
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    let chunk = vec![0u8; FILL_CHUNK];
    let mut n = 0u64;
    while n < MAX_FILL {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(io(format!("writing {}", path.display()))(e)),
        }
    }
    // The last partial blocks.
    let small = [0u8; 512];
    while let Ok(k) = f.write(&small) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    // On a file system with delayed allocation the blocks are only taken at writeback.
    let _ = f.sync_all();
    Ok(n)
}
