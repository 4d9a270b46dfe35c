//! Cgroups v1 and v2: one cgroup per container, resource limits, freezer, stats, teardown.
//!
//! The hierarchy is detected once per process ([`hierarchy`]); every other operation takes
//! its root from a [`Hierarchy`] value so unit tests can point it at a fake tree in a tempdir.

mod devices;
#[cfg(test)]
mod fake_tests;
mod fs;
mod stats;
mod v1;
mod v2;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

pub use v1::{V1Manager, V1_CONTROLLERS};
pub use v2::V2Manager;

/// Where the host's cgroup filesystems are mounted by default.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// `statfs` magic of a cgroup2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Errors of the cgroups module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup root could not be inspected.
    #[error("cannot detect the cgroup hierarchy at {path}: {source}")]
    Detect {
        /// Root that was inspected.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// The resources need a controller the host does not offer.
    #[error("cgroup controller \"{0}\" not available")]
    ControllerMissing(String),
    /// The relative cgroup path is empty or escapes the hierarchy.
    #[error("invalid cgroup path {0:?}: must be a non-empty relative path without \"..\"")]
    InvalidPath(String),
    /// `create` found the container's cgroup already there.
    #[error("cgroup {0} already exists")]
    AlreadyExists(PathBuf),
    /// `open` found no cgroup at the path.
    #[error("cgroup {0:?} not found")]
    NotFound(String),
    /// A resource field this runtime does not implement.
    #[error("unsupported cgroup resource {0}")]
    Unsupported(String),
    /// A resource field with a value the kernel cannot take.
    #[error("invalid cgroup resource {field}: {reason}")]
    Invalid {
        /// OCI field name.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Writing a cgroup file failed.
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        /// File written.
        path: PathBuf,
        /// Value written.
        value: String,
        /// Why.
        source: io::Error,
    },
    /// Reading a cgroup file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A cgroup file held something unexpected.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// File read.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Making a cgroup directory failed.
    #[error("cannot create cgroup {path}: {source}")]
    Mkdir {
        /// Directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Removing a cgroup directory failed (after the bounded retries).
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        /// Directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The freezer did not reach FROZEN within its bound.
    #[error("cgroup {0} did not freeze in time")]
    FreezeTimeout(PathBuf),
    /// Processes kept appearing after the bounded kill rounds.
    #[error("cgroup {0} still has processes after killing them repeatedly")]
    KillTimeout(PathBuf),
    /// Signalling a process failed for a reason other than it being gone.
    #[error("cannot kill pid {pid}: {source}")]
    Kill {
        /// Target.
        pid: i32,
        /// Why.
        source: nix::Error,
    },
    /// Loading or attaching the v2 device-filter eBPF program failed.
    #[error("cannot install the cgroup v2 device filter: {0}")]
    DeviceFilter(String),
}

/// The cgroup hierarchy in use on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Controllers mounted one per directory under `root` (hybrid hosts included).
    V1 {
        /// Usually /sys/fs/cgroup.
        root: PathBuf,
    },
    /// The unified hierarchy mounted at `root`.
    V2 {
        /// Usually /sys/fs/cgroup.
        root: PathBuf,
    },
}

/// Detected once per process: pure v2 when /sys/fs/cgroup is cgroup2; otherwise v1 (hybrid's
/// unified tree has no controllers to use).
pub fn hierarchy() -> Result<&'static Hierarchy, CgroupError> {
    static DETECTED: OnceLock<Hierarchy> = OnceLock::new();
    if let Some(h) = DETECTED.get() {
        return Ok(h);
    }
    let h = detect(Path::new(DEFAULT_ROOT))?;
    Ok(DETECTED.get_or_init(|| h))
}

/// Classify the filesystem mounted at `root` (statfs magic): cgroup2 means pure v2.
pub fn detect(root: &Path) -> Result<Hierarchy, CgroupError> {
    let st = nix::sys::statfs::statfs(root).map_err(|source| CgroupError::Detect {
        path: root.to_path_buf(),
        source,
    })?;
    // The magic's integer type differs between libc targets; widen before comparing.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.filesystem_type().0 as i64;
    if magic == CGROUP2_SUPER_MAGIC {
        Ok(Hierarchy::V2 {
            root: root.to_path_buf(),
        })
    } else {
        Ok(Hierarchy::V1 {
            root: root.to_path_buf(),
        })
    }
}

/// A container's cgroup at `rel` (e.g. "shoal/<id>", or the spec's linux.cgroupsPath) in every
/// hierarchy in use. `create` makes the directories and applies resources; a controller the
/// resources need but the host lacks is an error naming it, and nothing is left behind.
pub fn create(
    rel: &str,
    res: Option<&LinuxResources>,
) -> Result<Box<dyn CgroupManager>, CgroupError> {
    create_in(hierarchy()?, rel, res)
}

/// Open an existing one (for pause/stats/delete from another process).
pub fn open(rel: &str) -> Result<Box<dyn CgroupManager>, CgroupError> {
    open_in(hierarchy()?, rel)
}

