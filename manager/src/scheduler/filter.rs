//! Node filters: what a group of identical tasks requires of a node, and why a node was
//! refused (counted into the `no suitable node (…)` message).

use shoal_proto::v1::{Node, NodeAvailability, NodeState, Task};

use super::constraint::{spread_label, Constraint, ConstraintError};

/// What every task of one group (same service, same spec version, same fixed node) requires.
#[derive(Clone, Debug)]
pub struct Requirements {
    /// The placement constraints, or why they do not parse.
    pub constraints: Result<Vec<Constraint>, ConstraintError>,
    /// cpu reservation, nano-CPUs.
    pub nano_cpus: i64,
    /// Memory reservation, bytes.
    pub memory_bytes: i64,
    /// 0 = unlimited.
    pub max_replicas_per_node: u64,
    /// Label keys of the spread preferences, in order.
    pub spread_labels: Vec<String>,
    /// The task publishes a fixed host port in host mode: one task of the service per node.
    pub fixed_host_port: bool,
}

impl Requirements {
    /// The requirements written in `task`'s spec.
    pub fn of(task: &Task) -> Requirements {
        let spec = task.spec.as_ref();
        let placement = spec.and_then(|s| s.placement.as_ref());
        let (nano_cpus, memory_bytes) = crate::orchestrator::view::reservations(task);
        Requirements {
            constraints: Constraint::parse_all(
                placement.map(|p| p.constraints.as_slice()).unwrap_or(&[]),
            ),
            nano_cpus,
            memory_bytes,
            max_replicas_per_node: placement.map_or(0, |p| p.max_replicas_per_node),
            spread_labels: placement
                .map(|p| {
                    p.preferences
                        .iter()
                        .filter_map(|p| spread_label(&p.spread_descriptor).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            fixed_host_port: task
                .ports
                .iter()
                .any(|p| p.publish_mode == "host" && p.published_port > 0),
        }
    }
}

/// Why a node cannot take a task (or that it can).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The node can take it.
    Fits,
    /// Not READY or not ACTIVE.
    NotAvailable,
    /// Fails the constraint at this index.
    Constraint(usize),
    /// Constraints do not parse.
    BadConstraint,
    /// Not enough unreserved cpu.
    Cpu,
    /// Not enough unreserved memory.
    Memory,
    /// The service already runs max_replicas_per_node tasks there.
    MaxReplicas,
    /// The service already publishes its fixed host-mode ports there.
    HostPort,
}

/// True if the node accepts new tasks.
pub fn available(node: &Node) -> bool {
    node.status
        .as_ref()
        .is_some_and(|s| s.state == NodeState::Ready as i32)
        && node
            .spec
            .as_ref()
            .is_none_or(|s| s.availability == NodeAvailability::Active as i32)
}

/// The checks that do not change while a round assigns tasks: availability, constraints.
pub fn static_check(node: &Node, req: &Requirements) -> Verdict {
    if !available(node) {
        return Verdict::NotAvailable;
    }
    match &req.constraints {
        Err(_) => Verdict::BadConstraint,
        Ok(cs) => match cs.iter().position(|c| !c.matches(node)) {
            Some(i) => Verdict::Constraint(i),
            None => Verdict::Fits,
        },
    }
}

/// What a node has reserved so far in the round, and how many tasks of the group's service
/// it runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// Reserved cpu, nano-CPUs.
    pub nano_cpus: i64,
    /// Reserved memory, bytes.
    pub memory_bytes: i64,
    /// Tasks of the group's service on the node.
    pub service_tasks: u64,
}

/// The checks that change as tasks are assigned: reservations, max replicas per node.
pub fn dynamic_check(node: &Node, load: Load, req: &Requirements) -> Verdict {
    let res = node
        .description
        .as_ref()
        .and_then(|d| d.resources.as_ref())
        .map(|r| (r.nano_cpus, r.memory_bytes))
        .unwrap_or((0, 0));
    if req.nano_cpus > 0 && load.nano_cpus + req.nano_cpus > res.0 {
        return Verdict::Cpu;
    }
    if req.memory_bytes > 0 && load.memory_bytes + req.memory_bytes > res.1 {
        return Verdict::Memory;
    }
    if req.max_replicas_per_node > 0 && load.service_tasks >= req.max_replicas_per_node {
        return Verdict::MaxReplicas;
    }
    if req.fixed_host_port && load.service_tasks > 0 {
        return Verdict::HostPort;
    }
    Verdict::Fits
}

/// Counts of refusals over all nodes, for the message of a task that fits nowhere.
#[derive(Clone, Debug, Default)]
pub struct Reasons {
    nodes: usize,
    not_available: usize,
    bad_constraint: usize,
    /// Per constraint: nodes refused by it (first failing check) and nodes matching it.
    constraint_refused: Vec<usize>,
    constraint_matched: Vec<usize>,
    cpu: usize,
    memory: usize,
    max_replicas: usize,
    host_port: usize,
}

fn nodes(n: usize) -> String {
    if n == 1 {
        "1 node".into()
    } else {
        format!("{n} nodes")
    }
}

impl Reasons {
    /// Counts one node's verdict; `node` is used to count constraint matches independently.
    pub fn count(&mut self, node: &Node, req: &Requirements, verdict: Verdict) {
        self.nodes += 1;
        if let Ok(cs) = &req.constraints {
            self.constraint_refused.resize(cs.len(), 0);
            self.constraint_matched.resize(cs.len(), 0);
            for (i, c) in cs.iter().enumerate() {
                if c.matches(node) {
                    self.constraint_matched[i] += 1;
                }
            }
        }
        match verdict {
            Verdict::Fits => {}
            Verdict::NotAvailable => self.not_available += 1,
            Verdict::Constraint(i) => self.constraint_refused[i] += 1,
            Verdict::BadConstraint => self.bad_constraint += 1,
            Verdict::Cpu => self.cpu += 1,
            Verdict::Memory => self.memory += 1,
            Verdict::MaxReplicas => self.max_replicas += 1,
            Verdict::HostPort => self.host_port += 1,
        }
    }

    /// `no suitable node (…)` with the reasons, most fundamental first.
    pub fn message(&self, req: &Requirements) -> String {
        let mut parts = Vec::new();
        if self.nodes == 0 {
            parts.push("no nodes".to_string());
        }
        if let Err(e) = &req.constraints {
            parts.push(e.to_string());
        }
        if self.not_available > 0 {
            parts.push(format!(
                "{} not available for new tasks",
                nodes(self.not_available)
            ));
        }
        if let Ok(cs) = &req.constraints {
            for (i, c) in cs.iter().enumerate() {
                if self.nodes > 0 && self.constraint_matched[i] == 0 {
                    parts.push(format!("constraint {} matched no node", c.text));
                } else if self.constraint_refused[i] > 0 {
                    parts.push(format!(
                        "{} did not match constraint {}",
                        nodes(self.constraint_refused[i]),
                        c.text
                    ));
                }
            }
        }
        if self.cpu > 0 {
            parts.push(format!("{} had insufficient cpu", nodes(self.cpu)));
        }
        if self.memory > 0 {
            parts.push(format!("{} had insufficient memory", nodes(self.memory)));
        }
        if self.max_replicas > 0 {
            parts.push(format!(
                "{} already run max replicas per node ({})",
                nodes(self.max_replicas),
                req.max_replicas_per_node
            ));
        }
        if self.host_port > 0 {
            parts.push(format!(
                "host-mode port already in use on {}",
                nodes(self.host_port)
            ));
        }
        format!("no suitable node ({})", parts.join("; "))
    }
}
