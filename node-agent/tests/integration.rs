//! One test binary for the crate's integration tests (one link instead of one per file:
//! a fresh build takes a fraction of the disk and the time). Each file is a module;
//! nextest still runs every test in its own process.

#[path = "support/services.rs"]
mod services;
mod support;

mod backup_cli;
mod big_cluster_cli;
mod cluster_cli;
mod cluster_registry;
mod cluster_timers_cli;
mod converge_cli;
mod events_cli;
mod failover_cli;
mod formats_cli;
mod frontdoor_cli;
mod health_cli;
mod image_cli;
mod info_cli;
mod install_script;
mod local_cli;
mod metrics_prometheus;
mod node_local_cli;
mod node_ps_cli;
mod overlay_clusters;
mod promote_cli;
mod registry_cli;
mod secrets_cli;
mod service_cli;
mod service_logs_cli;
mod service_registry;
mod service_update_cli;
mod service_volumes_cli;
mod stack_cli;
mod system_cli;
mod volumes_cli;
