//! Raft for the managers: openraft 0.9 types and its storage (log and state machine) on sled.

pub mod typ;

pub use typ::{NodeId, Raft, TypeConfig};
