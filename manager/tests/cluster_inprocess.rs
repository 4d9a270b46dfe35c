//! In-process clusters on loopback: real daemons (sled in tempdirs, mTLS on 127.0.0.1 ports),
//! driven through their local Unix sockets as the CLI drives them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_manager::daemon::{connect_local, Daemon, DaemonConfig};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_client::DaemonClient;
use tonic::transport::Channel;

/// One node of a test cluster: its dirs survive restarts of its daemon.
struct TestNode {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    daemon: Option<Daemon>,
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Short timers so tests elect in well under a second; `snapshot_interval` small to exercise
/// snapshot catch-up.
fn timers(snapshot_interval: u64) -> pb::RaftConfig {
    pb::RaftConfig {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        snapshot_interval,
        keep_old_entries: 2,
    }
}

impl TestNode {
    async fn start(name: &str, snapshot_interval: u64) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let mut n = TestNode {
            dir,
            addr: free_port(),
            daemon: None,
        };
        n.boot(name, snapshot_interval).await;
        n
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("shoal.sock")
    }

    async fn boot(&mut self, name: &str, snapshot_interval: u64) {
        let mut cfg = DaemonConfig::new(self.dir.path().join("data"), self.addr, self.socket());
        cfg.hostname = Some(name.to_string());
        cfg.raft_timers = Some(timers(snapshot_interval));
        self.daemon = Some(Daemon::start(cfg).await.unwrap());
    }

