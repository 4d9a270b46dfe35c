//! The dispatcher: one mutual-TLS session per node's worker agent, served by the leader.
//!
//! - **Sessions** (`session.rs`): a node opens `Session` with its description; the node is
//!   marked READY (description and resources recorded) and gets its full assignment set, then
//!   changes. One store watcher (the router) fans task events out to the sessions of the nodes
//!   they concern; a session forwards only what the agent must act on (a new task, a changed
//!   desired state or spec, a removal), so the agent's own status writes are not echoed back.
//! - **Heartbeats** (`heartbeat.rs`): every session heartbeats within the period its last
//!   answer gave (the cluster's period with jitter); a node silent for
//!   `missed_heartbeats_down` periods is marked DOWN. A manager that becomes leader gives every
//!   READY node that grace to reconnect before marking it DOWN.
//! - **Status** (`status.rs`): reports are batched (≤ [`STATUS_BATCH_WINDOW`] or
//!   [`STATUS_BATCH_MAX`] updates) into one Raft command; only forward transitions of tasks
//!   still assigned to the reporting node are written, stale and duplicate reports are dropped.
//!
//! Followers answer `Session` with a redirect to the leader. All writes go through a
//! [`Backend`], which the daemon implements with Raft (`impl Backend for Raft`).

mod heartbeat;
pub mod logs;
mod server;
mod session;
mod status;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{Command, Response, Store};
use crate::tls::Authorizer;

pub use logs::LogBroker;
pub use server::DispatcherService;
pub(crate) use session::{node_ip, peers};

/// Heartbeat period when the cluster object sets none.
pub const DEFAULT_HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);
/// Missed heartbeats after which a node is DOWN, when the cluster object sets none.
pub const DEFAULT_MISSED_HEARTBEATS_DOWN: u32 = 3;
/// Status reports wait at most this long to be batched with others.
pub const STATUS_BATCH_WINDOW: Duration = Duration::from_millis(10);
/// At most this many status updates go into one Raft command, when the cluster object sets no
/// other number.
pub const STATUS_BATCH_MAX: usize = 1000;
/// The most status updates a batch may take, whatever the cluster object sets (swarmkit's;
/// a batch is written as several commands when its bytes need it).
pub const STATUS_BATCH_MAX_LIMIT: usize = 10_000;
/// The longest batching window, whatever the cluster object sets: the agents wait for it.
pub const STATUS_BATCH_WINDOW_LIMIT: Duration = Duration::from_secs(1);
/// Bytes of one status command at most: a batch on tasks with large specs is written as
/// several commands, each within the Raft entry bound.
pub const STATUS_COMMAND_BYTES: usize = crate::raft::MAX_ENTRY_BYTES;
/// Pending `UpdateTaskStatus` calls queued for the batcher; further calls wait (backpressure).
pub const STATUS_QUEUE: usize = 1024;
/// Updates one `UpdateTaskStatus` call may carry.
pub const MAX_UPDATES_PER_CALL: usize = STATUS_BATCH_MAX;
/// A status batch whose write met a version conflict is re-read and retried this often.
pub const STATUS_WRITE_RETRIES: usize = 5;
/// Node status writes (READY, DOWN) retried this often on a version conflict.
pub const NODE_WRITE_RETRIES: usize = 5;
/// Store events queued per session; a session that falls further behind resyncs (full set).
pub const SESSION_EVENT_QUEUE: usize = 4096;
/// Messages buffered on a session's stream towards the agent.
pub const SESSION_STREAM_BUFFER: usize = 16;
/// Task changes sent in one `Assignments` message at most (the full set is one message).
pub const MAX_CHANGES_PER_MESSAGE: usize = 1000;
/// Largest message on the dispatcher service (a full set of a node's tasks).
pub const MAX_DISPATCHER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Largest request the dispatcher decodes (a status batch of `MAX_UPDATES_PER_CALL` with long
/// error texts); requests are decoded before the caller is authorised, so this stays far
/// below the 64 MiB its answers may need.
pub const MAX_DISPATCHER_REQUEST_BYTES: usize = 16 * 1024 * 1024;
// A full call of reports, each with every status text at its longest, decodes within the
// request limit (the texts are cut after decoding, before anything is written).
const _: () = assert!(
    MAX_UPDATES_PER_CALL * (4 * shoal_proto::limits::MAX_STATUS_TEXT_BYTES + 1024)
        <= MAX_DISPATCHER_REQUEST_BYTES
);
// A node (its spec, bounded by the control API, and its description) fits one entry.
const _: () = assert!(
    crate::controlapi::validate::MAX_NODE_SPEC_BYTES
        + shoal_proto::limits::MAX_NODE_DESCRIPTION_BYTES
        + 64 * 1024
        <= crate::raft::MAX_ENTRY_BYTES
);

/// Heartbeat periods are drawn from [period − jitter, period], jitter = period / this.
pub const HEARTBEAT_JITTER_DIVISOR: u32 = 10;
/// How long a dispatcher write (status batch, node state) waits for its commit; then the
/// outcome is unknown (the write may still commit) and the caller retries.
pub const PROPOSE_WAIT: Duration = Duration::from_secs(5);
/// How long a session or a status write waits for a new leader's store to catch up.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(5);
/// Fastest heartbeat period accepted from the cluster object (tests use 100 ms).
pub const MIN_HEARTBEAT_PERIOD: Duration = Duration::from_millis(20);

/// Why a proposal did not reach the store.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// This manager is not (or no longer) the leader.
    #[error("not the raft leader")]
    NotLeader,
    /// Raft failed to commit the command.
    #[error("propose: {0}")]
    Failed(String),
}

