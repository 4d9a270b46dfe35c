//! Property tests ("fuzz targets" on stable Rust) for every request the control API, the
//! daemon's local API, the CA and the dispatcher accept:
//! - raw bytes decoded as each request type never panic; messages generated from the protos
//!   (odd strings, huge and negative numbers, unknown enum values, missing fields, long
//!   repeated fields and maps) always decode;
//! - `validate::service_spec` / `cluster_spec` never panic, and what they accept is safe for
//!   the code downstream (timers in range, so deadline arithmetic cannot overflow);
//! - whole requests against a real one-manager cluster (sled, Raft, Unix socket) answer with a
//!   response or a Status, never a dropped connection, and leave only valid objects behind;
//! - whole dispatcher requests (sessions, heartbeats, status batches) from a node with a real
//!   certificate answer likewise, and the store keeps only forward, known task states.
//!
//! Cases per target: the constants below, or `PROPTEST_CASES` for a longer local run
//! (`PROPTEST_CASES=2000 cargo nextest run -p shoal-manager -E 'test(/^grpc_fuzz::/)'`).

use crate::dispatcher_support;
use crate::fuzz_support;

use std::time::Duration;

use fuzz_support::{cases, message, schema, Schema, Tape};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use shoal_manager::controlapi::validate;
use shoal_manager::daemon::{connect_local, Daemon, DaemonConfig};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_client::DaemonClient;
use tonic::Code;

/// Cases for the pure targets (validate, Raft payloads): cheap, so many.
const PURE_CASES: u32 = 2_000;
/// Cases for the decode target: each decodes every request type several ways.
const DECODE_CASES: u32 = 600;
/// Whole requests sent to the one-manager cluster in CI (each is a Raft write or read).
const CONTROL_CASES: u32 = 60;
/// Whole dispatcher requests in CI.
const DISPATCHER_CASES: u32 = 60;
/// How long one request may take before it counts as a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the fuzzer waits on a `JoinManager` before dropping the call.
const JOIN_WAIT: Duration = Duration::from_millis(1500);
/// Longest choice tape: bounds the size of one generated message.
const MAX_TAPE: usize = 400;

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        max_shrink_iters: 512,
        failure_persistence: None,
        ..Config::default()
    })
}

fn tape() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(any::<u32>(), 0..MAX_TAPE)
}

/// Decodes `bytes` as the request type `name`; `Some(ok)` if `name` is a request type.
fn decode_as(name: &str, bytes: &[u8]) -> Option<bool> {
    macro_rules! by_name {
        ($($t:ident),* $(,)?) => {
            match name {
                $(stringify!($t) => Some(pb::$t::decode(bytes).is_ok()),)*
                _ => None,
            }
        };
    }
    by_name!(
        // Control
        CreateServiceRequest,
        GetServiceRequest,
        ListServicesRequest,
        UpdateServiceRequest,
        RemoveServiceRequest,
        ListTasksRequest,
        ListNodesRequest,
        GetNodeRequest,
        UpdateNodeRequest,
        PromoteNodeRequest,
        DemoteNodeRequest,
        RemoveNodeRequest,
        GetClusterRequest,
        UpdateClusterRequest,
        RotateJoinTokenRequest,
        JoinManagerRequest,
        RegisterNodeRequest,
        LeaveManagerRequest,
        WatchRequest,
        CreateSecretRequest,
        GetSecretRequest,
        ListSecretsRequest,
        RemoveSecretRequest,
        CreateConfigRequest,
        GetConfigRequest,
        ListConfigsRequest,
        RemoveConfigRequest,
        SubscribeLogsRequest,
        // Daemon (local socket)
        InfoRequest,
        InitRequest,
        JoinRequest,
        LeaveRequest,
        LocalTasksRequest,
        BackupRequest,
        RestoreChunk,
        // Dispatcher
        SessionRequest,
        HeartbeatRequest,
        UpdateTaskStatusRequest,
        PublishLogsMessage,
        // CA
        GetRootCertificateRequest,
        IssueRequest,
        RenewRequest,
        // Raft transport
        RaftMessage,
    )
}

