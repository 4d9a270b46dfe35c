//! Fault injectors over the test bed. Each fault is injected, held for a bounded time and
//! healed (healing is attempted whatever happened), then the cluster is given
//! [`RECOVERY_TIMEOUT`] to be well again (a leader, every manager reachable, every node Ready).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use shoal_chaos::history::{Call, Kind, Outcome};
use shoal_chaos::lincheck::SpecValue;
use shoal_proto::v1 as pb;
use shoal_tests::testbed::{pid_stopped, Signal};

use crate::cluster::{control, Cluster, CALL_TIMEOUT};
use crate::observe::FaultTag;
use crate::workload::{Shared, OP_TIMEOUT, TOKEN_LABEL};

/// How long the cluster may take to be well again after a fault is healed.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a known leader is waited for before a fault that needs one.
const LEADER_WAIT: Duration = Duration::from_secs(20);
/// The disk-full filler is written in chunks of this size, up to [`MAX_FILL`].
const FILL_CHUNK: usize = 1 << 20;
const MAX_FILL: u64 = 1 << 30;
/// Name of the filler file in the disk-full manager's data dir.
const FILLER: &str = "chaos-filler";
/// How long writes through the disk-full manager are retried once space is back.
const DISK_RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// Attempts at moving leadership to the disk-full manager (stopping the leader each time).
const LEAD_ATTEMPTS: usize = 3;
/// How long a stopped leader's successor is waited for.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(8);
/// Big writes made while the disk is full, and the label bytes each carries.
const PRESSURE_WRITES: usize = 12;
const PRESSURE_LABELS: usize = 64 * 1024;
/// Size of one ballast label's value (the control API allows 4 KiB).
const LABEL_VALUE_BYTES: usize = 4000;
/// The disk stays full at least this long (the big writes take their time).
const DISK_HOLD_MIN: Duration = Duration::from_secs(10);
/// Lines of the disk-full manager's log kept in the report.
const MAX_LOG_LINES: usize = 40;
/// How long a write is waited for in a manager's own store.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// The faults, in the order `--smoke` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    KillLeader,
    KillManager,
    KillWorker,
    PauseLeader,
    PartitionMinority,
    PartitionMajority,
    IsolateLeader,
    OneWayToLeader,
    RestartAllManagers,
    AgentRestart,
    DiskFull,
}

pub const ALL: [Fault; 11] = [
    Fault::KillLeader,
    Fault::KillManager,
    Fault::KillWorker,
    Fault::PauseLeader,
    Fault::PartitionMinority,
    Fault::PartitionMajority,
    Fault::IsolateLeader,
    Fault::OneWayToLeader,
    Fault::RestartAllManagers,
    Fault::AgentRestart,
    Fault::DiskFull,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-9-leader",
            Fault::KillManager => "kill-9-random-manager",
            Fault::KillWorker => "kill-9-worker-and-containers",
            Fault::PauseLeader => "sigstop-leader",
            Fault::PartitionMinority => "partition-minority",
            Fault::PartitionMajority => "partition-leader-in-minority",
            Fault::IsolateLeader => "partition-leader-isolated",
            Fault::OneWayToLeader => "partition-one-way-to-leader",
            Fault::RestartAllManagers => "restart-all-managers",
            Fault::AgentRestart => "agent-restart-with-running-containers",
            Fault::DiskFull => "disk-full-manager",
        }
    }
}

/// What one fault did.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub fault: Fault,
    pub name: String,
    pub detail: String,
    pub start_ms: u64,
    pub healed_ms: u64,
    /// Seconds from healing until the cluster was well again.
    pub recovery_s: Option<f64>,
    /// Injection, healing or recovery that failed.
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

/// What the disk-full fault found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskFullReport {
    pub host: String,
    pub role: String,
    pub filled_bytes: u64,
    /// Writes made while the disk was full: (through which host, outcome).
    pub writes_while_full: Vec<(String, String)>,
    pub agent_survived: bool,
    pub log_lines: Vec<String>,
    pub write_after_free: Option<String>,
    pub recovered_after_s: Option<f64>,
    pub problems: Vec<String>,
}

pub struct Injector<'a> {
    pub cluster: &'a Cluster,
    pub rt: tokio::runtime::Handle,
    pub shared: Arc<Shared>,
    pub tag: Arc<Mutex<FaultTag>>,
    pub interrupted: &'a AtomicBool,
    pub rng: rand::rngs::StdRng,
    pub log: &'a dyn Fn(&str),
    pub disk: Vec<DiskFullReport>,
}

