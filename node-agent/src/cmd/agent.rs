//! `shoal agent`: the daemon, in the foreground, and the node's worker agent.
//!
//! The daemon (manager crate) owns the node's membership; this command runs the worker agent
//! beside it: started when the daemon publishes a membership, restarted when the membership
//! changes (join, promote, demote), stopped on leave (and its tasks' containers removed), and
//! stopped without touching its containers when the process exits, so a restarted agent
//! adopts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use shoal_manager::daemon::{
    Daemon, DaemonConfig, Membership, DEFAULT_DATA_DIR, DEFAULT_LISTEN_ADDR,
};
use shoal_proto::v1 as pb;
use shoal_worker::executor::{ExecError, StopSignal};
use shoal_worker::{
    Agent, AgentConfig, Executor, RuntimeExecutor, RuntimeExecutorConfig, SimExecutor,
};
use tokio::sync::watch;

/// Runtime state of the node's task containers, under the data dir: apart from the front
/// door's (`containers/.runtime`); `shoal ps` lists them with what the agent holds of their
/// tasks (the local socket's `LocalTasks`).
pub const TASK_RUNTIME_DIR: &str = "containers/.tasks";

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum ExecutorArg {
    /// Real containers
    Runtime,
    /// A hollow node: tasks are bookkeeping only (scale tests; never in production)
    Sim,
}

#[derive(Args)]
pub struct AgentArgs {
    /// Where the node keeps its state (raft, pki, images, containers)
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address the gRPC port (raft, CA, control, dispatcher) listens on
    #[arg(long, default_value = DEFAULT_LISTEN_ADDR)]
    listen_addr: SocketAddr,
    /// Address other nodes reach this one on (host[:port]); default: the listen address
    #[arg(long)]
    advertise_addr: Option<String>,
    /// The local control socket (root only)
    #[arg(long, env = "SHOAL_SOCKET", default_value = shoal_manager::daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Name this node reports (default: the machine's hostname)
    #[arg(long)]
    hostname: Option<String>,
    /// What runs the node's tasks
    #[arg(long, value_enum, default_value_t = ExecutorArg::Runtime, hide = true)]
    executor: ExecutorArg,
    /// The node bridge containers are attached to
    #[arg(long, env = "SHOAL_BRIDGE", default_value = shoal_runtime::network::DEFAULT_BRIDGE)]
    bridge: String,
    /// The node bridge's subnet, when the agent makes the bridge (it holds the first address)
    #[arg(long, env = "SHOAL_BRIDGE_SUBNET", default_value = shoal_runtime::network::DEFAULT_BRIDGE_SUBNET)]
    bridge_subnet: String,
    /// Resolvers the tasks' embedded DNS forwards other names to: IP[:PORT],… or "none"
    /// (default: the nameservers of /etc/resolv.conf)
    #[arg(long, env = "SHOAL_DNS_UPSTREAM")]
    dns_upstream: Option<String>,
    /// Registries (host[:port]) the node pulls from over plain HTTP (loopback ones always)
    #[arg(
        long = "insecure-registry",
        env = "SHOAL_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// The cluster registry's port (the same on every node): while this node is a manager it
    /// serves the OCI distribution API from its image store there (HTTPS with the cluster CA,
    /// on the listen address), and every node pulls from a manager's address on it as from the
    /// cluster registry; 0: none
    #[arg(long, env = "SHOAL_REGISTRY_PORT", default_value_t = 0)]
    registry_port: u16,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (e.g. 127.0.0.1:9323);
    /// default: none
    #[arg(long, env = "SHOAL_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// `--dns-upstream`, else the host's resolvers.
fn dns_upstream(given: Option<&str>) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    match given {
        None => Ok(shoal_worker::dns::upstream_from_resolv_conf(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        )),
        Some("none") | Some("") => Ok(Vec::new()),
        Some(list) => list
            .split(',')
            .map(|a| {
                a.parse::<std::net::SocketAddr>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .with_context(|| format!("invalid --dns-upstream {a:?}: want IP[:PORT]"))
            })
            .collect(),
    }
}

