//! shoal's election driver: decides when a manager that hears no leader elects itself.
//!
//! openraft 0.9's own timer lets a follower elect only after `election_timeout_max` (the
//! leader lease every voter keeps after hearing a leader) plus an election timeout drawn once
//! per process, so a failover takes at least max + min, and two followers that drew close
//! timeouts split the vote round after round. The managers turn that timer off
//! (`Config::enable_elect = false`, [`driven_config`]) and run [`ElectionDriver`] instead:
//!
//! - a voter that has not heard from a leader for `lease + jitter` elects itself, with the
//!   jitter drawn afresh from `[0, max - min)` after every attempt;
//! - after an attempt that won nothing and heard from no leader it tries again after
//!   `heartbeat + jitter` (a new draw each time, so split votes resolve), or after a further
//!   `2 × max` if a voter answered it with a longer log (it cannot win; like openraft's
//!   `smaller_log_timeout`, this leaves the round to a node that can);
//! - the only voter of a cluster elects at once; a leader or a learner never does.
//!
//! The driver also sends the leader's heartbeats at the cluster's interval
//! (`Trigger::heartbeat`): openraft 0.9 uses its own `heartbeat_interval` as the deadline of
//! every AppendEntries too, and at 50 ms a follower that needs longer to take a big batch of
//! entries on a loaded host times out round after round. [`driven_config`] widens openraft's
//! interval to just under the election timeout ([`append_deadline_ms`]) and the driver keeps
//! the followers' leases fresh at the cluster's rate.
//!
//! A heartbeat travels on openraft's replication stream, behind whatever append is in flight
//! to that follower: a follower taking a large batch on a loaded host hears nothing for longer
//! than the lease and starts an election against a leader that is alive and replicating (seen
//! at scale: elections in a loop). So the leader's driver also sends a beacon
//! (`LeaderPing`, [`Network::ping_leadership`]) to every other voter at the heartbeat rate, on
//! its own gRPC stream, and a follower counts a beacon from its leader as contact. A leader
//! vouches for itself only while a quorum acknowledged it within [`beacon_quorum_limit`] and
//! while its Raft core answers ([`core_answers`] within the election timeout): one that stopped
//! replicating (a lost majority) or whose core is wedged (an apply that failed on a full disk
//! left openraft's core waiting, with its last metrics — a fresh quorum ack among them —
//! frozen) falls silent and is replaced.
//!
//! Voters still refuse any vote within the lease of the last leader message they processed
//! (openraft's `handle_vote_req`), so a node that lost contact alone (a partitioned minority)
//! cannot win while the majority still hears its leader.
//!
//! The driver also builds the snapshots and purges the log (openraft's own policy is off:
//! `SnapshotPolicy::Never`, nothing purged by it), so that every timer `cluster update` sets —
//! heartbeat, election timeouts, snapshot interval, entries kept — applies at once on every
//! manager: [`follow_cluster_timers`] feeds the driver the cluster object's Raft timers from
//! the store's watch. Only what openraft holds in its own config stays as the manager started
//! with it until its next restart: the lease within which a voter refuses votes
//! (`election_timeout_max`) and the AppendEntries deadline ([`append_deadline_ms`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use rand::Rng;
use tokio::task::JoinHandle;

use super::network::Network;
use super::typ::{Node, NodeId, Raft};

/// Longest the driver sleeps before it looks at the node's role and leader contact again
/// (a new leader, a promotion to voter, a shutdown).
pub const ELECTION_POLL: Duration = Duration::from_millis(20);

/// When this manager last heard from a leader, or from a candidate that could win (stamped
/// by the Raft gRPC service), and when a voter last refused it for a longer log (stamped by its
/// Raft client); read by the driver. Clones share the stamps.
#[derive(Clone, Debug)]
pub struct LeaderContact(Arc<ContactInner>);

#[derive(Debug)]
struct ContactInner {
    epoch: Instant,
    /// Microseconds from `epoch` to the last contact.
    last_us: AtomicU64,
    /// Microseconds from `epoch` to the last vote refused for a longer log; 0 = never.
    behind_us: AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact::new()
    }
}

