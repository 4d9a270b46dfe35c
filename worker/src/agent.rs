//! The worker agent: the dispatcher session, one controller per assigned task, the local task
//! database and the batched status reports.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_manager::tls::NodeTls;
use shoal_proto::v1 as pb;
use shoal_proto::v1::dispatcher_client::DispatcherClient;
use shoal_proto::v1::{NodeDescription, Task, TaskState, TaskStatus};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::controller::{self, Assignment, Report};
use crate::db::{DbError, TaskDb};
use crate::executor::Executor;

/// Status reports queued from controllers to the agent; controllers wait when it is full.
pub const REPORT_QUEUE: usize = 1024;
/// Reports wait this long to be sent together with others.
pub const REPORT_BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Reports sent in one `UpdateTaskStatus` call at most (the dispatcher's limit).
pub const MAX_REPORTS_PER_CALL: usize = shoal_manager::dispatcher::MAX_UPDATES_PER_CALL;
/// How long one `UpdateTaskStatus` call may take (it waits for the Raft write).
pub const REPORT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before re-sending reports after a failed call on a live session.
pub const REPORT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("no manager address to connect to")]
    NoManagers,
    #[error(
        "node description is {0} bytes: managers accept at most {max}",
        max = shoal_proto::limits::MAX_NODE_DESCRIPTION_BYTES
    )]
    DescriptionTooLarge(usize),
}

/// How to run a node's worker agent.
pub struct AgentConfig {
    /// The node's TLS material (its certificate names the node).
    pub tls: NodeTls,
    /// Manager addresses (host:port) to open the session with; the dispatcher's list replaces
    /// it once connected.
    pub managers: Vec<String>,
    /// Data dir holding `worker/` (the task database). `None` keeps tasks in memory only:
    /// hollow nodes of scale tests, which have no containers to adopt.
    pub data_dir: Option<PathBuf>,
    /// What the node reports at session start (hostname, resources, hollow flag).
    pub description: NodeDescription,
    /// Runs the tasks.
    pub executor: Arc<dyn Executor>,
    /// Told the role the cluster wants this node to hold, at every session start and
    /// heartbeat (the daemon, which owns membership, acts on a promotion).
    pub on_desired_role: Option<DesiredRoleHook>,
}

/// Receives the node's desired role as the dispatcher states it, with the manager addresses
/// the agent knows now (the dispatcher's list).
pub type DesiredRoleHook = Arc<dyn Fn(pb::NodeRole, &[String]) + Send + Sync>;

/// Reads the tasks an agent holds now (see [`Agent::tasks_reader`]).
pub type TasksReader = Arc<dyn Fn() -> Vec<Task> + Send + Sync>;

/// The current session, for the report sender.
#[derive(Clone)]
pub(crate) struct Link {
    pub client: DispatcherClient<Channel>,
    pub session_id: String,
}

struct Ctl {
    tx: watch::Sender<Assignment>,
    handle: JoinHandle<()>,
}

/// State shared by the agent's tasks.
pub(crate) struct Shared {
    pub tls: NodeTls,
    pub on_desired_role: Option<DesiredRoleHook>,
    pub description: NodeDescription,
    pub managers: Mutex<Vec<String>>,
    pub link: watch::Sender<Option<Link>>,
    executor: Arc<dyn Executor>,
    db: Option<TaskDb>,
    controllers: Mutex<HashMap<String, Ctl>>,
    /// Standalone containers' network attachments on this node, by id: no controller, the
    /// executor serves their DNS and virtual IPs.
    attachments: Mutex<BTreeMap<String, Task>>,
    /// Latest status of every task the agent holds.
    statuses: Mutex<HashMap<String, TaskStatus>>,
    /// Reports not yet acknowledged by a dispatcher, latest per task.
    pending: Mutex<BTreeMap<String, TaskStatus>>,
    pending_added: Notify,
    /// Whether the containers no task owns were swept (once, at the first full set).
    strays_swept: std::sync::atomic::AtomicBool,
    reports_tx: mpsc::Sender<Report>,
    /// Log subscriptions this node is serving now, by id, with the way to add tasks to one.
    pub log_subs: Mutex<HashMap<String, crate::logs::MoreTasks>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent; a panic elsewhere must not wedge them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn task_id(t: &Task) -> &str {
    t.meta.as_ref().map_or("", |m| m.id.as_str())
}

impl Shared {
    /// The executor running the tasks.
    pub(crate) fn executor(&self) -> &Arc<dyn Executor> {
        &self.executor
    }

