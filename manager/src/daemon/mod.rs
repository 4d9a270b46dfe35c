//! The `shoal agent` daemon: one node's membership (none, worker or manager), the local
//! root-only Unix socket (the `Daemon` and `Control` services), and the manager it runs.
//!
//! A node starts inactive. `Init` makes it the first manager of a new cluster; `Join` makes it
//! a worker or a manager of an existing one; `Leave` forgets the cluster. What it is survives
//! restarts in `<data-dir>/node.json`, `<data-dir>/pki` and `<data-dir>/raft`.

mod backend;
mod client;
mod manager;
mod recover;
mod state;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_server::{Daemon as DaemonRpc, DaemonServer};
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub use backend::{ManagerCaBackend, StoreRegistry};
pub use client::{connect_local, ClientError};
pub use manager::{Manager, RAFT_DIR};
pub use recover::{BACKUP_CATCH_UP_TIMEOUT, BACKUP_CHUNK_BYTES};
pub use state::{LocalState, STATE_FILE};

use crate::ca::{self, JoinTokens, Role, RootCa, PKI_DIR};
use crate::controlapi::{new_id, ApiSlot, ControlService};
use crate::store::{Mutation, Object};
use crate::tls::NodeTls;

mod stall;
pub use stall::{wait_for_room, watch as watch_stalls, watch_start, StartWatch, START_DEADLINE};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";
/// Default local control socket.
pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";
/// Default gRPC listen address (Raft, CA, Control, dispatcher).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:4242";
/// How long a joining manager waits for the cluster to make it a voter.
pub const JOIN_MANAGER_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a manager checks with the leader that it is still a manager (a demoted
/// manager is no longer sent Raft traffic, so it learns of its demotion by asking).
pub const ROLE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long that check may take.
pub const ROLE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a manager's Raft is checked for a fatal stop (see `watch_raft`).
pub const RAFT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between a manager stopping on a fatal Raft error and the agent starting afresh.
pub const RAFT_RESTART_DELAY: Duration = Duration::from_secs(2);
/// How long a manager whose Raft stopped may take to stop serving before the agent goes on
/// without a clean stop.
pub const RAFT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A Raft core that answers nothing for this long is taken as stopped (see `watch_raft`).
pub const RAFT_STUCK_AFTER: Duration = Duration::from_secs(10);
/// Free space the data dir needs before such a manager's agent starts afresh.
pub const RAFT_RESTART_FREE_BYTES: u64 = 16 << 20;
/// Exit status when [`reexec`] cannot replace the process (a supervisor restarts it).
pub const EXIT_REEXEC_FAILED: i32 = 75;

/// Replaces this process with a fresh run of its own command line: same pid, so a
/// supervisor, the test bed and the worker agent's containers (separate processes, adopted
/// again at start) are unaffected; every descriptor is close-on-exec, so locks go with it.
fn reexec() -> ! {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    // `ps` keeps showing the command as it was started, not `/proc/self/exe agent …`.
    let arg0 = args.next().unwrap_or_else(|| "shoal".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec();
    tracing::error!("starting the agent afresh: {err}; exiting");
    std::process::exit(EXIT_REEXEC_FAILED)
}
/// Pause before a failed self-promotion (worker to manager) is tried again.
pub const PROMOTE_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error(transparent)]
    RaftSetup(#[from] crate::raft::RaftSetupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Refused(String),
}

impl From<DaemonError> for Status {
    fn from(e: DaemonError) -> Status {
        match e {
            DaemonError::Refused(m) => Status::failed_precondition(m),
            other => Status::internal(other.to_string()),
        }
    }
}

/// How a daemon is started.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    /// Where the gRPC port listens once this node is a manager.
    pub listen_addr: SocketAddr,
    /// host:port other nodes reach this one on (default: the listen address, if specific).
    pub advertise_addr: Option<String>,
    pub socket: PathBuf,
    /// The name this node reports (default: the machine's hostname).
    pub hostname: Option<String>,
    /// Raft timers for a new cluster (`None` = DESIGN.md's defaults); tests shrink them.
    pub raft_timers: Option<pb::RaftConfig>,
    /// How the control API pins service images to registry digests (the agent's registry
    /// client); `None` keeps tags as given.
    pub image_resolver: Option<crate::controlapi::images::Resolver>,
}

impl DaemonConfig {
    /// The defaults of DESIGN.md for a data dir, listen address and socket.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        listen_addr: SocketAddr,
        socket: impl Into<PathBuf>,
    ) -> Self {
        DaemonConfig {
            data_dir: data_dir.into(),
            listen_addr,
            advertise_addr: None,
            socket: socket.into(),
            hostname: None,
            raft_timers: None,
            image_resolver: None,
        }
    }

    fn timers(&self) -> pb::RaftConfig {
        self.raft_timers
            .unwrap_or_else(crate::raft::default_raft_timers)
    }

    fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into())
        })
    }

    /// The address to advertise: the request's, else the configured one, else a specific
    /// listen address.
    fn advertise(&self, asked: &str) -> Result<String, DaemonError> {
        if !asked.is_empty() {
            return normalize_addr(asked, self.listen_addr.port());
        }
        if let Some(a) = &self.advertise_addr {
            return normalize_addr(a, self.listen_addr.port());
        }
        if self.listen_addr.ip().is_unspecified() {
            return Err(DaemonError::Refused(
                "could not choose an address to advertise: pass --advertise-addr".into(),
            ));
        }
        Ok(self.listen_addr.to_string())
    }
}

/// `host` or `host:port` → `host:port` (the listen port by default).
fn normalize_addr(a: &str, default_port: u16) -> Result<String, DaemonError> {
    let a = a.trim();
    if a.parse::<SocketAddr>().is_ok() {
        return Ok(a.to_string());
    }
    if let Ok(ip) = a.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port).to_string());
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(a.to_string()),
        None if !a.is_empty() && !a.contains('/') => Ok(format!("{a}:{default_port}")),
        _ => Err(DaemonError::Refused(format!(
            "invalid address {a:?}: expected host[:port]"
        ))),
    }
}