impl LeaderContact {
    /// A stamp set to now: a manager that just started gives its peers a whole lease to be heard.
    pub fn new() -> LeaderContact {
        LeaderContact(Arc::new(ContactInner {
            epoch: Instant::now(),
            last_us: AtomicU64::new(0),
            behind_us: AtomicU64::new(0),
        }))
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.0.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records a contact now.
    pub fn touch(&self) {
        // Concurrent handlers may finish out of order: the stamp only moves forward.
        self.0.last_us.fetch_max(self.now_us(), Ordering::Relaxed);
    }

    /// The time of the last contact.
    pub fn last(&self) -> Instant {
        self.0.epoch + Duration::from_micros(self.0.last_us.load(Ordering::Relaxed))
    }

    /// Records that a voter refused this node's vote request because its log is longer.
    pub fn saw_longer_log(&self) {
        self.0
            .behind_us
            .fetch_max(self.now_us().max(1), Ordering::Relaxed);
    }

    /// When a voter last refused this node for a longer log, if ever.
    pub fn behind_since(&self) -> Option<Instant> {
        match self.0.behind_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.0.epoch + Duration::from_micros(us)),
        }
    }
}

/// The driver's timing, taken from the same openraft config the node runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionTimers {
    /// Silence before a first attempt can win: openraft's leader lease (`election_timeout_max`).
    pub lease: Duration,
    /// Width of the random extra wait drawn for every attempt (`max - min`).
    pub jitter: Duration,
    /// Least wait between two attempts (the heartbeat interval: longer than a vote round trip).
    pub retry: Duration,
    /// Extra wait after an attempt that a voter refused for a longer log (`2 × max`, as
    /// openraft's `smaller_log_timeout`).
    pub behind: Duration,
}

impl ElectionTimers {
    /// The timers matching `config`'s heartbeat and election timeouts.
    pub fn of(config: &openraft::Config) -> ElectionTimers {
        let max = config.election_timeout_max;
        ElectionTimers {
            lease: Duration::from_millis(max),
            jitter: Duration::from_millis(max.saturating_sub(config.election_timeout_min)),
            retry: Duration::from_millis(config.heartbeat_interval),
            behind: Duration::from_millis(max.saturating_mul(2)),
        }
    }

    /// A fresh jitter in `[0, self.jitter)`.
    fn draw(&self) -> Duration {
        if self.jitter.is_zero() {
            return Duration::ZERO;
        }
        rand::thread_rng().gen_range(Duration::ZERO..self.jitter)
    }
}

/// What this node is, as far as elections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It leads: nothing to do.
    Leader,
    /// A learner, or not in the membership yet: it cannot be elected.
    NonVoter,
    /// The only voter: nobody else can lead, so it elects at once.
    SoleVoter,
    /// The only voter with its election under way (`cluster init` starts one itself): it
    /// needs no other vote, so openraft completes it; a second one would only bump the term.
    SoleCandidate,
    /// One of several voters.
    Voter,
}

impl Role {
    /// The role in `m`, or `None` once the node has shut down.
    pub fn of(m: &openraft::RaftMetrics<NodeId, Node>) -> Option<Role> {
        if m.running_state.is_err() || m.state == ServerState::Shutdown {
            return None;
        }
        if m.state == ServerState::Leader {
            return Some(Role::Leader);
        }
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == m.id) {
            return Some(Role::NonVoter);
        }
        Some(match membership.voter_ids().count() {
            1 if m.state == ServerState::Candidate => Role::SoleCandidate,
            1 => Role::SoleVoter,
            _ => Role::Voter,
        })
    }
}

/// What the driver does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Elect this node now.
    Elect,
    /// Look again after this long.
    Wait(Duration),
}

/// The driver's decision logic, apart from clocks and Raft so it can be tested on its own.
#[derive(Clone, Debug)]
pub struct Schedule {
    timers: ElectionTimers,
    /// When this node last started an election (cleared while it leads or cannot vote).
    last_attempt: Option<Instant>,
    /// The extra wait before the next attempt, drawn after each attempt.
    jitter: Duration,
}

impl Schedule {
    /// A schedule with a first jitter of `jitter` (draw it at random).
    pub fn new(timers: ElectionTimers, jitter: Duration) -> Schedule {
        Schedule {
            timers,
            last_attempt: None,
            jitter,
        }
    }

    /// Goes on with `timers` (the cluster's changed): the next wait is theirs; a jitter drawn
    /// from the old width is drawn again when it no longer fits.
    pub fn set_timers(&mut self, timers: ElectionTimers) {
        if self.jitter >= timers.jitter {
            self.jitter = timers.draw();
        }
        self.timers = timers;
    }