impl Injector<'_> {
    /// Sleeps `d`, or less if the run is interrupted.
    fn hold(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn leader(&self) -> Result<usize> {
        self.rt
            .block_on(self.cluster.leader(LEADER_WAIT))
            .with_context(|| format!("no leader known after {} s", LEADER_WAIT.as_secs()))
    }

    fn name(&self, i: usize) -> String {
        self.cluster
            .host(i)
            .map(|h| h.name().to_string())
            .unwrap_or_else(|_| format!("h{i}"))
    }

    /// Undoes every fault: partitions, stopped agents, dead agents, the filler file.
    pub fn heal_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = self.cluster.tb.heal() {
            errors.push(format!("heal: {e}"));
        }
        let _ = std::fs::remove_file(self.filler());
        for h in self.cluster.tb.hosts() {
            if let Some(pid) = h.agent_pid() {
                if pid_stopped(pid) {
                    if let Err(e) = h.kill(Signal::Cont) {
                        errors.push(format!("SIGCONT {}: {e}", h.name()));
                    }
                }
            }
            if let Err(e) = self.cluster.ensure_agent(h.index()) {
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }

    fn filler(&self) -> PathBuf {
        self.cluster
            .host(self.cluster.disk_host)
            .map(|h| h.data_dir().join(FILLER))
            .unwrap_or_else(|_| PathBuf::from("/nonexistent"))
    }

    /// Injects `f`, holds it for `hold`, heals, and waits for recovery.
    pub fn run(&mut self, f: Fault, hold: Duration) -> FaultRecord {
        let start_ms = self.shared.now_us() / 1000;
        {
            let mut t = self.tag.lock().unwrap_or_else(|e| e.into_inner());
            t.current = Some(f.name().to_string());
        }
        (self.log)(&format!(
            "fault {}: injecting (hold {} s)",
            f.name(),
            hold.as_secs()
        ));
        let mut rec = FaultRecord {
            fault: f,
            name: f.name().to_string(),
            detail: String::new(),
            start_ms,
            healed_ms: 0,
            recovery_s: None,
            errors: Vec::new(),
            notes: Vec::new(),
        };
        let marks = self.cluster.agent_marks();
        if let Err(e) = self.inject(f, hold, &mut rec) {
            rec.errors.push(format!("{e:#}"));
        }
        rec.errors.extend(self.heal_all());
        rec.healed_ms = self.shared.now_us() / 1000;
        {
            let mut t = self.tag.lock().unwrap_or_else(|e| e.into_inner());
            t.current = None;
            t.healed = Some((f.name().to_string(), rec.healed_ms));
        }
        let healed = Instant::now();
        let well = self.rt.block_on(async {
            let (d, h) = self.cluster.wait_well(RECOVERY_TIMEOUT).await?;
            let left = RECOVERY_TIMEOUT.saturating_sub(healed.elapsed());
            let missing = self.cluster.wait_sessions(&marks, left).await;
            if !missing.is_empty() {
                bail!(
                    "restarted agents without a dispatcher session {} s after the heal: {}",
                    RECOVERY_TIMEOUT.as_secs(),
                    missing.join(", ")
                );
            }
            Ok((d.max(healed.elapsed()), h))
        });
        match well {
            Ok((d, h)) => {
                rec.recovery_s = Some(d.as_secs_f64());
                rec.notes.push(format!(
                    "well as seen through {}, every restarted agent in session",
                    h.via
                ));
            }
            Err(e) => {
                rec.errors.push(format!("{e:#}"));
                // One more chance: an agent may have died while we waited.
                rec.errors.extend(self.heal_all());
            }
        }
        (self.log)(&format!(
            "fault {}: {} healed, recovered in {}{}",
            f.name(),
            rec.detail,
            rec.recovery_s
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "— (not recovered)".into()),
            if rec.errors.is_empty() {
                String::new()
            } else {
                format!("; errors: {}", rec.errors.join("; "))
            }
        ));
        rec
    }

    fn inject(&mut self, f: Fault, hold: Duration, rec: &mut FaultRecord) -> Result<()> {
        let c = self.cluster;
        match f {
            Fault::KillLeader | Fault::KillManager => {
                let m = if f == Fault::KillLeader {
                    self.leader()?
                } else {
                    *c.managers.choose(&mut self.rng).context("no managers")?
                };
                c.kill_agent(m, Signal::Kill)?;
                rec.detail = format!("agent of {} killed", self.name(m));
                self.hold(hold);
                c.ensure_agent(m)?;
            }
            Fault::KillWorker => {
                let w = *c.workers.choose(&mut self.rng).context("no workers")?;
                c.kill_agent(w, Signal::Kill)?;
                let n = c.kill_containers(w)?;
                rec.detail = format!("agent of {} and its {n} containers killed", self.name(w));
                self.hold(hold);
                c.ensure_agent(w)?;
            }
            Fault::PauseLeader => {
                let l = self.leader()?;
                c.kill_agent(l, Signal::Stop)?;
                rec.detail = format!("agent of {} (leader) stopped", self.name(l));
                self.hold(hold);
                c.kill_agent(l, Signal::Cont)?;
            }
            Fault::PartitionMinority => {
                let l = self.leader()?;
                let followers: Vec<usize> =
                    c.managers.iter().copied().filter(|&m| m != l).collect();
                let f1 = *followers.choose(&mut self.rng).context("no follower")?;
                let rest: Vec<usize> = (1..=c.tb.hosts().len()).filter(|&i| i != f1).collect();
                c.tb.partition(&[&[f1], &rest])?;
                rec.detail = format!("{} cut off from the rest", self.name(f1));
                self.hold(hold);
                c.tb.heal()?;
            }
            Fault::PartitionMajority => {
                let l = self.leader()?;
                let w = *c.workers.choose(&mut self.rng).context("no workers")?;
                let minority = [l, w];
                let rest: Vec<usize> = (1..=c.tb.hosts().len())
                    .filter(|i| !minority.contains(i))
                    .collect();
                c.tb.partition(&[&minority, &rest])?;
                rec.detail = format!(
                    "leader {} and {} cut off from the majority",
                    self.name(l),
                    self.name(w)
                );
                self.hold(hold);
                c.tb.heal()?;
            }
            Fault::IsolateLeader => {
                let l = self.leader()?;
                let rest: Vec<usize> = (1..=c.tb.hosts().len()).filter(|&i| i != l).collect();
                c.tb.partition(&[&[l], &rest])?;
                rec.detail = format!("leader {} cut off from everyone", self.name(l));
                self.hold(hold);
                c.tb.heal()?;
            }
            Fault::OneWayToLeader => {
                let l = self.leader()?;
                for i in (1..=c.tb.hosts().len()).filter(|&i| i != l) {
                    c.tb.partition_one_way(i, l)?;
                }
                rec.detail = format!(
                    "leader {} hears no one (its own packets still go out)",
                    self.name(l)
                );
                self.hold(hold);
                c.tb.heal()?;
            }
            Fault::RestartAllManagers => {
                for &m in &c.managers {
                    c.kill_agent(m, Signal::Kill)?;
                }
                rec.detail = "every manager's agent killed at once, then restarted".into();
                self.hold(hold.min(Duration::from_secs(3)));
                for &m in &c.managers {
                    c.ensure_agent(m)?;
                }
            }
            Fault::AgentRestart => {
                let w = *c.workers.choose(&mut self.rng).context("no workers")?;
                c.kill_agent(w, Signal::Kill)?;
                rec.detail = format!(
                    "agent of {} killed, its containers left running, agent restarted",
                    self.name(w)
                );
                self.hold(Duration::from_secs(2));
                c.ensure_agent(w)?;
            }
            Fault::DiskFull => {
                let r = self.disk_full(hold, rec);
                self.disk.push(r);
            }
        }
        Ok(())
    }

    /// Makes host `d` the leader by stopping the leader until another is elected (at most
    /// [`LEAD_ATTEMPTS`] times); returns whether `d` leads.
    fn make_leader(&self, d: usize) -> bool {
        for _ in 0..LEAD_ATTEMPTS {
            let Ok(l) = self.leader() else { return false };
            if l == d {
                return true;
            }
            if self.cluster.kill_agent(l, Signal::Stop).is_err() {
                return false;
            }
            let start = Instant::now();
            while start.elapsed() < SUCCESSOR_WAIT {
                match self
                    .rt
                    .block_on(self.cluster.health())
                    .and_then(|h| h.leader)
                {
                    Some(n) if n != l => break,
                    _ => std::thread::sleep(Duration::from_millis(300)),
                }
            }
            let _ = self.cluster.kill_agent(l, Signal::Cont);
            std::thread::sleep(Duration::from_secs(1));
        }
        self.leader().ok() == Some(d)
    }

    /// Fills the tmpfs of one manager's data dir (as the leader on odd runs, a follower on
    /// even ones), makes the cluster's state grow while it is full, writes through it, frees
    /// the space and checks that it applies and takes writes again.
    fn disk_full(&mut self, hold: Duration, rec: &mut FaultRecord) -> DiskFullReport {
        let c = self.cluster;
        let d = c.disk_host;
        let mut r = DiskFullReport {
            host: self.name(d),
            ..Default::default()
        };
        let want_leader = self.disk.len().is_multiple_of(2);
        if want_leader && !self.make_leader(d) {
            rec.notes
                .push(format!("could not make {} the leader", r.host));
        }
        let leader = self.rt.block_on(c.leader(LEADER_WAIT));
        r.role = match leader {
            Some(l) if l == d => "leader".into(),
            Some(_) => "follower".into(),
            None => "unknown (no leader)".into(),
        };
        let log_before = c
            .host(d)
            .ok()
            .and_then(|h| std::fs::metadata(h.agent_log()).ok())
            .map(|m| m.len())
            .unwrap_or(0);
        match fill(&self.filler()) {
            Ok(n) => r.filled_bytes = n,
            Err(e) => r.problems.push(format!("filling the disk: {e:#}")),
        }
        rec.detail = format!(
            "data dir of {} ({}) filled ({} MiB)",
            r.host,
            r.role,
            r.filled_bytes >> 20
        );
        // The state grows while the disk is full: big specs through another manager, then
        // one through the full one.
        let other = c.managers.iter().copied().find(|&m| m != d).unwrap_or(1);
        let end = Instant::now() + hold.max(DISK_HOLD_MIN);
        for _ in 0..PRESSURE_WRITES {
            if Instant::now() >= end || self.interrupted.load(Ordering::Relaxed) {
                break;
            }
            let o = self.probe_write(other, PRESSURE_LABELS);
            r.writes_while_full.push((self.name(other), o));
        }
        let o = self.probe_write(d, 0);
        r.writes_while_full.push((self.name(d), o));
        self.hold(end.saturating_duration_since(Instant::now()));
        r.agent_survived = c.host(d).ok().and_then(|h| h.agent_pid()).is_some();
        if let Ok(h) = c.host(d) {
            if let Ok(text) = std::fs::read(h.agent_log()) {
                let text = String::from_utf8_lossy(&text[(log_before as usize).min(text.len())..])
                    .into_owned();
                r.log_lines = text
                    .lines()
                    .filter(|l| {
                        let l = l.to_ascii_lowercase();
                        l.contains("space")
                            || l.contains("enospc")
                            || l.contains("panick")
                            || l.contains("storage")
                            || l.contains("fatal")
                            || l.contains("os error 28")
                            || l.contains("raft stopped")
                            || l.contains("afresh")
                            || l.contains("manager restarted")
                    })
                    .take(MAX_LOG_LINES)
                    .map(|l| l.chars().take(400).collect())
                    .collect();
            }
        }
        // Through the full manager a write succeeds or is refused naming the cause; through
        // the others it succeeds or is refused — never left without an answer.
        for (h, o) in &r.writes_while_full {
            let l = o.to_ascii_lowercase();
            let clear = l.contains("space") || l.contains("disk") || l.contains("full");
            if *h == r.host && o != "ok" && !clear {
                r.problems.push(format!(
                    "a write through {h} while its disk was full got an answer that does not say why: {o}"
                ));
            } else if o.starts_with("Unknown: no answer") {
                r.problems.push(format!(
                    "a write through {h} while {}'s disk was full got no answer: {o}",
                    r.host
                ));
            }
        }
        // Free the space (and restart the agent if the full disk ended it).
        let _ = std::fs::remove_file(self.filler());
        if !r.agent_survived {
            r.problems.push(format!(
                "the agent of {} exited while its disk was full",
                r.host
            ));
            if let Err(e) = c.ensure_agent(d) {
                r.problems.push(format!("{e:#}"));
            }
        }
        let start = Instant::now();
        loop {
            let o = self.probe_write(d, 0);
            let applied = o == "ok" && self.applies_locally(d, other);
            if applied {
                r.recovered_after_s = Some(start.elapsed().as_secs_f64());
                r.write_after_free = Some(o);
                break;
            }
            if start.elapsed() > DISK_RECOVERY_TIMEOUT || self.interrupted.load(Ordering::Relaxed) {
                r.problems.push(format!(
                    "{} s after space returned, {} still does not take and apply writes (last write through it: {o})",
                    DISK_RECOVERY_TIMEOUT.as_secs(),
                    r.host,
                ));
                r.write_after_free = Some(o);
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        rec.notes.extend(r.problems.iter().cloned());
        r
    }

    /// Whether host `d`'s own store applies a write made through host `via`: watches `d`'s
    /// store (events as applied there), writes, and waits for the event.
    fn applies_locally(&mut self, d: usize, via: usize) -> bool {
        let Ok(sock) = self.cluster.host(d).map(|h| h.socket()) else {
            return false;
        };
        let stream = self.rt.block_on(async {
            let mut c = control(&sock).await.ok()?;
            let req = pb::WatchRequest {
                kinds: vec![pb::WatchKind::Service as i32],
            };
            tokio::time::timeout(CALL_TIMEOUT, c.watch(req))
                .await
                .ok()?
                .ok()
                .map(|r| r.into_inner())
        });
        let Some(mut stream) = stream else {
            return false;
        };
        let (o, name) = self.probe_write_named(via, 0);
        if o != "ok" {
            return false;
        }
        self.rt.block_on(async {
            let wait = async {
                while let Ok(Some(ev)) = stream.message().await {
                    if let Some(pb::watch_event::Object::Service(s)) = ev.object {
                        if s.spec.map(|sp| sp.name) == Some(name.clone()) {
                            return true;
                        }
                    }
                }
                false
            };
            tokio::time::timeout(APPLY_WAIT, wait)
                .await
                .unwrap_or(false)
        })
    }

    fn probe_write(&mut self, via: usize, label_bytes: usize) -> String {
        self.probe_write_named(via, label_bytes).0
    }

    /// Creates a service through host `via`'s socket (with `label_bytes` of labels besides
    /// its token), recorded like the workload's calls; returns "ok" or the outcome, and the
    /// service's name.
    fn probe_write_named(&mut self, via: usize, label_bytes: usize) -> (String, String) {
        let Ok(h) = self.cluster.host(via) else {
            return ("no such host".into(), String::new());
        };
        let name = format!(
            "chaos-{}-disk-{}",
            self.shared.run_id,
            self.rng.gen::<u32>()
        );
        let token = self.rng.gen_range(1u64 << 40..1u64 << 50);
        let v = SpecValue { token, replicas: 0 };
        self.shared
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        let mut labels: std::collections::HashMap<String, String> =
            [(TOKEN_LABEL.to_string(), token.to_string())].into();
        for i in 0..label_bytes.div_ceil(LABEL_VALUE_BYTES) {
            labels.insert(format!("chaos.ballast.{i}"), "x".repeat(LABEL_VALUE_BYTES));
        }
        let spec = pb::ServiceSpec {
            name: name.clone(),
            labels,
            task: Some(pb::TaskSpec {
                container: Some(pb::ContainerSpec {
                    image: crate::cluster::IMAGE.into(),
                    command: vec!["sleep".into(), "3600".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(pb::service_spec::Mode::Replicated(pb::ReplicatedService {
                replicas: 0,
            })),
            ..Default::default()
        };
        let sock = h.socket();
        let start_us = self.shared.now_us();
        let res = self.rt.block_on(async {
            let mut cl = control(&sock)
                .await
                .map_err(|e| format!("not sent: {e:#}"))?;
            match tokio::time::timeout(
                OP_TIMEOUT,
                cl.create_service(pb::CreateServiceRequest {
                    spec: Some(spec),
                    ..Default::default()
                }),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(st)) => Err(format!("{:?}: {}", st.code(), st.message())),
                Err(_) => Err(format!("Unknown: no answer in {} s", OP_TIMEOUT.as_secs())),
            }
        });
        let outcome = match &res {
            Ok(()) => Outcome::Ok,
            Err(m) if m.starts_with("not sent") => Outcome::Refused(m.clone()),
            Err(m) if m.starts_with("AlreadyExists") => Outcome::Exists,
            Err(m) if m.starts_with("InvalidArgument") || m.starts_with("FailedPrecondition") => {
                Outcome::Refused(m.clone())
            }
            Err(m) => Outcome::Unknown(m.clone()),
        };
        let call = Call {
            id: u64::MAX - self.rng.gen_range(0..1u64 << 32),
            client: usize::MAX - 1,
            service: name.clone(),
            kind: Kind::Create,
            via: h.name().to_string(),
            start_us,
            end_us: self.shared.now_us(),
            value: Some(v),
            old: None,
            outcome,
        };
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
        let o = match res {
            Ok(()) => "ok".into(),
            Err(m) => m,
        };
        (o, name)
    }
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &std::path::Path) -> Result<u64> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0u8; FILL_CHUNK];
    let mut n = 0u64;
    while n < MAX_FILL {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => bail!("writing {}: {e}", path.display()),
        }
    }
    // The last partial blocks.
    let small = [0u8; 512];
    while let Ok(k) = f.write(&small) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok(n)
}
