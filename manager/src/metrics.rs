//! The managers' Prometheus series (Raft, store, orchestrators and scheduler, dispatcher), and
//! the small helpers the agent's other collectors write theirs with. docs/design/metrics.md.
//!
//! Events are counted where they happen, in process-wide metrics ([`get`]): counters and
//! gauges are atomics; a histogram observation takes the histogram's own short lock (never
//! contended but by a scrape). What a manager can tell cheaply at any moment (term, leader,
//! indexes, log, store contents, sessions) is read at scrape time by [`ManagerCollector`],
//! which writes nothing at all while the node is no manager.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::controlapi::ApiSlot;
use crate::store::Kind;

/// One label, as the families here carry it.
pub type Label = [(&'static str, &'static str); 1];

/// Buckets of latencies from half a millisecond to ten seconds (Raft proposals).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of decision rounds, from 50 µs to 2.5 s (a round over 100,000 tasks).
pub const ROUND_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];
/// Buckets of status batches (updates per batch, at most `STATUS_BATCH_MAX`).
pub const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The leader components whose rounds are counted apart from the scheduler's.
pub const ORCHESTRATORS: [&str; 5] = ["replicated", "global", "restart", "updater", "reaper"];

/// What a decision round of one leader component reports: writes decided, time taken.
#[derive(Clone, Debug)]
pub struct RoundMetrics {
    /// Store writes (mutations) the component decided.
    pub decisions: Counter,
    /// How long its decisions took.
    pub seconds: Histogram,
}

/// The managers' event metrics, updated where the events happen.
#[derive(Debug)]
pub struct Metrics {
    /// The leader this manager knows changed (to another known leader).
    pub leader_changes: Counter,
    /// The highest log index known committed (set by the log store as openraft saves it).
    pub commit_index: Gauge<u64, AtomicU64>,
    /// Time from proposing a command to its being applied here (committed proposals).
    pub proposal_seconds: Histogram,
    /// Proposals that did not commit (too large, not leader, Raft failed).
    pub proposals_failed: Counter,
    /// Snapshots this manager built (`origin="built"`) or installed from its leader.
    pub snapshots: Family<Label, Counter>,
    /// The size of the last snapshot built or installed.
    pub snapshot_bytes: Gauge<u64, AtomicU64>,
    /// Pending tasks wanting to run that the scheduler's last round left pending (0 while
    /// this manager does not lead).
    pub scheduler_pending: Gauge,
    scheduler: RoundMetrics,
    orchestrator_decisions: Family<Label, Counter>,
    orchestrator_seconds: Family<Label, Histogram>,
    /// Nodes whose heartbeat deadline passed (each is marked down).
    pub heartbeats_missed: Counter,
    /// Updates per status batch the dispatcher wrote.
    pub status_batch: Histogram,
}

impl Metrics {
    fn new() -> Metrics {
        let orchestrator_seconds: Family<Label, Histogram> =
            Family::new_with_constructor(|| Histogram::new(ROUND_BUCKETS));
        let orchestrator_decisions: Family<Label, Counter> = Family::default();
        // Every component has its series from the start (a zero is an answer too).
        for c in ORCHESTRATORS {
            orchestrator_seconds.get_or_create_owned(&[("component", c)]);
            orchestrator_decisions.get_or_create_owned(&[("component", c)]);
        }
        let snapshots: Family<Label, Counter> = Family::default();
        for o in ["built", "installed"] {
            snapshots.get_or_create_owned(&[("origin", o)]);
        }
        Metrics {
            leader_changes: Counter::default(),
            commit_index: Gauge::default(),
            proposal_seconds: Histogram::new(LATENCY_BUCKETS),
            proposals_failed: Counter::default(),
            snapshots,
            snapshot_bytes: Gauge::default(),
            scheduler_pending: Gauge::default(),
            scheduler: RoundMetrics {
                decisions: Counter::default(),
                seconds: Histogram::new(ROUND_BUCKETS),
            },
            orchestrator_decisions,
            orchestrator_seconds,
            heartbeats_missed: Counter::default(),
            status_batch: Histogram::new(BATCH_BUCKETS),
        }
    }