    /// The next step at `now` for a node in `role` whose last leader contact was at
    /// `last_contact` and that a voter last refused for a longer log at `behind_since`; `draw`
    /// gives the jitter for the attempt after an election started now.
    pub fn step(
        &mut self,
        now: Instant,
        role: Role,
        last_contact: Instant,
        behind_since: Option<Instant>,
        draw: impl FnOnce() -> Duration,
    ) -> Step {
        let due = match (role, self.last_attempt) {
            (Role::Leader | Role::NonVoter | Role::SoleCandidate, _) => {
                self.last_attempt = None;
                return Step::Wait(ELECTION_POLL);
            }
            (Role::SoleVoter, None) => now,
            // An attempt that heard no leader since: the round failed or is still out; a new
            // one after the retry wait, with its own jitter so two candidates drift apart.
            (_, Some(attempt)) if attempt >= last_contact => {
                let behind = behind_since.is_some_and(|b| b >= attempt);
                let hold = if behind {
                    self.timers.behind
                } else {
                    Duration::ZERO
                };
                attempt + self.timers.retry + self.jitter + hold
            }
            (Role::SoleVoter, Some(_)) => now,
            // Voters keep refusing votes for a lease after the leader's last message.
            (Role::Voter, _) => last_contact + self.timers.lease + self.jitter,
        };
        if now >= due {
            self.last_attempt = Some(now);
            self.jitter = draw();
            Step::Elect
        } else {
            Step::Wait((due - now).min(ELECTION_POLL))
        }
    }
}

/// Everything the driver paces itself by: the cluster's Raft timers as they are now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverTimers {
    /// When followers elect.
    pub election: ElectionTimers,
    /// How often the leader heartbeats (and beacons).
    pub beat: Duration,
    /// How long a beacon vouches for its leader (`election_timeout_min`).
    pub beacon_ttl: Duration,
    /// How recently a quorum must have acknowledged the leader for it to send beacons.
    pub quorum_limit: Duration,
    /// Entries applied since the last snapshot that make a new one (openraft's
    /// `LogsSinceLast`).
    pub snapshot_interval: u64,
    /// Entries kept in the log behind a snapshot.
    pub keep: u64,
}

impl DriverTimers {
    /// The timers of `config` (the cluster's, through [`super::raft_config`]).
    pub fn of(config: &openraft::Config) -> DriverTimers {
        DriverTimers {
            election: ElectionTimers::of(config),
            beat: Duration::from_millis(config.heartbeat_interval),
            beacon_ttl: Duration::from_millis(config.election_timeout_min),
            quorum_limit: beacon_quorum_limit(config),
            snapshot_interval: match config.snapshot_policy {
                openraft::SnapshotPolicy::LogsSinceLast(n) => n,
                openraft::SnapshotPolicy::Never => u64::MAX,
            },
            keep: config.max_in_snapshot_log_to_keep,
        }
    }
}

/// The driver's timers following the cluster object in `store`: its Raft timers as
/// `raft_config` reads them (`fallback` while the cluster has none: a manager that joined and
/// has not replicated the cluster yet), sent again on every change of the cluster object.
/// The follower ends when every receiver is gone.
pub fn follow_cluster_timers(
    store: crate::store::Store,
    fallback: shoal_proto::v1::RaftConfig,
) -> tokio::sync::watch::Receiver<DriverTimers> {
    let read = {
        let store = store.clone();
        move || -> Option<DriverTimers> {
            let spec = store.get_cluster().ok().flatten().and_then(|c| c.spec);
            let name = spec.as_ref().map_or("", |s| s.name.as_str()).to_string();
            let timers = spec.and_then(|s| s.raft).unwrap_or(fallback);
            let name = if name.is_empty() { "shoal" } else { &name };
            match super::raft_config(name, &timers) {
                Ok(c) => Some(DriverTimers::of(&c)),
                Err(e) => {
                    tracing::warn!(
                        "the cluster's raft timers are not usable, kept as they were: {e}"
                    );
                    None
                }
            }
        }
    };
    // Subscribed before the first read: no change falls between the two.
    let mut events = store.watch();
    let first = read().unwrap_or_else(|| {
        let c = super::raft_config("shoal", &super::default_raft_timers())
            .expect("the default raft timers are valid");
        DriverTimers::of(&c)
    });
    let (tx, rx) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let changed = tokio::select! {
                _ = tx.closed() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => ev.object.kind() == crate::store::Kind::Cluster,
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return,
                },
            };
            if !changed {
                continue;
            }
            if let Some(t) = read() {
                tx.send_if_modified(|cur| {
                    if *cur == t {
                        return false;
                    }
                    tracing::info!(?t, "raft timers changed: the election driver follows them");
                    *cur = t;
                    true
                });
            }
        }
    });
    rx
}

