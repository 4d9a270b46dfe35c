//! The overlay data plane against the underlay it rides on, in the same run: TCP throughput
//! and round-trip latency between two service tasks on two test bed hosts over a shoal
//! cluster network (VXLAN, docs/design/networking.md), and between the two hosts themselves
//! over the test bed bridge (their own addresses: the path the VXLAN packets take).
//!
//! A 2-host test bed (`Testbed::up_with_hint`), a cluster formed by `ClusterBuilder` (host 1
//! the manager), a network `bench` and a service of 2 busybox `sleep` tasks on it, one per
//! host. The busybox image has no iperf3, so the tools run in the containers' network
//! namespaces from the root file system: `nsenter --net=/run/shoal/netns/<task id>` (a task's
//! container id is its task id) for the overlay, `nsenter --net=/run/netns/<host>` for the
//! underlay. The server side is on host 1, the client on host 2, for both paths.
//! - Throughput: Debian's `iperf3 -s -1` and `iperf3 -c ADDR -t SECS -J` (one TCP stream,
//!   the receiver's bits/s).
//! - Round trip: `shoal-bench rr-server` / `rr-client` (hidden subcommands of this binary,
//!   started with nsenter the same way): 1-byte ping, 1-byte pong over one TCP connection
//!   (TCP_NODELAY), N timed round trips after a warm-up, median and p99 in µs.
//!
//! Rounds interleave the two paths (who goes first alternates). Traffic goes only to the test
//! bed hosts' addresses and the two tasks' overlay addresses. Dropping the test bed at the end
//! (or on an error) removes the cluster, the tasks and the namespaces.

use crate::bed::{host_netns, in_netns, load1, run_bounded, Background, Bed, IMAGE};
use crate::publish::median;
use crate::stats::{round1, round3};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bounds on the arguments.
const MAX_ROUNDS: usize = 20;
const MAX_SECS: u64 = 60;
const MAX_ROUND_TRIPS: u32 = 1_000_000;
/// Ports of the servers (in namespaces of their own: nothing else listens there).
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
/// Longest wait for a server to listen.
const SERVER_READY: Duration = Duration::from_secs(10);
/// Time a client gets beyond its expected duration before it is killed.
const GRACE: Duration = Duration::from_secs(30);
/// Untimed round trips before the timed ones.
const RR_WARMUP: u32 = 500;
/// Connect and per-message timeout of the round-trip tool.
const RR_IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct OverlayArgs {
    /// Rounds; each measures both paths (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each iperf3 run (`-t`).
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Timed round trips of each latency run.
    #[arg(long, default_value_t = 10_000)]
    round_trips: u32,
    /// Seconds of an unrecorded iperf3 run on each path before the rounds (0: none).
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Debian's iperf3.
    #[arg(long, default_value = "iperf3")]
    iperf3: String,
}

/// One path: the server's namespace and address, the client's namespace.
struct Path {
    name: &'static str,
    server_ns: PathBuf,
    server_addr: Ipv4Addr,
    client_ns: PathBuf,
}

/// One round's figures on one path.
#[derive(Clone, Copy, Default)]
struct Sample {
    gbit_s: f64,
    retransmits: u64,
    rr_p50_us: f64,
    rr_p99_us: f64,
}

/// The receiver's bits/s and the sender's retransmits from `iperf3 -c … -J`.
fn parse_iperf(json: &str) -> Result<(f64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 -J: no end.sum_received.bits_per_second")?;
    let retr = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps, retr))
}

fn iperf(a: &OverlayArgs, p: &Path, secs: u64) -> Result<(f64, u64)> {
    let addr = p.server_addr.to_string();
    let port = IPERF_PORT.to_string();
    let server = Background::start(
        in_netns(&p.server_ns, &a.iperf3).args([
            "-s",
            "-1",
            "--forceflush",
            "-B",
            &addr,
            "-p",
            &port,
        ]),
        &format!("iperf3 server ({})", p.name),
        "Server listening",
        SERVER_READY,
    )?;
    let out = run_bounded(
        in_netns(&p.client_ns, &a.iperf3).args([
            "-c",
            &addr,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-J",
        ]),
        &format!("iperf3 client ({})", p.name),
        Duration::from_secs(secs) + GRACE,
    );
    // The one-off server exits after its client; killed (by pid) when dropped otherwise.
    let _ = server.finish(Duration::from_secs(5));
    parse_iperf(&out?)
}

