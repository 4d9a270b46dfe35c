//! Issue 18 as a regression test, with real parts: three `shoal agent` managers in test bed
//! hosts, the leader's data dir on ext4 on a loop device. The leader's disk fills up (or
//! stops: the file system frozen, every write and fsync blocked): the two others must elect a
//! new leader within [`NEW_LEADER_BOUND`], writes through it are acknowledged, and once the
//! disk works again the old leader is back as a follower that takes writes and applies them
//! (it is made leader again and serves every acknowledged write from its own store). No
//! acknowledged write is lost.
//!
//! A leader whose Raft core is wedged (an apply that failed on a full disk, an fsync that does
//! not return) kept its metrics — a fresh quorum ack among them — and its `LeaderPing` beacons
//! kept the followers from electing: the cluster stayed without a working leader until the
//! daemon took the silent core as stopped ([`RAFT_STUCK_AFTER`] = 10 s), or for good. The
//! bound here is well under that: the stuck-disk test fails without the beacon gate of
//! `manager/src/raft/elect.rs` (`may_beacon`'s core check; checked on 2026-12-07: no new
//! leader within the bound). A full disk wedges the core only sometimes — more often the core
//! quits on the refused log write, which stops the beacons by itself — so the disk-full test
//! runs [`FULL_ROUNDS`] rounds and proves the gate in the rounds that wedge.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use shoal_tests::disk::{fill, LoopFs};
use shoal_tests::testbed::{Host, Signal, Testbed};

/// The loop file system under the first manager's data dir.
const FS_MIB: u64 = 128;
/// Managers (every host of the test bed).
const MANAGERS: usize = 3;
/// The daemon's bound for a silent Raft core (`manager::daemon::RAFT_STUCK_AFTER`), the
/// only way out before the beacon gate.
const RAFT_STUCK_AFTER: Duration = Duration::from_secs(10);
/// From the fault to a new leader: the gate stops the beacons after two leases (800 ms at the
/// default 200–400 ms election timeouts), a follower elects a lease and its jitter later;
/// the rest is slack for a loaded 2-core machine. Well under [`RAFT_STUCK_AFTER`].
const NEW_LEADER_BOUND: Duration = Duration::from_secs(6);
// The bound proves the beacon gate only while it stays below the daemon's own way out.
const _: () = assert!(NEW_LEADER_BOUND.as_secs() + 2 < RAFT_STUCK_AFTER.as_secs());
/// How long the fault is held once the new leader is known.
const HOLD: Duration = Duration::from_secs(4);
/// How long the old leader may take to be back once its disk works again (it may re-execute
/// itself and wait for room, see `watch_raft`).
const REJOIN_BOUND: Duration = Duration::from_secs(60);
/// Every CLI call is bounded (a call forwarded to a wedged leader would hang).
const CALL_SECS: u32 = 12;
/// While a new leader is awaited, `node ls` is bounded by this (a follower that still takes
/// the wedged leader for its leader forwards the call to it), and run by [`PROBES_PER_HOST`]
/// pollers per host, started [`PROBE_STAGGER`] apart, so that one hanging call does not hide
/// the election for long.
const PROBE_SECS: u32 = 2;
/// A CLI call through a manager whose disk failed: its proposal's bound (10 s), the probe of its
/// own core, and room for a loaded machine.
const PROPOSE_ANSWER_SECS: u32 = 20;
const PROBES_PER_HOST: u32 = 3;
const PROBE_STAGGER: Duration = Duration::from_millis(300);
/// Attempts at moving leadership back to the first manager.
const LEAD_ATTEMPTS: usize = 4;
/// How long the target of [`make_leader`] runs alone (its elections fail, its term climbs).
const TARGET_ALONE: Duration = Duration::from_millis(1500);
/// How long a stopped leader's successor is waited for.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(10);
/// Labels of this many bytes ride on each write made during the fault, so the leader's
/// log and state grow while its disk is full.
const BALLAST_LABELS: usize = 12;
const LABEL_BYTES: usize = 4000;
/// The first writes of each round carry them (all of them would make `service ls` answers
/// larger than the control API's message limit).
const BIG_WRITES: usize = 10;
/// Writes the background writer makes at most.
const MAX_WRITES: usize = 400;
/// Disk-full rounds in one test (whether the full leader's core quits or wedges depends on
/// which of its writes meets the full disk first).
const FULL_ROUNDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The data dir filled to ENOSPC.
    Full,
    /// The data dir's file system frozen: writes and fsyncs block.
    Stuck,
}

