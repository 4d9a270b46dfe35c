//! The restart supervisor: a task that should run but ended (complete, shutdown it was not
//! asked for, failed, rejected) is replaced by a new task in the same slot (or on the same node
//! for a global service), when the task's restart policy allows it.
//!
//! The old task gets desired SHUTDOWN and the replacement is created in the same command, so a
//! slot never has two tasks that should run. A restart delay is kept in the replacement's
//! `not_before_ms` (the scheduler waits for it); the restart times of the slot travel in
//! `restart_history_ms`, so max attempts within the window hold across leader changes. When
//! the policy says no, the ended task stays as it is, occupying its slot.

use shoal_proto::v1::{RestartCondition, RestartPolicy, Task, TaskState};

use super::view::{is_terminal, state, wants_running, ClusterView};
use super::{create, new_task, update, with_desired, Decision};

/// Restart times kept per slot when the policy has no max attempts (only the count within the
/// window matters, and only up to max attempts).
pub const MAX_RESTART_HISTORY: usize = 32;

/// True if the policy allows replacing `t`, which ended, at `now_ms`.
pub fn should_restart(policy: &RestartPolicy, t: &Task, now_ms: i64) -> bool {
    let failed = !(state(t) == TaskState::Complete as i32
        && t.status.as_ref().is_none_or(|s| s.exit_code == 0));
    let condition = match RestartCondition::try_from(policy.condition) {
        Ok(RestartCondition::Any) => true,
        Ok(RestartCondition::OnFailure) => failed,
        Ok(RestartCondition::None) | Err(_) => false,
    };
    if !condition {
        return false;
    }
    if policy.max_attempts == 0 {
        return true;
    }
    let window = policy.window_ms as i64;
    let attempts = t
        .restart_history_ms
        .iter()
        .filter(|at| window == 0 || **at > now_ms - window)
        .count() as u64;
    attempts < policy.max_attempts
}

/// One round: replace every ended task that should run and may be restarted.
pub fn supervise(view: &ClusterView, now_ms: i64, ids: &mut dyn FnMut() -> String) -> Decision {
    let mut d = Decision::default();
    for t in view.tasks.values() {
        if !wants_running(t) || !is_terminal(t) {
            continue;
        }
        let Some(service) = view.services.get(&t.service_id) else {
            continue;
        };
        let policy = t.spec.as_ref().and_then(|s| s.restart).unwrap_or_default();
        if !should_restart(&policy, t, now_ms) {
            continue;
        }
        let node_id = if t.slot == 0 { t.node_id.as_str() } else { "" };
        let mut replacement = new_task(service, t.slot, node_id, ids(), now_ms);
        let keep = if policy.max_attempts == 0 {
            MAX_RESTART_HISTORY
        } else {
            (policy.max_attempts as usize).min(MAX_RESTART_HISTORY)
        };
        let mut history = t.restart_history_ms.clone();
        history.push(now_ms);
        let drop = history.len().saturating_sub(keep);
        history.drain(..drop);
        replacement.restart_history_ms = history;
        if policy.delay_ms > 0 {
            replacement.not_before_ms = now_ms + policy.delay_ms as i64;
            if let Some(s) = replacement.status.as_mut() {
                s.message = format!("restart delayed {} ms", policy.delay_ms);
            }
        }
        d.push_group(vec![
            update(t, with_desired(t, TaskState::Shutdown)),
            create(replacement),
        ]);
    }
    d
}