enum Role_ {
    Inactive,
    Worker { renew: JoinHandle<()> },
    Manager(Manager),
}

struct Shared {
    cfg: DaemonConfig,
    /// What the node's worker agent needs to run, published on every change.
    membership: tokio::sync::watch::Sender<Option<Membership>>,
    /// What this node is now; held across a whole init/join/leave.
    role: Mutex<(Role_, Option<LocalState>)>,
    slot: ApiSlot,
    /// The role the cluster wants this node to hold, as the dispatcher last said.
    desired_role: tokio::sync::watch::Sender<Option<pb::NodeRole>>,
    /// The managers the dispatcher last named: a promotion tries them after node.json's.
    learned_managers: std::sync::Mutex<Vec<String>>,
    /// The node's worker agent's tasks, for `LocalTasks`.
    local_tasks: LocalTasksSlot,
}

/// This node's membership, as its worker agent needs it: who it is, its TLS material, and
/// the managers to open the dispatcher session with.
#[derive(Clone, Debug)]
pub struct Membership {
    pub node_id: String,
    /// "manager" or "worker".
    pub role: String,
    pub hostname: String,
    pub tls: NodeTls,
    pub managers: Vec<String>,
}

impl Shared {
    /// Tells watchers what the node is now (`None`: in no cluster).
    fn publish(&self, st: Option<&LocalState>) {
        let m = st.and_then(|st| {
            let tls = match NodeTls::load(&self.cfg.data_dir.join(PKI_DIR)) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("loading the node certificate: {e}");
                    return None;
                }
            };
            let managers = if st.role == "manager" {
                // This manager's own dispatcher redirects to the leader's.
                vec![st.advertise_addr.clone()]
            } else {
                st.managers.clone()
            };
            Some(Membership {
                node_id: st.node_id.clone(),
                role: st.role.clone(),
                hostname: self.cfg.hostname(),
                tls,
                managers,
            })
        });
        self.membership.send_replace(m);
    }
}

/// Reads the tasks the node's worker agent holds now, each with its latest status.
pub type LocalTasks = Arc<dyn Fn() -> Vec<pb::Task> + Send + Sync>;

/// Where the local socket's `LocalTasks` call finds the node's worker agent: set by whoever
/// runs the agent, empty while none runs.
#[derive(Clone, Default)]
pub struct LocalTasksSlot(Arc<std::sync::RwLock<Option<LocalTasks>>>);

impl LocalTasksSlot {
    /// Installs (or with `None`, removes) the agent's reader.
    pub fn set(&self, reader: Option<LocalTasks>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = reader;
    }

    /// The agent's tasks, with the registry credentials of their specs removed (as from every
    /// control API answer); none while no agent runs.
    pub fn tasks(&self) -> Vec<pb::Task> {
        let reader = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut tasks = reader.map(|r| r()).unwrap_or_default();
        for t in &mut tasks {
            if let Some(c) = t.spec.as_mut().and_then(|s| s.container.as_mut()) {
                c.registry_auth = None;
            }
        }
        tasks
    }
}

/// Receives the role the dispatcher says this node should hold, and the managers it named.
pub type DesiredRoleHook = Arc<dyn Fn(pb::NodeRole, &[String]) + Send + Sync>;