/// Runs the CLI on `h` with a bound; `Ok(stdout)` when it exits 0, else its stderr.
fn shoal(h: &Host, args: &[&str]) -> Result<String, String> {
    h.shoal_within(CALL_SECS, args)
}

/// One manager's view through `node ls`: the leader's hostname and the unwell nodes.
#[derive(Debug, Default)]
struct View {
    leader: Option<String>,
    unwell: Vec<String>,
}

fn view(h: &Host) -> Option<View> {
    view_within(h, CALL_SECS)
}

/// [`view`] bounded by `secs` seconds.
fn view_within(h: &Host, secs: u32) -> Option<View> {
    let out = h
        .shoal_within(secs, &["node", "ls", "--format", "json"])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut view = View::default();
    for n in v.as_array()? {
        let host = n["Description"]["Hostname"].as_str().unwrap_or("?");
        if n["ManagerStatus"]["Leader"].as_bool() == Some(true) {
            view.leader = Some(host.to_string());
        }
        let state = n["Status"]["State"].as_str().unwrap_or("");
        let reach = n["ManagerStatus"]["Reachability"].as_str().unwrap_or("");
        if !state.eq_ignore_ascii_case("ready") || reach != "reachable" {
            view.unwell.push(format!("{host} {state} {reach}"));
        }
    }
    Some(view)
}

/// The leader as some host in `via` sees it, if any answers and names one.
fn leader_seen(via: &[&Host]) -> Option<String> {
    via.iter().find_map(|h| view(h).and_then(|v| v.leader))
}

fn host_named<'a>(tb: &'a Testbed, name: &str) -> &'a Host {
    tb.hosts()
        .iter()
        .find(|h| h.name() == name)
        .unwrap_or_else(|| panic!("no host {name}"))
}

fn ballast() -> Vec<String> {
    (0..BALLAST_LABELS)
        .map(|i| format!("ballast.{i}={}", "x".repeat(LABEL_BYTES)))
        .collect()
}

/// Creates service `name` (no replicas) through `h`; with ballast labels when `big`.
fn create(h: &Host, name: &str, big: bool) -> Result<(), String> {
    create_within(h, CALL_SECS, name, big)
}

/// [`create`] bounded by `secs` seconds.
fn create_within(h: &Host, secs: u32, name: &str, big: bool) -> Result<(), String> {
    let labels = if big { ballast() } else { Vec::new() };
    let mut args = vec!["service", "create", "-d", "--name", name, "--replicas", "0"];
    for l in &labels {
        args.extend(["--label", l.as_str()]);
    }
    args.extend(["busybox:latest", "sleep", "1"]);
    h.shoal_within(secs, &args).map(drop)
}

