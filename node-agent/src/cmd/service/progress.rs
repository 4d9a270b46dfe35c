//! Progress of `service create`, `scale`, `update` and `rollback`, docker's way: `overall
//! progress: N out of M tasks` (`rolling back update: …` during a rollback), a line per slot (or
//! node, for a global service) moving through the task states, then `verify: Service
//! converged`. A task counts once it runs the service's current spec, and the service is
//! converged once every task has kept running for the monitor period (the service's update
//! monitor, as docker's: 5 s by default; `verify: Waiting N seconds to verify that tasks are
//! stable...`): a task that fails meanwhile starts the wait again. The tasks are read once,
//! then followed from the control API's watch stream (polled only when the stream is not
//! available). On a terminal the lines are redrawn in place; otherwise a line is printed
//! whenever what it says changes. Interrupting only stops the watching: the cluster carries on.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::service_spec::Mode;
use shoal_proto::v1::TaskState;
use tonic::transport::Channel;

use super::super::output::{self, rpc, short};

/// How often the tasks are read while waiting, when no watch stream is available.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the tasks must keep running before the service counts as converged, when the
/// service's update config names no monitor period (docker's `defaultMonitor`).
pub const DEFAULT_MONITOR: Duration = Duration::from_secs(5);
/// Longest wait for a watch event before the service and its tasks are read again in full
/// (a safety net: the stream says when it lagged, and then they are read at once).
pub const WATCH_REREAD: Duration = Duration::from_secs(10);
/// Watch events applied at most before the progress is drawn again.
const EVENTS_PER_DRAW: usize = 4096;
/// Above this many tasks only the overall line is shown (docker's limit too).
pub const MAX_PROGRESS_BARS: usize = 20;
/// A global service with no task yet counts as converged only after this long: its
/// orchestrator may not have made them yet.
pub const GLOBAL_SETTLE: Duration = Duration::from_secs(2);
/// Width of a progress bar.
const BAR_WIDTH: usize = 50;

/// The task states a bar moves through, in order (RUNNING fills it).
const STEPS: [TaskState; 8] = [
    TaskState::New,
    TaskState::Pending,
    TaskState::Assigned,
    TaskState::Accepted,
    TaskState::Preparing,
    TaskState::Ready,
    TaskState::Starting,
    TaskState::Running,
];

/// What the progress display shows at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// One (label, text) per slot or node.
    pub lines: Vec<(String, String)>,
    pub running: usize,
    pub total: usize,
    /// Every wanted task runs and no unwanted one is still active.
    pub converged: bool,
}

fn state(t: &pb::Task) -> i32 {
    t.status.as_ref().map_or(0, |s| s.state)
}

/// RUNNING and, with a health check, healthy: docker's task stays STARTING until then.
fn up(t: &pb::Task) -> bool {
    t.status.as_ref().is_some_and(|s| {
        s.state == TaskState::Running as i32
            && s.health != pb::HealthState::Starting as i32
            && s.health != pb::HealthState::Unhealthy as i32
    })
}

fn created(t: &pb::Task) -> i64 {
    t.meta.as_ref().map_or(0, |m| m.created_at_ms)
}

/// A task that may still hold (or get) a container although it is not wanted.
fn active_unwanted(t: &pb::Task) -> bool {
    let s = state(t);
    let never_placed =
        s <= TaskState::Pending as i32 && t.desired_state > TaskState::Running as i32;
    s <= TaskState::Running as i32 && !never_placed
}

