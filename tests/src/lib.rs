//! Helpers for shoal's integration tests: [`testbed`] brings test hosts (network namespaces
//! made by `deploy/testbed.sh`) up and down and runs commands and agents in them.

pub mod testbed;
