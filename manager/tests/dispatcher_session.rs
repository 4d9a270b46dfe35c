//! The dispatcher over real mTLS with a real store: sessions, assignments, heartbeats, status.

use crate::dispatcher_support;

use std::time::Duration;

use dispatcher_support::*;
use shoal_manager::ca::Role;
use shoal_manager::dispatcher::Leadership;
use shoal_manager::store::{Kind, Mutation, Object};
use shoal_manager::tls::anonymous_channel;
use shoal_proto::v1 as pb;
use shoal_proto::v1::dispatcher_client::DispatcherClient;
use shoal_proto::v1::TaskState;

#[tokio::test]
async fn session_gets_the_full_set_then_changes() {
    let c = Cluster::start(1000, &["w1", "w2"]).await;
    c.backend.write(vec![
        Mutation::Create(Object::Task(task("t1", "w1", TaskState::Assigned))),
        Mutation::Create(Object::Task(task("t2", "w1", TaskState::Running))),
        // Not assigned yet (a global task waiting for the scheduler): not sent.
        Mutation::Create(Object::Task(task("t3", "w1", TaskState::Pending))),
        Mutation::Create(Object::Task(task("t4", "w2", TaskState::Assigned))),
    ]);
    let mut client = c.client("w1", Role::Worker);
    let (started, mut stream) = open(&mut client, "host-w1").await;
    assert_eq!(started.node_id, "w1");
    assert_eq!(started.managers, vec!["127.0.0.1:1".to_string()]);
    assert!(started.heartbeat_period_ms >= 900 && started.heartbeat_period_ms <= 1000);
    let full = next_assignments(&mut stream).await;
    assert!(full.full);
    assert_eq!(ids(&full), vec!["t1", "t2"]);

    // The session start recorded the node as ready with its description.
    let n = c.backend.store.get_node("w1").unwrap().unwrap();
    assert_eq!(n.status.unwrap().state, pb::NodeState::Ready as i32);
    let d = n.description.unwrap();
    assert_eq!(d.hostname, "host-w1");
    assert_eq!(d.resources.unwrap().nano_cpus, 2_000_000_000);

    // A new assignment.
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t5",
        "w1",
        TaskState::Assigned,
    )))]);
    let a = next_assignments(&mut stream).await;
    assert!(!a.full);
    assert_eq!(ids(&a), vec!["t5"]);

    // The scheduler assigning t3 makes it appear.
    let mut t3 = c.backend.store.get_task("t3").unwrap().unwrap();
    t3.status.as_mut().unwrap().state = TaskState::Assigned as i32;
    c.backend.write(vec![Mutation::Update {
        object: Object::Task(t3),
        expect_version: None,
    }]);
    assert_eq!(ids(&next_assignments(&mut stream).await), vec!["t3"]);

    // A status-only change (the agent's own report) is not echoed; a desired-state change is.
    let mut t1 = c.backend.store.get_task("t1").unwrap().unwrap();
    t1.status.as_mut().unwrap().state = TaskState::Running as i32;
    c.backend.write(vec![Mutation::Update {
        object: Object::Task(t1.clone()),
        expect_version: None,
    }]);
    t1.desired_state = TaskState::Shutdown as i32;
    c.backend.write(vec![Mutation::Update {
        object: Object::Task(t1),
        expect_version: None,
    }]);
    let a = next_assignments(&mut stream).await;
    assert_eq!(ids(&a), vec!["t1"]);
    assert_eq!(a.tasks[0].desired_state, TaskState::Shutdown as i32);

    // Deletion is a removal; other nodes' tasks never show up.
    c.backend.write(vec![
        Mutation::Delete {
            kind: Kind::Task,
            id: "t4".into(),
            expect_version: None,
        },
        Mutation::Delete {
            kind: Kind::Task,
            id: "t2".into(),
            expect_version: None,
        },
    ]);
    let a = next_assignments(&mut stream).await;
    assert!(a.tasks.is_empty());
    assert_eq!(a.removed, vec!["t2".to_string()]);
    assert_eq!(c.dispatcher.connected_nodes(), vec!["w1".to_string()]);
}

