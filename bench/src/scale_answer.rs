//! Scale-to-answer: the time from `shoal service scale web=N+1` until the new task answers
//! connections made to the service's virtual IP, over several rounds (N grows by one each).
//!
//! A 2-host test bed, a cluster formed by `ClusterBuilder` (host 1 the manager), a network
//! `bench`, a service `web` of busybox httpd tasks on it that serve their hostname (the task's
//! short id), and a service `client` of one busybox `sleep` task on host 1. The VIP is what
//! `web` resolves to in the client's container (`nslookup web` through its embedded resolver,
//! once). A thread of this process joins the client container's network namespace (the file
//! `/run/shoal/netns/<task id>`, as `Host::in_netns` does for a host) and fetches
//! http://VIP/ every --probe-interval-ms (a new connection each, balanced by the nftables
//! table in that namespace, exactly what a program in the client task gets), noting when each
//! hostname first answers. A round: the hostnames of the running tasks, `service scale`,
//! then the wait (bounded) until a hostname outside that set answers. New tasks spread over
//! both hosts (the scheduler's spread), so rounds measure both a local and a remote new task.
//!
//! Traffic goes only to the VIP and tasks of this run's own cluster network. Dropping the test
//! bed at the end (or on an error) removes the cluster, the tasks and the namespaces.

use crate::bed::{load1, Bed, IMAGE, WEB};
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds on the arguments.
const MAX_ROUNDS: usize = 20;
const MAX_START: usize = 10;
const MAX_INTERVAL_MS: u64 = 1000;
/// Longest wait for the new task to answer (a failed round, not a slow one).
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// Connect and read timeout of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest wait for the VIP to resolve in the client and for every task to answer on it.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between rounds.
const PAUSE: Duration = Duration::from_secs(1);
/// The target: the "the new task gets connections within 2 s".
const TARGET: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct ScaleAnswerArgs {
    /// Rounds (scale N → N+1 each).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Replicas of web before the first round.
    #[arg(long, default_value_t = 1)]
    start: usize,
    /// Pause between two probes of the VIP (each a new connection), in milliseconds.
    #[arg(long, default_value_t = 10)]
    probe_interval_ms: u64,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
}