/// openraft's `heartbeat_interval` for a driven manager, which is the deadline of each
/// AppendEntries: just under the election timeout (openraft requires it below
/// `election_timeout_min`), never below the cluster's heartbeat interval.
pub fn append_deadline_ms(config: &openraft::Config) -> u64 {
    config
        .heartbeat_interval
        .max(config.election_timeout_min.saturating_sub(1))
}

/// The openraft config a driven manager runs with: `config` with openraft's own election
/// timer off, its heartbeat interval (the AppendEntries deadline) widened to
/// [`append_deadline_ms`], and neither snapshots nor purges of its own; the driver sends
/// heartbeats, builds snapshots and purges at the cluster's timers.
pub fn driven_config(config: &openraft::Config) -> Arc<openraft::Config> {
    Arc::new(openraft::Config {
        enable_elect: false,
        heartbeat_interval: append_deadline_ms(config),
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        ..config.clone()
    })
}

/// The running election driver of one manager; stops when dropped or when Raft shuts down.
#[derive(Debug)]
pub struct ElectionDriver {
    task: JoinHandle<()>,
}

impl ElectionDriver {
    /// Turns openraft's own election timer off on `raft` and drives its elections from the
    /// leader contacts `contact` records, its heartbeats, snapshots and purges, with the
    /// timers `timers` holds at each moment; as leader it sends beacons through `beacons`
    /// (none: heartbeats only).
    pub fn spawn(
        raft: Raft,
        timers: tokio::sync::watch::Receiver<DriverTimers>,
        contact: LeaderContact,
        beacons: Option<Network>,
    ) -> ElectionDriver {
        raft.runtime_config().elect(false);
        let beacons = beacons.map(|net| Beacons {
            net,
            inflight: Default::default(),
        });
        let task = tokio::spawn(drive(raft, timers, contact, beacons));
        ElectionDriver { task }
    }
}

/// How recently a quorum must have acknowledged a leader for it to send beacons: ten election
/// timeouts, at least 2 s (a loaded follower may take that long to answer a large append).
pub fn beacon_quorum_limit(config: &openraft::Config) -> Duration {
    Duration::from_millis((10 * config.election_timeout_max).max(2_000))
}

/// Least time between two snapshot (or purge) requests for the same state: openraft ignores
/// a request while a snapshot is being built, and says so in its log.
const LOG_UPKEEP_RETRY: Duration = Duration::from_secs(1);

/// Where this node's log stands (from its metrics).
#[derive(Clone, Copy)]
struct Indexes {
    applied: Option<u64>,
    snapshot: Option<u64>,
    purged: Option<u64>,
}

/// The driver's snapshots and purges, at the cluster's `snapshot_interval` and `keep`.
#[derive(Default)]
struct LogUpkeep {
    /// (snapshot index seen, when) of the last snapshot request.
    snapshot_asked: Option<(Option<u64>, Instant)>,
    /// (purge index asked, when) of the last purge request.
    purge_asked: Option<(u64, Instant)>,
}

impl LogUpkeep {
    async fn step(
        &mut self,
        raft: &Raft,
        i: Indexes,
        t: &DriverTimers,
    ) -> Result<(), openraft::error::Fatal<NodeId>> {
        let snapshot = i.snapshot;
        if let Some(applied) = i.applied {
            if snapshot_due(applied, snapshot, t.snapshot_interval)
                && self
                    .snapshot_asked
                    .is_none_or(|(at, when)| at != snapshot || when.elapsed() >= LOG_UPKEEP_RETRY)
            {
                self.snapshot_asked = Some((snapshot, Instant::now()));
                raft.trigger().snapshot().await?;
            }
        }
        if let Some(upto) = purge_upto(snapshot, i.purged, t.keep) {
            if self
                .purge_asked
                .is_none_or(|(at, when)| at != upto || when.elapsed() >= LOG_UPKEEP_RETRY)
            {
                self.purge_asked = Some((upto, Instant::now()));
                raft.trigger().purge_log(upto).await?;
            }
        }
        Ok(())
    }
}

