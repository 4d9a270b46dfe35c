//! Executors: what turns a task into a running thing. `runtime` runs real containers through
//! shoal's runtime; `sim` is a hollow node's bookkeeping (scale tests only, never a default).
//! The container id is always the task id.

pub mod files;
pub mod runtime;
pub mod sim;

use shoal_proto::v1::Task;

pub use runtime::{RuntimeExecutor, RuntimeExecutorConfig};
pub use sim::SimExecutor;

/// Errors of an executor.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    /// The task's image is not in the local image store.
    #[error("image {0} not found on node")]
    ImageNotFound(String),
    /// The task's image could not be pulled from its registry.
    #[error("pull {0}")]
    Pull(String),
    /// The task's spec cannot be run (bad user, bad image reference...).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The runtime failed.
    #[error("{0}")]
    Runtime(String),
}

/// How a task's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The shell's convention: the exit code, or 128 + the signal that killed it.
    pub code: i32,
}

/// What the executor finds of a task's container (after an agent restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// No container.
    Missing,
    /// Created, never started.
    Created,
    /// Running (or paused) with this host pid.
    Running { pid: i32 },
    /// Exited.
    Exited(Exit),
    /// A container whose processes are gone with no exit status recorded.
    Lost,
}

/// The signals a stop sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL: after the grace period.
    Kill,
}

/// A started task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Container id (the task id).
    pub container_id: String,
    /// Host pid of its process (0 when it has none, as in `sim`).
    pub pid: i32,
}

/// How one health check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// 0: passed; anything else failed (docker's rule).
    pub exit_code: i32,
    /// What it printed (bounded), or why it could not run or was killed.
    pub output: String,
}

/// Runs tasks. Every method is keyed by the task id, so a restarted agent can reach the
/// containers an earlier one started.
/// How an executor tells a task's status what a long step is doing.
pub type Note = dyn Fn(&str) + Send + Sync;

#[tonic::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Makes what the task needs available locally (its image's layers); `note` tells the
    /// task's status what it is doing meanwhile ("pulling …").
    async fn prepare(&self, task: &Task, note: &Note) -> Result<(), ExecError>;
    /// Creates and starts the task's container.
    async fn start(&self, task: &Task) -> Result<Started, ExecError>;
    /// Waits until the task's process exits. Cancel-safe.
    async fn wait(&self, task_id: &str) -> Result<Exit, ExecError>;
    /// Signals the task's process; a process that already exited is not an error.
    async fn signal(&self, task_id: &str, signal: StopSignal) -> Result<(), ExecError>;
    /// Removes the task's container and what it left on disk; a missing one is not an error.
    async fn remove(&self, task_id: &str) -> Result<(), ExecError>;
    /// What is there now of the task's container.
    async fn probe(&self, task_id: &str) -> Result<Probe, ExecError>;
    /// The ids of every task container this executor holds on the node, made, half-made or
    /// partly removed (only its own: another agent's on the same machine are not listed), so
    /// that an agent can remove the ones it has no task for.
    async fn held(&self) -> Result<Vec<String>, ExecError> {
        Ok(Vec::new())
    }
    /// The health check the task's image declares (docker's HEALTHCHECK), if any.
    async fn image_healthcheck(
        &self,
        _task: &Task,
    ) -> Result<Option<shoal_proto::v1::HealthCheck>, ExecError> {
        Ok(None)
    }
    /// Runs one health check, `argv`, in the task's running container; it is killed (with
    /// what it started) at `timeout`, which is a failed check.
    async fn check(
        &self,
        _task_id: &str,
        _argv: &[String],
        _timeout: std::time::Duration,
    ) -> Result<CheckResult, ExecError> {
        Err(ExecError::Runtime(
            "this executor runs no health checks".into(),
        ))
    }
    /// The other nodes' underlay addresses changed (the cluster networks' forwarding follows
    /// them). Executors without networks ignore it.
    fn set_peers(&self, _peers: Vec<std::net::Ipv4Addr>) {}
    /// The service records of the node's cluster networks changed (the tasks' embedded DNS
    /// answers from them). Executors without networks ignore it.
    fn set_records(&self, _records: shoal_proto::v1::ServiceRecords) {}
    /// The network attachments of standalone containers on this node (`shoal run --network
    /// NAME`), the whole set each time: their embedded DNS and virtual IPs are the agent's.
    /// Executors without networks ignore it.
    fn set_attachments(&self, _attachments: Vec<shoal_proto::v1::Task>) {}
    /// The secrets (plaintext) and configs this node's tasks use, the whole set each time:
    /// kept in memory only, written for a task only to tmpfs. Executors without containers
    /// ignore it.
    fn set_dependencies(&self, _deps: shoal_proto::v1::Dependencies) {}
    /// The usage of the task's running container (its cgroup), for metrics; `None` for
    /// executors without containers or when it cannot be read. Blocking (file reads).
    fn stats(&self, _task_id: &str) -> Option<shoal_runtime::cgroups::CgroupStats> {
        None
    }
    /// Where the task's container log is (`shoal_runtime::logfile` records, rotated);
    /// `None` for executors that keep no logs.
    fn log_path(&self, _task_id: &str) -> Option<std::path::PathBuf> {
        None
    }
}