    /// The round metrics of a leader component: `"scheduler"` or one of [`ORCHESTRATORS`].
    /// Handles share the counters: take them once, update them lock-free.
    pub fn rounds(&self, component: &'static str) -> RoundMetrics {
        if component == "scheduler" {
            return self.scheduler.clone();
        }
        let l = [("component", component)];
        RoundMetrics {
            decisions: self.orchestrator_decisions.get_or_create_owned(&l),
            seconds: self.orchestrator_seconds.get_or_create_owned(&l),
        }
    }

    /// Counts a snapshot of `bytes` (`origin`: "built" or "installed").
    pub fn snapshot(&self, origin: &'static str, bytes: usize) {
        self.snapshots.get_or_create(&[("origin", origin)]).inc();
        self.snapshot_bytes.set(bytes as u64);
    }
}

/// The process's manager event metrics.
pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Writes one metric family: `# HELP`, `# TYPE` and its samples.
pub fn put(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: &impl EncodeMetric,
) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?;
    metric.encode(m)
}

/// Writes a gauge read now.
pub fn put_gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: i64,
) -> std::fmt::Result {
    put(enc, name, help, unit, &ConstGauge::new(value))
}

/// Writes a gauge read now with one sample per value of `label`.
pub fn put_gauges<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    label: &'static str,
    samples: impl IntoIterator<Item = (&'a str, i64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (value, n) in samples {
        let l = [(label, value)];
        ConstGauge::new(n).encode(m.encode_family(&l)?)?;
    }
    Ok(())
}

/// Counts the changes of the leader a manager's Raft knows, until Raft stops.
pub async fn count_leader_changes(raft: crate::raft::Raft) {
    let mut rx = raft.metrics();
    let mut last = None;
    loop {
        let leader = rx.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            get().leader_changes.inc();
            last = leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What a manager tells at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub term: u64,
    pub is_leader: bool,
    pub has_leader: bool,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Entries in the log (not yet purged behind a snapshot).
    pub log_entries: u64,
    /// The Raft database's files (log, state machine, snapshot).
    pub db_bytes: u64,
    /// Objects by kind, in the store.
    pub objects: Vec<(&'static str, u64)>,
    /// Open dispatcher sessions (on the leader; 0 elsewhere).
    pub sessions: u64,
}

impl Sample {
    /// Reads what the manager behind `api` tells now.
    pub fn read(api: &crate::controlapi::ControlApi) -> Sample {
        let m = api.raft().metrics().borrow().clone();
        let store = api.store();
        let index = |l: Option<crate::raft::typ::LogId>| l.map_or(0, |l| l.index);
        let last = m.last_log_index.unwrap_or(0);
        // `purged` is the last removed entry: the log holds what follows it.
        let first = m.purged.map_or(0, |p| p.index + 1);
        let kinds = [
            Kind::Node,
            Kind::Service,
            Kind::Task,
            Kind::Network,
            Kind::Secret,
            Kind::Config,
            Kind::Cluster,
        ];
        Sample {
            term: m.current_term,
            is_leader: m.current_leader == Some(m.id),
            has_leader: m.current_leader.is_some(),
            last_log_index: last,
            applied_index: index(m.last_applied),
            snapshot_index: index(m.snapshot),
            log_entries: if m.last_log_index.is_some() {
                (last + 1).saturating_sub(first)
            } else {
                0
            },
            db_bytes: store.size_on_disk(),
            objects: kinds
                .iter()
                .map(|k| (kind_label(*k), store.count(*k) as u64))
                .collect(),
            sessions: api.session_count() as u64,
        }
    }
}

fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::Node => "node",
        Kind::Service => "service",
        Kind::Task => "task",
        Kind::Cluster => "cluster",
        Kind::Network => "network",
        Kind::Secret => "secret",
        Kind::Config => "config",
    }
}

