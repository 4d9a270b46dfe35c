//! The replicated orchestrator, the restart supervisor and the reaper over a real store.

use crate::orchestrator_support;

use orchestrator_support::*;
use shoal_proto::v1::{NodeAvailability, NodeState, RestartCondition, TaskState};

fn slots(h: &Harness, service: &str) -> Vec<u64> {
    let mut s: Vec<u64> = h.wanted(service).iter().map(|t| t.slot).collect();
    s.sort();
    s
}

#[test]
fn three_replicas_are_created_pending_then_spread_one_per_node() {
    let mut h = Harness::new();
    for n in ["n1", "n2", "n3"] {
        h.add_node(n, &[], 4, 8 * GIB);
    }
    h.create_service("web", spec("web", Some(3)));
    h.orchestrate();
    let tasks = h.tasks("web");
    assert_eq!(tasks.len(), 3);
    assert!(tasks.iter().all(|t| state(t) == TaskState::Pending
        && desired(t) == TaskState::Running
        && t.node_id.is_empty()
        && t.service_name == "web"
        && t.spec.is_some()));
    assert_eq!(slots(&h, "web"), vec![1, 2, 3]);

    h.schedule();
    let mut nodes: Vec<String> = h
        .tasks("web")
        .iter()
        .map(|t| {
            assert_eq!(state(t), TaskState::Assigned);
            t.node_id.clone()
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec!["n1", "n2", "n3"]);
    // Nothing more to do once converged.
    assert_eq!(h.orchestrate() + h.schedule(), 0);
}

#[test]
fn scale_up_fills_free_slots_and_scale_down_prefers_loaded_nodes() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.create_service("web", spec("web", Some(2)));
    h.settle();
    // Both slots on n1; then two more nodes and two more slots: 3 → n2, 4 → n3.
    h.add_node("n2", &[], 4, 8 * GIB);
    h.add_node("n3", &[], 4, 8 * GIB);
    h.scale("web", 4);
    h.settle();
    assert_eq!(slots(&h, "web"), vec![1, 2, 3, 4]);
    let per_node = h.running_per_node("web");
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 1, 1]
    );

    // Scale to 3: the surplus comes from n1 (two tasks), its highest slot (2), not slot 4.
    h.scale("web", 3);
    h.orchestrate();
    let removed: Vec<_> = h
        .tasks("web")
        .into_iter()
        .filter(|t| desired(t) == TaskState::Remove)
        .collect();
    assert_eq!(removed.len(), 1);
    assert_eq!((removed[0].slot, removed[0].node_id.as_str()), (2, "n1"));
    h.settle();
    assert_eq!(slots(&h, "web"), vec![1, 3, 4]);
    // The removed task was stopped by its agent, then deleted by the reaper.
    assert_eq!(h.tasks("web").len(), 3);

    // Scale up reuses the free slot 2.
    h.scale("web", 5);
    h.settle();
    assert_eq!(slots(&h, "web"), vec![1, 2, 3, 4, 5]);
    h.scale("web", 0);
    h.settle();
    assert!(h.tasks("web").is_empty());
}

#[test]
fn scale_up_skips_slots_whose_task_is_still_stopping() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.create_service("web", spec("web", Some(2)));
    h.settle();
    assert!(h
        .tasks("web")
        .iter()
        .all(|t| state(t) == TaskState::Running));
    // Scale to 0 and straight back to 2, before the agent stopped the old tasks: their
    // containers still run in slots 1 and 2, so the new tasks take slots 3 and 4.
    h.scale("web", 0);
    h.orchestrate();
    h.scale("web", 2);
    h.orchestrate();
    assert_eq!(slots(&h, "web"), vec![3, 4]);
    // Once the old tasks stopped (and were reaped), scale-up reuses the low slots again.
    h.settle();
    h.scale("web", 4);
    h.settle();
    assert_eq!(slots(&h, "web"), vec![1, 2, 3, 4]);
}

#[test]
fn service_removal_removes_then_deletes_all_tasks() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    h.create_service("web", spec("web", Some(3)));
    h.create_service("db", spec("db", Some(1)));
    h.settle();
    h.remove_service("web");
    h.orchestrate();
    assert!(h
        .tasks("web")
        .iter()
        .all(|t| desired(t) == TaskState::Remove));
    h.settle();
    assert!(h.tasks("web").is_empty());
    assert_eq!(h.wanted("db").len(), 1);
}

