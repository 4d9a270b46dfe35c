//! Node loss: the time from cutting a node off until no new connection to a service's virtual
//! IP goes to the lost node's task any more (the target: none 3 s after it dies).
//!
//! A 2-host test bed, a cluster formed by `ClusterBuilder` (host 1 the manager, host 2 a
//! worker), a network `bench`, a service `pool` of 2 busybox httpd tasks that serve their
//! hostname (the task's short id) with `--replicas-max-per-node 1` (one task on each host), and
//! a service `client` of one busybox `sleep` task on host 1. As in `scale-answer`, the VIP is
//! what `pool` resolves to in the client's container, and a thread of this process joins the
//! client container's network namespace and fetches http://VIP/ every --probe-interval-ms, a
//! new connection each (balanced by the nftables table in that namespace, exactly what a
//! program in the client task gets), with a short connect timeout (--connect-timeout-ms: a
//! connection DNATed to the cut-off task never gets an answer). Every probe is logged with the
//! instant it started (when the connection, and so the choice of task, was made) and which
//! hostname answered, if any.
//!
//! A round: `testbed.sh partition h1 h2` (host 2 cut off, its agent and its task unreachable
//! from host 1) while probing; the result is the time from the start of that command until the
//! start of the last probe not answered by host 1's task, once every probe for at least
//! [`SETTLED`] after it has been answered by host 1's task. The cut takes effect during the
//! command (its duration is reported), so the figure errs on the long side by at most that;
//! the moment the table changed lies between the last failed probe's start and the next
//! probe's start (one connect timeout plus one interval later). Meanwhile `node ls` is polled
//! for host 2 to be seen Down (from the same instant; one CLI process per poll, every 200 ms).
//!
//! Then `testbed.sh heal`. While host 2 is cut off the orchestrator retires its task and makes
//! a replacement, which `--replicas-max-per-node 1` keeps off host 1 (it already runs one), so
//! it waits, pending, for host 2 to come back: after healing, the round waits (bounded) until
//! `pool` again runs one task on each host and both hostnames answer through the VIP. Waiting
//! keeps the client, the VIP and host 1's task the same across rounds (re-creating the service
//! each round would also re-create the VIP and its nftables maps, a different path than the
//! one measured); a round that does not get back to that state within [`WAIT`] is an error.
//!
//! The dispatcher timers that decide when a silent node is Down are the cluster's defaults
//! (read back with `cluster inspect` and printed). Traffic goes only to the VIP and tasks of this
//! run's own cluster network. Dropping the test bed at the end (or on an error) removes the
//! cluster, the tasks, the partition rules and the namespaces.

use crate::bed::{load1, Bed, Task, IMAGE, WEB};
use crate::scale_answer::parse_nslookup;
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds on the arguments.
const MAX_ROUNDS: usize = 10;
const MAX_INTERVAL_MS: u64 = 1000;
const MAX_CONNECT_TIMEOUT_MS: u64 = 2000;
/// Longest wait for anything in a round: the VIP to settle after the cut, the node to be seen
/// Down, the pool to run on both hosts again and answer after healing.
const WAIT: Duration = Duration::from_secs(60);
/// How long every probe must answer from the surviving task before the cut counts as done.
const SETTLED: Duration = Duration::from_secs(2);
/// Read and write timeout of one probe once connected (the surviving task's httpd forks).
const IO_TIMEOUT: Duration = Duration::from_millis(2000);
/// Pause between polls of the manager (one CLI process each).
const POLL: Duration = Duration::from_millis(200);
/// Pause between rounds.
const PAUSE: Duration = Duration::from_secs(1);
/// The target: no connection goes to the lost node's task 3 s after it dies.
const TARGET: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub struct NodeLossArgs {
    /// Rounds (cut host 2 off, measure, heal).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pause between two probes of the VIP (each a new connection), in milliseconds.
    #[arg(long, default_value_t = 10)]
    probe_interval_ms: u64,
    /// Connect timeout of one probe, in milliseconds (a probe to the lost task fails after it).
    #[arg(long, default_value_t = 200)]
    connect_timeout_ms: u64,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
}