fn round_trips(a: &OverlayArgs, p: &Path) -> Result<(f64, f64)> {
    let exe = std::env::current_exe().context("this executable")?;
    let listen = SocketAddrV4::new(p.server_addr, RR_PORT).to_string();
    let server = Background::start(
        in_netns(&p.server_ns, &exe).args(["rr-server", "--listen", &listen]),
        &format!("rr-server ({})", p.name),
        "ready",
        SERVER_READY,
    )?;
    // ~100 µs a round trip; a generous bound.
    let expected = Duration::from_micros(u64::from(a.round_trips + RR_WARMUP) * 100);
    let out = run_bounded(
        in_netns(&p.client_ns, &exe).args([
            "rr-client",
            "--connect",
            &listen,
            "--count",
            &a.round_trips.to_string(),
        ]),
        &format!("rr-client ({})", p.name),
        expected + GRACE,
    );
    let _ = server.finish(Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(out?.trim()).context("rr-client output")?;
    Ok((
        v["p50_us"].as_f64().context("p50_us")?,
        v["p99_us"].as_f64().context("p99_us")?,
    ))
}

/// `overlay`: the test bed and the two tasks, then interleaved rounds, medians and ratios.
pub fn overlay(a: &OverlayArgs) -> Result<()> {
    if a.rounds == 0 || a.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    if a.secs == 0 || a.secs > MAX_SECS || a.warmup_secs > MAX_SECS {
        bail!("--secs must be 1..={MAX_SECS}, --warmup-secs 0..={MAX_SECS}");
    }
    if a.round_trips == 0 || a.round_trips > MAX_ROUND_TRIPS {
        bail!("--round-trips must be 1..={MAX_ROUND_TRIPS}");
    }
    std::process::Command::new(&a.iperf3)
        .arg("--version")
        .output()
        .with_context(|| format!("{} not runnable: apt-get install iperf3", a.iperf3))?;

    let bed = Bed::up(&a.shoal, 2, 2)?;
    let (h1, h2) = (bed.host(1)?, bed.host(2)?);
    bed.shoal(&["network", "create", "bench"])?;
    bed.shoal(&[
        "service",
        "create",
        "--name",
        "bench",
        "--replicas",
        "2",
        "--replicas-max-per-node",
        "1",
        "--stop-grace-period",
        "1s",
        "--network",
        "bench",
        IMAGE,
        "sleep",
        "3600",
    ])?;
    let tasks = bed.wait_tasks("bench", 2)?;
    let names = bed.node_names()?;
    let on = |h: &shoal_tests::testbed::Host| {
        tasks
            .iter()
            .find(|t| names.get(&t.node).map(String::as_str) == Some(h.name()))
            .cloned()
            .with_context(|| format!("no task on {}", h.name()))
    };
    let (t1, t2) = (on(h1)?, on(h2)?);
    for t in [&t1, &t2] {
        // The tasks' own overlay addresses (from the network's subnet in 10.0.0.0/8).
        if t.addr.octets()[0] != 10 || bed.on_test_bed(t.addr) {
            bail!("task {} has no overlay address ({})", t.id, t.addr);
        }
    }
    for h in [h1, h2] {
        if !bed.on_test_bed(h.addr()) {
            bail!("{} is not on the test bed ({})", h.name(), h.addr());
        }
    }
    let paths = [
        Path {
            name: "underlay",
            server_ns: host_netns(h1),
            server_addr: h1.addr(),
            client_ns: host_netns(h2),
        },
        Path {
            name: "overlay",
            server_ns: t1.netns(),
            server_addr: t1.addr,
            client_ns: t2.netns(),
        },
    ];
    eprintln!(
        "  overlay: task {} ({}) on {} ← task {} ({}) on {}",
        t1.hostname(),
        t1.addr,
        h1.name(),
        t2.hostname(),
        t2.addr,
        h2.name()
    );

    let load_start = load1();
    let mut load_max = load_start;
    if a.warmup_secs > 0 {
        for p in &paths {
            iperf(a, p, a.warmup_secs)?;
        }
    }
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for round in 0..a.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let p = &paths[i];
            let (bps, retransmits) = iperf(a, p, a.secs)?;
            let (p50, p99) = round_trips(a, p)?;
            load_max = load_max.max(load1());
            let s = Sample {
                gbit_s: bps / 1e9,
                retransmits,
                rr_p50_us: p50,
                rr_p99_us: p99,
            };
            eprintln!(
                "  round {} {:<8}: {:>6.2} Gbit/s ({} retransmits)  round trip p50 {:.1} µs  p99 {:.1} µs",
                round + 1,
                p.name,
                s.gbit_s,
                s.retransmits,
                s.rr_p50_us,
                s.rr_p99_us
            );
            samples[i].push(s);
        }
    }
    let load_end = load1();

    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (u, o) = (&samples[0], &samples[1]);
    let (ug, og) = (med(u, |s| s.gbit_s), med(o, |s| s.gbit_s));
    let (u50, o50) = (med(u, |s| s.rr_p50_us), med(o, |s| s.rr_p50_us));
    let (u99, o99) = (med(u, |s| s.rr_p99_us), med(o, |s| s.rr_p99_us));
    println!(
        "overlay: 2 test bed hosts, iperf3 -t {} (one TCP stream) and {} 1-byte TCP round trips, host 2 → host 1, {} rounds, interleaved",
        a.secs, a.round_trips, a.rounds
    );
    println!(
        "  underlay: {} → {} (host addresses on the test bed bridge)",
        h2.addr(),
        h1.addr()
    );
    println!(
        "  overlay:  {} → {} (task namespaces, VXLAN network bench)",
        t2.addr, t1.addr
    );
    println!("  underlay: median {ug:>6.2} Gbit/s  round trip p50 {u50:.1} µs  p99 {u99:.1} µs");
    println!("  overlay:  median {og:>6.2} Gbit/s  round trip p50 {o50:.1} µs  p99 {o99:.1} µs");
    let ratio = og / ug;
    let extra = o50 - u50;
    // The same figures paired within each round (the two paths ran back to back), which a
    // machine whose load changes between rounds disturbs less.
    let paired_ratio = median(
        &u.iter()
            .zip(o)
            .map(|(u, o)| o.gbit_s / u.gbit_s)
            .collect::<Vec<_>>(),
    );
    let paired_extra = median(
        &u.iter()
            .zip(o)
            .map(|(u, o)| o.rr_p50_us - u.rr_p50_us)
            .collect::<Vec<_>>(),
    );
    println!(
        "  overlay/underlay throughput {ratio:.2} (target ≥ 0.90: {}); round trip p50 {extra:+.1} µs (target ≤ +30 µs: {})",
        if ratio >= 0.9 { "met" } else { "missed" },
        if extra <= 30.0 { "met" } else { "missed" }
    );
    println!(
        "  paired by round (median of the rounds' own figures): throughput {paired_ratio:.2}, round trip p50 {paired_extra:+.1} µs"
    );
    println!("  load average (1 min): {load_start:.2} at the start, {load_max:.2} max, {load_end:.2} at the end");
    let side = |v: &[Sample]| {
        serde_json::json!({
            "gbit_s": v.iter().map(|s| round3(s.gbit_s)).collect::<Vec<_>>(),
            "retransmits": v.iter().map(|s| s.retransmits).collect::<Vec<_>>(),
            "rr_p50_us": v.iter().map(|s| round1(s.rr_p50_us)).collect::<Vec<_>>(),
            "rr_p99_us": v.iter().map(|s| round1(s.rr_p99_us)).collect::<Vec<_>>(),
            "median_gbit_s": round3(med(v, |s| s.gbit_s)),
            "median_rr_p50_us": round1(med(v, |s| s.rr_p50_us)),
            "median_rr_p99_us": round1(med(v, |s| s.rr_p99_us)),
        })
    };
    let json = serde_json::json!({"bench": "overlay", "rounds": a.rounds, "secs": a.secs,
        "round_trips": a.round_trips, "underlay": side(u), "overlay": side(o),
        "ratio_throughput": round3(ratio), "rr_p50_extra_us": round1(extra),
        "paired_ratio_throughput": round3(paired_ratio), "paired_rr_p50_extra_us": round1(paired_extra),
        "rr_p99_extra_us": round1(o99 - u99),
        "load1_start": load_start, "load1_max": load_max, "load1_end": load_end});
    println!("{json}");
    drop(bed);
    Ok(())
}