/// Every service name `h` lists.
fn service_names(h: &Host) -> Result<BTreeSet<String>, String> {
    let out = shoal(h, &["service", "ls", "--format", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["Spec"]["Name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Makes `target` the leader: stops whoever leads and every other manager but `target`, so
/// that `target` alone starts elections for a while (and has the highest term), then resumes
/// the others — the first one back grants `target` its vote. At most [`LEAD_ATTEMPTS`] times;
/// panics if `target` never leads.
fn make_leader(tb: &Testbed, target: &Host) {
    let all: Vec<&Host> = tb.hosts().iter().collect();
    for _ in 0..LEAD_ATTEMPTS {
        let Some(l) = leader_seen(&all) else {
            sleep(Duration::from_millis(300));
            continue;
        };
        if l == target.name() {
            return;
        }
        eprintln!("make_leader: {l} leads; stopping it and the other followers");
        let rest: Vec<&Host> = all
            .iter()
            .copied()
            .filter(|h| h.name() != target.name())
            .collect();
        for h in &rest {
            h.kill(Signal::Stop).expect("stopping a manager");
        }
        sleep(TARGET_ALONE);
        // The followers first, the old leader last.
        for h in rest.iter().filter(|h| h.name() != l) {
            h.kill(Signal::Cont).expect("resuming a follower");
        }
        let start = Instant::now();
        let others: Vec<&Host> = all.iter().copied().filter(|h| h.name() != l).collect();
        while start.elapsed() < SUCCESSOR_WAIT {
            if leader_seen(&others).is_some_and(|n| n != l) {
                break;
            }
            sleep(Duration::from_millis(200));
        }
        host_named(tb, &l)
            .kill(Signal::Cont)
            .expect("resuming the leader");
        sleep(Duration::from_secs(1));
    }
    let l = leader_seen(&all);
    if l.as_deref() != Some(target.name()) {
        let log = std::fs::read(target.agent_log()).unwrap_or_default();
        let text = String::from_utf8_lossy(&log);
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        panic!(
            "{} did not become the leader in {LEAD_ATTEMPTS} attempts ({l:?} leads); its log, last lines first:\n{}",
            target.name(),
            tail.join("\n")
        );
    }
}

/// Polls `node ls` on each of `via` (several pollers per host, each call bounded) until one
/// names a leader other than `old`; returns it with the time since `t0`, or `None` after
/// `bound`.
fn wait_new_leader(
    via: &[&Host],
    old: &str,
    t0: Instant,
    bound: Duration,
) -> Option<(String, Duration)> {
    let found: Mutex<Option<(String, Duration)>> = Mutex::new(None);
    std::thread::scope(|s| {
        for h in via {
            for k in 0..PROBES_PER_HOST {
                let found = &found;
                s.spawn(move || {
                    sleep(PROBE_STAGGER * k);
                    while t0.elapsed() < bound && found.lock().unwrap().is_none() {
                        if let Some(l) = view_within(h, PROBE_SECS).and_then(|v| v.leader) {
                            if l != old {
                                found.lock().unwrap().get_or_insert((l, t0.elapsed()));
                            }
                        }
                        sleep(Duration::from_millis(100));
                    }
                });
            }
        }
    });
    found.into_inner().unwrap()
}

/// Acknowledged writes, by name, shared with the background writer.
type Acked = Arc<Mutex<Vec<String>>>;

/// Keeps writing (big specs, through the followers in turn) until `stop`; records the
/// acknowledged ones.
fn spawn_writer(
    via: Vec<Host>,
    round: usize,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut refused = Vec::new();
        for i in 0..MAX_WRITES {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let h = &via[i % via.len()];
            let name = format!("r{round}-during-{i}");
            match create(h, &name, i < BIG_WRITES) {
                Ok(()) => acked.lock().unwrap().push(name),
                Err(e) => refused.push(format!("{name} via {}: {e}", h.name())),
            }
            sleep(Duration::from_millis(100));
        }
        refused
    })
}

/// What the managers say about Raft (each asked with a short bound) and which threads of
/// `old`'s agent are blocked where: for a failure's message.
fn diagnose(tb: &Testbed, old: &Host) -> String {
    let mut out = Vec::new();
    for h in tb.hosts() {
        let inspect = h
            .shoal_within(PROBE_SECS, &["cluster", "inspect"])
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .map(|v| v["Raft"].to_string())
            .unwrap_or_else(|| "no answer".into());
        out.push(format!("{} raft {inspect}", h.name()));
    }
    if let Some(pid) = old.agent_pid() {
        let mut states = std::collections::BTreeMap::<String, usize>::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                let state = stat
                    .rsplit_once(") ")
                    .map_or("?", |(_, r)| &r[..1])
                    .to_string();
                let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                *states
                    .entry(format!("{state} {} {}", comm.trim(), wchan.trim()))
                    .or_default() += 1;
            }
        }
        out.push(format!(
            "{} threads (state name wchan: count): {states:?}",
            old.name()
        ));
    }
    out.join("; ")
}