/// What the probe thread has seen.
#[derive(Default)]
struct Seen {
    first: Mutex<HashMap<String, Instant>>,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// The probe thread; stopped and joined when dropped (it holds the client's namespace).
struct Probe {
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Probe {
    fn start(netns: PathBuf, vip: Ipv4Addr, interval: Duration) -> Result<Probe> {
        let ns =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("joining {}", netns.display()))?;
            drop(ns);
            while !stop2.load(Ordering::Relaxed) {
                seen2.requests.fetch_add(1, Ordering::Relaxed);
                match crate::bed::hello_from(vip, "web", PROBE_TIMEOUT, PROBE_TIMEOUT) {
                    Ok(h) => {
                        let now = Instant::now();
                        seen2
                            .first
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(h)
                            .or_insert(now);
                    }
                    Err(_) => {
                        seen2.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(interval);
            }
            Ok(())
        });
        Ok(Probe {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// The first hostname outside `old` that answered, and when.
    fn new_answer(&self, old: &HashSet<String>) -> Option<(String, Instant)> {
        self.seen
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(h, _)| !old.contains(*h))
            .min_by_key(|(_, t)| **t)
            .map(|(h, t)| (h.clone(), *t))
    }

    fn answered(&self) -> HashSet<String> {
        self.seen
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
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

/// The first IPv4 address after the `Name:` line of busybox `nslookup` output.
pub(crate) fn parse_nslookup(out: &str) -> Option<Ipv4Addr> {
    let mut named = false;
    for line in out.lines() {
        if line.starts_with("Name:") {
            named = true;
            continue;
        }
        if named && line.starts_with("Address") {
            // "Address: 10.0.0.2" or "Address 1: 10.0.0.2"
            let a = line
                .split_once(':')?
                .1
                .split_whitespace()
                .next()
                .unwrap_or("");
            if let Ok(ip) = a.parse() {
                return Some(ip);
            }
        }
    }
    None
}

struct Round {
    replicas: usize,
    answer: Duration,
    scale_cmd: Duration,
    node: String,
}

/// `scale-answer`: the test bed and the services, then the rounds; median and max.
pub fn scale_answer(a: &ScaleAnswerArgs) -> Result<()> {
    if a.rounds == 0 || a.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    if a.start == 0 || a.start > MAX_START {
        bail!("--start must be 1..={MAX_START}");
    }
    if a.probe_interval_ms == 0 || a.probe_interval_ms > MAX_INTERVAL_MS {
        bail!("--probe-interval-ms must be 1..={MAX_INTERVAL_MS}");
    }
    let bed = Bed::up(&a.shoal, 2, 2)?;
    let h1 = bed.host(1)?;
    bed.shoal(&["network", "create", "bench"])?;
    let start = a.start.to_string();
    let on_h1 = format!("node.hostname=={}", h1.name());
    bed.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        &start,
        "--stop-grace-period",
        "1s",
        "--network",
        "bench",
        IMAGE,
        "sh",
        "-c",
        WEB,
    ])?;
    bed.shoal(&[
        "service",
        "create",
        "--name",
        "client",
        "--constraint",
        &on_h1,
        "--stop-grace-period",
        "1s",
        "--network",
        "bench",
        IMAGE,
        "sleep",
        "3600",
    ])?;
    let client = bed.wait_tasks("client", 1)?.remove(0);
    let web = bed.wait_tasks("web", a.start)?;
    // The VIP, as the client's resolver answers `web`: not a task's address, on the network.
    let t = Instant::now();
    let vip = loop {
        let out = bed.task_exec(h1, &client.id, &["nslookup", "web"])?;
        if let Some(ip) = out.as_deref().and_then(parse_nslookup) {
            if web.iter().any(|t| t.addr == ip) {
                bail!("web resolves to a task's address ({ip}), not a virtual IP");
            }
            let (o, c) = (ip.octets(), client.addr.octets());
            if o[..3] != c[..3] || bed.on_test_bed(ip) {
                bail!(
                    "web resolves to {ip}, outside the network bench ({})",
                    client.addr
                );
            }
            break ip;
        }
        if t.elapsed() > SETTLE_DEADLINE {
            bail!("web does not resolve in the client after {SETTLE_DEADLINE:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "  web's VIP {vip}, client task {} ({})",
        client.hostname(),
        client.addr
    );
    let mut probe = Probe::start(
        client.netns(),
        vip,
        Duration::from_millis(a.probe_interval_ms),
    )?;
    // Every starting task answers on the VIP before the first round.
    let t = Instant::now();
    while !web.iter().all(|w| probe.answered().contains(&w.hostname())) {
        probe.check()?;
        if t.elapsed() > SETTLE_DEADLINE {
            bail!(
                "the VIP {vip} reaches {:?}, not every task of {:?}, after {SETTLE_DEADLINE:?}",
                probe.answered(),
                web.iter().map(|w| w.hostname()).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let names = bed.node_names()?;
    let load_start = load1();
    let mut load_max = load_start;
    let mut rounds = Vec::new();
    for round in 0..a.rounds {
        let n = a.start + round;
        let old: HashSet<String> = bed.tasks("web")?.iter().map(|t| t.hostname()).collect();
        if old.len() != n {
            bail!(
                "web has {} running tasks before round {}, not {n}",
                old.len(),
                round + 1
            );
        }
        let arg = format!("web={}", n + 1);
        let t0 = Instant::now();
        bed.shoal(&["service", "scale", &arg])?;
        let scale_cmd = t0.elapsed();
        let (host, at) = loop {
            if let Some((h, at)) = probe.new_answer(&old) {
                break (h, at);
            }
            probe.check()?;
            if t0.elapsed() > ANSWER_DEADLINE {
                bail!(
                    "round {}: no new task answered on the VIP {vip} within {ANSWER_DEADLINE:?} after scaling to {}",
                    round + 1,
                    n + 1
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let answer = at.saturating_duration_since(t0);
        load_max = load_max.max(load1());
        let tasks = bed.wait_tasks("web", n + 1)?;
        let node = tasks
            .iter()
            .find(|t| t.hostname() == host)
            .and_then(|t| names.get(&t.node).cloned())
            .unwrap_or_else(|| "?".to_string());
        eprintln!(
            "  round {}: web={} → {host} on {node} answers after {:.3} s (scale command {:.3} s)",
            round + 1,
            n + 1,
            answer.as_secs_f64(),
            scale_cmd.as_secs_f64()
        );
        rounds.push(Round {
            replicas: n + 1,
            answer,
            scale_cmd,
            node,
        });
        std::thread::sleep(PAUSE);
    }
    let load_end = load1();
    let requests = probe.seen.requests.load(Ordering::Relaxed);
    let errors = probe.seen.errors.load(Ordering::Relaxed);
    drop(probe);

    let answers: Vec<Duration> = rounds.iter().map(|r| r.answer).collect();
    let med = crate::stats::percentile(&answers, 0.5).unwrap_or_default();
    let max = answers.iter().max().copied().unwrap_or_default();
    println!(
        "scale-answer: a service of busybox httpd tasks on an overlay network of 2 test bed hosts, scaled {} → {} one task a round; a client task's namespace fetches http://{vip}/ (web's VIP) every {} ms",
        a.start,
        a.start + a.rounds,
        a.probe_interval_ms
    );
    println!(
        "  scale → new task answering on the VIP: median {:.3} s, max {:.3} s  (target < {} s: {})",
        med.as_secs_f64(),
        max.as_secs_f64(),
        TARGET.as_secs(),
        if max < TARGET {
            "met in every round"
        } else if med < TARGET {
            "median met, not every round"
        } else {
            "missed"
        }
    );
    println!("  probes: {requests} requests, {errors} failed (refused or timed out)");
    println!("  load average (1 min): {load_start:.2} at the start, {load_max:.2} max, {load_end:.2} at the end");
    let json = serde_json::json!({"bench": "scale-answer", "rounds": a.rounds, "start": a.start,
        "probe_interval_ms": a.probe_interval_ms,
        "replicas": rounds.iter().map(|r| r.replicas).collect::<Vec<_>>(),
        "nodes": rounds.iter().map(|r| r.node.clone()).collect::<Vec<_>>(),
        "answer_ms": rounds.iter().map(|r| crate::stats::ms(r.answer)).collect::<Vec<_>>(),
        "scale_cmd_ms": rounds.iter().map(|r| crate::stats::ms(r.scale_cmd)).collect::<Vec<_>>(),
        "median_answer_ms": crate::stats::ms(med), "max_answer_ms": crate::stats::ms(max),
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
    fn parses_busybox_nslookup() {
        let out =
            "Server:\t\t127.0.0.11\nAddress:\t127.0.0.11:53\n\nName:\tweb\nAddress: 10.0.0.2\n\n";
        assert_eq!(parse_nslookup(out), Some(Ipv4Addr::new(10, 0, 0, 2)));
        let old = "Server: 127.0.0.11\nAddress 1: 127.0.0.11\n\nName: web\nAddress 1: 10.0.0.9\n";
        assert_eq!(parse_nslookup(old), Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(parse_nslookup("Server: x\nAddress: 127.0.0.11:53\n"), None);
    }
}