/// The lowercase state name docker prints.
pub fn state_word(s: i32) -> String {
    TaskState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn line_text(t: Option<&pb::Task>) -> String {
    let Some(t) = t else {
        return format!("{:<9} {}", "new", bar(0));
    };
    let s = state(t);
    let word = state_word(s);
    let status = t.status.clone().unwrap_or_default();
    if s == TaskState::Pending as i32 && !t.scheduling_message.is_empty() {
        return format!("{word:<9} {}", t.scheduling_message);
    }
    if s > TaskState::Running as i32 {
        let why = if !status.err.is_empty() {
            status.err
        } else {
            status.message
        };
        return format!("{word:<9} {why}").trim_end().to_string();
    }
    // Running but not yet healthy: still starting, as docker shows it.
    let (s, word) = if s == TaskState::Running as i32 && !up(t) {
        (
            TaskState::Starting as i32,
            state_word(TaskState::Starting as i32),
        )
    } else {
        (s, word)
    };
    let step = STEPS.iter().position(|x| *x as i32 == s).unwrap_or(0) + 1;
    format!("{word:<9} {}", bar(step))
}

fn bar(step: usize) -> String {
    let filled = BAR_WIDTH * step / STEPS.len();
    if filled >= BAR_WIDTH {
        format!("[{}>]", "=".repeat(BAR_WIDTH))
    } else {
        format!(
            "[{}>{}]",
            "=".repeat(filled),
            " ".repeat(BAR_WIDTH - filled)
        )
    }
}

/// What `tasks` of `service` come to, as progress.
pub fn snapshot(
    service: &pb::Service,
    tasks: &[pb::Task],
    hostnames: &HashMap<String, String>,
) -> Snapshot {
    let spec = service.spec.clone().unwrap_or_default();
    let mut wanted: Vec<(String, Option<&pb::Task>)> = Vec::new();
    let mut chosen: Vec<&str> = Vec::new();
    match spec.mode {
        Some(Mode::Global(_)) => {
            // The live task of each node the service runs on.
            let mut by_node: BTreeMap<&str, &pb::Task> = BTreeMap::new();
            for t in tasks
                .iter()
                .filter(|t| t.desired_state <= TaskState::Running as i32)
            {
                let e = by_node.entry(t.node_id.as_str()).or_insert(t);
                if created(t) > created(e) {
                    *e = t;
                }
            }
            for (node, t) in by_node {
                let label = hostnames
                    .get(node)
                    .cloned()
                    .unwrap_or_else(|| short(node).to_string());
                wanted.push((label, Some(t)));
            }
        }
        _ => {
            let n = match spec.mode {
                Some(Mode::Replicated(r)) => r.replicas,
                _ => 0,
            };
            let mut by_slot: HashMap<u64, Vec<&pb::Task>> = HashMap::new();
            for t in tasks {
                by_slot.entry(t.slot).or_default().push(t);
            }
            for slot in 1..=n {
                let live = by_slot.get(&slot).and_then(|ts| {
                    ts.iter()
                        .filter(|t| t.desired_state <= TaskState::Running as i32)
                        .max_by_key(|t| created(t))
                        .or_else(|| ts.iter().max_by_key(|t| created(t)))
                        .copied()
                });
                wanted.push((format!("{slot}/{n}"), live));
            }
        }
    }
    for (_, t) in &wanted {
        if let Some(t) = t {
            chosen.push(t.meta.as_ref().map_or("", |m| m.id.as_str()));
        }
    }
    let current = spec.task.as_ref();
    // A task meant to finish (restart condition none, or on-failure and it succeeded) is done
    // once complete: the orchestrator starts no other for its slot.
    let condition = current
        .and_then(|t| t.restart.as_ref())
        .map_or(pb::RestartCondition::Any as i32, |r| r.condition);
    let finished = |t: &pb::Task| {
        state(t) == TaskState::Complete as i32
            && condition != pb::RestartCondition::Any as i32
            && t.spec.as_ref() == current
    };
    let running = wanted
        .iter()
        .filter(|(_, t)| {
            t.is_some_and(|t| {
                (up(t)
                    && t.desired_state <= TaskState::Running as i32
                    && t.spec.as_ref() == current)
                    || finished(t)
            })
        })
        .count();
    let leftover = tasks.iter().any(|t| {
        let id = t.meta.as_ref().map_or("", |m| m.id.as_str());
        !chosen.contains(&id) && active_unwanted(t)
    });
    Snapshot {
        lines: wanted
            .iter()
            .map(|(label, t)| (label.clone(), line_text(*t)))
            .collect(),
        running,
        total: wanted.len(),
        converged: running == wanted.len() && !leftover,
    }
}

/// Draws snapshots on stdout: in place on a terminal, changed lines only otherwise.
struct Display {
    /// `--quiet`: nothing is drawn (docker's "suppress progress output").
    quiet: bool,
    tty: bool,
    /// Words before the counts (`rolling back update: ` during a rollback).
    prefix: &'static str,
    /// Lines drawn last time (terminal) or last printed per label (plain).
    shown: Vec<String>,
    last_overall: Option<String>,
    last_plain: HashMap<String, String>,
    /// On a terminal, the last line of the frame (the monitor's countdown).
    footer: Option<String>,
}

impl Display {
    fn new(quiet: bool) -> Display {
        use std::io::IsTerminal;
        Display {
            quiet,
            tty: std::io::stdout().is_terminal(),
            prefix: "",
            shown: Vec::new(),
            last_overall: None,
            last_plain: HashMap::new(),
            footer: None,
        }
    }

    /// A line of its own below the progress (`verify: Service converged`).
    fn say(&self, line: &str) {
        if !self.quiet {
            println!("{line}");
        }
    }

    fn draw(&mut self, s: &Snapshot) -> std::io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        let overall = format!(
            "overall progress: {}{} out of {} tasks",
            self.prefix, s.running, s.total
        );
        let bars = s.lines.len() <= MAX_PROGRESS_BARS;
        let mut out = std::io::stdout().lock();
        if self.tty {
            let mut lines = vec![overall];
            if bars {
                lines.extend(s.lines.iter().map(|(l, t)| format!("{l}: {t}")));
            }
            lines.extend(self.footer.clone());
            if lines == self.shown {
                return Ok(());
            }
            if !self.shown.is_empty() {
                write!(out, "\x1b[{}A", self.shown.len())?;
            }
            for l in &lines {
                writeln!(out, "\x1b[2K{l}")?;
            }
            // A shorter frame (scaled down) leaves old lines below: clear them.
            for _ in lines.len()..self.shown.len() {
                writeln!(out, "\x1b[2K")?;
            }
            if self.shown.len() > lines.len() {
                write!(out, "\x1b[{}A", self.shown.len() - lines.len())?;
            }
            self.shown = lines;
        } else {
            if self.last_overall.as_ref() != Some(&overall) {
                writeln!(out, "{overall}")?;
                self.last_overall = Some(overall);
            }
            if bars {
                for (label, text) in &s.lines {
                    // Plain output shows the state, not a bar.
                    let plain = text.split(" [").next().unwrap_or(text).trim_end();
                    if self.last_plain.get(label).map(String::as_str) != Some(plain) {
                        writeln!(out, "{label}: {plain}")?;
                        self.last_plain.insert(label.clone(), plain.to_string());
                    }
                }
            }
        }
        out.flush()
    }
}

