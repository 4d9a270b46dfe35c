//! One test binary for the crate's integration tests (one link instead of one per file:
//! a fresh build takes a fraction of the disk and the time). Each file is a module;
//! nextest still runs every test in its own process.

mod container_support;
mod frontdoor_support;
mod image_support;

mod cgroups_real;
mod cgroups_v2_unified;
mod container_lifecycle;
mod container_security;
mod frontdoor_lifecycle;
mod frontdoor_run;
mod image_fuzz;
mod image_hostile;
mod image_store;
mod network_state;
mod seccomp_real;
