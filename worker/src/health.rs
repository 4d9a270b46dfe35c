//! Health checks of running tasks, docker's way: which check a task runs (its spec's over its
//! image's HEALTHCHECK, field by field), and the state it leads to (starting → healthy |
//! unhealthy). The controller runs the checks (docs/design/health.md).

use std::time::{Duration, Instant};

use shoal_proto::v1::{HealthCheck, HealthState};

/// Docker's defaults for a zero (unset) timer or retry count.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRIES: u32 = 3;
/// Output of one check kept for the task's status (docker keeps 4096 bytes in its health log;
/// shoal's goes through Raft with the status, so less).
pub const MAX_OUTPUT: usize = 2048;
const _: () = assert!(MAX_OUTPUT <= shoal_proto::limits::MAX_STATUS_TEXT_BYTES);

/// A check to run: the argv and its timers, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub argv: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub retries: u32,
}

/// The check a task runs: the spec's fields over the image's (an empty test or a zero timer
/// inherits), then docker's defaults. `None`: no check (none given, or `["NONE"]`). An unknown
/// test type is an error (the control API refuses it in a spec; an image may carry one).
pub fn effective(
    spec: Option<&HealthCheck>,
    image: Option<&HealthCheck>,
) -> Result<Option<Check>, String> {
    let none = HealthCheck::default();
    let (s, i) = (spec.unwrap_or(&none), image.unwrap_or(&none));
    let test = if s.test.is_empty() { &i.test } else { &s.test };
    let argv = match test.split_first() {
        None => return Ok(None),
        Some((kind, _)) if kind == "NONE" => return Ok(None),
        Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => rest.to_vec(),
        Some((kind, rest)) if kind == "CMD-SHELL" && !rest.is_empty() => {
            vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]
        }
        Some((kind, _)) => return Err(format!("invalid health check test {kind:?}")),
    };
    let ms = |a: u64, b: u64, default: Duration| match (a, b) {
        (0, 0) => default,
        (0, b) => Duration::from_millis(b),
        (a, _) => Duration::from_millis(a),
    };
    Ok(Some(Check {
        argv,
        interval: ms(s.interval_ms, i.interval_ms, DEFAULT_INTERVAL),
        timeout: ms(s.timeout_ms, i.timeout_ms, DEFAULT_TIMEOUT),
        start_period: ms(s.start_period_ms, i.start_period_ms, Duration::ZERO),
        retries: match (s.retries, i.retries) {
            (0, 0) => DEFAULT_RETRIES,
            (0, r) | (r, _) => r,
        },
    }))
}

/// Docker's state rules over the results of one container's checks: starting until a check
/// passes; within the start period failures do not count while still starting; `retries`
/// failures in a row make it unhealthy; one pass makes it healthy again.
#[derive(Clone, Debug)]
pub struct Tracker {
    started: Instant,
    start_period: Duration,
    retries: u32,
    state: HealthState,
    failing_streak: u32,
}