/// Follows the service's tasks until it converges, drawing progress unless `quiet`; Ctrl-C
/// stops only the watching (the cluster keeps converging the service).
pub async fn wait_converged(
    c: &mut ControlClient<Channel>,
    service_id: &str,
    quiet: bool,
) -> anyhow::Result<()> {
    tokio::select! {
        r = follow(c, service_id, quiet) => r,
        _ = tokio::signal::ctrl_c() => {
            println!();
            println!("Operation continuing in background.");
            println!("Use `shoal service ps {service_id}` to check progress.");
            Ok(())
        }
    }
}

/// One read of the service and all its tasks.
async fn read_service(
    c: &mut ControlClient<Channel>,
    service_id: &str,
) -> anyhow::Result<(pb::Service, Vec<pb::Task>)> {
    let service = rpc(c
        .get_service(pb::GetServiceRequest {
            service: service_id.to_string(),
        })
        .await)
    .context("reading the service")?
    .service
    .unwrap_or_default();
    let tasks = output::all_tasks(
        c,
        pb::ListTasksRequest {
            service: service_id.to_string(),
            ..Default::default()
        },
    )
    .await
    .context("reading the service's tasks")?;
    Ok((service, tasks))
}

fn version(m: Option<&pb::Meta>) -> u64 {
    m.map_or(0, |m| m.version)
}