/// One round: `old` leads; its disk fails (`fault`); a new leader within the bound, writes
/// through it, the disk back, `old` back as a follower that takes writes.
fn round(tb: &Testbed, fs: &LoopFs, old: &Host, fault: Fault, round: usize, acked: &Acked) {
    let others: Vec<&Host> = tb
        .hosts()
        .iter()
        .filter(|h| h.name() != old.name())
        .collect();
    let filler = fs.dir().join("test-filler");
    let log_before = std::fs::metadata(old.agent_log()).map_or(0, |m| m.len());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(
        others.iter().map(|h| (*h).clone()).collect(),
        round,
        acked.clone(),
        stop.clone(),
    );
    // The writer has the leader append before the fault, so the fault meets a busy leader.
    sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    match fault {
        Fault::Full => {
            let n = fill(&filler).expect("filling the disk");
            eprintln!("round {round}: {} MiB filled on {}", n >> 20, old.name());
        }
        Fault::Stuck => fs.freeze().expect("freezing the disk"),
    }
    // A new leader, as the two others see it.
    let Some(elected) = wait_new_leader(&others, old.name(), t0, NEW_LEADER_BOUND) else {
        stop.store(true, Ordering::Relaxed);
        let _ = fs.thaw();
        let _ = std::fs::remove_file(&filler);
        let refused = writer.join().unwrap_or_default();
        let log = std::fs::read(old.agent_log()).unwrap_or_default();
        let tail = String::from_utf8_lossy(&log[(log_before as usize).min(log.len())..])
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "round {round} ({fault:?}): no new leader {} s after {}'s disk failed \
             (refused writes: {refused:?}); {}; its log, last lines first:\n{tail}",
            NEW_LEADER_BOUND.as_secs(),
            old.name(),
            diagnose(tb, old)
        );
    };
    eprintln!(
        "round {round} ({fault:?}): {} leads {:.1} s after the fault",
        elected.0,
        elected.1.as_secs_f64()
    );
    // A write through the manager whose disk is full is taken or refused saying why — whether
    // its Raft core quit on the error or hangs on it without one.
    if fault == Fault::Full {
        let name = format!("r{round}-via-old");
        match create_within(old, PROPOSE_ANSWER_SECS, &name, false) {
            Ok(_) => acked.lock().unwrap().push(name),
            Err(e) => assert!(
                ["space", "disk", "full"].iter().any(|w| e.contains(w)),
                "round {round}: a write through {} with its disk full got an answer that does \
                 not say why: {e}",
                old.name()
            ),
        }
    }
    // Writes through the new leader itself are acknowledged while the old one is still down.
    let new = host_named(tb, &elected.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..3 {
        let name = format!("r{round}-new-leader-{i}");
        loop {
            match create(new, &name, false) {
                Ok(()) => {
                    acked.lock().unwrap().push(name.clone());
                    break;
                }
                Err(e) if e.contains("already in use") => break,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "the new leader {} takes no write: {e}",
                        new.name()
                    );
                    sleep(Duration::from_millis(300));
                }
            }
        }
    }
    sleep(HOLD);
    // What the old leader wrote in its log during the fault: the fault must have reached it.
    let log = std::fs::read(old.agent_log()).unwrap_or_default();
    let during = String::from_utf8_lossy(&log[(log_before as usize).min(log.len())..]).into_owned();
    for l in during.lines().filter(|l| {
        l.contains("raft stopped")
            || l.contains("quit RaftCore")
            || l.contains("core has not answered")
            || l.contains("storage refuses")
            || l.contains("afresh")
    }) {
        eprintln!(
            "round {round}: {}: {}",
            old.name(),
            l.chars().take(300).collect::<String>()
        );
    }
    if fault == Fault::Full {
        assert!(
            during.contains("No space left on device") || during.contains("os error 28"),
            "round {round}: {}'s log does not show the full disk:\n{during}",
            old.name()
        );
    }
    match fault {
        Fault::Full => std::fs::remove_file(&filler).expect("freeing the disk"),
        Fault::Stuck => fs.thaw().expect("thawing the disk"),
    }
    stop.store(true, Ordering::Relaxed);
    let refused = writer.join().expect("writer");
    eprintln!(
        "round {round}: {} writes refused or unanswered during the fault",
        refused.len()
    );
    // The old leader is back: reachable, Ready, not the leader, and takes writes (forwarded).
    let start = Instant::now();
    loop {
        let v = view(new);
        let last;
        let back = v.as_ref().is_some_and(|v| {
            v.unwell.is_empty() && v.leader.as_deref().is_some_and(|l| l != old.name())
        });
        if back {
            let name = format!("r{round}-via-old-{}", start.elapsed().as_millis());
            match create(old, &name, false) {
                Ok(()) => {
                    acked.lock().unwrap().push(name);
                    break;
                }
                Err(e) => last = format!("write through {}: {e}", old.name()),
            }
        } else {
            last = format!("{v:?}");
        }
        assert!(
            start.elapsed() < REJOIN_BOUND,
            "round {round}: {} not back as a follower {} s after its disk works again: {last}",
            old.name(),
            REJOIN_BOUND.as_secs()
        );
        sleep(Duration::from_millis(500));
    }
    eprintln!(
        "round {round}: {} back as a follower, taking writes, {:.1} s after the disk works",
        old.name(),
        start.elapsed().as_secs_f64()
    );
    // Started afresh or not, `ps` shows the agent as it was started.
    let pid = old.agent_pid().expect("the old leader's agent runs");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let arg0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    assert_ne!(
        String::from_utf8_lossy(arg0),
        "/proc/self/exe",
        "round {round}: the agent started afresh shows in ps as /proc/self/exe"
    );
}

