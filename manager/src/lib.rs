//! shoal manager.

pub mod backup;
pub mod ca;
pub mod controlapi;
pub mod daemon;
pub mod dispatcher;
pub mod metrics;
pub mod orchestrator;
pub mod raft;
pub mod scheduler;
pub mod secrets;
pub mod store;
pub mod tls;
