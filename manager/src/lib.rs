//! shoal manager.

pub mod raft;
pub mod store;
