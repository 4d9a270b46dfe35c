//! Progress of `service create`, `scale`, `update` and `rollback`, docker's way: `overall
//! progress: N out of M tasks` (`rolling back update: …` during a rollback), a line per slot (or
//! node, for a global service) moving through the task states, then `verify: Service
//! converged`. A task counts once it runs the service's current spec. On a terminal the lines
//! are redrawn in place; otherwise a line is printed whenever what it says changes.
//! Interrupting only stops the watching: the cluster carries on.

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

/// How often the tasks are read while waiting.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
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

/// One poll of the service and its tasks.
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

async fn follow(
    c: &mut ControlClient<Channel>,
    service_id: &str,
    quiet: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut display = Display::new(quiet);
    loop {
        let (service, tasks) = read_service(c, service_id).await?;
        let global = matches!(
            service.spec.as_ref().and_then(|s| s.mode.as_ref()),
            Some(Mode::Global(_))
        );
        let hostnames = if global {
            output::all_nodes(c, pb::ListNodesRequest::default())
                .await?
                .into_iter()
                .map(|n| {
                    (
                        n.meta.map(|m| m.id).unwrap_or_default(),
                        n.description.map(|d| d.hostname).unwrap_or_default(),
                    )
                })
                .collect()
        } else {
            HashMap::new()
        };
        let s = snapshot(&service, &tasks, &hostnames);
        display.draw(&s).context("writing progress")?;
        let settled = !global || s.total > 0 || started.elapsed() >= GLOBAL_SETTLE;
        if s.converged && settled {
            display.say("verify: Service converged");
            return Ok(());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
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
    loop {
        let (service, tasks) = read_service(c, service_id).await?;
        let status = service.update_status.clone().unwrap_or_default();
        let hostnames = if matches!(
            service.spec.as_ref().and_then(|s| s.mode.as_ref()),
            Some(Mode::Global(_))
        ) {
            output::all_nodes(c, pb::ListNodesRequest::default())
                .await?
                .into_iter()
                .map(|n| {
                    (
                        n.meta.map(|m| m.id).unwrap_or_default(),
                        n.description.map(|d| d.hostname).unwrap_or_default(),
                    )
                })
                .collect()
        } else {
            HashMap::new()
        };
        let s = snapshot(&service, &tasks, &hostnames);
        let mut done = false;
        match status.state() {
            UpdateState::Updating => followed = true,
            UpdateState::RollbackStarted => {
                followed = true;
                if !announced {
                    display.say(&format!("rollback: {}", status.message));
                    announced = true;
                }
                rollback_cause = status.message.clone();
                display.prefix = "rolling back update: ";
            }
            UpdateState::Paused => {
                display.draw(&s).context("writing progress")?;
                anyhow::bail!(
                    "service update paused: {}{}",
                    status.message,
                    failed_task_detail(c, &status.message, &tasks).await
                )
            }
            UpdateState::RollbackPaused => {
                display.draw(&s).context("writing progress")?;
                anyhow::bail!("service rollback paused: {}", status.message)
            }
            UpdateState::RollbackCompleted => {
                display.prefix = "rolling back update: ";
                if s.converged {
                    display.draw(&s).context("writing progress")?;
                    if followed && !manual_rollback {
                        if rollback_cause.is_empty() {
                            rollback_cause = status.message;
                        }
                        anyhow::bail!("service rolled back: {rollback_cause}");
                    }
                    done = true;
                }
            }
            UpdateState::Completed | UpdateState::Unknown => done = s.converged,
        }
        display.draw(&s).context("writing progress")?;
        if done {
            display.say("verify: Service converged");
            return Ok(());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
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