fn request_types(schema: &Schema) -> Vec<String> {
    let names: Vec<String> = schema
        .messages
        .keys()
        .filter(|n| decode_as(n, &[]).is_some())
        .cloned()
        .collect();
    assert!(
        names.len() >= 25,
        "request types found in the protos: {names:?}"
    );
    names
}

#[test]
fn arbitrary_bytes_decode_as_every_request_without_panicking() {
    let schema = schema();
    let names = request_types(&schema);
    runner(cases(DECODE_CASES))
        .run(
            &(prop::collection::vec(any::<u8>(), 0..1024), tape()),
            |(raw, choices)| {
                for n in &names {
                    decode_as(n, &raw);
                    // A message built from the protos must decode: the schema and prost agree.
                    let bytes = message(&schema, n, &mut Tape::new(&choices), 0);
                    prop_assert_eq!(decode_as(n, &bytes), Some(true), "{} did not decode", n);
                    // Damage it: a cut or a flipped byte must not panic either.
                    if !bytes.is_empty() {
                        let cut = choices.first().copied().unwrap_or(0) as usize % bytes.len();
                        decode_as(n, &bytes[..cut]);
                        let mut flipped = bytes.clone();
                        flipped[cut] ^= 0x80;
                        decode_as(n, &flipped);
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Every millisecond timer of a service spec, named.
fn spec_timers(s: &pb::ServiceSpec) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    if let Some(t) = &s.task {
        if let Some(c) = &t.container {
            out.push(("stop grace period", c.stop_grace_period_ms));
            if let Some(h) = &c.healthcheck {
                out.push(("healthcheck interval", h.interval_ms));
                out.push(("healthcheck timeout", h.timeout_ms));
                out.push(("healthcheck start period", h.start_period_ms));
            }
        }
        if let Some(r) = &t.restart {
            out.push(("restart delay", r.delay_ms));
            out.push(("restart window", r.window_ms));
        }
    }
    for u in [&s.update, &s.rollback].into_iter().flatten() {
        out.push(("update delay", u.delay_ms));
        out.push(("update monitor", u.monitor_ms));
    }
    out
}

#[test]
fn validation_of_arbitrary_specs_never_panics_and_bounds_what_it_accepts() {
    let schema = schema();
    let accepted = std::cell::Cell::new(0u32);
    runner(cases(PURE_CASES))
        .run(&tape(), |choices| {
            let bytes = message(&schema, "ServiceSpec", &mut Tape::new(&choices), 0);
            let spec = pb::ServiceSpec::decode(bytes.as_slice())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if validate::service_spec(&spec).is_ok() {
                accepted.set(accepted.get() + 1);
                for (what, ms) in spec_timers(&spec) {
                    prop_assert!(
                        ms <= validate::MAX_SPEC_DURATION_MS,
                        "accepted a {} of {} ms",
                        what,
                        ms
                    );
                }
            }
            let bytes = message(&schema, "ClusterSpec", &mut Tape::new(&choices), 0);
            let spec = pb::ClusterSpec::decode(bytes.as_slice())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let _ = validate::cluster_spec(&spec);
            for c in fuzz_support::ODD_STRINGS {
                let _ = validate::constraint(c);
                let _ = validate::image_reference(c);
                let _ = validate::service_name(c);
            }
            Ok(())
        })
        .unwrap();
    eprintln!("specs accepted by validation: {}", accepted.get());
}

// ---------------------------------------------------------------- whole control requests

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr")
}

/// A valid service the fuzzed requests can find by name ("web", in the fuzzer's strings).
fn web_spec() -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: "web".into(),
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
    }
}

/// The control RPCs whole requests are sent to (Watch streams forever; the daemon's Join and
/// Leave would dial arbitrary addresses or tear the manager down).
const CONTROL_RPCS: &[&str] = &[
    "CreateServiceRequest",
    "GetServiceRequest",
    "ListServicesRequest",
    "UpdateServiceRequest",
    "RemoveServiceRequest",
    "ListTasksRequest",
    "ListNodesRequest",
    "GetNodeRequest",
    "UpdateNodeRequest",
    "PromoteNodeRequest",
    "DemoteNodeRequest",
    "RemoveNodeRequest",
    "GetClusterRequest",
    "UpdateClusterRequest",
    "RotateJoinTokenRequest",
    "JoinManagerRequest",
    "RegisterNodeRequest",
    "LeaveManagerRequest",
    "InfoRequest",
    "CreateSecretRequest",
    "GetSecretRequest",
    "ListSecretsRequest",
    "RemoveSecretRequest",
    "CreateConfigRequest",
    "GetConfigRequest",
    "ListConfigsRequest",
    "RemoveConfigRequest",
];

async fn send(
    c: &mut ControlClient<tonic::transport::Channel>,
    d: &mut DaemonClient<tonic::transport::Channel>,
    name: &str,
    bytes: &[u8],
    versions: (u64, u64, u64),
    bump: bool,
) -> Result<(), tonic::Status> {
    macro_rules! call {
        ($t:ident, $client:expr, $m:ident) => {
            $client
                .$m(pb::$t::decode(bytes).expect("generated request decodes"))
                .await
                .map(|_| ())
        };
        ($t:ident, $client:expr, $m:ident, |$r:ident| $fix:expr) => {{
            let mut $r = pb::$t::decode(bytes).expect("generated request decodes");
            $fix;
            $client.$m($r).await.map(|_| ())
        }};
    }
    let (service_v, node_v, cluster_v) = versions;
    match name {
        "CreateServiceRequest" => call!(CreateServiceRequest, c, create_service),
        "GetServiceRequest" => call!(GetServiceRequest, c, get_service),
        "ListServicesRequest" => call!(ListServicesRequest, c, list_services),
        "UpdateServiceRequest" => call!(UpdateServiceRequest, c, update_service, |r| if bump {
            r.version = service_v;
            r.service = "web".into();
        }),
        "RemoveServiceRequest" => call!(RemoveServiceRequest, c, remove_service),
        "ListTasksRequest" => call!(ListTasksRequest, c, list_tasks),
        "ListNodesRequest" => call!(ListNodesRequest, c, list_nodes),
        "GetNodeRequest" => call!(GetNodeRequest, c, get_node),
        "UpdateNodeRequest" => call!(UpdateNodeRequest, c, update_node, |r| if bump {
            r.version = node_v;
            r.node = "fuzz-manager".into();
        }),
        "PromoteNodeRequest" => call!(PromoteNodeRequest, c, promote_node),
        "DemoteNodeRequest" => call!(DemoteNodeRequest, c, demote_node),
        "RemoveNodeRequest" => call!(RemoveNodeRequest, c, remove_node),
        "GetClusterRequest" => call!(GetClusterRequest, c, get_cluster),
        "UpdateClusterRequest" => call!(UpdateClusterRequest, c, update_cluster, |r| if bump {
            r.version = cluster_v;
        }),
        "RotateJoinTokenRequest" => call!(RotateJoinTokenRequest, c, rotate_join_token),
        // Raft would dial the address: keep it on a closed loopback port.
        "JoinManagerRequest" => call!(JoinManagerRequest, c, join_manager, |r| r.addr =
            "127.0.0.1:1".into()),
        "RegisterNodeRequest" => call!(RegisterNodeRequest, c, register_node, |r| r.addr =
            "127.0.0.1:1".into()),
        "LeaveManagerRequest" => call!(LeaveManagerRequest, c, leave_manager),
        "InfoRequest" => call!(InfoRequest, d, info),
        "CreateSecretRequest" => call!(CreateSecretRequest, c, create_secret),
        "GetSecretRequest" => call!(GetSecretRequest, c, get_secret),
        "ListSecretsRequest" => call!(ListSecretsRequest, c, list_secrets),
        "RemoveSecretRequest" => call!(RemoveSecretRequest, c, remove_secret),
        "CreateConfigRequest" => call!(CreateConfigRequest, c, create_config),
        "GetConfigRequest" => call!(GetConfigRequest, c, get_config),
        "ListConfigsRequest" => call!(ListConfigsRequest, c, list_configs),
        "RemoveConfigRequest" => call!(RemoveConfigRequest, c, remove_config),
        other => unreachable!("no call for {other}"),
    }
}

/// The cluster still answers, and every object in it is valid.
async fn cluster_is_sound(
    c: &mut ControlClient<tonic::transport::Channel>,
) -> Result<(u64, u64, u64), String> {
    let services = c
        .list_services(pb::ListServicesRequest::default())
        .await
        .map_err(|e| format!("list services: {e}"))?
        .into_inner();
    let mut service_v = 0;
    for s in services.services {
        let svc = s.service.ok_or("summary without a service")?;
        let spec = svc.spec.as_ref().ok_or("service without a spec")?;
        validate::service_spec(spec)
            .map_err(|e| format!("invalid service stored: {e}: {spec:?}"))?;
        if spec.name == "web" {
            service_v = svc.meta.as_ref().map_or(0, |m| m.version);
        }
    }
    let cluster = c
        .get_cluster(pb::GetClusterRequest {})
        .await
        .map_err(|e| format!("get cluster: {e}"))?
        .into_inner();
    let cl = cluster.cluster.ok_or("no cluster object")?;
    let spec = cl.spec.as_ref().ok_or("cluster without a spec")?;
    validate::cluster_spec(spec).map_err(|e| format!("invalid cluster spec stored: {e}"))?;
    let nodes = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|e| format!("list nodes: {e}"))?
        .into_inner()
        .nodes;
    let node_v = nodes
        .iter()
        .find(|n| n.meta.as_ref().is_some_and(|m| !m.id.is_empty()))
        .and_then(|n| n.meta.as_ref())
        .map_or(0, |m| m.version);
    for n in &nodes {
        if pb::NodeAvailability::try_from(n.spec.as_ref().map_or(0, |s| s.availability)).is_err() {
            return Err(format!("node stored with an unknown availability: {n:?}"));
        }
    }
    Ok((service_v, node_v, cl.meta.map_or(0, |m| m.version)))
}

