//! The Raft log, vote and committed id on sled (openraft storage-v2 `RaftLogStorage`).
//!
//! Votes and appends are acknowledged only after [`Durable::sync`] returned (sled's flush and
//! `fdatasync`): a manager that crashes or loses power right after answering never forgets
//! what it promised.

// openraft's trait methods return its (large) `StorageError`; the helpers feeding them do too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{RaftLogId, StorageIOError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::durable::Durable;
use super::typ::{Entry, LogId, StorageError, TypeConfig, Vote};

/// sled tree of log entries, keyed by big-endian index (so key order is index order).
pub const LOG_TREE: &str = "raft.log";
/// sled tree of the vote, committed and last purged log ids.
pub const LOG_STATE_TREE: &str = "raft.log_state";

pub(crate) const KEY_VOTE: &[u8] = b"vote";
pub(crate) const KEY_COMMITTED: &[u8] = b"committed";
pub(crate) const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// The raft group's epoch (`epoch.rs`); absent: epoch 0.
pub(crate) const KEY_EPOCH: &[u8] = b"epoch";

/// The Raft log on sled. Clones share the same trees (the log reader is a clone).
#[derive(Clone, Debug)]
pub struct LogStore {
    durable: Durable,
    logs: sled::Tree,
    state: sled::Tree,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, bincode::Error> {
    bincode::serialize(v)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    /// Opens (creating if needed) the log trees in `db`; `durable` syncs that database.
    ///
    /// A log with a hole is cut at the hole: sled's recovery after a failed write (ENOSPC)
    /// can drop large values kept as external blobs while keeping later inline keys, which
    /// leaves keys 1..h-1, h+2.. (seen in a chaos run: `LogIndex(258)` missing, 260.. there).
    /// openraft takes the last key as the last log id and would stop for good reading the
    /// hole, at every start; the entries from the hole on are removed instead and fetched
    /// again from the leader. A saved committed id beyond the cut is dropped with them.
    pub fn open(db: &sled::Db, durable: Durable) -> Result<LogStore, sled::Error> {
        let store = LogStore {
            durable,
            logs: db.open_tree(LOG_TREE)?,
            state: db.open_tree(LOG_STATE_TREE)?,
        };
        store.cut_at_hole()?;
        Ok(store)
    }

    /// The first missing index between the first and the last key, if any.
    fn first_hole(&self) -> Result<Option<u64>, sled::Error> {
        let mut prev: Option<u64> = None;
        for k in self.logs.iter().keys() {
            let k = k?;
            let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) else {
                continue;
            };
            let i = u64::from_be_bytes(b);
            if let Some(p) = prev {
                if i != p + 1 {
                    return Ok(Some(p + 1));
                }
            }
            prev = Some(i);
        }
        Ok(None)
    }

    fn cut_at_hole(&self) -> Result<(), sled::Error> {
        let Some(hole) = self.first_hole()? else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        let mut cut = 0u64;
        for key in self.logs.range(index_key(hole)..).keys() {
            batch.remove(key?);
            cut += 1;
        }
        self.logs.apply_batch(batch)?;
        let committed: Option<LogId> = self
            .state
            .get(KEY_COMMITTED)?
            .and_then(|v| decode::<Option<LogId>>(&v).ok().flatten());
        if committed.is_some_and(|c| c.index >= hole) {
            self.state.remove(KEY_COMMITTED)?;
        }
        self.durable.sync_blocking().map_err(sled::Error::Io)?;
        tracing::error!(
            hole,
            removed = cut,
            "the raft log had a hole (lost in a failed write): entries from it on removed, the leader sends them again"
        );
        Ok(())
    }

    fn get_state<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.state.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(decode(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.get_state(KEY_LAST_PURGED)
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.durable.sync().await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.logs
            .range::<[u8; 8], _>((start, end))
            .values()
            .map(|v| decode::<Entry>(&v.map_err(read_err)?).map_err(read_err))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = match self.logs.last().map_err(read_err)? {
            Some((_, v)) => Some(*decode::<Entry>(&v).map_err(read_err)?.get_log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.state
            .insert(KEY_VOTE, bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        match self
            .state
            .get(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&e))?
        {
            Some(v) => Ok(Some(decode(&v).map_err(|e| StorageIOError::read_vote(&e))?)),
            None => Ok(None),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: losing it only makes a restarted node re-learn the commit index.
        let bytes = encode(&committed).map_err(write_err)?;
        self.state.insert(KEY_COMMITTED, bytes).map_err(write_err)?;
        if let Some(c) = committed {
            crate::metrics::get().commit_index.set(c.index);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_state::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes =
                encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        match self.flush().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self.logs.range(index_key(log_id.index)..).keys() {
            batch.remove(key.map_err(read_err)?);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        self.flush().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two writes leaves extra entries
        // below it, which reads never reach, instead of a gap.
        let bytes = encode(&log_id).map_err(write_err)?;
        self.state
            .insert(KEY_LAST_PURGED, bytes)
            .map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for key in self.logs.range(..=index_key(log_id.index)).keys() {
            batch.remove(key.map_err(read_err)?);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        self.flush().await.map_err(write_err)?;
        Ok(())
    }
}
