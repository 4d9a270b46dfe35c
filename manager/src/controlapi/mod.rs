//! The control API: the gRPC `Control` service over the replicated store.
//!
//! Writes are proposed as one `store::Command` through Raft on the leader; a follower forwards
//! the call to the leader over the manager mTLS channel. Reads are linearizable: the leader
//! confirms its leadership (`ensure_linearizable`) before reading its store, and a follower
//! forwards them too. The same service is served on the manager's TLS port (manager
//! certificate required) and on the local root-only Unix socket.

pub mod images;
mod logs;
mod membership;
pub mod network;
pub mod paging;
mod propose;
pub mod secrets;
mod server;
pub mod update;
pub mod validate;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::raft::Raft;
use crate::store::{Command, Mutation, Store, StoreError};
use crate::tls::{Authorizer, NodeTls};
use propose::Proposer;

pub use membership::{quorum_after, ManagerHealth};
pub use propose::{MAX_GROUP_COMMANDS, MAX_INFLIGHT_GROUPS, PROPOSAL_QUEUE};
pub use server::{watch_event, ApiSlot, ControlService, WATCH_STREAM_BUFFER};

/// Metadata key marking a call a follower forwarded, so the receiver never forwards it again.
pub const FORWARDED_HEADER: &str = "shoal-forwarded";
/// How long a forwarded or probing call may take to connect.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a call waits for a leader to be known (an election in progress) before failing.
pub const LEADER_WAIT: Duration = Duration::from_secs(5);
/// How often a call retries when the leader changed under it.
pub const LEADER_RETRIES: usize = 3;
/// How long a proposal may wait to be committed (no quorum = never).
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proposal that timed out waits for this manager's own Raft core to answer.
const CORE_PROBE: Duration = Duration::from_millis(500);

/// Why this manager's Raft stopped, when it did on an error (a full disk's, say): openraft's
/// own answers then say only "raft stopped".
fn stopped_because(raft: &Raft, node_id: &str) -> Option<String> {
    match &raft.metrics().borrow().running_state {
        Err(e) => Some(format!("the raft of manager {node_id} stopped: {e}")),
        Ok(()) => None,
    }
}

/// Pause before retrying a call whose leader changed under it.
pub const LEADER_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Messages larger than this are refused (a service spec is a few KiB).
pub const MAX_CONTROL_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Errors of the control API's own plumbing (validation errors are `validate::Invalid`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no raft leader is known")]
    NoLeader,
    #[error("connecting to manager {addr}: {reason}")]
    Connect { addr: String, reason: String },
}

/// One manager's control API: its Raft handle, its store replica, who it is.
#[derive(Clone)]
pub struct ControlApi {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    store: Store,
    node_id: String,
    raft_id: u64,
    tls: NodeTls,
    authorizer: Authorizer,
    /// One channel per peer address, reused by forwarding and probing.
    channels: Mutex<HashMap<String, Channel>>,
    /// Serialises membership changes (openraft refuses overlapping ones).
    membership: tokio::sync::Mutex<()>,
    /// Serialises network creation, so two creates do not pick the same free subnet or VNI
    /// (apply refuses the second anyway).
    networks: tokio::sync::Mutex<()>,
    /// The group-commit loop, started by the first proposal (which runs on a tokio runtime).
    proposer: OnceLock<Proposer>,
    /// Looks service images up in their registries (the agent's); none: specs keep tags.
    resolver: Option<images::Resolver>,
    secrets: OnceLock<Arc<crate::secrets::Keyring>>,
    /// The dispatcher's log broker (set once the dispatcher runs).
    logs: OnceLock<crate::dispatcher::LogBroker>,
    /// Why the node stopped this manager's Raft (a storage failure), told to every caller.
    stopped: OnceLock<String>,
    /// Counts the dispatcher's open sessions (set once the dispatcher runs), for metrics.
    sessions: OnceLock<SessionCount>,
    /// The raft group's epoch (set by the manager that runs this API).
    epoch: OnceLock<crate::raft::EpochCell>,
}

/// Reads how many agent sessions a dispatcher has open.
pub type SessionCount = Arc<dyn Fn() -> usize + Send + Sync>;

