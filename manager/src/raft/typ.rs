//! The openraft type configuration of shoal's managers and the aliases built on it.

use std::io::Cursor;

use crate::store::{Command, Response};

openraft::declare_raft_types!(
    /// openraft types of the manager Raft group: store commands in, store responses out.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Raft node id of a manager.
pub type NodeId = u64;
/// A manager as raft membership knows it (`addr` = "host:port" of its raft endpoint).
pub type Node = openraft::BasicNode;
/// The manager Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A raft log id.
pub type LogId = openraft::LogId<NodeId>;
/// A raft vote.
pub type Vote = openraft::Vote<NodeId>;
/// A snapshot as openraft hands it around.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// Metadata of a snapshot.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
/// Membership as stored with the state.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
/// openraft's storage error.
pub type StorageError = openraft::StorageError<NodeId>;
/// openraft's RPC error types, for the network layer.
pub mod rpc {
    use super::{Node, NodeId};
    /// Errors of an RPC to a peer.
    pub type RpcError<E = openraft::error::Infallible> =
        openraft::error::RPCError<NodeId, Node, openraft::error::RaftError<NodeId, E>>;
    /// Append entries request.
    pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<super::TypeConfig>;
    /// Append entries response.
    pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
    /// Install snapshot request.
    pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<super::TypeConfig>;
    /// Install snapshot response.
    pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
    /// Vote request.
    pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
    /// Vote response.
    pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
    /// Result of `Raft::client_write`.
    pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<super::TypeConfig>;
    /// Error of `Raft::client_write`.
    pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Node>;
}
