//! Services end to end: `shoal agent` processes on 127.0.0.x (each with its own data dir,
//! socket and address, each running its worker agent), real busybox containers, driven through
//! the CLI as a user would. Every test kills its agents by pid and force-deletes the
//! containers its nodes made (which removes their cgroups); overlay mounts live in the
//! containers' own mount namespaces.

use crate::services;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use services::*;

#[test]
fn replicas_spread_over_three_nodes_scale_and_go() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    let out = m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "6",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    // Progress, docker's way, in plain lines (stdout is not a terminal).
    assert!(out.contains("overall progress: 6 out of 6 tasks"), "{out}");
    assert!(
        out.trim_end().ends_with("verify: Service converged"),
        "{out}"
    );
    let spread = c.per_node("web");
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{spread:?}"
    );
    c.assert_real("web");
    let ls = m.ok(&["service", "ls"]);
    assert!(ls.contains("replicated   6/6"), "{ls}");
    // `ps` on a node lists the task containers that node runs, and no other node's.
    let running = c.running("web");
    for n in &c.nodes {
        let ps = n.ok(&["ps", "-a", "--data-dir", n.data().to_str().unwrap()]);
        let mut listed: Vec<&str> = ps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        listed.sort();
        let mut want: Vec<String> = c
            .ps("web")
            .iter()
            .filter(|t| running.get(&t.id) == Some(&n.host))
            .map(|t| format!("{}.{}", t.name, t.id))
            .collect();
        want.sort();
        assert_eq!(listed, want, "{ps}");
    }

    let out = m.ok(&["service", "scale", "web=9"]);
    assert!(out.starts_with("web scaled to 9\n"), "{out}");
    assert!(out.contains("verify: Service converged"), "{out}");
    let spread = c.per_node("web");
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "{spread:?}"
    );

    m.ok(&["service", "scale", "web=2"]);
    assert_eq!(c.running("web").len(), 2);
    let total: usize = c.nodes.iter().map(|n| n.containers().len()).sum();
    assert_eq!(total, 2, "stopped containers are removed");
    c.assert_real("web");

    m.ok(&["service", "rm", "web"]);
    c.until("containers removed", || {
        c.nodes.iter().all(|n| n.containers().is_empty())
    });
    assert!(!m.ok(&["service", "ls"]).contains("web"));
}

#[test]
fn a_killed_worker_s_tasks_come_back_elsewhere() {
    let mut c = Cluster::new(3, 1);
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "6",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.running("web");
    let on3: Vec<String> = before
        .iter()
        .filter(|(_, h)| *h == "host3")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(on3.len(), 2);
    // The machine dies: its agent and its containers.
    c.nodes[2].kill_agent();
    c.nodes[2].remove_containers();
    c.until("6 tasks running on the two live nodes", || {
        let r = c.running("web");
        r.len() == 6 && r.values().all(|h| h != "host3")
    });
    let after = c.running("web");
    for id in before.keys().filter(|id| !on3.contains(id)) {
        assert!(
            after.contains_key(id),
            "task {id} on a live node was disturbed"
        );
    }
    c.assert_real("web");
    let ls = c.nodes[0].ok(&["node", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.contains("host3") && l.contains("Down")),
        "{ls}"
    );
}

#[test]
fn drain_moves_tasks_and_pause_stops_new_ones() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    m.ok(&["node", "update", "--availability", "drain", "host3"]);
    c.until("host3 drained", || {
        let r = c.running("web");
        r.len() == 3 && r.values().all(|h| h != "host3")
    });
    c.until("host3's container gone", || {
        c.nodes[2].containers().is_empty()
    });

    m.ok(&["node", "update", "--availability", "pause", "host2"]);
    let on2 = c.per_node("web").get("host2").copied().unwrap_or(0);
    m.ok(&["service", "scale", "web=6"]);
    let spread = c.per_node("web");
    assert_eq!(spread.get("host2").copied().unwrap_or(0), on2, "{spread:?}");
    assert_eq!(spread.get("host1").copied(), Some(6 - on2), "{spread:?}");
    assert_eq!(spread.get("host3"), None);
    c.assert_real("web");
}