    async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }

    async fn channel(&self) -> Channel {
        connect_local(&self.socket()).await.unwrap()
    }

    async fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel().await)
    }

    async fn local(&self) -> DaemonClient<Channel> {
        DaemonClient::new(self.channel().await)
    }

    async fn init(&self) -> pb::InitResponse {
        self.local()
            .await
            .init(pb::InitRequest {
                advertise_addr: self.addr.to_string(),
                cluster_name: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn join(&self, token: &str, via: &TestNode) -> Result<pb::JoinResponse, tonic::Status> {
        self.local()
            .await
            .join(pb::JoinRequest {
                token: token.to_string(),
                manager_addr: via.addr.to_string(),
                advertise_addr: self.addr.to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }

    fn raft_id(&self) -> u64 {
        self.daemon
            .as_ref()
            .and_then(|d| d.control())
            .map(|c| c.raft_id())
            .unwrap_or(0)
    }

    fn is_leader(&self) -> bool {
        self.daemon
            .as_ref()
            .and_then(|d| d.control())
            .is_some_and(|c| c.raft().metrics().borrow().current_leader == Some(c.raft_id()))
    }

    fn service_count_local(&self) -> usize {
        self.daemon
            .as_ref()
            .and_then(|d| d.control())
            .map(|c| c.store().list_services().unwrap().len())
            .unwrap_or(0)
    }
}

fn spec(name: &str, replicas: u64) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.to_string(),
        task: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: "busybox:1.36".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(pb::service_spec::Mode::Replicated(pb::ReplicatedService {
            replicas,
        })),
        ..Default::default()
    }
}

async fn create(node: &TestNode, name: &str) -> Result<pb::Service, tonic::Status> {
    node.control()
        .await
        .create_service(pb::CreateServiceRequest {
            spec: Some(spec(name, 1)),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().service.unwrap())
}

/// Retries a create while the cluster is electing (the first attempts may find no leader).
async fn create_eventually(node: &TestNode, name: &str) -> pb::Service {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match create(node, name).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline && e.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("create {name}: {e}"),
        }
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn three_managers(snapshot_interval: u64) -> Vec<TestNode> {
    let a = TestNode::start("m1", snapshot_interval).await;
    let init = a.init().await;
    let b = TestNode::start("m2", snapshot_interval).await;
    b.join(&init.manager_token, &a).await.unwrap();
    let c = TestNode::start("m3", snapshot_interval).await;
    // Through a follower: the join is forwarded to the leader.
    c.join(&init.manager_token, &b).await.unwrap();
    vec![a, b, c]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_manager_serves_services_and_survives_a_restart() {
    let mut a = TestNode::start("solo", 10_000).await;
    let init = a.init().await;
    assert!(init.worker_token.starts_with("SHOAL-1-"));
    assert_ne!(init.worker_token, init.manager_token);
    assert!(a.is_leader());
    let m = a
        .daemon
        .as_ref()
        .unwrap()
        .membership()
        .borrow()
        .clone()
        .unwrap();
    assert_eq!(
        (m.role.as_str(), m.managers.clone()),
        ("manager", vec![a.addr.to_string()])
    );

    let web = create(&a, "web").await.unwrap();
    let dup = create(&a, "web").await.unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup}");
    let bad = create(&a, "-bad").await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("invalid service name"), "{bad}");

    let mut c = a.control().await;
    let v = web.meta.as_ref().unwrap().version;
    let updated = c
        .update_service(pb::UpdateServiceRequest {
            service: "web".into(),
            version: v,
            spec: Some(spec("web", 3)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .service
        .unwrap();
    assert!(updated.meta.as_ref().unwrap().version > v);
    let stale = c
        .update_service(pb::UpdateServiceRequest {
            service: "web".into(),
            version: v,
            spec: Some(spec("web", 4)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale}");

    let nodes = c
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    let ms = nodes[0].manager_status.as_ref().unwrap();
    assert!(ms.leader && ms.reachable);

    // A second init is refused.
    let again = a
        .local()
        .await
        .init(pb::InitRequest {
            advertise_addr: a.addr.to_string(),
            cluster_name: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);

    a.stop().await;
    a.boot("solo", 10_000).await;
    wait_for("leader after restart", || a.is_leader()).await;
    let got = a
        .control()
        .await
        .get_service(pb::GetServiceRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .service
        .unwrap();
    assert_eq!(got.meta.unwrap().id, web.meta.unwrap().id);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_replicate_fail_over_and_restart_without_loss() {
    let mut nodes = three_managers(10_000).await;
    let leader = nodes.iter().position(|n| n.is_leader()).expect("a leader");
    // Writes through a follower are forwarded to the leader.
    let follower = (leader + 1) % 3;
    create(&nodes[follower], "via-follower").await.unwrap();
    for i in 0..5 {
        create(&nodes[i % 3], &format!("svc{i}")).await.unwrap();
    }
    wait_for("replication to all", || {
        nodes.iter().all(|n| n.service_count_local() == 6)
    })
    .await;

    let listed = nodes[follower]
        .control()
        .await
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 3);
    assert_eq!(
        listed
            .nodes
            .iter()
            .filter(|n| n.manager_status.as_ref().is_some_and(|m| m.leader))
            .count(),
        1
    );
    assert!(listed
        .nodes
        .iter()
        .all(|n| n.manager_status.as_ref().is_some_and(|m| m.reachable)));

    // Kill the leader: the other two elect a new one and writes resume through them.
    let old_leader_raft = nodes[leader].raft_id();
    nodes[leader].stop().await;
    let rest: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    wait_for("a new leader", || {
        rest.iter().any(|i| nodes[*i].is_leader())
    })
    .await;
    create_eventually(&nodes[rest[0]], "after-failover-1").await;
    create_eventually(&nodes[rest[1]], "after-failover-2").await;
    let listed = nodes[rest[0]]
        .control()
        .await
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let old = listed
        .nodes
        .iter()
        .find(|n| {
            n.manager_status
                .as_ref()
                .is_some_and(|m| m.raft_id == old_leader_raft)
        })
        .unwrap();
    assert!(
        !old.manager_status.as_ref().unwrap().reachable,
        "a stopped manager shows unreachable"
    );

    // Full restart of every manager: no acknowledged write is lost.
    for n in nodes.iter_mut() {
        n.stop().await;
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        n.boot(&format!("m{}", i + 1), 10_000).await;
    }
    wait_for("a leader after full restart", || {
        nodes.iter().any(|n| n.is_leader())
    })
    .await;
    let all = nodes[0]
        .control()
        .await
        .list_services(pb::ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<String> = all
        .services
        .iter()
        .map(|s| {
            s.service
                .as_ref()
                .unwrap()
                .spec
                .as_ref()
                .unwrap()
                .name
                .clone()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "after-failover-1",
            "after-failover-2",
            "svc0",
            "svc1",
            "svc2",
            "svc3",
            "svc4",
            "via-follower"
        ]
    );
    for n in nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_manager_catches_up_by_snapshot() {
    let a = TestNode::start("m1", 5).await;
    let init = a.init().await;
    for i in 0..30 {
        create(&a, &format!("s{i}")).await.unwrap();
    }
    let api = a.daemon.as_ref().unwrap().control().unwrap();
    wait_for("a snapshot and a purged log", || {
        let m = api.raft().metrics().borrow().clone();
        m.snapshot.is_some() && m.purged.is_some()
    })
    .await;
    let b = TestNode::start("m2", 5).await;
    b.join(&init.manager_token, &a).await.unwrap();
    wait_for("the late manager has every service", || {
        b.service_count_local() == 30
    })
    .await;
    let bm = b
        .daemon
        .as_ref()
        .unwrap()
        .control()
        .unwrap()
        .raft()
        .metrics()
        .borrow()
        .clone();
    assert!(
        bm.snapshot.is_some(),
        "the late manager installed a snapshot"
    );
    let (voters, _) = api.membership();
    assert!(voters.contains(&b.raft_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_and_remove_keep_quorum() {
    let mut nodes = three_managers(10_000).await;
    let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (x, y) = (others[0], others[1]);
    let y_id = nodes[y]
        .daemon
        .as_ref()
        .unwrap()
        .control()
        .unwrap()
        .node_id()
        .to_string();
    let x_id = nodes[x]
        .daemon
        .as_ref()
        .unwrap()
        .control()
        .unwrap()
        .node_id()
        .to_string();

    // A manager cannot be removed before it is demoted.
    let mut c = nodes[leader].control().await;
    let e = c
        .remove_node(pb::RemoveNodeRequest {
            node: y_id.clone(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("demote"), "{e}");

    // With y down, demoting x would leave the leader and an unreachable y: no quorum.
    nodes[y].stop().await;
    let e = c
        .demote_node(pb::DemoteNodeRequest { node: x_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("quorum"), "{e}");

    // Demoting the stopped y is allowed: leader and x remain, both reachable.
    let demoted = c
        .demote_node(pb::DemoteNodeRequest { node: y_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert_eq!(demoted.role, pb::NodeRole::Worker as i32);
    let (voters, _) = nodes[leader]
        .daemon
        .as_ref()
        .unwrap()
        .control()
        .unwrap()
        .membership();
    assert_eq!(voters.len(), 2);
    // Now y is a worker (and stopped): it can be removed.
    c.remove_node(pb::RemoveNodeRequest {
        node: y_id.clone(),
        force: true,
    })
    .await
    .unwrap();
    let left = c
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(left.len(), 2);

    // The last manager standing with one other can still be demoted down to one...
    c.demote_node(pb::DemoteNodeRequest { node: x_id.clone() })
        .await
        .unwrap();
    // The running x learns of its demotion and turns into a worker by itself.
    let xd = nodes[x].daemon.as_ref().unwrap();
    wait_for("x to run as a worker", || xd.control().is_none()).await;
    let info = nodes[x]
        .local()
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state, pb::LocalNodeState::Worker as i32);
    let m = xd.membership().borrow().clone().expect("still a member");
    assert_eq!(m.role, "worker");
    assert_eq!(m.node_id, x_id);
    // ...but the very last one never.
    let me = nodes[leader]
        .daemon
        .as_ref()
        .unwrap()
        .control()
        .unwrap()
        .node_id()
        .to_string();
    let e = c
        .demote_node(pb::DemoteNodeRequest { node: me })
        .await
        .unwrap_err();
    assert!(e.message().contains("last manager"), "{e}");
    create(&nodes[leader], "still-writable").await.unwrap();
    for n in nodes.iter_mut() {
        n.stop().await;
    }
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_holding(&p, needle)),
            Ok(t)
                if t.is_file()
                    && std::fs::read(&p)
                        .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) =>
            {
                out.push(p.display().to_string())
            }
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_ciphertext_in_the_log_the_store_and_snapshots() {
    use shoal_manager::secrets::{Keyring, DEK_FILE, KEK_FILE};
    use std::os::unix::fs::PermissionsExt;
    let a = TestNode::start("m1", 5).await;
    let init = a.init().await;
    let plain = b"in-process secret value 7f3a9c0e5d1b44a2".to_vec();
    let created = a
        .control()
        .await
        .create_secret(pb::CreateSecretRequest {
            spec: Some(pb::SecretSpec {
                name: "db".into(),
                data: plain.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap();
    assert!(
        created.spec.as_ref().unwrap().data.is_empty(),
        "never answered with"
    );
    let id = created.meta.unwrap().id;
    let got = a
        .control()
        .await
        .get_secret(pb::GetSecretRequest {
            secret: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.secret.unwrap().spec.unwrap().data.is_empty());
    // Enough entries for a snapshot and a purged log: the late manager gets the secret by
    // snapshot.
    for i in 0..30 {
        create(&a, &format!("s{i}")).await.unwrap();
    }
    let api = a.daemon.as_ref().unwrap().control().unwrap();
    wait_for("a snapshot and a purged log", || {
        let m = api.raft().metrics().borrow().clone();
        m.snapshot.is_some() && m.purged.is_some()
    })
    .await;
    let b = TestNode::start("m2", 5).await;
    b.join(&init.manager_token, &a).await.unwrap();
    let b_api = b.daemon.as_ref().unwrap().control().unwrap();
    wait_for("the late manager has the secret", || {
        b_api.store().get_secret(&id).ok().flatten().is_some()
    })
    .await;
    assert!(b_api.raft().metrics().borrow().snapshot.is_some());
    for (n, api) in [(&a, &api), (&b, &b_api)] {
        let stored = api
            .store()
            .get_secret(&id)
            .unwrap()
            .unwrap()
            .spec
            .unwrap()
            .data;
        assert!(!stored.windows(plain.len()).any(|w| w == plain.as_slice()));
        // The manager that joined received the data key: both open it.
        let keys = api.secrets().expect("a manager holds the secrets key");
        assert_eq!(keys.open(&id, &stored).unwrap(), plain);
        assert!(Keyring::generate().unwrap().open(&id, &stored).is_err());
        // On disk (Raft log, snapshot, store) only ciphertext; the object itself is there.
        let data = n.dir.path().join("data");
        assert!(!files_holding(&data, id.as_bytes()).is_empty());
        let found = files_holding(&data, &plain);
        assert!(found.is_empty(), "plaintext on disk: {found:?}");
        let pki = data.join("pki");
        for f in [KEK_FILE, DEK_FILE] {
            let mode = std::fs::metadata(pki.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert!(
            files_holding(&data, keys.raw()).is_empty(),
            "the data key unwrapped"
        );
    }
    // Each manager wraps the one data key with a key-encryption key of its own.
    let kek = |n: &TestNode| std::fs::read(n.dir.path().join("data/pki").join(KEK_FILE)).unwrap();
    assert_ne!(kek(&a), kek(&b));
}

/// Waits (bounded) until every node's store holds `n` services.
async fn replicated_services(nodes: &[TestNode], n: usize) {
    wait_for(&format!("{n} services on every manager"), || {
        nodes.iter().all(|m| m.service_count_local() == n)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_too_large_for_the_transport_is_refused_and_the_log_keeps_committing() {
    use shoal_manager::raft::{propose, ProposeRefused, MAX_ENTRY_BYTES};
    use shoal_manager::store::{Command, Mutation, Object};
    let nodes = three_managers(10_000).await;
    let leader = nodes.iter().position(|n| n.is_leader()).expect("a leader");
    create(&nodes[leader], "before").await.unwrap();
    let api = nodes[leader].daemon.as_ref().unwrap().control().unwrap();
    // A config of 17 MiB, past the control API's checks: no AppendEntries could carry it
    // (16 MiB), so once in the log it would never commit and nothing after it would.
    let huge = |bytes: usize| Command {
        now_ms: 1,
        mutations: vec![Mutation::Create(Object::Config(pb::Config {
            meta: Some(pb::Meta {
                id: "huge".into(),
                ..Default::default()
            }),
            spec: Some(pb::ConfigSpec {
                name: "huge".into(),
                data: vec![7; bytes],
                ..Default::default()
            }),
        }))],
    };
    for bytes in [17 << 20, MAX_ENTRY_BYTES] {
        let refused =
            tokio::time::timeout(Duration::from_secs(10), propose(api.raft(), huge(bytes)))
                .await
                .expect("an oversize proposal is answered at once, not left uncommitted");
        match refused {
            Err(e @ ProposeRefused::TooLarge { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("a Raft entry holds at most"), "{msg}");
            }
            other => panic!("a {bytes}-byte entry: {other:?}"),
        }
    }
    // The log goes on: a write commits on every manager.
    create(&nodes[leader], "after").await.unwrap();
    replicated_services(&nodes, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_are_refused_or_grouped_within_the_entry_bound() {
    use shoal_manager::controlapi::validate::{MAX_LABELS_BYTES, MAX_SERVICE_SPEC_BYTES};
    let nodes = three_managers(10_000).await;
    let leader = nodes.iter().position(|n| n.is_leader()).expect("a leader");
    let follower = (leader + 1) % 3;
    let sized = |name: &str, bytes: usize| {
        let mut s = spec(name, 0);
        s.task.as_mut().unwrap().container.as_mut().unwrap().env =
            vec![format!("BLOB={}", "x".repeat(bytes))];
        s
    };

    // A service spec over the bound: one clear line, nothing written (through a follower too).
    for via in [leader, follower] {
        let e = nodes[via]
            .control()
            .await
            .create_service(pb::CreateServiceRequest {
                spec: Some(sized("big", MAX_SERVICE_SPEC_BYTES)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("service spec is"), "{e}");
        assert!(!e.message().contains('\n'), "{e}");
    }
    // Node labels over the bound, too.
    let mut labels = std::collections::HashMap::new();
    for i in 0..MAX_LABELS_BYTES / 4000 + 1 {
        labels.insert(format!("k{i}"), "v".repeat(4000));
    }
    let e = nodes[leader]
        .control()
        .await
        .update_node(pb::UpdateNodeRequest {
            node: "self".into(),
            label_add: labels,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("node labels hold"), "{e}");

    // Concurrent creates of specs near the bound: the group commit would put them in one
    // entry of several MiB; each entry stays within the bound and every create succeeds.
    let n = 12;
    let mut calls = Vec::new();
    for i in 0..n {
        let mut c = nodes[leader].control().await;
        let s = sized(&format!("large{i}"), MAX_SERVICE_SPEC_BYTES - 1024);
        calls.push(tokio::spawn(async move {
            c.create_service(pb::CreateServiceRequest {
                spec: Some(s),
                ..Default::default()
            })
            .await
        }));
    }
    for call in calls {
        call.await.unwrap().expect("a large create");
    }
    create(&nodes[follower], "after").await.unwrap();
    replicated_services(&nodes, n + 1).await;
}
