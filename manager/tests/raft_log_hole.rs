//! A sled log with a hole (what sled's recovery left after ENOSPC in a chaos run: entry 258
//! missing, 260.. present) is cut at the hole when the store opens, so openraft starts.

use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{CommittedLeaderId, EntryPayload};
use shoal_manager::raft::log_store::{LOG_STATE_TREE, LOG_TREE};
use shoal_manager::raft::typ::{Entry, LogId};
use shoal_manager::raft::Storage;

fn log_id(i: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), i)
}

/// A sled database in `dir` whose log holds blank entries at `indexes`, as the log store
/// writes them; the caller flushes.
fn log_with(dir: &std::path::Path, indexes: impl IntoIterator<Item = u64>) -> sled::Db {
    let db = sled::open(dir).unwrap();
    let logs = db.open_tree(LOG_TREE).unwrap();
    for i in indexes {
        let e = Entry {
            log_id: log_id(i),
            payload: EntryPayload::Blank,
        };
        logs.insert(i.to_be_bytes(), bincode::serialize(&e).unwrap())
            .unwrap();
    }
    db
}

#[tokio::test]
async fn a_log_with_a_hole_is_cut_at_the_hole() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = log_with(dir.path(), (1..=4).chain(7..=10));
        let state = db.open_tree(LOG_STATE_TREE).unwrap();
        state
            .insert(b"committed", bincode::serialize(&Some(log_id(8))).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let st = Storage::open(dir.path()).unwrap();
    let mut log = st.log;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(4)));
    let entries = log.try_get_log_entries(1..5).await.unwrap();
    assert_eq!(entries.len(), 4);
    assert!(log.try_get_log_entries(5..).await.unwrap().is_empty());
    assert_eq!(log.read_committed().await.unwrap(), None);
}

#[tokio::test]
async fn a_contiguous_log_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = log_with(dir.path(), 3..=7);
        db.flush().unwrap();
    }
    let st = Storage::open(dir.path()).unwrap();
    let mut log = st.log;
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(7))
    );
    assert_eq!(log.try_get_log_entries(3..).await.unwrap().len(), 5);
}
