//! Fault injectors over the test bed. Each fault is injected, held for a bounded time and
//! healed (healing is attempted whatever happened), then the cluster is given
//! [`RECOVERY_TIMEOUT`] to be well again (a leader, every manager reachable, every node Ready)
//! and must stay well for [`STABLE_FOR`]: a fault whose cluster falls ill again in that window
//! (or at the check before the next fault) has not recovered. Some faults carry a second one
//! (an overlap, [`CARRIERS`] and [`SECONDARY`]) injected during their hold.

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
use shoal_tests::cluster::Member;
use shoal_tests::disk::fill;
use shoal_tests::testbed::{pid_stopped, Signal};

use crate::cluster::{control, Cluster, CALL_TIMEOUT};
use crate::observe::FaultTag;
use crate::workload::{Shared, OP_TIMEOUT, TOKEN_LABEL};

/// How long the cluster may take to be well again after a fault is healed.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Once well, the cluster must stay well this long (health polled every [`STABLE_POLL`]) for
/// the fault to count as recovered.
pub const STABLE_FOR: Duration = Duration::from_secs(3);
const STABLE_POLL: Duration = Duration::from_millis(250);
/// Times a recovered cluster may fall ill again (and be awaited again) within one recovery.
const MAX_RELAPSES: u32 = 5;
/// A disk fault on the leader must see another manager elected this soon (two leases of
/// silence before its beacons stop, an election, and slack for a loaded machine; the daemon's
/// own bound for a silent Raft core is 10 s).
pub const NEW_LEADER_BOUND: Duration = Duration::from_secs(8);
/// While a new leader is awaited, each manager's `ListNodes` is bounded by this (a follower
/// that still takes the failed leader for its leader forwards the call to it).
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// When a carrier fault (see [`CARRIERS`]) carries a second one in a long run: one in this many.
const OVERLAP_ONE_IN: u32 = 3;
/// The second fault of an overlap starts this long into the first one's hold (at most), and
/// is held this long (at least / at most).
const OVERLAP_DELAY_MAX: Duration = Duration::from_secs(3);
const OVERLAP_HOLD: (u64, u64) = (3, 6);
/// A rolling update of the mesh service: one task at a time, this far apart.
const ROLLING_DELAY: &str = "1s";
/// How long a rolling update may take to complete once its fault is healed.
const ROLLING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a known leader is waited for before a fault that needs one.
const LEADER_WAIT: Duration = Duration::from_secs(20);
/// Name of the filler file in the disk-full manager's data dir.
const FILLER: &str = "chaos-filler";
/// How long writes through the disk-full manager are retried once space is back.
const DISK_RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// Attempts at moving leadership to the disk-fault manager (stopping the leader each time),
/// besides one per manager: the more managers, the less often the one wanted wins.
const LEAD_ATTEMPTS: usize = 1;
/// How long a stopped leader's successor is waited for.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(8);
/// Big writes made while the disk is full, and the label bytes each carries.
const PRESSURE_WRITES: usize = 16;
const PRESSURE_LABELS: usize = 48 * 1024;
// Each pressure write must be a write the control API takes (its labels bound, keys included).
const _: () = assert!(
    PRESSURE_LABELS + PRESSURE_LABELS / 8 < shoal_manager::controlapi::validate::MAX_LABELS_BYTES
);
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
    DiskFullExt4,
    DiskStuck,
    RollingUpdate,
}

pub const ALL: [Fault; 14] = [
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
    Fault::DiskFullExt4,
    Fault::DiskStuck,
    Fault::RollingUpdate,
];

/// Faults that can carry a second one during their hold (none of them a partition: healing a
/// partition removes every rule).
pub const CARRIERS: [Fault; 4] = [
    Fault::DiskFull,
    Fault::DiskFullExt4,
    Fault::DiskStuck,
    Fault::RollingUpdate,
];

