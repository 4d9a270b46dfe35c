//! The scheduler over a real store: constraints, reservations, max replicas per node, spread
//! preferences, and the reasons a task stays pending.

use crate::orchestrator_support;

use orchestrator_support::*;
use shoal_proto::v1::{NodeAvailability, NodeState, Placement, TaskState};

fn pending_messages(h: &Harness, service: &str) -> Vec<String> {
    h.tasks(service)
        .into_iter()
        .filter(|t| state(t) == TaskState::Pending)
        .map(|t| t.scheduling_message)
        .collect()
}

#[test]
fn unsatisfiable_constraint_stays_pending_with_reason_until_a_label_matches() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.add_node("n2", &[("zone", "west")], 4, 8 * GIB);
    h.add_node("n3", &[], 4, 8 * GIB);
    h.add_node("n4", &[], 4, 8 * GIB);
    h.set_node_state("n3", NodeState::Down);
    h.set_availability("n4", NodeAvailability::Pause);
    h.create_service(
        "web",
        with_constraints(spec("web", Some(2)), &["node.labels.zone==east"]),
    );
    h.settle();
    let msgs = pending_messages(&h, "web");
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0],
        "no suitable node (2 nodes not available for new tasks; \
         constraint node.labels.zone==east matched no node)"
    );
    // Settled: the message is not rewritten every round.
    assert_eq!(h.schedule(), 0);

    h.edit_node("n1", |n| {
        n.spec
            .get_or_insert_with(Default::default)
            .labels
            .insert("zone".into(), "east".into());
    });
    h.settle();
    let tasks = h.tasks("web");
    assert!(tasks.iter().all(|t| state(t) == TaskState::Running
        && t.node_id == "n1"
        && t.scheduling_message.is_empty()));
}

#[test]
fn reservations_are_respected() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 2, GIB);
    h.add_node("n2", &[], 2, GIB);
    // 600 MiB each: one per node fits, a third fits nowhere.
    h.create_service(
        "db",
        with_reservation(spec("db", Some(3)), 500_000_000, 600 << 20),
    );
    h.settle();
    assert_eq!(
        h.running_per_node("db")
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
    assert_eq!(
        pending_messages(&h, "db"),
        vec!["no suitable node (2 nodes had insufficient memory)".to_string()]
    );
    // cpu: 2 CPUs per node, 1.5 already... a 1.6 CPU task fits nowhere.
    h.create_service(
        "cpu",
        with_reservation(spec("cpu", Some(1)), 1_600_000_000, 0),
    );
    h.settle();
    assert_eq!(
        pending_messages(&h, "cpu"),
        vec!["no suitable node (2 nodes had insufficient cpu)".to_string()]
    );
    // A bigger node joins: the pending db task lands there.
    h.add_node("n3", &[], 4, 4 * GIB);
    h.settle();
    assert_eq!(h.running_per_node("db").get("n3"), Some(&1));
    assert_eq!(h.running_per_node("cpu").get("n3"), Some(&1));
    // Freed reservations are reusable: scale db down, the slot frees memory on its node.
    h.scale("db", 0);
    h.settle();
    h.create_service("db2", with_reservation(spec("db2", Some(2)), 0, 900 << 20));
    h.settle();
    assert_eq!(h.running_per_node("db2").len(), 2);
}

#[test]
fn max_replicas_per_node_is_respected() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.add_node("n2", &[], 4, 8 * GIB);
    let mut s = spec("web", Some(5));
    s.task.as_mut().unwrap().placement = Some(Placement {
        max_replicas_per_node: 2,
        ..Default::default()
    });
    h.create_service("web", s);
    h.settle();
    assert_eq!(
        h.running_per_node("web")
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![2, 2]
    );
    assert_eq!(
        pending_messages(&h, "web"),
        vec!["no suitable node (2 nodes already run max replicas per node (2))".to_string()]
    );
}

#[test]
fn spread_preference_balances_label_values_first() {
    let mut h = Harness::new();
    h.add_node("a1", &[("zone", "a")], 4, 8 * GIB);
    h.add_node("a2", &[("zone", "a")], 4, 8 * GIB);
    h.add_node("a3", &[("zone", "a")], 4, 8 * GIB);
    h.add_node("b1", &[("zone", "b")], 4, 8 * GIB);
    h.create_service("web", with_spread(spec("web", Some(4)), "node.labels.zone"));
    h.settle();
    let per_node = h.running_per_node("web");
    assert_eq!(per_node.get("b1"), Some(&2), "{per_node:?}");
    assert_eq!(
        ["a1", "a2", "a3"]
            .iter()
            .map(|n| per_node.get(*n).copied().unwrap_or(0))
            .sum::<usize>(),
        2
    );
    assert!(per_node.values().all(|n| *n <= 2));

    // Without the preference, plain spread: fewest tasks of the service per node.
    h.create_service("api", spec("api", Some(4)));
    h.settle();
    assert!(h.running_per_node("api").values().all(|n| *n == 1));
}

#[test]
fn spread_counts_other_services_as_a_tie_breaker() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.add_node("n2", &[], 4, 8 * GIB);
    h.create_service(
        "busy",
        with_constraints(spec("busy", Some(3)), &["node.id==n1"]),
    );
    h.settle();
    h.create_service("web", spec("web", Some(1)));
    h.settle();
    assert_eq!(
        h.running_per_node("web").into_keys().collect::<Vec<_>>(),
        vec!["n2"]
    );
}
