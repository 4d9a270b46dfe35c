//! Starting a cluster's Raft group over with one voter, keeping the state machine: what
//! `cluster init --force-new-cluster` does to a manager's own Raft database, and `cluster
//! restore` to a fresh one filled from a backup (docs/design/backup.md).
//!
//! openraft 0.9 has no call for this (`initialize` wants an empty node, `change_membership`
//! a quorum), so it is done to the storage, with Raft stopped, in one sled transaction:
//!
//! 1. every entry of the log beyond the last applied one is applied (committed or not: an
//!    entry this manager holds may have been acknowledged to a client by the old leader;
//!    swarm drops the ones it did not know to be committed);
//! 2. `fixup` (the nodes' new roles) is applied as if it were the entry after the last one,
//!    at the log id `(term T, this node, last index + 1)`, where T is above every term this
//!    manager has seen;
//! 3. that log id becomes the last applied, committed and purged id, with a membership of
//!    this node alone; the log is emptied, the vote set to term T (the node elects itself at
//!    once: it is the only voter), the group's epoch advanced (`epoch.rs`) and the old
//!    snapshot dropped.
//!
//! A crash leaves either the old state or the new one whole. A new snapshot of the new state is
//! built right after (openraft would build one at start otherwise: the log is purged), so a
//! manager joining later installs it, membership included.

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership};
use shoal_proto::v1 as pb;

use super::epoch::{self, Epoch};
use super::log_store::{KEY_COMMITTED, KEY_EPOCH, KEY_LAST_PURGED, KEY_VOTE};
use super::state_machine::{KEY_LAST_APPLIED, KEY_LAST_MEMBERSHIP, KEY_SNAPSHOT};
use super::typ::{LogId, NodeId, StoredMembership, Vote};
use super::Storage;
use crate::store::{Command, Mutation, Response, StoreError};

/// Why a start-over failed; nothing of it was written unless the error says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    #[error("raft storage: {0}")]
    Raft(#[from] openraft::StorageError<NodeId>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the store refused the new roles: {0}")]
    Refused(StoreError),
    #[error("encoding raft state: {0}")]
    Encode(#[from] bincode::Error),
    #[error("raft storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("syncing raft storage: {0}")]
    Sync(#[from] std::io::Error),
    #[error("the raft log is missing entries {0}..{1} (purged without a snapshot?)")]
    Gap(u64, u64),
}

/// What a start-over made.
#[derive(Debug, Clone)]
pub struct Reseeded {
    /// The group's new last applied (and committed, and purged) log id.
    pub log_id: LogId,
    /// The log id applied before (from the state machine), and how many log entries beyond
    /// it were applied now.
    pub applied_before: Option<LogId>,
    pub entries_applied: u64,
    /// The new epoch.
    pub epoch: Epoch,
}

/// Starts the group in `storage` over with `raft_id` (reached at `addr`) as its only voter,
/// at epoch `epoch`. `fixup` gets the nodes as the store holds them once the log is applied
/// and returns the mutations that give them their new roles; they are applied at the new log
/// id, stamped `now_ms`. Raft must not be running on `storage`.
pub async fn reseed(
    storage: &Storage,
    raft_id: NodeId,
    addr: &str,
    epoch: Epoch,
    now_ms: i64,
    fixup: impl FnOnce(&[pb::Node]) -> Vec<Mutation>,
) -> Result<Reseeded, ReseedError> {
    let mut log = storage.log.clone();
    let mut sm = storage.state_machine.clone();
    let (applied_before, _) = sm.applied_state().await?;
    let state = log.get_log_state().await?;
    let vote = log.read_vote().await?;
    let start = applied_before.map_or(0, |l| l.index + 1);
    let entries = log.try_get_log_entries(start..).await?;
    if let Some(first) = entries.first() {
        if first.log_id.index != start {
            return Err(ReseedError::Gap(start, first.log_id.index));
        }
    }

    let mut batch = storage.store.batch();
    let mut last = applied_before;
    let mut applied = 0;
    for e in &entries {
        if let EntryPayload::Normal(cmd) = &e.payload {
            // A refusal is a result, as in `apply`; only a storage failure stops us.
            batch.apply(e.log_id.index, cmd)?;
        }
        last = Some(e.log_id);
        applied += 1;
    }
    let term = [
        vote.map(|v| v.leader_id.term),
        state.last_log_id.map(|l| l.leader_id.term),
        last.map(|l| l.leader_id.term),
        applied_before.map(|l| l.leader_id.term),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0)
        + 1;
    let index = last.map_or(0, |l| l.index) + 1;
    let log_id = LogId::new(CommittedLeaderId::new(term, raft_id), index);

    let nodes = batch.nodes()?;
    let cmd = Command {
        now_ms,
        mutations: fixup(&nodes),
    };
    let Response { result, .. } = batch.apply(index, &cmd)?;
    result.map_err(ReseedError::Refused)?;

    let membership = StoredMembership::new(
        Some(log_id),
        Membership::new(
            vec![BTreeSet::from([raft_id])],
            BTreeMap::from([(
                raft_id,
                BasicNode {
                    addr: addr.to_string(),
                },
            )]),
        ),
    );
    batch.put_meta(KEY_LAST_APPLIED, bincode::serialize(&Some(log_id))?);
    batch.put_meta(KEY_LAST_MEMBERSHIP, bincode::serialize(&membership)?);

    let logs = storage.db.open_tree(super::log_store::LOG_TREE)?;
    let log_state = storage.db.open_tree(super::log_store::LOG_STATE_TREE)?;
    let snapshots = storage.db.open_tree(super::state_machine::SNAPSHOT_TREE)?;
    let mut log_writes = Vec::new();
    for k in logs.iter().keys() {
        log_writes.push((k?.to_vec(), None));
    }
    let state_writes = vec![
        (
            KEY_VOTE.to_vec(),
            Some(bincode::serialize(&Vote::new(term, raft_id))?),
        ),
        (
            KEY_COMMITTED.to_vec(),
            Some(bincode::serialize(&Some(log_id))?),
        ),
        (KEY_LAST_PURGED.to_vec(), Some(bincode::serialize(&log_id)?)),
        (KEY_EPOCH.to_vec(), Some(epoch::encode(&epoch))),
    ];
    batch.commit_with(&[
        (&logs, log_writes),
        (&log_state, state_writes),
        (&snapshots, vec![(KEY_SNAPSHOT.to_vec(), None)]),
    ])?;
    storage.durable.sync().await?;
    // Syncs the whole database again once saved.
    sm.build_snapshot().await?;
    Ok(Reseeded {
        log_id,
        applied_before,
        entries_applied: applied,
        epoch,
    })
}
