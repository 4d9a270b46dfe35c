//! The update orchestrator: rolls a service's tasks onto its current spec, `parallelism` slots
//! at a time, as swarmkit's updater does, and runs the failure action when too many of the new
//! tasks fail.
//!
//! Everything it knows is in the store, so a new leader resumes an update exactly where it
//! was: the service's `update_status` says whether an update (or a rollback) is running and
//! since when; the tasks say which slots still run an old spec (their `spec` differs from the
//! service's task spec), which new tasks this update made (created since `started_at_ms`) and
//! how they fared. The one thing kept in memory is when this leader first saw each new task
//! up (RUNNING, and healthy when it has a health check), to judge "failed within the monitor
//! window" more precisely than from its creation.
//!
//! - A slot is *dirty* while it has a task that should run on an old spec and none on the
//!   current one. Dirty slots are started in order (slots whose task is not running first),
//!   while fewer than `parallelism` slots are *busy* (their new task not yet up: RUNNING, and
//!   healthy if it has a health check) or cooling down (`delay` after their new task ran).
//! - stop-first: the old task gets desired SHUTDOWN and its replacement is created in the same
//!   command, held (`not_before_ms` = [`HOLD`]: the scheduler leaves it PENDING) until the old
//!   task has stopped. start-first: the replacement is created beside the old task, which is
//!   shut down once the replacement is up.
//! - A new task that is rejected, fails or exits within `monitor` of being up is a failure, and
//!   so is one stopped as unhealthy before this leader saw it up (docker: it never left
//!   STARTING); when
//!   failures / slots passes `max_failure_ratio`, the failure action runs: pause (PAUSED or
//!   ROLLBACK_PAUSED), continue, or rollback (the previous spec swapped in, ROLLBACK_STARTED;
//!   a rollback is never itself rolled back).
//! - The update is COMPLETED (ROLLBACK_COMPLETED) once no slot is dirty or busy and every new
//!   task has run through its monitor window.
//! - Held replacements are released and start-first pairs resolved for every service, paused
//!   or not, so no slot is left down or doubled.

use std::collections::{BTreeMap, HashMap};

use shoal_proto::v1::{
    FailureAction, HealthState, Service, Task, TaskState, UpdateConfig, UpdateOrder, UpdateState,
    UpdateStatus,
};

use super::global::{is_global, service_constraints};
use super::replicated::node_lost;
use super::view::{is_terminal, is_up, state, wants_running, ClusterView};
use super::{create, new_task, spec_version, task_id, update, with_desired, Decision};
use crate::store::{Mutation, Object};

/// `not_before_ms` of a stop-first replacement waiting for the old task to stop.
pub const HOLD: i64 = i64::MAX;
/// Default monitor window when a service has no update config (docker's 5 s).
pub const DEFAULT_MONITOR_MS: u64 = 5_000;

/// Docker's update config when the spec has none.
pub fn default_config() -> UpdateConfig {
    UpdateConfig {
        parallelism: 1,
        delay_ms: 0,
        failure_action: FailureAction::Pause as i32,
        monitor_ms: DEFAULT_MONITOR_MS,
        max_failure_ratio: 0.0,
        order: UpdateOrder::StopFirst as i32,
    }
}

/// True if `t` was made from the service's current task spec. Tasks made since the spec was
/// last written carry its version (the cheap check that settles nearly every task of a large
/// steady cluster); the others are compared by content.
pub fn is_current(service: &Service, t: &Task) -> bool {
    (t.spec_version != 0 && t.spec_version == spec_version(service))
        || t.spec.as_ref() == service.spec.as_ref().and_then(|s| s.task.as_ref())
}

/// The update state of a service (UNKNOWN when none was ever recorded).
pub fn update_state(service: &Service) -> UpdateState {
    service
        .update_status
        .as_ref()
        .map_or(UpdateState::Unknown, |u| u.state())
}

/// The config a running update follows: the rollback config while rolling back.
pub fn config(service: &Service, rollback: bool) -> UpdateConfig {
    let spec = service.spec.as_ref();
    let c = if rollback {
        spec.and_then(|s| s.rollback)
    } else {
        spec.and_then(|s| s.update)
    };
    c.unwrap_or_else(default_config)
}