/// One probe: when it started and the hostname that answered (`None`: refused, timed out or
/// an unexpected answer).
type Entry = (Instant, Option<String>);

/// The probe thread; stopped and joined when dropped (it holds the client's namespace).
struct Probe {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Entry>>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Probe {
    fn start(
        netns: PathBuf,
        vip: Ipv4Addr,
        interval: Duration,
        connect: Duration,
    ) -> Result<Probe> {
        let ns =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("joining {}", netns.display()))?;
            drop(ns);
            while !stop2.load(Ordering::Relaxed) {
                let t = Instant::now();
                let h = crate::bed::hello_from(vip, "pool", connect, IO_TIMEOUT).ok();
                log2.lock().unwrap_or_else(|p| p.into_inner()).push((t, h));
                std::thread::sleep(interval);
            }
            Ok(())
        });
        Ok(Probe {
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// The probes that started at or after `from`.
    fn since(&self, from: Instant) -> Vec<Entry> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let i = log.partition_point(|(t, _)| *t < from);
        log[i..].to_vec()
    }

    /// (probes, failed probes) over the whole run.
    fn counts(&self) -> (usize, usize) {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        (log.len(), log.iter().filter(|(_, h)| h.is_none()).count())
    }

    /// Whether the thread is still probing (it ends early only on a setns error).
    fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(t) = self.thread.take() {
                match t.join() {
                    Ok(r) => r?,
                    Err(_) => bail!("the probe thread panicked"),
                }
            }
            bail!("the probe thread stopped");
        }
        Ok(())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Over the probes that started after the cut (in order): the start of the last one that was
/// not answered by `survivor`, once at least `settled` of answers by `survivor` follow it
/// (`Some(None)`: every probe since the cut answered from `survivor`, for `settled`); `None`
/// while not settled.
fn settled_at(log: &[Entry], survivor: &str, settled: Duration) -> Option<Option<Instant>> {
    let first = log.first()?.0;
    let last = log.last()?.0;
    let bad = log
        .iter()
        .rev()
        .find(|(_, h)| h.as_deref() != Some(survivor))
        .map(|(t, _)| *t);
    let since = bad.unwrap_or(first);
    (last.saturating_duration_since(since) >= settled).then_some(bad)
}