#[test]
fn on_failure_restarts_stop_at_max_attempts() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "fail",
        "--restart-condition",
        "on-failure",
        "--restart-max-attempts",
        "2",
        "--restart-delay",
        "100ms",
        IMAGE,
        "sh",
        "-c",
        "exit 3",
    ]);
    // The first run and two restarts, all failed with the exit code.
    c.until("three failed tasks", || {
        let ps = c.ps("fail");
        ps.len() == 3 && ps.iter().all(|t| t.current == "Failed")
    });
    std::thread::sleep(Duration::from_secs(2));
    let ps = c.ps("fail");
    assert_eq!(ps.len(), 3, "no restart past max attempts: {ps:?}");
    assert!(ps.iter().all(|t| t.error.contains('3')), "{ps:?}");
    assert!(ps.iter().all(|t| t.name.ends_with("fail.1")), "{ps:?}");

    // A clean exit is not a failure: on-failure leaves it alone.
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "done",
        "--restart-condition",
        "on-failure",
        "--restart-delay",
        "100ms",
        IMAGE,
        "true",
    ]);
    c.until("complete", || {
        c.ps("done").iter().any(|t| t.current == "Complete")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.ps("done").len(), 1);
}

#[test]
fn a_global_service_follows_a_node_join() {
    let c = Cluster::with_spare(2, 1, 1);
    let m = &c.nodes[0];
    let out = m.ok(&[
        "service", "create", "--name", "agent", "--mode", "global", IMAGE, "sleep", "3600",
    ]);
    assert!(out.contains("overall progress: 2 out of 2 tasks"), "{out}");
    assert_eq!(c.per_node("agent").len(), 2);
    let ls = m.ok(&["service", "ls"]);
    assert!(
        ls.lines().any(|l| l
            .split_whitespace()
            .skip(1)
            .take(3)
            .eq(["agent", "global", "2/2"])),
        "{ls}"
    );

    c.join(2, false);
    c.until("a task on the new node", || {
        let p = c.per_node("agent");
        p.len() == 3 && p.values().all(|n| *n == 1)
    });
    c.assert_real("agent");
}

#[test]
fn an_unsatisfiable_constraint_pends_until_a_label_matches() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    // Without --detach the CLI waits; Ctrl-C stops the waiting, not the service.
    let create = Command::new(SHOAL)
        .args([
            "service",
            "create",
            "--name",
            "blue",
            "--replicas",
            "2",
            "--constraint",
            "node.labels.zone==blue",
            IMAGE,
            "sleep",
            "3600",
        ])
        .env("SHOAL_SOCKET", m.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(create.id() as i32, libc::SIGINT) };
    let out = create.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no suitable node"), "{text}");
    assert!(
        text.contains("Operation continuing in background."),
        "{text}"
    );
    c.until("pending with a reason", || {
        let ps = c.ps("blue");
        ps.len() == 2
            && ps
                .iter()
                .all(|t| t.current == "Pending" && t.error.contains("no suitable node"))
    });
    assert!(c.nodes.iter().all(|n| n.containers().is_empty()));
    m.ok(&["node", "update", "--label-add", "zone=blue", "host2"]);
    c.until("running on the labelled node", || {
        c.per_node("blue") == BTreeMap::from([("host2".to_string(), 2)])
    });
    c.assert_real("blue");
}

#[test]
fn restarting_an_agent_leaves_its_containers_running() {
    let mut c = Cluster::build(2, 1, 0, PATIENT_HEARTBEAT);
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "4",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.running("web");
    let pids: HashMap<String, i32> = before
        .iter()
        .map(|(id, h)| (id.clone(), c.node(h).container_pid(id).unwrap()))
        .collect();
    // The worker's agent dies hard and comes back; its containers are adopted.
    c.nodes[1].kill_agent();
    for (id, h) in &before {
        if h == "host2" {
            assert_eq!(c.node(h).container_pid(id), Some(pids[id]));
        }
    }
    c.nodes[1].spawn();
    c.wait_ready(2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.running("web"), before, "same tasks on the same nodes");
    for (id, h) in &before {
        assert_eq!(
            c.node(h).container_pid(id),
            Some(pids[id]),
            "task {id} restarted"
        );
    }
    assert_eq!(c.ps("web").len(), 4, "no replacement tasks");
}