    /// Applies an assignment message: new tasks get controllers, changed ones are updated,
    /// removed ones (and, for a full set, the ones missing from it) are stopped and forgotten.
    pub(crate) fn apply(self: &Arc<Self>, a: pb::Assignments) {
        if let Some(p) = &a.peers {
            let peers: Vec<std::net::Ipv4Addr> =
                p.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            // Before the tasks: a task started from this message joins its networks with them.
            self.executor.set_peers(peers);
        }
        if let Some(r) = &a.records {
            self.executor.set_records(r.clone());
        }
        if let Some(d) = a.dependencies {
            // Ids only, never data: what this node holds, for the operator (and the tests).
            let ids = |m: Vec<Option<&pb::Meta>>| -> Vec<String> {
                m.into_iter()
                    .map(|m| m.map_or(String::new(), |m| m.id.clone()))
                    .collect()
            };
            tracing::info!(
                secrets = ?ids(d.secrets.iter().map(|s| s.meta.as_ref()).collect()),
                configs = ?ids(d.configs.iter().map(|c| c.meta.as_ref()).collect()),
                "secrets and configs held for this node's tasks"
            );
            // Before the tasks: a task started from this message finds its files.
            self.executor.set_dependencies(d);
        }
        let (attachments, tasks): (Vec<Task>, Vec<Task>) =
            a.tasks.into_iter().partition(|t| t.network_attachment);
        {
            let mut held = lock(&self.attachments);
            let before = held.clone();
            if a.full {
                held.clear();
            }
            for id in &a.removed {
                held.remove(id);
            }
            for t in attachments {
                held.insert(task_id(&t).to_string(), t);
            }
            if *held != before {
                self.executor
                    .set_attachments(held.values().cloned().collect());
            }
        }
        let mut ctls = lock(&self.controllers);
        if a.full
            && !self
                .strays_swept
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // The containers neither a stored task nor this set owns: the task database may
            // lack a task the agent started just before it was killed (its last writes unflushed),
            // and the dispatcher still holds it — only the first full set tells them apart.
            // (A stored task this set lacks was removed while the agent was down: not kept.)
            let mut keep: HashSet<String> = ctls.keys().cloned().collect();
            keep.extend(tasks.iter().map(|t| task_id(t).to_string()));
            let executor = self.executor.clone();
            tokio::spawn(async move {
                remove_strays(executor.as_ref(), &keep).await;
            });
        }
        let mut removed: Vec<String> = a.removed;
        if a.full {
            let keep: HashSet<&str> = tasks.iter().map(task_id).collect();
            removed.extend(
                ctls.keys()
                    .filter(|id| !keep.contains(id.as_str()))
                    .cloned(),
            );
            // Stored tasks that never got a container wait for this set; the ones it lacks
            // were removed while the agent was down.
            let waiting: Vec<String> = lock(&self.statuses)
                .keys()
                .filter(|id| !keep.contains(id.as_str()) && !ctls.contains_key(*id))
                .cloned()
                .collect();
            for id in waiting {
                lock(&self.statuses).remove(&id);
                if let Some(db) = &self.db {
                    if let Err(e) = db.remove(&id) {
                        tracing::error!("forgetting task {id}: {e}");
                    }
                }
            }
        }
        for id in removed {
            if let Some(c) = ctls.remove(&id) {
                c.tx.send_modify(|x| x.removed = true);
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = c.handle.await;
                    me.forget(&id);
                });
            }
        }
        for t in tasks {
            let id = task_id(&t).to_string();
            if id.is_empty() {
                continue;
            }
            if let Some(c) = ctls.get(&id) {
                c.tx.send_modify(|x| x.task = t.clone());
                let status = lock(&self.statuses).get(&id).cloned();
                self.store(&t, status);
                continue;
            }
            let status = lock(&self.statuses)
                .get(&id)
                .cloned()
                .or_else(|| t.status.clone())
                .unwrap_or_default();
            self.store(&t, Some(status.clone()));
            let c = self.spawn(t, status);
            ctls.insert(id, c);
        }
    }

    fn spawn(&self, task: Task, status: TaskStatus) -> Ctl {
        let id = task_id(&task).to_string();
        lock(&self.statuses).insert(id, status.clone());
        let (tx, rx) = watch::channel(Assignment {
            task,
            removed: false,
        });
        let handle = tokio::spawn(controller::run(
            self.executor.clone(),
            rx,
            status,
            self.reports_tx.clone(),
        ));
        Ctl { tx, handle }
    }

    fn store(&self, task: &Task, status: Option<TaskStatus>) {
        if let Some(db) = &self.db {
            let mut t = task.clone();
            t.status = status;
            if let Err(e) = db.put(&t) {
                tracing::error!("recording task {}: {e}", task_id(task));
            }
        }
    }

    fn forget(&self, id: &str) {
        if lock(&self.controllers).contains_key(id) {
            // Assigned again meanwhile.
            return;
        }
        lock(&self.statuses).remove(id);
        if let Some(db) = &self.db {
            if let Err(e) = db.remove(id) {
                tracing::error!("forgetting task {id}: {e}");
            }
        }
    }

    /// The tasks with a controller now, as last assigned, each with its latest status; by id.
    fn tasks(&self) -> Vec<Task> {
        let ctls = lock(&self.controllers);
        let statuses = lock(&self.statuses);
        let mut out: Vec<Task> = ctls
            .iter()
            .map(|(id, c)| {
                let mut t = c.tx.borrow().task.clone();
                if let Some(s) = statuses.get(id) {
                    t.status = Some(s.clone());
                }
                t
            })
            .collect();
        out.sort_by(|a, b| task_id(a).cmp(task_id(b)));
        out
    }

    /// Queues every task's current status again (a new session: the new leader may have
    /// missed reports; it ignores what it already has).
    pub(crate) fn resend_all(&self) {
        let all: Vec<(String, TaskStatus)> = lock(&self.statuses)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut p = lock(&self.pending);
        for (id, s) in all {
            let newer = p.get(&id).is_some_and(|q| q.state > s.state);
            if !newer {
                p.insert(id, s);
            }
        }
        drop(p);
        self.pending_added.notify_one();
    }
}