/// The update orchestrator's memory across rounds: when each task of a service under update
/// was first seen RUNNING (bounded by the tasks in the view: entries of tasks that left it are
/// dropped every round).
#[derive(Debug, Default)]
pub struct Updater {
    running_since: HashMap<String, i64>,
}

/// One slot (replicated) or node (global) of a service, as the updater sees it.
#[derive(Default)]
struct Slot<'a> {
    /// The slot number (replicated) or 0 (global).
    slot: u64,
    /// The node (global services).
    node_id: &'a str,
    /// Tasks that should run, on an old spec.
    old_live: Vec<&'a Task>,
    /// Tasks that should run, on the current spec.
    new_live: Vec<&'a Task>,
    /// Tasks of an old spec still holding their node (stopping).
    old_active: bool,
    /// Tasks on the current spec created since the update started.
    updated: Vec<&'a Task>,
}

impl Slot<'_> {
    fn dirty(&self) -> bool {
        !self.old_live.is_empty() && self.new_live.is_empty()
    }

    /// The update's new task of this slot is not up (nor ended) yet: not RUNNING, or RUNNING
    /// with a health check that has not passed.
    fn busy(&self) -> bool {
        !self.updated.is_empty() && self.updated.iter().all(|t| !is_terminal(t) && !is_up(t))
    }

    /// When the update's new task reached RUNNING (now up) or ended (its status time then).
    fn finished_at(&self) -> Option<i64> {
        self.updated
            .iter()
            .filter(|t| is_up(t) || is_terminal(t))
            .map(|t| t.status.as_ref().map_or(0, |s| s.timestamp_ms))
            .min()
    }

    fn running(&self) -> bool {
        self.old_live
            .iter()
            .chain(&self.new_live)
            .any(|t| state(t) == TaskState::Running as i32)
    }
}

fn created_at(t: &Task) -> i64 {
    t.meta.as_ref().map_or(0, |m| m.created_at_ms)
}

fn service_id(s: &Service) -> &str {
    s.meta.as_ref().map_or("", |m| m.id.as_str())
}

/// True if the task holds its node and will report when it stops.
fn stopping_elsewhere(view: &ClusterView, t: &Task) -> bool {
    !is_terminal(t)
        && state(t) >= TaskState::Assigned as i32
        && !t.node_id.is_empty()
        && !node_lost(view, &t.node_id)
}

impl Updater {
    /// A fresh updater (a new leader's).
    pub fn new() -> Updater {
        Updater::default()
    }

    /// One round over every service.
    pub fn round(
        &mut self,
        view: &ClusterView,
        now_ms: i64,
        ids: &mut dyn FnMut() -> String,
    ) -> Decision {
        let mut d = Decision::default();
        let mut seen: HashMap<String, i64> = HashMap::new();
        for service in view.services.values() {
            self.service_round(view, service, now_ms, ids, &mut d, &mut seen);
        }
        // Forget tasks that are gone or whose service is no longer updating.
        self.running_since = seen;
        d
    }