#[tokio::test]
async fn a_node_that_misses_three_heartbeats_is_marked_down() {
    // 300 ms periods: a deadline of 900 ms leaves w1's heartbeats (every 50 ms) room for a
    // loaded machine's stalls.
    let c = Cluster::start(300, &["w1", "w2"]).await;
    let mut c1 = c.client("w1", Role::Worker);
    let mut c2 = c.client("w2", Role::Worker);
    let (s1, _stream1) = open(&mut c1, "h1").await;
    let (_s2, _stream2) = open(&mut c2, "h2").await;
    assert_eq!(c.node_state("w1"), pb::NodeState::Ready as i32);
    assert_eq!(c.node_state("w2"), pb::NodeState::Ready as i32);

    // w1 heartbeats, w2 stays silent (its stream still open): w2 goes down after 3 periods
    // plus a check interval, w1 stays ready.
    let start = tokio::time::Instant::now();
    while c.node_state("w2") != pb::NodeState::Down as i32 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "w2 not marked down"
        );
        let r = c1
            .heartbeat(pb::HeartbeatRequest {
                session_id: s1.session_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.heartbeat_period_ms >= 270 && r.heartbeat_period_ms <= 300);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "down after {:?}, before its deadline",
        start.elapsed()
    );
    assert_eq!(c.node_state("w1"), pb::NodeState::Ready as i32);
    let n = c.backend.store.get_node("w2").unwrap().unwrap();
    assert_eq!(n.status.unwrap().message, "heartbeat failure");

    // Its old session is gone; a new one makes it ready again.
    let err = c2
        .heartbeat(pb::HeartbeatRequest {
            session_id: _s2.session_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let (_s2b, _stream2b) = open(&mut c2, "h2").await;
    assert_eq!(c.node_state("w2"), pb::NodeState::Ready as i32);
}

/// A new leader whose store has not applied everything committed before its term: a
/// session's full set and a node's reports wait for the store, so neither misses a task
/// assigned under the old leader (reports on it were once acknowledged and dropped, leaving
/// it ASSIGNED for ever).
#[tokio::test]
async fn a_new_leader_serves_sessions_and_reports_only_once_its_store_caught_up() {
    let c = Cluster::start(1000, &["w1"]).await;
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t1",
        "w1",
        TaskState::Pending,
    )))]);
    // Assigned under the old leader: committed, not yet applied here.
    let mut t1 = c.backend.store.get_task("t1").unwrap().unwrap();
    t1.status.as_mut().unwrap().state = TaskState::Assigned as i32;
    c.backend.write_behind(vec![Mutation::Update {
        object: Object::Task(t1),
        expect_version: None,
    }]);
    let mut client = c.client("w1", Role::Worker);
    let (s, mut stream) = open(&mut client, "h1").await;
    assert_eq!(ids(&next_assignments(&mut stream).await), vec!["t1"]);

    // The node heard of t2 from the old leader and reports on it before this store has it.
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t2",
        "",
        TaskState::Pending,
    )))]);
    let mut t2 = c.backend.store.get_task("t2").unwrap().unwrap();
    t2.node_id = "w1".into();
    t2.status.as_mut().unwrap().state = TaskState::Assigned as i32;
    c.backend.write_behind(vec![Mutation::Update {
        object: Object::Task(t2),
        expect_version: None,
    }]);
    client
        .update_task_status(pb::UpdateTaskStatusRequest {
            session_id: s.session_id.clone(),
            updates: vec![report("t2", TaskState::Accepted)],
        })
        .await
        .unwrap();
    assert_eq!(c.task_state("t2"), TaskState::Accepted as i32);
}

