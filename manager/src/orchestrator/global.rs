//! The global orchestrator: one task per eligible node for each global service.
//!
//! A node gets a task when it is READY, ACTIVE and matches the service's constraints. A node
//! that is paused keeps its task (no new one); a drained or down node, or one that no longer
//! matches, has its task shut down (desired SHUTDOWN); a removed node's task gets desired
//! REMOVE (the reaper deletes it). A down node that comes back READY gets a new task.

use std::collections::HashMap;

use shoal_proto::v1::service_spec::Mode;
use shoal_proto::v1::{Node, NodeAvailability, NodeState, Service, Task, TaskState};

use super::updater::is_current;
use super::view::{wants_running, ClusterView};
use super::{create, new_task, task_id, update, with_desired, Decision};
use crate::scheduler::constraint::Constraint;

/// True for a global service.
pub fn is_global(service: &Service) -> bool {
    matches!(
        service.spec.as_ref().and_then(|s| s.mode.as_ref()),
        Some(Mode::Global(_))
    )
}

/// The parsed constraints of a service's tasks; `None` if one does not parse (then no node
/// matches: the control API refuses such specs, so this is only a stored-data defect).
pub fn service_constraints(service: &Service) -> Option<Vec<Constraint>> {
    let list = service
        .spec
        .as_ref()
        .and_then(|s| s.task.as_ref())
        .and_then(|t| t.placement.as_ref())
        .map(|p| p.constraints.as_slice())
        .unwrap_or(&[]);
    Constraint::parse_all(list).ok()
}

/// One round over every global service.
pub fn reconcile(view: &ClusterView, now_ms: i64, ids: &mut dyn FnMut() -> String) -> Decision {
    let mut d = Decision::default();
    for service in view.services.values() {
        if is_global(service) {
            reconcile_service(view, service, now_ms, ids, &mut d);
        }
    }
    d
}

fn matches_all(constraints: &Option<Vec<Constraint>>, node: &Node) -> bool {
    constraints
        .as_ref()
        .is_some_and(|cs| cs.iter().all(|c| c.matches(node)))
}

fn reconcile_service(
    view: &ClusterView,
    service: &Service,
    now_ms: i64,
    ids: &mut dyn FnMut() -> String,
    d: &mut Decision,
) {
    let service_id = service.meta.as_ref().map_or("", |m| m.id.as_str());
    let constraints = service_constraints(service);
    let mut by_node: HashMap<&str, Vec<&Task>> = HashMap::new();
    for t in view.tasks_of_service(service_id) {
        if wants_running(t) && !t.node_id.is_empty() {
            by_node.entry(t.node_id.as_str()).or_default().push(t);
        }
    }
    for (node_id, node) in &view.nodes {
        let state = node.status.as_ref().map_or(0, |s| s.state);
        let availability = node.spec.as_ref().map_or(0, |s| s.availability);
        let matches = matches_all(&constraints, node);
        let keep = matches
            && state != NodeState::Down as i32
            && availability != NodeAvailability::Drain as i32;
        let eligible = matches
            && state == NodeState::Ready as i32
            && availability == NodeAvailability::Active as i32;
        let mut tasks = by_node.remove(node_id.as_str()).unwrap_or_default();
        if !keep {
            for t in tasks {
                d.push(update(t, with_desired(t, TaskState::Shutdown)));
            }
            continue;
        }
        if tasks.is_empty() {
            if eligible {
                d.push(create(new_task(service, 0, node_id, ids(), now_ms)));
            }
            continue;
        }
        // A start-first update's pair (old spec + replacement) is the updater's.
        if let [a, b] = tasks.as_slice() {
            if is_current(service, a) != is_current(service, b) {
                continue;
            }
        }
        // Never two tasks of one service that should run on one node: keep the newest.
        tasks.sort_by_key(|t| {
            std::cmp::Reverse((t.meta.as_ref().map_or(0, |m| m.created_at_ms), task_id(t)))
        });
        for t in tasks.drain(1..) {
            tracing::error!(
                task = task_id(t),
                node = node_id.as_str(),
                "two tasks of a global service should run on one node; shutting down the older"
            );
            d.push(update(t, with_desired(t, TaskState::Shutdown)));
        }
    }
    // What is left is on nodes that no longer exist.
    let mut gone: Vec<&Task> = by_node.into_values().flatten().collect();
    gone.sort_by_key(|t| task_id(t));
    for t in gone {
        d.push(update(t, with_desired(t, TaskState::Remove)));
    }
}
