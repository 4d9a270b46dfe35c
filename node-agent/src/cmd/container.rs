//! `shoal run|ps|stop|rm|logs|exec`: Docker-like containers from local images, on this node.
//!
//! `run` and `exec` exit with the container's (or process's) exit code; a failure of shoal
//! itself there exits 125, as Docker's do, so the two cannot be confused. Output captured in
//! the log is stdout and stderr merged, and `run` in the foreground streams it to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use shoal_proto::v1::control_client::ControlClient;
use shoal_runtime::container::{is_root, Container, ExecOptions, Status};
use shoal_runtime::frontdoor::{
    parse_cpus, parse_memory, parse_pids_limit, ContainerSummary, FrontDoor, FrontDoorError,
    LogFollower, RunOptions, RunState,
};
use shoal_runtime::network::{parse_publish, EtcOptions, Mode, NetRequest};

use super::output::SocketArg;

/// How long `run --network NAME` waits for the agent to serve the container's DNS.
const RESOLVER_WAIT: Duration = Duration::from_secs(5);
/// Exit code of `run`/`exec` when shoal itself fails (Docker's).
const EXIT_SHOAL_FAILED: i32 = 125;
/// How often a follower of a log looks for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(50);
/// Longest COMMAND shown by `ps` (Docker's truncation).
const PS_COMMAND_WIDTH: usize = 20;

/// The data dir option every front-door command takes.
#[derive(Args)]
pub struct DataDir {
    /// Data directory (images, layers, containers); default: the one of the agent on
    /// --socket (SHOAL_SOCKET), else /var/lib/shoal
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// `shoal run`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    data: DataDir,
    /// Run in the background and print the container id
    #[arg(short, long)]
    detach: bool,
    /// Remove the container when it exits
    #[arg(long)]
    rm: bool,
    /// Name of the container (default: generated)
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to pass this shell's value)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Container hostname (default: the short id)
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit (e.g. 64m, 1g)
    #[arg(short, long)]
    memory: Option<String>,
    /// CPUs (e.g. 0.5)
    #[arg(long)]
    cpus: Option<String>,
    /// Most processes the container may have (-1: unlimited)
    #[arg(long, allow_hyphen_values = true)]
    pids_limit: Option<String>,
    /// Mount the root filesystem read-only
    #[arg(long)]
    read_only: bool,
    /// Working directory inside the container
    #[arg(short, long)]
    workdir: Option<String>,
    /// User: name|uid[:group|gid]
    #[arg(short, long)]
    user: Option<String>,
    /// Network: bridge (the node bridge, default), host, none, or an attachable cluster network
    #[arg(long = "network", alias = "net", default_value = "bridge")]
    network: String,
    #[command(flatten)]
    socket: SocketArg,
    /// Publish a port: [IP:][HOSTPORT:]CONTAINERPORT[/tcp|udp] (no HOSTPORT: a free one)
    #[arg(short = 'p', long = "publish", value_name = "PORT")]
    publish: Vec<String>,
    /// A nameserver for the container's resolv.conf (replaces the host's)
    #[arg(long)]
    dns: Vec<String>,
    /// A DNS search domain (replaces the host's)
    #[arg(long)]
    dns_search: Vec<String>,
    /// A resolv.conf option (replaces the host's)
    #[arg(long = "dns-option", alias = "dns-opt")]
    dns_option: Vec<String>,
    /// Add a line to /etc/hosts: NAME:IP
    #[arg(long, value_name = "NAME:IP")]
    add_host: Vec<String>,
    /// Another name for the container on its network (user-defined networks only)
    #[arg(long)]
    network_alias: Vec<String>,
    /// Mount a host path or a volume: SRC:DST[:ro] (SRC an absolute path: a bind mount;
    /// else a volume, made on first use), or DST alone (a new anonymous volume)
    #[arg(short = 'v', long = "volume", value_name = "[SRC:]DST[:MODE]")]
    volume: Vec<String>,
    /// A mount: type=bind|volume,source=SRC,target=DST[,readonly] (type defaults to volume)
    #[arg(long = "mount", value_name = "type=…,source=…,target=…")]
    mount: Vec<String>,
    /// The image, then the command and its arguments (default: the image's)
    #[arg(
        value_name = "IMAGE [COMMAND [ARG...]]",
        required = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    image_and_command: Vec<String>,
}

/// `shoal ps`.
#[derive(Args)]
pub struct PsArgs {
    #[command(flatten)]
    data: DataDir,
    /// Show all containers (default: running ones)
    #[arg(short, long)]
    all: bool,
    /// Only ids
    #[arg(short, long)]
    quiet: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t = super::output::Format::Table)]
    format: super::output::Format,
    #[command(flatten)]
    socket: SocketArg,
}

/// `shoal stop`.
#[derive(Args)]
pub struct StopArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    socket: SocketArg,
    /// Seconds to wait after the stop signal before SIGKILL
    #[arg(short, long, default_value_t = 10)]
    time: u64,
    /// Containers (name, id or id prefix)
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `shoal rm`.
#[derive(Args)]
pub struct RmArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    socket: SocketArg,
    /// Kill a running container first
    #[arg(short, long)]
    force: bool,
    /// Remove the anonymous volumes the container used too
    #[arg(short, long)]
    volumes: bool,
    /// Containers (name, id or id prefix)
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `shoal logs`.
#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    socket: SocketArg,
    /// Keep printing new output until the container exits
    #[arg(short, long)]
    follow: bool,
    /// Lines to show from the end of the log, or "all"
    #[arg(short = 'n', long, default_value = "all")]
    tail: String,
    /// Show each line's time
    #[arg(short, long)]
    timestamps: bool,
    /// Container: name, id or id prefix; a service task's container by its name
    /// (SERVICE.SLOT.TASKID) or task id
    container: String,
}