/// The service and its tasks as the CLI follows them: read once, then kept up to date from
/// the watch stream of service and task events (read again in full when the stream lagged or
/// after [`WATCH_REREAD`] without news; polled when there is no stream).
struct Tracker<'a> {
    c: &'a mut ControlClient<Channel>,
    id: String,
    events: Option<tonic::Streaming<pb::WatchEvent>>,
    service: pb::Service,
    tasks: BTreeMap<String, pb::Task>,
    hostnames: HashMap<String, String>,
}

impl<'a> Tracker<'a> {
    async fn open(c: &'a mut ControlClient<Channel>, service_id: &str) -> anyhow::Result<Self> {
        // Subscribed before the first read: no change falls between the two.
        let events = c
            .watch(pb::WatchRequest {
                kinds: vec![pb::WatchKind::Service as i32, pb::WatchKind::Task as i32],
                ..Default::default()
            })
            .await
            .ok()
            .map(|r| r.into_inner());
        let mut t = Tracker {
            c,
            id: service_id.to_string(),
            events,
            service: pb::Service::default(),
            tasks: BTreeMap::new(),
            hostnames: HashMap::new(),
        };
        t.reread().await?;
        Ok(t)
    }

    async fn reread(&mut self) -> anyhow::Result<()> {
        let (service, tasks) = read_service(self.c, &self.id).await?;
        self.id = service
            .meta
            .as_ref()
            .map_or(self.id.clone(), |m| m.id.clone());
        self.service = service;
        self.tasks = tasks
            .into_iter()
            .map(|t| (t.meta.as_ref().map_or(String::new(), |m| m.id.clone()), t))
            .collect();
        self.refresh_hostnames().await
    }

    /// Hostnames of the nodes a global service's tasks are on (read again when one is new).
    async fn refresh_hostnames(&mut self) -> anyhow::Result<()> {
        let global = matches!(
            self.service.spec.as_ref().and_then(|s| s.mode.as_ref()),
            Some(Mode::Global(_))
        );
        if !global
            || self
                .tasks
                .values()
                .all(|t| self.hostnames.contains_key(&t.node_id))
        {
            return Ok(());
        }
        self.hostnames = output::all_nodes(self.c, pb::ListNodesRequest::default())
            .await?
            .into_iter()
            .map(|n| {
                (
                    n.meta.map(|m| m.id).unwrap_or_default(),
                    n.description.map(|d| d.hostname).unwrap_or_default(),
                )
            })
            .collect();
        // A task not yet on a node (or on one since removed) would ask again each time.
        for t in self.tasks.values() {
            self.hostnames.entry(t.node_id.clone()).or_default();
        }
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        let tasks: Vec<pb::Task> = self.tasks.values().cloned().collect();
        snapshot(&self.service, &tasks, &self.hostnames)
    }

    /// Applies one event; false when the stream wants a full read (it lagged).
    fn apply(&mut self, ev: pb::WatchEvent) -> bool {
        use pb::watch_event::Object;
        let delete = ev.action == pb::WatchAction::Delete as i32;
        match ev.object {
            _ if ev.action == pb::WatchAction::Resync as i32 => return false,
            // An event older than what was read is already in it.
            Some(Object::Service(s))
                if s.meta.as_ref().is_some_and(|m| m.id == self.id)
                    && !delete
                    && version(s.meta.as_ref()) > version(self.service.meta.as_ref()) =>
            {
                self.service = s;
            }
            Some(Object::Task(t)) if t.service_id == self.id => {
                let id = t.meta.as_ref().map_or(String::new(), |m| m.id.clone());
                if delete {
                    self.tasks.remove(&id);
                } else if self
                    .tasks
                    .get(&id)
                    .is_none_or(|old| version(t.meta.as_ref()) > version(old.meta.as_ref()))
                {
                    self.tasks.insert(id, t);
                }
            }
            _ => {}
        }
        true
    }

