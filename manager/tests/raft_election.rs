//! The election driver (raft/elect.rs) in real in-process managers on loopback with the
//! default timers: openraft's own election timer is off in them, so every election here is
//! the driver's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_manager::daemon::{connect_local, Daemon, DaemonConfig};
use shoal_manager::raft::Raft;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_client::DaemonClient;

/// A failover with the default timers (lease 400 ms + up to 200 ms) takes well under a
/// second; the bound leaves room for a loaded CI machine, while no election at all (the
/// driver not running) fails it.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);
/// Restarting every manager: each waits a lease from its start before electing.
const RESTART_BOUND: Duration = Duration::from_secs(10);

struct TestNode {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    daemon: Option<Daemon>,
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl TestNode {
    async fn start(name: &str) -> TestNode {
        let mut n = TestNode {
            dir: tempfile::tempdir().unwrap(),
            addr: free_port(),
            daemon: None,
        };
        n.boot(name).await;
        n
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("shoal.sock")
    }

    /// Starts the daemon with the default Raft timers (`raft_timers: None`).
    async fn boot(&mut self, name: &str) {
        let mut cfg = DaemonConfig::new(self.dir.path().join("data"), self.addr, self.socket());
        cfg.hostname = Some(name.to_string());
        self.daemon = Some(Daemon::start(cfg).await.unwrap());
    }

    async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }

    async fn local(&self) -> DaemonClient<tonic::transport::Channel> {
        DaemonClient::new(connect_local(&self.socket()).await.unwrap())
    }

    async fn control(&self) -> ControlClient<tonic::transport::Channel> {
        ControlClient::new(connect_local(&self.socket()).await.unwrap())
    }

    fn raft(&self) -> Option<Raft> {
        self.daemon
            .as_ref()
            .and_then(|d| d.control())
            .map(|c| c.raft().clone())
    }

    fn is_leader(&self) -> bool {
        self.raft().is_some_and(|r| {
            let m = r.metrics().borrow().clone();
            m.state == openraft::ServerState::Leader && m.current_leader == Some(m.id)
        })
    }

    fn term(&self) -> u64 {
        self.raft()
            .map(|r| r.metrics().borrow().current_term)
            .unwrap_or(0)
    }
}

async fn three_managers() -> Vec<TestNode> {
    let a = TestNode::start("e1").await;
    let init = a
        .local()
        .await
        .init(pb::InitRequest {
            advertise_addr: a.addr.to_string(),
            cluster_name: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut nodes = vec![a];
    for name in ["e2", "e3"] {
        let n = TestNode::start(name).await;
        n.local()
            .await
            .join(pb::JoinRequest {
                token: init.manager_token.clone(),
                manager_addr: nodes[0].addr.to_string(),
                advertise_addr: n.addr.to_string(),
            })
            .await
            .unwrap();
        nodes.push(n);
    }
    nodes
}

/// Waits up to `bound` for one of `among` to lead; its index and how long it took.
async fn wait_leader(nodes: &[TestNode], among: &[usize], bound: Duration) -> (usize, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(i) = among.iter().copied().find(|i| nodes[*i].is_leader()) {
            return (i, t0.elapsed());
        }
        assert!(
            t0.elapsed() < bound,
            "no leader among {among:?} within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn create(node: &TestNode, name: &str) -> Result<(), tonic::Status> {
    node.control()
        .await
        .create_service(pb::CreateServiceRequest {
            spec: Some(pb::ServiceSpec {
                name: name.to_string(),
                task: Some(pb::TaskSpec {
                    container: Some(pb::ContainerSpec {
                        image: "busybox:1.36".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                mode: Some(pb::service_spec::Mode::Replicated(pb::ReplicatedService {
                    replicas: 1,
                })),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_elects_after_a_leader_dies_and_after_a_full_restart() {
    let mut nodes = three_managers().await;
    let (leader, _) = wait_leader(&nodes, &[0, 1, 2], RESTART_BOUND).await;
    create(&nodes[leader], "before").await.unwrap();
    let old_term = nodes[leader].term();

    // Stop the leader's Raft first, as a kill does: its heartbeats stop at once (the daemon's
    // own shutdown first drains its local socket server, which would blur the timing).
    let dead = nodes[leader].raft().unwrap();
    let rest: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    dead.shutdown().await.unwrap();
    let (new_leader, took) = wait_leader(&nodes, &rest, FAILOVER_BOUND).await;
    eprintln!("failover: new leader after {took:?}");
    assert!(nodes[new_leader].term() > old_term);
    nodes[leader].stop().await;
    create(&nodes[new_leader], "after-failover").await.unwrap();

    // The old leader comes back as a follower of the new term.
    nodes[leader].boot(["e1", "e2", "e3"][leader]).await;
    let t0 = Instant::now();
    while nodes[leader]
        .raft()
        .unwrap()
        .metrics()
        .borrow()
        .current_leader
        != nodes[new_leader].raft().map(|r| r.metrics().borrow().id)
    {
        assert!(
            t0.elapsed() < RESTART_BOUND,
            "the old leader did not rejoin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(nodes[new_leader].is_leader());

    // Everyone stops; the two followers come back first. A restarted leader would resume
    // leading from its own stored vote (openraft), so this is the case the driver must solve:
    // nobody has heard a leader since it started.
    for n in nodes.iter_mut() {
        n.stop().await;
    }
    let followers: Vec<usize> = (0..3).filter(|i| *i != new_leader).collect();
    for i in &followers {
        nodes[*i].boot(["e1", "e2", "e3"][*i]).await;
    }
    let (after, took) = wait_leader(&nodes, &followers, RESTART_BOUND).await;
    eprintln!("restart without the leader: leader after {took:?}");
    create(&nodes[after], "after-restart").await.unwrap();
    nodes[new_leader].boot(["e1", "e2", "e3"][new_leader]).await;
    let t0 = Instant::now();
    while nodes[new_leader]
        .raft()
        .unwrap()
        .metrics()
        .borrow()
        .current_leader
        != nodes[after].raft().map(|r| r.metrics().borrow().id)
    {
        assert!(
            t0.elapsed() < RESTART_BOUND,
            "the last manager did not rejoin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_manager_leads_at_init_and_after_a_restart() {
    let mut a = TestNode::start("solo").await;
    a.local()
        .await
        .init(pb::InitRequest {
            advertise_addr: a.addr.to_string(),
            cluster_name: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(a.is_leader(), "init returns once this manager leads");
    a.stop().await;
    a.boot("solo").await;
    // The only voter need not wait out a lease (openraft also restores a leader's own vote).
    let (_, took) = wait_leader(std::slice::from_ref(&a), &[0], Duration::from_secs(2)).await;
    eprintln!("single manager restart: leader after {took:?}");
    create(&a, "solo-svc").await.unwrap();
    a.stop().await;
}
