//! The controller's state machine against a scripted executor (the code around the executor).

use std::sync::Mutex;

use shoal_proto::v1::{ContainerSpec, HealthCheck, Meta, TaskSpec};

use super::*;

/// An executor that records calls and exits when told (or on a signal it honours).
struct Fake {
    calls: Mutex<Vec<String>>,
    prepare: Result<(), ExecError>,
    probe: Probe,
    ignore_term: bool,
    exit: watch::Sender<Option<Exit>>,
    /// The image's health check.
    image_hc: Option<HealthCheck>,
    /// Exit codes of the next health checks (then 0).
    checks: Mutex<std::collections::VecDeque<i32>>,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            calls: Mutex::new(vec![]),
            prepare: Ok(()),
            probe: Probe::Missing,
            ignore_term: false,
            exit: watch::channel(None).0,
            image_hc: None,
            checks: Mutex::default(),
        })
    }

    fn with(f: impl FnOnce(&mut Fake)) -> Arc<Fake> {
        let mut fake = Arc::into_inner(Fake::new()).unwrap();
        f(&mut fake);
        Arc::new(fake)
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn call(&self, c: &str) {
        self.calls.lock().unwrap().push(c.to_string());
    }
}

#[tonic::async_trait]
impl Executor for Fake {
    async fn prepare(&self, _task: &Task, _note: &crate::executor::Note) -> Result<(), ExecError> {
        self.call("prepare");
        self.prepare.clone()
    }
    async fn start(&self, task: &Task) -> Result<crate::executor::Started, ExecError> {
        self.call("start");
        Ok(crate::executor::Started {
            container_id: task.meta.as_ref().unwrap().id.clone(),
            pid: 42,
        })
    }
    async fn wait(&self, _id: &str) -> Result<Exit, ExecError> {
        let mut rx = self.exit.subscribe();
        let e = rx.wait_for(|e| e.is_some()).await.unwrap();
        Ok(e.unwrap())
    }
    async fn signal(&self, _id: &str, s: StopSignal) -> Result<(), ExecError> {
        self.call(&format!("{s:?}"));
        if s == StopSignal::Kill || !self.ignore_term {
            let code = if s == StopSignal::Kill { 137 } else { 143 };
            self.exit.send_replace(Some(Exit { code }));
        }
        Ok(())
    }
    async fn remove(&self, _id: &str) -> Result<(), ExecError> {
        self.call("remove");
        Ok(())
    }
    async fn probe(&self, _id: &str) -> Result<Probe, ExecError> {
        self.call("probe");
        Ok(self.probe)
    }
    async fn image_healthcheck(&self, _task: &Task) -> Result<Option<HealthCheck>, ExecError> {
        Ok(self.image_hc.clone())
    }
    async fn check(
        &self,
        _id: &str,
        argv: &[String],
        _timeout: Duration,
    ) -> Result<crate::executor::CheckResult, ExecError> {
        self.call(&format!("check {}", argv.join(" ")));
        let code = self.checks.lock().unwrap().pop_front().unwrap_or(0);
        Ok(crate::executor::CheckResult {
            exit_code: code,
            output: format!("exit {code}"),
        })
    }
}

