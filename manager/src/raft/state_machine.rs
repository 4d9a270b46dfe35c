//! The Raft state machine (openraft storage-v2 `RaftStateMachine`) over the [`Store`].
//!
//! Each `apply` call commits its entries' effects and the new last applied log id and
//! membership in one sled transaction, so the data and the applied index never disagree after
//! a crash. Snapshots are whole-store dumps; the current one is kept on disk.

// openraft's trait methods return its (large) `StorageError`; the helpers feeding them do too.
#![allow(clippy::result_large_err)]

use std::io::Cursor;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, SnapshotId, StorageIOError};
use serde::{Deserialize, Serialize};

use super::durable::Durable;
use super::typ::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::store::{Dump, Response, Store};

/// sled tree holding the current snapshot (meta and data).
pub const SNAPSHOT_TREE: &str = "raft.snapshot";

pub(crate) const KEY_LAST_APPLIED: &[u8] = b"last_applied";
pub(crate) const KEY_LAST_MEMBERSHIP: &[u8] = b"last_membership";
pub(crate) const KEY_SNAPSHOT: &[u8] = b"current";

/// The current snapshot as kept on disk.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The state machine: applies committed entries to the store and builds/installs snapshots.
#[derive(Clone, Debug)]
pub struct StateMachine {
    db: sled::Db,
    durable: Durable,
    store: Store,
    snapshots: sled::Tree,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

fn snap_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

impl StateMachine {
    /// A state machine applying to `store`, whose trees live in `db` (synced by `durable`).
    pub fn open(
        db: &sled::Db,
        durable: Durable,
        store: Store,
    ) -> Result<StateMachine, sled::Error> {
        Ok(StateMachine {
            db: db.clone(),
            durable,
            store,
            snapshots: db.open_tree(SNAPSHOT_TREE)?,
        })
    }

    /// The store this state machine applies to (a clone sharing trees and watchers).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    fn applied(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let last_applied = match self.store.meta_get(KEY_LAST_APPLIED).map_err(sm_read_err)? {
            Some(v) => bincode::deserialize(&v).map_err(sm_read_err)?,
            None => None,
        };
        let membership = match self
            .store
            .meta_get(KEY_LAST_MEMBERSHIP)
            .map_err(sm_read_err)?
        {
            Some(v) => bincode::deserialize(&v).map_err(sm_read_err)?,
            None => StoredMembership::default(),
        };
        Ok((last_applied, membership))
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self.snapshots.get(KEY_SNAPSHOT).map_err(snap_read_err)? {
            Some(v) => Ok(Some(bincode::deserialize(&v).map_err(snap_read_err)?)),
            None => Ok(None),
        }
    }

    /// Keeps `snap` as the current snapshot, durably, together with everything written to the
    /// database before it (the applied store it was built from or installed into).
    async fn save_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let bytes = bincode::serialize(snap).map_err(snap_write_err)?;
        self.snapshots
            .insert(KEY_SNAPSHOT, bytes)
            .map_err(snap_write_err)?;
        self.durable.sync().await.map_err(snap_write_err)?;
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = self.store.batch();
        let mut responses = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        for entry in entries {
            let log_id = entry.log_id;
            last_applied = Some(log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::single(Ok(Vec::new()))),
                EntryPayload::Normal(cmd) => {
                    let resp = batch
                        .apply(log_id.index, &cmd)
                        .map_err(|e| StorageIOError::apply(log_id, &e))?;
                    responses.push(resp);
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m));
                    responses.push(Response::single(Ok(Vec::new())));
                }
            }
        }
        let Some(last_applied) = last_applied else {
            return Ok(responses);
        };
        batch.put_meta(
            KEY_LAST_APPLIED,
            bincode::serialize(&Some(last_applied)).map_err(sm_write_err)?,
        );
        if let Some(m) = membership {
            batch.put_meta(
                KEY_LAST_MEMBERSHIP,
                bincode::serialize(&m).map_err(sm_write_err)?,
            );
        }
        batch
            .commit()
            .map_err(|e| StorageIOError::apply(last_applied, &e))?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut dump = Dump::from_bytes(&data).map_err(snap_read_err)?;
        // The dump carries the applied id and membership it was built at; the meta is what
        // openraft vouches for, so it wins.
        dump.meta_set(
            KEY_LAST_APPLIED,
            bincode::serialize(&meta.last_log_id).map_err(sm_write_err)?,
        );
        dump.meta_set(
            KEY_LAST_MEMBERSHIP,
            bincode::serialize(&meta.last_membership).map_err(sm_write_err)?,
        );
        let applied_index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.store
            .restore(&dump, applied_index)
            .map_err(sm_write_err)?;
        let bytes = data.len();
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        crate::metrics::get().snapshot("installed", bytes);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let dump = self.store.dump().map_err(snap_read_err)?;
        let last_log_id: Option<LogId> = match dump.meta_get(KEY_LAST_APPLIED) {
            Some(v) => bincode::deserialize(v).map_err(snap_read_err)?,
            None => None,
        };
        let last_membership: StoredMembership = match dump.meta_get(KEY_LAST_MEMBERSHIP) {
            Some(v) => bincode::deserialize(v).map_err(snap_read_err)?,
            None => StoredMembership::default(),
        };
        // Unique per build even at the same log id (a rebuild after install, say).
        let seq = self.db.generate_id().map_err(snap_write_err)?;
        let snapshot_id: SnapshotId = match last_log_id {
            Some(l) => format!(
                "{}-{}-{}-{seq}",
                l.leader_id.term, l.leader_id.node_id, l.index
            ),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let data = dump.to_bytes().map_err(snap_write_err)?;
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored).await?;
        crate::metrics::get().snapshot("built", stored.data.len());
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}
