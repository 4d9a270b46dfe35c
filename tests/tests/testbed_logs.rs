//! `shoal service logs -f` on the test bed: three hosts (each its own network namespace, each
//! agent a manager, so a leader kill keeps a quorum), a global service with a task on every
//! host writing numbered lines to stdout and to stderr, followed from a host that does not
//! lead. Lines come from all three hosts with the two streams kept apart on the CLI's stdout
//! and stderr; the leader's agent is then SIGKILLed (by pid) and the same follow process
//! keeps printing the surviving tasks' new lines, none twice and none skipped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use shoal_tests::testbed::{pid_alive, shoal_bin, Host, Testbed, KILL_TIMEOUT};

/// Managers (every host of the test bed).
const HOSTS: usize = 3;
/// Each task: a numbered line on stdout and one on stderr every 100 ms.
const TICK: &str = "i=0; while true; do echo out-$i; echo err-$i >&2; i=$((i+1)); sleep 0.1; done";
/// Lines of each stream a task must have shown before the kill, and new ones after it.
const BEFORE_KILL: u64 = 10;
const AFTER_KILL: u64 = 30;
/// Bounds of the waits: the cluster forming, the tasks starting, the first lines, and the
/// lines after the kill (an election, the workers' sessions to the new leader and the CLI's
/// resume, on a loaded 2-core machine).
const READY: Duration = Duration::from_secs(60);
const TASKS_UP: Duration = Duration::from_secs(60);
const FIRST_LINES: Duration = Duration::from_secs(30);
const AFTER_KILL_WAIT: Duration = Duration::from_secs(60);
/// Every CLI call but the follow is bounded.
const CALL_SECS: u32 = 15;

/// The CLI on `h`, bounded; its stdout when it exits 0.
fn shoal(h: &Host, args: &[&str]) -> Result<String, String> {
    h.shoal_within(CALL_SECS, args)
}