/// Writes the manager series: `sample` (read now) and the event metrics.
pub fn encode(sample: &Sample, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let m = get();
    let g = |v: u64| v.min(i64::MAX as u64) as i64;
    put_gauge(
        enc,
        "shoal_raft_term",
        "The current Raft term.",
        None,
        g(sample.term),
    )?;
    put_gauge(
        enc,
        "shoal_raft_is_leader",
        "1 if this manager is the Raft leader.",
        None,
        sample.is_leader as i64,
    )?;
    put_gauge(
        enc,
        "shoal_raft_has_leader",
        "1 if this manager knows a Raft leader.",
        None,
        sample.has_leader as i64,
    )?;
    put(
        enc,
        "shoal_raft_leader_changes",
        "Changes of the Raft leader this manager saw.",
        None,
        &m.leader_changes,
    )?;
    put(
        enc,
        "shoal_raft_commit_index",
        "The highest Raft log index known committed.",
        None,
        &m.commit_index,
    )?;
    put_gauge(
        enc,
        "shoal_raft_applied_index",
        "The last Raft log index applied to the store.",
        None,
        g(sample.applied_index),
    )?;
    put_gauge(
        enc,
        "shoal_raft_last_log_index",
        "The last index in this manager's Raft log.",
        None,
        g(sample.last_log_index),
    )?;
    put_gauge(
        enc,
        "shoal_raft_log_entries",
        "Entries in the Raft log (not yet purged behind a snapshot).",
        None,
        g(sample.log_entries),
    )?;
    put_gauge(
        enc,
        "shoal_raft_db_size",
        "Size of the Raft database's files (log, store, snapshot).",
        Some(Unit::Bytes),
        g(sample.db_bytes),
    )?;
    put_gauge(
        enc,
        "shoal_raft_snapshot_index",
        "The last Raft log index the current snapshot holds.",
        None,
        g(sample.snapshot_index),
    )?;
    put(
        enc,
        "shoal_raft_snapshots",
        "Snapshots built here or installed from the leader.",
        None,
        &m.snapshots,
    )?;
    put(
        enc,
        "shoal_raft_snapshot_last_size",
        "Size of the last snapshot built or installed.",
        Some(Unit::Bytes),
        &m.snapshot_bytes,
    )?;
    put(
        enc,
        "shoal_raft_proposal_duration",
        "Time from proposing a command to its being applied (committed proposals).",
        Some(Unit::Seconds),
        &m.proposal_seconds,
    )?;
    put(
        enc,
        "shoal_raft_proposals_failed",
        "Proposals that did not commit (too large, not leader, Raft failed).",
        None,
        &m.proposals_failed,
    )?;
    put_gauges(
        enc,
        "shoal_store_objects",
        "Objects in the store, by kind.",
        None,
        "kind",
        sample.objects.iter().map(|(k, n)| (*k, g(*n))),
    )?;
    put(
        enc,
        "shoal_scheduler_decisions",
        "Store writes the scheduler decided (assignments, reasons for pending).",
        None,
        &m.scheduler.decisions,
    )?;
    put(
        enc,
        "shoal_scheduler_round_duration",
        "Time of a scheduling round.",
        Some(Unit::Seconds),
        &m.scheduler.seconds,
    )?;
    put(
        enc,
        "shoal_scheduler_pending_tasks",
        "Tasks wanting to run that the last scheduling round left pending (0 off the leader).",
        None,
        &m.scheduler_pending,
    )?;
    put(
        enc,
        "shoal_orchestrator_decisions",
        "Store writes an orchestrator decided.",
        None,
        &m.orchestrator_decisions,
    )?;
    put(
        enc,
        "shoal_orchestrator_round_duration",
        "Time of an orchestrator's decision round.",
        Some(Unit::Seconds),
        &m.orchestrator_seconds,
    )?;
    put_gauge(
        enc,
        "shoal_dispatcher_sessions",
        "Open agent sessions (on the leader).",
        None,
        g(sample.sessions),
    )?;
    put(
        enc,
        "shoal_dispatcher_heartbeats_missed",
        "Nodes found silent past their heartbeat deadline (each is marked down).",
        None,
        &m.heartbeats_missed,
    )?;
    put(
        enc,
        "shoal_dispatcher_status_batch_updates",
        "Task status updates per batch the dispatcher wrote.",
        None,
        &m.status_batch,
    )
}

/// The manager series, while the node is a manager (its control API in the daemon's slot);
/// nothing otherwise.
#[derive(Clone)]
pub struct ManagerCollector {
    slot: ApiSlot,
}

impl ManagerCollector {
    /// Collects from the manager the daemon runs, whenever it runs one.
    pub fn new(slot: ApiSlot) -> ManagerCollector {
        ManagerCollector { slot }
    }
}