/// Whether a snapshot is due with `applied` the last applied index and `snapshot` the last
/// snapshot's: openraft's `LogsSinceLast(interval)`.
pub fn snapshot_due(applied: u64, snapshot: Option<u64>, interval: u64) -> bool {
    if interval == u64::MAX {
        return false;
    }
    let next = |i: Option<u64>| i.map_or(0, |i| i.saturating_add(1));
    next(Some(applied)) >= next(snapshot).saturating_add(interval)
}

/// The index to purge the log up to (inclusive) to keep `keep` entries behind the snapshot
/// at `snapshot`, when there is more to purge than `purged` (openraft's `calc_purge_upto`).
pub fn purge_upto(snapshot: Option<u64>, purged: Option<u64>, keep: u64) -> Option<u64> {
    let end = snapshot?.saturating_add(1).checked_sub(keep)?;
    let upto = end.checked_sub(1)?;
    (purged.is_none_or(|p| p < upto)).then_some(upto)
}

/// Whether the Raft core itself answers within `wait` — a call that runs on the core's own
/// loop (metrics and triggers cannot tell: the metrics keep their last value when the core
/// stops, and a trigger only queues a message for it) — and its storage still takes writes
/// ([`super::durable::storage_answers`]: a database that failed an I/O refuses every write
/// for good, while a core with nothing to append goes on answering).
pub async fn core_answers(raft: &Raft, wait: Duration) -> bool {
    let core = matches!(
        tokio::time::timeout(wait, raft.with_raft_state(|_| ())).await,
        Ok(Ok(()))
    );
    if !core {
        return false;
    }
    match super::durable::storage_answers(wait).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("raft storage refuses writes: {e}");
            false
        }
    }
}

/// Whether a leader may vouch for itself: its core answered within `stale` (and it has a
/// quorum's ack recent enough, or none yet: its election was the quorum's answer).
pub fn may_beacon(
    m: &openraft::RaftMetrics<NodeId, Node>,
    core_answered: Duration,
    stale: Duration,
    quorum_limit: Duration,
) -> bool {
    m.running_state.is_ok()
        && core_answered < stale
        && m.millis_since_quorum_ack
            .is_none_or(|ms| Duration::from_millis(ms) < quorum_limit)
}

/// The leader's beacons to the other voters, at most one in flight per voter.
struct Beacons {
    net: Network,
    inflight: std::collections::HashMap<NodeId, JoinHandle<()>>,
}

impl Beacons {
    fn send(
        &mut self,
        m: &openraft::RaftMetrics<NodeId, Node>,
        core_answered: Duration,
        stale: Duration,
        t: &DriverTimers,
    ) {
        if !may_beacon(m, core_answered, stale, t.quorum_limit) {
            return;
        }
        let membership = m.membership_config.membership();
        self.inflight.retain(|_, t| !t.is_finished());
        for id in membership.voter_ids() {
            if id == m.id || self.inflight.contains_key(&id) {
                continue;
            }
            let Some(node) = membership.get_node(&id) else {
                continue;
            };
            let (net, addr, term, ttl) = (
                self.net.clone(),
                node.addr.clone(),
                m.current_term,
                t.beacon_ttl,
            );
            let task = tokio::spawn(async move {
                if let Err(e) = net.ping_leadership(&addr, term, ttl).await {
                    tracing::trace!(peer = id, "leader beacon: {e}");
                }
            });
            self.inflight.insert(id, task);
        }
    }
}

impl Drop for Beacons {
    fn drop(&mut self) {
        for t in self.inflight.values() {
            t.abort();
        }
    }
}

impl Drop for ElectionDriver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The driver's probe of its core (see [`drive`]), aborted with the driver.
struct Probe(Option<JoinHandle<()>>);

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