/// Who leads the managers, as this manager sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// This manager leads: the dispatcher serves sessions.
    Leader,
    /// Another manager leads (its address, if known): sessions are redirected there.
    Follower { leader_addr: Option<String> },
}

/// What the dispatcher needs from Raft: writes, and who leads.
pub trait Backend: Send + Sync + 'static {
    /// Proposes `cmd` and waits until it is applied; the store's answer comes back.
    fn propose(&self, cmd: Command) -> impl Future<Output = Result<Response, ProposeError>> + Send;
    /// Who leads now.
    fn leadership(&self) -> Leadership;
    /// Waits until this manager's store holds every entry committed before it took the lead
    /// (a new leader applies those after it takes over). Sessions and status writes read the
    /// store: a lagging store would send a node a full set without its newest tasks, and
    /// drop (yet acknowledge) its reports on them. A single store is always caught up.
    fn caught_up(&self) -> impl Future<Output = Result<(), ProposeError>> + Send {
        async { Ok(()) }
    }
}

impl Backend for crate::raft::Raft {
    async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        use crate::raft::ProposeRefused;
        // Bounded: the status batcher writes one batch at a time, and a proposal left without
        // an answer across a leadership blip once stalled every status report for good.
        let Ok(written) = tokio::time::timeout(PROPOSE_WAIT, crate::raft::propose(self, cmd)).await
        else {
            return Err(ProposeError::Failed(format!(
                "no commit within {PROPOSE_WAIT:?}"
            )));
        };
        written.map_err(|e| match e {
            ProposeRefused::NotLeader => ProposeError::NotLeader,
            e => ProposeError::Failed(e.to_string()),
        })
    }

    async fn caught_up(&self) -> Result<(), ProposeError> {
        // Read under the borrow: this runs for every status batch.
        let (term, applied_term, last) = {
            let m = self.metrics();
            let m = m.borrow();
            (
                m.current_term,
                m.last_applied.as_ref().map(|l| l.leader_id.term),
                m.last_log_index,
            )
        };
        // An entry of this term applied means all before it are: the usual case, no wait.
        if applied_term == Some(term) {
            return Ok(());
        }
        self.wait(Some(CATCH_UP_WAIT))
            .applied_index_at_least(last, "dispatcher: the store caught up")
            .await
            .map(|_| ())
            .map_err(|e| ProposeError::Failed(format!("the store is still catching up: {e}")))
    }

    fn leadership(&self) -> Leadership {
        let m = self.metrics().borrow().clone();
        match m.current_leader {
            Some(l) if l == m.id => Leadership::Leader,
            Some(l) => Leadership::Follower {
                leader_addr: m
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone()),
            },
            None => Leadership::Follower { leader_addr: None },
        }
    }
}

/// Errors of the dispatcher's own plumbing.
#[derive(thiserror::Error, Debug)]
pub enum DispatcherError {
    /// The store could not be read.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A write did not reach the store.
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The store refused a write after every retry.
    #[error("write refused: {0}")]
    Refused(String),
}

/// The dispatcher's timers, from the cluster object (defaults for unset fields), read where
/// they are used (each heartbeat, each status batch): a `cluster update` applies at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// How often agents heartbeat.
    pub heartbeat_period: Duration,
    /// Missed heartbeats before DOWN.
    pub missed_heartbeats_down: u32,
    /// How long a status report waits for others to be written with.
    pub status_batch_window: Duration,
    /// Status updates a batch takes at most.
    pub status_batch_max: usize,
}

impl Timers {
    /// The timers of the cluster object in `store` (defaults while there is none).
    pub fn of(store: &Store) -> Timers {
        let d = store
            .get_cluster()
            .ok()
            .flatten()
            .and_then(|c| c.spec)
            .and_then(|s| s.dispatcher)
            .unwrap_or_default();
        Timers {
            heartbeat_period: if d.heartbeat_period_ms == 0 {
                DEFAULT_HEARTBEAT_PERIOD
            } else {
                Duration::from_millis(d.heartbeat_period_ms).max(MIN_HEARTBEAT_PERIOD)
            },
            missed_heartbeats_down: if d.missed_heartbeats_down == 0 {
                DEFAULT_MISSED_HEARTBEATS_DOWN
            } else {
                d.missed_heartbeats_down
            },
            status_batch_window: if d.status_batch_ms == 0 {
                STATUS_BATCH_WINDOW
            } else {
                Duration::from_millis(d.status_batch_ms).min(STATUS_BATCH_WINDOW_LIMIT)
            },
            status_batch_max: match d.status_batch_max {
                0 => STATUS_BATCH_MAX,
                n => (n as usize).min(STATUS_BATCH_MAX_LIMIT),
            },
        }
    }