impl std::fmt::Debug for ManagerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerCollector").finish_non_exhaustive()
    }
}

impl Collector for ManagerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(api) = self.slot.get() else {
            return Ok(());
        };
        encode(&Sample::read(&api), &mut enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Fixed(Sample);

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            encode(&self.0, &mut enc)
        }
    }

    /// `(name, value)` pairs.
    type Pairs = Vec<(String, String)>;

    /// `name value` of each sample line, and `name type` of each TYPE line.
    fn parse(text: &str) -> (Pairs, Pairs) {
        let mut samples = Vec::new();
        let mut types = Vec::new();
        for l in text.lines() {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                let (n, ty) = t.split_once(' ').unwrap();
                types.push((n.to_string(), ty.to_string()));
            } else if !l.starts_with('#') {
                let (n, v) = l.rsplit_once(' ').unwrap();
                samples.push((n.to_string(), v.to_string()));
            }
        }
        (samples, types)
    }

    #[test]
    fn the_manager_series_are_named_and_typed_as_prometheus_wants() {
        let sample = Sample {
            term: 7,
            is_leader: true,
            has_leader: true,
            last_log_index: 120,
            applied_index: 119,
            snapshot_index: 100,
            log_entries: 21,
            db_bytes: 4096,
            objects: vec![("node", 3), ("task", 20)],
            sessions: 3,
        };
        get().rounds("scheduler").decisions.inc_by(2);
        get().rounds("replicated").seconds.observe(0.003);
        get().status_batch.observe(4.0);
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fixed(sample)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &reg).unwrap();
        let (samples, types) = parse(&text);
        let value = |n: &str| {
            samples
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no sample {n} in\n{text}"))
        };
        assert_eq!(value("shoal_raft_term"), "7");
        assert_eq!(value("shoal_raft_is_leader"), "1");
        assert_eq!(value("shoal_raft_log_entries"), "21");
        assert_eq!(value("shoal_raft_db_size_bytes"), "4096");
        assert_eq!(value("shoal_store_objects{kind=\"task\"}"), "20");
        assert_eq!(value("shoal_dispatcher_sessions"), "3");
        assert!(
            value("shoal_scheduler_decisions_total")
                .parse::<u64>()
                .unwrap()
                >= 2
        );
        assert_eq!(
            value("shoal_raft_snapshots_total{origin=\"installed\"}")
                .parse::<u64>()
                .ok(),
            Some(
                get()
                    .snapshots
                    .get_or_create(&[("origin", "installed")])
                    .get()
            )
        );
        // Every orchestrator has its series before its first round.
        for c in ORCHESTRATORS {
            value(&format!(
                "shoal_orchestrator_decisions_total{{component=\"{c}\"}}"
            ));
        }
        let bucket = "shoal_orchestrator_round_duration_seconds_bucket{component=\"replicated\",le=\"0.005\"}";
        assert!(value(bucket).parse::<u64>().unwrap() >= 1);
        let ty = |n: &str| {
            types
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, t)| t.as_str())
                .unwrap_or_else(|| panic!("no TYPE of {n} in\n{text}"))
        };
        for (n, t) in [
            ("shoal_raft_term", "gauge"),
            ("shoal_raft_commit_index", "gauge"),
            ("shoal_raft_leader_changes_total", "counter"),
            ("shoal_raft_proposal_duration_seconds", "histogram"),
            ("shoal_raft_snapshot_last_size_bytes", "gauge"),
            ("shoal_store_objects", "gauge"),
            ("shoal_scheduler_pending_tasks", "gauge"),
            ("shoal_scheduler_round_duration_seconds", "histogram"),
            ("shoal_orchestrator_decisions_total", "counter"),
            ("shoal_dispatcher_heartbeats_missed_total", "counter"),
            ("shoal_dispatcher_status_batch_updates", "histogram"),
        ] {
            assert_eq!(ty(n), t, "{n}");
        }
        // Prometheus' rules: a shoal_ prefix, counters end in _total, base units.
        for (n, t) in &types {
            assert!(n.starts_with("shoal_"), "{n}");
            assert_eq!(t == "counter", n.ends_with("_total"), "{n} {t}");
            assert!(!n.contains("millis") && !n.contains("_ms"), "{n}");
        }
    }
}
