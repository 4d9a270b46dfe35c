//! The update orchestrator over a real store, with every leader component and a simulated
//! agent acting round by round. Each invariant is checked on every state the store passes
//! through (after each committed command), not by timing.

use crate::orchestrator_support;

use orchestrator_support::*;
use shoal_manager::orchestrator::updater::{start_rollback, Updater, HOLD};
use shoal_manager::orchestrator::{global, replicated, restart, task_reaper, Decision};
use shoal_manager::scheduler;
use shoal_manager::store::{Mutation, Object};
use shoal_proto::v1::{
    FailureAction, HealthState, RestartCondition, Service, Task, TaskState, TaskStatus,
    UpdateConfig, UpdateOrder, UpdateState, UpdateStatus,
};

/// Rounds a scenario may take before it is declared stuck.
const MAX_STEPS: usize = 400;
/// Simulated time per round.
const STEP_MS: i64 = 100;

/// What the store looked like after one command, for one service.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Slots (or nodes) with no RUNNING task.
    down: usize,
    /// RUNNING tasks, wanted or being stopped.
    running: usize,
    /// Slots with two tasks holding a node (assigned..running) at once.
    doubled: usize,
    /// RUNNING tasks that are not starting or unhealthy (what service discovery serves).
    serving: usize,
}

struct Sim {
    h: Harness,
    updater: Updater,
    next_id: u64,
    /// Agents reject tasks of this image (on every node, or on `bad_node` only).
    bad_image: Option<String>,
    bad_node: Option<String>,
    /// Tasks of this image exit (code 1) this long after running.
    crash_after_ms: Option<(String, i64)>,
    /// Tasks of this image have a health check: healthy this long after running.
    healthy_after_ms: Option<(String, i64)>,
    /// Tasks of this image have a health check that never passes: stopped as unhealthy (as
    /// the worker reports it) this long after running.
    unhealthy_after_ms: Option<(String, i64)>,
    samples: Vec<Sample>,
    service: String,
    slots: usize,
}

fn image(t: &Task) -> &str {
    t.spec
        .as_ref()
        .and_then(|s| s.container.as_ref())
        .map_or("", |c| c.image.as_str())
}

fn status(t: &Task, s: TaskState, exit_code: i32, at: i64) -> Mutation {
    let mut n = t.clone();
    n.status = Some(TaskStatus {
        state: s as i32,
        exit_code,
        timestamp_ms: at,
        ..Default::default()
    });
    Mutation::Update {
        object: Object::Task(n),
        expect_version: None,
    }
}

fn with_health(mut m: Mutation, h: HealthState) -> Mutation {
    if let Mutation::Update {
        object: Object::Task(t),
        ..
    } = &mut m
    {
        if let Some(s) = t.status.as_mut() {
            s.health = h as i32;
        }
    }
    m
}

fn config(parallelism: u64, order: UpdateOrder, action: FailureAction) -> UpdateConfig {
    UpdateConfig {
        parallelism,
        delay_ms: 0,
        failure_action: action as i32,
        monitor_ms: 1_000,
        max_failure_ratio: 0.0,
        order: order as i32,
    }
}

impl Sim {
    fn new(nodes: &[&str], service: &str, replicas: Option<u64>, cfg: UpdateConfig) -> Sim {
        let mut h = Harness::new();
        for n in nodes {
            h.add_node(n, &[], 8, 16 * GIB);
        }
        let mut s = with_restart(
            spec(service, replicas),
            restart_policy(RestartCondition::None, 0, 0, 0),
        );
        s.update = Some(cfg);
        // The same config for rollbacks, failure action included: a rollback whose action
        // says rollback must still only pause.
        s.rollback = Some(cfg);
        h.create_service(service, s);
        let mut sim = Sim {
            h,
            updater: Updater::new(),
            next_id: 0,
            bad_image: None,
            bad_node: None,
            crash_after_ms: None,
            healthy_after_ms: None,
            unhealthy_after_ms: None,
            samples: Vec::new(),
            service: service.into(),
            slots: replicas.map_or(nodes.len(), |n| n as usize),
        };
        sim.run_until("initial convergence", |s| s.running_current() == s.slots);
        sim.samples.clear();
        sim
    }