pub fn run(a: AgentArgs) -> anyhow::Result<()> {
    // First of all: a taken metrics address stops the agent before anything starts. (A
    // re-execution below closes it, and binds it again at once.)
    let metrics = a.metrics_addr.map(crate::metrics::bind).transpose()?;
    // Before any thread exists: containers are created only from an immutable copy of this
    // binary (CVE-2019-5736), so the daemon re-executes itself from one.
    if a.executor == ExecutorArg::Runtime {
        shoal_runtime::exe::reexec_protected().context("protect the runtime binary")?;
        shoal_runtime::exe::forget_reexec_mark();
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let data_dir = std::path::absolute(&a.data_dir)
            .with_context(|| format!("data dir {}", a.data_dir.display()))?;
        // A full disk would fail or wedge the stores as they open: wait for room first, and
        // take a start that hangs anyway (the disk filled up or stopped meanwhile) as stuck.
        shoal_manager::daemon::wait_for_room(&data_dir);
        let start_watch = shoal_manager::daemon::watch_start(data_dir.clone());
        let bridge = shoal_runtime::network::BridgeConfig::new(&a.bridge, &a.bridge_subnet)?;
        let executor: Arc<dyn Executor> = match a.executor {
            ExecutorArg::Runtime => {
                let exec = Arc::new(
                    RuntimeExecutor::new(RuntimeExecutorConfig {
                        data_dir: data_dir.clone(),
                        state_root: data_dir.join(TASK_RUNTIME_DIR),
                        allow_unprotected_exe: false,
                        bridge,
                        dns_upstream: dns_upstream(a.dns_upstream.as_deref())?,
                        insecure_registries: a.insecure_registries.clone(),
                    })
                    .context("opening the node's image store")?,
                );
                exec.spawn_image_gc();
                exec
            }
            ExecutorArg::Sim => Arc::new(SimExecutor::new()),
        };
        if a.executor == ExecutorArg::Runtime {
            // Networks of this node's containers whose removal a crash cut short; in the
            // background, so a restart is not held up by it.
            let containers = data_dir.join(shoal_runtime::frontdoor::CONTAINERS_DIR);
            tokio::task::spawn_blocking(move || {
                let swept = shoal_runtime::network::sweep(&containers);
                if swept > 0 {
                    tracing::info!(swept, "released the networks of removed containers");
                }
                // And the records of network namespaces that are gone (any agent's: nobody
                // can use them any more).
                let stale = shoal_runtime::network::sweep_stale_state();
                if stale > 0 {
                    tracing::info!(stale, "removed the network state of vanished namespaces");
                }
            });
        }
        shoal_worker::registry::set_cluster_registry_port(&data_dir, a.registry_port)
            .context("recording the cluster registry's port")?;
        let mut cfg = DaemonConfig::new(data_dir.clone(), a.listen_addr, a.socket);
        cfg.advertise_addr = a.advertise_addr;
        cfg.hostname = a.hostname;
        cfg.image_resolver = Some(shoal_manager::controlapi::images::Resolver(Arc::new(
            shoal_worker::registry::NodeResolver {
                data_dir: data_dir.clone(),
                insecure: a.insecure_registries.clone(),
            },
        )));
        let daemon = Daemon::start(cfg)
            .await
            .context("starting the shoal daemon")?;
        // A runtime wedged by its store (a failed disk) cannot notice it itself.
        shoal_manager::daemon::watch_stalls(data_dir.clone());
        start_watch.started();
        let (stop_tx, stop_rx) = watch::channel(false);
        let registry = (a.registry_port != 0).then(|| {
            tokio::spawn(serve_cluster_registry(
                daemon.membership(),
                daemon.control_slot(),
                data_dir.clone(),
                SocketAddr::new(a.listen_addr.ip(), a.registry_port),
                stop_rx.clone(),
            ))
        });
        let metrics = metrics.map(|listener| {
            let registry = crate::metrics::registry(
                daemon.control_slot(),
                daemon.local_tasks(),
                executor.clone(),
            );
            tokio::spawn(crate::metrics::serve(listener, registry, stop_rx.clone()))
        });
        let worker = tokio::spawn(keep_worker(
            daemon.membership(),
            stop_rx,
            WorkerSetup {
                data_dir,
                executor,
                hollow: a.executor == ExecutorArg::Sim,
                on_desired_role: daemon.desired_role_hook(),
                local_tasks: daemon.local_tasks(),
            },
        ));
        tracing::info!(socket = %daemon.socket().display(), "shoal agent ready");
        wait_for_signal().await?;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        if let Err(e) = worker.await {
            tracing::error!("worker agent: {e}");
        }
        if let Some(r) = registry {
            let _ = r.await;
        }
        if let Some(m) = metrics {
            let _ = m.await;
        }
        daemon.shutdown().await;
        Ok(())
    })
}

