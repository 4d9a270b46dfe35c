//! The raft group's epoch: which incarnation of its cluster's Raft group a manager belongs to.
//!
//! A cluster's group starts at epoch 0 (`cluster init`). Starting it over with one voter from
//! a manager's own state (`cluster init --force-new-cluster`) or from a backup (`cluster
//! restore`) gives it the next epoch: number + 1 and a fresh random id. Every Raft request
//! carries the sender's epoch and a manager serves only its own: the old group's managers,
//! should they come back, can never reach the new group's Raft (an append of theirs at a
//! higher term would otherwise depose the new leader and overwrite its log). A manager refused
//! by a later epoch learns that its group was replaced ([`EpochCell::superseded`]) and its
//! daemon stops it being a manager. docs/design/backup.md.
//!
//! A manager that has never held any Raft state (a manager joining the cluster) takes the
//! epoch of the first leader that reaches it, and keeps it (`raft.log_state`, key `epoch`).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::durable::Durable;
use super::log_store::{KEY_EPOCH, LOG_STATE_TREE};

/// gRPC metadata key of a refusal: the refusing manager's epoch (`Epoch::to_header`).
pub const EPOCH_HEADER: &str = "shoal-raft-epoch";

/// One incarnation of a cluster's Raft group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// 0 for the group `cluster init` made; one more at each start-over.
    pub number: u64,
    /// Random, so two start-overs of one group (a mistake) never pass for one group; 0 at
    /// epoch 0.
    pub id: u64,
}

impl Epoch {
    /// The epoch of a group started over from one of this epoch.
    pub fn next(self) -> Epoch {
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        Epoch {
            number: self.number + 1,
            id,
        }
    }

    /// As a metadata value: `<number>.<id in hex>`.
    pub fn to_header(self) -> String {
        format!("{}.{:x}", self.number, self.id)
    }

    /// Parses [`Epoch::to_header`].
    pub fn from_header(s: &str) -> Option<Epoch> {
        let (n, id) = s.split_once('.')?;
        Some(Epoch {
            number: n.parse().ok()?,
            id: u64::from_str_radix(id, 16).ok()?,
        })
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_header())
    }
}

/// What a manager does with a request of another manager's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Same group: serve it.
    Accept,
    /// This manager has no Raft state yet (it is joining): take the sender's epoch, serve it.
    Adopt,
    /// The sender belongs to a group that was started over since: refuse it (it will learn).
    SenderStale,
    /// The sender is of a later epoch than this manager: refuse it (a group never sends to a
    /// manager of an older one unless that manager kept a Raft id of the new group's
    /// membership, which a start-over does not hand out).
    ReceiverStale,
    /// Same number, another id: two start-overs of one group. Refuse both ways.
    Diverged,
}

/// Decides on a request of epoch `theirs` at a manager of epoch `mine`; `fresh` = the manager
/// has no epoch of its own recorded and no Raft state at all.
pub fn judge(mine: Epoch, fresh: bool, theirs: Epoch) -> Verdict {
    if theirs == mine {
        Verdict::Accept
    } else if fresh {
        Verdict::Adopt
    } else if theirs.number < mine.number {
        Verdict::SenderStale
    } else if theirs.number > mine.number {
        Verdict::ReceiverStale
    } else {
        Verdict::Diverged
    }
}

/// A later epoch that refused this manager: its group was replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superseded {
    /// The refusing manager's epoch.
    pub by: Epoch,
    /// The refusing manager's address (a manager of the new group).
    pub addr: String,
}

/// This manager's epoch, shared by its Raft client and server, persisted in the Raft
/// database. Clones share it.
#[derive(Clone, Debug)]
pub struct EpochCell {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tree: sled::Tree,
    durable: Durable,
    /// The epoch, and whether it is recorded on disk.
    current: Mutex<(Epoch, bool)>,
    superseded: watch::Sender<Option<Superseded>>,
}

impl EpochCell {
    /// Reads the epoch recorded in `db` (epoch 0, not recorded, if none).
    pub fn open(db: &sled::Db, durable: Durable) -> Result<EpochCell, sled::Error> {
        let tree = db.open_tree(LOG_STATE_TREE)?;
        let current = match tree.get(KEY_EPOCH)? {
            Some(v) => (decode(&v)?, true),
            None => (Epoch::default(), false),
        };
        Ok(EpochCell {
            inner: Arc::new(Inner {
                tree,
                durable,
                current: Mutex::new(current),
                superseded: watch::channel(None).0,
            }),
        })
    }

    /// The epoch now.
    pub fn get(&self) -> Epoch {
        self.lock().0
    }

    /// Whether an epoch is recorded on disk (a start-over or an adoption wrote one).
    pub fn recorded(&self) -> bool {
        self.lock().1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Epoch, bool)> {
        self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `epoch` as this manager's, durably (a joining manager adopting its group's).
    pub async fn adopt(&self, epoch: Epoch) -> std::io::Result<()> {
        let bytes = encode(&epoch);
        self.inner
            .tree
            .insert(KEY_EPOCH, bytes)
            .map_err(std::io::Error::other)?;
        self.inner.durable.sync().await?;
        *self.lock() = (epoch, true);
        tracing::info!(%epoch, "joined raft group epoch");
        Ok(())
    }

    /// Tells the daemon that a manager of a later epoch refused this one.
    pub fn set_superseded(&self, s: Superseded) {
        self.inner.superseded.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.by.number >= s.by.number) {
                return false;
            }
            tracing::error!(
                mine = %self.get(),
                by = %s.by,
                addr = %s.addr,
                "this manager's raft group was started over without it (force-new-cluster or restore): it is no longer a manager"
            );
            *cur = Some(s);
            true
        });
    }

    /// The later epoch that refused this manager, if one did.
    pub fn superseded(&self) -> Option<Superseded> {
        self.inner.superseded.borrow().clone()
    }
}

/// The stored form of an epoch.
pub(crate) fn encode(e: &Epoch) -> Vec<u8> {
    // Two u64s: bincode cannot fail on them.
    bincode::serialize(e).unwrap_or_default()
}

fn decode(b: &[u8]) -> Result<Epoch, sled::Error> {
    bincode::deserialize(b).map_err(|e| sled::Error::Unsupported(format!("stored raft epoch: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_epoch_is_served_and_a_fresh_manager_adopts() {
        let e0 = Epoch::default();
        let e1 = e0.next();
        assert_eq!(judge(e0, false, e0), Verdict::Accept);
        assert_eq!(judge(e1, false, e1), Verdict::Accept);
        assert_eq!(judge(e0, true, e1), Verdict::Adopt);
        assert_eq!(judge(e0, true, e0), Verdict::Accept);
    }

    #[test]
    fn an_older_group_is_refused_and_so_is_a_diverged_one() {
        let e0 = Epoch::default();
        let e1 = e0.next();
        let e1b = e0.next();
        assert_ne!(e1, e1b);
        assert_eq!(judge(e1, false, e0), Verdict::SenderStale);
        assert_eq!(judge(e0, false, e1), Verdict::ReceiverStale);
        assert_eq!(judge(e1, false, e1b), Verdict::Diverged);
        assert_eq!(e1.next().number, 2);
    }

    #[test]
    fn the_header_form_parses_back() {
        let e = Epoch::default().next();
        assert_eq!(Epoch::from_header(&e.to_header()), Some(e));
        assert_eq!(Epoch::from_header("0.0"), Some(Epoch::default()));
        for bad in ["", "1", "x.1", "1.zz", "1.2.3"] {
            assert_eq!(Epoch::from_header(bad), None, "{bad}");
        }
    }
}
