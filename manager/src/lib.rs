//! shoal manager.

pub mod ca;
pub mod controlapi;
pub mod daemon;
pub mod raft;
pub mod store;
pub mod tls;