/// On a failure, keeps every agent's log (the test bed's directories go with it).
struct KeepLogs<'a>(&'a Testbed);

impl Drop for KeepLogs<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("shoal-disk-fault-leader-{}", self.0.prefix()));
        if std::fs::create_dir_all(&dir).is_ok() {
            for h in self.0.hosts() {
                let _ = std::fs::copy(h.agent_log(), dir.join(format!("{}.agent.log", h.name())));
            }
            eprintln!("agent logs kept in {}", dir.display());
        }
    }
}

fn scenario(fault: Fault, rounds: usize) {
    let tb = Testbed::up(MANAGERS).expect("test bed");
    let _logs = KeepLogs(&tb);
    let first = tb.host(1).expect("h1").clone();
    // Dropped before the test bed (declared after it): thawed and unmounted on every path.
    let fs = LoopFs::mount(&first.data_dir(), FS_MIB).expect("ext4 on a loop device");
    for h in tb.hosts() {
        // A local image: nothing for a manager to look up in a registry.
        h.import_busybox("busybox:latest").expect("image");
        h.spawn_agent(&[]).expect("agent");
    }
    let members: Vec<&dyn Member> = tb.hosts().iter().map(|h| h as &dyn Member).collect();
    ClusterBuilder::new()
        .managers(MANAGERS)
        .wait_ready(Duration::from_secs(60))
        .form(&members)
        .expect("cluster");
    let acked: Acked = Arc::default();
    for i in 0..3 {
        let name = format!("before-{i}");
        create(&first, &name, false).expect("a write before the fault");
        acked.lock().unwrap().push(name);
    }
    for r in 0..rounds {
        make_leader(&tb, &first);
        round(&tb, &fs, &first, fault, r, &acked);
    }
    // The old leader applied what was written while it was down and since: made leader, it
    // answers from its own store (after confirming leadership with a quorum).
    make_leader(&tb, &first);
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 3 * rounds + 3,
        "too few writes acknowledged: {acked:?}"
    );
    let seen = service_names(&first).expect("service ls through the old leader");
    assert_eq!(
        leader_seen(&[&first]).as_deref(),
        Some(first.name()),
        "leadership moved during the final read"
    );
    let lost: Vec<&String> = acked.iter().filter(|n| !seen.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing from {}'s store: {lost:?}",
        first.name()
    );
    let second = tb.host(2).expect("h2");
    let seen2 = service_names(second).expect("service ls through h2");
    assert!(acked.iter().all(|n| seen2.contains(n)));
    eprintln!(
        "{} acknowledged writes, all in {}'s store",
        acked.len(),
        first.name()
    );
    drop(fs);
}

