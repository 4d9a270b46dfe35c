//! The container state directory: `<root>/<id>/state.json`, `exit.json`, `start.sock`. Files are replaced atomically (temp file, fsync, rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// OCI lifecycle status (`paused` as runc reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// What `state.json` holds: the OCI state fields plus what shoal needs to find the processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// The container's init as the host sees it (0 once stopped and reaped).
    pub pid: i32,
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Start time of the init in clock ticks since boot, to tell it from a reused pid.
    pub init_start_time: u64,
    pub monitor_pid: i32,
    pub monitor_start_time: u64,
    /// Cgroup path relative to each hierarchy's root.
    pub cgroup: String,
}

/// `state.json` on disk: the state plus the validated spec (for `exec`).
#[derive(Serialize, Deserialize)]
pub struct StateFile {
    #[serde(flatten)]
    pub state: State,
    #[serde(default)]
    pub config: oci_spec::runtime::Spec,
}

/// How the container's init ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell's convention: the exit code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

pub const STATE_FILE: &str = "state.json";
pub const EXIT_FILE: &str = "exit.json";
pub const START_SOCKET: &str = "start.sock";
/// The container's cgroup path, written before the cgroup is made: a container whose creator
/// died half-way (no `state.json` yet) can still be removed whole.
pub const CGROUP_FILE: &str = "cgroup";

/// Write `data` to `dir/name` so a reader sees the old file or the whole new one; when
/// `durable`, the new one also survives a crash once this returns (fsync of file and dir).
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Read `exit.json` if the monitor wrote it.
pub fn read_exit(dir: &Path) -> Option<ExitStatus> {
    let text = std::fs::read(dir.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}