impl Tracker {
    /// A container started at `started`, checked with `check`, in state `state` (STARTING
    /// for a new one; what was reported for one adopted after an agent restart).
    pub fn new(check: &Check, started: Instant, state: HealthState) -> Tracker {
        let state = match state {
            HealthState::None => HealthState::Starting,
            s => s,
        };
        Tracker {
            started,
            start_period: check.start_period,
            retries: check.retries.max(1),
            state,
            failing_streak: 0,
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Failed checks in a row.
    pub fn failing_streak(&self) -> u32 {
        self.failing_streak
    }

    /// Records the result of a check that began at `at`; the new state if it changed.
    pub fn record(&mut self, passed: bool, at: Instant) -> Option<HealthState> {
        let before = self.state;
        if passed {
            self.failing_streak = 0;
            self.state = HealthState::Healthy;
        } else {
            let in_start_period = self.state == HealthState::Starting
                && at.saturating_duration_since(self.started) < self.start_period;
            if !in_start_period {
                self.failing_streak = self.failing_streak.saturating_add(1);
                if self.failing_streak >= self.retries {
                    self.state = HealthState::Unhealthy;
                }
            }
        }
        (self.state != before).then_some(self.state)
    }
}

/// `text` cut to [`MAX_OUTPUT`] bytes on a character boundary.
pub fn bounded(mut text: String) -> String {
    if text.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(test: &[&str], interval_ms: u64, retries: u32) -> HealthCheck {
        HealthCheck {
            test: test.iter().map(|s| s.to_string()).collect(),
            interval_ms,
            retries,
            ..Default::default()
        }
    }

    fn check(start_period: Duration, retries: u32) -> Check {
        Check {
            argv: vec!["true".into()],
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            start_period,
            retries,
        }
    }

    #[test]
    fn spec_fields_override_the_image_and_defaults_fill_the_rest() {
        let image = hc(&["CMD", "probe", "--quick"], 5_000, 7);
        let c = effective(None, Some(&image)).unwrap().unwrap();
        assert_eq!(c.argv, vec!["probe", "--quick"]);
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.retries, 7);
        // The spec's command and timer win; the image's retries stay.
        let spec = hc(&["CMD-SHELL", "test -f /ok"], 2_000, 0);
        let c = effective(Some(&spec), Some(&image)).unwrap().unwrap();
        assert_eq!(c.argv, vec!["/bin/sh", "-c", "test -f /ok"]);
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.retries, 7);
        // Only timers in the spec: the image's command with the spec's timers.
        let c = effective(Some(&hc(&[], 9_000, 0)), Some(&image))
            .unwrap()
            .unwrap();
        assert_eq!(c.argv, vec!["probe", "--quick"]);
        assert_eq!(c.interval, Duration::from_secs(9));
        // NONE disables the image's; nothing anywhere is no check.
        assert_eq!(
            effective(Some(&hc(&["NONE"], 0, 0)), Some(&image)),
            Ok(None)
        );
        assert_eq!(effective(None, None), Ok(None));
        let c = effective(Some(&hc(&["CMD-SHELL", "true"], 0, 0)), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.interval, c.timeout, c.start_period, c.retries),
            (DEFAULT_INTERVAL, DEFAULT_TIMEOUT, Duration::ZERO, 3)
        );
        assert!(effective(Some(&hc(&["SHELL", "x"], 0, 0)), None).is_err());
        assert!(effective(Some(&hc(&["CMD"], 0, 0)), None).is_err());
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&check(Duration::ZERO, 3), t0, HealthState::None);
        assert_eq!(t.state(), HealthState::Starting);
        assert_eq!(t.record(false, t0), None);
        assert_eq!(t.record(false, t0), None);
        assert_eq!(t.failing_streak(), 2);
        assert_eq!(t.record(false, t0), Some(HealthState::Unhealthy));
        assert_eq!(t.record(false, t0), None, "already unhealthy");
    }

    #[test]
    fn one_pass_makes_it_healthy_and_resets_the_streak() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&check(Duration::ZERO, 2), t0, HealthState::None);
        assert_eq!(t.record(true, t0), Some(HealthState::Healthy));
        assert_eq!(t.record(false, t0), None);
        assert_eq!(t.record(true, t0), None, "a pass resets the streak");
        assert_eq!(t.record(false, t0), None);
        assert_eq!(t.record(false, t0), Some(HealthState::Unhealthy));
        // Recovery: an unhealthy container that passes again is healthy.
        assert_eq!(t.record(true, t0), Some(HealthState::Healthy));
        assert_eq!(t.failing_streak(), 0);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_while_starting() {
        let t0 = Instant::now();
        let period = Duration::from_secs(10);
        let mut t = Tracker::new(&check(period, 1), t0, HealthState::None);
        for s in 0..10 {
            assert_eq!(t.record(false, t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(t.failing_streak(), 0);
        // After the period, one failure (retries 1) is enough.
        assert_eq!(t.record(false, t0 + period), Some(HealthState::Unhealthy));
        // Healthy within the start period: failures count from then on.
        let mut t = Tracker::new(&check(period, 1), t0, HealthState::None);
        assert_eq!(t.record(true, t0), Some(HealthState::Healthy));
        assert_eq!(
            t.record(false, t0 + Duration::from_secs(1)),
            Some(HealthState::Unhealthy)
        );
    }

    #[test]
    fn an_adopted_container_keeps_its_reported_state() {
        let t0 = Instant::now();
        let t = Tracker::new(&check(Duration::ZERO, 3), t0, HealthState::Healthy);
        assert_eq!(t.state(), HealthState::Healthy);
    }

    #[test]
    fn output_is_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_OUTPUT);
        let b = bounded(s);
        assert!(b.len() <= MAX_OUTPUT && b.len() >= MAX_OUTPUT - 1);
        assert_eq!(bounded("ok".into()), "ok");
    }
}