impl ControlApi {
    /// A control API over this manager's Raft and store.
    pub fn new(
        raft: Raft,
        store: Store,
        raft_id: u64,
        tls: NodeTls,
        authorizer: Authorizer,
        resolver: Option<images::Resolver>,
    ) -> Self {
        ControlApi {
            inner: Arc::new(Inner {
                raft,
                store,
                node_id: tls.identity().node_id,
                raft_id,
                tls,
                authorizer,
                channels: Mutex::new(HashMap::new()),
                membership: tokio::sync::Mutex::new(()),
                networks: tokio::sync::Mutex::new(()),
                proposer: OnceLock::new(),
                resolver,
                secrets: OnceLock::new(),
                logs: OnceLock::new(),
                stopped: OnceLock::new(),
                sessions: OnceLock::new(),
                epoch: OnceLock::new(),
            }),
        }
    }

    /// Records why the node stopped this manager's Raft; callers are told it from now on.
    pub fn set_stopped(&self, why: String) {
        let _ = self.inner.stopped.set(why);
    }

    /// `fallback` as Unavailable, unless this manager's Raft stopped: then why it did.
    fn unavailable(&self, fallback: String) -> Status {
        let why = self
            .inner
            .stopped
            .get()
            .map(|w| format!("the raft of manager {} stopped: {w}", self.inner.node_id))
            .or_else(|| stopped_because(&self.inner.raft, &self.inner.node_id));
        Status::unavailable(why.unwrap_or(fallback))
    }

    /// Gives the API this manager's raft group epoch.
    pub fn set_epoch(&self, epoch: crate::raft::EpochCell) {
        let _ = self.inner.epoch.set(epoch);
    }

    /// This manager's raft group epoch, if its manager set one.
    pub fn epoch(&self) -> Option<&crate::raft::EpochCell> {
        self.inner.epoch.get()
    }

    /// Hands the dispatcher's log broker to `SubscribeLogs`.
    pub fn set_log_broker(&self, broker: crate::dispatcher::LogBroker) {
        let _ = self.inner.logs.set(broker);
    }

    /// Hands the dispatcher's session count to the metrics.
    pub fn set_session_count(&self, count: SessionCount) {
        let _ = self.inner.sessions.set(count);
    }

    /// The dispatcher's open sessions now (0 before it runs).
    pub fn session_count(&self) -> usize {
        self.inner.sessions.get().map_or(0, |f| f())
    }

    /// The log broker, once the dispatcher runs.
    pub fn log_broker(&self) -> Option<crate::dispatcher::LogBroker> {
        self.inner.logs.get().cloned()
    }

    /// The agent's image resolver, if it gave one.
    /// Gives the API the secrets data key (`None`: secrets are refused).
    pub fn set_secrets(&self, keys: Option<Arc<crate::secrets::Keyring>>) {
        if let Some(k) = keys {
            let _ = self.inner.secrets.set(k);
        }
    }

    /// The secrets data key, if this manager has one.
    pub fn secrets(&self) -> Option<&crate::secrets::Keyring> {
        self.inner.secrets.get().map(|k| &**k)
    }

