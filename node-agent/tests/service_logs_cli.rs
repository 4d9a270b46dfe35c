//! `shoal service logs` end to end: real busybox tasks on several `shoal agent` processes, their
//! lines gathered by the leader's log broker and printed as docker does.

use crate::services;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use services::*;

/// A task that writes five lines to each stream, then waits.
const TALK: &str =
    "i=0; while [ $i -lt 5 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done; sleep 3600";
/// A task that writes a numbered line every 100 ms, forever.
const TICK: &str = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done";

fn create(c: &Cluster, name: &str, replicas: &str, script: &str) {
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        replicas,
        "--no-resolve-image",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
}

fn logs(n: &Node, args: &[&str]) -> (String, String) {
    let mut all = vec!["service", "logs"];
    all.extend_from_slice(args);
    let out = n.shoal(&all);
    assert!(
        out.status.success(),
        "service logs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `PREFIX    | LINE` → (prefix, line).
fn split(l: &str) -> (&str, &str) {
    let (p, rest) = l
        .split_once(" | ")
        .unwrap_or_else(|| panic!("no prefix: {l:?}"));
    (p.trim_end(), rest)
}

#[test]
fn service_logs_from_three_nodes_keep_stdout_and_stderr_apart() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    create(&c, "talk", "3", TALK);
    assert_eq!(c.per_node("talk").len(), 3, "one task per node");
    let ids: BTreeSet<String> = c
        .tasks_json("talk")
        .iter()
        .map(|t| t["ID"].as_str().unwrap().to_string())
        .collect();
    // The tasks have written everything once 5 lines per task show up.
    let mut full = (String::new(), String::new());
    c.until("all lines", || {
        full = logs(m, &["talk"]);
        full.0.lines().count() == 15 && full.1.lines().count() == 15
    });
    let (out, err) = &full;
    let mut hosts = BTreeSet::new();
    for l in out.lines() {
        let (p, line) = split(l);
        assert!(line.starts_with("out-"), "stdout holds stdout lines: {l:?}");
        // talk.SLOT.TASKID@HOST, the task id cut to 12 characters.
        let (ctx, host) = p.split_once('@').unwrap();
        let parts: Vec<&str> = ctx.split('.').collect();
        assert_eq!(parts.len(), 3, "{p}");
        assert_eq!(parts[0], "talk");
        assert!(["1", "2", "3"].contains(&parts[1]), "{p}");
        assert_eq!(parts[2].len(), 12, "{p}");
        assert!(
            ids.iter().any(|id| id.starts_with(parts[2])),
            "{p} in {ids:?}"
        );
        hosts.insert(host.to_string());
    }
    assert_eq!(hosts.len(), 3, "lines from three nodes: {out}");
    for l in err.lines() {
        let (_, line) = split(l);
        assert!(line.starts_with("err-"), "stderr holds stderr lines: {l:?}");
    }
    for i in 0..5 {
        let want = format!("| out-{i}");
        assert_eq!(
            out.lines().filter(|l| l.ends_with(&want)).count(),
            3,
            "{out}"
        );
        let want = format!("| err-{i}");
        assert_eq!(
            err.lines().filter(|l| l.ends_with(&want)).count(),
            3,
            "{err}"
        );
    }

    // --raw: the lines alone.
    let (out, err) = logs(m, &["--raw", "talk"]);
    let raw: BTreeSet<&str> = out.lines().collect();
    assert_eq!(raw.len(), 5, "{out}");
    assert!(out.lines().all(|l| l.starts_with("out-")), "{out}");
    assert!(err.lines().all(|l| l.starts_with("err-")), "{err}");

    // --no-task-ids: talk.SLOT@HOST.
    let (out, _) = logs(m, &["--no-task-ids", "talk"]);
    for l in out.lines() {
        let (p, _) = split(l);
        let (ctx, _) = p.split_once('@').unwrap();
        assert_eq!(ctx.split('.').count(), 2, "{l}");
    }
    // --no-trunc: the whole task id.
    let (out, _) = logs(m, &["--no-trunc", "talk"]);
    let (p, _) = split(out.lines().next().unwrap());
    let id = p.split_once('@').unwrap().0.split('.').nth(2).unwrap();
    assert!(ids.contains(id), "{id} in {ids:?}");

    // --tail 2: each task's last two lines (out-4, then err-4).
    // --tail 2: each task's last two lines (in the order its log holds them).
    let (out, err) = logs(m, &["--tail", "2", "talk"]);
    let mut per_task: BTreeMap<String, usize> = BTreeMap::new();
    for l in out.lines().chain(err.lines()) {
        *per_task.entry(split(l).0.to_string()).or_default() += 1;
    }
    assert_eq!(per_task.len(), 3, "{out}{err}");
    assert!(per_task.values().all(|n| *n == 2), "{per_task:?}");
    let (out, err) = logs(m, &["--tail", "0", "talk"]);
    assert_eq!((out.as_str(), err.as_str()), ("", ""));

    // -t: each line's RFC 3339 time after the prefix; --since that time keeps the lines at or
    // after it.
    let (out, _) = logs(m, &["-t", "talk"]);
    let times: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let (_, rest) = split(l);
            let (ts, line) = rest.split_once(' ').unwrap();
            assert_eq!(ts.len(), 30, "{ts}");
            assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
            (ts.to_string(), line.to_string())
        })
        .collect();
    let mut sorted: Vec<&String> = times.iter().map(|(t, _)| t).collect();
    sorted.sort();
    let cut = sorted[7].clone();
    let (out, _) = logs(m, &["-t", "--since", &cut, "talk"]);
    let kept: Vec<&str> = out.lines().collect();
    let want = times.iter().filter(|(t, _)| *t >= cut).count();
    assert_eq!(kept.len(), want, "{out}");
    assert!(kept.iter().all(|l| split(l).1 >= cut.as_str()), "{out}");
    let (out, _) = logs(m, &["--since", "1h", "--raw", "talk"]);
    assert_eq!(out.lines().count(), 15);
    let (out, _) = logs(m, &["--since", "2200-01-01T00:00:00Z", "talk"]);
    assert_eq!(out, "");

    // One task by id prefix.
    let one = ids.iter().next().unwrap();
    let (out, err) = logs(m, &["--raw", &one[..10]]);
    assert_eq!(out.lines().count(), 5, "{out}");
    assert_eq!(err.lines().count(), 5, "{err}");

    // Bad input: one line, non-zero exit.
    for args in [
        &["service", "logs", "nosuch"][..],
        &["service", "logs", "--tail", "x", "talk"][..],
        &["service", "logs", "--since", "yesterday", "talk"][..],
    ] {
        let out = m.shoal(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("shoal: "), "{err}");
    }
    let err = String::from_utf8(m.shoal(&["service", "logs", "nosuch"]).stderr).unwrap();
    assert!(err.contains("no such service or task: nosuch"), "{err}");

    // -f: new lines keep coming from every task.
    create(&c, "tick", "3", TICK);
    let seen = follow(m, "tick", &[]);
    let start = snapshot(&seen);
    c.until("ticks followed", || {
        let now = snapshot(&seen);
        now.len() == 3
            && now
                .iter()
                .all(|(t, n)| *n >= start.get(t).copied().unwrap_or(0) + 10)
    });
    // A task the service gains while followed is followed too.
    m.ok(&["service", "scale", "tick=4"]);
    c.until("the new task followed", || snapshot(&seen).len() == 4);
    seen.stop();
}