    fn service_round(
        &mut self,
        view: &ClusterView,
        service: &Service,
        now_ms: i64,
        ids: &mut dyn FnMut() -> String,
        d: &mut Decision,
        seen: &mut HashMap<String, i64>,
    ) {
        let global = is_global(service);
        let status = service.update_status.clone().unwrap_or_default();
        let started = status.started_at_ms;
        let mut slots: BTreeMap<(u64, &str), Slot<'_>> = BTreeMap::new();
        for t in view.tasks_of_service(service_id(service)) {
            if global != (t.slot == 0) {
                continue;
            }
            let node = if global { t.node_id.as_str() } else { "" };
            if global && node.is_empty() {
                continue;
            }
            let s = slots.entry((t.slot, node)).or_insert_with(|| Slot {
                slot: t.slot,
                node_id: node,
                ..Default::default()
            });
            let current = is_current(service, t);
            if wants_running(t) {
                if current {
                    s.new_live.push(t);
                } else {
                    s.old_live.push(t);
                }
            } else if !current && stopping_elsewhere(view, t) {
                s.old_active = true;
            }
            if current && created_at(t) >= started && started > 0 {
                s.updated.push(t);
            }
        }

        // Slot hygiene, whatever the update state.
        for s in slots.values() {
            for t in &s.new_live {
                if t.not_before_ms == HOLD
                    && !s.old_active
                    && s.old_live.iter().all(|o| !stopping_elsewhere(view, o))
                {
                    let mut n = (*t).clone();
                    n.not_before_ms = 0;
                    d.push(update(t, n));
                }
            }
            if !s.old_live.is_empty() && s.new_live.iter().any(|t| is_up(t)) {
                for o in &s.old_live {
                    d.push(update(o, with_desired(o, TaskState::Shutdown)));
                }
            }
        }

        let st = update_state(service);
        let rollback = match st {
            UpdateState::Updating => false,
            UpdateState::RollbackStarted => true,
            UpdateState::Paused | UpdateState::RollbackPaused => return,
            UpdateState::Unknown | UpdateState::Completed | UpdateState::RollbackCompleted => {
                // A spec changed without an update being recorded: start one.
                if slots.values().any(|s| s.dirty()) {
                    let status = UpdateStatus {
                        state: UpdateState::Updating as i32,
                        started_at_ms: now_ms,
                        completed_at_ms: 0,
                        message: "update in progress".into(),
                    };
                    d.push(set_status(service, status, None));
                }
                return;
            }
        };
        let cfg = config(service, rollback);

        // Failures among the tasks this update made.
        let mut failures = 0usize;
        let mut first_failed: Option<&Task> = None;
        let mut monitoring_until: Option<i64> = None;
        for s in slots.values() {
            for t in &s.updated {
                let id = task_id(t);
                if is_up(t) {
                    let since =
                        self.running_since.get(id).copied().unwrap_or_else(|| {
                            t.status.as_ref().map_or(now_ms, |s| s.timestamp_ms)
                        });
                    seen.insert(id.to_string(), since);
                    let until = since.saturating_add(cfg.monitor_ms as i64);
                    if until > now_ms && wants_running(t) {
                        monitoring_until = Some(monitoring_until.map_or(until, |m| m.max(until)));
                    }
                } else if let Some(since) = self.running_since.get(id) {
                    seen.insert(id.to_string(), *since);
                }
                if self.failed(t, &cfg) {
                    failures += 1;
                    if first_failed.is_none_or(|f| created_at(t) < created_at(f)) {
                        first_failed = Some(t);
                    }
                }
            }
        }
        let total = slots.len().max(1);
        let action = FailureAction::try_from(cfg.failure_action).unwrap_or(FailureAction::Pause);
        if let Some(f) = first_failed {
            if failures as f32 / total as f32 > cfg.max_failure_ratio
                && action != FailureAction::Continue
            {
                let why = format!("due to failure or early termination of task {}", task_id(f));
                if action == FailureAction::Rollback && !rollback {
                    d.push(start_rollback(
                        service,
                        now_ms,
                        format!("update rolled back {why}"),
                    ));
                } else {
                    let (state, what) = if rollback {
                        (UpdateState::RollbackPaused, "rollback")
                    } else {
                        (UpdateState::Paused, "update")
                    };
                    d.push(set_status(
                        service,
                        UpdateStatus {
                            state: state as i32,
                            started_at_ms: started,
                            completed_at_ms: 0,
                            message: format!("{what} paused {why}"),
                        },
                        None,
                    ));
                }
                return;
            }
        }

        let busy = slots.values().filter(|s| s.busy()).count();
        let mut cooling = 0usize;
        if cfg.delay_ms > 0 {
            for s in slots.values().filter(|s| !s.busy()) {
                if let Some(at) = s.finished_at() {
                    let free = at.saturating_add(cfg.delay_ms as i64);
                    if free > now_ms {
                        cooling += 1;
                        d.wake_at(free);
                    }
                }
            }
        }
        let mut dirty: Vec<&Slot<'_>> = slots
            .values()
            .filter(|s| s.dirty())
            .filter(|s| {
                s.old_live
                    .iter()
                    .all(|t| t.node_id.is_empty() || !node_lost(view, &t.node_id))
            })
            .collect();
        if global {
            let constraints = service_constraints(service);
            dirty.retain(|s| {
                view.nodes.get(s.node_id).is_some_and(|n| {
                    constraints
                        .as_ref()
                        .is_some_and(|cs| cs.iter().all(|c| c.matches(n)))
                })
            });
        }
        let pending = slots.values().any(|s| {
            s.busy() || (!s.old_live.is_empty() && !s.new_live.is_empty()) || s.old_active
        });
        if dirty.is_empty() {
            if !pending && cooling == 0 {
                match monitoring_until {
                    Some(until) => d.wake_at(until),
                    None => {
                        let (state, message) = if rollback {
                            (UpdateState::RollbackCompleted, "rollback completed")
                        } else {
                            (UpdateState::Completed, "update completed")
                        };
                        d.push(set_status(
                            service,
                            UpdateStatus {
                                state: state as i32,
                                started_at_ms: started,
                                completed_at_ms: now_ms,
                                message: message.into(),
                            },
                            None,
                        ));
                    }
                }
            }
            return;
        }
        let seats = if cfg.parallelism == 0 {
            usize::MAX
        } else {
            (cfg.parallelism as usize).saturating_sub(busy + cooling)
        };
        // Slots that are down anyway go first.
        dirty.sort_by_key(|s| (s.running(), s.slot, s.node_id));
        let start_first = cfg.order == UpdateOrder::StartFirst as i32;
        for s in dirty.into_iter().take(seats) {
            let mut replacement = new_task(service, s.slot, s.node_id, ids(), now_ms);
            let mut group = Vec::new();
            if !start_first {
                let mut hold = false;
                for o in &s.old_live {
                    hold |= stopping_elsewhere(view, o);
                    group.push(update(o, with_desired(o, TaskState::Shutdown)));
                }
                if hold || s.old_active {
                    replacement.not_before_ms = HOLD;
                    if let Some(st) = replacement.status.as_mut() {
                        st.message = "waiting for the old task to stop".into();
                    }
                }
            }
            group.push(create(replacement));
            d.push_group(group);
        }
    }