/// A running daemon.
pub struct Daemon {
    shared: Arc<Shared>,
    socket_server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Daemon {
    /// Starts the daemon: resumes the node's membership from its data dir, and serves the
    /// local socket (mode 0600).
    pub async fn start(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
        create_private_dir(&cfg.data_dir)?;
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            role: Mutex::new((Role_::Inactive, None)),
            slot: ApiSlot::default(),
            membership: tokio::sync::watch::channel(None).0,
            desired_role: tokio::sync::watch::channel(None).0,
            learned_managers: std::sync::Mutex::new(Vec::new()),
            local_tasks: LocalTasksSlot::default(),
        });
        if let Some(st) = LocalState::load(&cfg.data_dir)? {
            let role = resume(&shared, &st).await?;
            shared.publish(Some(&st));
            *shared.role.lock().await = (role, Some(st));
        }
        let socket_server = serve_socket(shared.clone()).await?;
        tokio::spawn(watch_role(Arc::downgrade(&shared)));
        tokio::spawn(watch_raft(Arc::downgrade(&shared)));
        tokio::spawn(watch_promotion(
            Arc::downgrade(&shared),
            shared.desired_role.subscribe(),
        ));
        Ok(Daemon {
            shared,
            socket_server: Some(socket_server),
        })
    }

    /// The control API of this node while it is a manager.
    pub fn control(&self) -> Option<crate::controlapi::ControlApi> {
        self.shared.slot.get()
    }

    /// Where this node's control API is while it is a manager, as it changes.
    pub fn control_slot(&self) -> crate::controlapi::ApiSlot {
        self.shared.slot.clone()
    }

    /// This node's membership now and as it changes, for the worker agent.
    pub fn membership(&self) -> tokio::sync::watch::Receiver<Option<Membership>> {
        self.shared.membership.subscribe()
    }

    /// Where the worker agent reports the role the dispatcher says this node should hold,
    /// and the managers it knows: a worker told it should be a manager promotes itself.
    pub fn desired_role_hook(&self) -> DesiredRoleHook {
        let shared = Arc::downgrade(&self.shared);
        Arc::new(move |role, managers| {
            if let Some(shared) = shared.upgrade() {
                let mut learned = shared
                    .learned_managers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if learned.as_slice() != managers {
                    *learned = managers.to_vec();
                }
                drop(learned);
                shared.desired_role.send_if_modified(|cur| {
                    let changed = *cur != Some(role);
                    *cur = Some(role);
                    changed
                });
            }
        })
    }

    /// Where the node's worker agent's tasks are read for the local socket (`shoal ps`).
    pub fn local_tasks(&self) -> LocalTasksSlot {
        self.shared.local_tasks.clone()
    }

    /// The local socket path.
    pub fn socket(&self) -> &Path {
        &self.shared.cfg.socket
    }

    /// Stops everything; the node stays a member (a restart resumes it).
    pub async fn shutdown(mut self) {
        if let Some((stop, task)) = self.socket_server.take() {
            let _ = stop.send(());
            let abort = task.abort_handle();
            if tokio::time::timeout(manager::SERVER_STOP_TIMEOUT, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let _ = std::fs::remove_file(&self.shared.cfg.socket);
        self.shared.slot.set(None);
        let mut role = self.shared.role.lock().await;
        stop_role(std::mem::replace(&mut role.0, Role_::Inactive)).await;
    }
}

/// Handles a manager whose Raft stopped on a fatal error — a storage error such as a full
/// disk. openraft never resumes by itself, and a manager without Raft would go on serving
/// its dispatcher and Raft port from a state that no longer moves (its workers would stay
/// attached to it, and be marked down). So the manager stops serving at once: workers and
/// peers move to the other managers, while the local socket keeps answering with the
/// storage error. Once the data dir has [`RAFT_RESTART_FREE_BYTES`] free again (and at
/// least [`RAFT_RESTART_DELAY`] later) the process starts afresh ([`reexec`]): the stopped
/// Raft may hold the database in this process, and a new process image opens it cleanly.
async fn watch_raft(shared: std::sync::Weak<Shared>) {
    let mut stopped_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(RAFT_CHECK_INTERVAL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let data_dir = &shared.cfg.data_dir;
        if let Some(at) = stopped_at {
            if at.elapsed() >= RAFT_RESTART_DELAY && has_room(data_dir).await {
                tracing::error!(
                    "{} has room again: starting the agent afresh",
                    data_dir.display()
                );
                reexec();
            }
            continue;
        }
        let Some(api) = shared.slot.get() else {
            continue;
        };
        let state = api.raft().metrics().borrow().running_state.clone();
        let fatal = match state {
            Err(e) => e.to_string(),
            // Not stopped, but wedged: a core that answers nothing (seen after an apply failed
            // on a full disk) keeps its last metrics and would keep this manager looking alive.
            // Or a storage that refuses writes (core_answers logs which).
            Ok(()) if !crate::raft::elect::core_answers(api.raft(), RAFT_STUCK_AFTER).await => {
                format!(
                    "the raft core or its storage has not answered within {} s (is the disk full or stuck?)",
                    RAFT_STUCK_AFTER.as_secs()
                )
            }
            Ok(()) => continue,
        };
        tracing::error!("raft stopped: {fatal}; this manager stops serving");
        api.set_stopped(fatal.clone());
        // Bounded: a Raft that died in the middle of an apply has been seen to hang its own
        // shutdown (chaos finding 8). The re-exec that follows replaces the whole process
        // image, so a clean stop is a nicety, not a need.
        match tokio::time::timeout(RAFT_STOP_TIMEOUT, shared.role.lock()).await {
            Ok(mut role) => {
                // Re-check under the lock: a leave, demotion or restart may have happened.
                let same = shared
                    .slot
                    .get()
                    .is_some_and(|a| a.raft_id() == api.raft_id());
                let Role_::Manager(m) = &mut role.0 else {
                    continue;
                };
                if !same {
                    continue;
                }
                if tokio::time::timeout(RAFT_STOP_TIMEOUT, m.stop())
                    .await
                    .is_err()
                {
                    tracing::error!("stopping the manager did not finish in time; going on");
                }
            }
            Err(_) => tracing::error!("the node's role is locked; not waiting for a clean stop"),
        }
        stopped_at = Some(tokio::time::Instant::now());
        tracing::error!(
            "this manager stopped serving; the agent starts afresh once {} has {} MiB free",
            data_dir.display(),
            RAFT_RESTART_FREE_BYTES >> 20
        );
    }
}

/// Whether `dir` takes [`RAFT_RESTART_FREE_BYTES`] more: writes (then removes) a file that
/// size, so it answers for this file system as it is, quotas and reservations included.
async fn has_room(dir: &Path) -> bool {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || has_room_now(&dir))
        .await
        .unwrap_or(false)
}