/// The leader's data dir fills up (ENOSPC on ext4), three times.
#[test]
fn a_leader_whose_disk_fills_up_is_replaced_and_rejoins_as_follower() {
    scenario(Fault::Full, FULL_ROUNDS);
}

/// The leader's disk stops (its file system frozen: an fsync that does not return).
#[test]
fn a_leader_whose_disk_stops_is_replaced_and_rejoins_as_follower() {
    scenario(Fault::Stuck, 1);
}

/// Rounds of [`a_leader_killed_and_restarted_on_a_full_disk_waits_for_room_and_rejoins`]
/// (its chaos seed replayed at least three times).
const RESTART_ROUNDS: usize = 3;
/// How long the agent started on a full disk may take to say that it waits.
const SAYS_WAITING_WITHIN: Duration = Duration::from_secs(20);

/// The leader's agent is SIGKILLed and started again while its disk is full (chaos seed
/// 20261208007: the new agent opened its store on the full tmpfs and hung for good, without a
/// word or a socket, even once space returned; on ext4 it exits with ENOSPC). It must wait for
/// room, saying so, and once the disk has room come back as a follower with every
/// acknowledged write.
#[test]
fn a_leader_killed_and_restarted_on_a_full_disk_waits_for_room_and_rejoins() {
    let tb = Testbed::up(MANAGERS).expect("test bed");
    let _logs = KeepLogs(&tb);
    let first = tb.host(1).expect("h1").clone();
    let second = tb.host(2).expect("h2").clone();
    let fs = LoopFs::mount(&first.data_dir(), FS_MIB).expect("ext4 on a loop device");
    for h in tb.hosts() {
        h.import_busybox("busybox:latest").expect("image");
        h.spawn_agent(&[]).expect("agent");
    }
    let members: Vec<&dyn Member> = tb.hosts().iter().map(|h| h as &dyn Member).collect();
    ClusterBuilder::new()
        .managers(MANAGERS)
        .wait_ready(Duration::from_secs(60))
        .form(&members)
        .expect("cluster");
    let mut acked = vec!["before".to_string()];
    create(&first, "before", false).expect("a write before the fault");
    let filler = fs.dir().join("test-filler");
    for round in 0..RESTART_ROUNDS {
        make_leader(&tb, &first);
        first
            .kill(Signal::Kill)
            .expect("SIGKILL the leader's agent");
        let n = fill(&filler).expect("filling the disk");
        eprintln!("round {round}: {} MiB filled on {}", n >> 20, first.name());
        let log_before = std::fs::metadata(first.agent_log()).map_or(0, |m| m.len());
        let pid = first.spawn_agent_unready(&[]).expect("agent started");
        // Alive, saying that it waits (and no socket: it opens nothing before there is room).
        let since = Instant::now();
        loop {
            let log = std::fs::read(first.agent_log()).unwrap_or_default();
            let said =
                String::from_utf8_lossy(&log[(log_before as usize).min(log.len())..]).into_owned();
            if said.contains("waits for room") {
                break;
            }
            assert!(
                shoal_tests::testbed::pid_alive(pid),
                "round {round}: the agent started on a full disk ended:\n{said}"
            );
            assert!(
                since.elapsed() < SAYS_WAITING_WITHIN,
                "round {round}: the agent started on a full disk does not say it waits:\n{said}"
            );
            sleep(Duration::from_millis(200));
        }
        assert!(
            std::os::unix::net::UnixStream::connect(first.socket()).is_err(),
            "round {round}: the waiting agent serves its socket"
        );
        // The two others elected a leader and take writes meanwhile.
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..3 {
            let name = format!("r{round}-while-full-{i}");
            while let Err(e) = create(&second, &name, false) {
                if e.contains("already in use") {
                    break;
                }
                assert!(Instant::now() < deadline, "no write taken without h1: {e}");
                sleep(Duration::from_millis(300));
            }
            acked.push(name);
        }
        std::fs::remove_file(&filler).expect("freeing the disk");
        // The same process starts once there is room, and is back as a follower taking writes.
        let start = Instant::now();
        let after = format!("r{round}-after");
        loop {
            let back = view(&second)
                .is_some_and(|v| v.unwell.is_empty() && v.leader.as_deref() != Some(first.name()))
                && match create(&first, &after, false) {
                    Ok(()) => true,
                    Err(e) => e.contains("already in use"),
                };
            if back {
                acked.push(after);
                break;
            }
            assert!(
                start.elapsed() < REJOIN_BOUND,
                "round {round}: {} not back {} s after its disk has room; {}",
                first.name(),
                REJOIN_BOUND.as_secs(),
                diagnose(&tb, &first)
            );
            sleep(Duration::from_millis(500));
        }
        assert_eq!(
            first.agent_pid(),
            Some(pid),
            "the waiting agent itself started"
        );
        eprintln!(
            "round {round}: {} back {:.1} s after its disk has room",
            first.name(),
            start.elapsed().as_secs_f64()
        );
    }
    make_leader(&tb, &first);
    let seen = service_names(&first).expect("service ls through h1");
    let lost: Vec<&String> = acked.iter().filter(|n| !seen.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing from h1: {lost:?}"
    );
    drop(fs);
}

