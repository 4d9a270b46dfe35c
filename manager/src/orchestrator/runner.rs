//! The leader's loops: one keeps the shared [`ClusterView`] current from the store's watch
//! stream; one per component (replicated, global, restart, updater, reaper, scheduler) waits for the
//! view to change, lets a short batch window pass, decides over the view and proposes the
//! result through Raft.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::updater::Updater;
use super::view::{change, ClusterView, Interest};
use super::{global, new_task_id, replicated, restart, task_reaper, Decision, Proposer};
use crate::scheduler;
use crate::store::{Store, StoreError};

/// How long a component lets changes accumulate before deciding, so a burst of events makes
/// one round, not one round per event.
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Events applied to the view under one write lock before components are woken.
pub const MAX_EVENTS_PER_APPLY: usize = 4_096;
/// Largest command a component proposes (a scheduling round of 100,000 tasks is 100 commands).
pub const MAX_COMMAND_MUTATIONS: usize = 1_000;
/// Byte budget of one command's objects: a Raft entry (and so the AppendEntries that carries
/// it to a follower, which must arrive within openraft's heartbeat-interval deadline) stays a
/// few hundred KiB even when the component has thousands of tasks to write.
pub const MAX_COMMAND_BYTES: usize = 192 * 1024;
/// A component's rounds are spaced by at least this many times the last round's duration
/// (and at least [`BATCH_WINDOW`]), so a round over a large view cannot keep a core busy
/// while events flow: deciding takes at most about 1/(1 + ROUND_SPACING) of a core.
pub const ROUND_SPACING: u32 = 3;
/// Cap of the spacing above: a change is never left waiting longer than this.
pub const MAX_ROUND_GAP: Duration = Duration::from_millis(500);
/// Pause after Raft refused to take a proposal (not leader, no quorum) before trying again.
pub const PROPOSE_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Pause before deciding again after the store refused a command (a conflict), so a conflict
/// that persists cannot spin a core.
pub const REFUSED_RETRY_DELAY: Duration = Duration::from_millis(50);
/// A round every so often even without events: a safety net for anything time-based that no
/// event announces.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(10);

