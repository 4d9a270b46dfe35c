//! One test binary for the crate's integration tests (one link instead of one per file:
//! a fresh build takes a fraction of the disk and the time). Each file is a module;
//! nextest still runs every test in its own process.

mod dispatcher_support;
mod fuzz_support;
mod no_peers;
mod orchestrator_support;
mod tls_support;

mod ca_join;
mod ca_promote;
mod cluster_inprocess;
mod control_auth;
mod dispatcher_session;
mod grpc_fuzz;
mod orchestrator_global;
mod orchestrator_leader_loop;
mod orchestrator_replicated;
mod orchestrator_unknown_outcome;
mod orchestrator_updater;
mod orchestrator_view_changes;
mod raft_durable_sync;
mod raft_election;
mod raft_log_durability;
mod raft_log_hole;
mod raft_net_roundtrip;
mod raft_storage_single_node;
mod raft_storage_snapshot;
mod raft_storage_suite;
mod scheduler_filters;
mod scheduler_scale;
mod store_apply;
mod store_group;
mod tls_mtls;
mod tls_slow_clients;
