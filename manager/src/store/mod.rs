//! The replicated cluster state: typed objects in sled trees, applied from Raft.

mod types;

pub use types::{Action, Command, Event, Kind, Mutation, Object, Response, StoreError};