    fn sample(&mut self) {
        let tasks = self.h.tasks(&self.service);
        let running = TaskState::Running as i32;
        let mut keys: std::collections::BTreeMap<(u64, String), (bool, usize)> =
            std::collections::BTreeMap::new();
        for t in &tasks {
            let key = (
                t.slot,
                if t.slot == 0 {
                    t.node_id.clone()
                } else {
                    String::new()
                },
            );
            let e = keys.entry(key).or_default();
            let s = t.status.as_ref().map_or(0, |s| s.state);
            e.0 |= s == running;
            if s >= TaskState::Assigned as i32 && s <= running {
                e.1 += 1;
            }
        }
        let up = keys.values().filter(|(r, _)| *r).count();
        self.samples.push(Sample {
            down: self.slots.saturating_sub(up),
            running: tasks
                .iter()
                .filter(|t| t.status.as_ref().is_some_and(|s| s.state == running))
                .count(),
            doubled: keys.values().filter(|(_, n)| *n > 1).count(),
            serving: tasks
                .iter()
                .filter(|t| {
                    t.status.as_ref().is_some_and(|s| {
                        s.state == running
                            && s.health != HealthState::Starting as i32
                            && s.health != HealthState::Unhealthy as i32
                    })
                })
                .count(),
        });
    }

    fn commit(&mut self, d: Decision) -> usize {
        let n = d.mutations.len();
        for cmd in d.into_commands(self.h.now_ms, 1_000) {
            self.h.apply(cmd.mutations);
            self.sample();
        }
        n
    }

    /// One round of every leader component, then the agents.
    fn step(&mut self) -> usize {
        let now = self.h.now_ms;
        let mut n = 0;
        let next_id = &mut self.next_id;
        let mut ids = move || {
            *next_id += 1;
            format!("u{:06}", *next_id)
        };
        let v = self.h.view();
        let d = replicated::reconcile(&v, now, &mut ids);
        let d2 = global::reconcile(&v, now, &mut ids);
        let d3 = restart::supervise(&v, now, &mut ids);
        let d4 = self.updater.round(&v, now, &mut ids);
        n += self.commit(d);
        n += self.commit(d2);
        n += self.commit(d3);
        n += self.commit(d4);
        let v = self.h.view();
        n += self.commit(task_reaper::reap(&v, now));
        let v = self.h.view();
        n += self.commit(scheduler::schedule(&v, now));
        n += self.agents();
        self.h.now_ms += STEP_MS;
        n
    }

    /// Agents: stop what should stop, run what is assigned (or reject a bad image), crash
    /// tasks that are set to crash.
    fn agents(&mut self) -> usize {
        let now = self.h.now_ms;
        let mut muts = Vec::new();
        for t in self.h.store.list_tasks().unwrap() {
            let s = t.status.as_ref().map_or(0, |s| s.state);
            let since = t.status.as_ref().map_or(0, |s| s.timestamp_ms);
            if t.desired_state > TaskState::Running as i32 {
                if s >= TaskState::Assigned as i32 && s < TaskState::Complete as i32 {
                    muts.push(status(&t, TaskState::Shutdown, 0, now));
                }
                continue;
            }
            if s >= TaskState::Assigned as i32 && s < TaskState::Running as i32 {
                let bad = self.bad_image.as_deref() == Some(image(&t))
                    && self.bad_node.as_ref().is_none_or(|n| *n == t.node_id);
                let checked = [&self.healthy_after_ms, &self.unhealthy_after_ms]
                    .iter()
                    .any(|h| h.as_ref().is_some_and(|(img, _)| img == image(&t)));
                if bad {
                    muts.push(status(&t, TaskState::Rejected, 0, now));
                } else if checked {
                    muts.push(with_health(
                        status(&t, TaskState::Running, 0, now),
                        HealthState::Starting,
                    ));
                } else {
                    muts.push(status(&t, TaskState::Running, 0, now));
                }
            } else if s == TaskState::Running as i32 {
                let health = t.status.as_ref().map_or(0, |s| s.health);
                if health == HealthState::Starting as i32 {
                    if let Some((img, after)) = &self.healthy_after_ms {
                        if img == image(&t) && now >= since + after {
                            // Same state, same time: only the health changes.
                            muts.push(with_health(
                                status(&t, TaskState::Running, 0, since),
                                HealthState::Healthy,
                            ));
                        }
                    }
                    if let Some((img, after)) = &self.unhealthy_after_ms {
                        if img == image(&t) && now >= since + after {
                            muts.push(with_health(
                                status(&t, TaskState::Failed, 137, now),
                                HealthState::Unhealthy,
                            ));
                        }
                    }
                }
                if let Some((img, after)) = &self.crash_after_ms {
                    if img == image(&t) && now >= since + after {
                        muts.push(status(&t, TaskState::Failed, 1, now));
                    }
                }
            }
        }
        let n = muts.len();
        if n > 0 {
            self.h.apply(muts);
            self.sample();
        }
        n
    }

