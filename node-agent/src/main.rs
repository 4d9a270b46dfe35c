//! `shoal`: the daemon, the cluster CLI and the container runtime, in one binary.
//!
//! One module per command group under `cmd/`; this file only parses and dispatches.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shoal", version, about = "shoal: a container orchestrator", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Low-level OCI runtime, runc-compatible (`shoal runtime run -b BUNDLE ID`)
    #[command(subcommand)]
    Runtime(cmd::runtime::RuntimeCommand),
    /// Node-local images: import, load, ls, inspect, rm, prune
    Image(cmd::image::ImageArgs),
    // -- docker-like front door: run, ps, stop, rm, logs, exec (cmd/container.rs) --
    // -- cluster: agent, cluster, node, service (cmd/agent.rs, cmd/cluster.rs, ...) --
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Runtime(c) => cmd::runtime::run(c),
        Command::Image(c) => cmd::image::run(c),
    };
    if let Err(err) = result {
        // One line, as a user reads it: the outermost context first, then the causes.
        eprintln!("shoal: {err:#}");
        std::process::exit(1);
    }
}
