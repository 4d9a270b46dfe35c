//! Helpers for shoal's integration tests, benchmarks and chaos suite: [`testbed`] brings test
//! hosts (network namespaces made by `deploy/testbed.sh`) up and down and runs commands and
//! agents in them; [`cluster`] starts agents and forms clusters of them; [`registry`] runs a
//! real registry and fills it; [`disk`] makes real file systems (ext4 on a loop device) to fill
//! and freeze; [`prometheus`] runs a real Prometheus scraping agents.

pub mod cluster;
pub mod disk;
pub mod prometheus;
pub mod registry;
pub mod testbed;
