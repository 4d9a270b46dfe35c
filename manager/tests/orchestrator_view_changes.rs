//! The view's change classes (which leader components a task change wakes), its pending index,
//! and the byte budget of proposed commands.

use shoal_manager::orchestrator::view::{change, task_change};
use shoal_manager::orchestrator::{mutation_bytes, new_task, ClusterView, Decision};
use shoal_manager::store::{Action, Event, Mutation, Object};
use shoal_proto::v1::{
    service_spec::Mode, ContainerSpec, Meta, ReplicatedService, Service, ServiceSpec, Task,
    TaskSpec, TaskState, TaskStatus,
};

fn service() -> Service {
    Service {
        meta: Some(Meta {
            id: "svc".into(),
            version: 1,
            ..Default::default()
        }),
        spec: Some(ServiceSpec {
            name: "web".into(),
            task: Some(TaskSpec {
                container: Some(ContainerSpec {
                    image: "busybox@sha256:00".into(),
                    command: vec!["sleep".into(), "3600".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(Mode::Replicated(ReplicatedService { replicas: 3 })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn task(id: &str, slot: u64) -> Task {
    let mut t = new_task(&service(), slot, "", id.into(), 1);
    t.meta.as_mut().unwrap().version = 2;
    t
}

fn with_state(t: &Task, s: TaskState, node: &str) -> Task {
    let mut n = t.clone();
    n.node_id = node.into();
    n.status = Some(TaskStatus {
        state: s as i32,
        ..Default::default()
    });
    n.meta.as_mut().unwrap().version += 1;
    n
}

#[test]
fn task_changes_are_classified_by_who_must_react() {
    let pending = task("t1", 1);
    let assigned = with_state(&pending, TaskState::Assigned, "n1");
    let running = with_state(&assigned, TaskState::Running, "n1");
    let failed = with_state(&running, TaskState::Failed, "n1");

    assert_eq!(task_change(None, Some(&pending)), change::TASK_CREATED);
    assert_eq!(
        task_change(Some(&pending), Some(&assigned)),
        change::TASK_PROGRESS,
        "scheduling a pending task is progress"
    );
    assert_eq!(
        task_change(Some(&assigned), Some(&running)),
        change::TASK_PROGRESS
    );
    assert_eq!(
        task_change(Some(&running), Some(&failed)),
        change::TASK_SETTLED,
        "ending is settled"
    );
    let mut shut = running.clone();
    shut.desired_state = TaskState::Shutdown as i32;
    assert_eq!(
        task_change(Some(&running), Some(&shut)),
        change::TASK_SETTLED
    );
    let mut moved = running.clone();
    moved.node_id = "n2".into();
    assert_eq!(
        task_change(Some(&running), Some(&moved)),
        change::TASK_SETTLED
    );
    let mut released = pending.clone();
    released.not_before_ms = 5;
    assert_eq!(
        task_change(Some(&pending), Some(&released)),
        change::TASK_SETTLED,
        "a restart hold changing wakes the scheduler"
    );
    assert_eq!(task_change(Some(&running), None), change::TASK_SETTLED);
}

#[test]
fn view_counts_changes_by_class_and_indexes_pending_tasks() {
    let mut v = ClusterView::from_objects([Object::Service(service())]);
    let before = v.changes();
    let t = task("t1", 1);
    v.apply_event(&Event {
        version: 2,
        action: Action::Create,
        object: Object::Task(t.clone()),
        time_ms: 0,
    });
    let created = v.changes();
    assert!(created.since(&before, change::TASK_CREATED));
    assert!(!created.since(&before, change::TASK_PROGRESS | change::TASK_SETTLED));
    assert_eq!(v.pending_tasks().count(), 1);

    let assigned = with_state(&t, TaskState::Assigned, "n1");
    let running = with_state(&assigned, TaskState::Running, "n1");
    for (version, t) in [(3, &assigned), (4, &running)] {
        v.apply_event(&Event {
            version,
            action: Action::Update,
            object: Object::Task(t.clone()),
            time_ms: 0,
        });
    }
    let progressed = v.changes();
    assert!(progressed.since(&created, change::TASK_PROGRESS));
    assert!(
        !progressed.since(
            &created,
            change::SERVICES | change::NODES | change::TASK_CREATED | change::TASK_SETTLED
        ),
        "a task starting wakes nobody but the updater"
    );
    assert_eq!(v.pending_tasks().count(), 0, "no longer pending");

    v.apply_event(&Event {
        version: 5,
        action: Action::Delete,
        object: Object::Task(running),
        time_ms: 0,
    });
    assert!(v.changes().since(&progressed, change::TASK_SETTLED));
    assert!(v.tasks.is_empty());
}

#[test]
fn commands_stay_within_the_byte_budget_without_splitting_groups() {
    let mut d = Decision::default();
    for i in 0..200 {
        let t = task(&format!("t{i:03}"), i + 1);
        d.push_group(vec![
            Mutation::Create(Object::Task(t.clone())),
            Mutation::Create(Object::Task(task(&format!("u{i:03}"), i + 1))),
        ]);
    }
    let one = mutation_bytes(&Mutation::Create(Object::Task(task("t000", 1))));
    let budget = one * 30;
    let cmds = d.clone().into_commands_within(1, 1000, budget);
    assert!(cmds.len() > 1, "400 mutations do not fit one budget");
    let mut total = 0;
    for c in &cmds {
        let bytes: usize = c.mutations.iter().map(mutation_bytes).sum();
        assert!(bytes <= budget + 2 * one, "{bytes} > {budget}");
        assert_eq!(c.mutations.len() % 2, 0, "a group is never split");
        total += c.mutations.len();
    }
    assert_eq!(total, 400);
    // Without a byte budget, only the count limit applies.
    assert_eq!(d.into_commands(1, 1000).len(), 1);
}