    pub fn image_resolver(&self) -> Option<&images::Resolver> {
        self.inner.resolver.as_ref()
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// This manager's store replica.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// This manager's TLS material.
    pub fn tls(&self) -> &NodeTls {
        &self.inner.tls
    }

    /// Decides who may call over TCP.
    pub fn authorizer(&self) -> &Authorizer {
        &self.inner.authorizer
    }

    /// This manager's node id.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// This manager's Raft id.
    pub fn raft_id(&self) -> u64 {
        self.inner.raft_id
    }

    /// A tonic channel to a peer manager's gRPC port (mTLS with this node's certificate).
    pub fn peer_channel(&self, addr: &str) -> Result<Channel, ControlError> {
        if let Some(ch) = lock(&self.inner.channels).get(addr) {
            return Ok(ch.clone());
        }
        let ch = self
            .inner
            .tls
            .channel_with_timeout(addr, PEER_CONNECT_TIMEOUT)
            .map_err(|e| ControlError::Connect {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        lock(&self.inner.channels).insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Forgets cached channels (after a certificate renewal or a failed call).
    pub fn drop_channel(&self, addr: &str) {
        lock(&self.inner.channels).remove(addr);
    }

    /// Where calls must go now: `None` when this manager is the leader, else the leader's
    /// address. Waits up to `LEADER_WAIT` while no leader is known.
    pub async fn leader(&self) -> Result<Option<String>, Status> {
        let mut metrics = self.inner.raft.metrics();
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            {
                let m = metrics.borrow_and_update();
                if let Some(leader) = m.current_leader {
                    if leader == self.inner.raft_id {
                        return Ok(None);
                    }
                    if let Some(node) = m.membership_config.membership().get_node(&leader) {
                        return Ok(Some(node.addr.clone()));
                    }
                }
            }
            // Raft shut down (a demoted manager) closes the channel: `changed()` would then
            // return at once forever, so that ends the wait too.
            if !matches!(
                tokio::time::timeout_at(deadline, metrics.changed()).await,
                Ok(Ok(()))
            ) {
                return Err(Status::unavailable(
                    "no raft leader: the managers have lost quorum or are electing one",
                ));
            }
        }
    }

    /// A client for the leader, or `None` when this manager is the leader. A call that was
    /// already forwarded once is never forwarded again.
    pub(crate) async fn leader_client<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<Option<ControlClient<Channel>>, Status> {
        match self.leader().await? {
            None => Ok(None),
            Some(addr) => {
                if req.metadata().contains_key(FORWARDED_HEADER) {
                    return Err(Status::unavailable(
                        "leadership is changing; retry the request",
                    ));
                }
                let ch = self
                    .peer_channel(&addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                Ok(Some(
                    ControlClient::new(ch)
                        .max_decoding_message_size(MAX_CONTROL_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_CONTROL_MESSAGE_BYTES),
                ))
            }
        }
    }

    /// Where a linearizable read goes: `None` = here (leadership confirmed with a quorum),
    /// else a client for the leader. Retries while leadership moves.
    pub(crate) async fn read_route<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<Option<ControlClient<Channel>>, Status> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(c) = self.leader_client(req).await? {
                return Ok(Some(c));
            }
            match self.linearize().await {
                Ok(()) => return Ok(None),
                Err(e) if attempt >= LEADER_RETRIES => return Err(e),
                Err(_) => tokio::time::sleep(LEADER_RETRY_PAUSE).await,
            }
        }
    }

    /// Confirms leadership with a quorum, so that a read of the local store that follows is
    /// linearizable.
    pub async fn linearize(&self) -> Result<(), Status> {
        self.inner
            .raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(format!("cannot confirm raft leadership: {e}")))
    }

    /// Proposes mutations as one command and waits until it is applied; returns the new
    /// versions. Refusals by the store come back as their gRPC equivalents. Concurrent
    /// proposals may share one Raft entry (see `propose`'s module); each is still applied
    /// all-or-nothing on its own.
    pub async fn propose(&self, mutations: Vec<Mutation>) -> Result<Vec<u64>, Status> {
        let cmd = Command {
            now_ms: now_ms(),
            mutations,
        };
        let proposer = self
            .inner
            .proposer
            .get_or_init(|| Proposer::start(self.inner.raft.clone()));
        let Ok(resp) = tokio::time::timeout(PROPOSE_TIMEOUT, proposer.propose(cmd)).await else {
            return Err(self.uncommitted().await);
        };
        let resp = resp.map_err(|e| {
            if e.code() == Code::Unavailable {
                self.unavailable(e.message().to_string())
            } else {
                e
            }
        })?;
        resp.result.map_err(store_status)
    }

    /// Why a proposal went unanswered: this manager's own Raft core or storage has stopped
    /// answering (a full or frozen disk wedges it without an error), or else the managers have
    /// no quorum.
    async fn uncommitted(&self) -> Status {
        if self.inner.stopped.get().is_some() {
            self.unavailable(String::new())
        } else if crate::raft::elect::core_answers(&self.inner.raft, CORE_PROBE).await {
            Status::unavailable(
                "the write was not committed in time: the managers may have lost quorum",
            )
        } else {
            Status::unavailable(format!(
                "the write was not committed in time: the raft store of manager {} does not \
                 answer (its disk may be full or stuck); retry through another manager",
                self.inner.node_id
            ))
        }
    }

    pub(crate) async fn membership_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.membership.lock().await
    }

    pub(crate) async fn networks_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.networks.lock().await
    }

    /// The Raft ids of the voters and of all members (voters and learners).
    pub fn membership(&self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        let voters = m.membership().voter_ids().collect();
        let all = m.membership().nodes().map(|(id, _)| *id).collect();
        (voters, all)
    }
}

/// Milliseconds since the Unix epoch, as commands carry it.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh object id: 25 lowercase base-36 characters, like docker's.
pub fn new_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..25)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The gRPC status a store refusal maps to.
pub fn store_status(e: StoreError) -> Status {
    let code = match &e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::AlreadyExists { .. } | StoreError::NameTaken { .. } => Code::AlreadyExists,
        StoreError::VersionConflict { .. } | StoreError::InvalidTransition { .. } => {
            Code::FailedPrecondition
        }
        StoreError::Invalid { .. } | StoreError::Malformed(_) => Code::InvalidArgument,
        StoreError::Storage(_) | StoreError::Decode { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a plain map behind, still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
