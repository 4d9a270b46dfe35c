//! Task status reports from agents, batched into Raft writes; forward transitions only.

use std::collections::HashMap;
use std::sync::Arc;

use shoal_proto::v1::{Task, TaskState, TaskStatus};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

use super::{Backend, Inner, ProposeError, STATUS_COMMAND_BYTES, STATUS_WRITE_RETRIES};
#[cfg(doc)]
use super::{STATUS_BATCH_MAX, STATUS_BATCH_WINDOW};
use crate::controlapi::now_ms;
use crate::store::{Command, Mutation, Object, Store, StoreError};

/// A command's own bytes around its mutations (time, length).
const COMMAND_FRAME_BYTES: usize = 16;

/// One `UpdateTaskStatus` call waiting for its batch.
pub(super) struct StatusRequest {
    pub node_id: String,
    pub updates: Vec<(String, TaskStatus)>,
    pub done: oneshot::Sender<Result<(), Status>>,
}

/// Collects calls for up to the cluster's batching window or updates per batch (default
/// [`STATUS_BATCH_WINDOW`], [`STATUS_BATCH_MAX`]), writes them as one command (several when
/// their bytes need it), then answers every call of the batch.
pub(super) async fn batcher<B: Backend>(
    inner: Arc<Inner<B>>,
    mut rx: mpsc::Receiver<StatusRequest>,
) {
    while let Some(first) = rx.recv().await {
        let timers = super::Timers::of(&inner.store);
        let deadline = Instant::now() + timers.status_batch_window;
        let mut count = first.updates.len();
        let mut batch = vec![first];
        while count < timers.status_batch_max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    count += r.updates.len();
                    batch.push(r);
                }
                Ok(None) | Err(_) => break,
            }
        }
        crate::metrics::get().status_batch.observe(count as f64);
        let result = write(&inner, &batch).await;
        if let Err(e) = &result {
            // The agents retry; say why here, where it can be seen.
            tracing::warn!(updates = count, "status batch not written: {}", e.message());
        }
        for r in batch {
            let _ = r.done.send(result.clone());
        }
    }
}

/// The best report per task: the furthest state wins; among equal states, the last one.
fn merge(batch: &[StatusRequest]) -> HashMap<&str, (&str, &TaskStatus)> {
    let mut best: HashMap<&str, (&str, &TaskStatus)> = HashMap::new();
    for r in batch {
        for (id, st) in &r.updates {
            match best.get(id.as_str()) {
                Some((_, cur)) if cur.state > st.state => {}
                _ => {
                    best.insert(id.as_str(), (r.node_id.as_str(), st));
                }
            }
        }
    }
    best
}

/// The task updates that move a task forward, from a fresh read of the store.
pub(super) fn forward_updates(
    store: &Store,
    reports: &HashMap<&str, (&str, &TaskStatus)>,
) -> Result<Vec<Mutation>, StoreError> {
    let mut ids: Vec<&&str> = reports.keys().collect();
    // A deterministic order keeps commands comparable between retries and replicas' logs.
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        let (node, st) = reports[*id];
        let Some(task) = store.get_task(id)? else {
            continue;
        };
        if let Some(t) = apply_report(&task, node, st) {
            let version = t.meta.as_ref().map_or(0, |m| m.version);
            out.push(Mutation::Update {
                object: Object::Task(t),
                expect_version: Some(version),
            });
        }
    }
    Ok(out)
}

/// `task` with the report applied, if the report is from the task's node and moves its state
/// forward, tells what a PREPARING task is doing now ("pulling …"), or tells that a RUNNING
/// task's health changed; `None` for stale, duplicate or misdirected reports.
pub fn apply_report(task: &Task, node_id: &str, status: &TaskStatus) -> Option<Task> {
    if task.node_id != node_id {
        return None;
    }
    let (current, message, health) = task
        .status
        .as_ref()
        .map_or((0, "", 0), |s| (s.state, s.message.as_str(), s.health));
    let note = status.state == current
        && current == TaskState::Preparing as i32
        && status.message != message;
    let health_changed =
        status.state == current && current == TaskState::Running as i32 && status.health != health;
    if status.state < current || (status.state == current && !note && !health_changed) {
        return None;
    }
    let mut t = task.clone();
    t.status = Some(status.clone());
    Some(t)
}

async fn write<B: Backend>(inner: &Inner<B>, batch: &[StatusRequest]) -> Result<(), Status> {
    inner
        .backend
        .caught_up()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let reports = merge(batch);
    let mut last = String::new();
    'retry: for _ in 0..STATUS_WRITE_RETRIES {
        let mutations = crate::store::block_in_place(|| forward_updates(&inner.store, &reports))
            .map_err(|e| Status::internal(format!("reading tasks: {e}")))?;
        if mutations.is_empty() {
            return Ok(());
        }
        for mutations in within_budget(mutations, STATUS_COMMAND_BYTES) {
            let resp = inner
                .backend
                .propose(Command {
                    now_ms: now_ms(),
                    mutations,
                })
                .await
                .map_err(|e| match e {
                    ProposeError::NotLeader => {
                        Status::unavailable("this manager lost leadership; open a new session")
                    }
                    ProposeError::Failed(m) => Status::unavailable(m),
                })?;
            match resp.result {
                Ok(_) => {}
                // Someone else wrote one of the tasks meanwhile (the orchestrator raising a
                // desired state): read again and redo what is still forward (the updates
                // already written are no longer).
                Err(e @ StoreError::VersionConflict { .. }) => {
                    last = e.to_string();
                    continue 'retry;
                }
                Err(e) => return Err(Status::internal(format!("status write refused: {e}"))),
            }
        }
        return Ok(());
    }
    Err(Status::unavailable(format!(
        "status write kept conflicting: {last}"
    )))
}