#[test]
fn a_leader_change_does_not_disturb_running_tasks() {
    let mut c = Cluster::build(3, 3, 0, PATIENT_HEARTBEAT);
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.running("web");
    let pids: HashMap<String, i32> = before
        .iter()
        .map(|(id, h)| (id.clone(), c.node(h).container_pid(id).unwrap()))
        .collect();
    // The leader's process dies: another manager takes over; then it comes back.
    c.nodes[0].kill_agent();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let out = c.nodes[1].shoal(&["node", "ls"]);
        let ls = String::from_utf8_lossy(&out.stdout).to_string();
        let leader = ls
            .lines()
            .find(|l| l.contains("Leader"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("host")));
        if leader.is_some_and(|h| h != "host1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader: {ls} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.nodes[0].spawn();
    c.wait_ready(3);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.running("web"), before, "same tasks on the same nodes");
    for (id, h) in &before {
        assert_eq!(
            c.node(h).container_pid(id),
            Some(pids[id]),
            "task {id} restarted"
        );
    }
    assert_eq!(c.ps("web").len(), 3, "no replacement tasks");
}

#[test]
fn a_node_that_leaves_removes_its_tasks() {
    let c = Cluster::new(2, 1);
    c.nodes[0].ok(&[
        "service", "create", "--name", "agent", "--mode", "global", IMAGE, "sleep", "3600",
    ]);
    assert_eq!(c.nodes[1].containers().len(), 1);
    c.nodes[1].ok(&["cluster", "leave"]);
    // The agent removes the containers, then forgets its task database.
    c.until(
        "the leaver's container removed and its task database forgotten",
        || c.nodes[1].containers().is_empty() && !c.nodes[1].data().join("worker").exists(),
    );
    assert_eq!(
        c.nodes[0].containers().len(),
        1,
        "the other node's task stays"
    );
}

#[test]
fn scaling_keeps_the_spec_version_and_a_new_spec_changes_it() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let version = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&m.ok(&["service", "inspect", "web"])).unwrap();
        v[0]["SpecVersion"].as_u64().unwrap()
    };
    m.ok(&[
        "service", "create", "-d", "--name", "web", IMAGE, "sleep", "3600",
    ]);
    let created = version();
    assert!(created > 0);
    m.ok(&["service", "scale", "-d", "web=2"]);
    assert_eq!(version(), created);
    m.ok(&["service", "update", "-d", "--force", "web"]);
    assert!(version() > created);
    let pretty = m.ok(&["service", "inspect", "--pretty", "web"]);
    assert!(pretty.contains("Replicas:      2"), "{pretty}");
    assert!(pretty.contains("Args:          sleep 3600"), "{pretty}");
}

#[test]
fn bad_service_arguments_fail_on_one_line_before_the_daemon_is_asked() {
    // No daemon at this socket: the arguments are checked first.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    for (args, want) in [
        (
            &["service", "scale", "web"][..],
            "invalid scale specifier \"web\"",
        ),
        (&["service", "scale", "web=-1"][..], "must not be negative"),
        (
            &["service", "scale", "web=x"][..],
            "invalid scale specifier",
        ),
        (
            &["service", "ps", "--filter", "color=red", "web"][..],
            "invalid filter \"color\"",
        ),
        (
            &["service", "ps", "--filter", "desired-state=sleeping", "web"][..],
            "invalid filter desired-state=sleeping",
        ),
        (
            &[
                "service",
                "create",
                "--mode",
                "global",
                "--replicas",
                "2",
                IMAGE,
            ][..],
            "--replicas applies to replicated services only",
        ),
        (
            &["service", "create", "--restart-delay", "soon", IMAGE][..],
            "--restart-delay",
        ),
    ] {
        let out = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", &sock)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("shoal: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_hollow_node_is_marked_and_runs_tasks_without_containers() {
    let mut c = Cluster::with_spare(1, 1, 1);
    c.nodes[1].kill_agent();
    c.nodes[1].hollow = true;
    c.nodes[1].spawn();
    c.join(1, false);
    c.wait_ready(2);
    let ls = c.nodes[0].ok(&["node", "ls"]);
    assert!(ls.contains("host2 (hollow)"), "{ls}");
    assert!(!ls.contains("host1 (hollow)"), "{ls}");
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "sim",
        "--replicas",
        "3",
        "--constraint",
        "node.hostname==host2",
        IMAGE,
        "sleep",
        "3600",
    ]);
    assert_eq!(
        c.per_node("sim"),
        BTreeMap::from([("host2".to_string(), 3)])
    );
    assert!(c.nodes.iter().all(|n| n.containers().is_empty()));
}