    /// Waits up to `wait` for changes and applies them (every event already there with the
    /// first); without a stream, sleeps a poll interval and reads again.
    async fn next(&mut self, wait: Duration) -> anyhow::Result<()> {
        let Some(events) = self.events.as_mut() else {
            tokio::time::sleep(POLL_INTERVAL.min(wait)).await;
            return self.reread().await;
        };
        let first = match tokio::time::timeout(wait, events.message()).await {
            // Nothing within the wait: read again in full only after a long quiet.
            Err(_) if wait < WATCH_REREAD => return Ok(()),
            Err(_) => return self.reread().await,
            Ok(Ok(Some(ev))) => ev,
            Ok(_) => {
                // The stream ended (a manager restarting): poll from now on.
                self.events = None;
                return self.reread().await;
            }
        };
        let mut whole = self.apply(first);
        for _ in 0..EVENTS_PER_DRAW {
            let Some(events) = self.events.as_mut() else {
                break;
            };
            match tokio::time::timeout(Duration::ZERO, events.message()).await {
                Ok(Ok(Some(ev))) => whole &= self.apply(ev),
                _ => break,
            }
        }
        if !whole {
            return self.reread().await;
        }
        self.refresh_hostnames().await
    }
}

/// The monitor period of a service's tasks: its update config's (its rollback config's while
/// it rolls back), else [`DEFAULT_MONITOR`] — docker's rule.
fn monitor_of(service: &pb::Service, rolling_back: bool) -> Duration {
    let spec = service.spec.as_ref();
    let config = if rolling_back {
        spec.and_then(|s| s.rollback.as_ref())
    } else {
        spec.and_then(|s| s.update.as_ref())
    };
    match config.map_or(0, |u| u.monitor_ms) {
        0 => DEFAULT_MONITOR,
        ms => Duration::from_millis(ms),
    }
}

/// Whether the tasks of a converged snapshot have stayed as they are for the monitor period:
/// the first converged moment starts the wait, any change of the running tasks starts it again.
struct Stability {
    since: Option<(Instant, Vec<String>)>,
    told: Option<u64>,
}

impl Stability {
    fn new() -> Stability {
        Stability {
            since: None,
            told: None,
        }
    }

    /// The running tasks' ids (a restarted task is a new id).
    fn running(tasks: &BTreeMap<String, pb::Task>) -> Vec<String> {
        tasks
            .iter()
            .filter(|(_, t)| up(t) && t.desired_state <= TaskState::Running as i32)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Records a converged (or not) moment; `Some(left)` while the wait goes on, `None` once
    /// the tasks have been stable for `monitor` (or when not converged: then the wait ends).
    fn step(
        &mut self,
        converged: bool,
        tasks: &BTreeMap<String, pb::Task>,
        monitor: Duration,
        now: Instant,
    ) -> Waiting {
        if !converged {
            self.since = None;
            return Waiting::NotConverged;
        }
        let ids = Stability::running(tasks);
        match &self.since {
            Some((_, seen)) if *seen == ids => {}
            _ => self.since = Some((now, ids)),
        }
        let at = self.since.as_ref().map_or(now, |(at, _)| *at);
        let left = monitor.saturating_sub(now.saturating_duration_since(at));
        if left.is_zero() {
            Waiting::Stable
        } else {
            Waiting::For(left)
        }
    }

    /// docker's line while it waits: on a terminal the frame's last line, counting down;
    /// otherwise printed once.
    fn tell(&mut self, display: &mut Display, left: Duration) {
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        let line = format!("verify: Waiting {secs} seconds to verify that tasks are stable...");
        if display.tty {
            display.footer = Some(line);
        } else if self.told.is_none() {
            display.say(&line);
        }
        self.told = Some(secs);
    }
}

/// Where a converged service stands in its monitor period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    NotConverged,
    For(Duration),
    Stable,
}