#[derive(clap::Args)]
pub struct RrServerArgs {
    /// Address and port to listen on.
    #[arg(long)]
    listen: SocketAddrV4,
    /// Seconds to wait for the one client.
    #[arg(long, default_value_t = 30)]
    accept_secs: u64,
}

#[derive(clap::Args)]
pub struct RrClientArgs {
    /// The rr-server's address and port (private or loopback addresses only).
    #[arg(long)]
    connect: SocketAddrV4,
    /// Timed round trips.
    #[arg(long)]
    count: u32,
}

/// `rr-server`: prints `ready` once listening, serves one connection (a byte back for every
/// byte) until the client closes it, then exits. Bounded: the client must come within
/// --accept-secs and every read waits at most RR_IO_TIMEOUT.
pub fn rr_server(a: &RrServerArgs) -> Result<()> {
    if a.accept_secs == 0 || a.accept_secs > 600 {
        bail!("--accept-secs must be 1..=600");
    }
    let l = TcpListener::bind(a.listen).with_context(|| format!("binding {}", a.listen))?;
    l.set_nonblocking(true)?;
    println!("ready");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + Duration::from_secs(a.accept_secs);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no client within {} s", a.accept_secs);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    };
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(RR_IO_TIMEOUT))?;
    s.set_write_timeout(Some(RR_IO_TIMEOUT))?;
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => return Ok(()),
            _ => s.write_all(&b)?,
        }
    }
}