/// Faults that can be the second one of an overlap.
pub const SECONDARY: [Fault; 5] = [
    Fault::KillLeader,
    Fault::KillManager,
    Fault::PauseLeader,
    Fault::PartitionMinority,
    Fault::IsolateLeader,
];

/// Which data dir a disk fault hits, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKind {
    /// The tmpfs manager's data dir filled.
    TmpfsFull,
    /// The ext4 manager's data dir filled.
    Ext4Full,
    /// The ext4 manager's file system frozen: every write and fsync blocks.
    Ext4Stuck,
}

impl DiskKind {
    pub fn label(self) -> &'static str {
        match self {
            DiskKind::TmpfsFull => "tmpfs full",
            DiskKind::Ext4Full => "ext4 full",
            DiskKind::Ext4Stuck => "ext4 stuck",
        }
    }
}

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
            Fault::DiskFullExt4 => "disk-full-ext4-manager",
            Fault::DiskStuck => "disk-stuck-manager",
            Fault::RollingUpdate => "rolling-update",
        }
    }

    /// The fault named `n`.
    pub fn by_name(n: &str) -> Option<Fault> {
        ALL.iter().copied().find(|f| f.name() == n)
    }

    /// Whether it is a disk fault (judged by the disk check).
    pub fn is_disk(self) -> bool {
        matches!(
            self,
            Fault::DiskFull | Fault::DiskFullExt4 | Fault::DiskStuck
        )
    }
}

/// A fault as a run schedules it: one, or one carrying a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub fault: Fault,
    pub overlap: Option<Fault>,
}

impl Planned {
    pub fn one(fault: Fault) -> Planned {
        Planned {
            fault,
            overlap: None,
        }
    }

    /// `a` or `a+b` (b carried by a: a must be one of [`CARRIERS`], b of [`SECONDARY`]).
    pub fn parse(s: &str) -> Result<Planned, String> {
        let names = || ALL.map(|f| f.name()).join(", ");
        let (a, b) = match s.split_once('+') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let fault = Fault::by_name(a)
            .ok_or_else(|| format!("unknown fault '{a}' (one of: {})", names()))?;
        let overlap = match b {
            None => None,
            Some(b) => {
                let g = Fault::by_name(b)
                    .ok_or_else(|| format!("unknown fault '{b}' (one of: {})", names()))?;
                if !CARRIERS.contains(&fault) || !SECONDARY.contains(&g) {
                    return Err(format!(
                        "'{s}': only {} can carry a second fault, and only {} can be one",
                        CARRIERS.map(|f| f.name()).join(", "),
                        SECONDARY.map(|f| f.name()).join(", ")
                    ));
                }
                Some(g)
            }
        };
        Ok(Planned { fault, overlap })
    }

    /// `a` or `a+b`.
    pub fn name(&self) -> String {
        match self.overlap {
            Some(g) => format!("{}+{}", self.fault.name(), g.name()),
            None => self.fault.name().to_string(),
        }
    }
}

/// What one fault did.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub fault: Fault,
    /// The second fault it carried, if any.
    pub overlap: Option<Fault>,
    /// `fault` or `fault+overlap`: the kind its recovery is counted under.
    pub name: String,
    pub detail: String,
    pub start_ms: u64,
    pub healed_ms: u64,
    /// Seconds from healing until the cluster was first seen well (a leader, every manager
    /// reachable, every node Ready, every restarted agent in session).
    pub first_well_s: Option<f64>,
    /// Seconds from healing until the cluster was well and stayed well for [`STABLE_FOR`]:
    /// the fault's recovery. `None`: not recovered.
    pub recovery_s: Option<f64>,
    /// Times the cluster fell ill again after it was first seen well.
    pub relapses: u32,
    /// Injection, healing or recovery that failed.
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