/// `mutations` in order, cut into commands whose encoding stays within `budget` bytes: a
/// batch of reports on tasks with large specs becomes several Raft entries, never one over
/// the entry bound. (Each update stands alone, so the batch need not be atomic.) A mutation
/// larger than the budget goes alone.
pub(super) fn within_budget(mutations: Vec<Mutation>, budget: usize) -> Vec<Vec<Mutation>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = COMMAND_FRAME_BYTES;
    for m in mutations {
        let b = m.encoded_bytes();
        if !current.is_empty() && bytes + b > budget {
            out.push(std::mem::take(&mut current));
            bytes = COMMAND_FRAME_BYTES;
        }
        bytes += b;
        current.push(m);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState, message: &str) -> Task {
        Task {
            node_id: "n1".into(),
            status: Some(TaskStatus {
                state: state as i32,
                message: message.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn report(state: TaskState, message: &str) -> TaskStatus {
        TaskStatus {
            state: state as i32,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn reports_move_forward_and_a_preparing_task_may_say_what_it_does() {
        let t = task(TaskState::Preparing, "preparing");
        let pulled = apply_report(&t, "n1", &report(TaskState::Preparing, "pulling app:1"))
            .expect("a note while preparing");
        assert_eq!(pulled.status.unwrap().message, "pulling app:1");
        // The same note again, an older state, another node, a note in another state: no.
        let t = task(TaskState::Preparing, "pulling app:1");
        assert!(apply_report(&t, "n1", &report(TaskState::Preparing, "pulling app:1")).is_none());
        assert!(apply_report(&t, "n1", &report(TaskState::Accepted, "accepted")).is_none());
        assert!(apply_report(&t, "n2", &report(TaskState::Ready, "prepared")).is_none());
        let r = task(TaskState::Running, "started");
        assert!(apply_report(&r, "n1", &report(TaskState::Running, "other")).is_none());
        assert!(apply_report(&t, "n1", &report(TaskState::Ready, "prepared")).is_some());
    }

    #[test]
    fn a_batch_on_large_tasks_is_cut_into_commands_within_the_budget() {
        let big = |i: usize| {
            let mut t = task(TaskState::Running, "started");
            t.meta = Some(shoal_proto::v1::Meta {
                id: format!("t{i}"),
                ..Default::default()
            });
            t.service_name = "x".repeat(STATUS_COMMAND_BYTES / 3);
            Mutation::Update {
                object: Object::Task(t),
                expect_version: Some(1),
            }
        };
        let muts: Vec<Mutation> = (0..7).map(big).collect();
        let cmds = within_budget(muts.clone(), STATUS_COMMAND_BYTES);
        assert_eq!(cmds.len(), 4, "two tasks of a third each per command");
        assert_eq!(cmds.concat(), muts, "every update, in order");
        for c in cmds {
            let cmd = Command {
                now_ms: 1,
                mutations: c,
            };
            assert!(cmd.encoded_bytes() <= STATUS_COMMAND_BYTES);
            assert!(cmd.encoded_bytes() <= crate::raft::MAX_ENTRY_BYTES);
        }
        // Small ones share one command.
        let small: Vec<Mutation> = (0..100)
            .map(|_| Mutation::Update {
                object: Object::Task(task(TaskState::Running, "started")),
                expect_version: Some(1),
            })
            .collect();
        assert_eq!(within_budget(small, STATUS_COMMAND_BYTES).len(), 1);
    }

    #[test]
    fn a_running_task_may_report_a_change_of_its_health() {
        use shoal_proto::v1::HealthState;
        let with = |h: HealthState| TaskStatus {
            health: h as i32,
            ..report(TaskState::Running, "started")
        };
        let mut t = task(TaskState::Running, "started");
        t.status = Some(with(HealthState::Starting));
        let healthy = apply_report(&t, "n1", &with(HealthState::Healthy)).expect("a change");
        assert_eq!(healthy.status.unwrap().health, HealthState::Healthy as i32);
        // The same health again, or from another node: nothing to write.
        assert!(apply_report(&t, "n1", &with(HealthState::Starting)).is_none());
        assert!(apply_report(&t, "n2", &with(HealthState::Healthy)).is_none());
        // A health change never moves a finished task back.
        let done = task(TaskState::Failed, "failed");
        assert!(apply_report(&done, "n1", &with(HealthState::Healthy)).is_none());
    }
}