/// The node's registry on the cluster registry's port, while the node is in a cluster: on a
/// manager the cluster registry (pull, push, peer lookups); on any node the layers it holds,
/// for peers that need them. Restarted when the node's membership changes, stopped with the
/// agent.
async fn serve_cluster_registry(
    mut membership: watch::Receiver<Option<Membership>>,
    slot: shoal_manager::controlapi::ApiSlot,
    data_dir: PathBuf,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    use shoal_worker::registry_server::{run, RegistryServer};
    let mut running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)> = None;
    let claims = Arc::default();
    let fetching: shoal_worker::registry_server::Fetching = Arc::default();
    loop {
        let m = membership.borrow_and_update().clone();
        if let Some((tx, h)) = running.take() {
            let _ = tx.send(true);
            let _ = h.await;
        }
        if let Some(m) = m {
            match shoal_runtime::image::ImageStore::open(&data_dir) {
                Ok(store) => {
                    let cluster = m.tls.identity().cluster_id;
                    let (s1, s2, s3) = (slot.clone(), slot.clone(), slot.clone());
                    let server = RegistryServer {
                        tls: m.tls.clone(),
                        store: Arc::new(store),
                        data_dir: data_dir.clone(),
                        member: Arc::new(move |der: &[u8]| match s1.get() {
                            Some(api) => api
                                .authorizer()
                                .check_cert(der)
                                .map_err(|s| s.message().to_string()),
                            // A worker has no store to ask: a certificate of this cluster.
                            None => shoal_manager::ca::cert_info(der)
                                .map_err(|e| e.to_string())
                                .and_then(|i| {
                                    if i.identity.cluster_id == cluster {
                                        Ok(i.identity)
                                    } else {
                                        Err("a certificate of another cluster".into())
                                    }
                                }),
                        }),
                        is_manager: Arc::new(move || s2.get().is_some()),
                        holders: Arc::new(move |digest: &str, asker: &str| {
                            holders(&s3.get()?, digest, asker, addr.port())
                        }),
                        claims: Arc::clone(&claims),
                        fetching: Arc::clone(&fetching),
                    };
                    let (tx, rx) = watch::channel(false);
                    running = Some((tx, tokio::spawn(run(server, addr, rx))));
                }
                Err(e) => tracing::error!("cluster registry: the image store: {e}"),
            }
        }
        tokio::select! {
            r = membership.changed() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    if let Some((tx, h)) = running.take() {
        let _ = tx.send(true);
        let _ = h.await;
    }
}

/// The peer registries (`host:port`) of the Ready nodes, other than `asker`, whose tasks of
/// the image pinned to `digest` are past PREPARING and not yet stopped: they hold it.
fn holders(
    api: &shoal_manager::controlapi::ControlApi,
    digest: &str,
    asker: &str,
    port: u16,
) -> Option<Vec<String>> {
    let store = api.store();
    let suffix = format!("@{digest}");
    let holding: std::collections::HashSet<String> = store
        .list_tasks()
        .ok()?
        .into_iter()
        .filter(|t| {
            let state = t.status.as_ref().map_or(0, |s| s.state);
            t.node_id != asker
                && (pb::TaskState::Ready as i32..=pb::TaskState::Running as i32).contains(&state)
                && t.spec
                    .as_ref()
                    .and_then(|s| s.container.as_ref())
                    .is_some_and(|c| c.image.ends_with(&suffix))
        })
        .map(|t| t.node_id)
        .collect();
    let mut out: Vec<String> = store
        .list_nodes()
        .ok()?
        .into_iter()
        .filter(|n| {
            n.meta.as_ref().is_some_and(|m| holding.contains(&m.id))
                && n.status
                    .as_ref()
                    .is_some_and(|s| s.state == pb::NodeState::Ready as i32 && !s.addr.is_empty())
        })
        .filter_map(|n| {
            let a = n.status?.addr;
            let host = a
                .parse::<SocketAddr>()
                .map(|s| s.ip().to_string())
                .unwrap_or(a);
            Some(match host.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                _ => format!("{host}:{port}"),
            })
        })
        .collect();
    out.sort();
    out.dedup();
    Some(out)
}

/// What every incarnation of the node's worker agent shares.
struct WorkerSetup {
    data_dir: PathBuf,
    executor: Arc<dyn Executor>,
    hollow: bool,
    /// The daemon's: a promotion reaches the node through its dispatcher session.
    on_desired_role: shoal_worker::DesiredRoleHook,
    /// The daemon's: where the local socket reads the running agent's tasks.
    local_tasks: shoal_manager::daemon::LocalTasksSlot,
}

