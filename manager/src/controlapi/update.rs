//! The control API's part of rolling updates: checking update and rollback configs, recording
//! that an update starts (or resumes) when a service's task spec changes, and the manual
//! rollback. The update orchestrator (`orchestrator::updater`) does the rest from the store.

use shoal_proto::v1 as pb;
use shoal_proto::v1::{FailureAction, UpdateOrder, UpdateState};

use super::validate::{Invalid, MAX_TIMER_MS};

/// Checks the update and rollback configs of a spec: known failure actions and orders (a
/// rollback's failure action is pause or continue), a failure ratio in 0..=1, sane durations.
pub fn check_configs(spec: &pb::ServiceSpec) -> Result<(), Invalid> {
    for (what, u) in [("update", &spec.update), ("rollback", &spec.rollback)] {
        let Some(u) = u else { continue };
        let action = FailureAction::try_from(u.failure_action).map_err(|_| {
            Invalid(format!(
                "invalid {what} failure action {}: expected pause, continue or rollback",
                u.failure_action
            ))
        })?;
        if what == "rollback" && action == FailureAction::Rollback {
            return Err(Invalid(
                "invalid rollback failure action rollback: a rollback is never rolled back (pause or continue)"
                    .into(),
            ));
        }
        if UpdateOrder::try_from(u.order).is_err() {
            return Err(Invalid(format!(
                "invalid {what} order {}: expected stop-first or start-first",
                u.order
            )));
        }
        if !(0.0..=1.0).contains(&u.max_failure_ratio) {
            return Err(Invalid(format!(
                "{what} max failure ratio must be between 0 and 1"
            )));
        }
        for (name, ms) in [("delay", u.delay_ms), ("monitor", u.monitor_ms)] {
            if ms > MAX_TIMER_MS {
                return Err(Invalid(format!(
                    "{what} {name} of {ms} ms is longer than the limit of {MAX_TIMER_MS} ms"
                )));
            }
        }
    }
    Ok(())
}

/// Records on `next` (the service about to be written with `spec`) that an update starts: when
/// the task spec changed, or when an update was paused (another `service update` resumes it).
pub fn on_update(current: &pb::Service, next: &mut pb::Service, now_ms: i64) {
    let old_task = current.spec.as_ref().and_then(|s| s.task.as_ref());
    let new_task = next.spec.as_ref().and_then(|s| s.task.as_ref());
    let paused = matches!(
        current.update_status.as_ref().map(|u| u.state()),
        Some(UpdateState::Paused | UpdateState::RollbackPaused)
    );
    if old_task != new_task || paused {
        next.update_status = Some(pb::UpdateStatus {
            state: UpdateState::Updating as i32,
            started_at_ms: now_ms,
            completed_at_ms: 0,
            message: "update in progress".into(),
        });
    }
}

/// Why a manual rollback is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RollbackError {
    #[error("service {0} has no previous spec to roll back to")]
    NoPreviousSpec(String),
    #[error("service {0} is already rolling back")]
    InProgress(String),
}

/// The service after a manual rollback: the previous spec swapped in, ROLLBACK_STARTED.
pub fn rollback(current: &pb::Service, now_ms: i64) -> Result<pb::Service, RollbackError> {
    let name = current
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    if current.previous_spec.is_none() {
        return Err(RollbackError::NoPreviousSpec(name));
    }
    if current
        .update_status
        .as_ref()
        .is_some_and(|u| u.state() == UpdateState::RollbackStarted)
    {
        return Err(RollbackError::InProgress(name));
    }
    let mut next = current.clone();
    next.previous_spec = next.spec.take();
    next.spec = current.previous_spec.clone();
    // A new spec: the store stamps this write's version.
    next.spec_version = 0;
    next.update_status = Some(pb::UpdateStatus {
        state: UpdateState::RollbackStarted as i32,
        started_at_ms: now_ms,
        completed_at_ms: 0,
        message: "manually requested rollback".into(),
    });
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(image: &str) -> pb::Service {
        pb::Service {
            spec: Some(pb::ServiceSpec {
                name: "web".into(),
                task: Some(pb::TaskSpec {
                    container: Some(pb::ContainerSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            spec_version: 7,
            ..Default::default()
        }
    }

    #[test]
    fn configs_are_checked_one_line_each() {
        let mut spec = service("a").spec.unwrap();
        let ok = pb::UpdateConfig {
            parallelism: 2,
            monitor_ms: 1_000,
            ..Default::default()
        };
        spec.update = Some(ok);
        spec.rollback = Some(ok);
        assert_eq!(check_configs(&spec), Ok(()));
        let mut bad = spec.clone();
        bad.rollback = Some(pb::UpdateConfig {
            failure_action: FailureAction::Rollback as i32,
            ..ok
        });
        assert!(check_configs(&bad)
            .unwrap_err()
            .0
            .contains("never rolled back"));
        let mut bad = spec.clone();
        bad.update = Some(pb::UpdateConfig {
            max_failure_ratio: 1.5,
            ..ok
        });
        assert_eq!(
            check_configs(&bad).unwrap_err().0,
            "update max failure ratio must be between 0 and 1"
        );
        let mut bad = spec.clone();
        bad.update = Some(pb::UpdateConfig {
            max_failure_ratio: f32::NAN,
            ..ok
        });
        assert!(check_configs(&bad).is_err());
        let mut bad = spec.clone();
        bad.update = Some(pb::UpdateConfig { order: 9, ..ok });
        assert!(check_configs(&bad).unwrap_err().0.contains("order 9"));
        let mut bad = spec;
        bad.update = Some(pb::UpdateConfig {
            monitor_ms: MAX_TIMER_MS + 1,
            ..ok
        });
        assert!(check_configs(&bad)
            .unwrap_err()
            .0
            .starts_with("update monitor"));
    }

    #[test]
    fn a_task_spec_change_or_a_paused_update_starts_an_update() {
        let cur = service("a");
        let mut next = service("b");
        on_update(&cur, &mut next, 5);
        let st = next.update_status.clone().unwrap();
        assert_eq!((st.state(), st.started_at_ms), (UpdateState::Updating, 5));

        // Only the replicas (not the task spec): no update.
        let mut next = service("a");
        on_update(&cur, &mut next, 5);
        assert!(next.update_status.is_none());

        // A paused update resumes with any update.
        let mut paused = service("a");
        paused.update_status = Some(pb::UpdateStatus {
            state: UpdateState::Paused as i32,
            ..Default::default()
        });
        let mut next = paused.clone();
        on_update(&paused, &mut next, 9);
        assert_eq!(next.update_status.unwrap().state(), UpdateState::Updating);
    }

    #[test]
    fn rollback_swaps_the_specs_and_refuses_what_it_cannot_do() {
        assert_eq!(
            rollback(&service("a"), 1),
            Err(RollbackError::NoPreviousSpec("web".into()))
        );
        let mut s = service("b");
        s.previous_spec = service("a").spec;
        let r = rollback(&s, 3).unwrap();
        assert_eq!(r.spec, service("a").spec);
        assert_eq!(r.previous_spec, service("b").spec);
        assert_eq!(r.spec_version, 0);
        let st = r.update_status.clone().unwrap();
        assert_eq!(st.state(), UpdateState::RollbackStarted);
        assert_eq!(st.message, "manually requested rollback");
        assert_eq!(
            rollback(&r, 4),
            Err(RollbackError::InProgress("web".into()))
        );
    }
}
