//! Hollow nodes: a node's own key, certificate and dispatcher session with the `sim` executor
//! (no containers), many to a process — `shoal-bench hollow-nodes` and the CLI's tests of big
//! clusters. Never a default.

use std::sync::Arc;

use shoal_manager::ca::CaError;
use shoal_proto::v1 as pb;

use crate::{Agent, AgentConfig, SimExecutor, WorkerError};

/// Why a hollow node did not start.
#[derive(thiserror::Error, Debug)]
pub enum HollowError {
    /// The join (CA fetch, certificate) failed on every attempt.
    #[error("joining {host}: {source}")]
    Join { host: String, source: CaError },
    /// The agent did not start.
    #[error("starting {host}'s agent: {source}")]
    Agent { host: String, source: WorkerError },
}

/// Joins a hollow node named `hostname` through `manager` with a worker `token` (trying up to
/// `attempts` times, with the session's backoff between them) and starts its agent; its node
/// id and agent (stop it with `Agent::shutdown`).
pub async fn join_hollow(
    manager: &str,
    token: &str,
    hostname: &str,
    attempts: u32,
) -> Result<(String, Agent), HollowError> {
    let mut attempt = 0;
    let joined = loop {
        attempt += 1;
        let joined = shoal_manager::ca::join_cluster(manager, token, hostname, "127.0.0.1")
            .await
            .and_then(|j| Ok((j.tls()?, j.node_id)));
        match joined {
            Ok(j) => break j,
            Err(e) if attempt < attempts => {
                tracing::warn!(%hostname, attempt, "join failed, retrying: {e}");
                tokio::time::sleep(crate::backoff(attempt)).await;
            }
            Err(source) => {
                return Err(HollowError::Join {
                    host: hostname.to_string(),
                    source,
                })
            }
        }
    };
    let (tls, node_id) = joined;
    let description = pb::NodeDescription {
        hostname: hostname.to_string(),
        resources: Some(crate::host_resources()),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        engine_version: env!("CARGO_PKG_VERSION").into(),
        hollow: true,
    };
    let agent = Agent::start(AgentConfig {
        tls,
        managers: vec![manager.to_string()],
        data_dir: None,
        description,
        executor: Arc::new(SimExecutor::new()),
        on_desired_role: None,
    })
    .await
    .map_err(|source| HollowError::Agent {
        host: hostname.to_string(),
        source,
    })?;
    Ok((node_id, agent))
}
