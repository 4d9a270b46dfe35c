//! The Raft state machine and log store on real sled files: applying store commands,
//! snapshots moved between stores, and restarts.

use std::collections::BTreeSet;

use openraft::storage::{
    RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::testing::log_id;
use openraft::{EntryPayload, Membership, StoredMembership};
use shoal_manager::raft::typ::{Entry, Vote};
use shoal_manager::raft::Storage;
use shoal_manager::store::{Action, Command, Kind, Mutation, Object, StoreError};
use shoal_proto::v1::{Meta, Node, Service, ServiceSpec, Task};

fn meta(id: &str) -> Option<Meta> {
    Some(Meta {
        id: id.to_string(),
        ..Default::default()
    })
}

fn service(id: &str, name: &str) -> Object {
    Object::Service(Service {
        meta: meta(id),
        spec: Some(ServiceSpec {
            name: name.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn task(id: &str, service_id: &str, node_id: &str) -> Object {
    Object::Task(Task {
        meta: meta(id),
        service_id: service_id.into(),
        node_id: node_id.into(),
        ..Default::default()
    })
}

fn node(id: &str) -> Object {
    Object::Node(Node {
        meta: meta(id),
        ..Default::default()
    })
}

fn normal(index: u64, mutations: Vec<Mutation>) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Command {
            now_ms: index as i64 * 1000,
            mutations,
        }),
    }
}

fn membership(index: u64, voters: &[u64]) -> Entry {
    let set: BTreeSet<u64> = voters.iter().copied().collect();
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Membership(Membership::new(vec![set], None)),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A membership entry, three store commands (one refused) in one apply call.
fn first_entries() -> Vec<Entry> {
    vec![
        membership(1, &[1, 2, 3]),
        normal(
            2,
            vec![
                Mutation::Create(service("s1", "web")),
                Mutation::Create(node("n1")),
                Mutation::Create(task("t1", "s1", "n1")),
            ],
        ),
        // Refused (name taken): must leave no trace but still count as applied.
        normal(3, vec![Mutation::Create(service("s2", "web"))]),
        normal(4, vec![Mutation::Create(task("t2", "s1", "n1"))]),
    ]
}

#[test]
fn apply_records_responses_data_and_applied_state_together() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut st = Storage::open(dir.path()).unwrap();
        let resps = st.state_machine.apply(first_entries()).await.unwrap();
        assert_eq!(resps.len(), 4);
        assert_eq!(resps[0].result, Ok(vec![]));
        assert_eq!(resps[1].result, Ok(vec![2, 2, 2]));
        assert!(matches!(resps[2].result, Err(StoreError::NameTaken { .. })));
        assert_eq!(resps[3].result, Ok(vec![4]));

        let (applied, mem) = st.state_machine.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 1, 4)));
        assert_eq!(mem.log_id(), &Some(log_id(1, 1, 1)));
        assert_eq!(st.store.get_service("s2").unwrap(), None);
        assert_eq!(st.store.tasks_by_node("n1").unwrap().len(), 2);
    });
}

#[test]
fn snapshot_installed_into_a_fresh_store_gives_identical_contents() {
    rt().block_on(async {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let mut a = Storage::open(dir_a.path()).unwrap();
        let mut b = Storage::open(dir_b.path()).unwrap();
        a.state_machine.apply(first_entries()).await.unwrap();

        // b holds an object the snapshot does not: installing must delete it.
        b.state_machine
            .apply(vec![normal(1, vec![Mutation::Create(node("stale"))])])
            .await
            .unwrap();
        let mut events = b.store.watch();

        let snap = a
            .state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(snap.meta.last_membership.log_id(), &Some(log_id(1, 1, 1)));
        let current = a
            .state_machine
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("kept");
        assert_eq!(current.meta, snap.meta);

        let mut recv = b.state_machine.begin_receiving_snapshot().await.unwrap();
        *recv = *snap.snapshot;
        b.state_machine
            .install_snapshot(&snap.meta, recv)
            .await
            .unwrap();

        assert_eq!(
            a.store.dump().unwrap(),
            b.store.dump().unwrap(),
            "identical trees"
        );
        assert_eq!(
            b.store.list_services().unwrap(),
            a.store.list_services().unwrap()
        );
        assert_eq!(
            b.store
                .get_service("web")
                .unwrap()
                .unwrap()
                .meta
                .unwrap()
                .id,
            "s1"
        );
        assert_eq!(b.store.tasks_by_service("s1").unwrap().len(), 2);
        assert_eq!(b.store.get_node("stale").unwrap(), None);
        assert_eq!(
            b.state_machine.applied_state().await.unwrap(),
            (
                Some(log_id(1, 1, 4)),
                StoredMembership::new(
                    Some(log_id(1, 1, 1)),
                    Membership::new(vec![[1, 2, 3].into_iter().collect()], None)
                )
            )
        );
        let b_current = b
            .state_machine
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("kept");
        assert_eq!(b_current.meta, snap.meta);

        // Watchers of b learn the difference: n1, s1, t1, t2 created; stale deleted.
        let got: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| (e.action, e.object.kind(), e.object.id().to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Action::Create, Kind::Node, "n1".to_string()),
                (Action::Delete, Kind::Node, "stale".to_string()),
                (Action::Create, Kind::Service, "s1".to_string()),
                (Action::Create, Kind::Task, "t1".to_string()),
                (Action::Create, Kind::Task, "t2".to_string()),
            ]
        );

        // b keeps applying from there.
        let r = b
            .state_machine
            .apply(vec![normal(
                5,
                vec![Mutation::Create(service("s3", "web"))],
            )])
            .await
            .unwrap();
        assert!(
            matches!(r[0].result, Err(StoreError::NameTaken { .. })),
            "name index restored"
        );
    });
}

#[test]
fn log_vote_state_and_snapshot_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let snap_meta = rt().block_on(async {
        let mut st = Storage::open(dir.path()).unwrap();
        st.log.save_vote(&Vote::new(3, 2)).await.unwrap();
        let entries = first_entries();
        // Through the real `append`, returning once its flush acknowledgement arrived.
        st.log.blocking_append(entries.clone()).await.unwrap();
        st.log.save_committed(Some(log_id(1, 1, 4))).await.unwrap();
        st.state_machine.apply(entries).await.unwrap();
        let snap = st
            .state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        st.log.purge(log_id(1, 1, 2)).await.unwrap();
        snap.meta
        // `st` dropped here: sled closes the database.
    });
    rt().block_on(async {
        let mut st = Storage::open(dir.path()).unwrap();
        assert_eq!(st.log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(
            st.log.read_committed().await.unwrap(),
            Some(log_id(1, 1, 4))
        );
        let state = st.log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 4)));
        let rest = st.log.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(
            rest.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(
            st.state_machine.applied_state().await.unwrap().0,
            Some(log_id(1, 1, 4))
        );
        assert_eq!(st.store.tasks_by_service("s1").unwrap().len(), 2);
        let current = st
            .state_machine
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("kept");
        assert_eq!(current.meta, snap_meta);
    });
}