/// The loop file system the tests above stand on: a real ext4 of the size asked, filled to
/// ENOSPC, frozen (a write blocks until the thaw), and gone without a trace when dropped.
#[test]
fn a_loop_file_system_fills_freezes_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    let fs = LoopFs::mount(&mnt, 32).expect("ext4 on a loop device");
    assert!(shoal_tests::disk::is_mount_point(&mnt));
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(mounts.contains(&format!("{} {} ext4", fs.device(), mnt.display())));
    let n = fill(&mnt.join("filler")).expect("fill");
    assert!((16 << 20..=32 << 20).contains(&n), "{n} bytes filled");
    let err = std::fs::write(mnt.join("more"), vec![0u8; 1 << 20]).expect_err("a full disk");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    std::fs::remove_file(mnt.join("filler")).expect("free");
    std::fs::remove_file(mnt.join("more")).ok();
    // Frozen: a write (with its fsync) from another thread finishes only after the thaw.
    fs.freeze().expect("freeze");
    let path = mnt.join("after-thaw");
    let writer = std::thread::spawn(move || {
        let f = std::fs::File::create(&path)?;
        std::io::Write::write_all(&mut &f, b"x")?;
        f.sync_all()?;
        Ok::<Instant, std::io::Error>(Instant::now())
    });
    sleep(Duration::from_millis(500));
    assert!(
        !writer.is_finished(),
        "a write went through a frozen file system"
    );
    let thawed = Instant::now();
    fs.thaw().expect("thaw");
    let done = writer
        .join()
        .expect("writer")
        .expect("the write after the thaw");
    assert!(done >= thawed);
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        fs.device().trim_start_matches("/dev/")
    );
    // Its backing file is unlinked already: nothing is left on disk while it is mounted.
    let file = std::fs::read_to_string(&backing).expect("the loop device's backing file");
    assert!(file.trim_end().ends_with("(deleted)"), "{file}");
    drop(fs);
    assert!(!shoal_tests::disk::is_mount_point(&mnt), "still mounted");
    // The loop device went with the mount (the kernel frees it once detached and unmounted;
    // another test may take the device again, never with this backing file).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&backing).is_ok_and(|b| b == file) {
        assert!(Instant::now() < deadline, "the loop device is left: {file}");
        sleep(Duration::from_millis(100));
    }
}
