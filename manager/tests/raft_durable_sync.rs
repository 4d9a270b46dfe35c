//! The fsync path of Raft's storage (`raft::Durable`) runs for every acknowledged write,
//! covers sled's blob files, and a failing sync fails the write instead of acknowledging it.
//! (What an abort loses is `raft_log_durability.rs`; a power loss cannot be staged in a test,
//! so this checks that the syncs happen and that their errors reach openraft.)

use crate::no_peers;
use no_peers::NoPeers;

use std::collections::HashMap;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::Vote;
use shoal_manager::raft::{raft_config, Raft, Storage};
use shoal_manager::store::{Command, Mutation, Object};
use shoal_proto::v1::{Meta, Node, NodeSpec, RaftConfig};

const WRITES: u64 = 10;
const WAIT: Duration = Duration::from_secs(10);
/// Over sled's blob threshold (segment size 512 KiB / 4): such a value gets its own file.
const BIG_LABEL_BYTES: usize = 300 * 1024;

fn node_cmd(id: &str, label: Option<String>) -> Command {
    Command {
        now_ms: 1,
        mutations: vec![Mutation::Create(Object::Node(Node {
            meta: Some(Meta {
                id: id.to_string(),
                ..Default::default()
            }),
            spec: Some(NodeSpec {
                labels: label
                    .map(|v| HashMap::from([("big".to_string(), v)]))
                    .unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        }))],
    }
}

async fn start_leader(st: &Storage) -> Raft {
    let config = raft_config("test", &RaftConfig::default()).expect("valid config");
    let raft = Raft::new(1, config, NoPeers, st.log.clone(), st.state_machine.clone())
        .await
        .expect("raft starts");
    no_peers::initialize_alone(&raft).await;
    raft
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vote_and_append_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = Storage::open(&dir.path().join("vote")).unwrap();
        let before = st.durable.syncs();
        let mut log = st.log.clone();
        log.save_vote(&Vote::new(1, 1)).await.expect("save vote");
        assert_eq!(st.durable.syncs(), before + 1, "save_vote syncs once");
    }

    let st = Storage::open(&dir.path().join("raft")).unwrap();
    let raft = start_leader(&st).await;
    let before = st.durable.syncs();
    for i in 0..WRITES {
        raft.client_write(node_cmd(&format!("n{i}"), None))
            .await
            .expect("write");
    }
    let synced = st.durable.syncs() - before;
    assert!(
        synced >= WRITES,
        "{WRITES} acknowledged writes, each its own append, but only {synced} syncs"
    );
    raft.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_entry_syncs_its_blob_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft");
    let st = Storage::open(&path).unwrap();
    let raft = start_leader(&st).await;

    let blobs_before = st.durable.blob_syncs();
    let resp = raft
        .client_write(node_cmd("big", Some("x".repeat(BIG_LABEL_BYTES))))
        .await
        .expect("write");
    assert!(resp.data.result.is_ok(), "{:?}", resp.data.result);
    let blob_files = std::fs::read_dir(path.join("blobs")).unwrap().count();
    assert!(blob_files > 0, "the entry went to a blob file");
    assert!(
        st.durable.blob_syncs() > blobs_before,
        "the append synced the blob file holding the entry"
    );
    // A synced blob is not synced again (the applied store value may still add its own
    // blob: one more sync first).
    st.durable.sync().await.expect("sync");
    let blobs_now = st.durable.blob_syncs();
    st.durable.sync().await.expect("sync");
    assert_eq!(st.durable.blob_syncs(), blobs_now);
    raft.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sync_fails_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft");
    let st = Storage::open(&path).unwrap();
    let raft = start_leader(&st).await;
    raft.client_write(node_cmd("before", None))
        .await
        .expect("write while syncs work");

    // A real I/O error in the sync path: sled's blob directory is gone (small values never
    // touch it, so sled itself still writes; only the sync can notice).
    std::fs::rename(path.join("blobs"), dir.path().join("blobs-moved")).unwrap();
    let err = st.durable.sync().await.expect_err("sync must fail");
    assert!(err.to_string().contains("blobs"), "{err}");

    let res = tokio::time::timeout(WAIT, raft.client_write(node_cmd("after", None)))
        .await
        .expect("the write returns");
    assert!(
        res.is_err(),
        "a write whose append could not be synced was acknowledged: {res:?}"
    );
    // openraft treats the storage error as fatal: the node stops.
    let m = raft.metrics().borrow().clone();
    assert!(m.running_state.is_err(), "raft keeps running: {m:?}");
}