/// `shoal exec`.
#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    socket: SocketArg,
    /// Set an environment variable (KEY=VALUE)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the container
    #[arg(short, long)]
    workdir: Option<PathBuf>,
    /// Do not wait for the process
    #[arg(short, long)]
    detach: bool,
    /// The container (a service task's too, by SERVICE.SLOT.TASKID or task id), then the
    /// command and its arguments
    #[arg(
        value_name = "CONTAINER COMMAND [ARG...]",
        required = true,
        trailing_var_arg = true,
        num_args = 2..
    )]
    container_and_command: Vec<String>,
}

fn open(data: &DataDir, socket: &SocketArg) -> Result<FrontDoor> {
    Ok(open_dir(data, socket)?.0)
}

/// The front door and the data dir it was opened on: the one given, else the one of the
/// agent on `socket`, else the default.
fn open_dir(data: &DataDir, socket: &SocketArg) -> Result<(FrontDoor, PathBuf)> {
    if !is_root() {
        bail!("must run as root");
    }
    let dir = super::output::data_dir_at(data.data_dir.clone(), &socket.socket);
    let fd = FrontDoor::open(&dir).with_context(|| format!("open data dir {}", dir.display()))?;
    Ok((fd, dir))
}

/// Run from the immutable copy of this binary before touching a container (CVE-2019-5736).
fn protect() -> Result<()> {
    shoal_runtime::exe::reexec_protected().context("protect the runtime binary")?;
    shoal_runtime::exe::forget_reexec_mark();
    Ok(())
}

/// Print a failure the way `main` does and exit with Docker's "the tool failed" code.
fn exit_failed(err: anyhow::Error) -> ! {
    eprintln!("shoal: {err:#}");
    std::process::exit(EXIT_SHOAL_FAILED)
}

/// The init of a foreground `run`, for forwarding the caller's signals.
static FOREGROUND_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FOREGROUND_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