impl WorkerSetup {
    fn description(&self, m: &Membership) -> pb::NodeDescription {
        pb::NodeDescription {
            hostname: m.hostname.clone(),
            resources: Some(shoal_worker::host_resources()),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            engine_version: env!("CARGO_PKG_VERSION").into(),
            hollow: self.hollow,
        }
    }

    async fn start(&self, m: &Membership) -> Option<Agent> {
        let cfg = AgentConfig {
            tls: m.tls.clone(),
            managers: m.managers.clone(),
            // A hollow node has no containers to adopt after a restart.
            data_dir: (!self.hollow).then(|| self.data_dir.clone()),
            description: self.description(m),
            executor: self.executor.clone(),
            on_desired_role: Some(self.on_desired_role.clone()),
        };
        match Agent::start(cfg).await {
            Ok(a) => {
                tracing::info!(node_id = %m.node_id, role = %m.role, managers = ?m.managers, "worker agent started");
                Some(a)
            }
            Err(e) => {
                tracing::error!("starting the worker agent: {e}");
                None
            }
        }
    }
}

/// What, of a membership, the worker agent is started with (node id, role, managers): a
/// change restarts it.
type WorkerIdentity = (String, String, Vec<String>);

fn identity(m: &Membership) -> WorkerIdentity {
    (m.node_id.clone(), m.role.clone(), m.managers.clone())
}

/// Runs the worker agent as the membership says until `stop` turns true.
async fn keep_worker(
    mut membership: watch::Receiver<Option<Membership>>,
    mut stop: watch::Receiver<bool>,
    setup: WorkerSetup,
) {
    let mut running: Option<(WorkerIdentity, Agent)> = None;
    loop {
        let m = membership.borrow_and_update().clone();
        let wanted = m.as_ref().map(identity);
        if running.as_ref().map(|(k, _)| k) != wanted.as_ref() {
            let was_member = running.is_some();
            if let Some((_, agent)) = running.take() {
                setup.local_tasks.set(None);
                agent.shutdown().await;
            }
            match m {
                Some(m) => {
                    running = setup.start(&m).await.map(|a| (identity(&m), a));
                    if let Some((_, agent)) = &running {
                        setup.local_tasks.set(Some(agent.tasks_reader()));
                    }
                }
                None if was_member => {
                    tracing::info!("left the cluster: removing this node's tasks");
                    remove_all_tasks(&setup.data_dir, setup.executor.as_ref()).await;
                }
                None => {}
            }
        }
        tokio::select! {
            changed = membership.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    // The process exits: containers keep running for the next agent to adopt.
    if let Some((_, agent)) = running.take() {
        setup.local_tasks.set(None);
        agent.shutdown().await;
    }
}

/// After a leave: kill and remove every task container the node's task database holds, then
/// forget the database.
async fn remove_all_tasks(data_dir: &Path, executor: &dyn Executor) {
    let deadline = tokio::time::Instant::now() + shoal_worker::agent::DB_LOCK_WAIT;
    let opened = loop {
        match shoal_worker::db::TaskDb::open(data_dir) {
            // The stopped agent's last tasks may hold it for a moment.
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => break other,
        }
    };
    let ids: Vec<String> = match opened {
        Ok(db) => match db.list() {
            Ok(tasks) => tasks
                .into_iter()
                .filter_map(|t| t.meta.map(|m| m.id))
                .collect(),
            Err(e) => {
                tracing::error!("reading the task database: {e}");
                return;
            }
        },
        Err(e) => {
            tracing::error!("opening the task database: {e}");
            return;
        }
    };
    for id in ids {
        let removed: Result<(), ExecError> = async {
            executor.signal(&id, StopSignal::Kill).await?;
            executor.remove(&id).await
        }
        .await;
        if let Err(e) = removed {
            tracing::error!(task = %id, "removing the task's container: {e}");
        }
    }
    // And the ones the database never recorded (a create the last agent did not see end).
    shoal_worker::agent::remove_strays(executor, &Default::default()).await;
    let dir = data_dir.join(shoal_worker::db::WORKER_DIR);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::error!("removing {}: {e}", dir.display());
        }
    }
}

/// Logs to stderr; under systemd (journald adds its own timestamps) without timestamps.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