/// [`create`] in an explicit hierarchy (a fake tree in tests, or the hybrid's unified tree).
pub fn create_in(
    h: &Hierarchy,
    rel: &str,
    res: Option<&LinuxResources>,
) -> Result<Box<dyn CgroupManager>, CgroupError> {
    let rel = normalize_rel(rel)?;
    match h {
        Hierarchy::V1 { root } => Ok(Box::new(V1Manager::create(root, &rel, res)?)),
        Hierarchy::V2 { root } => Ok(Box::new(V2Manager::create(root, &rel, res)?)),
    }
}

/// [`open`] in an explicit hierarchy.
pub fn open_in(h: &Hierarchy, rel: &str) -> Result<Box<dyn CgroupManager>, CgroupError> {
    let rel = normalize_rel(rel)?;
    match h {
        Hierarchy::V1 { root } => Ok(Box::new(V1Manager::open(root, &rel)?)),
        Hierarchy::V2 { root } => Ok(Box::new(V2Manager::open(root, &rel)?)),
    }
}

/// One container's cgroup, whichever hierarchy holds it.
pub trait CgroupManager: Send + Sync {
    /// The path relative to the hierarchy root, without a leading slash.
    fn rel_path(&self) -> &str;
    /// Move a process (all its threads) into the cgroup.
    fn add_task(&self, pid: i32) -> Result<(), CgroupError>;
    /// Apply (or update) resource limits.
    fn apply(&self, res: &LinuxResources) -> Result<(), CgroupError>;
    /// Freeze every process; returns once the state is FROZEN.
    fn freeze(&self) -> Result<(), CgroupError>;
    /// Thaw a frozen cgroup.
    fn thaw(&self) -> Result<(), CgroupError>;
    /// Whether the cgroup is frozen.
    fn is_frozen(&self) -> Result<bool, CgroupError>;
    /// Processes in the cgroup and its descendants.
    fn pids(&self) -> Result<Vec<i32>, CgroupError>;
    /// Usage counters.
    fn stats(&self) -> Result<CgroupStats, CgroupError>;
    /// Kill every process left (SIGKILL, thawing first) and remove the directories.
    fn destroy(&self) -> Result<(), CgroupError>;
}

/// Usage counters of one container's cgroup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time consumed, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory in use, bytes.
    pub memory_usage: u64,
    /// Highest memory use seen, bytes (0 when the kernel does not track it).
    pub memory_peak: u64,
    /// Memory limit, bytes; `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// Processes killed by the OOM killer.
    pub oom_kills: u64,
    /// Processes now in the cgroup.
    pub pids_current: u64,
    /// Process limit; `None` when unlimited.
    pub pids_limit: Option<u64>,
}

/// Strip a leading '/', refuse empty paths and any `..` or `.` component.
fn normalize_rel(rel: &str) -> Result<String, CgroupError> {
    let trimmed = rel.trim_start_matches('/').trim_end_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CgroupError::InvalidPath(rel.to_string()));
    }
    Ok(trimmed.to_string())
}

/// Fields neither hierarchy implements: refused by name rather than ignored.
fn refuse_unsupported(res: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(m) = res.memory() {
        if m.kernel().is_some() {
            return Err(CgroupError::Unsupported(
                "linux.resources.memory.kernel (removed from the kernel)".into(),
            ));
        }
        if m.kernel_tcp().is_some() {
            return Err(CgroupError::Unsupported(
                "linux.resources.memory.kernelTCP".into(),
            ));
        }
    }
    if let Some(c) = res.cpu() {
        if c.realtime_runtime().is_some() || c.realtime_period().is_some() {
            return Err(CgroupError::Unsupported(
                "linux.resources.cpu.realtimeRuntime/realtimePeriod".into(),
            ));
        }
    }
    if res.block_io().is_some() {
        return Err(CgroupError::Unsupported("linux.resources.blockIO".into()));
    }
    if res.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(CgroupError::ControllerMissing("rdma".into()));
    }
    Ok(())
}

/// OCI cpu shares → cgroup v2 cpu.weight, the conversion runc uses.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_paths_are_normalized_and_checked() {
        assert_eq!(normalize_rel("/shoal/abc").unwrap(), "shoal/abc");
        assert_eq!(normalize_rel("shoal/abc/").unwrap(), "shoal/abc");
        for bad in ["", "/", "shoal/../etc", "./x", "a//b"] {
            assert!(
                matches!(normalize_rel(bad), Err(CgroupError::InvalidPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(512), 20);
    }

    #[test]
    fn detect_sees_v1_or_v2_on_this_host() {
        // /sys/fs/cgroup is a tmpfs of v1 mounts here; on pure v2 hosts it is cgroup2.
        let h = detect(Path::new(DEFAULT_ROOT)).unwrap();
        let is_cgroup2 = std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(DEFAULT_ROOT) && l.contains(" cgroup2 "));
        assert_eq!(matches!(h, Hierarchy::V2 { .. }), is_cgroup2);
        let h2 = detect(Path::new("/sys/fs/cgroup/unified"));
        if let Ok(h2) = h2 {
            if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
                assert!(matches!(h2, Hierarchy::V2 { .. }));
            }
        }
    }
}
