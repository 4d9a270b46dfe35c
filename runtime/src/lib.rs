//! shoal's node-local container runtime.
pub mod cgroups;
pub mod image;
pub mod seccomp;