/// Host 2's state as `node ls` on the manager shows it (`down`, `ready`, …).
fn node_state(bed: &Bed, hostname: &str) -> Result<String> {
    let out = bed.shoal(&["node", "ls", "--format", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("node ls json")?;
    Ok(v.as_array()
        .context("node ls: not an array")?
        .iter()
        .find(|n| n["Description"]["Hostname"] == hostname)
        .and_then(|n| n["Status"]["State"].as_str())
        .unwrap_or("")
        .to_string())
}

/// The pool's task on each node: (on `n1`, on `n2`) if it runs exactly one on each.
fn one_each(tasks: &[Task], n1: &str, n2: &str) -> Option<(Task, Task)> {
    if tasks.len() != 2 {
        return None;
    }
    let a = tasks.iter().find(|t| t.node == n1)?.clone();
    let b = tasks.iter().find(|t| t.node == n2)?.clone();
    Some((a, b))
}

/// Waits (bounded by [`WAIT`]) until `pool` runs one task on each node (each with its network
/// namespace) and both hostnames answer probes started after that; the two tasks.
fn wait_both(bed: &Bed, probe: &mut Probe, n1: &str, n2: &str) -> Result<(Task, Task)> {
    let t0 = Instant::now();
    let (a, b) = loop {
        let tasks = bed.tasks("pool")?;
        if let Some((a, b)) = one_each(&tasks, n1, n2) {
            if a.netns().exists() && b.netns().exists() {
                break (a, b);
            }
        }
        if t0.elapsed() > WAIT {
            bail!(
                "pool does not run one task on each host after {WAIT:?}: {:?}",
                tasks
                    .iter()
                    .map(|t| (t.hostname(), t.node.clone()))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(POLL);
    };
    let from = Instant::now();
    let (ha, hb) = (a.hostname(), b.hostname());
    loop {
        probe.check()?;
        let log = probe.since(from);
        let answered = |h: &str| log.iter().any(|(_, x)| x.as_deref() == Some(h));
        if answered(&ha) && answered(&hb) {
            return Ok((a, b));
        }
        if t0.elapsed() > WAIT {
            bail!(
                "the VIP does not reach both pool tasks ({ha} {}, {hb} {}) within {WAIT:?}",
                answered(&ha),
                answered(&hb)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Round {
    /// Cut → start of the last probe not answered by host 1's task.
    gone: Duration,
    /// Cut → host 2 seen Down in `node ls`.
    down: Option<Duration>,
    /// The partition command's own duration (the cut takes effect during it).
    cut_cmd: Duration,
    /// Probes after the cut not answered by host 1's task (failed or answered by host 2's).
    bad: usize,
    /// Heal → both tasks running, one on each host, and answering on the VIP.
    back: Duration,
    /// Failed probes in the pause before the cut.
    before: usize,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `node-loss`: the test bed and the services, then the rounds; median and max.
pub fn node_loss(a: &NodeLossArgs) -> Result<()> {
    if a.rounds == 0 || a.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    if a.probe_interval_ms == 0 || a.probe_interval_ms > MAX_INTERVAL_MS {
        bail!("--probe-interval-ms must be 1..={MAX_INTERVAL_MS}");
    }
    if a.connect_timeout_ms == 0 || a.connect_timeout_ms > MAX_CONNECT_TIMEOUT_MS {
        bail!("--connect-timeout-ms must be 1..={MAX_CONNECT_TIMEOUT_MS}");
    }
    let bed = Bed::up(&a.shoal, 2, 2)?;
    let (h1, h2) = (bed.host(1)?, bed.host(2)?);
    // The dispatcher's timers: when a silent node is marked Down.
    let cluster = bed.shoal(&["cluster", "inspect", "--format", "json"])?;
    let cluster: serde_json::Value =
        serde_json::from_str(&cluster).context("cluster inspect json")?;
    let disp = &cluster[0]["Spec"]["Dispatcher"];
    let period = disp["HeartbeatPeriod"].as_str().unwrap_or("?").to_string();
    let missed = disp["MissedHeartbeatsBeforeDown"]
        .as_u64()
        .map_or("?".to_string(), |m| m.to_string());
    eprintln!("  dispatcher: heartbeat period {period}, {missed} missed heartbeats before Down");

    bed.shoal(&["network", "create", "bench"])?;
    let on_h1 = format!("node.hostname=={}", h1.name());
    for (name, replicas, extra, cmd) in [
        (
            "pool",
            "2",
            ["--replicas-max-per-node", "1"],
            ["sh", "-c", WEB],
        ),
        (
            "client",
            "1",
            ["--constraint", on_h1.as_str()],
            ["sleep", "3600", ""],
        ),
    ] {
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "--stop-grace-period",
            "1s",
            "--network",
            "bench",
        ];
        args.extend(extra);
        args.push(IMAGE);
        args.extend(cmd.iter().filter(|c| !c.is_empty()));
        bed.shoal(&args)?;
    }
    let client = bed.wait_tasks("client", 1)?.remove(0);
    let pool = bed.wait_tasks("pool", 2)?;
    let names = bed.node_names()?;
    let node_of = |host: &str| -> Result<String> {
        names
            .iter()
            .find(|(_, h)| *h == host)
            .map(|(id, _)| id.clone())
            .with_context(|| format!("no node with hostname {host}"))
    };
    let (n1, n2) = (node_of(h1.name())?, node_of(h2.name())?);
    if one_each(&pool, &n1, &n2).is_none() {
        bail!("pool does not run one task on each host");
    }
    // The VIP, as the client's resolver answers `pool`: not a task's address, on the network.
    let t = Instant::now();
    let vip = loop {
        let out = bed.task_exec(h1, &client.id, &["nslookup", "pool"])?;
        if let Some(ip) = out.as_deref().and_then(parse_nslookup) {
            if pool.iter().any(|t| t.addr == ip) {
                bail!("pool resolves to a task's address ({ip}), not a virtual IP");
            }
            let (o, c) = (ip.octets(), client.addr.octets());
            if o[..3] != c[..3] || bed.on_test_bed(ip) {
                bail!(
                    "pool resolves to {ip}, outside the network bench ({})",
                    client.addr
                );
            }
            break ip;
        }
        if t.elapsed() > WAIT {
            bail!("pool does not resolve in the client after {WAIT:?}: {out:?}");
        }
        std::thread::sleep(POLL);
    };
    eprintln!(
        "  pool's VIP {vip}, client task {} ({}) on {}",
        client.hostname(),
        client.addr,
        h1.name()
    );
    let mut probe = Probe::start(
        client.netns(),
        vip,
        Duration::from_millis(a.probe_interval_ms),
        Duration::from_millis(a.connect_timeout_ms),
    )?;
    let (mut local, mut remote) = wait_both(&bed, &mut probe, &n1, &n2)?;

    let load_start = load1();
    let mut load_max = load_start;
    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        let survivor = local.hostname();
        // Probes that failed in the last pause before the cut, with the pool whole (baseline).
        let t0 = Instant::now();
        let before = probe
            .since(t0.checked_sub(PAUSE).unwrap_or(t0))
            .iter()
            .filter(|(_, h)| h.is_none())
            .count();
        bed.partition(&[&[1], &[2]])?;
        let cut_cmd = t0.elapsed();
        let mut down = None;
        let gone = loop {
            probe.check()?;
            if down.is_none() && node_state(&bed, h2.name())? == "down" {
                down = Some(t0.elapsed());
            }
            let log = probe.since(t0);
            if let (Some(last), Some(_)) = (settled_at(&log, &survivor, SETTLED), down) {
                let bad = log
                    .iter()
                    .filter(|(_, h)| h.as_deref() != Some(survivor.as_str()))
                    .count();
                break (
                    last.map_or(Duration::ZERO, |t| t.saturating_duration_since(t0)),
                    bad,
                );
            }
            if t0.elapsed() > WAIT {
                bail!(
                    "round {round}: after {WAIT:?} cut off, connections still go to the lost task \
                     ({}) or {} is not seen down ({down:?})",
                    settled_at(&log, &survivor, SETTLED).is_none(),
                    h2.name()
                );
            }
            std::thread::sleep(POLL);
        };
        let (gone, bad) = gone;
        load_max = load_max.max(load1());
        let remote_old = remote.hostname();
        let t1 = Instant::now();
        bed.heal()?;
        let (l, r) = wait_both(&bed, &mut probe, &n1, &n2)?;
        let back = t1.elapsed();
        if l.id != local.id {
            eprintln!(
                "  round {round}: host 1's task changed ({} → {})",
                local.hostname(),
                l.hostname()
            );
        }
        eprintln!(
            "  round {round}: no connection to the lost task ({remote_old}) after {:.3} s \
             ({bad} probes failed or went to it); {} seen Down after {}; partition command \
             {:.3} s; healed → pool whole again ({}) in {:.3} s; {before} failed probes in the \
             {:?} before the cut",
            secs(gone),
            h2.name(),
            down.map_or("-".to_string(), |d| format!("{:.3} s", secs(d))),
            secs(cut_cmd),
            r.hostname(),
            secs(back),
            PAUSE
        );
        (local, remote) = (l, r);
        rounds.push(Round {
            gone,
            down,
            cut_cmd,
            bad,
            back,
            before,
        });
        std::thread::sleep(PAUSE);
    }
    let load_end = load1();
    let (requests, errors) = probe.counts();
    drop(probe);

    let gones: Vec<Duration> = rounds.iter().map(|r| r.gone).collect();
    let med = crate::stats::percentile(&gones, 0.5).unwrap_or_default();
    let max = gones.iter().max().copied().unwrap_or_default();
    let downs: Vec<Duration> = rounds.iter().filter_map(|r| r.down).collect();
    let down_med = crate::stats::percentile(&downs, 0.5).unwrap_or_default();
    let down_max = downs.iter().max().copied().unwrap_or_default();
    println!(
        "node-loss: a service of 2 busybox httpd tasks (one per host, --replicas-max-per-node 1) on an overlay network of 2 test bed hosts; a client task's namespace on {} fetches http://{vip}/ (pool's VIP) every {} ms (connect timeout {} ms); {} rounds of cutting {} off (testbed partition) and healing",
        h1.name(),
        a.probe_interval_ms,
        a.connect_timeout_ms,
        a.rounds,
        h2.name()
    );
    println!("  dispatcher (cluster defaults, `cluster inspect`): heartbeat period {period}, {missed} missed heartbeats before Down");
    println!(
        "  cut → no connection goes to the lost node's task: median {:.3} s, max {:.3} s ({})  (target < {} s: {})",
        secs(med),
        secs(max),
        gones
            .iter()
            .map(|d| format!("{:.3}", secs(*d)))
            .collect::<Vec<_>>()
            .join(" / "),
        TARGET.as_secs(),
        if max < TARGET {
            "met in every round"
        } else if med < TARGET {
            "median met, not every round"
        } else {
            "missed"
        }
    );
    println!(
        "  cut → node seen Down (`node ls`, polled every {} ms): median {:.3} s, max {:.3} s",
        POLL.as_millis(),
        secs(down_med),
        secs(down_max)
    );
    println!(
        "  partition command {:.3}–{:.3} s (the cut takes effect during it; times are from its start); heal → pool whole and answering again {:.1}–{:.1} s",
        secs(rounds.iter().map(|r| r.cut_cmd).min().unwrap_or_default()),
        secs(rounds.iter().map(|r| r.cut_cmd).max().unwrap_or_default()),
        secs(rounds.iter().map(|r| r.back).min().unwrap_or_default()),
        secs(rounds.iter().map(|r| r.back).max().unwrap_or_default()),
    );
    println!("  probes: {requests} requests, {errors} failed (refused or timed out), all rounds");
    println!("  load average (1 min): {load_start:.2} at the start, {load_max:.2} max, {load_end:.2} at the end");
    let json = serde_json::json!({"bench": "node-loss", "rounds": a.rounds,
        "probe_interval_ms": a.probe_interval_ms, "connect_timeout_ms": a.connect_timeout_ms,
        "heartbeat_period": period, "missed_heartbeats_before_down": missed,
        "gone_ms": rounds.iter().map(|r| crate::stats::ms(r.gone)).collect::<Vec<_>>(),
        "down_ms": rounds.iter().map(|r| r.down.map(crate::stats::ms)).collect::<Vec<_>>(),
        "cut_cmd_ms": rounds.iter().map(|r| crate::stats::ms(r.cut_cmd)).collect::<Vec<_>>(),
        "bad_probes": rounds.iter().map(|r| r.bad).collect::<Vec<_>>(),
        "failed_before_cut": rounds.iter().map(|r| r.before).collect::<Vec<_>>(),
        "back_ms": rounds.iter().map(|r| crate::stats::ms(r.back)).collect::<Vec<_>>(),
        "median_gone_ms": crate::stats::ms(med), "max_gone_ms": crate::stats::ms(max),
        "probe_requests": requests, "probe_errors": errors,
        "load1_start": load_start, "load1_max": load_max, "load1_end": load_end});
    println!("{json}");
    drop(bed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_after_the_last_probe_elsewhere() {
        let t0 = Instant::now();
        let at = |ms: u64, h: Option<&str>| (t0 + Duration::from_millis(ms), h.map(String::from));
        let s = Duration::from_secs(2);
        let mut log = vec![
            at(0, Some("a")),
            at(10, Some("b")),
            at(20, None),
            at(220, Some("a")),
            at(1000, Some("a")),
        ];
        assert_eq!(settled_at(&log, "a", s), None);
        log.push(at(2220, Some("a")));
        assert_eq!(
            settled_at(&log, "a", s),
            Some(Some(t0 + Duration::from_millis(20)))
        );
        let only: Vec<Entry> = vec![at(0, Some("a")), at(2000, Some("a"))];
        assert_eq!(settled_at(&only, "a", s), Some(None));
        assert_eq!(settled_at(&[], "a", s), None);
    }
}