/// `rr-client`: RR_WARMUP untimed then --count timed 1-byte round trips over one connection;
/// prints one JSON line (p50, p99, mean, max in µs).
pub fn rr_client(a: &RrClientArgs) -> Result<()> {
    let ip = a.connect.ip();
    if !(ip.is_private() || ip.is_loopback()) {
        bail!("--connect must be a private or loopback address (a test bed's)");
    }
    if a.count == 0 || a.count > MAX_ROUND_TRIPS {
        bail!("--count must be 1..={MAX_ROUND_TRIPS}");
    }
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(a.connect), RR_IO_TIMEOUT)
        .with_context(|| format!("connecting to {}", a.connect))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(RR_IO_TIMEOUT))?;
    s.set_write_timeout(Some(RR_IO_TIMEOUT))?;
    let mut b = [0u8; 1];
    let mut one = |s: &mut TcpStream| -> Result<()> {
        s.write_all(&[7])?;
        s.read_exact(&mut b).context("reading the pong")?;
        Ok(())
    };
    for _ in 0..RR_WARMUP {
        one(&mut s)?;
    }
    let mut us = Vec::with_capacity(a.count as usize);
    for _ in 0..a.count {
        let t = Instant::now();
        one(&mut s)?;
        us.push(t.elapsed());
    }
    drop(s);
    let p = |q| crate::stats::percentile(&us, q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let mean = us.iter().map(Duration::as_secs_f64).sum::<f64>() / us.len() as f64 * 1e6;
    println!(
        "{}",
        serde_json::json!({"count": a.count, "p50_us": p(0.5), "p99_us": p(0.99),
            "mean_us": mean, "max_us": p(1.0)})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_json() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.1e9,"retransmits":3},
            "sum_received":{"bits_per_second":2.0e9}}}"#;
        assert_eq!(parse_iperf(j).unwrap(), (2.0e9, 3));
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
        assert!(parse_iperf("{}").is_err());
    }

    #[test]
    fn round_trips_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        drop(l);
        let server = std::thread::spawn(move || {
            rr_server(&RrServerArgs {
                listen: addr,
                accept_secs: 5,
            })
        });
        let mut r = Err(anyhow::anyhow!("never tried"));
        for _ in 0..100 {
            r = rr_client(&RrClientArgs {
                connect: addr,
                count: 100,
            });
            if r.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        r.unwrap();
        server.join().unwrap().unwrap();
    }
}