/// The leader's hostname as `h` sees it.
fn leader(h: &Host) -> Option<String> {
    let out = shoal(h, &["node", "ls", "--format", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find(|n| n["ManagerStatus"]["Leader"].as_bool() == Some(true))
        .and_then(|n| n["Description"]["Hostname"].as_str().map(str::to_string))
}

/// The hostnames of the service's running tasks.
fn running_on(h: &Host, service: &str) -> Vec<String> {
    let Ok(out) = shoal(h, &["service", "ps", "--format", "json", service]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let nodes: serde_json::Value = shoal(h, &["node", "ls", "--format", "json"])
        .ok()
        .and_then(|o| serde_json::from_str(&o).ok())
        .unwrap_or_default();
    let host_of = |id: &str| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["ID"] == id)
            .and_then(|n| n["Description"]["Hostname"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["Status"]["State"] == "running" && t["DesiredState"] == "running")
        .map(|t| host_of(t["NodeID"].as_str().unwrap_or("")))
        .collect()
}

/// What the follow printed: per stream, the numbers in the order printed per task prefix
/// (`NAME.SLOT.TASK@HOST`), and every line that was not a task's line of that stream.
#[derive(Default, Debug, Clone)]
struct Seen {
    out: BTreeMap<String, Vec<u64>>,
    err: BTreeMap<String, Vec<u64>>,
    /// Lines on the wrong stream or not a task's line (notices on stderr).
    other_out: Vec<String>,
    other_err: Vec<String>,
}

impl Seen {
    /// The last number per task prefix in `stream`.
    fn last(stream: &BTreeMap<String, Vec<u64>>) -> BTreeMap<String, u64> {
        stream
            .iter()
            .filter_map(|(p, v)| Some((p.clone(), *v.last()?)))
            .collect()
    }
}

/// Reads `pipe` line by line into `seen`: `PREFIX | WORD-N` with `word` is a line of that
/// stream; anything else is kept as other.
fn collect(pipe: impl Read + Send + 'static, seen: Arc<Mutex<Seen>>, stderr: bool) {
    std::thread::spawn(move || {
        let word = if stderr { "err-" } else { "out-" };
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            let mut s = seen.lock().unwrap();
            let parsed = line.split_once(" | ").and_then(|(p, rest)| {
                let n = rest.strip_prefix(word)?.parse::<u64>().ok()?;
                Some((p.trim_end().to_string(), n))
            });
            match (parsed, stderr) {
                (Some((p, n)), false) => s.out.entry(p).or_default().push(n),
                (Some((p, n)), true) => s.err.entry(p).or_default().push(n),
                (None, false) => s.other_out.push(line),
                (None, true) => s.other_err.push(line),
            }
        }
    });
}

/// A running `service logs -f`, killed when dropped (before the test bed goes down).
struct Follow {
    child: Child,
    seen: Arc<Mutex<Seen>>,
}

impl Follow {
    fn start(h: &Host, service: &str) -> Follow {
        let bin = shoal_bin().expect("shoal binary");
        let mut child = h
            .command(bin)
            .args(["service", "logs", "-f", service])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("service logs -f");
        let seen: Arc<Mutex<Seen>> = Arc::default();
        collect(child.stdout.take().unwrap(), seen.clone(), false);
        collect(child.stderr.take().unwrap(), seen.clone(), true);
        Follow { child, seen }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Waits up to `bound` until `done` holds for what was printed; panics naming `what`.
    fn until(&mut self, what: &str, bound: Duration, done: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + bound;
        loop {
            let s = self.seen();
            if done(&s) {
                return s;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("service logs -f exited ({status}) waiting for {what}: {s:?}");
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// On a failure, the end of each agent's log (the test bed's down removes the files).
struct TailLogs<'a>(&'a Testbed);

impl Drop for TailLogs<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for h in self.0.hosts() {
            let log = std::fs::read_to_string(h.agent_log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- {} agent log (end) ---\n{tail}", h.name());
        }
    }
}

/// The hostname a prefix names (`…@HOST`).
fn host_of(prefix: &str) -> &str {
    prefix.rsplit_once('@').map_or("", |(_, h)| h)
}

#[test]
fn service_logs_follow_on_three_hosts_keeps_streams_apart_across_a_leader_kill() {
    // Dropped last: down on every path, a panic included.
    let tb = Testbed::up(HOSTS).expect("test bed");
    let logs = TailLogs(&tb);
    let mut pids = BTreeMap::new();
    for h in tb.hosts() {
        h.import_busybox("busybox:latest").expect("image");
        let pid = h.spawn_agent(&["--dns-upstream", "none"]).expect("agent");
        pids.insert(h.name().to_string(), pid);
    }
    let members: Vec<&dyn Member> = tb.hosts().iter().map(|h| h as &dyn Member).collect();
    ClusterBuilder::new()
        .managers(HOSTS)
        .wait_ready(READY)
        .form(&members)
        .expect("cluster");
    let h1 = tb.host(1).expect("h1");
    shoal(
        h1,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "tick",
            "--mode",
            "global",
            "--stop-grace-period",
            "1s",
            "busybox:latest",
            "sh",
            "-c",
            TICK,
        ],
    )
    .expect("service create");
    let names: Vec<String> = tb.hosts().iter().map(|h| h.name().to_string()).collect();
    let deadline = Instant::now() + TASKS_UP;
    loop {
        let mut on = running_on(h1, "tick");
        on.sort();
        if on == names {
            break;
        }
        assert!(Instant::now() < deadline, "a task on each host: {on:?}");
        sleep(Duration::from_millis(300));
    }
    let leader_name = leader(h1).expect("a leader");
    let via = tb
        .hosts()
        .iter()
        .find(|h| h.name() != leader_name)
        .expect("a host that does not lead");

    let mut follow = Follow::start(via, "tick");
    let seen = follow.until("lines of both streams from every host", FIRST_LINES, |s| {
        [&s.out, &s.err].iter().all(|stream| {
            let last = Seen::last(stream);
            names.iter().all(|n| {
                last.iter()
                    .any(|(p, &i)| host_of(p) == n && i >= BEFORE_KILL)
            })
        })
    });
    // The streams apart: task lines of stdout only on stdout, of stderr only on stderr, each
    // task under the same prefix on both.
    assert!(seen.other_out.is_empty(), "stdout: {:?}", seen.other_out);
    assert!(
        seen.other_err.iter().all(|l| !l.contains("| out-")),
        "stdout lines on stderr: {:?}",
        seen.other_err
    );
    assert_eq!(
        seen.out.keys().collect::<Vec<_>>(),
        seen.err.keys().collect::<Vec<_>>()
    );
    assert_eq!(seen.out.len(), HOSTS, "one task per host: {seen:?}");

    // SIGKILL to the leader's agent, by its pid (its task's container keeps running).
    let leader_host = tb
        .hosts()
        .iter()
        .find(|h| h.name() == leader_name)
        .expect("the leader's host");
    let pid = pids[&leader_name];
    assert!(pid_alive(pid), "the leader's agent {pid} runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the leader's agent");
    leader_host
        .wait_exit(pid, KILL_TIMEOUT)
        .expect("the leader's agent gone");
    let killed = Instant::now();
    let at_kill = follow.seen();
    let (out_at, err_at) = (Seen::last(&at_kill.out), Seen::last(&at_kill.err));
    let survivors: Vec<String> = out_at
        .keys()
        .filter(|p| host_of(p) != leader_name)
        .cloned()
        .collect();
    assert_eq!(survivors.len(), HOSTS - 1, "{at_kill:?}");

    // The same follow process prints the survivors' new lines, on both streams.
    let after = follow.until(
        "new lines from the surviving tasks after the kill",
        AFTER_KILL_WAIT,
        |s| {
            let (out, err) = (Seen::last(&s.out), Seen::last(&s.err));
            survivors.iter().all(|p| {
                out.get(p).is_some_and(|&n| n >= out_at[p] + AFTER_KILL)
                    && err.get(p).is_some_and(|&n| n >= err_at[p] + AFTER_KILL)
            })
        },
    );
    eprintln!(
        "leader {leader_name} (pid {pid}) killed; {AFTER_KILL} new lines per stream from {survivors:?} \
         {:?} later (stdout at the kill {out_at:?}, now {:?})",
        killed.elapsed(),
        Seen::last(&after.out)
    );
    assert!(
        follow.child.try_wait().expect("try_wait").is_none(),
        "the follow process is still the one following"
    );
    assert!(after.other_out.is_empty(), "stdout: {:?}", after.other_out);
    assert!(
        after.other_err.iter().all(|l| !l.contains("| out-")),
        "stdout lines on stderr: {:?}",
        after.other_err
    );
    // None twice, none skipped: each surviving task's numbers are consecutive on each stream.
    for p in &survivors {
        for (name, stream) in [("stdout", &after.out), ("stderr", &after.err)] {
            let v = &stream[p];
            for w in v.windows(2) {
                assert_eq!(w[1], w[0] + 1, "{p} {name}: {w:?} in {v:?}");
            }
        }
    }
    drop(follow);
    drop(logs);
    tb.down().expect("down");
}
