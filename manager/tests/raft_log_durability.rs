//! A write openraft acknowledged survives the process dying right after: a child process
//! (this test binary, re-run) writes through a one-manager Raft node on sled and aborts at
//! once, without shutdown or any flush of its own; the parent reopens the files and finds
//! every acknowledged write in the log and, once replayed, in the store.

use crate::no_peers;
use no_peers::NoPeers;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use openraft::storage::RaftLogReader;
use openraft::{EntryPayload, ServerState};
use shoal_manager::raft::{raft_config, Raft, Storage};
use shoal_manager::store::{Command, Mutation, Object};
use shoal_proto::v1::{Meta, Node, RaftConfig};

/// Where the child keeps its Raft files; set only in the child.
const CHILD_DIR_ENV: &str = "SHOAL_TEST_DURABILITY_CHILD_DIR";
/// Writes the child makes before it aborts.
const WRITES: usize = 40;
const WAIT: Duration = Duration::from_secs(10);
const TEST_NAME: &str = "raft_log_durability::acknowledged_writes_survive_abort";

fn node_id(i: usize) -> String {
    format!("durable-{i:03}")
}

fn node_cmd(i: usize) -> Command {
    Command {
        now_ms: i as i64,
        mutations: vec![Mutation::Create(Object::Node(Node {
            meta: Some(Meta {
                id: node_id(i),
                ..Default::default()
            }),
            ..Default::default()
        }))],
    }
}

async fn start(st: &Storage) -> Raft {
    let config = raft_config("test", &RaftConfig::default()).expect("valid config");
    Raft::new(1, config, NoPeers, st.log.clone(), st.state_machine.clone())
        .await
        .expect("raft starts")
}

/// The child: writes, prints each acknowledged index, then dies without cleaning up.
async fn child(dir: &str) -> ! {
    let st = Storage::open(std::path::Path::new(dir)).expect("open storage");
    let raft = start(&st).await;
    no_peers::initialize_alone(&raft).await;
    for i in 0..WRITES {
        let resp = raft.client_write(node_cmd(i)).await.expect("write");
        assert!(resp.data.result.is_ok(), "{:?}", resp.data.result);
        let mut out = std::io::stdout().lock();
        writeln!(out, "acked {i} {}", resp.log_id.index).expect("report ack");
        out.flush().expect("report ack");
    }
    // No shutdown, no destructors, no flush: what the acknowledgements promised must already
    // be on disk.
    std::process::abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_abort() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        child(&dir).await;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("raft");
    let mut proc = Process::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let out = proc.stdout.take().expect("child stdout");
    let mut acked = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.expect("read child output");
        // libtest's "test NAME ... " precedes the first line without a newline.
        if let Some(at) = line.find("acked ") {
            let mut words = line[at..].split_whitespace().skip(1);
            let i: usize = words
                .next()
                .and_then(|w| w.parse().ok())
                .expect("write number");
            let index: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .expect("log index");
            acked.push((i, index));
        }
    }
    let output = proc.wait_with_output().expect("child exit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && !stderr.contains("panicked"),
        "the child must die by abort, not exit or panic: {stderr}"
    );
    assert_eq!(acked.len(), WRITES, "the child acknowledged every write");

    // The log holds every acknowledged entry, as it was written.
    let st = Storage::open(&path).expect("reopen storage");
    let mut reader = st.log.clone();
    let entries = reader.try_get_log_entries(0..).await.expect("read log");
    let by_index: BTreeMap<u64, _> = entries.iter().map(|e| (e.log_id.index, e)).collect();
    for &(i, index) in &acked {
        let entry = by_index
            .get(&index)
            .unwrap_or_else(|| panic!("acknowledged write {i} (log index {index}) lost"));
        match &entry.payload {
            EntryPayload::Normal(cmd) => assert_eq!(cmd, &node_cmd(i), "entry {index}"),
            other => panic!("entry {index} is not write {i}: {other:?}"),
        }
    }

    // Replayed from the log on start (the state machine is not flushed per apply), the store
    // has them all.
    let raft = start(&st).await;
    raft.wait(Some(WAIT))
        .state(ServerState::Leader, "leader again")
        .await
        .expect("re-elected");
    let last = acked.last().map(|a| a.1).unwrap_or(0);
    raft.wait(Some(WAIT))
        .applied_index_at_least(Some(last), "replayed")
        .await
        .expect("acknowledged entries applied again");
    for i in 0..WRITES {
        assert!(
            st.store.get_node(&node_id(i)).expect("read").is_some(),
            "write {i} missing from the store after restart"
        );
    }
    raft.shutdown().await.expect("shutdown");
}