/// What a disk fault found.
#[derive(Debug, Clone, Serialize)]
pub struct DiskFullReport {
    pub kind: DiskKind,
    pub host: String,
    pub role: String,
    pub filled_bytes: u64,
    /// When the disk failed under the leader: seconds from the fault until another manager
    /// was seen leading.
    pub new_leader_after_s: Option<f64>,
    /// Seconds from the fault until the manager first logged a storage failure (a full file
    /// system may still leave the store room for a while); `None` when it logged none.
    pub failed_after_s: Option<f64>,
    /// Writes made while the disk was full: (through which host, outcome).
    pub writes_while_full: Vec<(String, String)>,
    pub agent_survived: bool,
    pub log_lines: Vec<String>,
    pub write_after_free: Option<String>,
    pub recovered_after_s: Option<f64>,
    pub problems: Vec<String>,
}

/// Seconds from `since` to the time stamp that opens the first of `lines` (agent log lines,
/// `2026-12-07T21:33:25.591110Z  WARN …`); 0 for a line from before `since`.
fn first_logged_after(lines: &[String], since: std::time::SystemTime) -> Option<f64> {
    let ns = lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .and_then(shoal_runtime::image::timefmt::parse_rfc3339_nanos)?;
    let at = std::time::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).ok()?);
    Some(at.duration_since(since).unwrap_or_default().as_secs_f64())
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
    /// The second fault of the fault in progress, its delay into the hold and its own hold
    /// (taken by [`Injector::hold_overlapped`]).
    pub overlap: Option<(Fault, Duration, Duration)>,
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

    /// Undoes every fault: a frozen disk, partitions, stopped agents, dead agents, the
    /// filler files.
    pub fn heal_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        // First: an agent blocked on a frozen disk can neither stop nor be killed.
        if let Some(fs) = &self.cluster.ext4 {
            if let Err(e) = fs.thaw() {
                errors.push(format!("thawing the ext4 data dir: {e}"));
            }
        }
        if let Err(e) = self.cluster.tb.heal() {
            errors.push(format!("heal: {e}"));
        }
        for k in [DiskKind::TmpfsFull, DiskKind::Ext4Full] {
            let _ = std::fs::remove_file(self.filler(k));
        }
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

    /// The manager a disk fault of `kind` hits.
    fn disk_host(&self, kind: DiskKind) -> usize {
        match kind {
            DiskKind::TmpfsFull => self.cluster.disk_host,
            DiskKind::Ext4Full | DiskKind::Ext4Stuck => self.cluster.ext4_host,
        }
    }

    fn filler(&self, kind: DiskKind) -> PathBuf {
        self.cluster
            .host(self.disk_host(kind))
            .map(|h| h.data_dir().join(FILLER))
            .unwrap_or_else(|_| PathBuf::from("/nonexistent"))
    }

    /// Whether the cluster is unwell now, and how (for the check before the next fault: a
    /// fault whose cluster falls ill again has not recovered).
    pub fn unwell_now(&self) -> Option<String> {
        match self.rt.block_on(self.cluster.health()) {
            None => Some("no manager answers".into()),
            Some(h) if !self.cluster.all_well(&h) => Some(format!(
                "leader {:?}, {} of {} managers reachable, {} of {} nodes Ready: {}",
                h.leader.map(|l| self.name(l)),
                h.reachable_managers,
                self.cluster.managers.len(),
                h.ready,
                self.cluster.tb.hosts().len(),
                h.unwell.join(", ")
            )),
            Some(_) => None,
        }
    }

    /// Picks what to inject next in a long run: `f`, carrying a second fault one time in
    /// [`OVERLAP_ONE_IN`] when it can.
    pub fn plan(&mut self, f: Fault) -> Planned {
        let overlap = (CARRIERS.contains(&f) && self.rng.gen_ratio(1, OVERLAP_ONE_IN)).then(|| {
            *SECONDARY
                .choose(&mut self.rng)
                .unwrap_or(&Fault::KillLeader)
        });
        Planned { fault: f, overlap }
    }

    /// Injects `p`, holds it for `hold`, heals, and waits for a lasting recovery.
    pub fn run(&mut self, p: Planned, hold: Duration) -> FaultRecord {
        let f = p.fault;
        let start_ms = self.shared.now_us() / 1000;
        {
            let mut t = self.tag.lock().unwrap_or_else(|e| e.into_inner());
            t.current = Some(p.name());
        }
        (self.log)(&format!(
            "fault {}: injecting (hold {} s)",
            p.name(),
            hold.as_secs()
        ));
        let mut rec = FaultRecord {
            fault: f,
            overlap: p.overlap,
            name: p.name(),
            detail: String::new(),
            start_ms,
            healed_ms: 0,
            first_well_s: None,
            recovery_s: None,
            relapses: 0,
            errors: Vec::new(),
            notes: Vec::new(),
        };
        let marks = self.cluster.agent_marks();
        self.overlap = p.overlap.map(|g| {
            let delay =
                Duration::from_millis(self.rng.gen_range(0..=OVERLAP_DELAY_MAX.as_millis() as u64));
            let sub = Duration::from_secs(self.rng.gen_range(OVERLAP_HOLD.0..=OVERLAP_HOLD.1));
            (g, delay, sub)
        });
        if let Err(e) = self.inject(f, hold, &mut rec) {
            rec.errors.push(format!("{e:#}"));
        }
        // A carrier whose hold never came (it failed first) still runs its second fault.
        if self.overlap.is_some() {
            self.hold_overlapped(Duration::ZERO, &mut rec);
        }
        rec.errors.extend(self.heal_all());
        rec.healed_ms = self.shared.now_us() / 1000;
        {
            let mut t = self.tag.lock().unwrap_or_else(|e| e.into_inner());
            t.current = None;
            t.healed = Some((p.name(), rec.healed_ms));
        }
        let healed = Instant::now();
        if f == Fault::RollingUpdate {
            if let Err(e) = self.wait_rolled(healed + ROLLING_TIMEOUT) {
                rec.errors.push(format!("{e:#}"));
            }
        }
        self.await_recovery(healed, &marks, &mut rec);
        (self.log)(&format!(
            "fault {}: {} healed, well after {}, recovered (well for {} s) in {}{}",
            p.name(),
            rec.detail,
            rec.first_well_s
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "—".into()),
            STABLE_FOR.as_secs(),
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

    /// Waits until the cluster is well (and every agent restarted since `marks` is in session
    /// again), then until it has stayed well for [`STABLE_FOR`]; a relapse starts the wait
    /// again (at most [`MAX_RELAPSES`] times), all within [`RECOVERY_TIMEOUT`] of `healed`.
    fn await_recovery(
        &mut self,
        healed: Instant,
        marks: &[(Option<u32>, u64)],
        rec: &mut FaultRecord,
    ) {
        let deadline = healed + RECOVERY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let well = self.rt.block_on(async {
                let (_, h) = self.cluster.wait_well(left).await?;
                let left = deadline.saturating_duration_since(Instant::now());
                let missing = self.cluster.wait_sessions(marks, left).await;
                if !missing.is_empty() {
                    bail!(
                        "restarted agents without a dispatcher session {} s after the heal: {}",
                        RECOVERY_TIMEOUT.as_secs(),
                        missing.join(", ")
                    );
                }
                Ok(h)
            });
            let h = match well {
                Ok(h) => h,
                Err(e) => {
                    rec.errors.push(format!("{e:#}"));
                    // One more chance: an agent may have died while we waited.
                    rec.errors.extend(self.heal_all());
                    return;
                }
            };
            let well_at = healed.elapsed().as_secs_f64();
            rec.first_well_s.get_or_insert(well_at);
            // Stays well? Every health sample in the window must say so.
            let since = Instant::now();
            let mut relapse = None;
            while since.elapsed() < STABLE_FOR && !self.interrupted.load(Ordering::Relaxed) {
                std::thread::sleep(STABLE_POLL);
                if let Some(why) = self.unwell_now() {
                    relapse = Some(why);
                    break;
                }
            }
            match relapse {
                None => {
                    rec.recovery_s = Some(well_at);
                    rec.notes.push(format!(
                        "well as seen through {}, every restarted agent in session, and still well {} s later",
                        h.via,
                        STABLE_FOR.as_secs()
                    ));
                    return;
                }
                Some(why) => {
                    rec.relapses += 1;
                    rec.notes.push(format!(
                        "well {well_at:.1} s after the heal, then unwell again: {why}"
                    ));
                    if rec.relapses > MAX_RELAPSES || Instant::now() >= deadline {
                        rec.errors.push(format!(
                            "never stayed well for {} s within {} s of the heal ({} relapses; last: {why})",
                            STABLE_FOR.as_secs(),
                            RECOVERY_TIMEOUT.as_secs(),
                            rec.relapses
                        ));
                        return;
                    }
                }
            }
        }
    }

    /// Holds a fault for `d`; when a second fault is pending ([`Injector::overlap`]), injects
    /// it into the hold (after its delay), holds it, heals it, and holds the rest.
    fn hold_overlapped(&mut self, d: Duration, rec: &mut FaultRecord) {
        let Some((g, delay, sub)) = self.overlap.take() else {
            self.hold(d);
            return;
        };
        let end = Instant::now() + d;
        self.hold(delay.min(d));
        match self.inject_secondary(g, sub) {
            Ok(detail) => rec.detail.push_str(&format!(" + {} ({detail})", g.name())),
            Err(e) => rec.errors.push(format!("second fault {}: {e:#}", g.name())),
        }
        self.hold(end.saturating_duration_since(Instant::now()));
    }

    /// Injects `g` (one of [`SECONDARY`]), holds it for `hold` and heals it; returns what it
    /// did.
    fn inject_secondary(&mut self, g: Fault, hold: Duration) -> Result<String> {
        let c = self.cluster;
        (self.log)(&format!(
            "  second fault {}: injecting (hold {} s)",
            g.name(),
            hold.as_secs()
        ));
        let detail = match g {
            Fault::KillLeader | Fault::KillManager => {
                let m = if g == Fault::KillLeader {
                    self.leader()?
                } else {
                    *c.managers.choose(&mut self.rng).context("no managers")?
                };
                c.kill_agent(m, Signal::Kill)?;
                self.hold(hold);
                c.ensure_agent(m)?;
                format!("agent of {} killed", self.name(m))
            }
            Fault::PauseLeader => {
                let l = self.leader()?;
                c.kill_agent(l, Signal::Stop)?;
                self.hold(hold);
                c.kill_agent(l, Signal::Cont)?;
                format!("agent of {} (leader) stopped", self.name(l))
            }
            Fault::PartitionMinority | Fault::IsolateLeader => {
                let l = self.leader()?;
                let cut = if g == Fault::IsolateLeader {
                    l
                } else {
                    let followers: Vec<usize> =
                        c.managers.iter().copied().filter(|&m| m != l).collect();
                    *followers.choose(&mut self.rng).context("no follower")?
                };
                let rest: Vec<usize> = (1..=c.tb.hosts().len()).filter(|&i| i != cut).collect();
                c.tb.partition(&[&[cut], &rest])?;
                self.hold(hold);
                c.tb.heal()?;
                format!(
                    "{}{} cut off from the rest",
                    if cut == l { "leader " } else { "" },
                    self.name(cut)
                )
            }
            other => bail!("{} cannot be a second fault", other.name()),
        };
        Ok(detail)
    }

    /// Starts a rolling update of the mesh service (a new environment variable: every task
    /// replaced, one at a time).
    fn start_rolling(&mut self) -> Result<String> {
        let gen = self.rng.gen::<u32>();
        let l = self.leader()?;
        let h = self.cluster.host(l)?;
        let env = format!("CHAOS_GEN={gen}");
        h.shoal_ok(&[
            "service",
            "update",
            "--detach",
            "--env-add",
            &env,
            "--update-parallelism",
            "1",
            "--update-delay",
            ROLLING_DELAY,
            crate::mesh::SERVICE,
        ])
        .context("starting a rolling update of the mesh service")?;
        Ok(env)
    }

    /// Waits until the mesh service's update has completed and its replicas run.
    fn wait_rolled(&self, deadline: Instant) -> Result<()> {
        let mut last = String::new();
        while Instant::now() < deadline && !self.interrupted.load(Ordering::Relaxed) {
            for &m in &self.cluster.managers {
                let Ok(h) = self.cluster.host(m) else {
                    continue;
                };
                let Ok(out) = h.shoal_ok(&["service", "inspect", crate::mesh::SERVICE]) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                let state = v[0]["UpdateStatus"]["State"].as_str().unwrap_or("none");
                last = format!("update {state}: {}", v[0]["UpdateStatus"]["Message"]);
                if state.eq_ignore_ascii_case("completed") {
                    let ls = h
                        .shoal_ok(&["service", "ls", "--format", "json"])
                        .unwrap_or_default();
                    let v: serde_json::Value = serde_json::from_str(&ls).unwrap_or_default();
                    let mesh = v.as_array().and_then(|a| {
                        a.iter()
                            .find(|s| s["Spec"]["Name"] == crate::mesh::SERVICE)
                            .cloned()
                    });
                    let st = mesh.map(|s| s["ServiceStatus"].clone()).unwrap_or_default();
                    if st["RunningTasks"].as_u64().is_some()
                        && st["RunningTasks"] == st["DesiredTasks"]
                    {
                        return Ok(());
                    }
                    last = format!("update completed, tasks {st}");
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "the rolling update of {} did not complete within {} s of the heal ({last})",
            crate::mesh::SERVICE,
            ROLLING_TIMEOUT.as_secs()
        )
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
            Fault::DiskFull | Fault::DiskFullExt4 | Fault::DiskStuck => {
                let kind = match f {
                    Fault::DiskFull => DiskKind::TmpfsFull,
                    Fault::DiskFullExt4 => DiskKind::Ext4Full,
                    _ => DiskKind::Ext4Stuck,
                };
                if kind != DiskKind::TmpfsFull && c.ext4.is_none() {
                    rec.detail = format!(
                        "skipped: no ext4 data dir here ({})",
                        c.ext4_missing.as_deref().unwrap_or("unknown")
                    );
                    rec.notes.push(rec.detail.clone());
                    return Ok(());
                }
                let r = self.disk_fault(kind, hold, rec);
                self.disk.push(r);
            }
            Fault::RollingUpdate => {
                let env = self.start_rolling()?;
                rec.detail = format!(
                    "{} updated ({env}), one task at a time, {ROLLING_DELAY} apart",
                    crate::mesh::SERVICE
                );
                self.hold_overlapped(hold, rec);
            }
        }
        Ok(())
    }

    /// Makes host `d` the leader by stopping the leader until another is elected (at most
    /// [`LEAD_ATTEMPTS`] + one per manager times); returns whether `d` leads.
    fn make_leader(&self, d: usize) -> bool {
        for _ in 0..LEAD_ATTEMPTS + self.cluster.managers.len() {
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
                    .block_on(self.cluster.health_without(Some(l)))
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

    /// A disk fault on one manager's data dir (`kind`): filled to ENOSPC (the tmpfs or the
    /// ext4 one) or frozen (ext4: every write and fsync blocks), as the leader on every other
    /// fault of the run, a follower otherwise. The cluster's state grows meanwhile (big writes
    /// through another manager). When the disk failed under the leader, another manager must
    /// be seen leading within [`NEW_LEADER_BOUND`]. Then the disk works again, and the manager
    /// must take writes and apply them in its own store.
    fn disk_fault(
        &mut self,
        kind: DiskKind,
        hold: Duration,
        rec: &mut FaultRecord,
    ) -> DiskFullReport {
        let c = self.cluster;
        let d = self.disk_host(kind);
        let mut r = DiskFullReport {
            kind,
            host: self.name(d),
            role: String::new(),
            filled_bytes: 0,
            new_leader_after_s: None,
            failed_after_s: None,
            writes_while_full: Vec::new(),
            agent_survived: false,
            log_lines: Vec::new(),
            write_after_free: None,
            recovered_after_s: None,
            problems: Vec::new(),
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
        // Who leads while the disk has failed, as the other managers see it.
        let others: Vec<(String, PathBuf)> = c
            .sockets(&c.managers)
            .into_iter()
            .filter(|(n, _)| *n != r.host)
            .collect();
        let t0 = Instant::now();
        let t0_wall = std::time::SystemTime::now();
        let watcher = (r.role == "leader")
            .then(|| self.rt.spawn(watch_new_leader(others, r.host.clone(), t0)));
        match kind {
            DiskKind::TmpfsFull | DiskKind::Ext4Full => match fill(&self.filler(kind)) {
                Ok(n) => r.filled_bytes = n,
                Err(e) => r.problems.push(format!("filling the disk: {e}")),
            },
            DiskKind::Ext4Stuck => {
                if let Some(Err(e)) = c.ext4.as_ref().map(|fs| fs.freeze()) {
                    r.problems.push(format!("freezing the disk: {e}"));
                }
            }
        }
        rec.detail = if kind == DiskKind::Ext4Stuck {
            format!("data dir of {} ({}) on ext4 frozen", r.host, r.role)
        } else {
            format!(
                "data dir of {} ({}) on {} filled ({} MiB)",
                r.host,
                r.role,
                if kind == DiskKind::TmpfsFull {
                    "tmpfs"
                } else {
                    "ext4"
                },
                r.filled_bytes >> 20
            )
        };
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
        self.hold_overlapped(end.saturating_duration_since(Instant::now()), rec);
        let watched = watcher.map(|w| {
            w.abort();
            r.new_leader_after_s = self.rt.block_on(w).ok().flatten().map(|d| d.as_secs_f64());
            t0.elapsed()
        });
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
                            || l.contains("has not answered")
                            || l.contains("afresh")
                            || l.contains("manager restarted")
                    })
                    .take(MAX_LOG_LINES)
                    .map(|l| l.chars().take(400).collect())
                    .collect();
            }
        }
        // A leader whose disk failed must be replaced within the bound. A full file system
        // may still leave the store room (sled writes into segments its files already hold):
        // a leader that took every write and logged no storage error had not failed, and one
        // that failed later is timed from its first logged failure. A frozen disk fails at once.
        r.failed_after_s = first_logged_after(&r.log_lines, t0_wall);
        if let Some(held) = watched {
            let kept_appending = kind != DiskKind::Ext4Stuck
                && r.log_lines.is_empty()
                && r.writes_while_full.iter().all(|(_, o)| o == "ok");
            let failed_at = match kind {
                DiskKind::Ext4Stuck => 0.0,
                _ => r.failed_after_s.unwrap_or(0.0),
            };
            match r.new_leader_after_s {
                Some(s) if s - failed_at <= NEW_LEADER_BOUND.as_secs_f64() => {}
                Some(s) => r.problems.push(format!(
                    "another manager led only {:.1} s after the leader's disk failed (bound {} s; fault at 0 s, first storage failure logged at {failed_at:.1} s)",
                    s - failed_at,
                    NEW_LEADER_BOUND.as_secs()
                )),
                None if kept_appending => rec.notes.push(format!(
                    "{} stayed leader: its store still had room (every write committed, no storage error logged)",
                    r.host
                )),
                None => r.problems.push(format!(
                    "no other manager led while the leader's disk had failed ({:.0} s)",
                    held.as_secs_f64()
                )),
            }
        }
        // Through the full manager a write succeeds or is refused naming the cause; through
        // the others it succeeds or is refused — never left without an answer. A stuck disk
        // names no cause and may hold the one write in flight to it: not judged.
        for (h, o) in &r.writes_while_full {
            if kind == DiskKind::Ext4Stuck {
                break;
            }
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
        // The disk works again (and the agent is restarted if the fault ended it).
        match kind {
            DiskKind::Ext4Stuck => {
                if let Some(Err(e)) = c.ext4.as_ref().map(|fs| fs.thaw()) {
                    r.problems.push(format!("thawing the disk: {e}"));
                }
            }
            _ => {
                let _ = std::fs::remove_file(self.filler(kind));
            }
        }
        if !r.agent_survived {
            r.problems.push(format!(
                "the agent of {} exited while its disk had failed",
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
                    "{} s after the disk worked again, {} still does not take and apply writes (last write through it: {o})",
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
                ..Default::default()
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

/// Polls the managers in `others` (each call bounded by [`LEADER_PROBE_TIMEOUT`]) until one
/// names a leader other than `old`; returns the time since `t0`. Runs until aborted.
async fn watch_new_leader(
    others: Vec<(String, PathBuf)>,
    old: String,
    t0: Instant,
) -> Option<Duration> {
    loop {
        let mut probes = Vec::new();
        for (_, sock) in &others {
            let sock = sock.clone();
            probes.push(tokio::spawn(async move {
                let mut c = control(&sock).await.ok()?;
                let r = tokio::time::timeout(
                    LEADER_PROBE_TIMEOUT,
                    c.list_nodes(pb::ListNodesRequest::default()),
                )
                .await
                .ok()?
                .ok()?;
                r.into_inner().nodes.into_iter().find_map(|n| {
                    n.manager_status
                        .filter(|m| m.leader)
                        .and(n.description.map(|d| d.hostname))
                })
            }));
        }
        for p in probes {
            if let Ok(Some(l)) = p.await {
                if l != old {
                    return Some(t0.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_timed_from_its_log_line() {
        let since = std::time::UNIX_EPOCH + Duration::from_secs(1_796_679_200);
        let lines = [
            "2026-12-07T21:33:28.500000Z ERROR quit RaftCore::main on error".to_string(),
            "2026-12-07T21:33:29.000000Z  WARN later".to_string(),
        ];
        let s = first_logged_after(&lines, since).unwrap();
        assert!((s - 8.5).abs() < 1e-6, "{s}");
        assert_eq!(first_logged_after(&[], since), None);
        let before = ["2026-12-07T21:33:00.000000Z ERROR earlier".to_string()];
        assert_eq!(first_logged_after(&before, since), Some(0.0));
    }

    #[test]
    fn an_overlap_names_a_carrier_and_a_second_fault() {
        let p = Planned::parse("disk-full-manager+partition-minority").unwrap();
        assert_eq!(p.fault, Fault::DiskFull);
        assert_eq!(p.overlap, Some(Fault::PartitionMinority));
        assert_eq!(p.name(), "disk-full-manager+partition-minority");
        assert_eq!(
            Planned::parse("kill-9-leader").unwrap(),
            Planned::one(Fault::KillLeader)
        );
        // A partition cannot carry one (healing it heals every partition); a disk fault
        // cannot be a second fault.
        assert!(Planned::parse("partition-minority+kill-9-leader").is_err());
        assert!(Planned::parse("rolling-update+disk-full-manager").is_err());
        assert!(Planned::parse("no-such-fault").is_err());
        for f in ALL {
            assert_eq!(Fault::by_name(f.name()), Some(f));
        }
    }
}
