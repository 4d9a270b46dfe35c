//! One controller per task: drives it through ACCEPTED → PREPARING → READY → STARTING →
//! RUNNING → COMPLETE | FAILED | SHUTDOWN (or REJECTED) with an [`Executor`], and stops it
//! (SIGTERM, SIGKILL after the grace period, delete) when its desired state says so.
//!
//! A controller resumed from the local database probes the container first: a running one is
//! adopted (never restarted), one that exited meanwhile is reported with its real exit code.
//!
//! A running task with a health check (its spec's over its image's) is checked by a task of
//! its own; each change of its health is reported in the same RUNNING state, and an
//! unhealthy task (reported so first) is stopped and reported FAILED ("unhealthy container"),
//! as docker does.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_proto::v1::{HealthState, Task, TaskState, TaskStatus};
use tokio::sync::{mpsc, watch};

use crate::executor::{ExecError, Executor, Exit, Probe, StopSignal};
use crate::health::{Check, Tracker};

/// Health changes a monitor may queue before it waits for its controller.
const HEALTH_QUEUE: usize = 4;
/// The error of a task stopped for being unhealthy, after docker's "task: non-zero exit (N)".
pub const UNHEALTHY: &str = "unhealthy container";

/// Stop grace period of a task whose spec sets none (docker's default).
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// How long a SIGKILLed process may take to be reaped before the controller gives up on it.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// What the agent tells a controller: the task as the dispatcher last sent it.
#[derive(Clone, Debug)]
pub struct Assignment {
    /// The task (its desired state decides whether it should run).
    pub task: Task,
    /// The dispatcher no longer assigns it: stop, delete the container, forget it.
    pub removed: bool,
}

/// A status change of a task, as reported to the agent.
pub type Report = (String, TaskStatus);

/// Where the controller is, which may lag the reported state (a resumed task whose half-made
/// container was discarded must be started again while STARTING is already reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Accept,
    Prepare,
    Start,
    Running,
    Done,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The stop grace period of a task.
pub fn grace_period(task: &Task) -> Duration {
    match task
        .spec
        .as_ref()
        .and_then(|s| s.container.as_ref())
        .map_or(0, |c| c.stop_grace_period_ms)
    {
        0 => DEFAULT_STOP_GRACE_PERIOD,
        ms => Duration::from_millis(ms),
    }
}

fn wants_stop(a: &Assignment) -> bool {
    a.removed || a.task.desired_state > TaskState::Running as i32
}

struct Controller {
    exec: Arc<dyn Executor>,
    id: String,
    status: TaskStatus,
    reports: mpsc::Sender<Report>,
    assigned: watch::Receiver<Assignment>,
    /// A container may exist that must be deleted once the task should no longer run.
    container: bool,
    /// The health checks of the running task, if it has any.
    health: Option<HealthMonitor>,
}

/// A change of a task's health, as its monitor saw it.
#[derive(Debug)]
struct HealthChange {
    state: HealthState,
    output: String,
    failing_streak: u32,
}

