//! CHAOS.md finding 4: a proposal whose outcome is unknown (Raft answered with an error, e.g.
//! a timeout, but the entry is in the log and commits later) must not be decided again from a
//! view that does not hold it yet. `run_leader` runs over a real store behind a proposer whose
//! every answer is lost: each command gets the next log index, is applied a while later, and
//! the caller gets an error at once. The replicated orchestrator must create each slot's task
//! exactly once.

use crate::orchestrator_support;
use orchestrator_support::{ready_node, replicated_service};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_manager::orchestrator::{run_leader, ProposeError, Proposer};
use shoal_manager::store::{Command, Mutation, Object, Response, Store};
use tokio::sync::{mpsc, oneshot, watch};

/// How long after a proposal its entry is applied: longer than the runner's retry pause
/// (200 ms), so a runner that re-decides after the pause sees a view without its creates.
const APPLY_DELAY: Duration = Duration::from_millis(600);
/// Bound on waiting for the service's tasks.
const CONVERGE: Duration = Duration::from_secs(15);

/// A Raft whose answers all get lost: entries are appended in order, applied after
/// `APPLY_DELAY`, and every proposer is told the proposal failed.
struct LostAnswers {
    last_index: Arc<AtomicU64>,
    log: mpsc::UnboundedSender<(u64, Command)>,
    applied: watch::Receiver<u64>,
    proposals: Arc<AtomicUsize>,
}

impl LostAnswers {
    /// Starts the applier over `store`, the next index after `first_index - 1`. Returns the
    /// proposer and a counter of task creates the store accepted.
    fn start(store: Store, first_index: u64) -> (LostAnswers, Arc<AtomicUsize>) {
        let (log, mut rx) = mpsc::unbounded_channel::<(u64, Command)>();
        let (applied_tx, applied) = watch::channel(first_index - 1);
        let creates = Arc::new(AtomicUsize::new(0));
        let counted = creates.clone();
        tokio::spawn(async move {
            while let Some((index, cmd)) = rx.recv().await {
                tokio::time::sleep(APPLY_DELAY).await;
                let resp = store.apply(index, &cmd);
                if resp.result.is_ok() {
                    let n = cmd
                        .mutations
                        .iter()
                        .filter(|m| matches!(m, Mutation::Create(Object::Task(_))))
                        .count();
                    counted.fetch_add(n, Ordering::SeqCst);
                }
                applied_tx.send_replace(index);
            }
        });
        (
            LostAnswers {
                last_index: Arc::new(AtomicU64::new(first_index - 1)),
                log,
                applied,
                proposals: Arc::new(AtomicUsize::new(0)),
            },
            creates,
        )
    }
}

impl Proposer for LostAnswers {
    async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        self.proposals.fetch_add(1, Ordering::SeqCst);
        let index = self.last_index.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.log.send((index, cmd));
        Err(ProposeError::Failed("timeout: no answer in time".into()))
    }

    fn last_log_index(&self) -> u64 {
        self.last_index.load(Ordering::SeqCst)
    }

    async fn applied(&self, index: u64) {
        let mut rx = self.applied.clone();
        let _ = rx.wait_for(|a| *a >= index).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_is_not_proposed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .unwrap();
    let store = Store::open(&db).unwrap();
    for (i, m) in [
        Mutation::Create(Object::Node(ready_node("n1"))),
        Mutation::Create(Object::Service(replicated_service("web", 3))),
    ]
    .into_iter()
    .enumerate()
    {
        let resp = store.apply(
            i as u64 + 1,
            &Command {
                now_ms: 1,
                mutations: vec![m],
            },
        );
        resp.result.unwrap();
    }
    let (proposer, creates) = LostAnswers::start(store.clone(), 3);
    let proposals = proposer.proposals.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let leader = tokio::spawn(run_leader(store.clone(), proposer, async move {
        let _ = stopped.await;
    }));

    // The creates land, then the scheduler's assignments (also unanswered) on top.
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let assigned = store
            .tasks_by_service("web")
            .unwrap()
            .iter()
            .filter(|t| !t.node_id.is_empty())
            .count();
        if assigned >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "web's tasks were not created and assigned within {CONVERGE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several more retry pauses: a runner deciding from a stale view would have proposed the
    // creates again by now.
    tokio::time::sleep(APPLY_DELAY * 3).await;
    let _ = stop.send(());
    leader.await.unwrap().unwrap();

    assert_eq!(
        creates.load(Ordering::SeqCst),
        3,
        "one create per slot, whatever the lost answers"
    );
    let tasks = store.tasks_by_service("web").unwrap();
    let mut slots: Vec<u64> = tasks.iter().map(|t| t.slot).collect();
    slots.sort();
    assert_eq!(slots, vec![1, 2, 3], "one task per slot: {tasks:?}");
    assert!(
        proposals.load(Ordering::SeqCst) >= 2,
        "the creates and the scheduler's assignments were proposed"
    );
}
