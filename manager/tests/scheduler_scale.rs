//! Scale: 100,000 pending tasks on 1,000 nodes are placed in one scheduling round. The time is
//! printed (run with `--nocapture`), not asserted: it depends on the machine and the profile.

use std::time::Instant;

use shoal_manager::orchestrator::{new_task, ClusterView, MAX_COMMAND_MUTATIONS};
use shoal_manager::scheduler;
use shoal_manager::store::{Mutation, Object};
use shoal_proto::v1::{
    service_spec::Mode, ContainerSpec, Meta, Node, NodeDescription, NodeSpec, NodeState,
    NodeStatus, ReplicatedService, Resources, Service, ServiceSpec, TaskSpec, TaskState,
};

const NODES: usize = 1_000;
const TASKS: u64 = 100_000;

#[test]
fn one_hundred_thousand_tasks_on_one_thousand_nodes() {
    let mut objects = Vec::new();
    for i in 0..NODES {
        objects.push(Object::Node(Node {
            meta: Some(Meta {
                id: format!("node{i:04}"),
                version: 1,
                ..Default::default()
            }),
            spec: Some(NodeSpec {
                labels: [("zone".to_string(), format!("z{}", i % 3))].into(),
                ..Default::default()
            }),
            description: Some(NodeDescription {
                hostname: format!("h{i}"),
                resources: Some(Resources {
                    nano_cpus: 64_000_000_000,
                    memory_bytes: 256 << 30,
                }),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                state: NodeState::Ready as i32,
                ..Default::default()
            }),
            ..Default::default()
        }));
    }
    let service = Service {
        meta: Some(Meta {
            id: "svc".into(),
            version: 2,
            ..Default::default()
        }),
        spec: Some(ServiceSpec {
            name: "big".into(),
            task: Some(TaskSpec {
                container: Some(ContainerSpec {
                    image: "busybox@sha256:00".into(),
                    command: vec!["sleep".into(), "3600".into()],
                    ..Default::default()
                }),
                resources: Some(shoal_proto::v1::ResourceRequirements {
                    reservations: Some(Resources {
                        nano_cpus: 10_000_000,
                        memory_bytes: 1 << 20,
                    }),
                    limits: None,
                }),
                placement: Some(shoal_proto::v1::Placement {
                    constraints: vec!["node.role==worker".into()],
                    preferences: vec![shoal_proto::v1::PlacementPreference {
                        spread_descriptor: "node.labels.zone".into(),
                    }],
                    max_replicas_per_node: 0,
                }),
                ..Default::default()
            }),
            mode: Some(Mode::Replicated(ReplicatedService { replicas: TASKS })),
            ..Default::default()
        }),
        ..Default::default()
    };
    for slot in 1..=TASKS {
        let mut t = new_task(&service, slot, "", format!("t{slot:06}"), 0);
        t.meta.as_mut().unwrap().version = 3;
        objects.push(Object::Task(t));
    }
    objects.push(Object::Service(service));
    let view = ClusterView::from_objects(objects);

    let started = Instant::now();
    let decision = scheduler::schedule(&view, 1);
    let elapsed = started.elapsed();
    let commands = decision.clone().into_commands(1, MAX_COMMAND_MUTATIONS);
    println!(
        "scheduled {} tasks on {NODES} nodes in {elapsed:?} ({} commands)",
        decision.mutations.len(),
        commands.len()
    );
    assert_eq!(decision.mutations.len(), TASKS as usize);
    assert_eq!(
        commands.len(),
        (TASKS as usize).div_ceil(MAX_COMMAND_MUTATIONS)
    );

    let mut per_node = std::collections::HashMap::<String, u64>::new();
    for m in &decision.mutations {
        let Mutation::Update {
            object: Object::Task(t),
            ..
        } = m
        else {
            panic!("unexpected mutation {m:?}");
        };
        assert_eq!(t.status.as_ref().unwrap().state, TaskState::Assigned as i32);
        *per_node.entry(t.node_id.clone()).or_default() += 1;
    }
    // Spread: every node gets its even share (100), give or take the zone rounding.
    assert_eq!(per_node.len(), NODES);
    assert!(
        per_node.values().all(|n| (99..=101).contains(n)),
        "uneven spread"
    );
}