/// A running `service logs -f --raw`-like follower: lines per task prefix, in order.
struct Followed {
    child: Mutex<std::process::Child>,
    lines: Arc<Mutex<BTreeMap<String, Vec<u64>>>>,
}

impl Followed {
    fn stop(&self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Follows `service` on `n`; records, per task prefix, the tick numbers in the order printed.
fn follow(n: &Node, service: &str, extra: &[&str]) -> Followed {
    let mut cmd = Command::new(SHOAL);
    cmd.args(["service", "logs", "--socket"])
        .arg(n.socket())
        .arg("-f")
        .args(extra)
        .arg(service)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let lines: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Default::default();
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let Some((p, rest)) = line.split_once(" | ") else {
                continue;
            };
            if let Some(n) = rest.strip_prefix("tick-").and_then(|n| n.parse().ok()) {
                l.lock()
                    .unwrap()
                    .entry(p.trim_end().to_string())
                    .or_default()
                    .push(n);
            }
        }
    });
    Followed {
        child: Mutex::new(child),
        lines,
    }
}

/// The last tick seen per task.
fn snapshot(f: &Followed) -> BTreeMap<String, u64> {
    f.lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), *v.last()?)))
        .collect()
}

#[test]
fn service_logs_follow_survives_a_leader_kill() {
    let mut c = Cluster::new(3, 3);
    create(&c, "tick", "3", TICK);
    let leader = c.leader(0).expect("a leader");
    let li = c.nodes.iter().position(|n| n.host == leader).unwrap();
    // Follow through a manager that is not the leader.
    let via = (li + 1) % 3;
    let seen = follow(&c.nodes[via], "tick", &[]);
    c.until("three tasks followed", || snapshot(&seen).len() == 3);
    let started = Instant::now();
    let pid = c.nodes[li].child.as_ref().unwrap().id();
    c.nodes[li].kill_agent();
    let at_kill = snapshot(&seen);
    eprintln!(
        "killed leader {leader} (pid {pid}) after {:?}",
        started.elapsed()
    );
    // The tasks on the other two nodes keep printing: lines written after the kill arrive.
    let others: Vec<String> = at_kill
        .keys()
        .filter(|p| !p.ends_with(&format!("@{leader}")))
        .cloned()
        .collect();
    assert_eq!(others.len(), 2, "{at_kill:?}");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = snapshot(&seen);
        if others.iter().all(|p| now[p] >= at_kill[p] + 50) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lines after the kill: {now:?} (at the kill: {at_kill:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // No line twice, none lost: each surviving task's ticks are consecutive.
    let lines = seen.lines.lock().unwrap().clone();
    for p in &others {
        let v = &lines[p];
        for w in v.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{p}: {w:?} in {v:?}");
        }
    }
    seen.stop();
}