#[test]
fn whole_control_requests_on_a_one_manager_cluster() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("shoal.sock");
    let mut cfg = DaemonConfig::new(dir.path().join("data"), free_port(), socket.clone());
    cfg.hostname = Some("fuzz-manager".into());
    cfg.raft_timers = Some(pb::RaftConfig {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        snapshot_interval: 50,
        keep_old_entries: 5,
    });
    let daemon = rt.block_on(Daemon::start(cfg)).expect("daemon starts");
    let (control, local) = rt.block_on(async {
        let ch = connect_local(&socket).await.expect("connect");
        let mut local = DaemonClient::new(ch.clone());
        local
            .init(pb::InitRequest {
                advertise_addr: String::new(),
                cluster_name: String::new(),
                ..Default::default()
            })
            .await
            .expect("init");
        let mut control = ControlClient::new(ch);
        control
            .create_service(pb::CreateServiceRequest {
                spec: Some(web_spec()),
                ..Default::default()
            })
            .await
            .expect("create web");
        (control, local)
    });
    let schema = schema();
    let codes: std::cell::RefCell<std::collections::BTreeMap<String, u32>> = Default::default();
    let result = runner(cases(CONTROL_CASES)).run(
        &(0..CONTROL_RPCS.len(), any::<bool>(), tape()),
        |(which, bump, choices)| {
            let name = CONTROL_RPCS[which];
            let bytes = message(&schema, name, &mut Tape::new(&choices), 0);
            let (mut control, mut local) = (control.clone(), local.clone());
            rt.block_on(async {
                let versions = cluster_is_sound(&mut control)
                    .await
                    .map_err(TestCaseError::fail)?;
                // A join waits for the new manager to catch up (it never will: the address is
                // a closed port), so the client gives up early; that must not hurt the cluster.
                let joining = name == "JoinManagerRequest";
                let limit = if joining { JOIN_WAIT } else { REQUEST_TIMEOUT };
                let r = match tokio::time::timeout(
                    limit,
                    send(&mut control, &mut local, name, &bytes, versions, bump),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) if joining => Err(tonic::Status::cancelled("the test stopped waiting")),
                    Err(_) => {
                        return Err(TestCaseError::fail(format!(
                            "{name} did not answer within {REQUEST_TIMEOUT:?}"
                        )))
                    }
                };
                let code = r.as_ref().err().map_or(Code::Ok, |s| s.code());
                *codes
                    .borrow_mut()
                    .entry(format!("{name} {code:?}"))
                    .or_default() += 1;
                if let Err(s) = &r {
                    // Unknown is what a handler panic or a dropped connection looks like.
                    prop_assert!(s.code() != Code::Unknown, "{}: {:?}", name, s);
                    prop_assert!(
                        !s.message().is_empty(),
                        "{}: status without a message",
                        name
                    );
                }
                cluster_is_sound(&mut control)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("after {name}: {e}")))?;
                Ok(())
            })
        },
    );
    eprintln!("answers: {:#?}", codes.borrow());
    rt.block_on(daemon.shutdown());
    result.unwrap();
}

