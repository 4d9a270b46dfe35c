//! Rolling updates and rollback end to end: `shoal agent` processes, real busybox containers,
//! driven through the CLI. Every invariant is checked from the task history the cluster keeps
//! (each old task's SHUTDOWN time, each new task's RUNNING time, as the agents reported them),
//! not by watching the clock: the updater only acts on reports it has applied, so the order of
//! those times is the order of events.

use crate::services;

use std::time::{Duration, Instant};

use services::*;

/// How long a test waits for an update to reach a state.
const UPDATE_WAIT: Duration = Duration::from_secs(40);

/// One task of the history.
#[derive(Debug, Clone)]
struct Hist {
    id: String,
    slot: u64,
    image: String,
    args: Vec<String>,
    desired: String,
    state: String,
    at_ms: i64,
    node: String,
    err: String,
}

fn history(c: &Cluster, service: &str) -> Vec<Hist> {
    c.tasks_json(service)
        .iter()
        .map(|t| Hist {
            id: t["ID"].as_str().unwrap().into(),
            slot: t["Slot"].as_u64().unwrap(),
            image: t["Image"].as_str().unwrap().into(),
            args: t["Args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            desired: t["DesiredState"].as_str().unwrap().into(),
            state: t["Status"]["State"].as_str().unwrap().into(),
            at_ms: t["Status"]["TimestampMs"].as_i64().unwrap(),
            node: t["NodeID"].as_str().unwrap().into(),
            err: t["Status"]["Err"].as_str().unwrap().into(),
        })
        .collect()
}

/// Events of an update: (time, change in the count) sorted by time, ties broken by `first`.
fn sweep(mut events: Vec<(i64, i64)>, start: i64, first_positive: bool) -> (i64, i64) {
    events.sort_by_key(|(t, d)| (*t, if first_positive { -*d } else { *d }));
    let (mut n, mut lo, mut hi) = (start, start, start);
    for (_, d) in events {
        n += d;
        lo = lo.min(n);
        hi = hi.max(n);
    }
    (lo, hi)
}

/// Most slots without a running task at once during the update: a slot is down from its old
/// task's SHUTDOWN to its new task's RUNNING (stop-first starts the new one after).
fn max_down(h: &[Hist], is_new: impl Fn(&Hist) -> bool) -> i64 {
    let mut events = Vec::new();
    for t in h {
        if !is_new(t) && t.state == "shutdown" {
            events.push((t.at_ms, 1));
        }
        if is_new(t) && t.state == "running" {
            events.push((t.at_ms, -1));
        }
    }
    // At equal times a start came first: the updater retires the next old task only after.
    sweep(events, 0, false).1
}

/// Fewest tasks running at once during the update, starting from `replicas` old ones.
fn min_running(h: &[Hist], replicas: i64, is_new: impl Fn(&Hist) -> bool) -> i64 {
    let mut events = Vec::new();
    for t in h {
        if !is_new(t) && t.state == "shutdown" {
            events.push((t.at_ms, -1));
        }
        if is_new(t) && t.state == "running" {
            events.push((t.at_ms, 1));
        }
    }
    sweep(events, replicas, true).0
}

fn update_state(c: &Cluster, service: &str) -> String {
    c.inspect(service)["UpdateStatus"]["State"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn wait_state(c: &Cluster, service: &str, want: &str) {
    let deadline = Instant::now() + UPDATE_WAIT;
    loop {
        let st = update_state(c, service);
        if st == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "update state of {service} is {st:?}, not {want}; tasks {:#?}",
            history(c, service)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn create(c: &Cluster, name: &str, replicas: &str, extra: &[&str]) {
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        replicas,
        "--stop-grace-period",
        "1s",
        "--update-monitor",
        "500ms",
        "--update-parallelism",
        "2",
        "--rollback-parallelism",
        "2",
        "--rollback-monitor",
        "500ms",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sleep", "3600"]);
    c.nodes[0].ok(&args);
}

fn fails(n: &Node, args: &[&str]) -> (String, String) {
    let out = n.shoal(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn stop_first_keeps_two_slots_down_at_most_and_start_first_six_running_at_least() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    create(&c, "sf", "6", &[]);
    create(&c, "ff", "6", &["--update-order", "start-first"]);
    let is_new = |t: &Hist| t.args == ["sleep", "7200"];

    let out = m.ok(&["service", "update", "--args", "sleep 7200", "sf"]);
    assert!(out.starts_with("sf\n"), "{out}");
    assert!(out.contains("overall progress: 6 out of 6 tasks"), "{out}");
    assert!(
        out.trim_end().ends_with("verify: Service converged"),
        "{out}"
    );
    let h = history(&c, "sf");
    let running_new = h
        .iter()
        .filter(|t| is_new(t) && t.state == "running" && t.desired == "running")
        .count();
    assert_eq!(running_new, 6, "{h:#?}");
    assert_eq!(
        h.iter().filter(|t| is_new(t)).count(),
        6,
        "one new task per slot"
    );
    let down = max_down(&h, is_new);
    assert!(
        (1..=2).contains(&down),
        "stop-first had {down} slots down: {h:#?}"
    );
    c.assert_real("sf");
    let st = c.inspect("sf")["UpdateStatus"].clone();
    assert_eq!(st["State"], "completed");
    assert_eq!(st["Message"], "update completed");
    assert!(m.ok(&["service", "ls"]).contains("completed"));

    m.ok(&["service", "update", "--args", "sleep 7200", "ff"]);
    let h = history(&c, "ff");
    let low = min_running(&h, 6, is_new);
    assert!(low >= 6, "start-first fell to {low} running: {h:#?}");
    assert_eq!(update_state(&c, "ff"), "completed");
    c.assert_real("ff");
}

#[test]
fn a_failing_image_pauses_the_update_and_a_rollback_restores_every_task() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    create(&c, "web", "6", &["--restart-delay", "30s"]);
    let before: Vec<String> = c.running("web").into_keys().collect();

    let (out, err) = fails(
        m,
        &[
            "service",
            "update",
            "--no-resolve-image",
            "--image",
            "127.0.0.1:9/busybox:nope",
            "web",
        ],
    );
    assert!(
        err.contains(
            "service update paused: update paused due to failure or early termination of task"
        ),
        "{out}\n{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // The reason is the failed task's own, with its node.
    assert!(
        err.contains(": pull 127.0.0.1:9/busybox:nope: ") && err.contains(" (on host"),
        "{err}"
    );
    assert_eq!(update_state(&c, "web"), "paused");
    let ls = m.ok(&["service", "ls"]);
    assert!(ls.contains("paused"), "{ls}");
    // As docker counts: the replicas wanted, not every task meant to run.
    assert!(ls.contains("/6 "), "{ls}");
    let pretty = m.ok(&["service", "inspect", "--pretty", "web"]);
    assert!(
        pretty.contains("State:") && pretty.contains("paused"),
        "{pretty}"
    );
    // Paused at the first failure: at most two slots were touched, the others still run.
    let h = history(&c, "web");
    let untouched = h
        .iter()
        .filter(|t| t.image == IMAGE && t.state == "running" && t.desired == "running")
        .count();
    assert!(untouched >= 4, "{h:#?}");
    assert!(h
        .iter()
        .any(|t| t.image == "127.0.0.1:9/busybox:nope" && t.state == "rejected"));

    let out = m.ok(&["service", "rollback", "web"]);
    assert!(
        out.contains("rollback: manually requested rollback"),
        "{out}"
    );
    assert!(
        out.contains("overall progress: rolling back update: 6 out of 6 tasks"),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with("verify: Service converged"),
        "{out}"
    );
    assert_eq!(update_state(&c, "web"), "rollback_completed");
    let h = history(&c, "web");
    let wanted: Vec<&Hist> = h.iter().filter(|t| t.desired == "running").collect();
    assert_eq!(wanted.len(), 6);
    assert!(
        wanted
            .iter()
            .all(|t| t.image == IMAGE && t.state == "running" && t.args == ["sleep", "3600"]),
        "{h:#?}"
    );
    // Slots the update never reached kept their tasks.
    let kept = wanted.iter().filter(|t| before.contains(&t.id)).count();
    assert!(kept >= 4, "{kept} of the original tasks kept");
    c.assert_real("web");
    // The spec rolled back from is kept as the previous one.
    let spec = c.inspect("web");
    assert_eq!(
        spec["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Image"],
        "127.0.0.1:9/busybox:nope"
    );
}

#[test]
fn failure_action_rollback_rolls_the_update_back_by_itself() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    create(
        &c,
        "web",
        "4",
        &[
            "--update-failure-action",
            "rollback",
            "--restart-delay",
            "30s",
        ],
    );
    let (out, err) = fails(
        m,
        &[
            "service",
            "update",
            "--no-resolve-image",
            "--image",
            "127.0.0.1:9/busybox:nope",
            "web",
        ],
    );
    assert!(
        out.contains("rollback: update rolled back due to failure or early termination of task"),
        "{out}\n{err}"
    );
    assert!(out.contains("rolling back update:"), "{out}");
    assert!(
        err.contains("service rolled back: update rolled back"),
        "{err}"
    );
    assert_eq!(update_state(&c, "web"), "rollback_completed");
    let h = history(&c, "web");
    let wanted: Vec<&Hist> = h.iter().filter(|t| t.desired == "running").collect();
    assert_eq!(wanted.len(), 4);
    assert!(
        wanted
            .iter()
            .all(|t| t.image == IMAGE && t.state == "running"),
        "{h:#?}"
    );
    let is_new = |t: &Hist| t.image == "127.0.0.1:9/busybox:nope";
    assert!(max_down(&h, |t| !is_new(t) && t.desired == "running") <= 2);
}

#[test]
fn max_failure_ratio_lets_some_failures_pass() {
    // The new image is on host1 and host2 only: its tasks placed on host3 are rejected. How
    // many land there is the scheduler's business (a node whose tasks were rejected looks
    // free), so the ratio tolerates all but every slot failing.
    let c = Cluster::build_with_images(
        3,
        1,
        0,
        FAST_HEARTBEAT,
        &[(0, "127.0.0.1:9/busybox:v2"), (1, "127.0.0.1:9/busybox:v2")],
    );
    let m = &c.nodes[0];
    create(
        &c,
        "web",
        "6",
        &[
            "--update-max-failure-ratio",
            "0.9",
            "--restart-delay",
            "30s",
        ],
    );
    assert_eq!(
        c.per_node("web").values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    m.ok(&[
        "service",
        "update",
        "-d",
        "--no-resolve-image",
        "--image",
        "127.0.0.1:9/busybox:v2",
        "web",
    ]);
    wait_state(&c, "web", "completed");
    let h = history(&c, "web");
    let host3 = c
        .running("web")
        .into_iter()
        .find(|(_, host)| host == "host3")
        .map(|(id, _)| h.iter().find(|t| t.id == id).unwrap().node.clone());
    let rejected: Vec<&Hist> = h
        .iter()
        .filter(|t| t.image == "127.0.0.1:9/busybox:v2" && t.state == "rejected")
        .collect();
    assert!(!rejected.is_empty(), "{h:#?}");
    assert!(
        rejected
            .iter()
            .all(|t| t.err.starts_with("pull 127.0.0.1:9/busybox:v2: ")),
        "{h:#?}"
    );
    // Every rejection was on one node (host3), and nothing of v2 runs there.
    let nodes: std::collections::BTreeSet<&str> =
        rejected.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 1, "{h:#?}");
    assert!(host3.is_none(), "a v2 task runs on host3: {h:#?}");
    let running = h
        .iter()
        .filter(|t| t.image == "127.0.0.1:9/busybox:v2" && t.state == "running")
        .count();
    assert!(running >= 1, "{h:#?}");
    assert!(m.ok(&["service", "ls"]).contains("completed"));
}

#[test]
fn killing_the_leader_mid_update_ends_with_every_task_on_the_new_spec() {
    let mut c = Cluster::build(3, 3, 0, PATIENT_HEARTBEAT);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "6",
        "--stop-grace-period",
        "1s",
        "--update-parallelism",
        "1",
        "--update-monitor",
        "500ms",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let is_new = |t: &Hist| t.args == ["sleep", "7200"];
    m.ok(&["service", "update", "-d", "--args", "sleep 7200", "web"]);
    // Mid-update: some slots done, not all.
    let deadline = Instant::now() + UPDATE_WAIT;
    loop {
        let h = history(&c, "web");
        let done = h
            .iter()
            .filter(|t| is_new(t) && t.state == "running")
            .count();
        if done >= 1 {
            assert!(
                done < 6,
                "the update finished before the leader could be killed"
            );
            break;
        }
        assert!(Instant::now() < deadline, "update never started: {h:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let leader = c.leader(0).expect("a leader");
    let li = c.nodes.iter().position(|n| n.host == leader).unwrap();
    let other = (li + 1) % 3;
    c.nodes[li].kill_agent();
    let deadline = Instant::now() + UPDATE_WAIT;
    while c.leader(other).is_none_or(|l| l == leader) {
        assert!(Instant::now() < deadline, "no new leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old leader's node comes back (its tasks' containers kept running meanwhile).
    c.nodes[li].spawn();
    wait_state(&c, "web", "completed");
    let h = history(&c, "web");
    let wanted: Vec<&Hist> = h.iter().filter(|t| t.desired == "running").collect();
    assert_eq!(wanted.len(), 6, "{h:#?}");
    assert!(
        wanted.iter().all(|t| is_new(t) && t.state == "running"),
        "{h:#?}"
    );
    // Neither restarted nor repeated: exactly one new task per slot.
    let mut slots: Vec<u64> = h.iter().filter(|t| is_new(t)).map(|t| t.slot).collect();
    slots.sort();
    assert_eq!(slots, vec![1, 2, 3, 4, 5, 6], "{h:#?}");
    let down = max_down(&h, is_new);
    assert!(down <= 1, "{down} slots down at once: {h:#?}");
    c.assert_real("web");
}

#[test]
fn a_global_service_updates_node_by_node() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--name",
        "agent",
        "--mode",
        "global",
        "--stop-grace-period",
        "1s",
        "--update-monitor",
        "300ms",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let is_new = |t: &Hist| t.args == ["sleep", "7200"];
    let out = m.ok(&["service", "update", "--args", "sleep 7200", "agent"]);
    assert!(out.contains("overall progress: 3 out of 3 tasks"), "{out}");
    let h = history(&c, "agent");
    let new_running: Vec<&Hist> = h
        .iter()
        .filter(|t| is_new(t) && t.state == "running" && t.desired == "running")
        .collect();
    assert_eq!(new_running.len(), 3, "{h:#?}");
    let nodes: std::collections::BTreeSet<&str> =
        new_running.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one task per node: {h:#?}");
    // Parallelism 1 (the default): one node without its task at a time.
    assert_eq!(max_down(&h, is_new), 1, "{h:#?}");
    assert_eq!(update_state(&c, "agent"), "completed");
    c.assert_real("agent");
}

#[test]
fn bad_update_flags_fail_on_one_line_before_the_daemon_is_asked() {
    // No daemon at this socket: the flags are checked first.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    for (args, want) in [
        (
            &[
                "service",
                "update",
                "--update-max-failure-ratio",
                "2",
                "web",
            ][..],
            "invalid --update-max-failure-ratio 2: must be between 0 and 1",
        ),
        (
            &["service", "update", "--update-delay", "10", "web"][..],
            "--update-delay",
        ),
        (
            &["service", "update", "--env-add", "=x", "web"][..],
            "invalid --env-add \"=x\": expected NAME=VALUE",
        ),
        (
            &["service", "update", "--rollback", "--image", "x", "web"][..],
            "--rollback cannot be combined with flags that change the spec",
        ),
        (
            &[
                "service",
                "create",
                "--rollback-max-failure-ratio",
                "1.5",
                "x",
            ][..],
            "invalid --rollback-max-failure-ratio 1.5: must be between 0 and 1",
        ),
    ] {
        let out = std::process::Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", &sock)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A rollback's failure action cannot be rollback: clap refuses the value.
    let out = std::process::Command::new(SHOAL)
        .args([
            "service",
            "update",
            "--rollback-failure-action",
            "rollback",
            "web",
        ])
        .env("SHOAL_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
