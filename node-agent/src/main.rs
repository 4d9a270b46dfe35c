//! `shoal`: the daemon, the cluster CLI and the container runtime, in one binary.
//!
//! One module per command group under `cmd/`; this file only parses and dispatches.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "shoal: a container orchestrator",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Low-level OCI runtime, runc-compatible (`shoal runtime run -b BUNDLE ID`)
    Runtime(cmd::runtime::RuntimeArgs),
    /// Node-local images: import, load, ls, inspect, rm, prune
    Image(cmd::image::ImageArgs),
    // -- docker-like front door: run, ps, stop, rm, logs, exec (cmd/container.rs) --
    /// The shoal daemon, in the foreground
    Agent(cmd::agent::AgentArgs),
    /// Create, join, inspect and leave a cluster
    Cluster(cmd::cluster::ClusterArgs),
    /// Manage the cluster's nodes
    Node(cmd::node::NodeArgs),
    /// Manage the cluster's services
    Service(cmd::service::ServiceArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Runtime(c) => cmd::runtime::run(c),
        Command::Image(c) => cmd::image::run(c),
        Command::Agent(c) => cmd::agent::run(c),
        Command::Cluster(c) => cmd::cluster::run(c),
        Command::Node(c) => cmd::node::run(c),
        Command::Service(c) => cmd::service::run(c),
    };
    if let Err(err) = result {
        // One line, as a user reads it: the outermost context first, then the causes.
        eprintln!("shoal: {err:#}");
        std::process::exit(1);
    }
}
