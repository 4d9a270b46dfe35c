//! The leader's loops: one keeps the shared [`ClusterView`] current from the store's watch
//! stream; one per component (replicated, global, restart, updater, reaper, scheduler) waits for the
//! view to change, lets a short batch window pass, decides over the view and proposes the
//! result through Raft.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::updater::Updater;
use super::view::ClusterView;
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
/// After a proposal, how long a component waits for its own writes to reach the view before
/// deciding again (deciding on a view without them would repeat them).
pub const VIEW_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
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

/// The components the leader runs, by name (a fresh set per leadership term).
fn components() -> Vec<(&'static str, Decide)> {
    let mut updater = Updater::new();
    vec![
        ("replicated orchestrator", Box::new(replicated_round)),
        ("global orchestrator", Box::new(global_round)),
        ("restart supervisor", Box::new(restart_round)),
        (
            "update orchestrator",
            Box::new(move |v: &ClusterView, now: i64| updater.round(v, now, &mut new_task_id)),
        ),
        ("task reaper", Box::new(task_reaper::reap)),
        ("scheduler", Box::new(scheduler::schedule)),
    ]
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    let events = store.watch();
    let view = Arc::new(RwLock::new(ClusterView::load(&store)?));
    let (generation, _) = watch::channel(0u64);
    let proposer = Arc::new(proposer);
    let mut tasks = JoinSet::new();
    for (name, decide) in components() {
        tasks.spawn(component(
            name,
            decide,
            view.clone(),
            generation.subscribe(),
            proposer.clone(),
        ));
    }
    tasks.spawn(keep_view(store, events, view, generation));
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
/// lagged stream (events lost), reloads the view from the store.
async fn keep_view(
    store: Store,
    mut events: broadcast::Receiver<crate::store::Event>,
    view: Arc<RwLock<ClusterView>>,
    generation: watch::Sender<u64>,
) {
    loop {
        let first = match events.recv().await {
            Ok(ev) => Some(ev),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "leader view lagged behind the store; reloading");
                None
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let mut reload = first.is_none();
        let mut batch: Vec<crate::store::Event> = first.into_iter().collect();
        while !reload && batch.len() < MAX_EVENTS_PER_APPLY {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(broadcast::error::TryRecvError::Lagged(_)) => reload = true,
                Err(_) => break,
            }
        }
        if reload {
            // Drop what is queued: the reload reflects it. Later events are applied on top,
            // their versions sorting out what the reload already holds.
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = events.try_recv() {}
            match ClusterView::load(&store) {
                Ok(fresh) => {
                    let mut v = view.write().unwrap_or_else(|p| p.into_inner());
                    let applied = v.applied();
                    *v = fresh;
                    v.note_applied(applied);
                }
                Err(e) => {
                    tracing::error!(error = %e, "reloading the leader view failed; retrying");
                    tokio::time::sleep(PROPOSE_RETRY_DELAY).await;
                    continue;
                }
            }
        } else {
            let mut v = view.write().unwrap_or_else(|p| p.into_inner());
            for ev in &batch {
                v.apply_event(ev);
            }
        }
        generation.send_modify(|g| *g += 1);
    }
}

/// What proposing one decision came to.
#[derive(Default)]
struct Outcome {
    /// Highest raft index of an applied command.
    applied: u64,
    /// Some command was refused by the store (a conflict: the view was behind).
    refused: bool,
    /// Raft did not take a command.
    failed: bool,
}

async fn propose_all<P: Proposer>(name: &str, proposer: &P, d: Decision, now: i64) -> Outcome {
    let mut out = Outcome::default();
    for cmd in d.into_commands(now, MAX_COMMAND_MUTATIONS) {
        let n = cmd.mutations.len();
        match proposer.propose(cmd).await {
            Ok(resp) => match resp.result {
                Ok(versions) => {
                    out.applied = out.applied.max(versions.into_iter().max().unwrap_or(0));
                }
                Err(e) => {
                    tracing::debug!(component = name, mutations = n, error = %e, "command refused; will retry");
                    out.refused = true;
                }
            },
            Err(e) => {
                tracing::debug!(component = name, error = %e, "proposal failed");
                out.failed = true;
                break;
            }
        }
    }
    out
}

/// One component's loop: wait for a change (or a deadline), batch, decide, propose.
async fn component<P: Proposer>(
    name: &'static str,
    mut decide: Decide,
    view: Arc<RwLock<ClusterView>>,
    mut generation: watch::Receiver<u64>,
    proposer: Arc<P>,
) {
    // The first round runs at once: a full reconcile of what the store holds.
    let mut next: Option<Instant> = Some(Instant::now());
    loop {
        let deadline = next.unwrap_or_else(|| Instant::now() + RESYNC_PERIOD);
        tokio::select! {
            changed = generation.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(BATCH_WINDOW).await;
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
        generation.borrow_and_update();
        let now = now_ms();
        let decision = decide(&read(&view), now);
        // A far wake-up (a held task's not_before) is capped: the resync round covers it.
        next = decision.wake_at_ms.map(|at| {
            let wait = Duration::from_millis(at.saturating_sub(now).max(0) as u64);
            Instant::now() + wait.min(RESYNC_PERIOD)
        });
        if decision.mutations.is_empty() {
            continue;
        }
        let outcome = propose_all(name, proposer.as_ref(), decision, now).await;
        if outcome.failed {
            next = Some(Instant::now() + PROPOSE_RETRY_DELAY);
            continue;
        }
        // Decide again once our own writes are in the view: a write may enable the next step,
        // and a refusal means the view was behind.
        let until = Instant::now() + VIEW_CATCH_UP_TIMEOUT;
        while read(&view).applied() < outcome.applied {
            if tokio::time::timeout_at(until, generation.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                break;
            }
        }
        next = Some(if outcome.refused {
            Instant::now() + REFUSED_RETRY_DELAY
        } else {
            Instant::now()
        });
    }
}