async fn follow(
    c: &mut ControlClient<Channel>,
    service_id: &str,
    quiet: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut display = Display::new(quiet);
    let mut t = Tracker::open(c, service_id).await?;
    let mut stable = Stability::new();
    loop {
        let s = t.snapshot();
        let global = matches!(
            t.service.spec.as_ref().and_then(|s| s.mode.as_ref()),
            Some(Mode::Global(_))
        );
        let settled = !global || s.total > 0 || started.elapsed() >= GLOBAL_SETTLE;
        let monitor = monitor_of(&t.service, false);
        let step = stable.step(s.converged && settled, &t.tasks, monitor, Instant::now());
        let wait = match step {
            Waiting::Stable => {
                display.footer = None;
                display.draw(&s).context("writing progress")?;
                display.say("verify: Service converged");
                return Ok(());
            }
            Waiting::For(left) => {
                stable.tell(&mut display, left);
                left.min(Duration::from_secs(1))
            }
            Waiting::NotConverged => {
                display.footer = None;
                if global && s.total == 0 {
                    GLOBAL_SETTLE
                } else {
                    WATCH_REREAD
                }
            }
        };
        display.draw(&s).context("writing progress")?;
        t.next(wait).await?;
    }
}

/// What went wrong with the task an update status names (its last word is the task id): its
/// error and its node, as `: ERROR (on NODE)`; empty when the task is not found.
async fn failed_task_detail(
    c: &mut ControlClient<Channel>,
    message: &str,
    tasks: &[pb::Task],
) -> String {
    let Some(id) = message.split_whitespace().last() else {
        return String::new();
    };
    let Some(t) = tasks.iter().find(|t| {
        t.meta
            .as_ref()
            .is_some_and(|m| !id.is_empty() && m.id.starts_with(id.trim_end_matches('…')))
    }) else {
        return String::new();
    };
    let st = t.status.clone().unwrap_or_default();
    let why = if st.err.is_empty() {
        st.message
    } else {
        st.err
    };
    let node = match c
        .get_node(pb::GetNodeRequest {
            node: t.node_id.clone(),
        })
        .await
    {
        Ok(r) => r
            .into_inner()
            .node
            .and_then(|n| n.description)
            .map(|d| d.hostname)
            .unwrap_or_else(|| t.node_id.clone()),
        Err(_) => t.node_id.clone(),
    };
    if why.is_empty() {
        format!(" (on {node})")
    } else {
        format!(": {why} (on {node})")
    }
}

/// Follows an update (or, with `manual_rollback`, a rollback) until it completes and the
/// service converges. A paused update or rollback, or an update that was rolled back, is an
/// error with the service's message, as docker reports them. `quiet`: no progress drawn.
pub async fn wait_updated(
    c: &mut ControlClient<Channel>,
    service_id: &str,
    manual_rollback: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    tokio::select! {
        r = follow_update(c, service_id, manual_rollback, quiet) => r,
        _ = tokio::signal::ctrl_c() => {
            println!();
            println!("Operation continuing in background.");
            println!("Use `shoal service ps {service_id}` to check progress.");
            Ok(())
        }
    }
}

