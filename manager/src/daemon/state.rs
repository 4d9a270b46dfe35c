//! What a node remembers about its membership across restarts: `<data-dir>/node.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DaemonError;

/// File name of the membership record under the data dir.
pub const STATE_FILE: &str = "node.json";

/// This node's place in a cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalState {
    /// "manager" or "worker".
    pub role: String,
    pub node_id: String,
    pub cluster_id: String,
    /// Raft id (managers; 0 for workers).
    pub raft_id: u64,
    /// host:port this node's gRPC port is reached on.
    pub advertise_addr: String,
    /// Managers this node knows ("host:port"), for certificate renewal.
    pub managers: Vec<String>,
}

impl LocalState {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(STATE_FILE)
    }

    /// The record in `data_dir`, if this node is in a cluster.
    pub fn load(data_dir: &Path) -> Result<Option<LocalState>, DaemonError> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| DaemonError::State {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DaemonError::State {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Writes the record atomically.
    pub fn save(&self, data_dir: &Path) -> Result<(), DaemonError> {
        let path = Self::path(data_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| DaemonError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::ca::write_atomic(&path, &bytes, 0o600).map_err(|e| DaemonError::State {
            path,
            reason: e.to_string(),
        })
    }
}