#[test]
fn tasks_of_down_and_drained_nodes_are_replaced_elsewhere() {
    let mut h = Harness::new();
    for n in ["n1", "n2", "n3"] {
        h.add_node(n, &[], 4, 8 * GIB);
    }
    h.create_service("web", spec("web", Some(3)));
    h.settle();

    h.set_node_state("n1", NodeState::Down);
    h.settle();
    let per_node = h.running_per_node("web");
    assert_eq!(per_node.get("n1"), None);
    assert_eq!(per_node.values().sum::<usize>(), 3);
    assert_eq!(slots(&h, "web"), vec![1, 2, 3]);
    let stale: Vec<_> = h
        .tasks("web")
        .into_iter()
        .filter(|t| t.node_id == "n1")
        .collect();
    assert_eq!(stale.len(), 1);
    assert_eq!(desired(&stale[0]), TaskState::Shutdown);
    assert_eq!(state(&stale[0]), TaskState::Running);

    // Back up: its stale task is shut down by its agent (desired SHUTDOWN), not restarted.
    h.set_node_state("n1", NodeState::Ready);
    h.settle();
    let t = h
        .store
        .get_task(stale[0].meta.as_ref().unwrap().id.as_str())
        .unwrap()
        .unwrap();
    assert_eq!(state(&t), TaskState::Shutdown);
    assert_eq!(h.wanted("web").len(), 3);

    // Drain n2: its tasks go elsewhere.
    h.set_availability("n2", NodeAvailability::Drain);
    h.settle();
    let per_node = h.running_per_node("web");
    assert_eq!(per_node.get("n2"), None);
    assert_eq!(per_node.values().sum::<usize>(), 3);

    // A removed node's tasks are replaced, and the leftovers marked ORPHANED.
    h.set_availability("n2", NodeAvailability::Active);
    let on_n3: Vec<_> = h
        .wanted("web")
        .into_iter()
        .filter(|t| t.node_id == "n3")
        .collect();
    assert!(!on_n3.is_empty());
    h.remove_node("n3");
    h.settle();
    assert_eq!(h.running_per_node("web").values().sum::<usize>(), 3);
    for t in on_n3 {
        let t = h.store.get_task(&t.meta.unwrap().id).unwrap().unwrap();
        assert_eq!(state(&t), TaskState::Orphaned);
    }
}

#[test]
fn on_failure_restarts_stop_at_max_attempts() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    let policy = restart_policy(RestartCondition::OnFailure, 0, 3, 0);
    h.create_service("job", with_restart(spec("job", Some(1)), policy));
    h.settle();
    for attempt in 0..5 {
        let current = h.wanted("job");
        assert_eq!(current.len(), 1, "one task should run in the slot");
        let t = &current[0];
        if attempt == 4 {
            // The 4th failure ended it: it stays FAILED in its slot, nothing replaces it.
            assert_eq!(state(t), TaskState::Failed);
            break;
        }
        assert_eq!(state(t), TaskState::Running);
        h.report(&t.meta.as_ref().unwrap().id, TaskState::Failed, 1);
        h.now_ms += 1_000;
        h.settle();
    }
    assert_eq!(h.tasks("job").len(), 4);

    // A clean exit is not a failure.
    let policy = restart_policy(RestartCondition::OnFailure, 0, 0, 0);
    h.create_service("once", with_restart(spec("once", Some(1)), policy));
    h.settle();
    let t = h.wanted("once").remove(0);
    h.report(&t.meta.unwrap().id, TaskState::Complete, 0);
    h.settle();
    assert_eq!(h.tasks("once").len(), 1);
}

#[test]
fn max_attempts_count_only_within_the_window() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    let policy = restart_policy(RestartCondition::Any, 0, 1, 10_000);
    h.create_service("job", with_restart(spec("job", Some(1)), policy));
    h.settle();
    let fail = |h: &mut Harness| {
        let t = h.wanted("job").remove(0);
        h.report(&t.meta.unwrap().id, TaskState::Failed, 1);
        h.settle();
    };
    fail(&mut h); // restart 1 at t0
    h.now_ms += 20_000; // outside the window: allowed again
    fail(&mut h);
    assert_eq!(state(&h.wanted("job")[0]), TaskState::Running);
    h.now_ms += 1_000; // inside: refused
    fail(&mut h);
    assert_eq!(state(&h.wanted("job")[0]), TaskState::Failed);
}

#[test]
fn restart_delay_holds_the_replacement_pending() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    let policy = restart_policy(RestartCondition::Any, 5_000, 0, 0);
    h.create_service("job", with_restart(spec("job", Some(1)), policy));
    h.settle();
    let t = h.wanted("job").remove(0);
    h.report(&t.meta.unwrap().id, TaskState::Complete, 0);
    h.settle();
    let next = h.wanted("job").remove(0);
    assert_eq!(state(&next), TaskState::Pending);
    assert_eq!(next.not_before_ms, h.now_ms + 5_000);
    assert_eq!(next.restart_history_ms, vec![h.now_ms]);
    h.now_ms += 5_000;
    h.settle();
    assert_eq!(state(&h.wanted("job")[0]), TaskState::Running);
}

#[test]
fn task_history_is_trimmed_to_five_per_slot() {
    let mut h = Harness::new();
    h.add_node("n1", &[], 4, 8 * GIB);
    let policy = restart_policy(RestartCondition::Any, 0, 0, 0);
    h.create_service("job", with_restart(spec("job", Some(2)), policy));
    h.settle();
    for _ in 0..8 {
        for t in h.wanted("job") {
            h.report(&t.meta.unwrap().id, TaskState::Failed, 2);
        }
        h.now_ms += 1_000;
        h.settle();
    }
    let tasks = h.tasks("job");
    for slot in [1, 2] {
        let in_slot: Vec<_> = tasks.iter().filter(|t| t.slot == slot).collect();
        assert_eq!(in_slot.len(), 5, "slot {slot}");
        assert_eq!(
            in_slot
                .iter()
                .filter(|t| desired(t) == TaskState::Running)
                .count(),
            1
        );
        // The newest survive: the running task and the last four failures.
        let newest_failed = in_slot
            .iter()
            .filter(|t| state(t) == TaskState::Failed)
            .map(|t| t.meta.as_ref().unwrap().created_at_ms)
            .min()
            .unwrap();
        assert_eq!(newest_failed, h.now_ms - 4_000);
    }
}
