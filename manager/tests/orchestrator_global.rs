//! The global orchestrator over a real store: one task per eligible node, following joins,
//! pause, drain, label changes, removals and a node going down and coming back.

use crate::orchestrator_support;

use orchestrator_support::*;
use shoal_proto::v1::{NodeAvailability, NodeState, TaskState};

fn running_nodes(h: &Harness) -> Vec<String> {
    h.running_per_node("agent").into_keys().collect()
}

#[test]
fn global_service_follows_nodes() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.add_node("n2", &[], 4, 8 * GIB);
    h.create_service("agent", spec("agent", None));
    h.orchestrate();
    let tasks = h.tasks("agent");
    assert_eq!(tasks.len(), 2);
    assert!(tasks
        .iter()
        .all(|t| t.slot == 0 && state(t) == TaskState::Pending && !t.node_id.is_empty()));
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2"]);
    assert!(h.running_per_node("agent").values().all(|n| *n == 1));

    // A node joins.
    h.add_node("n3", &[], 4, 8 * GIB);
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2", "n3"]);

    // Pause keeps the task running.
    h.set_availability("n3", NodeAvailability::Pause);
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2", "n3"]);

    // Drain shuts it down; active again brings a new one.
    h.set_availability("n3", NodeAvailability::Drain);
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2"]);
    h.set_availability("n3", NodeAvailability::Active);
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2", "n3"]);
    assert_eq!(h.wanted("agent").len(), 3);

    // Down: shut down (nothing elsewhere); back: a new task.
    h.set_node_state("n2", NodeState::Down);
    h.settle();
    assert_eq!(h.wanted("agent").len(), 2);
    h.set_node_state("n2", NodeState::Ready);
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2", "n3"]);

    // Removal: its task is removed and deleted.
    h.remove_node("n1");
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n2", "n3"]);
    assert!(h.tasks("agent").iter().all(|t| t.node_id != "n1"));
}

#[test]
fn global_service_follows_label_changes() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.add_node("n2", &[("gpu", "yes")], 4, 8 * GIB);
    h.create_service(
        "agent",
        with_constraints(spec("agent", None), &["node.labels.gpu==yes"]),
    );
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n2"]);

    h.edit_node("n1", |n| {
        n.spec
            .get_or_insert_with(Default::default)
            .labels
            .insert("gpu".into(), "yes".into());
    });
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1", "n2"]);

    h.edit_node("n2", |n| {
        n.spec.get_or_insert_with(Default::default).labels.clear();
    });
    h.settle();
    assert_eq!(running_nodes(&h), vec!["n1"]);
}