/// Why the leader loops could not start.
#[derive(thiserror::Error, Debug)]
pub enum LeaderRunError {
    /// Reading the store for the initial view failed.
    #[error("load cluster view: {0}")]
    Load(#[from] StoreError),
}

/// One component's decision step; the updater keeps a little memory between rounds.
type Decide = Box<dyn FnMut(&ClusterView, i64) -> Decision + Send>;

fn replicated_round(v: &ClusterView, now: i64) -> Decision {
    replicated::reconcile(v, now, &mut new_task_id)
}
fn global_round(v: &ClusterView, now: i64) -> Decision {
    global::reconcile(v, now, &mut new_task_id)
}
fn restart_round(v: &ClusterView, now: i64) -> Decision {
    restart::supervise(v, now, &mut new_task_id)
}

/// A leader component: its name, what changes wake it, its decision step, its metrics.
struct Component {
    name: &'static str,
    interest: Interest,
    decide: Decide,
    metrics: crate::metrics::RoundMetrics,
}

/// The components the leader runs (a fresh set per leadership term), with the changes each
/// one's decision depends on. Task progress (ASSIGNED → RUNNING, the bulk of a deployment's
/// events) wakes only the updater, which follows new tasks starting.
fn components() -> Vec<Component> {
    use change::*;
    let mut updater = Updater::new();
    // The second name is the component's in the metrics.
    let c = |(name, metric), interest, decide: Decide| Component {
        name,
        interest,
        decide,
        metrics: crate::metrics::get().rounds(metric),
    };
    vec![
        c(
            ("replicated orchestrator", "replicated"),
            SERVICES | NODES | CLUSTER | TASK_CREATED | TASK_SETTLED,
            Box::new(replicated_round),
        ),
        c(
            ("global orchestrator", "global"),
            SERVICES | NODES | CLUSTER | TASK_CREATED | TASK_SETTLED,
            Box::new(global_round),
        ),
        c(
            ("restart supervisor", "restart"),
            SERVICES | NODES | CLUSTER | TASK_SETTLED,
            Box::new(restart_round),
        ),
        c(
            ("update orchestrator", "updater"),
            ALL,
            Box::new(move |v: &ClusterView, now: i64| updater.round(v, now, &mut new_task_id)),
        ),
        c(
            ("task reaper", "reaper"),
            SERVICES | NODES | CLUSTER | TASK_CREATED | TASK_SETTLED,
            Box::new(task_reaper::reap),
        ),
        c(
            (SCHEDULER, "scheduler"),
            NODES | CLUSTER | TASK_CREATED | TASK_SETTLED,
            Box::new(scheduler::schedule),
        ),
    ]
}

/// The scheduler's name among the components.
const SCHEDULER: &str = "scheduler";

/// Tasks wanting to run that `d`, a scheduling round over `view`, leaves pending.
fn left_pending(view: &ClusterView, d: &Decision) -> i64 {
    use crate::store::{Mutation, Object};
    use shoal_proto::v1::TaskState;
    let pending = view
        .pending_tasks()
        .filter(|t| super::view::wants_running(t))
        .count();
    let assigned = d
        .mutations
        .iter()
        .filter(|m| {
            matches!(m, Mutation::Update { object: Object::Task(t), .. }
                if t.status.as_ref().is_some_and(|s| s.state == TaskState::Assigned as i32))
        })
        .count();
    pending.saturating_sub(assigned) as i64
}

/// Sets the scheduler's pending gauge back to 0 when the leader loops end: it counts only on
/// the leader.
struct PendingOffTheLeader;

impl Drop for PendingOffTheLeader {
    fn drop(&mut self) {
        crate::metrics::get().scheduler_pending.set(0);
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A request to the view keeper: answer once every event published before the request was
/// applied to the view.
type Barrier = oneshot::Sender<()>;

/// What the components share: the view, its generation, the way to reach the view keeper.
struct Shared {
    view: Arc<RwLock<ClusterView>>,
    barriers: mpsc::UnboundedSender<Barrier>,
}

impl Shared {
    /// Waits until the view holds every event the store published before this call.
    async fn caught_up(&self) {
        let (tx, rx) = oneshot::channel();
        if self.barriers.send(tx).is_ok() {
            // The keeper ends only with the leader loops.
            let _ = rx.await;
        }
    }
}

/// Runs the orchestrators and the scheduler until `shutdown` completes. Call it when this
/// manager becomes the Raft leader and end it (complete `shutdown`, or drop the future) when it
/// stops being the leader. It starts with a full reconcile from the store, so a new leader
/// resumes where the old one stopped.
pub async fn run_leader<P: Proposer>(
    store: Store,
    proposer: P,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), LeaderRunError> {
    let _pending = PendingOffTheLeader;
    let events = store.watch();
    // A new leader's log may hold entries of earlier terms that it commits only now (a former
    // leader's creates among them): deciding before they are applied would repeat them.
    let proposer = Arc::new(proposer);
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        _ = proposer.applied(proposer.last_log_index()) => {}
        _ = &mut shutdown => return Ok(()),
    }
    let view = Arc::new(RwLock::new(crate::store::block_in_place(|| {
        ClusterView::load(&store)
    })?));
    let (generation, _) = watch::channel(0u64);
    let (barriers, barrier_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared { view, barriers });
    let mut tasks = JoinSet::new();
    for c in components() {
        tasks.spawn(component(
            c,
            shared.clone(),
            generation.subscribe(),
            proposer.clone(),
        ));
    }
    tasks.spawn(keep_view(
        store,
        events,
        shared.view.clone(),
        generation,
        barrier_rx,
    ));
    shutdown.await;
    // Dropping the set aborts every loop; a proposal in flight may still commit, which is
    // harmless: the next leader reconciles from what the store holds.
    tasks.shutdown().await;
    Ok(())
}

fn read(view: &RwLock<ClusterView>) -> std::sync::RwLockReadGuard<'_, ClusterView> {
    // A panic in a decision leaves the view as it was: nothing is written under a read lock.
    view.read().unwrap_or_else(|p| p.into_inner())
}

/// Applies watch events to the view and bumps the generation the components wait on. On a
/// lagged stream (events lost), reloads the view from the store. Answers barriers once the
/// events queued before them are in the view.
async fn keep_view(
    store: Store,
    mut events: broadcast::Receiver<crate::store::Event>,
    view: Arc<RwLock<ClusterView>>,
    generation: watch::Sender<u64>,
    mut barriers: mpsc::UnboundedReceiver<Barrier>,
) {
    let mut waiting: Vec<Barrier> = Vec::new();
    loop {
        let first = tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => Some(ev),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "leader view lagged behind the store; reloading");
                    None
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            b = barriers.recv() => match b {
                Some(b) => {
                    waiting.push(b);
                    while let Ok(b) = barriers.try_recv() {
                        waiting.push(b);
                    }
                    // Everything published before these requests is queued now: drain it.
                    match drain(&mut events, &view, Vec::new()) {
                        Drained::Done(changed) => {
                            if changed {
                                generation.send_modify(|g| *g += 1);
                            }
                            for b in waiting.drain(..) {
                                let _ = b.send(());
                            }
                            continue;
                        }
                        Drained::Lagged => None,
                    }
                }
                None => return,
            },
        };
        let lagged = match first {
            Some(ev) => matches!(drain(&mut events, &view, vec![ev]), Drained::Lagged),
            None => true,
        };
        if lagged {
            // Drop what is queued: the reload reflects it. Later events are applied on top,
            // their versions sorting out what the reload already holds.
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = events.try_recv() {}
            match crate::store::block_in_place(|| ClusterView::load(&store)) {
                Ok(fresh) => {
                    let mut v = view.write().unwrap_or_else(|p| p.into_inner());
                    *v = fresh;
                    v.note_all_changed();
                }
                Err(e) => {
                    tracing::error!(error = %e, "reloading the leader view failed; retrying");
                    tokio::time::sleep(PROPOSE_RETRY_DELAY).await;
                    continue;
                }
            }
        }
        generation.send_modify(|g| *g += 1);
        // Barriers that were waiting while a reload happened are answered by it.
        for b in waiting.drain(..) {
            let _ = b.send(());
        }
    }
}

