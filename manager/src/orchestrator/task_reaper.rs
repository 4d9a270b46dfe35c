//! The task reaper: the end of a task's life.
//!
//! - Tasks of a deleted service get desired REMOVE.
//! - Tasks with desired REMOVE are deleted once they ended, were never assigned, or their node
//!   is gone; tasks retired before they were assigned are deleted too.
//! - Tasks still holding a node that is gone, or down for longer than [`ORPHAN_AFTER_MS`], and
//!   that should no longer run, are marked ORPHANED (nobody will ever report on them).
//! - Each slot keeps at most the cluster's task history (5): the oldest ended tasks go.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use shoal_proto::v1::{NodeState, Task, TaskState};

use super::view::{is_terminal, state, wants_running, ClusterView};
use super::{delete, task_id, update, with_desired, Decision};

/// A node down for this long has its leftover tasks marked ORPHANED (swarmkit: 24 h).
pub const ORPHAN_AFTER_MS: i64 = 24 * 60 * 60 * 1000;

/// One round of the reaper.
pub fn reap(view: &ClusterView, now_ms: i64) -> Decision {
    let mut d = Decision::default();
    // One mutation per task per round: a second would conflict with the first in its command.
    let mut touched: HashSet<&str> = HashSet::new();

    for service_id in view.service_ids_with_tasks() {
        // No service: standalone containers' network attachments, theirs to give back.
        if view.services.contains_key(service_id) || service_id.is_empty() {
            continue;
        }
        for t in view.tasks_of_service(service_id) {
            if t.desired_state < TaskState::Remove as i32 && touched.insert(task_id(t)) {
                d.push(update(t, with_desired(t, TaskState::Remove)));
            }
        }
    }

    let assigned = TaskState::Assigned as i32;
    for t in view.tasks.values() {
        if touched.contains(task_id(t)) {
            continue;
        }
        let node = (!t.node_id.is_empty()).then(|| view.nodes.get(&t.node_id));
        let node_gone = matches!(node, Some(None));
        if t.network_attachment {
            // Given back by its container's removal, or with its node.
            if node_gone {
                touched.insert(task_id(t));
                d.push(delete(t));
            }
            continue;
        }
        let never_assigned = state(t) < assigned;
        if t.desired_state >= TaskState::Remove as i32
            && (is_terminal(t) || never_assigned || node_gone)
            || (!wants_running(t) && never_assigned)
        {
            touched.insert(task_id(t));
            d.push(delete(t));
            continue;
        }
        if wants_running(t) || is_terminal(t) || never_assigned {
            continue;
        }
        let orphan = match node {
            Some(None) => true,
            Some(Some(n))
                if n.status
                    .as_ref()
                    .is_some_and(|s| s.state == NodeState::Down as i32) =>
            {
                let since = n.meta.as_ref().map_or(0, |m| m.updated_at_ms);
                if now_ms - since >= ORPHAN_AFTER_MS {
                    true
                } else {
                    d.wake_at(since + ORPHAN_AFTER_MS);
                    false
                }
            }
            _ => false,
        };
        if orphan {
            let mut n = t.clone();
            let status = n.status.get_or_insert_with(Default::default);
            status.state = TaskState::Orphaned as i32;
            status.timestamp_ms = now_ms;
            status.message = "node is gone: task orphaned".into();
            touched.insert(task_id(t));
            d.push(update(t, n));
        }
    }

    trim_history(view, &touched, &mut d);
    d
}

/// Deletes the oldest ended tasks of each slot beyond the cluster's history limit.
fn trim_history(view: &ClusterView, touched: &HashSet<&str>, d: &mut Decision) {
    let limit = view.task_history_per_slot();
    // Only services with ended tasks can have something to trim; most rounds of a large
    // steady cluster look at no slot at all.
    let services: BTreeSet<&str> = view
        .tasks
        .values()
        .filter(|t| !wants_running(t) && is_terminal(t))
        .map(|t| t.service_id.as_str())
        .collect();
    let mut slots: BTreeMap<(&str, u64, &str), Vec<&Task>> = BTreeMap::new();
    for t in services.into_iter().flat_map(|s| view.tasks_of_service(s)) {
        let node = if t.slot == 0 { t.node_id.as_str() } else { "" };
        slots
            .entry((t.service_id.as_str(), t.slot, node))
            .or_default()
            .push(t);
    }
    for tasks in slots.values() {
        if tasks.len() <= limit {
            continue;
        }
        let mut ended: Vec<&&Task> = tasks
            .iter()
            .filter(|t| !wants_running(t) && is_terminal(t) && !touched.contains(task_id(t)))
            .collect();
        ended.sort_by_key(|t| (t.meta.as_ref().map_or(0, |m| m.created_at_ms), task_id(t)));
        for t in ended.into_iter().take(tasks.len() - limit) {
            d.push(delete(t));
        }
    }
}
