//! The scheduler: binds PENDING tasks to nodes (PENDING → ASSIGNED with `node_id`).
//!
//! A round takes every pending task that should run, groups identical ones (same service,
//! spec version and fixed node), and places each group in one pass: the nodes passing the
//! static filters (ready, active, constraints) go into a spread tree ([`spread::Tree`]), and
//! each task takes the best node that still has room (reservations, max replicas per node),
//! with per-node counters updated as it goes. A task that fits nowhere stays PENDING with
//! `scheduling_message = "no suitable node (…)"`; any change of nodes or tasks starts a new
//! round, so it is placed as soon as something fits. Tasks with a restart delay
//! (`not_before_ms`) wait for it.

pub mod constraint;
pub mod filter;
pub mod spread;

use std::collections::{BTreeMap, HashMap};

use shoal_proto::v1::{Node, Task, TaskState, TaskStatus};

use crate::orchestrator::view::{wants_running, ClusterView};
use crate::orchestrator::{update, Decision};
use filter::{dynamic_check, static_check, Load, Reasons, Requirements, Verdict};

/// The status message of a task the scheduler assigned.
pub const ASSIGNED_MESSAGE: &str = "scheduler assigned task to node";

/// One round: assign what fits, explain what does not.
pub fn schedule(view: &ClusterView, now_ms: i64) -> Decision {
    let mut d = Decision::default();
    let nodes: Vec<(&String, &Node)> = view.nodes.iter().collect();
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    // Reservations and task counts per node, including this round's assignments.
    let mut reserved: Vec<(i64, i64, u64)> = nodes
        .iter()
        .map(|(id, _)| {
            view.usage(id).map_or((0, 0, 0), |u| {
                (u.reserved_nano_cpus, u.reserved_memory_bytes, u.tasks)
            })
        })
        .collect();
    let mut round_per_service: HashMap<(&str, usize), u64> = HashMap::new();

    let mut groups: BTreeMap<(&str, u64, &str), Vec<&Task>> = BTreeMap::new();
    for t in view.pending_tasks() {
        if !wants_running(t) {
            continue;
        }
        if t.not_before_ms > now_ms {
            d.wake_at(t.not_before_ms);
            continue;
        }
        groups
            .entry((t.service_id.as_str(), t.spec_version, t.node_id.as_str()))
            .or_default()
            .push(t);
    }

    for ((service_id, _, fixed_node), mut tasks) in groups {
        tasks.sort_by_key(|t| (t.slot, crate::orchestrator::task_id(t)));
        let req = Requirements::of(tasks[0]);
        let candidates: Vec<usize> = if fixed_node.is_empty() {
            (0..nodes.len()).collect()
        } else {
            index.get(fixed_node).copied().into_iter().collect()
        };
        let service_tasks = |i: usize, round: &HashMap<(&str, usize), u64>| {
            view.usage(nodes[i].0)
                .and_then(|u| u.per_service.get(service_id).copied())
                .unwrap_or(0)
                + round.get(&(service_id, i)).copied().unwrap_or(0)
        };
        let eligible: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| static_check(nodes[i].1, &req) == Verdict::Fits)
            .collect();
        let levels: Vec<Vec<&str>> = req
            .spread_labels
            .iter()
            .map(|label| {
                nodes
                    .iter()
                    .map(|(_, n)| {
                        n.spec
                            .as_ref()
                            .and_then(|s| s.labels.get(label))
                            .map_or("", |v| v.as_str())
                    })
                    .collect()
            })
            .collect();
        let (mut tree, _) = {
            let key = |i: usize| (service_tasks(i, &round_per_service), reserved[i].2);
            spread::Tree::build(&eligible, &levels, &key)
        };

        let mut placed = 0;
        for t in &tasks {
            let pick = {
                let fits = |i: usize| {
                    let load = Load {
                        nano_cpus: reserved[i].0,
                        memory_bytes: reserved[i].1,
                        service_tasks: service_tasks(i, &round_per_service),
                    };
                    dynamic_check(nodes[i].1, load, &req) == Verdict::Fits
                };
                tree.pick(&fits)
            };
            let Some(i) = pick else {
                break;
            };
            reserved[i].0 += req.nano_cpus;
            reserved[i].1 += req.memory_bytes;
            reserved[i].2 += 1;
            *round_per_service.entry((service_id, i)).or_default() += 1;
            d.push(update(t, assigned(t, nodes[i].0, now_ms)));
            placed += 1;
        }
        if placed == tasks.len() {
            continue;
        }

        let mut reasons = Reasons::default();
        if !fixed_node.is_empty() && candidates.is_empty() {
            let msg = format!("no suitable node (node {fixed_node} is gone)");
            explain(&tasks[placed..], &msg, &mut d);
            continue;
        }
        for &i in &candidates {
            let node = nodes[i].1;
            let mut verdict = static_check(node, &req);
            if verdict == Verdict::Fits {
                let load = Load {
                    nano_cpus: reserved[i].0,
                    memory_bytes: reserved[i].1,
                    service_tasks: service_tasks(i, &round_per_service),
                };
                verdict = dynamic_check(node, load, &req);
            }
            reasons.count(node, &req, verdict);
        }
        explain(&tasks[placed..], &reasons.message(&req), &mut d);
    }
    d
}

/// Records why tasks stay pending (only where the message changed, to spare writes).
fn explain(tasks: &[&Task], message: &str, d: &mut Decision) {
    for t in tasks {
        if t.scheduling_message != message {
            let mut n = (*t).clone();
            n.scheduling_message = message.to_string();
            d.push(update(t, n));
        }
    }
}

fn assigned(t: &Task, node_id: &str, now_ms: i64) -> Task {
    let mut n = t.clone();
    n.node_id = node_id.to_string();
    n.scheduling_message.clear();
    n.status = Some(TaskStatus {
        state: TaskState::Assigned as i32,
        timestamp_ms: now_ms,
        message: ASSIGNED_MESSAGE.into(),
        ..Default::default()
    });
    n
}
