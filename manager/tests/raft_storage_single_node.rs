//! A real one-manager openraft node on the sled storage: writes through Raft, snapshots and
//! purging keep the log bounded, and a restart from the same files loses nothing.

use crate::no_peers;
use no_peers::NoPeers;

use std::time::Duration;

use openraft::storage::RaftLogReader;
use openraft::ServerState;
use shoal_manager::raft::{raft_config, Raft, Storage};
use shoal_manager::store::{Command, Mutation, Object, StoreError};
use shoal_proto::v1::{Meta, Node, RaftConfig};

const SNAPSHOT_INTERVAL: u64 = 20;
const KEEP: u64 = 5;
const WRITES: usize = 60;
const WAIT: Duration = Duration::from_secs(10);

fn node_cmd(i: usize) -> Command {
    Command {
        now_ms: i as i64,
        mutations: vec![Mutation::Create(Object::Node(Node {
            meta: Some(Meta {
                id: format!("n{i:03}"),
                ..Default::default()
            }),
            ..Default::default()
        }))],
    }
}

async fn start(st: &Storage) -> Raft {
    let timers = RaftConfig {
        snapshot_interval: SNAPSHOT_INTERVAL,
        keep_old_entries: KEEP,
        ..Default::default()
    };
    let config = raft_config("test", &timers).expect("valid config");
    Raft::new(1, config, NoPeers, st.log.clone(), st.state_machine.clone())
        .await
        .expect("raft starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_snapshots_purge_and_restart_on_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft");
    {
        let st = Storage::open(&path).unwrap();
        let raft = start(&st).await;
        no_peers::initialize_alone(&raft).await;

        for i in 0..WRITES {
            let resp = raft.client_write(node_cmd(i)).await.expect("write");
            assert_eq!(resp.data.result, Ok(vec![resp.log_id.index]));
        }
        // A refused command is committed but answers with the refusal.
        let resp = raft.client_write(node_cmd(0)).await.expect("write");
        assert!(
            matches!(resp.data.result, Err(StoreError::AlreadyExists { .. })),
            "{:?}",
            resp.data.result
        );
        let last = resp.log_id.index;

        let m = raft
            .wait(Some(WAIT))
            .metrics(
                |m| {
                    m.purged.is_some()
                        && m.snapshot.map(|s| s.index).unwrap_or(0) + SNAPSHOT_INTERVAL > last
                },
                "snapshot taken and log purged",
            )
            .await
            .expect("snapshot and purge");
        let snap = m.snapshot.unwrap().index;
        let purged = m.purged.unwrap().index;
        assert!(
            purged + KEEP <= snap,
            "kept {KEEP} entries behind the snapshot: purged {purged}, snapshot {snap}"
        );
        let mut reader = st.log.clone();
        let kept = reader.try_get_log_entries(0..).await.unwrap();
        assert!(
            kept.len() as u64 <= SNAPSHOT_INTERVAL + KEEP + 1,
            "log bounded: {} entries kept of {last}",
            kept.len()
        );
        assert_eq!(kept.first().map(|e| e.log_id.index), Some(purged + 1));
        assert_eq!(st.store.list_nodes().unwrap().len(), WRITES);

        raft.shutdown().await.expect("shutdown");
    }

    // Same files, new process state. openraft's tasks may still hold the old sled handle for a
    // moment after shutdown returns: wait (bounded) for its lock, as the daemon does.
    let st = open_when_released(&path).await;
    assert_eq!(
        st.store.list_nodes().unwrap().len(),
        WRITES,
        "state survived"
    );
    let raft = start(&st).await;
    raft.wait(Some(WAIT))
        .state(ServerState::Leader, "leader again")
        .await
        .expect("re-elected");
    let resp = raft
        .client_write(node_cmd(WRITES))
        .await
        .expect("write after restart");
    assert!(resp.data.result.is_ok());
    assert_eq!(st.store.list_nodes().unwrap().len(), WRITES + 1);
    raft.shutdown().await.expect("shutdown");
}

/// Opens the storage once the previous holder of its sled lock in this process lets go.
async fn open_when_released(path: &std::path::Path) -> Storage {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Storage::open(path) {
            Ok(st) => return st,
            Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopening the storage: {e}"),
        }
    }
}
