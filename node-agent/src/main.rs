//! `shoal`: the daemon, the cluster CLI and the container runtime, in one binary.
//!
//! One module per command group under `cmd/`; this file only parses and dispatches.

mod cmd;
mod metrics;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Node-local volumes: create, ls, inspect, rm, prune
    Volume(cmd::volume::VolumeArgs),
    /// Show the client's and the agent's versions
    Version,
    /// Facts of this node: agent, cluster membership, cgroups, containers, images, registry
    Info(cmd::output::InfoArgs),
    /// Keep credentials for a registry (pulls and pushes of this node use them)
    Login(cmd::image::LoginArgs),
    /// Forget a registry's credentials
    Logout(cmd::image::LogoutArgs),
    /// Run a container from a local image
    Run(Box<cmd::container::RunArgs>),
    /// List containers
    Ps(cmd::container::PsArgs),
    /// Stop containers (SIGTERM, then SIGKILL after the grace period)
    Stop(cmd::container::StopArgs),
    /// Remove containers
    Rm(cmd::container::RmArgs),
    /// Print a container's output
    Logs(cmd::container::LogsArgs),
    /// Run a command in a running container
    Exec(cmd::container::ExecArgs),
    /// The shoal daemon, in the foreground
    Agent(cmd::agent::AgentArgs),
    /// Create, join, inspect and leave a cluster
    Cluster(cmd::cluster::ClusterArgs),
    /// Manage the cluster's nodes
    Node(cmd::node::NodeArgs),
    /// Manage the cluster's services
    Service(cmd::service::ServiceArgs),
    /// Manage the cluster's networks
    Network(cmd::network::NetworkArgs),
    /// Manage the cluster's secrets
    Secret(cmd::secret::SecretArgs),
    /// Manage the cluster's configs
    Config(cmd::secret::SecretArgs),
    /// The cluster's changes as they happen (services, nodes, tasks, networks)
    Events(cmd::events::EventsArgs),
    /// Deploy and manage stacks of services from compose files
    Stack(cmd::stack::StackArgs),
    /// Disk used by images, layers and containers; remove what nothing uses
    System(cmd::system::SystemArgs),
    /// Write a shell completion script (bash, zsh, fish)
    Completion(cmd::system::CompletionArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    // A listing piped into `head` ends quietly, as with any Unix tool: the default SIGPIPE
    // action, except for the daemon, the runtime's container lifecycle (its monitors) and the
    // commands that keep a container going whatever happens to their stdout (those write
    // their output ignoring a closed stdout instead).
    let default_sigpipe = match &cli.command {
        Command::Agent(_) | Command::Run(_) | Command::Exec(_) => false,
        Command::Runtime(r) => r.only_reports(),
        _ => true,
    };
    if default_sigpipe {
        // SAFETY: called before any thread is started; restores the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Runtime(c) => cmd::runtime::run(c),
        Command::Image(c) => cmd::image::run(c),
        Command::Volume(c) => cmd::volume::run(c),
        Command::Version => cmd::output::version(),
        Command::Info(a) => cmd::output::info(a),
        Command::Login(c) => cmd::image::login(c),
        Command::Logout(c) => cmd::image::logout(c),
        Command::Run(c) => cmd::container::run(*c),
        Command::Ps(c) => cmd::container::ps(c),
        Command::Stop(c) => cmd::container::stop(c),
        Command::Rm(c) => cmd::container::rm(c),
        Command::Logs(c) => cmd::container::logs(c),
        Command::Exec(c) => cmd::container::exec(c),
        Command::Agent(c) => cmd::agent::run(c),
        Command::Cluster(c) => cmd::cluster::run(c),
        Command::Node(c) => cmd::node::run(c),
        Command::Service(c) => cmd::service::run(c),
        Command::Network(c) => cmd::network::run(c),
        Command::Secret(c) => cmd::secret::run_secret(c),
        Command::Config(c) => cmd::secret::run_config(c),
        Command::Events(c) => cmd::events::run(c),
        Command::Stack(c) => cmd::stack::run(c),
        Command::System(c) => cmd::system::run(c),
        Command::Completion(c) => cmd::system::completion(c, &mut Cli::command()),
    };
    if let Err(err) = result {
        // One line, as a user reads it: the outermost context first, then the causes.
        eprintln!("shoal: {err:#}");
        std::process::exit(1);
    }
}

/// Help and version as clap prints them; a usage error as clap words it — what is wrong,
/// the missing arguments, a "did you mean", the usage line — after `shoal: ` (exit 2).
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    let text = e.to_string();
    eprint!("shoal: {}", text.strip_prefix("error: ").unwrap_or(&text));
    std::process::exit(2)
}
