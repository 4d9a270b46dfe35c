//! The routing mesh against the direct path to the same task, in the same run.
//!
//! A 3-host test bed: hosts 1 and 2 form a cluster with `ClusterBuilder` (host 1 the
//! manager); host 3 runs no agent and is only the client. One service, one busybox httpd task
//! (serving its hostname, a few bytes) constrained to host 1, publishing its port 80 twice:
//! `published=P,target=80` in ingress mode (the mesh: every node's address answers, and its
//! sandbox forwards over the ingress overlay to the task) and `published=P+1,target=80,
//! mode=host` (DNAT in host 1's namespace straight to the task's address on the node bridge).
//! Debian's `wrk` runs in host 3's namespace (`nsenter --net=/run/netns/<host 3>`) with
//! `Connection: close` (a new connection per request, as busybox httpd closes anyway) and
//! `--latency` against three URLs, rounds interleaved and the order rotating:
//! - mesh, remote: host 2's address, port P — a node without the task (underlay to host 2,
//!   its mesh sandbox, VXLAN to host 1, the task);
//! - mesh, local: host 1's address, port P — the task's own node, through its sandbox;
//! - direct: host 1's address, port P+1 — the fairest direct path with the client in the
//!   same place: the same task, one underlay crossing and one DNAT, no sandbox, no overlay.
//!
//! Traffic goes only to test bed addresses. Dropping the test bed at the end (or on an error)
//! removes the cluster, the task and the namespaces.

use crate::bed::{host_netns, in_netns, load1, run_bounded, Bed, IMAGE, WEB};
use crate::publish::{median, parse_wrk, Wrk};
use crate::stats::{round2, round3};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bounds on the arguments.
const MAX_ROUNDS: usize = 20;
const MAX_SECS: u64 = 120;
const MAX_CONNECTIONS: u32 = 1000;
const MAX_THREADS: u32 = 64;
/// Time a wrk run gets beyond its `-d` before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(30);
/// Longest wait for a URL to answer with the task's page.
const READY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct MeshArgs {
    /// Rounds; each loads every path once (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each wrk run (`-d`).
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// wrk threads (`-t`).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections (`-c`).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Seconds of an unrecorded wrk run on each path before the rounds (0: none).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Seconds of rest before every recorded wrk run but the first (e.g. 30 with --secs 5:
    /// a path's previous run's TIME_WAIT sockets, 60 s on Linux, are gone before its next).
    #[arg(long, default_value_t = 0)]
    pause_secs: u64,
    /// The ingress-mode port P (the host-mode port is P+1).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// The load generator (Debian's wrk).
    #[arg(long, default_value = "wrk")]
    wrk: String,
}

struct Target {
    name: &'static str,
    what: String,
    url: String,
}

fn wrk(a: &MeshArgs, client_ns: &std::path::Path, url: &str, secs: u64) -> Result<Wrk> {
    let out = run_bounded(
        in_netns(client_ns, &a.wrk)
            .arg(format!("-t{}", a.threads))
            .arg(format!("-c{}", a.connections))
            .arg(format!("-d{secs}s"))
            .args(["--timeout", "2s", "--latency", "-H", "Connection: close"])
            .arg(url),
        &format!("wrk {url}"),
        Duration::from_secs(secs) + WRK_GRACE,
    )?;
    parse_wrk(&out)
}