/// [`has_room`], blocking.
fn has_room_now(dir: &Path) -> bool {
    use std::io::Write;
    let probe = dir.join(".room-check");
    let chunk = vec![0u8; 1 << 20];
    let fits = std::fs::File::create(&probe).and_then(|mut f| {
        for _ in 0..(RAFT_RESTART_FREE_BYTES >> 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    fits.is_ok()
}

/// Turns this manager into a worker once the cluster has demoted it, or once a manager of a
/// later raft group epoch refused it (its group was started over without it:
/// `--force-new-cluster` or a restore elsewhere); ends with the daemon.
async fn watch_role(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(ROLE_CHECK_INTERVAL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(api) = shared.slot.get() else {
            continue;
        };
        if let Some(s) = api.epoch().and_then(|e| e.superseded()) {
            tracing::error!(
                epoch = %s.by,
                manager = %s.addr,
                "the cluster's raft group was started over without this manager: it now runs as a worker"
            );
            step_down(&shared, api, s.addr).await;
            continue;
        }
        if let Some((false, leader)) = still_manager(&api).await {
            tracing::warn!("this node was demoted: it now runs as a worker");
            step_down(&shared, api, leader).await;
        }
    }
}

/// Makes this manager (whose control API is `api`) a worker that knows the manager at
/// `manager`: its manager stops, its Raft database and CA key go, node.json says worker.
async fn step_down(shared: &Shared, api: crate::controlapi::ControlApi, manager: String) {
    let mut role = shared.role.lock().await;
    // Re-check under the lock: a leave or restart may have happened meanwhile.
    let same = shared
        .slot
        .get()
        .is_some_and(|a| a.raft_id() == api.raft_id());
    if !same {
        return;
    }
    // No handle of ours on the manager's store while it stops and its database goes.
    drop(api);
    shared.slot.set(None);
    let (old, st) = std::mem::replace(&mut *role, (Role_::Inactive, None));
    stop_role(old).await;
    let data_dir = &shared.cfg.data_dir;
    let _ = std::fs::remove_dir_all(data_dir.join(RAFT_DIR));
    // Workers never hold the CA key; a later promotion hands it out again.
    let _ = std::fs::remove_file(data_dir.join(PKI_DIR).join(ca::CA_KEY_FILE));
    let Some(mut st) = st else {
        return;
    };
    st.role = "worker".into();
    st.raft_id = 0;
    st.managers = vec![manager];
    if let Err(e) = st.save(data_dir) {
        tracing::error!("recording the demotion: {e}");
    }
    match NodeTls::load(&data_dir.join(PKI_DIR)) {
        Ok(tls) => {
            let renew = spawn_worker_renewal(tls, data_dir.join(PKI_DIR), st.managers.clone());
            *role = (Role_::Worker { renew }, Some(st));
            // What the manager's agent heard is stale: a later promotion must show as a
            // change.
            shared.desired_role.send_replace(None);
            shared.publish(role.1.as_ref());
        }
        Err(e) => tracing::error!("loading the node certificate: {e}"),
    }
}

/// Asks the cluster whether this node is still a manager: `Some((answer, manager address))`,
/// or `None` when no manager gave a clear answer. The leader is asked first; a demoted node
/// may no longer know who leads, so the other members it knows are asked too (they forward).
async fn still_manager(api: &crate::controlapi::ControlApi) -> Option<(bool, String)> {
    let m = api.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    // A leader that removed itself may lead on for a moment: only a voter's word counts.
    let voter = membership.voter_ids().any(|v| v == api.raft_id());
    if voter && m.current_leader == Some(api.raft_id()) {
        return Some((true, String::new()));
    }
    let mut addrs: Vec<String> = Vec::new();
    if let Some(l) = m.current_leader.and_then(|l| membership.get_node(&l)) {
        addrs.push(l.addr.clone());
    }
    for (id, n) in membership.nodes() {
        if *id != api.raft_id() && !addrs.contains(&n.addr) {
            addrs.push(n.addr.clone());
        }
    }
    for addr in addrs {
        let Ok(ch) = api.peer_channel(&addr) else {
            continue;
        };
        let mut req = Request::new(pb::GetNodeRequest {
            node: api.node_id().to_string(),
        });
        req.set_timeout(ROLE_CHECK_TIMEOUT);
        match ControlClient::new(ch)
            .max_decoding_message_size(crate::controlapi::MAX_CONTROL_MESSAGE_BYTES)
            .get_node(req)
            .await
        {
            Ok(r) => {
                let n = r.into_inner().node?;
                let manager = pb::NodeRole::Manager as i32;
                let is = n.role == manager || n.spec.is_some_and(|s| s.desired_role == manager);
                return Some((is, addr));
            }
            // Refused: demoted or removed.
            Err(s) if s.code() == tonic::Code::PermissionDenied => return Some((false, addr)),
            Err(_) => continue,
        }
    }
    None
}

async fn stop_role(role: Role_) {
    match role {
        Role_::Inactive => {}
        Role_::Worker { renew } => renew.abort(),
        Role_::Manager(m) => m.shutdown().await,
    }
}

fn create_private_dir(dir: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(dir).map_err(|source| DaemonError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        DaemonError::Io {
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// Restarts what the node was before the daemon stopped.
async fn resume(shared: &Shared, st: &LocalState) -> Result<Role_, DaemonError> {
    let cfg = &shared.cfg;
    let tls = NodeTls::load(&cfg.data_dir.join(PKI_DIR))?;
    if st.role == "manager" {
        let m = Manager::start(
            &cfg.data_dir,
            cfg.listen_addr,
            tls,
            st.raft_id,
            &cfg.timers(),
            vec![st.advertise_addr.clone()],
            cfg.image_resolver.clone(),
        )
        .await?;
        shared.slot.set(Some(m.api().clone()));
        Ok(Role_::Manager(m))
    } else {
        Ok(Role_::Worker {
            renew: spawn_worker_renewal(tls, cfg.data_dir.join(PKI_DIR), st.managers.clone()),
        })
    }
}

fn spawn_worker_renewal(tls: NodeTls, pki: PathBuf, managers: Vec<String>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let managers: Arc<dyn Fn() -> Vec<String> + Send + Sync> =
            Arc::new(move || managers.clone());
        if let Err(e) = ca::renew_loop(tls, pki, managers).await {
            tracing::error!("certificate renewal stopped: {e}");
        }
    })
}

async fn serve_socket(
    shared: Arc<Shared>,
) -> Result<(oneshot::Sender<()>, JoinHandle<()>), DaemonError> {
    let path = shared.cfg.socket.clone();
    let io = |source| DaemonError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // A socket left by a daemon that died; a live one would still be accepting.
    if tokio::net::UnixStream::connect(&path).await.is_ok() {
        return Err(DaemonError::Refused(format!(
            "another shoal daemon is already serving {}",
            path.display()
        )));
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = bind_private(&path).map_err(io)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    // Root only: the socket's mode, and each call's peer credentials.
    let control = InterceptedService::new(
        ControlService::local(shared.slot.clone())
            .with_membership(shared.membership.subscribe())
            .into_server(),
        require_root_peer,
    );
    let daemon = InterceptedService::new(
        DaemonServer::new(DaemonService { shared })
            .max_decoding_message_size(crate::controlapi::MAX_CONTROL_MESSAGE_BYTES)
            .max_encoding_message_size(crate::controlapi::MAX_CONTROL_MESSAGE_BYTES),
        require_root_peer,
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // The same per-connection limits as the TLS port (streams, headers, keepalive).
        let res = crate::tls::grpc_server()
            .add_service(daemon)
            .add_service(control)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = res {
            tracing::error!("local socket server stopped: {e}");
        }
    });
    Ok((stop_tx, task))
}

/// Binds the local socket at `path` with mode 0600 without a moment at a wider mode (or the
/// process umask's): it is bound in a fresh 0700 directory beside `path`, narrowed, then moved
/// into place (a socket stays bound to its inode when renamed).
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let inner = tmp.join("s");
    let bound = (|| {
        let l = tokio::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    bound
}

/// Refuses a call on the local socket from a peer that is not root (`SO_PEERCRED`, which the
/// kernel records at connect): the socket's mode keeps others out already, this holds whatever
/// its mode or its directory's.
pub fn require_root_peer(req: Request<()>) -> Result<Request<()>, Status> {
    match req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
    {
        Some(c) if c.uid() == 0 => Ok(req),
        Some(c) => Err(Status::permission_denied(format!(
            "the local socket serves root only, not uid {}",
            c.uid()
        ))),
        None => Err(Status::permission_denied(
            "the local socket could not tell who is calling",
        )),
    }
}

/// The `Daemon` service of the local socket.
struct DaemonService {
    shared: Arc<Shared>,
}

fn role_name(r: &Role_) -> pb::LocalNodeState {
    match r {
        Role_::Inactive => pb::LocalNodeState::Inactive,
        Role_::Worker { .. } => pb::LocalNodeState::Worker,
        Role_::Manager(_) => pb::LocalNodeState::Manager,
    }
}

const NOT_INACTIVE: &str =
    "this node is already part of a cluster: leave it first (`shoal cluster leave`)";
const NOT_INACTIVE_RESTORE: &str =
    "this node is already part of a cluster: a restore makes a cluster on a node in none (`shoal cluster leave --force` first)";

impl DaemonService {
    /// `cluster init --force-new-cluster`: this manager's own state becomes a one-manager
    /// cluster (see `recover::force_new_cluster`); the manager runs again in any case.
    async fn force_new_cluster(
        &self,
        role: &mut (Role_, Option<LocalState>),
        asked_addr: &str,
    ) -> Result<pb::InitResponse, Status> {
        let (epoch, st) = match (&role.0, &role.1) {
            (Role_::Manager(m), Some(st)) => (
                m.api().epoch().map(|e| e.get()).unwrap_or_default(),
                st.clone(),
            ),
            (Role_::Worker { .. }, _) => {
                return Err(Status::failed_precondition(
                    "this node is a worker: --force-new-cluster rebuilds a cluster from a manager's own state; run it on a manager",
                ))
            }
            _ => {
                return Err(Status::failed_precondition(
                    "this node is not part of a cluster: --force-new-cluster rebuilds a cluster from a manager's own state (to start from a backup: `shoal cluster restore`)",
                ))
            }
        };
        let cfg = &self.shared.cfg;
        let addr = if asked_addr.is_empty() {
            st.advertise_addr.clone()
        } else {
            cfg.advertise(asked_addr)?
        };
        self.shared.slot.set(None);
        stop_role(std::mem::replace(&mut role.0, Role_::Inactive)).await;
        let forced = recover::force_new_cluster(cfg, &st, &addr, epoch).await;
        let mut new_st = st.clone();
        if forced.is_ok() {
            new_st.advertise_addr = addr.clone();
            new_st.managers = vec![addr.clone()];
            if let Err(e) = new_st.save(&cfg.data_dir) {
                tracing::error!("recording the new address: {e}");
            }
        }
        // Started over or not (a refusal changed nothing), run the manager on what is there.
        let started = match resume(&self.shared, &new_st).await {
            Ok(r) => r,
            Err(e) => {
                role.1 = Some(new_st);
                return Err(Status::internal(format!("starting the manager again: {e}")));
            }
        };
        role.0 = started;
        role.1 = Some(new_st.clone());
        self.shared.publish(role.1.as_ref());
        let forced = forced.map_err(Status::from)?;
        let Role_::Manager(m) = &role.0 else {
            return Err(Status::internal("the node did not start as a manager"));
        };
        m.wait_leader().await.map_err(Status::from)?;
        let tokens = m
            .api()
            .store()
            .get_cluster()
            .ok()
            .flatten()
            .and_then(|c| c.join_tokens)
            .unwrap_or_default();
        tracing::warn!(
            index = forced.reseeded.log_id.index,
            epoch = %forced.reseeded.epoch,
            removed = ?forced.removed,
            "the cluster was rebuilt from this manager's state (--force-new-cluster)"
        );
        Ok(pb::InitResponse {
            node_id: new_st.node_id,
            cluster_id: new_st.cluster_id,
            advertise_addr: addr,
            worker_token: tokens.worker,
            manager_token: tokens.manager,
            raft_index: forced.reseeded.log_id.index,
            removed_managers: forced.removed,
        })
    }
}

#[tonic::async_trait]
impl DaemonRpc for DaemonService {
    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let role = self.shared.role.lock().await;
        let st = role.1.clone().unwrap_or(LocalState {
            role: String::new(),
            node_id: String::new(),
            cluster_id: String::new(),
            raft_id: 0,
            advertise_addr: String::new(),
            managers: vec![],
        });
        Ok(Response::new(pb::InfoResponse {
            state: role_name(&role.0) as i32,
            node_id: st.node_id,
            cluster_id: st.cluster_id,
            advertise_addr: st.advertise_addr,
            data_dir: self.shared.cfg.data_dir.display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn local_tasks(
        &self,
        _req: Request<pb::LocalTasksRequest>,
    ) -> Result<Response<pb::LocalTasksResponse>, Status> {
        Ok(Response::new(pb::LocalTasksResponse {
            tasks: self.shared.local_tasks.tasks(),
        }))
    }

    type BackupStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send + 'static>,
    >;

    async fn backup(
        &self,
        _req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let api = match &self.shared.role.lock().await.0 {
            Role_::Manager(m) => m.api().clone(),
            Role_::Worker { .. } => {
                return Err(Status::failed_precondition(
                    "this node is a worker: take the backup on a manager (it holds the store and the CA key)",
                ))
            }
            Role_::Inactive => {
                return Err(Status::failed_precondition(
                    "this node is not part of a cluster",
                ))
            }
        };
        let (info, file) = recover::take_backup(&self.shared.cfg, &api).await?;
        let chunks: Vec<Result<pb::BackupChunk, Status>> = file
            .chunks(BACKUP_CHUNK_BYTES)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::BackupChunk {
                    data: c.to_vec(),
                    info: (i == 0).then(|| info.clone()),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn restore(
        &self,
        req: Request<tonic::Streaming<pb::RestoreChunk>>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        if !matches!(self.shared.role.lock().await.0, Role_::Inactive) {
            return Err(Status::failed_precondition(NOT_INACTIVE_RESTORE));
        }
        let mut stream = req.into_inner();
        let mut file = Vec::new();
        let mut asked_addr = None;
        while let Some(chunk) = stream.message().await? {
            asked_addr.get_or_insert(chunk.advertise_addr);
            if (file.len() + chunk.data.len()) as u64 > crate::backup::MAX_BACKUP_BYTES {
                return Err(Status::invalid_argument(
                    crate::backup::BackupError::TooLarge((file.len() + chunk.data.len()) as u64)
                        .to_string(),
                ));
            }
            file.extend_from_slice(&chunk.data);
        }
        let body = tokio::task::spawn_blocking(move || crate::backup::decode(&file))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut role = self.shared.role.lock().await;
        if !matches!(role.0, Role_::Inactive) {
            return Err(Status::failed_precondition(NOT_INACTIVE_RESTORE));
        }
        let cfg = &self.shared.cfg;
        let addr = cfg.advertise(&asked_addr.unwrap_or_default())?;
        // A node in no cluster holds nothing of one but what an interrupted init, join or
        // restore left.
        forget_cluster(&cfg.data_dir);
        match recover::restore(cfg, body, &addr).await {
            Ok(r) => {
                self.shared.slot.set(Some(r.manager.api().clone()));
                *role = (Role_::Manager(r.manager), Some(r.state));
                self.shared.publish(role.1.as_ref());
                tracing::info!(cluster_id = %r.response.cluster_id, "cluster restored from a backup");
                Ok(Response::new(r.response))
            }
            Err(e) => {
                forget_cluster(&cfg.data_dir);
                Err(e.into())
            }
        }
    }

    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let mut role = self.shared.role.lock().await;
        let r = req.into_inner();
        if r.force_new_cluster {
            return self
                .force_new_cluster(&mut role, &r.advertise_addr)
                .await
                .map(Response::new);
        }
        if !matches!(role.0, Role_::Inactive) {
            return Err(Status::failed_precondition(NOT_INACTIVE));
        }
        let cfg = &self.shared.cfg;
        let addr = cfg.advertise(&r.advertise_addr)?;
        crate::controlapi::network::check_vni_start(r.vni_start)
            .map_err(|e| Status::invalid_argument(e.0))?;
        match init_cluster(cfg, &addr, &r.cluster_name, r.vni_start).await {
            Ok((m, st, tokens)) => {
                self.shared.slot.set(Some(m.api().clone()));
                let resp = pb::InitResponse {
                    node_id: st.node_id.clone(),
                    cluster_id: st.cluster_id.clone(),
                    advertise_addr: addr,
                    worker_token: tokens.worker,
                    manager_token: tokens.manager,
                    ..Default::default()
                };
                *role = (Role_::Manager(m), Some(st));
                self.shared.publish(role.1.as_ref());
                Ok(Response::new(resp))
            }
            Err(e) => {
                forget_cluster(&cfg.data_dir);
                Err(e.into())
            }
        }
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let mut role = self.shared.role.lock().await;
        if !matches!(role.0, Role_::Inactive) {
            return Err(Status::failed_precondition(NOT_INACTIVE));
        }
        let cfg = &self.shared.cfg;
        let r = req.into_inner();
        let addr = cfg.advertise(&r.advertise_addr)?;
        let manager_addr = normalize_addr(&r.manager_addr, 4242)?;
        match join_cluster(cfg, &r.token, &manager_addr, &addr).await {
            Ok((new_role, st)) => {
                if let Role_::Manager(m) = &new_role {
                    self.shared.slot.set(Some(m.api().clone()));
                }
                let resp = pb::JoinResponse {
                    node_id: st.node_id.clone(),
                    role: if st.role == "manager" {
                        pb::NodeRole::Manager
                    } else {
                        pb::NodeRole::Worker
                    } as i32,
                };
                *role = (new_role, Some(st));
                self.shared.publish(role.1.as_ref());
                Ok(Response::new(resp))
            }
            Err(e) => {
                forget_cluster(&cfg.data_dir);
                Err(e)
            }
        }
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let force = req.get_ref().force;
        let mut role = self.shared.role.lock().await;
        match &role.0 {
            Role_::Inactive => {
                return Err(Status::failed_precondition(
                    "this node is not part of a cluster",
                ))
            }
            Role_::Worker { .. } => {}
            Role_::Manager(m) => {
                if !force {
                    return Err(Status::failed_precondition(
                        "this node is a manager: leaving removes it from the raft group and can cost \
                         the cluster its quorum; demote it first (`shoal node demote`), or use --force",
                    ));
                }
                let api = m.api().clone();
                let node_id = api.node_id().to_string();
                let mut req = Request::new(pb::LeaveManagerRequest {
                    node_id,
                    force: true,
                });
                req.set_timeout(JOIN_MANAGER_TIMEOUT);
                let svc = ControlService::local(ApiSlot::with(api));
                let res =
                    <ControlService as shoal_proto::v1::control_server::Control>::leave_manager(
                        &svc, req,
                    )
                    .await;
                if let Err(e) = res {
                    // Forced: the cluster may be gone; leave anyway.
                    tracing::warn!(
                        "leaving raft membership failed, leaving anyway: {}",
                        e.message()
                    );
                }
            }
        }
        self.shared.slot.set(None);
        let (old, _) = std::mem::replace(&mut *role, (Role_::Inactive, None));
        self.shared.publish(None);
        self.shared.desired_role.send_replace(None);
        stop_role(old).await;
        forget_cluster(&self.shared.cfg.data_dir);
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

/// Removes what ties the node to a cluster from its data dir.
fn forget_cluster(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(STATE_FILE));
    let _ = std::fs::remove_dir_all(data_dir.join(PKI_DIR));
    let _ = std::fs::remove_dir_all(data_dir.join(RAFT_DIR));
}

/// A random non-zero Raft id.
fn new_raft_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

fn host_of(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => addr.to_string(),
    }
}

async fn init_cluster(
    cfg: &DaemonConfig,
    addr: &str,
    name: &str,
    vni_start: u32,
) -> Result<(Manager, LocalState, pb::JoinTokens), DaemonError> {
    let pki = cfg.data_dir.join(PKI_DIR);
    let cluster_id = new_id();
    let node_id = new_id();
    let raft_id = new_raft_id();
    let root = RootCa::create(&cluster_id)?;
    root.save(&pki)?;
    crate::secrets::Keyring::generate()
        .and_then(|k| k.save(&pki))
        .map_err(|e| DaemonError::Refused(format!("making the secrets key: {e}")))?;
    let (key_pem, csr_pem) = ca::make_csr(None)?;
    let issued = root.issue(
        &csr_pem,
        &node_id,
        Role::Manager,
        &[host_of(addr)],
        ca::DEFAULT_NODE_CERT_LIFETIME,
    )?;
    let tls = NodeTls::from_pem(root.cert_pem(), &issued.cert_pem, &key_pem)?;
    tls.save(&pki)?;
    let m = Manager::start(
        &cfg.data_dir,
        cfg.listen_addr,
        tls,
        raft_id,
        &cfg.timers(),
        vec![addr.to_string()],
        cfg.image_resolver.clone(),
    )
    .await?;
    if let Err(e) = m.initialize(addr).await {
        m.shutdown().await;
        return Err(e);
    }
    let tokens = JoinTokens::generate(&root.digest()).to_proto();
    let cluster = pb::Cluster {
        meta: Some(pb::Meta {
            id: cluster_id.clone(),
            ..Default::default()
        }),
        spec: Some(pb::ClusterSpec {
            network: (vni_start != 0).then_some(pb::NetworkConfig { vni_start }),
            ..default_cluster_spec(if name.is_empty() { "default" } else { name }, cfg.timers())
        }),
        root_ca_cert_pem: root.cert_pem().to_string(),
        join_tokens: Some(tokens.clone()),
    };
    let node = first_manager_node(
        node_id.clone(),
        cfg.hostname(),
        addr.to_string(),
        raft_id,
        issued.serial,
    );
    if let Err(e) = m
        .api()
        .propose(vec![
            Mutation::Create(Object::Cluster(cluster)),
            // Before the node: it gets its address on it at apply.
            Mutation::Create(Object::Network(
                crate::controlapi::network::ingress_network(if vni_start == 0 {
                    crate::controlapi::network::DEFAULT_VNI_START
                } else {
                    vni_start
                }),
            )),
            Mutation::Create(Object::Node(node)),
        ])
        .await
    {
        m.shutdown().await;
        return Err(DaemonError::Raft(e.message().to_string()));
    }
    let st = LocalState {
        role: "manager".into(),
        node_id,
        cluster_id,
        raft_id,
        advertise_addr: addr.to_string(),
        managers: vec![addr.to_string()],
    };
    if let Err(e) = st.save(&cfg.data_dir) {
        m.shutdown().await;
        return Err(e);
    }
    tracing::info!(node_id = %st.node_id, cluster_id = %st.cluster_id, "cluster initialised");
    Ok((m, st, tokens))
}

/// The cluster spec of a new cluster: DESIGN.md's timers.
/// The node record of a cluster's one manager as it starts the cluster (`cluster init`,
/// `cluster restore`): a ready leader at `addr`.
fn first_manager_node(
    node_id: String,
    hostname: String,
    addr: String,
    raft_id: u64,
    certificate_serial: String,
) -> pb::Node {
    pb::Node {
        meta: Some(pb::Meta {
            id: node_id,
            ..Default::default()
        }),
        spec: Some(pb::NodeSpec {
            desired_role: pb::NodeRole::Manager as i32,
            ..Default::default()
        }),
        role: pb::NodeRole::Manager as i32,
        description: Some(pb::NodeDescription {
            hostname,
            ..Default::default()
        }),
        status: Some(pb::NodeStatus {
            state: pb::NodeState::Ready as i32,
            message: String::new(),
            addr: addr.clone(),
        }),
        manager_status: Some(pb::ManagerStatus {
            raft_id,
            addr,
            leader: true,
            reachable: true,
        }),
        certificate_serial,
        networks: Vec::new(),
    }
}

pub fn default_cluster_spec(name: &str, raft: pb::RaftConfig) -> pb::ClusterSpec {
    pb::ClusterSpec {
        name: name.to_string(),
        raft: Some(raft),
        dispatcher: Some(pb::DispatcherConfig {
            heartbeat_period_ms: 1000,
            missed_heartbeats_down: 3,
            status_batch_ms: 10,
            status_batch_max: 1000,
        }),
        ca: Some(pb::CaConfig {
            node_cert_lifetime_ms: ca::DEFAULT_NODE_CERT_LIFETIME.as_millis() as u64,
        }),
        orchestration: Some(pb::OrchestrationConfig {
            task_history_per_slot: 5,
        }),
        network: None,
    }
}

async fn join_cluster(
    cfg: &DaemonConfig,
    token: &str,
    manager_addr: &str,
    addr: &str,
) -> Result<(Role_, LocalState), Status> {
    let pki = cfg.data_dir.join(PKI_DIR);
    let joined = ca::join_cluster(manager_addr, token, &cfg.hostname(), addr)
        .await
        .map_err(|e| match e {
            ca::CaError::Rpc { status, .. } => Status::new(
                status.code(),
                format!("{manager_addr}: {}", status.message()),
            ),
            other => Status::failed_precondition(other.to_string()),
        })?;
    joined
        .save(&pki)
        .map_err(|e| Status::internal(e.to_string()))?;
    let tls = joined.tls().map_err(|e| Status::internal(e.to_string()))?;
    let cluster_id = tls.identity().cluster_id;
    let mut st = LocalState {
        role: joined.role.as_str().to_string(),
        node_id: joined.node_id.clone(),
        cluster_id,
        raft_id: 0,
        advertise_addr: addr.to_string(),
        managers: vec![manager_addr.to_string()],
    };
    if joined.role == Role::Worker {
        st.save(&cfg.data_dir)?;
        tracing::info!(node_id = %st.node_id, "joined the cluster as a worker");
        return Ok((
            Role_::Worker {
                renew: spawn_worker_renewal(tls, pki, st.managers.clone()),
            },
            st,
        ));
    }
    st.raft_id = new_raft_id();
    let m = Manager::start(
        &cfg.data_dir,
        cfg.listen_addr,
        tls.clone(),
        st.raft_id,
        &cfg.timers(),
        vec![addr.to_string()],
        cfg.image_resolver.clone(),
    )
    .await?;
    if let Err(e) = join_raft(&tls, manager_addr, &st).await {
        m.shutdown().await;
        return Err(e);
    }
    if let Err(e) = st.save(&cfg.data_dir) {
        m.shutdown().await;
        return Err(e.into());
    }
    tracing::info!(node_id = %st.node_id, raft_id = st.raft_id, "joined the cluster as a manager");
    Ok((Role_::Manager(m), st))
}

/// Asks the cluster, through the manager at `manager_addr` (which forwards to the leader), to
/// make this node's running manager a learner and then a voter.
async fn join_raft(tls: &NodeTls, manager_addr: &str, st: &LocalState) -> Result<(), Status> {
    let channel = tls
        .channel(manager_addr)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = ControlClient::new(channel)
        .max_decoding_message_size(crate::controlapi::MAX_CONTROL_MESSAGE_BYTES);
    let mut req = Request::new(pb::JoinManagerRequest {
        node_id: st.node_id.clone(),
        raft_id: st.raft_id,
        addr: st.advertise_addr.clone(),
    });
    req.set_timeout(JOIN_MANAGER_TIMEOUT);
    client.join_manager(req).await.map(|_| ()).map_err(|e| {
        Status::new(
            e.code(),
            format!("joining raft through {manager_addr}: {}", e.message()),
        )
    })
}

/// Turns this worker into a manager once the cluster has promoted it (the worker agent
/// passes on what the dispatcher says); ends with the daemon.
async fn watch_promotion(
    shared: std::sync::Weak<Shared>,
    mut desired: tokio::sync::watch::Receiver<Option<pb::NodeRole>>,
) {
    while desired.changed().await.is_ok() {
        if *desired.borrow_and_update() != Some(pb::NodeRole::Manager) {
            continue;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(e) = promote_self(&shared).await {
            tracing::warn!("becoming a manager failed, trying again: {e}");
            // The next heartbeat says "manager" again and so starts the next attempt.
            shared.desired_role.send_replace(None);
            drop(shared);
            tokio::time::sleep(PROMOTE_RETRY_DELAY).await;
        }
    }
}

/// Makes this worker a manager: a manager certificate and the CA key (a renewal, which the
/// CA answers with the role the cluster wants), a Raft id recorded before joining (a retry or
/// a restart reuses it, so the cluster never holds two ids for this node), a manager on the
/// data dir, `JoinManager` through a known manager, and the new role recorded in node.json.
/// Does nothing unless the node is a worker now.
async fn promote_self(shared: &Shared) -> Result<(), DaemonError> {
    let mut role = shared.role.lock().await;
    let (Role_::Worker { .. }, Some(st)) = &*role else {
        return Ok(());
    };
    let mut st = st.clone();
    let cfg = &shared.cfg;
    let pki = cfg.data_dir.join(PKI_DIR);
    let tls = NodeTls::load(&pki)?;
    // The managers it joined through may be gone; the dispatcher named the current ones.
    let mut managers = st.managers.clone();
    for m in shared
        .learned_managers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        if !managers.contains(m) && *m != st.advertise_addr {
            managers.push(m.clone());
        }
    }
    if tls.identity().role != Role::Manager || RootCa::load(&pki).is_err() {
        let mut renewed = Err(DaemonError::Ca(ca::CaError::NoManager));
        for addr in &managers {
            renewed = ca::renew_once(&tls, &pki, addr).await.map_err(Into::into);
            if renewed.is_ok() {
                break;
            }
        }
        renewed?;
        if tls.identity().role != Role::Manager {
            return Err(DaemonError::Refused(
                "the CA still issues this node a worker certificate".into(),
            ));
        }
        RootCa::load(&pki)?;
    }
    tracing::info!(node_id = %st.node_id, "promoted: this node becomes a manager");
    if st.raft_id == 0 {
        st.raft_id = new_raft_id();
        st.save(&cfg.data_dir)?;
        role.1 = Some(st.clone());
    }
    let m = Manager::start(
        &cfg.data_dir,
        cfg.listen_addr,
        tls.clone(),
        st.raft_id,
        &cfg.timers(),
        vec![st.advertise_addr.clone()],
        cfg.image_resolver.clone(),
    )
    .await?;
    let mut joined = Err(DaemonError::Ca(ca::CaError::NoManager));
    for addr in &managers {
        joined = join_raft(&tls, addr, &st)
            .await
            .map_err(|e| DaemonError::Raft(e.message().to_string()));
        if joined.is_ok() {
            break;
        }
    }
    if let Err(e) = joined {
        m.shutdown().await;
        return Err(e);
    }
    st.role = "manager".into();
    if let Err(e) = st.save(&cfg.data_dir) {
        // Raft already counts this node: run on as a manager; a restart resumes as a worker
        // with the same Raft id and joins again (idempotent).
        tracing::error!("recording the promotion: {e}");
    }
    shared.slot.set(Some(m.api().clone()));
    let (old, _) = std::mem::replace(&mut *role, (Role_::Manager(m), Some(st)));
    stop_role(old).await;
    shared.publish(role.1.as_ref());
    tracing::info!("this node now runs as a manager");
    Ok(())
}
