//! One test binary for the crate's integration tests (one link instead of one per file:
//! a fresh build takes a fraction of the disk and the time). Each file is a module;
//! nextest still runs every test in its own process.

mod container_probe;
mod disk_fault_leader;
mod recovery;
mod testbed;
mod testbed_logs;
