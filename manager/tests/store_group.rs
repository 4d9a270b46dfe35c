//! Group commands (several proposers' commands in one Raft entry) on real sled files: each
//! grouped command is checked and applied on its own, a refused one leaves no trace and does
//! not stop the others, and malformed groups are refused whole.

use shoal_manager::store::{Command, Kind, Mutation, Object, Response, Store, StoreError};
use shoal_proto::v1::{Meta, Service, ServiceSpec};

fn service(id: &str, name: &str, label: &str) -> Service {
    Service {
        meta: Some(Meta {
            id: id.to_string(),
            ..Default::default()
        }),
        spec: Some(ServiceSpec {
            name: name.to_string(),
            labels: [("l".to_string(), label.to_string())].into_iter().collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn create(id: &str, name: &str) -> Command {
    Command {
        now_ms: 1,
        mutations: vec![Mutation::Create(Object::Service(service(id, name, "0")))],
    }
}

fn update(id: &str, name: &str, label: &str, expect: u64) -> Command {
    Command {
        now_ms: 2,
        mutations: vec![Mutation::Update {
            object: Object::Service(service(id, name, label)),
            expect_version: Some(expect),
        }],
    }
}

fn group(cmds: Vec<Command>) -> Command {
    Command {
        now_ms: 3,
        mutations: vec![Mutation::Group(cmds)],
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::open(dir.path().join("db")).expect("open sled");
    let store = Store::open(&db).expect("open store");
    (dir, store)
}

fn label(store: &Store, id: &str) -> (String, u64) {
    let s = store
        .get_service(id)
        .expect("read")
        .expect("service exists");
    let l = s
        .spec
        .and_then(|sp| sp.labels.get("l").cloned())
        .unwrap_or_default();
    (l, s.meta.map(|m| m.version).unwrap_or(0))
}

#[test]
fn grouped_commands_apply_independently() {
    let (_dir, store) = open();
    assert_eq!(store.apply(1, &create("s1", "one")).result, Ok(vec![1]));
    assert_eq!(store.apply(2, &create("s2", "two")).result, Ok(vec![2]));

    let resp = store.apply(
        10,
        &group(vec![
            update("s1", "one", "a", 1),
            // Stale version: refused, and must not undo or block its neighbours.
            update("s2", "two", "stale", 1),
            create("s3", "three"),
            // The same object twice in one entry: the second saw the version before the first
            // and conflicts with it, as it would in its own entry.
            update("s1", "one", "b", 1),
        ]),
    );
    assert_eq!(resp.result, Ok(Vec::new()));
    assert_eq!(resp.each.len(), 4, "{resp:?}");
    assert_eq!(resp.each[0], Response::single(Ok(vec![10])));
    assert!(
        matches!(
            resp.each[1].result,
            Err(StoreError::VersionConflict {
                expected: 1,
                actual: 2,
                ..
            })
        ),
        "{:?}",
        resp.each[1]
    );
    assert_eq!(resp.each[2], Response::single(Ok(vec![10])));
    assert!(
        matches!(
            resp.each[3].result,
            Err(StoreError::VersionConflict {
                expected: 1,
                actual: 10,
                ..
            })
        ),
        "{:?}",
        resp.each[3]
    );

    assert_eq!(label(&store, "s1"), ("a".to_string(), 10));
    assert_eq!(label(&store, "s2"), ("0".to_string(), 2));
    assert_eq!(label(&store, "s3"), ("0".to_string(), 10));
    assert_eq!(store.list_services().expect("list").len(), 3);
}

#[test]
fn grouped_commands_publish_events_of_the_accepted_ones() {
    let (_dir, store) = open();
    assert!(store.apply(1, &create("s1", "one")).result.is_ok());
    let mut watch = store.watch();
    let resp = store.apply(
        5,
        &group(vec![
            update("s1", "one", "x", 99),
            update("s1", "one", "y", 1),
        ]),
    );
    assert!(resp.each[0].result.is_err());
    assert!(resp.each[1].result.is_ok());
    let ev = watch.try_recv().expect("one event");
    assert_eq!(ev.version, 5);
    assert_eq!(ev.object.kind(), Kind::Service);
    assert!(
        watch.try_recv().is_err(),
        "only the accepted update is published"
    );
}

#[test]
fn malformed_groups_are_refused_whole() {
    let (_dir, store) = open();
    // A group next to another mutation.
    let mut mixed = group(vec![create("s1", "one")]);
    mixed
        .mutations
        .push(Mutation::Create(Object::Service(service("s2", "two", "0"))));
    let resp = store.apply(1, &mixed);
    assert!(
        matches!(resp.result, Err(StoreError::Malformed(_))),
        "{resp:?}"
    );
    // A group inside a group: that inner command is refused, its neighbours are not.
    let resp = store.apply(
        2,
        &group(vec![
            group(vec![create("s3", "three")]),
            create("s4", "four"),
        ]),
    );
    assert!(
        matches!(resp.each[0].result, Err(StoreError::Malformed(_))),
        "{resp:?}"
    );
    assert_eq!(resp.each[1].result, Ok(vec![2]));
    let ids: Vec<String> = store
        .list_services()
        .expect("list")
        .into_iter()
        .filter_map(|s| s.meta.map(|m| m.id))
        .collect();
    assert_eq!(ids, vec!["s4".to_string()]);
}