async fn drive(
    raft: Raft,
    mut follow: tokio::sync::watch::Receiver<DriverTimers>,
    contact: LeaderContact,
    mut beacons: Option<Beacons>,
) {
    let metrics = raft.metrics();
    let mut t = *follow.borrow_and_update();
    let mut schedule = Schedule::new(t.election, t.election.draw());
    let mut log = LogUpkeep::default();
    let mut last_beat = Instant::now();
    // When the core last answered a probe; one probe in flight at a time, so a slow core
    // delays nothing here and a wedged one holds a single task.
    let answered = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut probe = Probe(None);
    let mut wedged_told = false;
    let mut leading = false;
    loop {
        if follow.has_changed().unwrap_or(false) {
            t = *follow.borrow_and_update();
            schedule.set_timers(t.election);
        }
        let Some(role) = Role::of(&metrics.borrow()) else {
            return;
        };
        let indexes = {
            let m = metrics.borrow();
            Indexes {
                applied: m.last_applied.map(|l| l.index),
                snapshot: m.snapshot.map(|l| l.index),
                purged: m.purged.map(|l| l.index),
            }
        };
        if let Err(e) = log.step(&raft, indexes, &t).await {
            tracing::debug!("election driver stops: {e}");
            return;
        }
        if role == Role::Leader && !leading {
            // Just elected: the election was the core's own doing, so it answered just now.
            *answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        leading = role == Role::Leader;
        let (timers, beat) = (t.election, t.beat);
        if role == Role::Leader {
            if last_beat.elapsed() >= beat {
                last_beat = Instant::now();
                if let Err(e) = raft.trigger().heartbeat().await {
                    tracing::debug!("election driver stops: {e}");
                    return;
                }
                if probe.0.as_ref().is_none_or(|p| p.is_finished()) {
                    let (r, a) = (raft.clone(), answered.clone());
                    probe.0 = Some(tokio::spawn(async move {
                        if r.with_raft_state(|_| ()).await.is_ok() {
                            *a.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                        }
                    }));
                }
                let since = answered.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                let stale = timers.lease * 2;
                if since < stale {
                    wedged_told = false;
                } else if !wedged_told {
                    wedged_told = true;
                    tracing::error!(
                        "this leader's raft core has not answered for {since:?}: no more beacons, the others elect"
                    );
                }
                if let Some(b) = beacons.as_mut() {
                    b.send(&metrics.borrow(), since, stale, &t);
                }
            }
            tokio::time::sleep(beat.saturating_sub(last_beat.elapsed()).min(ELECTION_POLL)).await;
            continue;
        }
        let (last, behind) = (contact.last(), contact.behind_since());
        match schedule.step(Instant::now(), role, last, behind, || timers.draw()) {
            Step::Elect => {
                tracing::info!(?role, "no leader heard: starting an election");
                if let Err(e) = raft.trigger().elect().await {
                    tracing::debug!("election driver stops: {e}");
                    return;
                }
            }
            Step::Wait(d) => tokio::time::sleep(d).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timers() -> ElectionTimers {
        ElectionTimers {
            lease: 400 * MS,
            jitter: 200 * MS,
            retry: 50 * MS,
            behind: 800 * MS,
        }
    }

    #[test]
    fn timers_follow_the_openraft_config() {
        let c = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            ..Default::default()
        };
        assert_eq!(ElectionTimers::of(&c), timers());
        let driven = driven_config(&c);
        assert!(!driven.enable_elect);
        // Snapshots and purges are the driver's, at the cluster's timers.
        assert_eq!(driven.snapshot_policy, openraft::SnapshotPolicy::Never);
        assert_eq!(driven.max_in_snapshot_log_to_keep, u64::MAX);
        // openraft's interval is the AppendEntries deadline: widened, still a valid config.
        assert_eq!(driven.heartbeat_interval, 199);
        assert!(openraft::Config::clone(&driven).validate().is_ok());
        let slow = openraft::Config {
            heartbeat_interval: 300,
            election_timeout_min: 301,
            election_timeout_max: 600,
            ..Default::default()
        };
        assert_eq!(append_deadline_ms(&slow), 300);
        for _ in 0..1000 {
            assert!(timers().draw() < 200 * MS);
        }
    }

    #[test]
    fn a_voter_elects_only_after_the_lease_and_its_jitter() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timers(), 30 * MS);
        let never = || panic!("no draw without an attempt");
        // Heard the leader at t0: quiet until lease + jitter = 430 ms.
        assert_eq!(
            s.step(t0, Role::Voter, t0, None, never),
            Step::Wait(ELECTION_POLL)
        );
        assert_eq!(
            s.step(t0 + 420 * MS, Role::Voter, t0, None, never),
            Step::Wait(10 * MS)
        );
        // A heartbeat at 300 ms moves the deadline.
        let hb = t0 + 300 * MS;
        assert_eq!(
            s.step(t0 + 430 * MS, Role::Voter, hb, None, never),
            Step::Wait(ELECTION_POLL)
        );
        assert_eq!(
            s.step(hb + 430 * MS, Role::Voter, hb, None, || 120 * MS),
            Step::Elect
        );
    }

    #[test]
    fn a_failed_attempt_is_retried_with_a_fresh_draw_each_time() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timers(), Duration::ZERO);
        let mut draws = vec![70 * MS, 10 * MS, 150 * MS].into_iter();
        let a1 = t0 + 400 * MS;
        assert_eq!(
            s.step(a1, Role::Voter, t0, None, || draws.next().unwrap()),
            Step::Elect
        );
        // Next attempt at a1 + retry 50 + the new draw 70, not after another lease.
        assert_eq!(
            s.step(a1 + 119 * MS, Role::Voter, t0, None, || unreachable!()),
            Step::Wait(MS)
        );
        let a2 = a1 + 120 * MS;
        assert_eq!(
            s.step(a2, Role::Voter, t0, None, || draws.next().unwrap()),
            Step::Elect
        );
        // The draw of 10 ms applies to the third attempt only.
        assert_eq!(
            s.step(a2 + 59 * MS, Role::Voter, t0, None, || unreachable!()),
            Step::Wait(MS)
        );
        let a3 = a2 + 60 * MS;
        assert_eq!(
            s.step(a3, Role::Voter, t0, None, || draws.next().unwrap()),
            Step::Elect
        );
        assert_eq!(
            s.step(a3 + 199 * MS, Role::Voter, t0, None, || unreachable!()),
            Step::Wait(MS)
        );
    }

    #[test]
    fn an_attempt_refused_for_a_longer_log_holds_off_the_next_one() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timers(), Duration::ZERO);
        let a1 = t0 + 400 * MS;
        assert_eq!(s.step(a1, Role::Voter, t0, None, || 30 * MS), Step::Elect);
        // A refusal from before this attempt does not count.
        let before = Some(t0);
        assert_eq!(
            s.step(a1 + 80 * MS, Role::Voter, t0, before, || 10 * MS),
            Step::Elect
        );
        let a2 = a1 + 80 * MS;
        // A voter answered the second attempt with a longer log: retry + jitter + 800 ms.
        let refused = Some(a2 + 3 * MS);
        assert_eq!(
            s.step(a2 + 859 * MS, Role::Voter, t0, refused, || unreachable!()),
            Step::Wait(MS)
        );
        assert_eq!(
            s.step(a2 + 860 * MS, Role::Voter, t0, refused, || Duration::ZERO),
            Step::Elect
        );
    }

    #[test]
    fn hearing_a_leader_after_an_attempt_brings_back_the_lease() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timers(), Duration::ZERO);
        let a1 = t0 + 400 * MS;
        assert_eq!(s.step(a1, Role::Voter, t0, None, || 20 * MS), Step::Elect);
        // Another candidate won and its first append arrived.
        let heard = a1 + 5 * MS;
        assert_eq!(
            s.step(a1 + 100 * MS, Role::Voter, heard, None, || unreachable!()),
            Step::Wait(ELECTION_POLL)
        );
        assert_eq!(
            s.step(
                heard + 419 * MS,
                Role::Voter,
                heard,
                None,
                || unreachable!()
            ),
            Step::Wait(MS)
        );
        assert_eq!(
            s.step(heard + 420 * MS, Role::Voter, heard, None, || {
                Duration::ZERO
            }),
            Step::Elect
        );
    }

    #[test]
    fn leaders_learners_and_a_sole_candidate_wait_and_a_sole_voter_elects_at_once() {
        let t0 = Instant::now();
        let long_ago = t0 - Duration::from_secs(60);
        let mut s = Schedule::new(timers(), Duration::ZERO);
        for role in [Role::Leader, Role::NonVoter, Role::SoleCandidate] {
            assert_eq!(
                s.step(t0, role, long_ago, None, || unreachable!()),
                Step::Wait(ELECTION_POLL)
            );
        }
        // Just started, heard nobody: the only voter does not wait for a lease.
        assert_eq!(
            s.step(t0, Role::SoleVoter, t0, None, || 100 * MS),
            Step::Elect
        );
        // Its election is still out: the retry wait applies, not another immediate one.
        assert_eq!(
            s.step(t0 + 10 * MS, Role::SoleVoter, t0, None, || unreachable!()),
            Step::Wait(ELECTION_POLL)
        );
        assert_eq!(
            s.step(t0 + 150 * MS, Role::SoleVoter, t0, None, || Duration::ZERO),
            Step::Elect
        );
        // Leading clears the attempt; losing the lead later starts from the lease again.
        assert_eq!(
            s.step(t0 + 200 * MS, Role::Leader, t0, None, || unreachable!()),
            Step::Wait(ELECTION_POLL)
        );
        let heard = t0 + 300 * MS;
        assert_eq!(
            s.step(
                heard + 100 * MS,
                Role::Voter,
                heard,
                None,
                || unreachable!()
            ),
            Step::Wait(ELECTION_POLL)
        );
    }

    #[test]
    fn a_leader_whose_core_stops_answering_sends_no_beacons() {
        let mut m = openraft::RaftMetrics::<NodeId, Node>::new_initial(1);
        m.millis_since_quorum_ack = Some(10);
        let (stale, quorum) = (Duration::from_millis(800), Duration::from_secs(4));
        assert!(may_beacon(&m, Duration::from_millis(100), stale, quorum));
        // A wedged core leaves its metrics as they were, a fresh quorum ack among them: its
        // silence alone must stop the beacons.
        assert!(!may_beacon(&m, Duration::from_millis(900), stale, quorum));
        m.millis_since_quorum_ack = Some(5_000);
        assert!(!may_beacon(&m, Duration::ZERO, stale, quorum));
        m.millis_since_quorum_ack = None;
        assert!(may_beacon(&m, Duration::ZERO, stale, quorum));
    }

    #[test]
    fn snapshots_and_purges_follow_the_interval_and_the_entries_kept() {
        // openraft's LogsSinceLast(10): the 10th entry after the last snapshot makes one.
        assert!(!snapshot_due(8, None, 10));
        assert!(snapshot_due(9, None, 10));
        assert!(!snapshot_due(108, Some(99), 10));
        assert!(snapshot_due(109, Some(99), 10));
        assert!(!snapshot_due(u64::MAX - 1, Some(5), u64::MAX));
        // Keep 5 behind a snapshot at 99: purge up to 94, once.
        assert_eq!(purge_upto(Some(99), None, 5), Some(94));
        assert_eq!(purge_upto(Some(99), Some(93), 5), Some(94));
        assert_eq!(purge_upto(Some(99), Some(94), 5), None);
        assert_eq!(purge_upto(Some(3), None, 5), None);
        assert_eq!(purge_upto(None, None, 0), None);
        assert_eq!(purge_upto(Some(99), None, u64::MAX), None);
        assert_eq!(purge_upto(Some(99), None, 0), Some(99));
    }

    #[test]
    fn new_timers_apply_to_the_next_wait() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timers(), 150 * MS);
        let never = || panic!("no draw without an attempt");
        let long = ElectionTimers {
            lease: 4_000 * MS,
            jitter: 1_000 * MS,
            ..timers()
        };
        s.set_timers(long);
        // The jitter drawn (150 ms) still fits: the lease is the new one.
        assert_eq!(
            s.step(t0 + 4_149 * MS, Role::Voter, t0, None, never),
            Step::Wait(MS)
        );
        assert_eq!(
            s.step(t0 + 4_150 * MS, Role::Voter, t0, None, || 10 * MS),
            Step::Elect
        );
        // Narrower again: a jitter beyond the new width is drawn anew.
        let mut s = Schedule::new(long, 900 * MS);
        s.set_timers(timers());
        assert!(s.jitter < timers().jitter);
    }

    #[test]
    fn the_contact_stamp_only_moves_forward() {
        let c = LeaderContact::new();
        let first = c.last();
        std::thread::sleep(2 * MS);
        c.clone().touch();
        let second = c.last();
        assert!(second > first);
        c.0.last_us.store(0, Ordering::Relaxed);
        c.touch();
        assert!(c.last() >= second);
    }
}