// ---------------------------------------------------------------- whole dispatcher requests

#[test]
fn whole_dispatcher_requests_from_a_real_node() {
    use dispatcher_support::{node, task, Cluster};
    use shoal_manager::ca::Role;
    use shoal_manager::store::{Mutation, Object};

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let schema = schema();
    // Channels spawn their workers on the current runtime.
    let _enter = rt.enter();
    let cluster = rt.block_on(Cluster::start(1000, &["worker-1"]));
    let mut w = vec![];
    for (i, s) in [
        pb::TaskState::Assigned,
        pb::TaskState::Running,
        pb::TaskState::Complete,
    ]
    .iter()
    .enumerate()
    {
        w.push(Mutation::Create(Object::Task(task(
            &format!("id-{i}"),
            "worker-1",
            *s,
        ))));
    }
    // A task of another node: a worker must not be able to move it.
    w.push(Mutation::Create(Object::Node(node(
        "worker-2",
        pb::NodeRole::Worker,
    ))));
    w.push(Mutation::Create(Object::Task(task(
        "id-3",
        "worker-2",
        pb::TaskState::Assigned,
    ))));
    cluster.backend.write(w);
    let client = cluster.client("worker-1", Role::Worker);
    let session_id = std::cell::RefCell::new(String::new());
    let stream_slot = std::cell::RefCell::new(None);
    let codes: std::cell::RefCell<std::collections::BTreeMap<String, u32>> = Default::default();
    let before: Vec<(String, i32)> = (0..4)
        .map(|i| (format!("id-{i}"), cluster.task_state(&format!("id-{i}"))))
        .collect();
    let result = runner(cases(DISPATCHER_CASES)).run(
        &(0u8..3, any::<bool>(), tape()),
        |(rpc, real_session, choices)| {
            let mut client = client.clone();
            rt.block_on(async {
                let mut t = Tape::new(&choices);
                let r: Result<(), tonic::Status> = match rpc {
                    0 => {
                        let bytes = message(&schema, "SessionRequest", &mut t, 0);
                        let req = pb::SessionRequest::decode(bytes.as_slice()).expect("decodes");
                        match tokio::time::timeout(REQUEST_TIMEOUT, client.session(req)).await {
                            Err(_) => return Err(TestCaseError::fail("session did not answer")),
                            Ok(Err(s)) => Err(s),
                            Ok(Ok(resp)) => {
                                let mut stream = resp.into_inner();
                                let first =
                                    tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await;
                                match first {
                                    Ok(Ok(Some(pb::SessionMessage {
                                        kind: Some(pb::session_message::Kind::Started(s)),
                                    }))) => {
                                        *session_id.borrow_mut() = s.session_id;
                                        *stream_slot.borrow_mut() = Some(stream);
                                        Ok(())
                                    }
                                    Ok(Err(s)) => Err(s),
                                    other => {
                                        return Err(TestCaseError::fail(format!(
                                            "session's first message: {other:?}"
                                        )))
                                    }
                                }
                            }
                        }
                    }
                    1 => {
                        let bytes = message(&schema, "HeartbeatRequest", &mut t, 0);
                        let mut req =
                            pb::HeartbeatRequest::decode(bytes.as_slice()).expect("decodes");
                        if real_session {
                            req.session_id = session_id.borrow().clone();
                        }
                        tokio::time::timeout(REQUEST_TIMEOUT, client.heartbeat(req))
                            .await
                            .map_err(|_| TestCaseError::fail("heartbeat did not answer"))?
                            .map(|_| ())
                    }
                    _ => {
                        let bytes = message(&schema, "UpdateTaskStatusRequest", &mut t, 0);
                        let mut req =
                            pb::UpdateTaskStatusRequest::decode(bytes.as_slice()).expect("decodes");
                        if real_session {
                            req.session_id = session_id.borrow().clone();
                        }
                        tokio::time::timeout(REQUEST_TIMEOUT, client.update_task_status(req))
                            .await
                            .map_err(|_| TestCaseError::fail("status update did not answer"))?
                            .map(|_| ())
                    }
                };
                let code = r.as_ref().err().map_or(Code::Ok, |s| s.code());
                *codes
                    .borrow_mut()
                    .entry(format!("{rpc} {code:?}"))
                    .or_default() += 1;
                if let Err(s) = &r {
                    prop_assert!(s.code() != Code::Unknown, "rpc {}: {:?}", rpc, s);
                }
                for (id, was) in &before {
                    let now = cluster.task_state(id);
                    prop_assert!(
                        pb::TaskState::try_from(now).is_ok(),
                        "task {} holds unknown state {}",
                        id,
                        now
                    );
                    prop_assert!(
                        now >= *was,
                        "task {} moved back from {} to {}",
                        id,
                        was,
                        now
                    );
                }
                prop_assert_eq!(
                    cluster.task_state("id-3"),
                    pb::TaskState::Assigned as i32,
                    "another node's task moved"
                );
                Ok(())
            })
        },
    );
    eprintln!("answers: {:#?}", codes.borrow());
    result.unwrap();
}