/// Records controller reports (memory, database) and queues them for the dispatcher.
async fn record(shared: Arc<Shared>, mut rx: mpsc::Receiver<Report>) {
    while let Some((id, mut status)) = rx.recv().await {
        // Within what the dispatcher keeps (it cuts longer texts anyway).
        shoal_proto::limits::bound_task_status(&mut status);
        // The last reports of a removed task still go to the dispatcher, but it is not
        // remembered again once forgotten.
        if lock(&shared.controllers).contains_key(&id) {
            if let Some(db) = &shared.db {
                if let Err(e) = db.set_status(&id, &status) {
                    tracing::error!("recording status of task {id}: {e}");
                }
            }
            lock(&shared.statuses).insert(id.clone(), status.clone());
        }
        lock(&shared.pending).insert(id, status);
        shared.pending_added.notify_one();
    }
}

/// Sends queued reports over the current session in batches until acknowledged.
async fn send_reports(shared: Arc<Shared>) {
    let mut link_rx = shared.link.subscribe();
    loop {
        let current = link_rx.borrow_and_update().clone();
        let link = match current {
            Some(l) => l,
            None => {
                if link_rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        if lock(&shared.pending).is_empty() {
            tokio::select! {
                _ = shared.pending_added.notified() => {}
                r = link_rx.changed() => if r.is_err() { return },
            }
            continue;
        }
        tokio::time::sleep(REPORT_BATCH_WINDOW).await;
        let batch: Vec<(String, TaskStatus)> = lock(&shared.pending)
            .iter()
            .take(MAX_REPORTS_PER_CALL)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let req = pb::UpdateTaskStatusRequest {
            session_id: link.session_id.clone(),
            updates: batch
                .iter()
                .map(|(id, s)| pb::TaskStatusUpdate {
                    task_id: id.clone(),
                    status: Some(s.clone()),
                })
                .collect(),
        };
        let mut client = link.client.clone();
        match tokio::time::timeout(REPORT_CALL_TIMEOUT, client.update_task_status(req)).await {
            Ok(Ok(_)) => {
                let mut p = lock(&shared.pending);
                for (id, s) in batch {
                    if p.get(&id) == Some(&s) {
                        p.remove(&id);
                    }
                }
            }
            Ok(Err(e)) if e.code() == tonic::Code::FailedPrecondition => {
                // The session is stale: wait for the next one.
                tracing::debug!("status reports refused: {}", e.message());
                if link_rx.changed().await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::debug!("status reports failed: {}", e.message());
                tokio::time::sleep(REPORT_RETRY_DELAY).await;
            }
            Err(_) => tokio::time::sleep(REPORT_RETRY_DELAY).await,
        }
    }
}

/// How long opening the task database waits for an agent of this process that is still
/// shutting down (a restart within one process, as tests do) to release it.
pub const DB_LOCK_WAIT: Duration = Duration::from_secs(5);

async fn open_db(dir: &std::path::Path) -> Result<TaskDb, WorkerError> {
    let deadline = tokio::time::Instant::now() + DB_LOCK_WAIT;
    loop {
        match TaskDb::open(dir) {
            Err(DbError::Sled(sled::Error::Io(e)))
                if e.to_string().contains("lock") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Removes every container the executor holds that none of the tasks `keep` names (at the
/// dispatcher's first full set: the controllers and the set's tasks), with its
/// cgroups, network, files and dir: the container of a task removed while the agent was down
/// before the agent had recorded it as started (an agent killed mid-create), half-made ones, and
/// what a removal cut short left. Returns how many were removed.
pub async fn remove_strays(executor: &dyn Executor, keep: &HashSet<String>) -> usize {
    let held = match executor.held().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("listing the node's containers: {e}");
            return 0;
        }
    };
    let mut removed = 0;
    for id in held.into_iter().filter(|id| !keep.contains(id)) {
        match executor.remove(&id).await {
            Ok(()) => {
                tracing::info!(container = %id, "removed a container no task of this node owns");
                removed += 1;
            }
            Err(e) => tracing::warn!(container = %id, "removing a stray container: {e}"),
        }
    }
    removed
}

/// A running worker agent.
pub struct Agent {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Opens the task database, resumes the tasks it holds (adopting their containers), and
    /// starts the dispatcher session.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, WorkerError> {
        if cfg.managers.is_empty() {
            return Err(WorkerError::NoManagers);
        }
        // Refused by every manager: say so once here rather than retry sessions for ever.
        let bytes = prost::Message::encoded_len(&cfg.description);
        if bytes > shoal_proto::limits::MAX_NODE_DESCRIPTION_BYTES {
            return Err(WorkerError::DescriptionTooLarge(bytes));
        }
        let db = match &cfg.data_dir {
            Some(d) => Some(open_db(d).await?),
            None => None,
        };
        let stored = match &db {
            Some(db) => db.list()?,
            None => vec![],
        };
        let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE);
        let shared = Arc::new(Shared {
            tls: cfg.tls,
            on_desired_role: cfg.on_desired_role,
            description: cfg.description,
            managers: Mutex::new(cfg.managers),
            link: watch::channel(None).0,
            executor: cfg.executor,
            db,
            controllers: Mutex::new(HashMap::new()),
            attachments: Mutex::new(BTreeMap::new()),
            statuses: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            pending_added: Notify::new(),
            strays_swept: std::sync::atomic::AtomicBool::new(false),
            reports_tx,
            log_subs: Mutex::new(Default::default()),
        });
        {
            let mut ctls = lock(&shared.controllers);
            for t in stored {
                let status = t.status.clone().unwrap_or_default();
                let id = task_id(&t).to_string();
                if status.state < TaskState::Starting as i32 {
                    // No container yet: nothing to adopt, so wait for the dispatcher's full
                    // set to say whether the task should still run.
                    lock(&shared.statuses).insert(id, status);
                    continue;
                }
                tracing::info!(task = %id, state = status.state, "resuming task");
                ctls.insert(id, shared.spawn(t, status));
            }
        }
        let tasks = vec![
            tokio::spawn(record(shared.clone(), reports_rx)),
            tokio::spawn(send_reports(shared.clone())),
            tokio::spawn(crate::session::run(shared.clone())),
        ];
        Ok(Agent { shared, tasks })
    }

    /// Latest status of every task the agent holds, by task id.
    pub fn statuses(&self) -> HashMap<String, TaskStatus> {
        lock(&self.shared.statuses).clone()
    }

    /// What the agent runs now: every task it holds a controller for (running, or ended with
    /// its container kept), as assigned, with its latest status (health included), by id.
    /// Read through a handle that does not keep the agent alive: empty once it is gone.
    pub fn tasks_reader(&self) -> TasksReader {
        let shared = Arc::downgrade(&self.shared);
        Arc::new(move || shared.upgrade().map(|s| s.tasks()).unwrap_or_default())
    }

    /// Whether a session with a leader is open now.
    pub fn connected(&self) -> bool {
        self.shared.link.borrow().is_some()
    }

    /// Stops the agent. Containers keep running: a restarted agent adopts them.
    pub async fn shutdown(mut self) {
        let mut handles: Vec<JoinHandle<()>> = self.tasks.drain(..).collect();
        handles.extend(
            lock(&self.shared.controllers)
                .drain()
                .map(|(_, c)| c.handle),
        );
        for h in &handles {
            h.abort();
        }
        // Until they are gone they hold the database open.
        for h in handles {
            let _ = h.await;
        }
        self.stop();
        if let Some(db) = &self.shared.db {
            if let Err(e) = db.flush() {
                tracing::warn!("flushing the task database: {e}");
            }
        }
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for (_, c) in lock(&self.shared.controllers).drain() {
            c.handle.abort();
        }
        self.shared.link.send_replace(None);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