fn forward_signals(pid: i32) {
    FOREGROUND_PID.store(pid, Ordering::Relaxed);
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: installing a handler that only calls kill.
        unsafe {
            libc::signal(
                sig,
                forward as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// `shoal run`.
pub fn run(args: RunArgs) -> Result<()> {
    match run_inner(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => exit_failed(e),
    }
}

/// Whether `--network` names a cluster network rather than bridge, host or none.
fn is_cluster_network(name: &str) -> bool {
    !matches!(name, "bridge" | "host" | "none")
}

/// A standalone container's attachment to a cluster network, as the manager gave it.
struct ClusterAttachment {
    id: String,
    overlay: shoal_runtime::network::OverlayAttach,
    internal: bool,
    peers: Vec<std::net::Ipv4Addr>,
}

/// Asks the cluster for an address on `network` for container `name` on this node.
fn attach_cluster_network(
    socket: &SocketArg,
    network: &str,
    name: &str,
    aliases: &[String],
) -> Result<ClusterAttachment> {
    use shoal_proto::v1 as pb;
    let r = super::output::block_on(async {
        let ch = socket.channel().await.map_err(|_| {
            anyhow::anyhow!(
                "network {network} not found: it is not bridge, host or none, and no shoal agent answers at {} to look for a cluster network",
                socket.socket.display()
            )
        })?;
        let mut c = ControlClient::new(ch);
        c.attach_network(pb::AttachNetworkRequest {
            network: network.to_string(),
            node: String::new(),
            container_name: name.to_string(),
            aliases: aliases.to_vec(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| anyhow::anyhow!("{}", e.message()))
    })?;
    let a = r.attachment.unwrap_or_default();
    let (ip, prefix) = a
        .address
        .split_once('/')
        .and_then(|(ip, p)| Some((ip.parse().ok()?, p.parse().ok()?)))
        .with_context(|| format!("network {network}: the cluster gave no address"))?;
    Ok(ClusterAttachment {
        overlay: shoal_runtime::network::OverlayAttach {
            network_id: a.network_id,
            vni: a.vni,
            address: ip,
            prefix,
            attachment: r.id.clone(),
        },
        id: r.id,
        internal: a.internal,
        peers: r.peers.iter().filter_map(|p| p.parse().ok()).collect(),
    })
}

/// Gives attachments back to the cluster.
fn detach_cluster_networks(socket: &SocketArg, ids: &[String]) -> Result<()> {
    use shoal_proto::v1 as pb;
    if ids.is_empty() {
        return Ok(());
    }
    super::output::block_on(async {
        let mut c = ControlClient::new(socket.channel().await?);
        for id in ids {
            c.detach_network(pb::DetachNetworkRequest { id: id.clone() })
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        }
        Ok(())
    })
}

/// The cluster attachments a container holds (from its network record).
fn cluster_attachments(fd: &FrontDoor, id: &str) -> Vec<String> {
    shoal_runtime::network::Attachment::load(&fd.container_dir(id))
        .map(|n| {
            n.overlays
                .iter()
                .map(|o| o.attachment.clone())
                .filter(|a| !a.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until this node's agent serves the embedded DNS in the container's
/// namespace, so that the process finds it from its first query.
fn wait_for_resolver(id: &str) {
    let ns = shoal_runtime::network::netns_path(id);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 11], 53));
    let deadline = std::time::Instant::now() + RESOLVER_WAIT;
    while std::time::Instant::now() < deadline {
        match shoal_runtime::network::udp_socket_in_netns(&ns, addr) {
            // Nobody holds it yet: give it back at once and look again.
            Ok(sock) => drop(sock),
            Err(_) => return,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("shoal: warning: the agent serves no DNS in container {id} yet; names may not resolve at first");
}

/// `-v` and `--mount` values, checked (docker's words for what is wrong).
fn mounts(args: &RunArgs) -> Result<Vec<shoal_runtime::volume::MountSpec>> {
    use shoal_runtime::volume::{parse_mount_flag, parse_volume_flag, validate_all};
    let mut out = Vec::new();
    for v in &args.volume {
        out.push(parse_volume_flag(v)?);
    }
    for m in &args.mount {
        out.push(parse_mount_flag(m)?);
    }
    validate_all(&out)?;
    Ok(out)
}

fn run_inner(mut args: RunArgs) -> Result<i32> {
    // Checked before anything is made or asked of the cluster.
    let mounts = mounts(&args)?;
    let fd = open(&args.data, &args.socket)?;
    let mut it = std::mem::take(&mut args.image_and_command).into_iter();
    let image = it.next().context("give an image to run")?;
    let cluster = is_cluster_network(&args.network);
    // Before anything is asked of the cluster: this re-executes the process.
    protect()?;
    if cluster && args.detach && args.rm {
        bail!("--rm with -d is not supported on cluster network {} yet: remove the container with shoal rm", args.network);
    }
    let name = match (&args.name, cluster) {
        (None, true) => Some(shoal_runtime::frontdoor::generated_name(0)?),
        (n, _) => n.clone(),
    };
    let attached = if cluster {
        if !args.publish.is_empty() {
            bail!(
                "--publish with cluster network {}: publish from a service instead",
                args.network
            );
        }
        Some(attach_cluster_network(
            &args.socket,
            &args.network,
            name.as_deref().unwrap_or_default(),
            &args.network_alias,
        )?)
    } else {
        None
    };
    let socket = SocketArg {
        socket: args.socket.socket.clone(),
    };
    let r = run_attached(
        &fd,
        args,
        it.collect(),
        image,
        name,
        attached.as_ref(),
        mounts,
    );
    if r.is_err() {
        if let Some(a) = &attached {
            // Nothing holds the address: give it back (the container was not made).
            if let Err(e) = detach_cluster_networks(&socket, std::slice::from_ref(&a.id)) {
                eprintln!("shoal: warning: giving back attachment {}: {e:#}", a.id);
            }
        }
    }
    r
}

fn run_attached(
    fd: &FrontDoor,
    args: RunArgs,
    command: Vec<String>,
    image: String,
    name: Option<String>,
    attached: Option<&ClusterAttachment>,
    mounts: Vec<shoal_runtime::volume::MountSpec>,
) -> Result<i32> {
    let opts = RunOptions {
        image,
        name,
        command,
        env: args.env,
        hostname: args.hostname,
        memory: args.memory.as_deref().map(parse_memory).transpose()?,
        cpus: args.cpus.as_deref().map(parse_cpus).transpose()?,
        pids_limit: args
            .pids_limit
            .as_deref()
            .map(parse_pids_limit)
            .transpose()?
            .flatten(),
        read_only: args.read_only,
        workdir: args.workdir,
        user: args.user,
        auto_remove: args.rm,
        network: match attached {
            // Only internal: no node bridge, no way out.
            Some(a) => NetRequest {
                mode: if a.internal { Mode::None } else { Mode::Bridge },
                publish: Vec::new(),
                overlays: vec![a.overlay.clone()],
                peers: a.peers.clone(),
            },
            None => NetRequest {
                mode: Mode::parse(&args.network)?,
                publish: args
                    .publish
                    .iter()
                    .map(|p| parse_publish(p))
                    .collect::<Result<_, _>>()?,
                overlays: Vec::new(),
                peers: Vec::new(),
            },
        },
        etc: EtcOptions {
            hostname: String::new(),
            dns: args
                .dns
                .iter()
                .map(|d| {
                    d.parse()
                        .with_context(|| format!("invalid --dns {d:?}: not an IP address"))
                })
                .collect::<Result<_>>()?,
            dns_search: args
                .dns_search
                .iter()
                .map(|d| EtcOptions::check_name("--dns-search", d))
                .collect::<Result<_, _>>()?,
            dns_options: args.dns_option,
            extra_hosts: args
                .add_host
                .iter()
                .map(|h| EtcOptions::parse_add_host(h))
                .collect::<Result<_, _>>()?,
            aliases: args.network_alias.clone(),
        },
        mounts,
    };
    let mut opts = opts;
    if attached.is_some() {
        // The embedded DNS of the cluster's networks (its upstream is the agent's).
        opts.etc.dns = vec![std::net::IpAddr::from([127, 0, 0, 11])];
        opts.etc.dns_options = vec!["ndots:0".into()];
    } else if !args.network_alias.is_empty() {
        bail!(
            "--network-alias needs a user-defined network; {} is not one",
            opts.network.mode.name()
        );
    }
    let mut c = fd.create(&opts)?;
    let id = c.record.id.clone();
    if attached.is_some() {
        wait_for_resolver(&id);
    }
    if args.detach {
        fd.start(&mut c)?;
        if args.rm {
            fd.spawn_auto_remove(&id)
                .context("watch the container for --rm")?;
        }
        // A closed stdout does not make a started container a failure.
        let _ = writeln!(std::io::stdout(), "{id}");
        return Ok(0);
    }
    let mut follower = LogFollower::new(&fd.log_path(&id), false);
    forward_signals(c.container.pid());
    fd.start(&mut c)?;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let status = loop {
        let s = c.container.wait_timeout(Some(FOLLOW_INTERVAL))?;
        // A closed stdout must not stop the wait (or the --rm).
        let _ = follower.poll(&mut out, &mut err);
        if let Some(s) = s {
            break s;
        }
    };
    let _ = follower.poll(&mut out, &mut err);
    let _ = out.flush();
    drop((out, err));
    if args.rm {
        fd.remove_with_volumes(&id, true, true)
            .context("remove the container")?;
        if let Some(a) = attached {
            detach_cluster_networks(&args.socket, std::slice::from_ref(&a.id))
                .with_context(|| format!("giving back network attachment {}", a.id))?;
        }
    }
    Ok(status.shell_code())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Docker's human duration ("Less than a second", "3 seconds", "About a minute", ...).
fn human_duration(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    if secs < 1 {
        "Less than a second".into()
    } else if secs == 1 {
        "1 second".into()
    } else if secs < 60 {
        format!("{secs} seconds")
    } else if m == 1 {
        "About a minute".into()
    } else if m < 60 {
        format!("{m} minutes")
    } else if h == 1 {
        "About an hour".into()
    } else if h < 48 {
        format!("{h} hours")
    } else if d < 14 {
        format!("{d} days")
    } else if d < 60 {
        format!("{} weeks", d / 7)
    } else if d < 730 {
        format!("{} months", d / 30)
    } else {
        format!("{} years", d / 365)
    }
}

fn status_text(state: RunState, now: u64) -> String {
    let ago = |t: u64| human_duration(now.saturating_sub(t));
    match state {
        RunState::Created => "Created".into(),
        RunState::Running { started } => format!("Up {}", ago(started)),
        RunState::Paused { started } => format!("Up {} (Paused)", ago(started)),
        RunState::Exited { code, finished } => format!("Exited ({code}) {} ago", ago(finished)),
        RunState::Dead => "Dead".into(),
    }
}

fn command_text(args: &[String]) -> String {
    let s = args.join(" ");
    let s = if s.chars().count() > PS_COMMAND_WIDTH {
        let mut t: String = s.chars().take(PS_COMMAND_WIDTH - 1).collect();
        t.push('…');
        t
    } else {
        s
    };
    format!("\"{s}\"")
}

/// One row of `ps`: a front-door container or a service task's container.
#[derive(Debug, Clone)]
struct PsRow {
    id: String,
    name: String,
    image: String,
    command: Vec<String>,
    /// Seconds since the epoch.
    created: u64,
    state: RunState,
    /// Docker's word for the health of a task with a check: starting, healthy, unhealthy.
    health: Option<&'static str>,
    ports: String,
    networks: String,
    /// Docker's labels of a task's container (service, task, node), `k=v,…`.
    labels: String,
}

impl PsRow {
    fn from_summary(c: &ContainerSummary) -> PsRow {
        let r = &c.record;
        PsRow {
            id: r.id.clone(),
            name: r.name.clone(),
            image: r.image.clone(),
            command: r.command.clone(),
            created: r.created,
            state: c.state,
            health: None,
            ports: c
                .network
                .as_ref()
                .map(|n| n.ports_text())
                .unwrap_or_default(),
            networks: c
                .network
                .as_ref()
                .map_or("none", |n| n.mode.name())
                .to_string(),
            labels: String::new(),
        }
    }

    fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }

    /// STATUS as docker prints it: "Up 3 minutes (healthy)", "Exited (0) 5 seconds ago", …
    fn status(&self, now: u64) -> String {
        let s = status_text(self.state, now);
        match (self.state, self.health) {
            (RunState::Running { .. }, Some("starting")) => format!("{s} (health: starting)"),
            (RunState::Running { .. }, Some(h)) => format!("{s} ({h})"),
            _ => s,
        }
    }

    fn json(&self, now: u64) -> serde_json::Value {
        serde_json::json!({
            "ID": self.id,
            "Names": self.name,
            "Image": self.image,
            "Command": self.command.join(" "),
            "Created": self.created,
            "State": state_word(self.state),
            "Status": self.status(now),
            "Health": self.health.unwrap_or(""),
            "Ports": self.ports,
            "Networks": self.networks,
            "Labels": self.labels,
        })
    }
}

/// Docker's `State` of a container.
fn state_word(s: RunState) -> &'static str {
    match s {
        RunState::Created => "created",
        RunState::Running { .. } => "running",
        RunState::Paused { .. } => "paused",
        RunState::Exited { .. } => "exited",
        RunState::Dead => "dead",
    }
}

/// Docker's word for a task's health, `None` without a check.
fn health_word(h: i32) -> Option<&'static str> {
    use shoal_proto::v1::HealthState;
    match HealthState::try_from(h) {
        Ok(HealthState::Starting) => Some("starting"),
        Ok(HealthState::Healthy) => Some("healthy"),
        Ok(HealthState::Unhealthy) => Some("unhealthy"),
        _ => None,
    }
}

/// How long `ps` waits for the agent's answer before it lists the front door's containers
/// alone.
const AGENT_WAIT: Duration = Duration::from_secs(5);

/// The tasks the agent answering on `socket` holds, when that agent's data dir is `dir` (else
/// they are another node's). No agent there, or one in no cluster: none.
fn agent_tasks(socket: &SocketArg, dir: &std::path::Path) -> Vec<shoal_proto::v1::Task> {
    use shoal_proto::v1 as pb;
    let asked = super::output::block_on(async {
        let ask = async {
            let Ok(ch) = socket.channel().await else {
                return Ok(None);
            };
            let mut c = pb::daemon_client::DaemonClient::new(ch)
                .max_decoding_message_size(shoal_manager::controlapi::MAX_CONTROL_MESSAGE_BYTES);
            let info = c.info(pb::InfoRequest {}).await?.into_inner();
            let same = |a: &std::path::Path| std::fs::canonicalize(a).ok();
            if info.data_dir.is_empty() || same(std::path::Path::new(&info.data_dir)) != same(dir) {
                return Ok(None);
            }
            c.local_tasks(pb::LocalTasksRequest {})
                .await
                .map(|r| Some(r.into_inner().tasks))
        };
        match tokio::time::timeout(AGENT_WAIT, ask).await {
            Ok(r) => Ok(r),
            Err(_) => Err(anyhow::anyhow!(
                "the agent on {} did not answer in time",
                socket.socket.display()
            )),
        }
    });
    match asked {
        Ok(Ok(tasks)) => tasks.unwrap_or_default(),
        // An agent of a version without the call.
        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Vec::new(),
        Ok(Err(s)) => {
            eprintln!(
                "shoal: warning: the agent's tasks are not listed: {}",
                s.message()
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("shoal: warning: the agent's tasks are not listed: {e:#}");
            Vec::new()
        }
    }
}

/// The name of a task's container, as docker names it: SERVICE.SLOT.TASKID (global services:
/// SERVICE.NODEID.TASKID).
fn task_container_name(t: &shoal_proto::v1::Task) -> String {
    let id = t.meta.as_ref().map_or("", |m| m.id.as_str());
    match t.slot {
        0 => format!("{}.{}.{id}", t.service_name, t.node_id),
        slot => format!("{}.{slot}.{id}", t.service_name),
    }
}

/// The rows of the tasks whose containers are on this node (the container id is the task id):
/// named as docker names them, SERVICE.SLOT.TASKID (global services: SERVICE.NODEID.TASKID).
fn task_rows(dir: &std::path::Path, tasks: &[shoal_proto::v1::Task]) -> Vec<PsRow> {
    let containers = dir.join(shoal_runtime::frontdoor::CONTAINERS_DIR);
    let runtime_root = dir.join(super::agent::TASK_RUNTIME_DIR);
    let running = shoal_proto::v1::TaskState::Running as i32;
    let mut rows = Vec::new();
    for t in tasks.iter().filter(|t| !t.network_attachment) {
        let id = t.meta.as_ref().map_or("", |m| m.id.as_str());
        if id.is_empty() {
            continue;
        }
        let status = t.status.clone().unwrap_or_default();
        // Up since the task was reported RUNNING (that status keeps its time).
        let started = (status.state == running && status.timestamp_ms > 0)
            .then_some((status.timestamp_ms / 1000) as u64);
        let c = match shoal_runtime::frontdoor::other_container(
            &runtime_root,
            &containers.join(id),
            id,
            started,
        ) {
            Ok(Some(c)) => c,
            // Not made yet, or already removed.
            Ok(None) => continue,
            Err(e) => {
                eprintln!("shoal: warning: task {id}: {e}");
                continue;
            }
        };
        let name = task_container_name(t);
        let networks: Vec<&str> = t.networks.iter().map(|n| n.network_name.as_str()).collect();
        rows.push(PsRow {
            id: id.to_string(),
            image: t
                .spec
                .as_ref()
                .and_then(|s| s.container.as_ref())
                .map(|c| c.image.clone())
                .unwrap_or_default(),
            command: c.command,
            created: c.created,
            state: c.state,
            health: health_word(status.health),
            ports: c
                .network
                .as_ref()
                .map(|n| n.ports_text())
                .unwrap_or_default(),
            networks: if networks.is_empty() {
                c.network
                    .as_ref()
                    .map_or("none", |n| n.mode.name())
                    .to_string()
            } else {
                networks.join(",")
            },
            labels: format!(
                "com.docker.swarm.node.id={},com.docker.swarm.service.id={},\
                 com.docker.swarm.service.name={},com.docker.swarm.task.id={id},\
                 com.docker.swarm.task.name={name}",
                t.node_id, t.service_id, t.service_name
            ),
            name,
        });
    }
    rows
}

/// `docker ps`-style table.
fn ps_table(list: &[PsRow], now: u64) -> String {
    let mut t = super::output::Table::new(&[
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS",
        "NAMES",
    ]);
    for r in list {
        t.row(vec![
            r.short_id().to_string(),
            r.image.clone(),
            command_text(&r.command),
            format!("{} ago", human_duration(now.saturating_sub(r.created))),
            r.status(now),
            r.ports.clone(),
            r.name.clone(),
        ]);
    }
    t.render()
}

/// `shoal ps`: the front door's containers and, through the agent of this data dir, the
/// containers of the service tasks it runs on this node.
pub fn ps(args: PsArgs) -> Result<()> {
    let (fd, dir) = open_dir(&args.data, &args.socket)?;
    let mut rows: Vec<PsRow> = fd
        .list(args.all)
        .context("list containers")?
        .iter()
        .map(PsRow::from_summary)
        .collect();
    rows.extend(
        task_rows(&dir, &agent_tasks(&args.socket, &dir))
            .into_iter()
            .filter(|r| args.all || r.state.is_running()),
    );
    // Newest first, as docker lists them.
    rows.sort_by_key(|r| std::cmp::Reverse(r.created));
    if args.quiet {
        for r in &rows {
            println!("{}", r.short_id());
        }
    } else if args.format == super::output::Format::Json {
        let now = unix_now();
        let rows: Vec<serde_json::Value> = rows.iter().map(|r| r.json(now)).collect();
        super::output::print_json(&serde_json::Value::Array(rows))?;
    } else {
        print!("{}", ps_table(&rows, unix_now()));
    }
    Ok(())
}

/// Apply `f` to every named container; report each failure on its own line, fail at the end.
fn each(
    fd: &FrontDoor,
    names: &[String],
    verb: &str,
    f: impl Fn(&str) -> Result<()>,
) -> Result<()> {
    let mut failed = Vec::new();
    for n in names {
        let r = fd
            .resolve(n)
            .map_err(anyhow::Error::from)
            .and_then(|r| f(&r.id));
        match r {
            Ok(()) => println!("{n}"),
            Err(e) => {
                if names.len() > 1 {
                    eprintln!("shoal: {verb} {n}: {e:#}");
                }
                failed.push((n.clone(), e));
            }
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 if names.len() == 1 => {
            let (n, e) = failed.remove(0);
            Err(e.context(format!("{verb} {n}")))
        }
        k => bail!("{verb}: {k} of {} containers failed", names.len()),
    }
}

/// `shoal stop`.
pub fn stop(args: StopArgs) -> Result<()> {
    let fd = open(&args.data, &args.socket)?;
    let grace = Duration::from_secs(args.time);
    each(&fd, &args.containers, "stop", |id| {
        fd.stop(id, grace)?;
        Ok(())
    })
}

/// `shoal rm`.
pub fn rm(args: RmArgs) -> Result<()> {
    let fd = open(&args.data, &args.socket)?;
    each(&fd, &args.containers, "rm", |id| {
        let held = cluster_attachments(&fd, id);
        fd.remove_with_volumes(id, args.force, args.volumes)?;
        // The container is gone; its addresses on cluster networks go back to the cluster.
        detach_cluster_networks(&args.socket, &held)
            .context("container removed, but its cluster network addresses were not given back")
    })
}

/// A container `logs` and `exec` work on: one the front door made, or the container of a
/// service task this node runs (made by its worker agent; its id is the task's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    id: String,
    /// Its name: the front door's, or SERVICE.SLOT.TASKID (the task id alone when no agent
    /// named it).
    name: String,
    task: bool,
}

/// Finds `key` as docker does: an exact name or id, else a unique id prefix; the front
/// door's containers first, then the task containers.
fn pick_target<'a>(cands: &'a [Target], key: &str) -> Result<&'a Target> {
    let key = key.strip_prefix('/').unwrap_or(key);
    if let Some(t) = cands.iter().find(|t| t.name == key || t.id == key) {
        return Ok(t);
    }
    let id_like = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric());
    let mut by_prefix = cands.iter().filter(|t| id_like && t.id.starts_with(key));
    match (by_prefix.next(), by_prefix.next()) {
        (Some(t), None) => Ok(t),
        (Some(_), Some(_)) => Err(FrontDoorError::Ambiguous(key.to_string()).into()),
        _ => Err(FrontDoorError::NoSuchContainer(key.to_string()).into()),
    }
}

/// The container `key` names on this node: a front-door container, or a task container of
/// the task runtime root (`ps`'s: named by the agent of this data dir when one answers on
/// `socket`).
fn resolve_target(fd: &FrontDoor, dir: &Path, socket: &SocketArg, key: &str) -> Result<Target> {
    let mut cands: Vec<Target> = fd
        .records()?
        .into_iter()
        .map(|r| Target {
            id: r.id,
            name: r.name,
            task: false,
        })
        .collect();
    let bare = key.strip_prefix('/').unwrap_or(key);
    if cands.iter().any(|t| t.name == bare || t.id == bare) {
        return pick_target(&cands, key).cloned();
    }
    let runtime_root = dir.join(super::agent::TASK_RUNTIME_DIR);
    let ids: Vec<String> = Container::list(&runtime_root)
        .with_context(|| format!("list the task containers of {}", runtime_root.display()))?
        .into_iter()
        .map(|s| s.id)
        .collect();
    if !ids.is_empty() {
        let names: std::collections::HashMap<String, String> = agent_tasks(socket, dir)
            .iter()
            .filter_map(|t| Some((t.meta.as_ref()?.id.clone(), task_container_name(t))))
            .collect();
        cands.extend(ids.into_iter().map(|id| Target {
            name: names.get(&id).cloned().unwrap_or_else(|| id.clone()),
            id,
            task: true,
        }));
    }
    pick_target(&cands, key).cloned()
}

impl Target {
    /// Its log files, oldest first (the live one last).
    fn log_files(&self, fd: &FrontDoor) -> Vec<PathBuf> {
        if self.task {
            shoal_runtime::logfile::files_oldest_first(
                &fd.container_dir(&self.id)
                    .join(shoal_worker::executor::runtime::LOG_FILE),
                shoal_worker::executor::runtime::LOG_MAX_FILES,
            )
        } else {
            fd.log_files(&self.id)
        }
    }

    /// Its runtime handle, `None` when it has no runtime state.
    fn container(&self, fd: &FrontDoor) -> Result<Option<Container>> {
        if !self.task {
            return Ok(fd.container(&self.id)?);
        }
        let root = fd.data_dir().join(super::agent::TASK_RUNTIME_DIR);
        match Container::load(&root, &self.id) {
            Ok(c) => Ok(Some(c)),
            Err(shoal_runtime::container::ContainerError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A log record kept for `--tail`.
struct Kept {
    time_ns: i64,
    stream: shoal_runtime::logfile::Stream,
    partial: bool,
    data: Vec<u8>,
}

/// Prints log records as `shoal logs` does: each to the stream it was written to, after its
/// time with `--timestamps`; the last `tail` lines only when given.
struct LogPrinter {
    timestamps: bool,
    tail: Option<usize>,
    kept: std::collections::VecDeque<Kept>,
    /// Whole lines among `kept`.
    kept_lines: usize,
    /// At the start of a line, per stream (stdout, stderr): where a time goes.
    line_start: [bool; 2],
    failed: bool,
}

impl LogPrinter {
    fn take(&mut self, r: shoal_runtime::logfile::Record<'_>) {
        let Some(n) = self.tail else {
            self.write(r);
            return;
        };
        self.kept.push_back(Kept {
            time_ns: r.time_ns,
            stream: r.stream,
            partial: r.partial,
            data: r.data.to_vec(),
        });
        self.kept_lines += usize::from(!r.partial);
        while self.kept_lines > n {
            if let Some(k) = self.kept.pop_front() {
                self.kept_lines -= usize::from(!k.partial);
            }
        }
    }

    /// Prints what `--tail` kept; from here on every record is printed as it comes.
    fn flush_tail(&mut self) {
        for k in std::mem::take(&mut self.kept) {
            self.write(shoal_runtime::logfile::Record {
                time_ns: k.time_ns,
                stream: k.stream,
                partial: k.partial,
                data: &k.data,
            });
        }
        self.tail = None;
    }

    fn write(&mut self, r: shoal_runtime::logfile::Record<'_>) {
        if self.failed {
            return;
        }
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        let i = usize::from(r.stream == shoal_runtime::logfile::Stream::Stderr);
        let mut res = Ok(());
        if self.timestamps && self.line_start[i] {
            let w: &mut dyn Write = if i == 0 { &mut out } else { &mut err };
            res = write!(
                w,
                "{} ",
                shoal_runtime::image::timefmt::format_unix_nanos(r.time_ns)
            );
        }
        self.line_start[i] = !r.partial;
        self.failed = res
            .and_then(|()| shoal_runtime::logfile::write_record(&r, &mut out, &mut err))
            .and_then(|()| out.flush())
            .is_err();
    }
}

/// `shoal logs`: a front-door container's output, or a service task container's on this node.
pub fn logs(args: LogsArgs) -> Result<()> {
    let tail = super::output::parse_tail(&args.tail)?;
    let (fd, dir) = open_dir(&args.data, &args.socket)?;
    let target = resolve_target(&fd, &dir, &args.socket, &args.container)
        .with_context(|| format!("logs {}", args.container))?;
    let files = target.log_files(&fd);
    let (live, rotated) = files.split_last().context("no log")?;
    let mut p = LogPrinter {
        timestamps: args.timestamps,
        tail: tail.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        kept: Default::default(),
        kept_lines: 0,
        line_start: [true; 2],
        failed: false,
    };
    for f in rotated {
        let _ = shoal_runtime::logfile::read_file(f, &mut |r| p.take(r));
    }
    let mut follower = LogFollower::new(live, false);
    let _ = follower.poll_records(&mut |r| p.take(r));
    p.flush_tail();
    // A closed stdout ends `logs` quietly, as with `cat`.
    if p.failed || !args.follow {
        return Ok(());
    }
    loop {
        let running = matches!(
            target.container(&fd)?.map(|c| c.status()),
            Some(Status::Running | Status::Paused | Status::Created | Status::Creating)
        );
        let _ = follower.poll_records(&mut |r| p.write(r));
        if p.failed || !running {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// `shoal exec`.
pub fn exec(args: ExecArgs) -> Result<()> {
    match exec_inner(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => exit_failed(e),
    }
}

fn exec_inner(args: ExecArgs) -> Result<i32> {
    let (fd, dir) = open_dir(&args.data, &args.socket)?;
    let mut it = args.container_and_command.into_iter();
    let name = it.next().context("give a container")?;
    let command: Vec<String> = it.collect();
    let target = resolve_target(&fd, &dir, &args.socket, &name)
        .with_context(|| format!("exec in {name}"))?;
    protect()?;
    let opts = ExecOptions {
        args: command,
        env: args.env,
        cwd: args.workdir,
        detach: args.detach,
        timeout: None,
    };
    let p = if target.task {
        match target.container(&fd)? {
            Some(c) if c.status() == Status::Running => c.exec(&opts).map_err(anyhow::Error::from),
            _ => Err(FrontDoorError::NotRunning(target.name.clone()).into()),
        }
    } else {
        fd.exec(&target.id, &opts).map_err(anyhow::Error::from)
    }
    .with_context(|| format!("exec in {name}"))?;
    Ok(p.wait().map_or(0, |s| s.shell_code()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_runtime::frontdoor::ContainerRecord;
    use shoal_runtime::network::{Attachment, Protocol, Published};

    #[test]
    fn statuses_read_like_docker() {
        assert_eq!(
            status_text(RunState::Running { started: 97 }, 100),
            "Up 3 seconds"
        );
        assert_eq!(
            status_text(
                RunState::Exited {
                    code: 0,
                    finished: 95
                },
                100
            ),
            "Exited (0) 5 seconds ago"
        );
        assert_eq!(
            status_text(
                RunState::Exited {
                    code: 137,
                    finished: 100
                },
                100
            ),
            "Exited (137) Less than a second ago"
        );
        assert_eq!(human_duration(90), "About a minute");
        assert_eq!(human_duration(3 * 3600), "3 hours");
        assert_eq!(
            command_text(&["sh".into(), "-c".into(), "exit 7".into()]),
            "\"sh -c exit 7\""
        );
        assert_eq!(
            command_text(&[
                "/bin/sh".into(),
                "-c".into(),
                "while true; do :; done".into()
            ]),
            "\"/bin/sh -c while tr…\""
        );
    }

    #[test]
    fn task_containers_resolve_by_name_id_and_prefix() {
        let t = |id: &str, name: &str, task: bool| Target {
            id: id.into(),
            name: name.into(),
            task,
        };
        let cands = [
            t(&"ab".repeat(32), "web", false),
            t(
                "k3x9q0000000000000000000a",
                "job.1.k3x9q0000000000000000000a",
                true,
            ),
            t(
                "k3y00000000000000000000bb",
                "k3y00000000000000000000bb",
                true,
            ),
        ];
        let pick = |k: &str| pick_target(&cands, k).map(|t| t.id.clone());
        assert_eq!(pick("web").unwrap(), cands[0].id);
        assert_eq!(pick("/web").unwrap(), cands[0].id);
        assert_eq!(pick("abab").unwrap(), cands[0].id);
        assert_eq!(
            pick("job.1.k3x9q0000000000000000000a").unwrap(),
            cands[1].id
        );
        assert_eq!(pick("k3x").unwrap(), cands[1].id);
        assert_eq!(pick("k3y00000000000000000000bb").unwrap(), cands[2].id);
        let err = |k: &str| format!("{:#}", pick_target(&cands, k).unwrap_err());
        assert_eq!(
            err("k3"),
            "container id prefix \"k3\" matches several containers"
        );
        assert_eq!(err("job.1"), "no such container: job.1");
        assert_eq!(err("job.1.k3x"), "no such container: job.1.k3x");
        assert_eq!(err(""), "no such container: ");
    }

    #[test]
    fn task_statuses_carry_docker_s_health_suffix() {
        let row = |state, health| PsRow {
            id: "t".repeat(25),
            name: String::new(),
            image: String::new(),
            command: vec![],
            created: 0,
            state,
            health,
            ports: String::new(),
            networks: String::new(),
            labels: String::new(),
        };
        let up = RunState::Running { started: 97 };
        assert_eq!(row(up, None).status(100), "Up 3 seconds");
        assert_eq!(
            row(up, Some("starting")).status(100),
            "Up 3 seconds (health: starting)"
        );
        assert_eq!(
            row(up, Some("healthy")).status(100),
            "Up 3 seconds (healthy)"
        );
        assert_eq!(
            row(up, Some("unhealthy")).status(100),
            "Up 3 seconds (unhealthy)"
        );
        let exited = RunState::Exited {
            code: 137,
            finished: 90,
        };
        assert_eq!(
            row(exited, Some("unhealthy")).status(100),
            "Exited (137) 10 seconds ago"
        );
        assert_eq!(row(up, Some("healthy")).json(100)["Health"], "healthy");
        assert_eq!(row(up, None).json(100)["Health"], "");
        assert_eq!(health_word(shoal_proto::v1::HealthState::None as i32), None);
        assert_eq!(
            health_word(shoal_proto::v1::HealthState::Starting as i32),
            Some("starting")
        );
    }

    #[test]
    fn ps_table_aligns() {
        let rec = |id: char, name: &str| ContainerRecord {
            id: id.to_string().repeat(64),
            name: name.into(),
            image: "busybox:latest".into(),
            image_id: String::new(),
            chain_ids: vec![],
            command: vec!["sleep".into(), "30".into()],
            created: 90,
            started: Some(95),
            auto_remove: false,
            stop_signal: None,
        };
        let summaries = [
            ContainerSummary {
                record: rec('a', "web"),
                state: RunState::Running { started: 95 },
                network: Some(Attachment {
                    ports: vec![Published {
                        host_ip: std::net::Ipv4Addr::UNSPECIFIED,
                        host_port: 8080,
                        container_port: 80,
                        protocol: Protocol::Tcp,
                    }],
                    ..Attachment::default()
                }),
            },
            ContainerSummary {
                record: rec('b', "db"),
                state: RunState::Exited {
                    code: 0,
                    finished: 99,
                },
                network: None,
            },
        ];
        let mut rows: Vec<PsRow> = summaries.iter().map(PsRow::from_summary).collect();
        // A service task's container with a passing check.
        rows.push(PsRow {
            id: "c".repeat(25),
            name: format!("web.2.{}", "c".repeat(25)),
            image: "busybox:latest".into(),
            command: vec!["httpd".into(), "-f".into()],
            created: 40,
            state: RunState::Running { started: 60 },
            health: Some("healthy"),
            ports: String::new(),
            networks: "backend".into(),
            labels: String::new(),
        });
        let t = ps_table(&rows, 100);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[3].starts_with("cccccccccccc   busybox:latest   \"httpd -f\"   About a minute ago   Up 40 seconds (healthy)"),
            "{}",
            lines[3]
        );
        assert!(lines[3].ends_with(&format!("web.2.{}", "c".repeat(25))));
        let col = lines[0].find("STATUS").unwrap();
        assert_eq!(lines[1].find("Up 5 seconds"), Some(col));
        assert_eq!(lines[2].find("Exited (0) 1 second ago"), Some(col));
        assert!(lines[1].starts_with("aaaaaaaaaaaa   busybox:latest   \"sleep 30\""));
        assert!(
            lines[1].ends_with("0.0.0.0:8080->80/tcp   web"),
            "{}",
            lines[1]
        );
        let names = lines[0].find("NAMES").unwrap();
        assert_eq!(lines[2].find("db"), Some(names));
    }
}