fn report(id: &str, state: TaskState) -> pb::TaskStatusUpdate {
    pb::TaskStatusUpdate {
        task_id: id.into(),
        status: Some(pb::TaskStatus {
            state: state as i32,
            message: format!("{state:?}"),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn status_reports_are_batched_and_only_move_forward() {
    let c = Cluster::start(1000, &["w1", "w2"]).await;
    let mut m = Vec::new();
    for i in 0..200 {
        m.push(Mutation::Create(Object::Task(task(
            &format!("t{i:03}"),
            "w1",
            TaskState::Assigned,
        ))));
    }
    m.push(Mutation::Create(Object::Task(task(
        "other",
        "w2",
        TaskState::Assigned,
    ))));
    c.backend.write(m);
    let mut client = c.client("w1", Role::Worker);
    let (s, _stream) = open(&mut client, "h1").await;
    let before = c.backend.commands.load(std::sync::atomic::Ordering::SeqCst);

    // 200 concurrent calls, one update each: far fewer Raft commands than calls.
    let mut calls = Vec::new();
    for i in 0..200 {
        let mut cl = client.clone();
        let sid = s.session_id.clone();
        calls.push(tokio::spawn(async move {
            cl.update_task_status(pb::UpdateTaskStatusRequest {
                session_id: sid,
                updates: vec![report(&format!("t{i:03}"), TaskState::Running)],
            })
            .await
        }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let commands = c.backend.commands.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(commands < 50, "{commands} commands for 200 reports");
    for i in 0..200 {
        assert_eq!(c.task_state(&format!("t{i:03}")), TaskState::Running as i32);
    }

    // Stale (backwards), duplicate and other nodes' reports change nothing; forward ones do,
    // and in one call the furthest state wins.
    let before = c.backend.commands.load(std::sync::atomic::Ordering::SeqCst);
    client
        .update_task_status(pb::UpdateTaskStatusRequest {
            session_id: s.session_id.clone(),
            updates: vec![
                report("t000", TaskState::Preparing),
                report("t001", TaskState::Running),
                report("other", TaskState::Running),
                report("missing", TaskState::Running),
            ],
        })
        .await
        .unwrap();
    assert_eq!(
        c.backend.commands.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "nothing to write"
    );
    assert_eq!(c.task_state("t000"), TaskState::Running as i32);
    assert_eq!(c.task_state("other"), TaskState::Assigned as i32);
    client
        .update_task_status(pb::UpdateTaskStatusRequest {
            session_id: s.session_id.clone(),
            updates: vec![
                report("t002", TaskState::Failed),
                report("t002", TaskState::Complete),
            ],
        })
        .await
        .unwrap();
    assert_eq!(c.task_state("t002"), TaskState::Failed as i32);
    let t = c.backend.store.get_task("t002").unwrap().unwrap();
    assert_eq!(t.status.unwrap().message, "Failed");

    // A call with a stale session id is refused.
    let err = client
        .update_task_status(pb::UpdateTaskStatusRequest {
            session_id: "not-a-session".into(),
            updates: vec![report("t003", TaskState::Complete)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(c.task_state("t003"), TaskState::Running as i32);
}

#[tokio::test]
async fn worker_and_manager_certs_are_admitted_and_no_cert_is_refused() {
    let c = Cluster::start(1000, &["w1"]).await;
    let mut w = c.client("w1", Role::Worker);
    open(&mut w, "h1").await;
    let mut m = c.client("manager-0", Role::Manager);
    open(&mut m, "hm").await;

    let mut anon = DispatcherClient::new(anonymous_channel(&c.addr, c.ca.cert_pem()).unwrap());
    let err = anon
        .session(pb::SessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // A certificate of the cluster for a node the store does not know (removed) is refused.
    let mut gone = c.client("gone", Role::Worker);
    let err = gone
        .session(pb::SessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_follower_redirects_to_the_leader() {
    let c = Cluster::start(1000, &["w1"]).await;
    *c.backend.leadership.lock().unwrap() = Leadership::Follower {
        leader_addr: Some("127.0.0.1:4242".into()),
    };
    let mut w = c.client("w1", Role::Worker);
    let mut stream = w
        .session(pb::SessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    match next(&mut stream).await {
        pb::session_message::Kind::Redirect(r) => {
            assert_eq!(r.leader_addr, "127.0.0.1:4242");
            assert_eq!(r.managers, vec!["127.0.0.1:1".to_string()]);
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
    assert!(stream.message().await.unwrap().is_none(), "stream ends");
}

/// Finding 11 (CHAOS.md): a DOWN mark that lands after the READY of a new session (the
/// monitor's write retried on the version conflict with that READY) must not leave a node
/// that heartbeats in its session DOWN for good.
#[tokio::test]
async fn a_node_marked_down_while_in_session_is_ready_again_at_its_next_heartbeat() {
    let c = Cluster::start(100, &["w1"]).await;
    let mut c1 = c.client("w1", Role::Worker);
    let (s1, _stream1) = open(&mut c1, "h1").await;
    assert_eq!(c.node_state("w1"), pb::NodeState::Ready as i32);
    // The late DOWN mark, as the monitor writes it.
    let mut n = c.backend.store.get_node("w1").unwrap().unwrap();
    let version = n.meta.as_ref().unwrap().version;
    let st = n.status.get_or_insert_with(Default::default);
    st.state = pb::NodeState::Down as i32;
    st.message = "heartbeat failure".into();
    c.backend.write(vec![Mutation::Update {
        object: Object::Node(n),
        expect_version: Some(version),
    }]);
    assert_eq!(c.node_state("w1"), pb::NodeState::Down as i32);
    c1.heartbeat(pb::HeartbeatRequest {
        session_id: s1.session_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(c.node_state("w1"), pb::NodeState::Ready as i32);
}

#[tokio::test]
async fn a_running_task_reports_its_health_changes_in_the_same_state() {
    let c = Cluster::start(1000, &["w1"]).await;
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t1",
        "w1",
        TaskState::Running,
    )))]);
    let mut client = c.client("w1", Role::Worker);
    let (s, _stream) = open(&mut client, "h1").await;
    let health = |h: pb::HealthState| pb::TaskStatusUpdate {
        task_id: "t1".into(),
        status: Some(pb::TaskStatus {
            state: TaskState::Running as i32,
            timestamp_ms: 7,
            health: h as i32,
            health_output: format!("{h:?}"),
            ..Default::default()
        }),
    };
    let send = |u: pb::TaskStatusUpdate| {
        let mut cl = client.clone();
        let sid = s.session_id.clone();
        async move {
            cl.update_task_status(pb::UpdateTaskStatusRequest {
                session_id: sid,
                updates: vec![u],
            })
            .await
            .unwrap()
        }
    };
    let stored = || {
        c.backend
            .store
            .get_task("t1")
            .unwrap()
            .unwrap()
            .status
            .unwrap()
    };
    send(health(pb::HealthState::Starting)).await;
    assert_eq!(stored().health, pb::HealthState::Starting as i32);
    send(health(pb::HealthState::Healthy)).await;
    let st = stored();
    assert_eq!(
        (st.state, st.health, st.health_output.as_str()),
        (
            TaskState::Running as i32,
            pb::HealthState::Healthy as i32,
            "Healthy"
        )
    );
    // The same health again writes nothing.
    let before = c.backend.commands.load(std::sync::atomic::Ordering::SeqCst);
    send(health(pb::HealthState::Healthy)).await;
    assert_eq!(
        c.backend.commands.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
}

/// A secret sealed as the control API stores it.
fn secret(c: &Cluster, id: &str, plain: &[u8]) -> pb::Secret {
    pb::Secret {
        meta: Some(pb::Meta {
            id: id.into(),
            ..Default::default()
        }),
        spec: Some(pb::SecretSpec {
            name: format!("name-{id}"),
            data: c.keys.seal(id, plain).unwrap(),
            ..Default::default()
        }),
    }
}

fn using(mut t: pb::Task, secrets: &[&str], configs: &[&str]) -> pb::Task {
    let c = t.spec.as_mut().unwrap().container.as_mut().unwrap();
    let r = |id: &&str| pb::FileReference {
        id: id.to_string(),
        name: format!("name-{id}"),
        target: format!("/run/secrets/{id}"),
        mode: 0o444,
        ..Default::default()
    };
    c.secrets = secrets.iter().map(r).collect();
    c.configs = configs.iter().map(r).collect();
    t
}

/// (secret id, plaintext) and config ids of a dependency set.
fn held(d: &pb::Dependencies) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    (
        d.secrets
            .iter()
            .map(|s| {
                (
                    s.meta.as_ref().unwrap().id.clone(),
                    s.spec.as_ref().unwrap().data.clone(),
                )
            })
            .collect(),
        d.configs
            .iter()
            .map(|c| c.meta.as_ref().unwrap().id.clone())
            .collect(),
    )
}

/// The next assignments message that carries a dependency set.
async fn next_dependencies(stream: &mut tonic::Streaming<pb::SessionMessage>) -> pb::Dependencies {
    loop {
        if let Some(d) = next_assignments(stream).await.dependencies {
            return d;
        }
    }
}

#[tokio::test]
async fn a_node_is_sent_only_the_secrets_its_tasks_use_opened_and_while_they_do() {
    let c = Cluster::start(1000, &["w1", "w2"]).await;
    let config = pb::Config {
        meta: Some(pb::Meta {
            id: "cfg1".into(),
            ..Default::default()
        }),
        spec: Some(pb::ConfigSpec {
            name: "app".into(),
            data: b"listen 80".to_vec(),
            ..Default::default()
        }),
    };
    c.backend.write(vec![
        Mutation::Create(Object::Secret(secret(&c, "sec1", b"one"))),
        Mutation::Create(Object::Secret(secret(&c, "sec2", b"two"))),
        Mutation::Create(Object::Config(config)),
    ]);
    c.backend.write(vec![
        Mutation::Create(Object::Task(using(
            task("t1", "w1", TaskState::Assigned),
            &["sec1"],
            &["cfg1"],
        ))),
        Mutation::Create(Object::Task(task("t2", "w2", TaskState::Assigned))),
    ]);
    let (mut w1, mut w2) = (c.client("w1", Role::Worker), c.client("w2", Role::Worker));
    let (_, mut s1) = open(&mut w1, "host-w1").await;
    let (_, mut s2) = open(&mut w2, "host-w2").await;
    let full = next_assignments(&mut s1).await;
    assert_eq!(
        held(full.dependencies.as_ref().unwrap()),
        (vec![("sec1".into(), b"one".to_vec())], vec!["cfg1".into()])
    );
    let full = next_assignments(&mut s2).await;
    assert_eq!(full.dependencies, Some(pb::Dependencies::default()));

    // A second task with another secret: both, in the message that brings the task.
    c.backend.write(vec![Mutation::Create(Object::Task(using(
        task("t3", "w1", TaskState::Assigned),
        &["sec2"],
        &[],
    )))]);
    // (Skipping peer-list changes: w2's session made it READY.)
    let a = loop {
        let a = next_assignments(&mut s1).await;
        if !a.tasks.is_empty() {
            break a;
        }
    };
    assert_eq!(ids(&a), vec!["t3"]);
    let d = held(a.dependencies.as_ref().unwrap());
    assert_eq!(
        d.0,
        vec![
            ("sec1".into(), b"one".to_vec()),
            ("sec2".into(), b"two".to_vec())
        ]
    );

    // t1 failed (a status change only): its secret and config leave the node.
    let mut t1 = c.backend.store.get_task("t1").unwrap().unwrap();
    t1.status.as_mut().unwrap().state = TaskState::Failed as i32;
    c.backend.write(vec![Mutation::Update {
        object: Object::Task(t1),
        expect_version: None,
    }]);
    let d = held(&next_dependencies(&mut s1).await);
    assert_eq!(d, (vec![("sec2".into(), b"two".to_vec())], vec![]));

    // t3 removed: nothing left.
    c.backend.write(vec![Mutation::Delete {
        kind: Kind::Task,
        id: "t3".into(),
        expect_version: None,
    }]);
    assert_eq!(
        next_dependencies(&mut s1).await,
        pb::Dependencies::default()
    );

    // w2 ran no task using them: no dependency set came on its session.
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s2.message()).await {
        if let Some(pb::session_message::Kind::Assignments(a)) = m.unwrap().unwrap().kind {
            assert!(a.dependencies.is_none(), "w2 was sent {a:?}");
        }
    }
}

#[tokio::test]
async fn an_oversize_description_is_refused_and_long_status_texts_are_cut() {
    use shoal_proto::limits::{
        MAX_NODE_DESCRIPTION_BYTES, MAX_STATUS_TEXT_BYTES, TRUNCATED_MARKER,
    };
    let c = Cluster::start(1000, &["w1"]).await;
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t1",
        "w1",
        TaskState::Assigned,
    )))]);
    let mut client = c.client("w1", Role::Worker);
    let e = client
        .session(pb::SessionRequest {
            description: Some(pb::NodeDescription {
                hostname: "h".repeat(MAX_NODE_DESCRIPTION_BYTES),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("node description is"), "{e}");
    let n = c.backend.store.get_node("w1").unwrap().unwrap();
    assert!(n.description.is_none(), "nothing recorded");

    // A description in bounds opens a session; a report with a huge error text is kept cut.
    let (s, _stream) = open(&mut client, "h1").await;
    client
        .update_task_status(pb::UpdateTaskStatusRequest {
            session_id: s.session_id.clone(),
            updates: vec![pb::TaskStatusUpdate {
                task_id: "t1".into(),
                status: Some(pb::TaskStatus {
                    state: TaskState::Failed as i32,
                    err: "boom ".repeat(1 << 20),
                    message: "failed".into(),
                    ..Default::default()
                }),
            }],
        })
        .await
        .unwrap();
    let st = c
        .backend
        .store
        .get_task("t1")
        .unwrap()
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.state, TaskState::Failed as i32);
    assert_eq!(st.message, "failed");
    assert!(st.err.len() <= MAX_STATUS_TEXT_BYTES, "{}", st.err.len());
    assert!(st.err.starts_with("boom boom"), "{}", &st.err[..20]);
    assert!(st.err.ends_with(TRUNCATED_MARKER));
}

#[tokio::test]
async fn a_status_batch_on_large_tasks_is_written_in_entries_within_the_bound() {
    use std::sync::atomic::Ordering;
    let c = Cluster::start(1000, &["w1"]).await;
    // Twenty tasks of 200 KiB each (their spec's environment): 4 MiB of task objects.
    let n = 20;
    for i in 0..n {
        let mut t = task(&format!("t{i:02}"), "w1", TaskState::Running);
        t.spec.as_mut().unwrap().container.as_mut().unwrap().env =
            vec![format!("BLOB={}", "x".repeat(200 * 1024))];
        c.backend.write(vec![Mutation::Create(Object::Task(t))]);
    }
    let mut client = c.client("w1", Role::Worker);
    let (s, _stream) = open(&mut client, "h1").await;
    let before = c.backend.commands.load(Ordering::SeqCst);
    client
        .update_task_status(pb::UpdateTaskStatusRequest {
            session_id: s.session_id.clone(),
            updates: (0..n)
                .map(|i| report(&format!("t{i:02}"), TaskState::Complete))
                .collect(),
        })
        .await
        .expect("one call of reports on large tasks");
    assert_eq!(c.backend.oversize.load(Ordering::SeqCst), 0);
    for i in 0..n {
        assert_eq!(
            c.task_state(&format!("t{i:02}")),
            TaskState::Complete as i32
        );
    }
    let commands = c.backend.commands.load(Ordering::SeqCst) - before;
    assert!(
        (3..=n).contains(&commands),
        "{commands} commands for 4 MiB of tasks"
    );
}
