//! The Raft transport over real mTLS on 127.0.0.1: real openraft nodes electing and
//! replicating through it, and how transport failures reach openraft.

use crate::tls_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::{BasicNode, EntryPayload, LogId, Vote};
use shoal_manager::ca::{Role, RootCa};
use shoal_manager::raft::network::{Network, MAX_RAFT_MESSAGE_BYTES};
use shoal_manager::raft::typ::rpc::{AppendEntriesRequest, VoteRequest};
use shoal_manager::raft::typ::Entry;
use shoal_manager::store::{Command, Mutation, Object, StoreError};
use shoal_proto::v1::{Meta, Service, ServiceSpec};
use tls_support::{manager_tls, node_tls, raft_node, serve, Manager, MemBackend};

/// Label size of the "big" service replicated in the round trip.
const BIG: usize = 128 * 1024;

fn service(id: &str, name: &str, label_bytes: usize) -> Service {
    let mut spec = ServiceSpec {
        name: name.to_string(),
        ..Default::default()
    };
    if label_bytes > 0 {
        spec.labels.insert("blob".into(), "x".repeat(label_bytes));
    }
    Service {
        meta: Some(Meta {
            id: id.to_string(),
            ..Default::default()
        }),
        spec: Some(spec),
        ..Default::default()
    }
}