    fn run_until(&mut self, what: &str, f: impl Fn(&Sim) -> bool) {
        for _ in 0..MAX_STEPS {
            if f(self) {
                return;
            }
            self.step();
        }
        panic!(
            "{what}: not reached in {MAX_STEPS} steps; status {:?}; tasks {:#?}",
            self.service().update_status,
            self.h
                .wanted(&self.service)
                .iter()
                .map(|t| (t.slot, image(t).to_string(), state(t), desired(t)))
                .collect::<Vec<_>>()
        );
    }

    fn service(&self) -> Service {
        self.h.store.get_service(&self.service).unwrap().unwrap()
    }

    fn update_state(&self) -> UpdateState {
        self.service()
            .update_status
            .map_or(UpdateState::Unknown, |u| u.state())
    }

    fn current_image(&self) -> String {
        self.service()
            .spec
            .unwrap()
            .task
            .unwrap()
            .container
            .unwrap()
            .image
    }

    /// Wanted tasks RUNNING on the current spec.
    fn running_current(&self) -> usize {
        let img = self.current_image();
        self.h
            .wanted(&self.service)
            .iter()
            .filter(|t| state(t) == TaskState::Running && image(t) == img)
            .count()
    }

    /// What the control API does on `service update --image`.
    fn update_image(&mut self, img: &str) {
        let mut s = self.service();
        let old = s.spec.clone();
        s.spec
            .as_mut()
            .unwrap()
            .task
            .as_mut()
            .unwrap()
            .container
            .as_mut()
            .unwrap()
            .image = img.into();
        s.previous_spec = old;
        s.spec_version = 0;
        s.update_status = Some(UpdateStatus {
            state: UpdateState::Updating as i32,
            started_at_ms: self.h.now_ms,
            completed_at_ms: 0,
            message: "update in progress".into(),
        });
        self.h.apply(vec![Mutation::Update {
            object: Object::Service(s),
            expect_version: None,
        }]);
    }

    fn max_down(&self) -> usize {
        self.samples.iter().map(|s| s.down).max().unwrap_or(0)
    }

    fn min_running(&self) -> usize {
        self.samples.iter().map(|s| s.running).min().unwrap_or(0)
    }

    fn max_doubled(&self) -> usize {
        self.samples.iter().map(|s| s.doubled).max().unwrap_or(0)
    }
}

fn all_on(sim: &Sim, img: &str) -> bool {
    let w = sim.h.wanted(&sim.service);
    w.len() == sim.slots
        && w.iter()
            .all(|t| image(t) == img && state(t) == TaskState::Running)
}

#[test]
fn stop_first_never_has_more_than_parallelism_slots_down() {
    let cfg = config(2, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert!(all_on(&sim, "busybox@sha256:11"));
    assert_eq!(sim.max_down(), 2, "two slots at a time, never more");
    assert_eq!(
        sim.max_doubled(),
        0,
        "stop-first: a slot's new task waits for the old"
    );
    let status = sim.service().update_status.unwrap();
    assert_eq!(status.message, "update completed");
    assert!(status.completed_at_ms >= status.started_at_ms + 1_000);
    // The old tasks stay as history, shut down.
    let old: Vec<Task> = sim
        .h
        .tasks("web")
        .into_iter()
        .filter(|t| image(t) != "busybox@sha256:11")
        .collect();
    assert_eq!(old.len(), 6);
    assert!(old.iter().all(|t| state(t) == TaskState::Shutdown));
}

#[test]
fn a_held_replacement_is_released_only_once_its_old_task_stopped() {
    let cfg = config(1, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1"], "web", Some(1), cfg);
    sim.update_image("busybox@sha256:11");
    let v = sim.h.view();
    let mut n = 0;
    let d = sim.updater.round(&v, sim.h.now_ms, &mut || {
        n += 1;
        format!("x{n}")
    });
    sim.commit(d);
    let tasks = sim.h.wanted("web");
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].not_before_ms, HOLD);
    // The scheduler leaves it alone while the old task runs.
    let v = sim.h.view();
    sim.commit(scheduler::schedule(&v, sim.h.now_ms));
    assert_eq!(state(&sim.h.wanted("web")[0]), TaskState::Pending);
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert_eq!(sim.max_doubled(), 0);
}