/// The task that runs one container's health checks; dropped (and with it any check in
/// flight) when the task leaves RUNNING.
struct HealthMonitor {
    changes: mpsc::Receiver<HealthChange>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `check` every interval in task `id`'s container; sends each change of its state.
async fn monitor(
    exec: Arc<dyn Executor>,
    id: String,
    check: Check,
    mut tracker: Tracker,
    changes: mpsc::Sender<HealthChange>,
) {
    loop {
        tokio::time::sleep(check.interval).await;
        let at = std::time::Instant::now();
        let (passed, output) = match exec.check(&id, &check.argv, check.timeout).await {
            Ok(r) => (r.exit_code == 0, r.output),
            Err(e) => (false, crate::health::bounded(e.to_string())),
        };
        tracing::debug!(task = %id, passed, "health check");
        if let Some(state) = tracker.record(passed, at) {
            let change = HealthChange {
                state,
                output,
                failing_streak: tracker.failing_streak(),
            };
            if changes.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// The next health change of a monitored task; never, without a monitor.
async fn next_health(m: &mut Option<HealthMonitor>) -> Option<HealthChange> {
    match m {
        Some(m) => m.changes.recv().await,
        None => std::future::pending().await,
    }
}

impl Controller {
    async fn report(&mut self, state: TaskState, message: &str, err: &str) {
        debug_assert!(state as i32 > self.status.state, "task state moves forward");
        self.status.state = state as i32;
        self.status.timestamp_ms = now_ms();
        self.status.message = message.to_string();
        self.status.err = err.to_string();
        let _ = self
            .reports
            .send((self.id.clone(), self.status.clone()))
            .await;
    }

    /// Reports a change of the running task's health (same state, same timestamp).
    async fn report_health(&mut self, change: &HealthChange) {
        self.status.health = change.state as i32;
        self.status.health_output = change.output.clone();
        self.status.health_failing_streak = change.failing_streak;
        let _ = self
            .reports
            .send((self.id.clone(), self.status.clone()))
            .await;
    }

    /// Starts the health checks of the task about to be (or adopted as) RUNNING, if it has
    /// any: the status says STARTING (or keeps what an adopted task reported).
    async fn start_health(&mut self, task: &Task) {
        self.health = None;
        let spec = task
            .spec
            .as_ref()
            .and_then(|s| s.container.as_ref())
            .and_then(|c| c.healthcheck.as_ref());
        // The image only matters when the spec leaves the test to it.
        let image = if spec.is_some_and(|h| !h.test.is_empty()) {
            None
        } else {
            match self.exec.image_healthcheck(task).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(task = %self.id, "reading the image's health check: {e}");
                    None
                }
            }
        };
        let check = match crate::health::effective(spec, image.as_ref()) {
            Ok(Some(c)) => c,
            Ok(None) => {
                self.status.health = HealthState::None as i32;
                return;
            }
            Err(e) => {
                tracing::warn!(task = %self.id, "no health check: {e}");
                self.status.health = HealthState::None as i32;
                return;
            }
        };
        let reported = HealthState::try_from(self.status.health).unwrap_or(HealthState::None);
        let tracker = Tracker::new(&check, std::time::Instant::now(), reported);
        self.status.health = tracker.state() as i32;
        let (tx, rx) = mpsc::channel(HEALTH_QUEUE);
        let task = tokio::spawn(monitor(
            self.exec.clone(),
            self.id.clone(),
            check,
            tracker,
            tx,
        ));
        self.health = Some(HealthMonitor { changes: rx, task });
    }

    /// The running task went unhealthy: stop it and report it FAILED (docker: "task: non-zero
    /// exit (N): unhealthy container"), so the restart policy replaces it. The health is
    /// reported first, still RUNNING: the managers take the task out of service discovery and
    /// the routing mesh at once, not only once its stop grace period is over.
    async fn fail_unhealthy(&mut self, change: HealthChange, grace: Duration) {
        self.health = None;
        self.report_health(&change).await;
        tracing::info!(task = %self.id, "unhealthy: stopping it");
        let code = self.stop(grace).await.map_or(137, |e| e.code);
        self.status.exit_code = code;
        self.status.pid = 0;
        let err = format!("task: non-zero exit ({code}): {UNHEALTHY}");
        self.report(TaskState::Failed, "failed", &err).await;
    }

    async fn report_exit(&mut self, exit: Exit, stopped: bool) {
        self.status.exit_code = exit.code;
        self.status.pid = 0;
        if stopped {
            self.report(TaskState::Shutdown, "shutdown", "").await;
        } else if exit.code == 0 {
            self.report(TaskState::Complete, "finished", "").await;
        } else {
            let err = format!("task: non-zero exit ({})", exit.code);
            self.report(TaskState::Failed, "failed", &err).await;
        }
    }

    fn current(&mut self) -> Assignment {
        self.assigned.borrow_and_update().clone()
    }

    /// SIGTERM, then SIGKILL after the grace period; the exit, if the process went away.
    async fn stop(&mut self, grace: Duration) -> Option<Exit> {
        if let Err(e) = self.exec.signal(&self.id, StopSignal::Term).await {
            tracing::warn!(task = %self.id, "stop: {e}");
        }
        match tokio::time::timeout(grace, self.exec.wait(&self.id)).await {
            Ok(Ok(e)) => return Some(e),
            Ok(Err(e)) => {
                tracing::warn!(task = %self.id, "stop: {e}");
                return None;
            }
            Err(_) => {}
        }
        if let Err(e) = self.exec.signal(&self.id, StopSignal::Kill).await {
            tracing::warn!(task = %self.id, "kill: {e}");
        }
        match tokio::time::timeout(KILL_WAIT, self.exec.wait(&self.id)).await {
            Ok(Ok(e)) => Some(e),
            _ => None,
        }
    }

    async fn remove_container(&mut self) {
        if !self.container {
            return;
        }
        match self.exec.remove(&self.id).await {
            Ok(()) => self.container = false,
            Err(e) => tracing::warn!(task = %self.id, "deleting container: {e}"),
        }
    }

    /// Where a task resumed from the database stands: probes its container.
    async fn resume(&mut self) -> Phase {
        let s = self.status.state;
        if s >= TaskState::Complete as i32 {
            self.container = true;
            return Phase::Done;
        }
        if s < TaskState::Accepted as i32 {
            return Phase::Accept;
        }
        if s < TaskState::Preparing as i32 {
            return Phase::Prepare;
        }
        if s < TaskState::Starting as i32 {
            return if s < TaskState::Ready as i32 {
                Phase::Prepare
            } else {
                Phase::Start
            };
        }
        let probe = match self.exec.probe(&self.id).await {
            Ok(p) => p,
            Err(e) => {
                self.container = true;
                let err = format!("inspecting the container after an agent restart: {e}");
                self.report(TaskState::Failed, "failed", &err).await;
                return Phase::Done;
            }
        };
        match probe {
            Probe::Running { pid } => {
                self.container = true;
                let task = self.assigned.borrow().task.clone();
                self.start_health(&task).await;
                if s < TaskState::Running as i32 {
                    self.status.container_id = self.id.clone();
                    self.status.pid = pid;
                    self.report(TaskState::Running, "started", "").await;
                }
                tracing::info!(task = %self.id, pid, "adopted running container");
                Phase::Running
            }
            Probe::Exited(exit) => {
                self.container = true;
                self.report_exit(exit, false).await;
                Phase::Done
            }
            Probe::Created | Probe::Lost if s < TaskState::Running as i32 => {
                // Never started (the agent stopped between create and start): start afresh.
                self.container = true;
                self.remove_container().await;
                Phase::Start
            }
            Probe::Missing if s < TaskState::Running as i32 => Phase::Start,
            Probe::Created | Probe::Lost | Probe::Missing => {
                // Missing too: what the executor keeps beside the container (its dir, files,
                // network) is still there, and removing is idempotent.
                self.container = true;
                self.report(
                    TaskState::Failed,
                    "failed",
                    "container vanished while the agent was down",
                )
                .await;
                Phase::Done
            }
        }
    }

    async fn run(mut self) {
        let mut phase = self.resume().await;
        loop {
            let a = self.current();
            let grace = grace_period(&a.task);
            if phase != Phase::Running || wants_stop(&a) {
                self.health = None;
            }
            if wants_stop(&a) && phase != Phase::Done {
                let exit = if phase == Phase::Running {
                    self.stop(grace).await
                } else {
                    None
                };
                match exit {
                    Some(e) => self.report_exit(e, true).await,
                    None => self.report(TaskState::Shutdown, "shutdown", "").await,
                }
                phase = Phase::Done;
            }
            match phase {
                Phase::Accept => {
                    self.report(TaskState::Accepted, "accepted", "").await;
                    phase = Phase::Prepare;
                }
                Phase::Prepare => {
                    self.report(TaskState::Preparing, "preparing", "").await;
                    let note = {
                        let (reports, id) = (self.reports.clone(), self.id.clone());
                        let status = self.status.clone();
                        move |what: &str| {
                            let mut s = status.clone();
                            s.message = what.to_string();
                            // Best effort: a full queue only loses the note.
                            let _ = reports.try_send((id.clone(), s));
                        }
                    };
                    match self.exec.prepare(&a.task, &note).await {
                        Ok(()) => {
                            self.report(TaskState::Ready, "prepared", "").await;
                            phase = Phase::Start;
                        }
                        Err(e) => {
                            self.report(TaskState::Rejected, "rejected", &e.to_string())
                                .await;
                            phase = Phase::Done;
                        }
                    }
                }
                Phase::Start => {
                    if self.status.state < TaskState::Starting as i32 {
                        self.report(TaskState::Starting, "starting", "").await;
                    }
                    self.container = true;
                    match self.exec.start(&a.task).await {
                        Ok(s) => {
                            self.status.container_id = s.container_id;
                            self.status.pid = s.pid;
                            self.start_health(&a.task).await;
                            self.report(TaskState::Running, "started", "").await;
                            phase = Phase::Running;
                        }
                        Err(e) => {
                            let err = match e {
                                ExecError::Runtime(m) => format!("starting container: {m}"),
                                other => other.to_string(),
                            };
                            self.report(TaskState::Failed, "failed", &err).await;
                            phase = Phase::Done;
                        }
                    }
                }
                Phase::Running => {
                    let exec = self.exec.clone();
                    let id = self.id.clone();
                    tokio::select! {
                        r = exec.wait(&id) => {
                            match r {
                                Ok(exit) => self.report_exit(exit, false).await,
                                Err(e) => {
                                    let err = format!("waiting for the container: {e}");
                                    self.report(TaskState::Failed, "failed", &err).await;
                                }
                            }
                            phase = Phase::Done;
                        }
                        changed = self.assigned.changed() => {
                            if changed.is_err() {
                                // The agent is stopping: leave the container running.
                                return;
                            }
                        }
                        change = next_health(&mut self.health) => match change {
                            Some(c) if c.state == HealthState::Unhealthy => {
                                self.fail_unhealthy(c, grace).await;
                                phase = Phase::Done;
                            }
                            Some(c) => self.report_health(&c).await,
                            None => self.health = None,
                        },
                    }
                }
                Phase::Done => {
                    if wants_stop(&a) {
                        self.remove_container().await;
                        if a.removed {
                            return;
                        }
                    }
                    if self.assigned.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Runs one task's controller until the task is removed (container deleted) or the agent
/// drops `assigned`. `status` is where the task stands (ASSIGNED for a new one, the stored
/// status for one resumed after an agent restart); every change goes to `reports`.
pub async fn run(
    exec: Arc<dyn Executor>,
    assigned: watch::Receiver<Assignment>,
    status: TaskStatus,
    reports: mpsc::Sender<Report>,
) {
    let id = assigned
        .borrow()
        .task
        .meta
        .as_ref()
        .map_or(String::new(), |m| m.id.clone());
    Controller {
        exec,
        id,
        status,
        reports,
        assigned,
        container: false,
        health: None,
    }
    .run()
    .await
}

#[cfg(test)]
mod tests;