fn create_service(id: &str, name: &str, label_bytes: usize) -> Command {
    Command {
        now_ms: 1,
        mutations: vec![Mutation::Create(Object::Service(service(
            id,
            name,
            label_bytes,
        )))],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_elect_and_replicate_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(RootCa::create("cluster-raft").unwrap());
    let backend = Arc::new(MemBackend::new(&ca));
    let mut nodes = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let tls = manager_tls(&ca, &format!("manager-{id}"), Duration::from_secs(3600));
        let (raft, store) = raft_node(id, dir.path(), &tls).await;
        let (addr, server) = serve(&tls, ca.clone(), backend.clone(), raft.clone()).await;
        members.insert(id, BasicNode::new(&addr));
        nodes.push((raft, store, server));
    }
    nodes[0].0.initialize(members).await.unwrap();

    // Electing needs a vote from a peer: the Vote RPC went through mTLS both ways.
    let metrics = nodes[0]
        .0
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    assert!(metrics.current_leader.is_some());
    let rafts: Vec<_> = nodes.iter().map(|n| n.0.clone()).collect();

    write(&rafts, create_service("svc-1", "web", 0)).await;
    // A second write of a sizeable entry (well over the 64 KiB HTTP/2 default window).
    // Not larger: openraft gives an append one heartbeat interval (100 ms), and a debug
    // build on a loaded CI machine spends most of that encoding a large command.
    write(&rafts, create_service("svc-2", "big", BIG)).await;

    // Every node applies both, through AppendEntries over mTLS.
    for (_, store, _) in &nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.get_service("big").unwrap().is_none() {
            assert!(Instant::now() < deadline, "not replicated in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let web = store
            .get_service("web")
            .unwrap()
            .expect("replicated service");
        assert_eq!(web.meta.unwrap().id, "svc-1");
        let big = store.get_service("big").unwrap().unwrap();
        assert_eq!(big.spec.unwrap().labels["blob"].len(), BIG);
    }
    for (raft, _, server) in nodes {
        raft.shutdown().await.unwrap();
        server.abort();
    }
}

/// Writes through whichever node leads now, following leadership changes (a slow first
/// connection on a loaded machine can cost the first leader its term). A write whose answer
/// was lost may have been applied: its retry then finds the object already there.
async fn write(rafts: &[shoal_manager::raft::Raft], cmd: Command) {
    let mut target = 0usize;
    let mut unanswered = false;
    for _ in 0..50 {
        let attempt = rafts[target].client_write(cmd.clone());
        let Ok(r) = tokio::time::timeout(Duration::from_secs(5), attempt).await else {
            unanswered = true;
            continue;
        };
        match r {
            Ok(resp) => {
                match resp.data.result {
                    Ok(_) => {}
                    Err(StoreError::AlreadyExists { .. }) if unanswered => {}
                    Err(e) => panic!("write refused: {e}"),
                }
                return;
            }
            Err(e) => {
                if let Some(leader) = e.forward_to_leader().and_then(|f| f.leader_id) {
                    target = (leader - 1) as usize;
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("no leader accepted the write");
}

fn vote_request() -> VoteRequest {
    VoteRequest::new(Vote::new(1, 9), None)
}

fn entry(index: u64, label_bytes: usize) -> Entry {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 9), index),
        payload: EntryPayload::Normal(create_service(
            &format!("s{index}"),
            &format!("n{index}"),
            label_bytes,
        )),
    }
}

fn append(entries: Vec<Entry>) -> AppendEntriesRequest {
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 9),
        prev_log_id: None,
        entries,
        leader_commit: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_outcomes_reach_openraft_as_the_right_errors() {
    let m = Manager::start().await;
    let me = node_tls(&m.ca, "manager-9", Role::Manager, Duration::from_secs(600));
    let mut network = Network::new(9, me.clone());
    let option = RPCOption::new(Duration::from_secs(2));

    // A real answer from the peer's Raft node.
    let mut peer = network.new_client(1, &BasicNode::new(&m.addr)).await;
    let vote = peer.vote(vote_request(), option.clone()).await.unwrap();
    assert!(vote.vote_granted, "{vote:?}");

    // Larger than the limit with several entries: openraft is told to send fewer.
    let half = MAX_RAFT_MESSAGE_BYTES / 2 + 1024;
    let err = peer
        .append_entries(append(vec![entry(1, half), entry(2, half)]), option.clone())
        .await
        .unwrap_err();
    match err {
        RPCError::PayloadTooLarge(p) => assert_eq!(p.entries_hint(), 1),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // One entry over the limit can never be sent: the peer is reported unreachable.
    let err = peer
        .append_entries(
            append(vec![entry(1, MAX_RAFT_MESSAGE_BYTES)]),
            option.clone(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    // The connection is fine afterwards.
    peer.vote(vote_request(), option.clone()).await.unwrap();

    // Nothing listening: unreachable, quickly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut gone = network.new_client(2, &BasicNode::new(&closed_addr)).await;
    let started = Instant::now();
    let err = gone.vote(vote_request(), option.clone()).await.unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // An address that does not parse: unreachable, not a panic.
    let mut bad = network.new_client(3, &BasicNode::new("no port here")).await;
    let err = bad.vote(vote_request(), option.clone()).await.unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

    // A peer that accepts TCP and then says nothing: the RPC deadline ends it as a timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut mute = network.new_client(4, &BasicNode::new(&silent_addr)).await;
    let err = mute
        .vote(vote_request(), RPCOption::new(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");
    // An append of several entries that times out: openraft is told to send half as many.
    // (A fresh network each time: the cached channel's handshake would time out as a connect
    // error, an Unreachable, once its own 200 ms have passed.)
    let mut mute = Network::new(9, me.clone())
        .new_client(4, &BasicNode::new(&silent_addr))
        .await;
    let err = mute
        .append_entries(
            append((1..=6).map(|i| entry(i, 0)).collect()),
            RPCOption::new(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    match err {
        RPCError::PayloadTooLarge(p) => assert_eq!(p.entries_hint(), 3),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // One entry that times out is a timeout.
    let mut mute = Network::new(9, me.clone())
        .new_client(4, &BasicNode::new(&silent_addr))
        .await;
    let err = mute
        .append_entries(
            append(vec![entry(1, 0)]),
            RPCOption::new(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");
    hold.abort();

    // A worker's certificate: the peer refuses it, openraft backs off.
    let worker = node_tls(&m.ca, "worker-1", Role::Worker, Duration::from_secs(600));
    let mut as_worker = Network::new(10, worker)
        .new_client(1, &BasicNode::new(&m.addr))
        .await;
    let err = as_worker
        .vote(vote_request(), option.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    assert!(err.to_string().contains("worker"), "{err}");

    // A removed manager: refused the same way.
    m.backend.remove("manager-9");
    let err = peer.vote(vote_request(), option).await.unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    assert!(err.to_string().contains("removed"), "{err}");
}

/// The leader's beacon (`LeaderPing`) keeps a follower's elections off only when it comes from
/// a leader of a later term or from the leader the follower knows for its term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_beacon_counts_only_from_a_leader_the_node_can_follow() {
    use shoal_manager::raft::elect::LeaderContact;
    use shoal_manager::raft::network::RaftService;
    use shoal_manager::tls::{grpc_server, tls_incoming, Authorizer};

    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(RootCa::create("cluster-beacon").unwrap());
    let backend = Arc::new(MemBackend::new(&ca));
    // Node 3, never initialized: term 0, no leader known.
    let tls = manager_tls(&ca, "manager-3", Duration::from_secs(3600));
    let (raft, _store) = raft_node(3, dir.path(), &tls).await;
    let contact = LeaderContact::new();
    let authorizer = Authorizer::new(ca.cluster_id(), backend.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tls_incoming(listener, tls.server_config().unwrap());
    let router = grpc_server().add_service(
        RaftService::new(raft.clone(), authorizer)
            .with_contact(contact.clone())
            .into_server(),
    );
    let server = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });

    let leader_tls = manager_tls(&ca, "manager-1", Duration::from_secs(3600));
    let net = Network::new(1, leader_tls);
    let ttl = Duration::from_secs(5);
    let before = contact.last();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Same term (0) from a leader the node does not know: not contact.
    assert_eq!(net.ping_leadership(&addr, 0, ttl).await.unwrap(), 0);
    assert_eq!(
        contact.last(),
        before,
        "a beacon from an unknown leader counted"
    );
    // A later term: a leader the node has not heard of yet.
    assert_eq!(net.ping_leadership(&addr, 4, ttl).await.unwrap(), 0);
    assert!(
        contact.last() > before,
        "a beacon of a later term did not count"
    );

    // A worker's certificate is refused, like every Raft RPC.
    let worker = node_tls(&ca, "worker-1", Role::Worker, Duration::from_secs(3600));
    let err = Network::new(2, worker)
        .ping_leadership(&addr, 9, ttl)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("PermissionDenied") || err.to_string().contains("manager"),
        "{err}"
    );

    raft.shutdown().await.unwrap();
    server.abort();
}