/// A service whose tasks are meant to finish converges once they have: `service create`
/// returns, the task completes, nothing restarts it, and a later wait for convergence (here
/// `scale`) finds the service converged.
#[test]
fn a_service_of_tasks_that_finish_converges_when_they_complete() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    // A command that waits for convergence, given CONVERGE to return (the bug waited forever:
    // "1/1: complete finished").
    let bounded = |args: &[&str]| {
        let mut child = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", m.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + CONVERGE;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "shoal {args:?} kept waiting on a finished task: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "shoal {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    bounded(&[
        "service",
        "create",
        "--name",
        "job",
        "--restart-condition",
        "none",
        IMAGE,
        "true",
    ]);
    // `create` may have seen the task running (a task meant to finish is done then too); it
    // completes, and nothing restarts it.
    c.until("the task complete", || {
        c.ps("job").first().is_some_and(|t| t.current == "Complete")
    });
    assert_eq!(c.ps("job").len(), 1);
    // Waiting once the task has completed: converged at once.
    let out = bounded(&["service", "scale", "job=1"]);
    assert!(out.contains("verify: Service converged"), "{out}");
    assert_eq!(c.ps("job").len(), 1);

    // One place for a node's state: with only the agent's socket set, node-local commands
    // work on that agent's data dir (its image store holds the busybox the harness imported).
    let only_socket = |args: &[&str]| {
        let out = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", m.socket())
            .env_remove("SHOAL_DATA_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ls = only_socket(&["image", "ls"]);
    assert!(ls.contains("busybox"), "{ls}");
    let v = only_socket(&["version"]);
    assert!(v.contains(&m.data().display().to_string()), "{v}");
}

/// `--entrypoint` (create, update) and `--args` (update) are split into words as a shell
/// splits them, as docker does: quotes keep words together, escapes keep quotes.
#[test]
fn entrypoint_and_args_are_shell_words() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--name",
        "words",
        "--entrypoint",
        r#"/bin/sh -c 'echo "entry: $0" \"quoted\"; sleep 600'"#,
        IMAGE,
        "two  words",
    ]);
    let said = |want: &str| {
        c.until(want, || {
            String::from_utf8_lossy(&m.shoal(&["service", "logs", "--raw", "words"]).stdout)
                .lines()
                .any(|l| l == want)
        })
    };
    said(r#"entry: two  words "quoted""#);
    let spec = c.inspect("words");
    let container = &spec["Spec"]["TaskTemplate"]["ContainerSpec"];
    assert_eq!(
        container["Command"],
        serde_json::json!(["/bin/sh", "-c", r#"echo "entry: $0" \"quoted\"; sleep 600"#]),
        "{container}"
    );

    m.ok(&[
        "service",
        "update",
        "--entrypoint",
        "",
        "--args",
        r#"sh -c 'echo "in args" a\ b; sleep 600'"#,
        "words",
    ]);
    said("in args a b");
    let spec = c.inspect("words");
    let container = &spec["Spec"]["TaskTemplate"]["ContainerSpec"];
    assert_eq!(
        container["Args"],
        serde_json::json!(["sh", "-c", r#"echo "in args" a\ b; sleep 600"#]),
        "{container}"
    );
    assert!(m
        .fails(&["service", "update", "--args", "sh -c 'open", "words"])
        .starts_with("shoal: --args: "),);
}
