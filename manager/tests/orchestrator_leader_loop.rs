//! The leader loops end to end: `run_leader` over a real one-manager Raft (sled storage)
//! proposing through `Raft::client_write`, with a simulated agent moving tasks, converging
//! after each change within a bounded wait; a restarted `run_leader` resumes from the store.

use crate::orchestrator_support;
use orchestrator_support::{ready_node, replicated_service};

use crate::no_peers;
use no_peers::NoPeers;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use shoal_manager::orchestrator::run_leader;
use shoal_manager::raft::{raft_config, Raft, Storage};
use shoal_manager::store::{Command, Kind, Mutation, Object, Store};
use shoal_proto::v1::{
    service_spec::Mode, Node, NodeState, RaftConfig, ReplicatedService, TaskState, TaskStatus,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound on every wait for convergence.
const CONVERGE: Duration = Duration::from_secs(15);
/// How often the simulated agent looks at its tasks.
const AGENT_PERIOD: Duration = Duration::from_millis(20);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn write(raft: &Raft, mutations: Vec<Mutation>) {
    let resp = raft
        .client_write(Command {
            now_ms: now_ms(),
            mutations,
        })
        .await
        .expect("raft write");
    resp.data.result.expect("store accepts");
}

/// What the workers would do: start what is assigned to a ready node, stop what is not
/// wanted. Conflicting writes are simply retried on the next pass.
fn spawn_agents(store: Store, raft: Raft) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(AGENT_PERIOD).await;
            let nodes: HashMap<String, Node> = store
                .list_nodes()
                .unwrap()
                .into_iter()
                .map(|n| (n.meta.clone().unwrap().id, n))
                .collect();
            let mut muts = Vec::new();
            for t in store.list_tasks().unwrap() {
                let ready = nodes
                    .get(&t.node_id)
                    .is_some_and(|n| n.status.as_ref().unwrap().state == NodeState::Ready as i32);
                let s = t.status.as_ref().map_or(0, |s| s.state);
                if !ready || s < TaskState::Assigned as i32 || s >= TaskState::Complete as i32 {
                    continue;
                }
                let next = if t.desired_state > TaskState::Running as i32 {
                    TaskState::Shutdown
                } else if s < TaskState::Running as i32 {
                    TaskState::Running
                } else {
                    continue;
                };
                let version = t.meta.as_ref().unwrap().version;
                let mut n = t.clone();
                n.status = Some(TaskStatus {
                    state: next as i32,
                    ..Default::default()
                });
                muts.push(Mutation::Update {
                    object: Object::Task(n),
                    expect_version: Some(version),
                });
            }
            for m in muts {
                let _ = raft
                    .client_write(Command {
                        now_ms: now_ms(),
                        mutations: vec![m],
                    })
                    .await;
            }
        }
    })
}

/// Running tasks (desired RUNNING) of a service per node.
fn running(store: &Store, service_id: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in store.tasks_by_service(service_id).unwrap() {
        if t.status.as_ref().unwrap().state == TaskState::Running as i32
            && t.desired_state == TaskState::Running as i32
        {
            *m.entry(t.node_id).or_default() += 1;
        }
    }
    m
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not converge within {CONVERGE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Leader {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<()>,
}

fn start_leader(store: &Store, raft: &Raft) -> Leader {
    let (stop, rx) = oneshot::channel::<()>();
    let fut = run_leader(store.clone(), raft.clone(), async move {
        let _ = rx.await;
    });
    let handle = tokio::spawn(async move {
        fut.await.expect("leader loops start");
    });
    Leader { stop, handle }
}

impl Leader {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .expect("run_leader ends promptly after shutdown")
            .expect("run_leader does not panic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loops_converge_services_through_raft() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(&dir.path().join("raft")).unwrap();
    let config = raft_config("test", &RaftConfig::default()).unwrap();
    let raft = Raft::new(1, config, NoPeers, st.log.clone(), st.state_machine.clone())
        .await
        .unwrap();
    no_peers::initialize_alone(&raft).await;
    let store = st.store.clone();
    let agents = spawn_agents(store.clone(), raft.clone());
    let leader = start_leader(&store, &raft);

    for n in ["n1", "n2", "n3"] {
        write(&raft, vec![Mutation::Create(Object::Node(ready_node(n)))]).await;
    }
    write(
        &raft,
        vec![Mutation::Create(Object::Service(replicated_service(
            "web", 3,
        )))],
    )
    .await;
    wait_for("3 running, one per node", || {
        running(&store, "web").values().copied().collect::<Vec<_>>() == vec![1, 1, 1]
    })
    .await;

    // Scale up.
    let mut s = store.get_service("web").unwrap().unwrap();
    s.spec.as_mut().unwrap().mode = Some(Mode::Replicated(ReplicatedService { replicas: 6 }));
    write(
        &raft,
        vec![Mutation::Update {
            object: Object::Service(s),
            expect_version: None,
        }],
    )
    .await;
    wait_for("6 running, two per node", || {
        running(&store, "web").values().copied().collect::<Vec<_>>() == vec![2, 2, 2]
    })
    .await;

    // A node goes down: its tasks come back elsewhere.
    let mut n1 = store.get_node("n1").unwrap().unwrap();
    n1.status.as_mut().unwrap().state = NodeState::Down as i32;
    write(
        &raft,
        vec![Mutation::Update {
            object: Object::Node(n1),
            expect_version: None,
        }],
    )
    .await;
    wait_for("6 running on n2 and n3", || {
        let r = running(&store, "web");
        !r.contains_key("n1") && r.values().sum::<usize>() == 6
    })
    .await;

    // Leadership lost and regained: the new loops resume from the store.
    leader.stop().await;
    write(
        &raft,
        vec![Mutation::Create(Object::Service(replicated_service(
            "api", 2,
        )))],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store.tasks_by_service("api").unwrap().is_empty(),
        "nothing orchestrates without a leader loop"
    );
    let leader = start_leader(&store, &raft);
    wait_for("api's 2 tasks running", || {
        running(&store, "api").values().sum::<usize>() == 2
    })
    .await;

    // Service removal: every task stopped and deleted.
    write(
        &raft,
        vec![Mutation::Delete {
            kind: Kind::Service,
            id: "web".into(),
            expect_version: None,
        }],
    )
    .await;
    wait_for("web's tasks deleted", || {
        // n1 is down: its stale task waits for its agent (or orphaning), the rest are gone.
        store
            .tasks_by_service("web")
            .unwrap()
            .iter()
            .all(|t| t.node_id == "n1" && t.desired_state == TaskState::Remove as i32)
    })
    .await;

    leader.stop().await;
    agents.abort();
    let _ = agents.await;
    raft.shutdown().await.unwrap();
}