    /// How long a node may stay silent after a heartbeat answered with `period`.
    pub fn grace(&self, period: Duration) -> Duration {
        period * self.missed_heartbeats_down
    }
}

/// One open session of a node.
struct SessionHandle {
    id: String,
    events: mpsc::Sender<session::SessionEvent>,
}

/// State shared by the service, the router, the heartbeat monitor and the status batcher.
struct Inner<B: Backend> {
    store: Store,
    backend: B,
    authorizer: Authorizer,
    /// node id → its current session.
    sessions: Mutex<HashMap<String, SessionHandle>>,
    /// node id → when it is DOWN unless it heartbeats (monotonic).
    deadlines: Mutex<HashMap<String, tokio::time::Instant>>,
    status_tx: mpsc::Sender<status::StatusRequest>,
    /// Opens the secrets the nodes' tasks use (`None`: a cluster without a secrets key).
    secrets: Option<Arc<crate::secrets::Keyring>>,
    /// Log subscriptions, published to nodes on their sessions.
    logs: LogBroker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked: every update is one insert/remove.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running dispatcher: background tasks plus the gRPC service they share state with.
pub struct Dispatcher<B: Backend> {
    inner: Arc<Inner<B>>,
    tasks: Vec<JoinHandle<()>>,
}

impl<B: Backend> Dispatcher<B> {
    /// Starts the dispatcher over `store` (this manager's replica), writing through `backend`,
    /// admitting worker and manager certificates through `authorizer`. Serve
    /// [`Dispatcher::service`] on the manager's TLS port; it is active while `backend` leads.
    pub fn start(store: Store, backend: B, authorizer: Authorizer) -> Dispatcher<B> {
        Self::start_with_secrets(store, backend, authorizer, None)
    }

    /// As [`Dispatcher::start`], opening secrets for the nodes' tasks with `secrets`.
    pub fn start_with_secrets(
        store: Store,
        backend: B,
        authorizer: Authorizer,
        secrets: Option<Arc<crate::secrets::Keyring>>,
    ) -> Dispatcher<B> {
        let (status_tx, status_rx) = mpsc::channel(STATUS_QUEUE);
        let watch = store.watch();
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner<B>>| {
            let weak = weak.clone();
            let publish = move |node: &str, sub: pb::LogSubscription| {
                weak.upgrade().is_some_and(|inner| {
                    lock(&inner.sessions).get(node).is_some_and(|s| {
                        s.events
                            .try_send(session::SessionEvent::Logs(Box::new(sub)))
                            .is_ok()
                    })
                })
            };
            let logs = LogBroker::new(Box::new(publish), store.clone());
            Inner {
                store,
                backend,
                authorizer,
                sessions: Mutex::new(HashMap::new()),
                deadlines: Mutex::new(HashMap::new()),
                status_tx,
                secrets,
                logs,
            }
        });
        let tasks = vec![
            tokio::spawn(session::route(inner.clone(), watch)),
            tokio::spawn(heartbeat::monitor(inner.clone())),
            tokio::spawn(status::batcher(inner.clone(), status_rx)),
        ];
        Dispatcher { inner, tasks }
    }

    /// The gRPC service to add to the manager's server.
    pub fn service(&self) -> pb::dispatcher_server::DispatcherServer<DispatcherService<B>> {
        pb::dispatcher_server::DispatcherServer::new(DispatcherService {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(MAX_DISPATCHER_REQUEST_BYTES)
        .max_encoding_message_size(MAX_DISPATCHER_MESSAGE_BYTES)
    }

    /// The log broker, for the control API's `SubscribeLogs`.
    pub fn log_broker(&self) -> LogBroker {
        self.inner.logs.clone()
    }

    /// Reads the number of open sessions (nothing keeps the dispatcher alive: 0 once gone).
    pub fn session_count(&self) -> crate::controlapi::SessionCount {
        let inner = Arc::downgrade(&self.inner);
        Arc::new(move || inner.upgrade().map_or(0, |i| lock(&i.sessions).len()))
    }

    /// Node ids with an open session now.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.sessions).keys().cloned().collect();
        v.sort();
        v
    }

    /// Stops the background tasks and ends every session.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        lock(&self.inner.sessions).clear();
        lock(&self.inner.deadlines).clear();
    }
}

impl<B: Backend> Drop for Dispatcher<B> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Addresses of every manager in the store.
fn managers(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = store
        .list_nodes()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.manager_status.map(|m| m.addr))
        .filter(|a| !a.is_empty())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A fresh session id.
fn new_session_id() -> String {
    crate::controlapi::new_id()
}