async fn follow_update(
    c: &mut ControlClient<Channel>,
    service_id: &str,
    manual_rollback: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    use pb::UpdateState;
    let mut display = Display::new(quiet);
    let mut announced = false;
    // An update seen running in this follow: its ROLLBACK_COMPLETED means it failed.
    let mut followed = false;
    // Why the rollback started: its completed status only says "rollback completed".
    let mut rollback_cause = String::new();
    let mut t = Tracker::open(c, service_id).await?;
    let mut stable = Stability::new();
    loop {
        let service = t.service.clone();
        let status = service.update_status.clone().unwrap_or_default();
        let s = t.snapshot();
        let mut converged = false;
        let mut rolling_back = false;
        match status.state() {
            UpdateState::Updating => followed = true,
            UpdateState::RollbackStarted => {
                followed = true;
                rolling_back = true;
                if !announced {
                    display.say(&format!("rollback: {}", status.message));
                    announced = true;
                }
                rollback_cause = status.message.clone();
                display.prefix = "rolling back update: ";
            }
            UpdateState::Paused => {
                display.draw(&s).context("writing progress")?;
                let tasks: Vec<pb::Task> = t.tasks.values().cloned().collect();
                anyhow::bail!(
                    "service update paused: {}{}",
                    status.message,
                    failed_task_detail(t.c, &status.message, &tasks).await
                )
            }
            UpdateState::RollbackPaused => {
                display.draw(&s).context("writing progress")?;
                anyhow::bail!("service rollback paused: {}", status.message)
            }
            UpdateState::RollbackCompleted => {
                display.prefix = "rolling back update: ";
                rolling_back = true;
                if s.converged {
                    display.draw(&s).context("writing progress")?;
                    if followed && !manual_rollback {
                        if rollback_cause.is_empty() {
                            rollback_cause = status.message;
                        }
                        anyhow::bail!("service rolled back: {rollback_cause}");
                    }
                    converged = true;
                }
            }
            UpdateState::Completed | UpdateState::Unknown => converged = s.converged,
        }
        let monitor = monitor_of(&service, rolling_back);
        let wait = match stable.step(converged, &t.tasks, monitor, Instant::now()) {
            Waiting::Stable => {
                display.footer = None;
                display.draw(&s).context("writing progress")?;
                display.say("verify: Service converged");
                return Ok(());
            }
            Waiting::For(left) => {
                stable.tell(&mut display, left);
                left.min(Duration::from_secs(1))
            }
            Waiting::NotConverged => {
                display.footer = None;
                WATCH_REREAD
            }
        };
        display.draw(&s).context("writing progress")?;
        t.next(wait).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, slot: u64, desired: TaskState, state: TaskState, at: i64) -> pb::Task {
        pb::Task {
            meta: Some(pb::Meta {
                id: id.into(),
                created_at_ms: at,
                ..Default::default()
            }),
            slot,
            desired_state: desired as i32,
            status: Some(pb::TaskStatus {
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn replicated(n: u64) -> pb::Service {
        pb::Service {
            spec: Some(pb::ServiceSpec {
                mode: Some(Mode::Replicated(pb::ReplicatedService { replicas: n })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    use TaskState::*;

    #[test]
    fn converged_tasks_must_stay_as_they_are_for_the_monitor_period() {
        let t0 = Instant::now();
        let monitor = Duration::from_secs(5);
        let running = |id: &str| {
            let t = task(id, 1, TaskState::Running, TaskState::Running, 1);
            (id.to_string(), t)
        };
        let a: BTreeMap<String, pb::Task> = [running("a")].into();
        let mut s = Stability::new();
        assert_eq!(s.step(true, &a, monitor, t0), Waiting::For(monitor));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            s.step(true, &a, monitor, at(4_000)),
            Waiting::For(Duration::from_secs(1))
        );
        // The task died and another runs in its slot: the wait starts again.
        let b: BTreeMap<String, pb::Task> = [running("b")].into();
        assert_eq!(s.step(true, &b, monitor, at(4_500)), Waiting::For(monitor));
        assert_eq!(
            s.step(true, &b, monitor, at(9_499)),
            Waiting::For(Duration::from_millis(1))
        );
        assert_eq!(s.step(true, &b, monitor, at(9_500)), Waiting::Stable);
        // Not converged in between: from the start again.
        let mut s = Stability::new();
        s.step(true, &a, monitor, t0);
        assert_eq!(s.step(false, &a, monitor, at(3_000)), Waiting::NotConverged);
        assert_eq!(s.step(true, &a, monitor, at(6_000)), Waiting::For(monitor));
    }

    #[test]
    fn the_monitor_period_is_the_update_configs_else_five_seconds() {
        let mut s = replicated(1);
        assert_eq!(monitor_of(&s, false), DEFAULT_MONITOR);
        let spec = s.spec.as_mut().unwrap();
        spec.update = Some(pb::UpdateConfig {
            monitor_ms: 2_000,
            ..Default::default()
        });
        spec.rollback = Some(pb::UpdateConfig {
            monitor_ms: 0,
            ..Default::default()
        });
        assert_eq!(monitor_of(&s, false), Duration::from_secs(2));
        assert_eq!(monitor_of(&s, true), DEFAULT_MONITOR);
    }

    #[test]
    fn converges_when_every_slot_runs() {
        let none = HashMap::new();
        let tasks = vec![
            task("a", 1, Running, Running, 1),
            task("b", 2, Running, Preparing, 1),
        ];
        let s = snapshot(&replicated(2), &tasks, &none);
        assert_eq!((s.running, s.total, s.converged), (1, 2, false));
        assert!(s.lines[1].1.starts_with("preparing"), "{:?}", s.lines);
        let tasks = vec![
            task("a", 1, Running, Running, 1),
            task("b", 2, Running, Running, 1),
        ];
        assert!(snapshot(&replicated(2), &tasks, &none).converged);
    }

    #[test]
    fn a_restarted_slot_shows_its_new_task() {
        let tasks = vec![
            task("old", 1, Shutdown, Failed, 1),
            task("new", 1, Running, Pending, 2),
        ];
        let s = snapshot(&replicated(1), &tasks, &HashMap::new());
        assert!(s.lines[0].1.starts_with("pending"), "{:?}", s.lines);
        assert!(!s.converged);
    }

    #[test]
    fn scale_down_waits_for_removed_tasks_to_stop() {
        let none = HashMap::new();
        let tasks = vec![
            task("a", 1, Running, Running, 1),
            task("b", 2, Remove, Running, 1),
            task("c", 3, Remove, Pending, 1),
        ];
        assert!(!snapshot(&replicated(1), &tasks, &none).converged);
        let tasks = vec![
            task("a", 1, Running, Running, 1),
            task("b", 2, Remove, Shutdown, 1),
            task("c", 3, Remove, Pending, 1),
        ];
        let s = snapshot(&replicated(1), &tasks, &none);
        assert!(s.converged);
        assert_eq!(s.total, 1);
        assert!(snapshot(&replicated(0), &[], &none).converged);
    }

    #[test]
    fn pending_shows_why() {
        let mut t = task("a", 1, Running, Pending, 1);
        t.scheduling_message = "no suitable node (constraints)".into();
        let s = snapshot(&replicated(1), &[t], &HashMap::new());
        assert!(s.lines[0].1.contains("no suitable node"), "{:?}", s.lines);
    }

    #[test]
    fn only_tasks_on_the_current_spec_count() {
        let spec = |image: &str| pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut svc = replicated(2);
        svc.spec.as_mut().unwrap().task = Some(spec("new"));
        let mut a = task("a", 1, Running, Running, 2);
        a.spec = Some(spec("new"));
        let mut b = task("b", 2, Running, Running, 1);
        b.spec = Some(spec("old"));
        let s = snapshot(&svc, &[a.clone(), b], &HashMap::new());
        assert_eq!((s.running, s.converged), (1, false));
        let mut b2 = task("b2", 2, Running, Running, 3);
        b2.spec = Some(spec("new"));
        assert!(snapshot(&svc, &[a, b2], &HashMap::new()).converged);
    }

    #[test]
    fn bars_fill_with_the_state() {
        assert_eq!(bar(8), format!("[{}>]", "=".repeat(BAR_WIDTH)));
        assert!(bar(1).starts_with("[======>"));
    }
}
