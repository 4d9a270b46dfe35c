//! The store on real sled files: apply, checks, indexes, atomicity, durability, watches.

use shoal_manager::store::{
    check_task_forward, Action, Command, Event, Kind, Mutation, Object, Response, Store, StoreError,
};
use shoal_proto::v1::{Cluster, Meta, Node, Service, ServiceSpec, Task, TaskState, TaskStatus};

fn meta(id: &str) -> Option<Meta> {
    Some(Meta {
        id: id.to_string(),
        ..Default::default()
    })
}

fn service(id: &str, name: &str) -> Service {
    Service {
        meta: meta(id),
        spec: Some(ServiceSpec {
            name: name.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn task(id: &str, service_id: &str, node_id: &str, state: TaskState, desired: TaskState) -> Task {
    Task {
        meta: meta(id),
        service_id: service_id.to_string(),
        node_id: node_id.to_string(),
        desired_state: desired as i32,
        status: Some(TaskStatus {
            state: state as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(id: &str) -> Node {
    Node {
        meta: meta(id),
        ..Default::default()
    }
}

fn cmd(now_ms: i64, mutations: Vec<Mutation>) -> Command {
    Command { now_ms, mutations }
}

fn create(o: Object) -> Mutation {
    Mutation::Create(o)
}

fn update(o: Object, expect_version: Option<u64>) -> Mutation {
    Mutation::Update {
        object: o,
        expect_version,
    }
}

fn ok(r: Response) -> Vec<u64> {
    match r.result {
        Ok(v) => v,
        Err(e) => panic!("command refused: {e}"),
    }
}

fn refused(r: Response) -> StoreError {
    match r.result {
        Ok(v) => panic!("command accepted (versions {v:?}), expected a refusal"),
        Err(e) => e,
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::open(dir.path().join("db")).expect("open sled");
    let store = Store::open(&db).expect("open store");
    (dir, store)
}

fn ids_of_tasks(tasks: &[Task]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| t.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default())
        .collect()
}

#[test]
fn create_update_delete_stamp_versions_and_timestamps() {
    let (_dir, store) = open();
    let v = ok(store.apply(
        5,
        &cmd(
            1_000,
            vec![
                create(Object::Service(service("s1", "web"))),
                create(Object::Node(node("n1"))),
                create(Object::Cluster(Cluster {
                    meta: meta("c1"),
                    ..Default::default()
                })),
            ],
        ),
    ));
    assert_eq!(v, vec![5, 5, 5]);

    let s = store.get_service("s1").unwrap().expect("service by id");
    let m = s.meta.clone().unwrap();
    assert_eq!(
        (m.version, m.created_at_ms, m.updated_at_ms),
        (5, 1_000, 1_000)
    );
    assert_eq!(
        store.get_service("web").unwrap(),
        Some(s.clone()),
        "by name"
    );
    assert_eq!(
        store.get_node("n1").unwrap().unwrap().meta.unwrap().version,
        5
    );
    assert_eq!(store.get_cluster().unwrap().unwrap().meta.unwrap().id, "c1");

    let mut changed = s.clone();
    changed.spec_version = 7;
    ok(store.apply(
        9,
        &cmd(2_000, vec![update(Object::Service(changed), Some(5))]),
    ));
    let s2 = store.get_service("web").unwrap().unwrap();
    let m2 = s2.meta.clone().unwrap();
    assert_eq!(
        (m2.version, m2.created_at_ms, m2.updated_at_ms),
        (9, 1_000, 2_000)
    );
    assert_eq!(s2.spec_version, 7);

    ok(store.apply(
        10,
        &cmd(
            3_000,
            vec![Mutation::Delete {
                kind: Kind::Service,
                id: "s1".into(),
                expect_version: Some(9),
            }],
        ),
    ));
    assert_eq!(store.get_service("s1").unwrap(), None);
    assert_eq!(store.get_service("web").unwrap(), None, "name freed");
    assert_eq!(store.list_services().unwrap(), vec![]);
    assert_eq!(store.list_nodes().unwrap().len(), 1);

    // The freed name can be taken again.
    ok(store.apply(
        11,
        &cmd(4_000, vec![create(Object::Service(service("s2", "web")))]),
    ));
    assert_eq!(
        store.service_id_by_name("web").unwrap().as_deref(),
        Some("s2")
    );
}

#[test]
fn stale_version_is_a_conflict_and_changes_nothing() {
    let (_dir, store) = open();
    ok(store.apply(3, &cmd(1, vec![create(Object::Node(node("n1")))])));
    let mut n = store.get_node("n1").unwrap().unwrap();
    n.certificate_serial = "ab".into();
    ok(store.apply(4, &cmd(2, vec![update(Object::Node(n.clone()), Some(3))])));

    n.certificate_serial = "cd".into();
    let e = refused(store.apply(5, &cmd(3, vec![update(Object::Node(n.clone()), Some(3))])));
    assert_eq!(
        e,
        StoreError::VersionConflict {
            id: "n1".into(),
            expected: 3,
            actual: 4
        }
    );
    assert!(e.to_string().contains("expected version 3, found 4"), "{e}");
    let e = refused(store.apply(
        5,
        &cmd(
            3,
            vec![Mutation::Delete {
                kind: Kind::Node,
                id: "n1".into(),
                expect_version: Some(2),
            }],
        ),
    ));
    assert!(matches!(e, StoreError::VersionConflict { .. }), "{e}");
    assert_eq!(
        store.get_node("n1").unwrap().unwrap().certificate_serial,
        "ab"
    );

    // A blind write (no expected version) is accepted.
    ok(store.apply(6, &cmd(4, vec![update(Object::Node(n), None)])));
    assert_eq!(
        store.get_node("n1").unwrap().unwrap().certificate_serial,
        "cd"
    );
}

#[test]
fn missing_and_duplicate_objects_are_refused() {
    let (_dir, store) = open();
    let e = refused(store.apply(1, &cmd(1, vec![update(Object::Node(node("ghost")), None)])));
    assert_eq!(
        e,
        StoreError::NotFound {
            kind: Kind::Node,
            id: "ghost".into()
        }
    );
    ok(store.apply(2, &cmd(1, vec![create(Object::Node(node("n1")))])));
    let e = refused(store.apply(3, &cmd(1, vec![create(Object::Node(node("n1")))])));
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    let e = refused(store.apply(4, &cmd(1, vec![create(Object::Node(node("")))])));
    assert!(matches!(e, StoreError::Invalid { .. }), "{e}");
    let e = refused(store.apply(5, &cmd(1, vec![create(Object::Service(service("s1", "")))])));
    assert!(matches!(e, StoreError::Invalid { .. }), "{e}");
}

#[test]
fn duplicate_service_name_is_refused_on_create_and_rename() {
    let (_dir, store) = open();
    ok(store.apply(
        1,
        &cmd(
            1,
            vec![
                create(Object::Service(service("s1", "web"))),
                create(Object::Service(service("s2", "db"))),
            ],
        ),
    ));
    let e = refused(store.apply(
        2,
        &cmd(2, vec![create(Object::Service(service("s3", "web")))]),
    ));
    assert_eq!(
        e,
        StoreError::NameTaken {
            kind: Kind::Service,
            name: "web".into(),
            existing_id: "s1".into()
        }
    );
    assert_eq!(store.get_service("s3").unwrap(), None);

    let e = refused(store.apply(
        3,
        &cmd(3, vec![update(Object::Service(service("s2", "web")), None)]),
    ));
    assert!(matches!(e, StoreError::NameTaken { .. }), "{e}");
    assert_eq!(
        store.service_id_by_name("db").unwrap().as_deref(),
        Some("s2")
    );

    // Renaming moves the index entry.
    ok(store.apply(
        4,
        &cmd(
            4,
            vec![update(Object::Service(service("s2", "cache")), None)],
        ),
    ));
    assert_eq!(store.service_id_by_name("db").unwrap(), None);
    assert_eq!(
        store.service_id_by_name("cache").unwrap().as_deref(),
        Some("s2")
    );
    assert_eq!(
        store
            .get_service("cache")
            .unwrap()
            .unwrap()
            .meta
            .unwrap()
            .id,
        "s2"
    );
}

#[test]
fn task_indexes_follow_updates_and_deletes() {
    let (_dir, store) = open();
    use TaskState::*;
    ok(store.apply(
        1,
        &cmd(
            1,
            vec![
                create(Object::Task(task("t1", "s1", "n1", Assigned, Running))),
                create(Object::Task(task("t2", "s1", "n2", Assigned, Running))),
                create(Object::Task(task("t3", "s2", "n1", Pending, Running))),
                create(Object::Task(task("t4", "s2", "", Pending, Running))),
            ],
        ),
    ));
    assert_eq!(
        ids_of_tasks(&store.tasks_by_service("s1").unwrap()),
        ["t1", "t2"]
    );
    assert_eq!(
        ids_of_tasks(&store.tasks_by_service("s2").unwrap()),
        ["t3", "t4"]
    );
    assert_eq!(
        ids_of_tasks(&store.tasks_by_node("n1").unwrap()),
        ["t1", "t3"]
    );
    assert_eq!(ids_of_tasks(&store.tasks_by_node("n2").unwrap()), ["t2"]);
    // A prefix of another id must not match ("s" is not "s1").
    assert!(store.tasks_by_service("s").unwrap().is_empty());

    // t1 moves to n2; t4 gets assigned to n1.
    ok(store.apply(
        2,
        &cmd(
            2,
            vec![
                update(
                    Object::Task(task("t1", "s1", "n2", Assigned, Running)),
                    Some(1),
                ),
                update(
                    Object::Task(task("t4", "s2", "n1", Assigned, Running)),
                    Some(1),
                ),
            ],
        ),
    ));
    assert_eq!(
        ids_of_tasks(&store.tasks_by_node("n1").unwrap()),
        ["t3", "t4"]
    );
    assert_eq!(
        ids_of_tasks(&store.tasks_by_node("n2").unwrap()),
        ["t1", "t2"]
    );

    ok(store.apply(
        3,
        &cmd(
            3,
            vec![Mutation::Delete {
                kind: Kind::Task,
                id: "t2".into(),
                expect_version: None,
            }],
        ),
    ));
    assert_eq!(ids_of_tasks(&store.tasks_by_node("n2").unwrap()), ["t1"]);
    assert_eq!(ids_of_tasks(&store.tasks_by_service("s1").unwrap()), ["t1"]);
    assert_eq!(
        ids_of_tasks(&store.list_tasks().unwrap()),
        ["t1", "t3", "t4"]
    );
}

#[test]
fn task_states_only_move_forward() {
    let (_dir, store) = open();
    use TaskState::*;
    ok(store.apply(
        1,
        &cmd(
            1,
            vec![create(Object::Task(task(
                "t1", "s1", "n1", Running, Running,
            )))],
        ),
    ));

    let e = refused(store.apply(
        2,
        &cmd(
            2,
            vec![update(
                Object::Task(task("t1", "s1", "n1", Assigned, Running)),
                None,
            )],
        ),
    ));
    assert_eq!(
        e,
        StoreError::InvalidTransition {
            id: "t1".into(),
            field: "status.state".into(),
            from: "TASK_STATE_RUNNING".into(),
            to: "TASK_STATE_ASSIGNED".into()
        }
    );

    ok(store.apply(
        2,
        &cmd(
            2,
            vec![update(
                Object::Task(task("t1", "s1", "n1", Running, Shutdown)),
                None,
            )],
        ),
    ));
    let e = refused(store.apply(
        3,
        &cmd(
            3,
            vec![update(
                Object::Task(task("t1", "s1", "n1", Running, Running)),
                None,
            )],
        ),
    ));
    assert!(
        matches!(&e, StoreError::InvalidTransition { field, .. } if field == "desired_state"),
        "{e}"
    );
    let t = store.get_task("t1").unwrap().unwrap();
    assert_eq!(t.desired_state, Shutdown as i32);
    assert_eq!(t.status.unwrap().state, Running as i32);

    // Proposers can check the same rule before proposing.
    let running = task("t1", "s1", "n1", Running, Running);
    let back = task("t1", "s1", "n1", Assigned, Running);
    assert!(check_task_forward(&running, &back).is_err());
    assert!(check_task_forward(&back, &running).is_ok());

    // Same state again is fine (a status message update).
    ok(store.apply(
        4,
        &cmd(
            4,
            vec![update(
                Object::Task(task("t1", "s1", "n1", Running, Shutdown)),
                None,
            )],
        ),
    ));
    ok(store.apply(
        5,
        &cmd(
            5,
            vec![update(
                Object::Task(task("t1", "s1", "n1", Failed, Shutdown)),
                None,
            )],
        ),
    ));
}

#[test]
fn a_failing_mutation_discards_the_whole_command() {
    let (_dir, store) = open();
    let mut events = store.watch();
    ok(store.apply(
        1,
        &cmd(1, vec![create(Object::Service(service("s1", "web")))]),
    ));
    let e = refused(store.apply(
        2,
        &cmd(
            2,
            vec![
                create(Object::Service(service("s2", "api"))),
                create(Object::Task(task(
                    "t1",
                    "s2",
                    "n1",
                    TaskState::New,
                    TaskState::Running,
                ))),
                // Fails: name taken.
                create(Object::Service(service("s3", "web"))),
            ],
        ),
    ));
    assert!(matches!(e, StoreError::NameTaken { .. }), "{e}");
    assert_eq!(store.get_service("s2").unwrap(), None);
    assert_eq!(
        store.get_service("api").unwrap(),
        None,
        "no name index left"
    );
    assert_eq!(store.get_task("t1").unwrap(), None);
    assert!(
        store.tasks_by_service("s2").unwrap().is_empty(),
        "no task index left"
    );
    assert!(store.tasks_by_node("n1").unwrap().is_empty());

    // Only the first command's event was published.
    let ev = events.try_recv().expect("event of the first command");
    assert_eq!((ev.version, ev.action), (1, Action::Create));
    assert!(
        events.try_recv().is_err(),
        "refused command published events"
    );

    // Later mutations in one command see the earlier ones.
    ok(store.apply(
        3,
        &cmd(
            3,
            vec![
                create(Object::Service(service("s2", "api"))),
                update(Object::Service(service("s2", "api2")), Some(3)),
            ],
        ),
    ));
    assert_eq!(
        store.service_id_by_name("api2").unwrap().as_deref(),
        Some("s2")
    );
    assert_eq!(store.service_id_by_name("api").unwrap(), None);
}

#[test]
fn watch_delivers_events_in_commit_order() {
    let (_dir, store) = open();
    let mut rx = store.watch();
    ok(store.apply(
        1,
        &cmd(
            10,
            vec![
                create(Object::Node(node("n1"))),
                create(Object::Service(service("s1", "web"))),
            ],
        ),
    ));
    ok(store.apply(
        2,
        &cmd(
            20,
            vec![update(Object::Service(service("s1", "web2")), Some(1))],
        ),
    ));
    ok(store.apply(
        3,
        &cmd(
            30,
            vec![Mutation::Delete {
                kind: Kind::Node,
                id: "n1".into(),
                expect_version: None,
            }],
        ),
    ));
    let got: Vec<Event> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    let summary: Vec<(u64, Action, Kind, String)> = got
        .iter()
        .map(|e| {
            (
                e.version,
                e.action,
                e.object.kind(),
                e.object.id().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, Action::Create, Kind::Node, "n1".into()),
            (1, Action::Create, Kind::Service, "s1".into()),
            (2, Action::Update, Kind::Service, "s1".into()),
            (3, Action::Delete, Kind::Node, "n1".into()),
        ]
    );
    // Events carry the stored object (version and timestamps stamped).
    match &got[2].object {
        Object::Service(s) => {
            let m = s.meta.as_ref().unwrap();
            assert_eq!((m.version, m.created_at_ms, m.updated_at_ms), (2, 10, 20));
            assert_eq!(s.spec.as_ref().unwrap().name, "web2");
        }
        o => panic!("unexpected {o:?}"),
    }
}

#[test]
fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let db = sled::open(&path).unwrap();
        let store = Store::open(&db).unwrap();
        ok(store.apply(
            7,
            &cmd(
                1,
                vec![
                    create(Object::Service(service("s1", "web"))),
                    create(Object::Task(task(
                        "t1",
                        "s1",
                        "n1",
                        TaskState::Pending,
                        TaskState::Running,
                    ))),
                    create(Object::Node(node("n1"))),
                ],
            ),
        ));
        db.flush().unwrap();
    }
    let db = sled::open(&path).unwrap();
    let store = Store::open(&db).unwrap();
    assert_eq!(
        store
            .get_service("web")
            .unwrap()
            .unwrap()
            .meta
            .unwrap()
            .version,
        7
    );
    assert_eq!(ids_of_tasks(&store.tasks_by_node("n1").unwrap()), ["t1"]);
    assert_eq!(ids_of_tasks(&store.tasks_by_service("s1").unwrap()), ["t1"]);
    assert_eq!(store.list_nodes().unwrap().len(), 1);
    // The name index survived too: a duplicate is still refused.
    let e = refused(store.apply(
        8,
        &cmd(2, vec![create(Object::Service(service("s9", "web")))]),
    ));
    assert!(matches!(e, StoreError::NameTaken { .. }), "{e}");
}

#[test]
fn commands_round_trip_through_serde() {
    let c = cmd(
        42,
        vec![
            create(Object::Service(service("s1", "web"))),
            update(
                Object::Task(task(
                    "t1",
                    "s1",
                    "n1",
                    TaskState::Running,
                    TaskState::Running,
                )),
                Some(3),
            ),
            Mutation::Delete {
                kind: Kind::Cluster,
                id: "c".into(),
                expect_version: None,
            },
        ],
    );
    let b = bincode::serialize(&c).unwrap();
    assert_eq!(bincode::deserialize::<Command>(&b).unwrap(), c);
    let j = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<Command>(&j).unwrap(), c);
    let r = Response::single(Err(StoreError::VersionConflict {
        id: "x".into(),
        expected: 1,
        actual: 2,
    }));
    assert_eq!(
        bincode::deserialize::<Response>(&bincode::serialize(&r).unwrap()).unwrap(),
        r
    );
    // Garbage prost bytes inside a valid envelope are an error, not a panic.
    let bad =
        serde_json::json!({"mutations": [{"Create": {"Node": [255, 255, 255]}}], "now_ms": 1});
    assert!(serde_json::from_value::<Command>(bad).is_err());
}

fn network(id: &str, name: &str, subnet: &str, vni: u32) -> shoal_proto::v1::Network {
    shoal_proto::v1::Network {
        meta: meta(id),
        spec: Some(shoal_proto::v1::NetworkSpec {
            name: name.to_string(),
            driver: "overlay".into(),
            ..Default::default()
        }),
        subnet: subnet.to_string(),
        gateway: String::new(),
        vni,
    }
}

/// Never two networks with one name, overlapping subnets or one VNI — checked at apply, also
/// between the commands of one batch (two leaders' allocations racing land in one batch).
#[test]
fn networks_never_share_a_name_a_subnet_or_a_vni() {
    let (_dir, store) = open();
    let net = |id, name, subnet, vni| create(Object::Network(network(id, name, subnet, vni)));
    ok(store.apply(2, &cmd(1, vec![net("n1", "backend", "10.0.0.0/24", 4097)])));
    for (m, want) in [
        (net("n2", "backend", "10.0.1.0/24", 4098), "backend"),
        (
            net("n2", "front", "10.0.0.128/25", 4098),
            "overlaps network backend",
        ),
        (
            net("n2", "front", "10.0.0.0/16", 4098),
            "overlaps network backend",
        ),
        (net("n2", "front", "10.0.1.0/24", 4097), "VNI 4097"),
        (net("n2", "front", "10.0.1.0", 4098), "not an IPv4 CIDR"),
        (net("n2", "front", "10.0.1.0/24", 0), "VNI 0"),
    ] {
        let e = refused(store.apply(3, &cmd(2, vec![m])));
        assert!(e.to_string().contains(want), "{e}");
    }
    // Within one batch: the second create sees the first.
    let mut batch = store.batch();
    ok(batch
        .apply(4, &cmd(3, vec![net("n2", "front", "10.0.1.0/24", 4098)]))
        .unwrap());
    let e = refused(
        batch
            .apply(5, &cmd(4, vec![net("n3", "other", "10.0.1.0/25", 4099)]))
            .unwrap(),
    );
    assert!(e.to_string().contains("overlaps network front"), "{e}");
    batch.commit().unwrap();
    assert_eq!(store.list_networks().unwrap().len(), 2);
    assert_eq!(
        store
            .get_network("front")
            .unwrap()
            .unwrap()
            .meta
            .unwrap()
            .id,
        "n2"
    );
    // Removed, its name, subnet and VNI are free again.
    ok(store.apply(
        6,
        &cmd(
            5,
            vec![Mutation::Delete {
                kind: Kind::Network,
                id: "n1".into(),
                expect_version: None,
            }],
        ),
    ));
    assert!(store.get_network("backend").unwrap().is_none());
    ok(store.apply(7, &cmd(6, vec![net("n4", "backend", "10.0.0.0/24", 4097)])));
}

fn secret(id: &str, name: &str) -> shoal_proto::v1::Secret {
    shoal_proto::v1::Secret {
        meta: meta(id),
        spec: Some(shoal_proto::v1::SecretSpec {
            name: name.to_string(),
            data: b"sealed".to_vec(),
            ..Default::default()
        }),
    }
}

fn service_using(id: &str, name: &str, secret_id: &str) -> Service {
    let mut s = service(id, name);
    s.spec.as_mut().unwrap().task = Some(shoal_proto::v1::TaskSpec {
        container: Some(shoal_proto::v1::ContainerSpec {
            secrets: vec![shoal_proto::v1::FileReference {
                id: secret_id.to_string(),
                name: "db".into(),
                target: "/run/secrets/db".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    });
    s
}

#[test]
fn secret_names_are_unique_and_a_used_secret_stays() {
    let (_d, store) = open();
    ok(store.apply(1, &cmd(1, vec![create(Object::Secret(secret("s1", "db")))])));
    let e = refused(store.apply(2, &cmd(2, vec![create(Object::Secret(secret("s2", "db")))])));
    assert!(
        matches!(
            e,
            StoreError::NameTaken {
                kind: Kind::Secret,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "secret name db is already in use by secret s1"
    );
    assert_eq!(
        store.get_secret("db").unwrap().unwrap().meta.unwrap().id,
        "s1"
    );
    // A service may name only secrets that exist.
    let e = refused(store.apply(
        3,
        &cmd(
            3,
            vec![create(Object::Service(service_using(
                "svc0", "x", "nosuch",
            )))],
        ),
    ));
    assert!(e.to_string().contains("secret db not found"), "{e}");
    ok(store.apply(
        4,
        &cmd(
            4,
            vec![create(Object::Service(service_using("svc1", "web", "s1")))],
        ),
    ));
    // In use: the delete is refused, naming the service; once unused it goes, name and all.
    let del = |i: u64| {
        store.apply(
            i,
            &cmd(
                i as i64,
                vec![Mutation::Delete {
                    kind: Kind::Secret,
                    id: "s1".into(),
                    expect_version: None,
                }],
            ),
        )
    };
    let e = refused(del(5));
    assert!(e.to_string().contains("in use by service web"), "{e}");
    ok(store.apply(
        6,
        &cmd(
            6,
            vec![update(Object::Service(service("svc1", "web")), None)],
        ),
    ));
    ok(del(7));
    assert!(store.get_secret("db").unwrap().is_none());
    ok(store.apply(8, &cmd(8, vec![create(Object::Secret(secret("s3", "db")))])));
}

/// The scans the control API pages with: from after a key, in key order, services by name
/// (within a prefix), tasks by id, a service's and a node's tasks by id.
#[test]
fn pages_scan_from_after_a_key_in_order() {
    let (_d, store) = open();
    let mut m = Vec::new();
    for (id, name) in [("s1", "web"), ("s2", "api"), ("s3", "web-b"), ("s4", "db")] {
        m.push(create(Object::Service(service(id, name))));
    }
    for (id, svc, node) in [("t3", "s1", "n1"), ("t1", "s1", "n2"), ("t2", "s2", "n1")] {
        m.push(create(Object::Task(task(
            id,
            svc,
            node,
            TaskState::New,
            TaskState::Running,
        ))));
    }
    ok(store.apply(1, &cmd(1, m)));
    let names = |it: Vec<Service>| -> Vec<String> {
        it.into_iter()
            .map(|s| s.spec.unwrap_or_default().name)
            .collect()
    };
    let svc = |after: &str, prefix: &str| -> Vec<String> {
        names(
            store
                .services_after(after, prefix)
                .collect::<Result<_, _>>()
                .unwrap(),
        )
    };
    assert_eq!(svc("", ""), ["api", "db", "web", "web-b"]);
    assert_eq!(svc("db", ""), ["web", "web-b"]);
    assert_eq!(svc("", "web"), ["web", "web-b"]);
    assert_eq!(svc("web", "web"), ["web-b"]);
    assert_eq!(svc("a", "web"), ["web", "web-b"]);
    assert!(svc("web-b", "").is_empty());
    assert!(svc("zzz", "web").is_empty());

    let ids = |it: Vec<Task>| ids_of_tasks(&it);
    let all: Vec<Task> = store.tasks_after("").collect::<Result<_, _>>().unwrap();
    assert_eq!(ids(all), ["t1", "t2", "t3"]);
    let rest: Vec<Task> = store.tasks_after("t1").collect::<Result<_, _>>().unwrap();
    assert_eq!(ids(rest), ["t2", "t3"]);
    let of_s1: Vec<Task> = store
        .service_tasks_after("s1", "")
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids(of_s1), ["t1", "t3"]);
    let of_s1: Vec<Task> = store
        .service_tasks_after("s1", "t1")
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids(of_s1), ["t3"]);
    let on_n1: Vec<Task> = store
        .node_tasks_after("n1", "")
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids(on_n1), ["t2", "t3"]);
    // A service id that is a prefix of another's is not that one.
    assert_eq!(store.service_tasks_after("s", "").count(), 0);
}