/// `mesh`: the test bed, the service, then interleaved rounds of wrk, medians and ratios.
pub fn mesh(a: &MeshArgs) -> Result<()> {
    if a.rounds == 0 || a.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    if a.secs == 0 || a.secs > MAX_SECS || a.warmup_secs > MAX_SECS || a.pause_secs > MAX_SECS {
        bail!("--secs must be 1..={MAX_SECS}, --warmup-secs and --pause-secs 0..={MAX_SECS}");
    }
    if a.threads == 0 || a.threads > MAX_THREADS {
        bail!("--threads must be 1..={MAX_THREADS}");
    }
    if a.connections < a.threads || a.connections > MAX_CONNECTIONS {
        bail!("--connections must be --threads..={MAX_CONNECTIONS}");
    }
    let agent = shoal_tests::testbed::AGENT_PORT;
    if a.port < 1024 || a.port == u16::MAX || a.port == agent || a.port + 1 == agent {
        bail!("--port must be 1024..=65534, and neither it nor the next the agents' port {agent}");
    }
    // (wrk --version prints its banner and exits 1: only a missing binary is an error.)
    std::process::Command::new(&a.wrk)
        .arg("--version")
        .output()
        .with_context(|| format!("{} not runnable: apt-get install wrk", a.wrk))?;

    let bed = Bed::up(&a.shoal, 3, 2)?;
    let (h1, h2, h3) = (bed.host(1)?, bed.host(2)?, bed.host(3)?);
    let (ingress, host_port) = (a.port, a.port + 1);
    let only_h1 = format!("node.hostname=={}", h1.name());
    bed.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--constraint",
        &only_h1,
        "--publish",
        &format!("published={ingress},target=80"),
        "--publish",
        &format!("published={host_port},target=80,mode=host"),
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sh",
        "-c",
        WEB,
    ])?;
    let task = bed.wait_tasks("web", 1)?.remove(0);
    let names = bed.node_names()?;
    if names.get(&task.node).map(String::as_str) != Some(h1.name()) {
        bail!("the task is not on {}", h1.name());
    }
    let hello = format!("hello-from-{}", task.hostname());
    let targets = [
        Target {
            name: "mesh-remote",
            what: format!("{} (no task there), ingress port {ingress}", h2.name()),
            url: format!("http://{}:{ingress}/", h2.addr()),
        },
        Target {
            name: "mesh-local",
            what: format!("{} (the task's node), ingress port {ingress}", h1.name()),
            url: format!("http://{}:{ingress}/", h1.addr()),
        },
        Target {
            name: "direct",
            what: format!(
                "{} (the task's node), host-mode port {host_port}: DNAT to the task",
                h1.name()
            ),
            url: format!("http://{}:{host_port}/", h1.addr()),
        },
    ];
    for h in [h1, h2, h3] {
        if !bed.on_test_bed(h.addr()) {
            bail!("{} is not on the test bed ({})", h.name(), h.addr());
        }
    }
    // Every URL answers host 3 with the task's page before anything is measured.
    for t in &targets {
        let start = Instant::now();
        loop {
            let out = h3.exec(&["timeout", "5", "busybox", "wget", "-q", "-O", "-", &t.url])?;
            let body = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && body.trim() == hello {
                eprintln!(
                    "  {} answers {} after {:.2} s",
                    t.url,
                    h3.name(),
                    start.elapsed().as_secs_f64()
                );
                break;
            }
            if start.elapsed() > READY_DEADLINE {
                bail!(
                    "{} does not answer {} with {hello} after {READY_DEADLINE:?} (last: {:?} {})",
                    t.url,
                    h3.name(),
                    body.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let client = host_netns(h3);
    let load_start = load1();
    let mut load_max = load_start;
    if a.warmup_secs > 0 {
        for t in &targets {
            wrk(a, &client, &t.url, a.warmup_secs)?;
        }
    }
    let mut samples: Vec<Vec<Wrk>> = vec![Vec::new(); targets.len()];
    for round in 0..a.rounds {
        // The order rotates, so no path always follows the same one.
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            if a.pause_secs > 0 && (round, k) != (0, 0) {
                std::thread::sleep(Duration::from_secs(a.pause_secs));
            }
            let w = wrk(a, &client, &t.url, a.secs)?;
            load_max = load_max.max(load1());
            eprintln!(
                "  round {} {:<11}: {:>8.1} connections/s  p50 {:.3} ms  p99 {:.3} ms  ({} requests, {} socket errors, {} non-2xx)",
                round + 1,
                t.name,
                w.requests_per_s,
                w.p50_ms,
                w.p99_ms,
                w.requests,
                w.socket_errors,
                w.non_2xx
            );
            samples[i].push(w);
        }
    }
    let load_end = load1();

    let med = |v: &[Wrk], f: fn(&Wrk) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!(
        "mesh: one busybox httpd task on {} published in ingress mode and in host mode; wrk -t{} -c{} -d{}s --latency -H 'Connection: close' from {} (in no cluster), {} rounds, interleaved, {} s pause between runs",
        h1.name(),
        a.threads,
        a.connections,
        a.secs,
        h3.name(),
        a.rounds,
        a.pause_secs
    );
    let mut json = serde_json::json!({"bench": "mesh", "rounds": a.rounds, "secs": a.secs,
        "threads": a.threads, "connections": a.connections, "pause_secs": a.pause_secs,
        "load1_start": load_start, "load1_max": load_max, "load1_end": load_end});
    for (t, v) in targets.iter().zip(&samples) {
        println!("  {:<11} {}: {}", t.name, t.url, t.what);
        println!(
            "  {:<11} median {:>8.1} connections/s  p50 {:.3} ms  p99 {:.3} ms",
            "",
            med(v, |w| w.requests_per_s),
            med(v, |w| w.p50_ms),
            med(v, |w| w.p99_ms)
        );
        json[t.name] = serde_json::json!({
            "url": t.url,
            "per_s": v.iter().map(|w| round2(w.requests_per_s)).collect::<Vec<_>>(),
            "p50_ms": v.iter().map(|w| round3(w.p50_ms)).collect::<Vec<_>>(),
            "p99_ms": v.iter().map(|w| round3(w.p99_ms)).collect::<Vec<_>>(),
            "socket_errors": v.iter().map(|w| w.socket_errors).sum::<u64>(),
            "non_2xx": v.iter().map(|w| w.non_2xx).sum::<u64>(),
            "median_per_s": round2(med(v, |w| w.requests_per_s)),
            "median_p50_ms": round3(med(v, |w| w.p50_ms)),
            "median_p99_ms": round3(med(v, |w| w.p99_ms)),
        });
    }
    let direct = &samples[2];
    for (i, key) in [(0, "ratio_remote_direct"), (1, "ratio_local_direct")] {
        let v = &samples[i];
        let conn = med(v, |w| w.requests_per_s) / med(direct, |w| w.requests_per_s);
        let p99 = med(v, |w| w.p99_ms) / med(direct, |w| w.p99_ms);
        println!(
            "  ratio {}/direct: connections/s {conn:.2}, p99 {p99:.2}  (reference only)",
            targets[i].name
        );
        json[key] = serde_json::json!({"per_s": round2(conn), "p99": round2(p99)});
    }
    println!("  load average (1 min): {load_start:.2} at the start, {load_max:.2} max, {load_end:.2} at the end");
    println!("{json}");
    drop(bed);
    Ok(())
}
