//! The replicated orchestrator: each replicated service has slots 1..N, each slot one task that
//! should run.
//!
//! - Missing slots get new PENDING tasks (the lowest free slot numbers).
//! - Surplus slots get desired state REMOVE (the agent stops the task; the reaper deletes it):
//!   unassigned tasks first, then the nodes running the most tasks of the service, the highest
//!   slot first among equals.
//! - A task that should run on a node that is gone, down or drained is retired (desired
//!   SHUTDOWN) and replaced in the same slot by a new PENDING task, in one command.
//! - Tasks on an old spec are left to the updater (a start-first update's pair in one slot
//!   included).

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use shoal_proto::v1::service_spec::Mode;
use shoal_proto::v1::{NodeAvailability, NodeState, Service, Task, TaskState};

use super::updater::is_current;
use super::view::{is_terminal, wants_running, ClusterView};
use super::{create, new_task, task_id, update, with_desired, Decision};

/// The replica count of a replicated service, `None` for other modes.
pub fn replicas(service: &Service) -> Option<u64> {
    match service.spec.as_ref()?.mode.as_ref()? {
        Mode::Replicated(r) => Some(r.replicas),
        Mode::Global(_) => None,
    }
}

/// True if tasks on `node_id` must be replaced elsewhere: the node is gone, down or drained.
pub fn node_lost(view: &ClusterView, node_id: &str) -> bool {
    match view.nodes.get(node_id) {
        None => true,
        Some(n) => {
            n.status
                .as_ref()
                .is_some_and(|s| s.state == NodeState::Down as i32)
                || n.spec
                    .as_ref()
                    .is_some_and(|s| s.availability == NodeAvailability::Drain as i32)
        }
    }
}

/// One round over every replicated service.
pub fn reconcile(view: &ClusterView, now_ms: i64, ids: &mut dyn FnMut() -> String) -> Decision {
    let mut d = Decision::default();
    for service in view.services.values() {
        if let Some(n) = replicas(service) {
            reconcile_service(view, service, n, now_ms, ids, &mut d);
        }
    }
    d
}

/// The task of a slot that should run, as the scale decisions see it.
struct Occupant<'a> {
    /// The stored task; `None` for a replacement created in this round.
    task: Option<&'a Task>,
    node_id: &'a str,
}

fn reconcile_service(
    view: &ClusterView,
    service: &Service,
    replicas: u64,
    now_ms: i64,
    ids: &mut dyn FnMut() -> String,
    d: &mut Decision,
) {
    let service_id = service.meta.as_ref().map_or("", |m| m.id.as_str());
    let mut slots: BTreeMap<u64, Vec<Occupant<'_>>> = BTreeMap::new();
    // Slots whose task is being stopped (scale-down, service update) on a live node: a new
    // task there would run next to the old one until it stops, so scale-up skips them.
    let mut stopping: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for t in view.tasks_of_service(service_id) {
        if t.slot == 0 {
            continue;
        }
        if !wants_running(t) {
            if !is_terminal(t) && !t.node_id.is_empty() && !node_lost(view, &t.node_id) {
                stopping.insert(t.slot);
            }
            continue;
        }
        if !is_terminal(t) && !t.node_id.is_empty() && node_lost(view, &t.node_id) {
            let mut replacement = new_task(service, t.slot, "", ids(), now_ms);
            replacement.restart_history_ms = t.restart_history_ms.clone();
            d.push_group(vec![
                update(t, with_desired(t, TaskState::Shutdown)),
                create(replacement),
            ]);
            slots.entry(t.slot).or_default().push(Occupant {
                task: None,
                node_id: "",
            });
            continue;
        }
        slots.entry(t.slot).or_default().push(Occupant {
            task: Some(t),
            node_id: &t.node_id,
        });
    }

    // Never two tasks that should run in one slot: keep the newest, retire the others. A
    // start-first update's pair (an old-spec task and its replacement) is the updater's.
    for occupants in slots.values_mut() {
        if occupants.len() < 2 || start_first_pair(service, occupants) {
            continue;
        }
        debug_assert!(
            occupants.iter().filter(|o| o.task.is_none()).count() <= 1,
            "two replacements in one slot"
        );
        let newest = |o: &Occupant<'_>| {
            o.task.map_or((i64::MAX, String::new()), |t| {
                (
                    t.meta.as_ref().map_or(0, |m| m.created_at_ms),
                    task_id(t).to_string(),
                )
            })
        };
        occupants.sort_by_key(|o| std::cmp::Reverse(newest(o)));
        for extra in occupants.drain(1..) {
            if let Some(t) = extra.task {
                tracing::error!(
                    task = task_id(t),
                    slot = t.slot,
                    "two tasks should run in one slot; shutting down the older"
                );
                d.push(update(t, with_desired(t, TaskState::Shutdown)));
            }
        }
    }

    let occupied = slots.len() as u64;
    if occupied < replicas {
        let mut slot = 1u64;
        for _ in occupied..replicas {
            while slots.contains_key(&slot) || stopping.contains(&slot) {
                slot += 1;
            }
            d.push(create(new_task(service, slot, "", ids(), now_ms)));
            slot += 1;
        }
    } else if occupied > replicas {
        for slot in pick_surplus(&slots, (occupied - replicas) as usize) {
            for o in &slots[&slot] {
                if let Some(t) = o.task {
                    d.push(update(t, with_desired(t, TaskState::Remove)));
                }
            }
        }
    }
}

/// Two stored tasks, one on the service's current spec and one on an old spec.
fn start_first_pair(service: &Service, occupants: &[Occupant<'_>]) -> bool {
    let [a, b] = occupants else {
        return false;
    };
    match (a.task, b.task) {
        (Some(a), Some(b)) => is_current(service, a) != is_current(service, b),
        _ => false,
    }
}

/// Chooses `count` slots to remove: unassigned ones first (highest slot first), then one at a
/// time from the node running the most of the service's slots (ties: the highest slot).
fn pick_surplus(slots: &BTreeMap<u64, Vec<Occupant<'_>>>, count: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(count);
    let mut by_node: HashMap<&str, Vec<u64>> = HashMap::new();
    // Slots with a replacement made this round are left for the next round.
    for (slot, occ) in slots.iter().rev() {
        let Some(o) = occ.first().filter(|o| o.task.is_some()) else {
            continue;
        };
        if o.node_id.is_empty() {
            if out.len() < count {
                out.push(*slot);
            }
        } else {
            by_node.entry(o.node_id).or_default().push(*slot);
        }
    }
    // Each node's slots are in descending order; the heap holds (count, highest slot, node).
    let mut heap: BinaryHeap<(usize, u64, &str)> = by_node
        .iter()
        .map(|(node, s)| (s.len(), s[0], *node))
        .collect();
    let mut cursor: HashMap<&str, usize> = HashMap::new();
    while out.len() < count {
        let Some((n, top, node)) = heap.pop() else {
            break;
        };
        out.push(top);
        let next = cursor.entry(node).or_insert(0);
        *next += 1;
        if n > 1 {
            heap.push((n - 1, by_node[node][*next], node));
        }
    }
    out
}