#[test]
fn start_first_never_has_fewer_than_the_replicas_running() {
    let cfg = config(2, UpdateOrder::StartFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert!(all_on(&sim, "busybox@sha256:11"));
    assert!(sim.min_running() >= 6, "min running {}", sim.min_running());
    assert_eq!(sim.max_down(), 0);
    // Overlap is bounded: a batch's old tasks may still be stopping (they were retired as
    // their replacements ran) while the next batch starts, as in swarmkit.
    assert!(
        (1..=4).contains(&sim.max_doubled()),
        "{}",
        sim.max_doubled()
    );
    assert!(sim.samples.iter().map(|s| s.running).max().unwrap() <= 10);
}

#[test]
fn parallelism_zero_updates_every_slot_at_once() {
    let cfg = config(0, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2"], "web", Some(4), cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert_eq!(sim.max_down(), 4);
}

#[test]
fn a_failing_image_pauses_the_update() {
    let cfg = config(2, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.bad_image = Some("bad@sha256:66".into());
    sim.update_image("bad@sha256:66");
    sim.run_until("paused", |s| s.update_state() == UpdateState::Paused);
    let status = sim.service().update_status.unwrap();
    assert!(
        status
            .message
            .starts_with("update paused due to failure or early termination of task"),
        "{}",
        status.message
    );
    // Paused: nothing else is touched, the four other slots keep their old tasks running.
    for _ in 0..20 {
        sim.step();
    }
    let old_running = sim
        .h
        .wanted("web")
        .iter()
        .filter(|t| image(t) == "busybox@sha256:00" && state(t) == TaskState::Running)
        .count();
    assert_eq!(old_running, 4);
    assert_eq!(sim.update_state(), UpdateState::Paused);
}

#[test]
fn start_first_retires_an_old_task_only_once_its_replacement_is_healthy() {
    let cfg = config(1, UpdateOrder::StartFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2"], "web", Some(3), cfg);
    sim.healthy_after_ms = Some(("checked@sha256:77".into(), 2_000));
    sim.update_image("checked@sha256:77");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert!(all_on(&sim, "checked@sha256:77"));
    let least = sim.samples.iter().map(|s| s.serving).min().unwrap();
    assert!(
        least >= 3,
        "a replacement still starting was counted as up: {least} serving"
    );
    // Completion waited for every new task to be healthy, then its monitor window.
    let status = sim.service().update_status.unwrap();
    assert!(status.completed_at_ms >= status.started_at_ms + 3 * 2_000);
}

#[test]
fn a_task_that_goes_unhealthy_before_it_was_ever_healthy_pauses_the_update() {
    let cfg = config(1, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2"], "web", Some(3), cfg);
    // Well past the 1 s monitor window counted from its creation: it never came up.
    sim.unhealthy_after_ms = Some(("sick@sha256:88".into(), 3_000));
    sim.update_image("sick@sha256:88");
    sim.run_until("paused", |s| s.update_state() == UpdateState::Paused);
    let status = sim.service().update_status.unwrap();
    assert!(
        status
            .message
            .starts_with("update paused due to failure or early termination of task"),
        "{}",
        status.message
    );
    let old_running = sim
        .h
        .wanted("web")
        .iter()
        .filter(|t| image(t) == "busybox@sha256:00" && state(t) == TaskState::Running)
        .count();
    assert_eq!(old_running, 2, "one slot at a time: the others untouched");
}

#[test]
fn a_failing_image_rolls_back_with_failure_action_rollback() {
    let cfg = config(2, UpdateOrder::StopFirst, FailureAction::Rollback);
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.bad_image = Some("bad@sha256:66".into());
    sim.update_image("bad@sha256:66");
    sim.run_until("rollback started", |s| {
        s.update_state() == UpdateState::RollbackStarted
    });
    let s = sim.service();
    assert!(s
        .update_status
        .unwrap()
        .message
        .starts_with("update rolled back due to failure"));
    assert_eq!(sim.current_image(), "busybox@sha256:00");
    sim.run_until("rollback completed", |s| {
        s.update_state() == UpdateState::RollbackCompleted
    });
    assert!(all_on(&sim, "busybox@sha256:00"));
    assert!(sim.max_down() <= 2);
}

#[test]
fn max_failure_ratio_lets_some_failures_pass() {
    // Tasks of the new image fail on n3 only: 2 of 6 slots.
    let mut cfg = config(2, UpdateOrder::StopFirst, FailureAction::Pause);
    cfg.max_failure_ratio = 0.4;
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.bad_image = Some("half@sha256:77".into());
    sim.bad_node = Some("n3".into());
    sim.update_image("half@sha256:77");
    sim.run_until("completed despite failures", |s| {
        s.update_state() == UpdateState::Completed
    });
    let rejected = sim
        .h
        .tasks("web")
        .iter()
        .filter(|t| state(t) == TaskState::Rejected)
        .count();
    assert!(rejected >= 1, "some tasks failed");

    // The same with a ratio below 2/6 pauses.
    cfg.max_failure_ratio = 0.1;
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.bad_image = Some("half@sha256:77".into());
    sim.bad_node = Some("n3".into());
    sim.update_image("half@sha256:77");
    sim.run_until("paused", |s| s.update_state() == UpdateState::Paused);
}

#[test]
fn a_task_exiting_within_the_monitor_window_is_a_failure_and_later_is_not() {
    let cfg = config(1, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1"], "web", Some(2), cfg);
    sim.crash_after_ms = Some(("crash@sha256:88".into(), 500));
    sim.update_image("crash@sha256:88");
    sim.run_until("paused", |s| s.update_state() == UpdateState::Paused);

    // Crashing after the 1 s window is not the update's business.
    let mut sim = Sim::new(&["n1"], "web", Some(2), cfg);
    sim.crash_after_ms = Some(("late@sha256:99".into(), 3_000));
    sim.update_image("late@sha256:99");
    sim.run_until("completed", |s| s.update_state() == UpdateState::Completed);
}

#[test]
fn a_new_leader_resumes_the_update_where_it_was() {
    let cfg = config(2, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2", "n3"], "web", Some(6), cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("first batch running", |s| s.running_current() >= 2);
    let created_before: usize = sim
        .h
        .tasks("web")
        .iter()
        .filter(|t| image(t) == "busybox@sha256:11")
        .count();
    assert!(created_before < 6, "mid-update");
    // A new leader: a fresh updater with no memory.
    sim.updater = Updater::new();
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert!(all_on(&sim, "busybox@sha256:11"));
    assert!(sim.max_down() <= 2);
    // Exactly one new task per slot: the new leader neither restarted nor repeated a slot.
    let new_tasks = sim
        .h
        .tasks("web")
        .iter()
        .filter(|t| image(t) == "busybox@sha256:11")
        .count();
    assert_eq!(new_tasks, 6);
}

#[test]
fn a_global_service_updates_node_by_node() {
    let cfg = config(1, UpdateOrder::StopFirst, FailureAction::Pause);
    let mut sim = Sim::new(&["n1", "n2", "n3", "n4"], "agent", None, cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    assert!(all_on(&sim, "busybox@sha256:11"));
    assert_eq!(sim.max_down(), 1);
    assert_eq!(sim.max_doubled(), 0);
}

#[test]
fn delay_spaces_the_batches() {
    let mut cfg = config(1, UpdateOrder::StopFirst, FailureAction::Pause);
    cfg.delay_ms = 2_000;
    cfg.monitor_ms = 0;
    let mut sim = Sim::new(&["n1"], "web", Some(3), cfg);
    let start = sim.h.now_ms;
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    let mut created: Vec<i64> = sim
        .h
        .tasks("web")
        .iter()
        .filter(|t| image(t) == "busybox@sha256:11")
        .map(|t| t.meta.as_ref().unwrap().created_at_ms)
        .collect();
    created.sort();
    assert_eq!(created.len(), 3);
    assert!(created[0] < start + 1_000);
    assert!(created[1] - created[0] >= 2_000, "{created:?}");
    assert!(created[2] - created[1] >= 2_000, "{created:?}");
}

#[test]
fn a_rollback_swaps_the_previous_spec_in_and_is_never_itself_rolled_back() {
    let cfg = config(2, UpdateOrder::StopFirst, FailureAction::Rollback);
    let mut sim = Sim::new(&["n1", "n2"], "web", Some(4), cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    // A manual rollback, as the control API does it.
    let s = sim.service();
    sim.h.apply(vec![start_rollback(
        &s,
        sim.h.now_ms,
        "manually requested rollback".into(),
    )]);
    assert_eq!(sim.update_state(), UpdateState::RollbackStarted);
    assert_eq!(sim.current_image(), "busybox@sha256:00");
    sim.run_until("rollback completed", |s| {
        s.update_state() == UpdateState::RollbackCompleted
    });
    assert!(all_on(&sim, "busybox@sha256:00"));

    // A rollback that fails pauses (its failure action here), it does not roll back again.
    let mut sim = Sim::new(&["n1", "n2"], "web", Some(4), cfg);
    sim.update_image("busybox@sha256:11");
    sim.run_until("update completed", |s| {
        s.update_state() == UpdateState::Completed
    });
    sim.bad_image = Some("busybox@sha256:00".into());
    let s = sim.service();
    sim.h.apply(vec![start_rollback(
        &s,
        sim.h.now_ms,
        "manually requested rollback".into(),
    )]);
    sim.run_until("rollback paused", |s| {
        s.update_state() == UpdateState::RollbackPaused
    });
    assert_eq!(sim.current_image(), "busybox@sha256:00");
}
