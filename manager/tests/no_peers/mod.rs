//! A Raft network for one-voter test clusters: any RPC attempt is a failure of the test.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::BasicNode;
use shoal_manager::raft::typ::rpc::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use shoal_manager::raft::TypeConfig;

/// Initializes `raft` as the only voter of its cluster and waits until it leads.
pub async fn initialize_alone(raft: &shoal_manager::raft::Raft) {
    raft.initialize(std::collections::BTreeMap::from([(
        1u64,
        BasicNode::new("127.0.0.1:1"),
    )]))
    .await
    .expect("initialize");
    raft.wait(Some(std::time::Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "leader")
        .await
        .expect("becomes leader");
}

/// A one-voter cluster never sends an RPC.
pub struct NoPeers;

fn no_peer<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(
        "single-node test cluster has no peers",
    )))
}

impl RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(no_peer())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(no_peer())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest,
        _option: RPCOption,
    ) -> Result<VoteResponse, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(no_peer())
    }
}

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoPeers {
        NoPeers
    }
}
