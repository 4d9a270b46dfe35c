//! `verify: Service converged` as docker's: through the real CLI on a real one-node cluster,
//! `service create` (and `update`) return only once the tasks have kept running for the
//! monitor period (5 s, or the service's `--update-monitor`), saying so; a service whose tasks
//! die within it never counts as converged.

use crate::services;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use services::*;

#[test]
fn converged_means_the_tasks_stayed_up_for_the_monitor_period() {
    let c = Cluster::new(1, 1);
    let n = &c.nodes[0];

    let t = Instant::now();
    let out = n.ok(&[
        "service", "create", "--name", "steady", IMAGE, "sleep", "3600",
    ]);
    let took = t.elapsed();
    assert!(
        out.contains("verify: Waiting 5 seconds to verify that tasks are stable...")
            && out.trim_end().ends_with("verify: Service converged"),
        "{out}"
    );
    assert!(took >= Duration::from_secs(5), "converged after {took:?}");
    assert_eq!(c.running("steady").len(), 1);

    // The service's own monitor period, on an update too.
    let t = Instant::now();
    let out = n.ok(&[
        "service",
        "update",
        "--update-monitor",
        "2s",
        "--env-add",
        "X=1",
        "steady",
    ]);
    let took = t.elapsed();
    assert!(out.contains("verify: Waiting 2 seconds"), "{out}");
    assert!(
        out.trim_end().ends_with("verify: Service converged"),
        "{out}"
    );
    assert!(took >= Duration::from_secs(2), "updated after {took:?}");

    // Tasks that die 2 s after they start never stay up 5 s: the create keeps waiting.
    let mut flaky = Command::new(SHOAL)
        .args([
            "service",
            "create",
            "--name",
            "flaky",
            "--restart-delay",
            "500ms",
            IMAGE,
            "sh",
            "-c",
            "sleep 2; exit 1",
        ])
        .env("SHOAL_SOCKET", n.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It runs, fails, runs again: seen running at least twice in 12 s.
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut seen = std::collections::BTreeSet::new();
    while Instant::now() < deadline {
        seen.extend(c.running("flaky").into_keys());
        assert!(
            flaky.try_wait().unwrap().is_none(),
            "the create of a failing service ended"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(seen.len() >= 2, "tasks seen running: {seen:?}");
    flaky.kill().unwrap();
    flaky.wait().unwrap();
    let mut said = String::new();
    flaky
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(!said.contains("Service converged"), "{said}");
    assert!(said.contains("verify: Waiting"), "{said}");
}