/// `RaftMessage.data` carries openraft's requests as bincode: damaged or arbitrary payloads
/// must decode to an error, never a panic or a huge allocation.
#[test]
fn raft_payloads_decode_without_panicking() {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
    use shoal_manager::raft::TypeConfig;
    use shoal_manager::store::{Command, Mutation, Object};

    let node = pb::Node {
        meta: Some(pb::Meta {
            id: "n1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(3, 1), 7),
        payload: EntryPayload::Normal(Command::now(vec![Mutation::Create(Object::Node(node))])),
    };
    let append = bincode::serialize(&AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new(3, 1),
        prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 6)),
        entries: vec![entry.clone(), entry],
        leader_commit: None,
    })
    .expect("encode");
    let vote = bincode::serialize(&VoteRequest::<u64>::new(Vote::new(4, 2), None)).expect("encode");
    runner(cases(PURE_CASES))
        .run(
            &(
                prop::collection::vec(any::<u8>(), 0..512),
                prop::collection::vec((any::<u32>(), any::<u8>()), 1..6),
                any::<bool>(),
            ),
            |(raw, flips, which)| {
                let mut damaged = if which { append.clone() } else { vote.clone() };
                for (at, x) in flips {
                    let i = at as usize % damaged.len();
                    damaged[i] ^= x;
                }
                for b in [&raw, &damaged] {
                    let _ = bincode::deserialize::<AppendEntriesRequest<TypeConfig>>(b);
                    let _ = bincode::deserialize::<VoteRequest<u64>>(b);
                    let _ = bincode::deserialize::<InstallSnapshotRequest<TypeConfig>>(b);
                }
                Ok(())
            },
        )
        .unwrap();
}