fn task(grace_ms: u64) -> Task {
    Task {
        meta: Some(Meta {
            id: "t1".into(),
            ..Default::default()
        }),
        node_id: "n1".into(),
        desired_state: TaskState::Running as i32,
        status: Some(TaskStatus {
            state: TaskState::Assigned as i32,
            ..Default::default()
        }),
        spec: Some(TaskSpec {
            container: Some(ContainerSpec {
                image: "busybox".into(),
                stop_grace_period_ms: grace_ms,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Run {
    tx: watch::Sender<Assignment>,
    reports: mpsc::Receiver<Report>,
    handle: tokio::task::JoinHandle<()>,
}

fn spawn(exec: Arc<dyn Executor>, t: Task, from: TaskState) -> Run {
    let (tx, rx) = watch::channel(Assignment {
        task: t,
        removed: false,
    });
    let (rtx, reports) = mpsc::channel(64);
    let status = TaskStatus {
        state: from as i32,
        ..Default::default()
    };
    let handle = tokio::spawn(run(exec, rx, status, rtx));
    Run {
        tx,
        reports,
        handle,
    }
}

impl Run {
    /// Reports until one in state `last` (inclusive).
    async fn until(&mut self, last: TaskState) -> Vec<TaskStatus> {
        let mut out = vec![];
        loop {
            let (_, s) = tokio::time::timeout(Duration::from_secs(5), self.reports.recv())
                .await
                .expect("report within 5 s")
                .expect("controller alive");
            let done = s.state == last as i32;
            out.push(s);
            if done {
                return out;
            }
        }
    }

    fn set_desired(&self, d: TaskState) {
        self.tx.send_modify(|a| a.task.desired_state = d as i32);
    }
}

fn states(v: &[TaskStatus]) -> Vec<i32> {
    v.iter().map(|s| s.state).collect()
}

#[tokio::test]
async fn runs_through_every_state_and_completes() {
    let fake = Fake::new();
    let mut r = spawn(fake.clone(), task(0), TaskState::Assigned);
    let got = r.until(TaskState::Running).await;
    assert_eq!(
        states(&got),
        vec![
            TaskState::Accepted as i32,
            TaskState::Preparing as i32,
            TaskState::Ready as i32,
            TaskState::Starting as i32,
            TaskState::Running as i32,
        ]
    );
    let running = got.last().unwrap();
    assert_eq!((running.container_id.as_str(), running.pid), ("t1", 42));
    fake.exit.send_replace(Some(Exit { code: 0 }));
    let done = r.until(TaskState::Complete).await;
    assert_eq!(done.last().unwrap().exit_code, 0);
    assert_eq!(fake.calls(), vec!["prepare", "start"]);
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_the_exit_code() {
    let fake = Fake::new();
    let mut r = spawn(fake.clone(), task(0), TaskState::Assigned);
    r.until(TaskState::Running).await;
    fake.exit.send_replace(Some(Exit { code: 3 }));
    let s = r.until(TaskState::Failed).await.pop().unwrap();
    assert_eq!(s.exit_code, 3);
    assert_eq!(s.err, "task: non-zero exit (3)");
    // Its container stays (for logs) until the task should no longer run.
    r.set_desired(TaskState::Shutdown);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.calls(), vec!["prepare", "start", "remove"]);
}

#[tokio::test]
async fn a_missing_image_rejects_the_task() {
    let fake = Fake::with(|f| f.prepare = Err(ExecError::ImageNotFound("nope:1".into())));
    let mut r = spawn(fake.clone(), task(0), TaskState::Assigned);
    let s = r.until(TaskState::Rejected).await.pop().unwrap();
    assert_eq!(s.err, "image nope:1 not found on node");
    assert_eq!(fake.calls(), vec!["prepare"]);
}

#[tokio::test]
async fn stop_sends_term_then_kill_after_the_grace_period_then_deletes() {
    let fake = Fake::with(|f| f.ignore_term = true);
    let mut r = spawn(fake.clone(), task(300), TaskState::Assigned);
    r.until(TaskState::Running).await;
    let t0 = tokio::time::Instant::now();
    r.set_desired(TaskState::Shutdown);
    let s = r.until(TaskState::Shutdown).await.pop().unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "waited the grace period: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "then killed: {took:?}");
    assert_eq!(s.exit_code, 137);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        fake.calls(),
        vec!["prepare", "start", "Term", "Kill", "remove"]
    );
}

#[tokio::test]
async fn a_process_that_honours_sigterm_stops_at_once() {
    let fake = Fake::new();
    let mut r = spawn(fake.clone(), task(0), TaskState::Assigned);
    r.until(TaskState::Running).await;
    let t0 = tokio::time::Instant::now();
    r.tx.send_modify(|a| a.removed = true);
    let s = r.until(TaskState::Shutdown).await.pop().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(s.exit_code, 143);
    tokio::time::timeout(Duration::from_secs(2), r.handle)
        .await
        .expect("a removed task's controller ends")
        .unwrap();
    assert_eq!(fake.calls(), vec!["prepare", "start", "Term", "remove"]);
}

#[tokio::test]
async fn shutdown_before_start_never_starts() {
    let fake = Fake::new();
    let mut t = task(0);
    t.desired_state = TaskState::Shutdown as i32;
    let mut r = spawn(fake.clone(), t, TaskState::Assigned);
    let got = r.until(TaskState::Shutdown).await;
    assert_eq!(states(&got), vec![TaskState::Shutdown as i32]);
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn a_resumed_running_task_is_adopted_not_restarted() {
    let fake = Fake::with(|f| f.probe = Probe::Running { pid: 7 });
    let mut r = spawn(fake.clone(), task(0), TaskState::Running);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.calls(), vec!["probe"], "no prepare, no start");
    fake.exit.send_replace(Some(Exit { code: 5 }));
    let got = r.until(TaskState::Failed).await;
    assert_eq!(states(&got), vec![TaskState::Failed as i32]);
    assert_eq!(got[0].exit_code, 5);
}

#[tokio::test]
async fn a_task_that_exited_while_the_agent_was_down_reports_its_real_exit_code() {
    let fake = Fake::with(|f| f.probe = Probe::Exited(Exit { code: 9 }));
    let mut r = spawn(fake.clone(), task(0), TaskState::Running);
    let s = r.until(TaskState::Failed).await.pop().unwrap();
    assert_eq!(s.exit_code, 9);
    assert_eq!(fake.calls(), vec!["probe"]);
}

#[tokio::test]
async fn a_running_task_whose_container_vanished_fails() {
    let fake = Fake::new();
    let mut r = spawn(fake.clone(), task(0), TaskState::Running);
    let s = r.until(TaskState::Failed).await.pop().unwrap();
    assert_eq!(s.err, "container vanished while the agent was down");
}

#[tokio::test]
async fn a_task_resumed_while_starting_without_a_container_starts_again() {
    let fake = Fake::new();
    let mut r = spawn(fake.clone(), task(0), TaskState::Starting);
    let got = r.until(TaskState::Running).await;
    assert_eq!(states(&got), vec![TaskState::Running as i32]);
    assert_eq!(fake.calls(), vec!["probe", "start"]);
}

#[tokio::test]
async fn a_checked_task_turns_healthy_then_unhealthy_and_is_stopped_as_failed() {
    let fake = Fake::with(|f| {
        f.image_hc = Some(HealthCheck {
            test: vec!["CMD".into(), "probe".into()],
            interval_ms: 10,
            retries: 2,
            ..Default::default()
        });
        f.checks = Mutex::new([0, 1, 1].into());
    });
    let mut r = spawn(fake.clone(), task(1_000), TaskState::Assigned);
    let got = r.until(TaskState::Failed).await;
    let running: Vec<&TaskStatus> = got
        .iter()
        .filter(|s| s.state == TaskState::Running as i32)
        .collect();
    let healths: Vec<i32> = running.iter().map(|s| s.health).collect();
    // Unhealthy is reported while still RUNNING, before the stop (the managers stop serving
    // it at once).
    assert_eq!(
        healths,
        vec![
            HealthState::Starting as i32,
            HealthState::Healthy as i32,
            HealthState::Unhealthy as i32
        ]
    );
    // A health report keeps the RUNNING time.
    assert_eq!(running[0].timestamp_ms, running[1].timestamp_ms);
    assert_eq!(running[1].timestamp_ms, running[2].timestamp_ms);
    assert_eq!(running[2].health_failing_streak, 2);
    let failed = got.last().unwrap();
    assert_eq!(failed.err, "task: non-zero exit (143): unhealthy container");
    assert_eq!(failed.health, HealthState::Unhealthy as i32);
    assert_eq!(failed.health_failing_streak, 2);
    assert_eq!(failed.health_output, "exit 1");
    let calls = fake.calls();
    assert_eq!(
        calls,
        vec![
            "prepare",
            "start",
            "check probe",
            "check probe",
            "check probe",
            "Term"
        ]
    );
}

#[tokio::test]
async fn the_spec_can_disable_the_image_check() {
    let fake = Fake::with(|f| {
        f.image_hc = Some(HealthCheck {
            test: vec!["CMD".into(), "probe".into()],
            interval_ms: 10,
            ..Default::default()
        });
    });
    let mut t = task(0);
    t.spec
        .as_mut()
        .unwrap()
        .container
        .as_mut()
        .unwrap()
        .healthcheck = Some(HealthCheck {
        test: vec!["NONE".into()],
        ..Default::default()
    });
    let mut r = spawn(fake.clone(), t, TaskState::Assigned);
    let running = r.until(TaskState::Running).await.pop().unwrap();
    assert_eq!(running.health, HealthState::None as i32);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.calls(), vec!["prepare", "start"]);
}
