//! Raft for the managers: openraft 0.9 types and its storage (log and state machine) on sled.

pub mod durable;
pub mod elect;
pub mod epoch;
pub mod log_store;
pub mod network;
pub mod reseed;
pub mod state_machine;
pub mod typ;

use std::path::Path;
use std::sync::Arc;

pub use durable::Durable;
pub use epoch::{Epoch, EpochCell};
pub use log_store::LogStore;
pub use state_machine::StateMachine;
pub use typ::{NodeId, Raft, TypeConfig};

use crate::store::{Command, Response, Store, StoreError};

/// Heartbeat interval used for a zero field of `RaftConfig`. Shorter than DESIGN.md's 100 /
/// 500–1000 ms: openraft makes voters hold a leader lease of `election_timeout_max` after the
/// last heartbeat, and failover cannot beat it (see `elect`), so the timers are halved to meet
/// the failover target (p99 < 1 s).
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 50;
/// Lower bound of the election timeout; `max - min` is the election driver's random spread.
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 200;
/// Upper bound of the election timeout, and openraft's leader lease.
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 400;
/// A snapshot is built once this many entries were applied since the last one.
pub const DEFAULT_SNAPSHOT_INTERVAL: u64 = 10_000;
/// Entries kept in the log behind a snapshot, so briefly lagging followers catch up from the
/// log rather than a whole snapshot.
pub const DEFAULT_KEEP_OLD_ENTRIES: u64 = 1_000;