    /// A task this update made that failed within the monitor window.
    fn failed(&self, t: &Task, cfg: &UpdateConfig) -> bool {
        let s = state(t);
        let status = t.status.clone().unwrap_or_default();
        if s == TaskState::Rejected as i32 {
            return true;
        }
        if s != TaskState::Failed as i32 && s != TaskState::Complete as i32 {
            return false;
        }
        // Failed before its process ran (no exit code): a start failure.
        if s == TaskState::Failed as i32 && status.exit_code == 0 {
            return true;
        }
        let seen_up = self.running_since.get(task_id(t)).copied();
        // Stopped as unhealthy before it was seen healthy: it never came up (docker's task
        // fails in STARTING then).
        if status.health == HealthState::Unhealthy as i32 && seen_up.is_none() {
            return true;
        }
        let since = seen_up.unwrap_or_else(|| created_at(t));
        status.timestamp_ms <= since.saturating_add(cfg.monitor_ms as i64)
    }
}

/// The service with a new update status (and, for a rollback, its specs swapped).
fn set_status(service: &Service, status: UpdateStatus, swap: Option<()>) -> Mutation {
    let mut next = service.clone();
    next.spec_version = spec_version(service);
    if swap.is_some() {
        let current = next.spec.take();
        next.spec = next.previous_spec.take();
        next.previous_spec = current;
        // A new spec: the store stamps this write's version.
        next.spec_version = 0;
    }
    next.update_status = Some(status);
    Mutation::Update {
        object: Object::Service(next),
        expect_version: Some(service.meta.as_ref().map_or(0, |m| m.version)),
    }
}

/// The service rolled back to its previous spec (ROLLBACK_STARTED), or paused when there is
/// none to go back to.
pub fn start_rollback(service: &Service, now_ms: i64, message: String) -> Mutation {
    if service.previous_spec.is_none() {
        return set_status(
            service,
            UpdateStatus {
                state: UpdateState::Paused as i32,
                started_at_ms: service
                    .update_status
                    .as_ref()
                    .map_or(0, |u| u.started_at_ms),
                completed_at_ms: 0,
                message: format!("{message}; no previous spec to roll back to"),
            },
            None,
        );
    }
    set_status(
        service,
        UpdateStatus {
            state: UpdateState::RollbackStarted as i32,
            started_at_ms: now_ms,
            completed_at_ms: 0,
            message,
        },
        Some(()),
    )
}
