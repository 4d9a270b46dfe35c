//! One test binary for the crate's integration tests (one link instead of one per file:
//! a fresh build takes a fraction of the disk and the time). Each file is a module;
//! nextest still runs every test in its own process.

mod support;

mod runtime_agent;
mod runtime_executor;
mod sim_agent;