enum Drained {
    /// Every queued event is in the view (true if there was any).
    Done(bool),
    /// Events were lost: the view must be reloaded.
    Lagged,
}

/// Applies `batch` and every event queued behind it to the view, at most
/// [`MAX_EVENTS_PER_APPLY`] under one write lock.
fn drain(
    events: &mut broadcast::Receiver<crate::store::Event>,
    view: &RwLock<ClusterView>,
    mut batch: Vec<crate::store::Event>,
) -> Drained {
    let mut any = !batch.is_empty();
    loop {
        let mut empty = false;
        while batch.len() < MAX_EVENTS_PER_APPLY {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(broadcast::error::TryRecvError::Lagged(_)) => return Drained::Lagged,
                Err(_) => {
                    empty = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            any = true;
            let apply = |batch: &mut Vec<crate::store::Event>| {
                let mut v = view.write().unwrap_or_else(|p| p.into_inner());
                for ev in batch.drain(..) {
                    v.apply_event(&ev);
                }
            };
            if batch.len() >= 256 {
                crate::store::block_in_place(|| apply(&mut batch));
            } else {
                apply(&mut batch);
            }
        }
        if empty {
            return Drained::Done(any);
        }
    }
}

/// What proposing one decision came to.
#[derive(Default)]
struct Outcome {
    /// Some command was refused by the store (a conflict: the view was behind).
    refused: bool,
    /// Raft did not answer a command: its outcome is unknown (it may still commit).
    failed: bool,
}

async fn propose_all<P: Proposer>(name: &str, proposer: &P, d: Decision, now: i64) -> Outcome {
    let mut out = Outcome::default();
    for cmd in d.into_commands_within(now, MAX_COMMAND_MUTATIONS, MAX_COMMAND_BYTES) {
        let n = cmd.mutations.len();
        match proposer.propose(cmd).await {
            Ok(resp) => {
                if let Err(e) = resp.result {
                    tracing::debug!(component = name, mutations = n, error = %e, "command refused; will retry");
                    out.refused = true;
                }
            }
            Err(e) => {
                tracing::debug!(component = name, error = %e, "proposal failed");
                out.failed = true;
                break;
            }
        }
    }
    out
}

/// One component's loop: wait for a change it is interested in (or a deadline), batch,
/// decide, propose, and wait until the view holds the outcome before deciding again.
async fn component<P: Proposer>(
    mut c: Component,
    shared: Arc<Shared>,
    mut generation: watch::Receiver<u64>,
    proposer: Arc<P>,
) {
    // The first round runs at once: a full reconcile of what the store holds.
    let mut next: Option<Instant> = Some(Instant::now());
    let mut seen = None;
    let mut gap = BATCH_WINDOW;
    let mut last_round = Instant::now();
    loop {
        let deadline = next.unwrap_or_else(|| Instant::now() + RESYNC_PERIOD);
        let woken_by_change = tokio::select! {
            changed = generation.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            _ = tokio::time::sleep_until(deadline) => false,
        };
        if woken_by_change {
            let relevant = seen.is_none_or(|s| read(&shared.view).changes().since(&s, c.interest));
            if !relevant {
                continue;
            }
            tokio::time::sleep_until((last_round + gap).max(Instant::now() + BATCH_WINDOW)).await;
        }
        generation.borrow_and_update();
        let now = now_ms();
        let started = Instant::now();
        let decision = crate::store::block_in_place(|| {
            let view = read(&shared.view);
            seen = Some(view.changes());
            let d = (c.decide)(&view, now);
            if c.name == SCHEDULER {
                crate::metrics::get()
                    .scheduler_pending
                    .set(left_pending(&view, &d));
            }
            d
        });
        last_round = Instant::now();
        c.metrics
            .seconds
            .observe((last_round - started).as_secs_f64());
        c.metrics.decisions.inc_by(decision.mutations.len() as u64);
        gap = (last_round - started)
            .saturating_mul(ROUND_SPACING)
            .clamp(BATCH_WINDOW, MAX_ROUND_GAP);
        // A far wake-up (a held task's not_before) is capped: the resync round covers it.
        next = decision.wake_at_ms.map(|at| {
            let wait = Duration::from_millis(at.saturating_sub(now).max(0) as u64);
            Instant::now() + wait.min(RESYNC_PERIOD)
        });
        if decision.mutations.is_empty() {
            continue;
        }
        let outcome = propose_all(c.name, proposer.as_ref(), decision, now).await;
        if outcome.failed {
            // The last proposal may still commit (a timeout while Raft struggles): deciding
            // from a view without it would propose the same writes again (CHAOS.md finding 4).
            // Wait until everything this leader's log holds is applied, so the view reflects
            // the proposal or it is known never to apply.
            let index = proposer.last_log_index();
            proposer.applied(index).await;
            shared.caught_up().await;
            next = Some(Instant::now() + PROPOSE_RETRY_DELAY);
            continue;
        }
        // Decide again once our own writes are in the view: a write may enable the next step,
        // and a refusal means the view was behind. Applied commands published their events
        // before their answers came back, so one barrier is enough.
        shared.caught_up().await;
        next = Some(if outcome.refused {
            Instant::now() + REFUSED_RETRY_DELAY
        } else {
            Instant::now()
        });
    }
}
