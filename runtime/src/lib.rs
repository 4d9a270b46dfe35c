//! shoal's node-local container runtime.
pub mod cgroups;
pub mod container;
pub mod dirs;
pub mod exe;
pub mod frontdoor;
pub mod image;
pub mod logfile;
pub mod network;
pub mod seccomp;
pub mod spec;
pub mod volume;
