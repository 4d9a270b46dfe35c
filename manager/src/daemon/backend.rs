//! What the CA and the authoriser ask of the cluster state, answered from the store (reads)
//! and through the control API (writes, forwarded to the leader).

use std::time::Duration;

use shoal_proto::v1 as pb;

use crate::ca::{CaBackend, CaError, JoinTokens, NewNode, Role, DEFAULT_NODE_CERT_LIFETIME};
use crate::controlapi::ControlApi;
use crate::store::Store;
use crate::tls::NodeRegistry;

/// Removed nodes, by the store: a node of an initialised cluster that has no Node object.
/// A replica that has not received the cluster object yet (a joining manager) knows of no
/// removals.
pub struct StoreRegistry(pub Store);

impl NodeRegistry for StoreRegistry {
    fn is_removed(&self, node_id: &str) -> bool {
        match (self.0.get_cluster(), self.0.get_node(node_id)) {
            (Ok(Some(_)), Ok(None)) => true,
            (Ok(_), Ok(_)) => false,
            // Unreadable store: refuse rather than admit a node that may be gone.
            _ => true,
        }
    }
}

/// The CA's view of the cluster on a manager.
pub struct ManagerCaBackend(pub ControlApi);

#[tonic::async_trait]
impl CaBackend for ManagerCaBackend {
    fn join_tokens(&self) -> Result<JoinTokens, CaError> {
        let cluster = self
            .0
            .store()
            .get_cluster()
            .map_err(|e| CaError::Register(e.to_string()))?
            .ok_or_else(|| CaError::Register("the cluster is not initialised".into()))?;
        JoinTokens::from_proto(&cluster.join_tokens.unwrap_or_default())
    }

    fn node_cert_lifetime(&self) -> Duration {
        let ms = self
            .0
            .store()
            .get_cluster()
            .ok()
            .flatten()
            .and_then(|c| c.spec)
            .and_then(|s| s.ca)
            .map(|ca| ca.node_cert_lifetime_ms)
            .unwrap_or(0);
        if ms == 0 {
            DEFAULT_NODE_CERT_LIFETIME
        } else {
            Duration::from_millis(ms)
        }
    }

    fn desired_role(&self, node_id: &str) -> Option<Role> {
        let node = self.0.store().get_node(node_id).ok()??;
        let role = pb::NodeRole::try_from(node.spec?.desired_role).ok()?;
        Some(Role::from_proto(role))
    }

    async fn register_node(&self, node: NewNode) -> Result<(), CaError> {
        let req = pb::RegisterNodeRequest {
            node_id: node.node_id,
            role: node.role.to_proto() as i32,
            hostname: node.hostname,
            addr: node.advertise_addr,
            cert_serial: node.cert_serial,
            renewal: false,
        };
        self.0
            .register_node_anywhere(req)
            .await
            .map_err(|s| CaError::Register(s.message().to_string()))
    }

    async fn record_renewal(&self, node_id: &str, serial: &str) -> Result<(), CaError> {
        let req = pb::RegisterNodeRequest {
            node_id: node_id.to_string(),
            cert_serial: serial.to_string(),
            renewal: true,
            ..Default::default()
        };
        self.0
            .register_node_anywhere(req)
            .await
            .map_err(|s| CaError::Register(s.message().to_string()))
    }
}
