//! shoal's worker agent: the dispatcher session client, one controller per task, the
//! executors (`runtime` for real containers, `sim` for hollow nodes) and the local task
//! database that lets a restarted agent adopt its running containers.

pub mod agent;
pub mod controller;
pub mod db;
pub mod dns;
pub mod executor;
pub mod health;
pub mod hollow;
mod logs;
pub mod metrics;
pub mod peers;
pub mod registry;
pub mod registry_server;
mod session;

pub use agent::{Agent, AgentConfig, DesiredRoleHook, TasksReader, WorkerError};
pub use executor::{Executor, RuntimeExecutor, RuntimeExecutorConfig, SimExecutor};
pub use session::{backoff, RECONNECT_BASE, RECONNECT_MAX};

/// This host's CPUs (nano-CPUs) and memory (bytes), as a node reports them at session start.
pub fn host_resources() -> shoal_proto::v1::Resources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<i64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    shoal_proto::v1::Resources {
        nano_cpus: cpus * 1_000_000_000,
        memory_bytes: memory,
    }
}