/// sled's page cache size: sled's default (1 GiB) would dominate a manager's resident memory;
/// the whole state of a large cluster (10,000 services) is a few tens of MiB.
pub const SLED_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// Errors of setting up Raft storage and configuration.
#[derive(thiserror::Error, Debug)]
pub enum RaftSetupError {
    /// The timers do not make a valid openraft config.
    #[error("invalid raft config: {0}")]
    Config(Box<openraft::ConfigError>),
    /// sled could not open the database or a tree.
    #[error("open raft storage: {0}")]
    Sled(#[from] sled::Error),
    /// The database's files could not be opened or synced.
    #[error("sync raft storage: {0}")]
    Io(#[from] std::io::Error),
    /// The store could not be opened.
    #[error("open store: {0}")]
    Store(#[from] StoreError),
}

impl From<openraft::ConfigError> for RaftSetupError {
    fn from(e: openraft::ConfigError) -> Self {
        RaftSetupError::Config(Box::new(e))
    }
}

/// Largest store command one Raft entry may carry (its encoding, [`Command::encoded_bytes`]);
/// a larger proposal is refused before it reaches the log ([`propose`]). An entry must reach
/// every follower in one AppendEntries of at most the transport's
/// [`network::MAX_RAFT_MESSAGE_BYTES`], within the append deadline: one that cannot is never
/// replicated and stalls the log for good. Docker swarm's bound (`MaxTransactionBytes`).
pub const MAX_ENTRY_BYTES: usize = 1536 * 1024;
/// What an AppendEntries adds around one entry (vote, log ids, the entry's own header).
pub const ENTRY_FRAME_BYTES: usize = 4 * 1024;

const _: () = assert!(8 * (MAX_ENTRY_BYTES + ENTRY_FRAME_BYTES) <= network::MAX_RAFT_MESSAGE_BYTES);

/// Why [`propose`] did not commit a command.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ProposeRefused {
    /// The command is larger than a Raft entry may be; nothing was proposed.
    #[error("the change is {bytes} bytes: a Raft entry holds at most {MAX_ENTRY_BYTES} bytes")]
    TooLarge {
        /// Its encoded size.
        bytes: usize,
    },
    /// This manager is not (or no longer) the leader.
    #[error("not the raft leader")]
    NotLeader,
    /// Raft failed to commit it (the outcome may be unknown).
    #[error("raft: {0}")]
    Raft(String),
}

/// Proposes `cmd` as one Raft entry and waits until it is applied: every write of the managers
/// goes through here, so none exceeds [`MAX_ENTRY_BYTES`]. Callers bound the wait.
pub async fn propose(raft: &Raft, cmd: Command) -> Result<Response, ProposeRefused> {
    use openraft::error::{ClientWriteError, RaftError};
    let metrics = crate::metrics::get();
    let bytes = cmd.encoded_bytes();
    if bytes > MAX_ENTRY_BYTES {
        metrics.proposals_failed.inc();
        return Err(ProposeRefused::TooLarge { bytes });
    }
    let started = std::time::Instant::now();
    let written = match raft.client_write(cmd).await {
        Ok(resp) => Ok(resp.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err(ProposeRefused::NotLeader)
        }
        Err(e) => Err(ProposeRefused::Raft(e.to_string())),
    };
    match &written {
        Ok(_) => metrics
            .proposal_seconds
            .observe(started.elapsed().as_secs_f64()),
        Err(_) => {
            metrics.proposals_failed.inc();
        }
    }
    written
}

/// Entries in one AppendEntries at most (openraft's default is 300): an entry can hold a
/// component's command of up to ~192 KiB, and a catch-up append must arrive, be written and be
/// answered within the append deadline on a loaded host.
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;

/// The openraft config for the cluster's `RaftConfig` timers (zero fields take the defaults).
pub fn raft_config(
    cluster_name: &str,
    timers: &shoal_proto::v1::RaftConfig,
) -> Result<Arc<openraft::Config>, RaftSetupError> {
    let or = |v: u64, default: u64| if v == 0 { default } else { v };
    let config = openraft::Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: or(timers.heartbeat_interval_ms, DEFAULT_HEARTBEAT_INTERVAL_MS),
        election_timeout_min: or(
            timers.election_timeout_min_ms,
            DEFAULT_ELECTION_TIMEOUT_MIN_MS,
        ),
        election_timeout_max: or(
            timers.election_timeout_max_ms,
            DEFAULT_ELECTION_TIMEOUT_MAX_MS,
        ),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(or(
            timers.snapshot_interval,
            DEFAULT_SNAPSHOT_INTERVAL,
        )),
        max_in_snapshot_log_to_keep: or(timers.keep_old_entries, DEFAULT_KEEP_OLD_ENTRIES),
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

/// The defaults of `raft_config` as a `RaftConfig` message (for `cluster inspect` and init).
pub fn default_raft_timers() -> shoal_proto::v1::RaftConfig {
    shoal_proto::v1::RaftConfig {
        heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
        election_timeout_min_ms: DEFAULT_ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max_ms: DEFAULT_ELECTION_TIMEOUT_MAX_MS,
        snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
        keep_old_entries: DEFAULT_KEEP_OLD_ENTRIES,
    }
}

/// Everything a manager's Raft node persists, opened from one sled database.
#[derive(Clone, Debug)]
pub struct Storage {
    /// The sled database (log, vote, state machine, snapshot trees).
    pub db: sled::Db,
    /// What makes writes to `db` durable (shared by the log store and the state machine).
    pub durable: Durable,
    /// The log store, to hand to `Raft::new`.
    pub log: LogStore,
    /// The state machine, to hand to `Raft::new`.
    pub state_machine: StateMachine,
    /// The store the state machine applies to; share clones of it for reads and watches.
    pub store: Store,
    /// The raft group's epoch, for the transport (`epoch.rs`).
    pub epoch: EpochCell,
}

impl Storage {
    /// Opens (creating if needed) the sled database in `dir` (`<data-dir>/raft`).
    pub fn open(dir: &Path) -> Result<Storage, RaftSetupError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        let durable = Durable::open(&db, dir)?;
        let store = Store::open(&db)?;
        let log = LogStore::open(&db, durable.clone())?;
        let state_machine = StateMachine::open(&db, durable.clone(), store.clone())?;
        let epoch = EpochCell::open(&db, durable.clone())?;
        Ok(Storage {
            db,
            durable,
            log,
            state_machine,
            store,
            epoch,
        })
    }
}
