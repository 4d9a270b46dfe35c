//! A published port of one container, shoal against Docker in the same run: one busybox httpd
//! serving a small static file, published with `shoal run -p HOSTPORT:80` (nftables DNAT on the
//! node bridge, docs/design/networking.md) and with `docker run -p HOSTPORT:80` (Docker as
//! installed: its default userland proxy, docker-proxy, answers 127.0.0.1). Debian's `wrk`
//! loads http://127.0.0.1:PORT/ of each side in turn (rounds interleaved, who goes first
//! alternating): requests/s and latency p50/p99 with wrk's defaults, then connections/s with
//! `Connection: close` (a new connection per request). Traffic goes to 127.0.0.1 only.
//!
//! The shoal container's data dir is a tempdir under `--workdir`; both containers are removed
//! (`shoal rm -f`, `docker rm -f`) at the end, on error too. dockerd must already run with the
//! image `bb:latest` (shared/peers/docker-swarm.sh setup); this benchmark installs nothing.

use crate::cluster::free_port;
use crate::services::{run, shoal_bin};
use crate::stats::{round2, round3};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a container's published port to answer with the file.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between readiness probes.
const POLL: Duration = Duration::from_millis(50);
/// Connect and read timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a wrk run gets beyond its `-d` before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(30);
/// Bounds on the arguments.
const MAX_ROUNDS: usize = 20;
const MAX_SECS: u64 = 120;
const MAX_CONNECTIONS: u32 = 1000;
const MAX_THREADS: u32 = 64;
const MAX_BODY: usize = 64 * 1024;

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Rounds; each loads both sides in both modes (interleaved).
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
    /// Seconds of an unrecorded wrk run on each side before the rounds (0: none).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Seconds of rest before every recorded wrk run but the first (e.g. 65: the previous run's
    /// TIME_WAIT sockets, 60 s on Linux, are gone).
    #[arg(long, default_value_t = 0)]
    pause_secs: u64,
    /// Size of the static file served.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// The load generator (Debian's wrk).
    #[arg(long, default_value = "wrk")]
    wrk: String,
    /// Skip the Docker side (dockerd not running).
    #[arg(long)]
    shoal_only: bool,
    /// Parent of the run's temporary directory (shoal's data dir).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
}

/// What one wrk run reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Wrk {
    pub(crate) requests_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) requests: u64,
    pub(crate) socket_errors: u64,
    pub(crate) non_2xx: u64,
}

/// wrk's time figures ("530.00us", "1.23ms", "2.00s", "1.00m") in milliseconds.
fn parse_time(s: &str) -> Option<f64> {
    let (num, per_ms, ms_per) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e3, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 1.0, 60e3)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 1.0, 3600e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * ms_per / per_ms)
}

/// The figures of `wrk --latency` output.
pub(crate) fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let (mut rps, mut p50, mut p99, mut reqs) = (false, false, false, false);
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => {
                w.requests_per_s = v.parse().context("Requests/sec")?;
                rps = true;
            }
            ["50%", t] => {
                w.p50_ms = parse_time(t).with_context(|| format!("p50 {t}"))?;
                p50 = true;
            }
            ["99%", t] => {
                w.p99_ms = parse_time(t).with_context(|| format!("p99 {t}"))?;
                p99 = true;
            }
            [n, "requests", "in", ..] => {
                w.requests = n.parse().context("requests")?;
                reqs = true;
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 12, write 0, timeout 0"
                w.socket_errors = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                w.non_2xx = n.parse().context("Non-2xx")?;
            }
            _ => {}
        }
    }
    if !(rps && p50 && p99 && reqs) {
        bail!("unexpected wrk output (was --latency given?):\n{out}");
    }
    Ok(w)
}

/// The median by nearest rank (the lower middle for an even count), as stats::percentile.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len().div_ceil(2) - 1]
}

/// The 1-minute load average.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// TCP sockets in TIME_WAIT in this network namespace (the host's: docker-proxy's, not those
/// inside shoal's container), from /proc/net/sockstat.
fn time_wait() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?.to_string();
            let words: Vec<&str> = line.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "tw")?;
            words.get(i + 1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// One GET / over HTTP/1.0 to 127.0.0.1:port, bounded by PROBE_TIMEOUT; the whole response.
fn http_get(port: u16) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(1 << 20).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Whether the server closes an HTTP/1.1 connection after its answer (as busybox httpd does)
/// rather than keeping it for the next request: one GET without `Connection: close`, then EOF
/// (closes) or the read timeout (keeps it open, the wait bounded by PROBE_TIMEOUT).
fn server_closes(port: u16) -> Result<bool> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = [0u8; 4096];
    let mut got = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got > 0),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
        if got > 1 << 20 {
            bail!("127.0.0.1:{port} answers more than 1 MiB");
        }
    }
}

/// The two sides.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Shoal,
    Docker,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Shoal => "shoal",
            Side::Docker => "docker",
        }
    }
}

/// The containers of the run, removed when dropped (also after a failed start).
struct Containers {
    shoal: PathBuf,
    data: PathBuf,
    shoal_name: Option<String>,
    docker_name: Option<String>,
}

impl Containers {
    fn shoal_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.shoal);
        c.args(args).env("SHOAL_DATA_DIR", &self.data);
        c
    }

    /// The container's output, for an error message.
    fn logs(&self, side: Side) -> String {
        let out = match side {
            Side::Shoal => self
                .shoal_name
                .as_deref()
                .map(|n| self.shoal_cmd(&["logs", n]).stdin(Stdio::null()).output()),
            Side::Docker => self.docker_name.as_deref().map(|n| {
                Command::new("docker")
                    .args(["logs", n])
                    .stdin(Stdio::null())
                    .output()
            }),
        };
        match out {
            Some(Ok(o)) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
            .trim()
            .to_string(),
            _ => String::new(),
        }
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if let Some(n) = self.shoal_name.take() {
            match self
                .shoal_cmd(&["rm", "-f", &n])
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "shoal-bench: shoal rm -f {n}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("shoal-bench: shoal rm -f {n}: {e}"),
            }
        }
        if let Some(n) = self.docker_name.take() {
            match Command::new("docker")
                .args(["rm", "-f", &n])
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "shoal-bench: docker rm -f {n}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("shoal-bench: docker rm -f {n}: {e}"),
            }
        }
    }
}

/// Polls 127.0.0.1:port until it answers 200 with `body`, bounded by READY_DEADLINE.
fn wait_ready(c: &Containers, side: Side, port: u16, body: &str) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let last = match http_get(port) {
            Ok(r) if r.starts_with("HTTP/1.") && r.contains(" 200 ") && r.ends_with(body) => {
                return Ok(t.elapsed());
            }
            Ok(r) => format!("answered {:?}", r.lines().next().unwrap_or("")),
            Err(e) => e.to_string(),
        };
        if t.elapsed() > READY_DEADLINE {
            bail!(
                "{}'s published port 127.0.0.1:{port} does not serve the file after {READY_DEADLINE:?} (last: {last}); container output: {:?}",
                side.name(),
                c.logs(side)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// One wrk run against 127.0.0.1:port, killed (by pid) if it overruns its duration.
fn wrk(a: &PublishArgs, port: u16, close: bool, secs: u64) -> Result<Wrk> {
    let mut cmd = Command::new(&a.wrk);
    cmd.arg(format!("-t{}", a.threads))
        .arg(format!("-c{}", a.connections))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "2s", "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} (apt-get install wrk)", a.wrk))?;
    let deadline = Duration::from_secs(secs) + WRK_GRACE;
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk did not finish in {deadline:?}");
        }
        std::thread::sleep(POLL);
    };
    // wrk's report is a few hundred bytes: it fits the pipes, read once it has exited.
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    if !status.success() {
        bail!("{cmd:?} failed ({status}): {}", err.trim());
    }
    parse_wrk(&out)
}

/// The docker-proxy process serving `port`, if any (read from /proc; nothing is changed).
fn docker_proxy_pid(port: u16) -> Option<u32> {
    let want = port.to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_proxy = args.first().is_some_and(|a| a.ends_with(b"docker-proxy"));
        let has_port = args
            .windows(2)
            .any(|w| w[0] == b"-host-port" && w[1] == want.as_bytes());
        if is_proxy && has_port {
            return Some(pid);
        }
    }
    None
}

/// Checks dockerd and the image before anything is started; the server's version.
fn docker_preflight() -> Result<String> {
    run(Command::new("docker").arg("info")).context(
        "`docker info` failed: dockerd is not running or not reachable; run \
         /work/shared/peers/docker-swarm.sh setup first (or pass --shoal-only)",
    )?;
    run(Command::new("docker").args(["image", "inspect", "bb:latest"]))
        .context("no image bb:latest: run /work/shared/peers/docker-swarm.sh setup first")?;
    Ok(
        run(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]))?
            .trim()
            .to_string(),
    )
}

/// Every sample of one side.
#[derive(Default)]
struct Samples {
    requests: Vec<Wrk>,
    connections: Vec<Wrk>,
}

/// Medians of one mode's runs: (per second, p50 ms, p99 ms).
fn medians(v: &[Wrk]) -> (f64, f64, f64) {
    let f = |g: fn(&Wrk) -> f64| median(&v.iter().map(g).collect::<Vec<_>>());
    (f(|w| w.requests_per_s), f(|w| w.p50_ms), f(|w| w.p99_ms))
}

fn mode_json(v: &[Wrk]) -> serde_json::Value {
    let (r, p50, p99) = medians(v);
    serde_json::json!({
        "per_s": v.iter().map(|w| round2(w.requests_per_s)).collect::<Vec<_>>(),
        "p50_ms": v.iter().map(|w| round3(w.p50_ms)).collect::<Vec<_>>(),
        "p99_ms": v.iter().map(|w| round3(w.p99_ms)).collect::<Vec<_>>(),
        "socket_errors": v.iter().map(|w| w.socket_errors).sum::<u64>(),
        "non_2xx": v.iter().map(|w| w.non_2xx).sum::<u64>(),
        "median_per_s": round2(r), "median_p50_ms": round3(p50), "median_p99_ms": round3(p99),
    })
}

/// `publish`: both containers up, then interleaved rounds of wrk, medians and ratios.
pub fn publish(a: &PublishArgs) -> Result<()> {
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
    if a.body_bytes == 0 || a.body_bytes > MAX_BODY {
        bail!("--body-bytes must be 1..={MAX_BODY}");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root (shoal's containers and published ports need it)");
    }
    let bin = shoal_bin(&a.shoal)?;
    // (wrk --version prints its banner and exits 1: only a missing binary is an error.)
    Command::new(&a.wrk)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{} not runnable: apt-get install wrk", a.wrk))?;
    let docker_version = if a.shoal_only {
        None
    } else {
        Some(docker_preflight()?)
    };

    std::fs::create_dir_all(&a.workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("shoal-publish-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("a tempdir in {}", a.workdir.display()))?;
    let data = tmp.path().join("data");
    let rootfs = tmp.path().join("rootfs");
    crate::fixture::busybox_rootfs(&rootfs)?;
    let tar = tmp.path().join("busybox.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    run(Command::new(&bin)
        .args(["image", "import"])
        .arg(&tar)
        .arg("busybox:latest")
        .env("SHOAL_DATA_DIR", &data))?;

    // The same file and the same server on both sides.
    let body = "x".repeat(a.body_bytes);
    let script = format!(
        "mkdir -p /www && printf %s {body} > /www/index.html && exec httpd -f -p 80 -h /www"
    );
    let shoal_port = free_port()?;
    let mut docker_port = free_port()?;
    while docker_port == shoal_port {
        docker_port = free_port()?;
    }
    let pid = std::process::id();
    // Declared after `tmp`, so dropped (containers removed) before the data dir goes.
    let mut c = Containers {
        shoal: bin.clone(),
        data: data.clone(),
        shoal_name: None,
        docker_name: None,
    };
    let shoal_name = format!("publish-shoal-{pid}");
    c.shoal_name = Some(shoal_name.clone());
    let publish_shoal = format!("{shoal_port}:80");
    run(c
        .shoal_cmd(&[
            "run",
            "-d",
            "--name",
            &shoal_name,
            "-p",
            &publish_shoal,
            "busybox:latest",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null()))?;
    let mut proxy = None;
    if docker_version.is_some() {
        let docker_name = format!("publish-docker-{pid}");
        c.docker_name = Some(docker_name.clone());
        run(Command::new("docker").args([
            "run",
            "-d",
            "--name",
            &docker_name,
            "-p",
            &format!("{docker_port}:80"),
            "bb:latest",
            "sh",
            "-c",
            &script,
        ]))?;
    }
    let mut sides = vec![(Side::Shoal, shoal_port)];
    if docker_version.is_some() {
        sides.push((Side::Docker, docker_port));
    }
    let mut closes = false;
    for &(side, port) in &sides {
        let t = wait_ready(&c, side, port, &body)?;
        closes |= server_closes(port)?;
        eprintln!(
            "  {} answers on 127.0.0.1:{port} after {:.2} s",
            side.name(),
            t.as_secs_f64()
        );
        if side == Side::Docker {
            proxy = docker_proxy_pid(port);
        }
    }

    let load_start = load1();
    let mut load_max = load_start;
    if a.warmup_secs > 0 {
        for &(_, port) in &sides {
            wrk(a, port, false, a.warmup_secs)?;
            wrk(a, port, true, a.warmup_secs)?;
        }
    }
    let mut shoal = Samples::default();
    let mut docker = Samples::default();
    for round in 0..a.rounds {
        // Who goes first alternates, so neither always follows the other's load.
        let mut order = sides.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for close in [false, true] {
            for &(side, port) in &order {
                if a.pause_secs > 0 && !(round == 0 && !close && side == order[0].0) {
                    std::thread::sleep(Duration::from_secs(a.pause_secs));
                }
                let tw_before = time_wait();
                let w = wrk(a, port, close, a.secs)?;
                load_max = load_max.max(load1());
                eprintln!(
                    "  round {} {:<6} {}: {:>9.1}/s  p50 {:.3} ms  p99 {:.3} ms  ({} requests, {} socket errors, {} non-2xx; host TIME_WAIT {} before, {} after)",
                    round + 1,
                    side.name(),
                    if close { "connections" } else { "requests   " },
                    w.requests_per_s,
                    w.p50_ms,
                    w.p99_ms,
                    w.requests,
                    w.socket_errors,
                    w.non_2xx,
                    tw_before,
                    time_wait()
                );
                let s = if side == Side::Shoal {
                    &mut shoal
                } else {
                    &mut docker
                };
                if close {
                    s.connections.push(w);
                } else {
                    s.requests.push(w);
                }
            }
        }
    }
    let load_end = load1();

    println!(
        "publish: one busybox httpd serving a {}-byte file behind a published port, wrk -t{} -c{} -d{}s --latency on 127.0.0.1, {} rounds each, interleaved, {} s pause between runs",
        a.body_bytes, a.threads, a.connections, a.secs, a.rounds, a.pause_secs
    );
    println!("  shoal:  -p {shoal_port}:80, nftables DNAT on the node bridge");
    if let Some(v) = &docker_version {
        println!(
            "  docker: {v}, -p {docker_port}:80, default settings: {}",
            match proxy {
                Some(p) => format!("docker-proxy (pid {p}) serves 127.0.0.1"),
                None => "no docker-proxy found for the port".to_string(),
            }
        );
    }
    if closes {
        println!("  (busybox httpd answers `Connection: close`: in both modes every request is a new connection)");
    }
    let mut json = serde_json::json!({"bench": "publish", "server_closes": closes, "rounds": a.rounds, "secs": a.secs,
        "threads": a.threads, "connections": a.connections, "body_bytes": a.body_bytes,
        "pause_secs": a.pause_secs,
        "load1_start": load_start, "load1_max": load_max, "load1_end": load_end,
        "shoal": {"requests": mode_json(&shoal.requests),
                  "connections": mode_json(&shoal.connections)}});
    for (mode, what, s, d) in [
        ("requests", "requests/s", &shoal.requests, &docker.requests),
        (
            "connections",
            "connections/s",
            &shoal.connections,
            &docker.connections,
        ),
    ] {
        let (sr, s50, s99) = medians(s);
        let label = if mode == "requests" {
            "requests (HTTP/1.1, keep-alive offered):"
        } else {
            "connections (Connection: close):"
        };
        println!("  {label}");
        println!("    shoal:  median {sr:>9.1} {what}  p50 {s50:.3} ms  p99 {s99:.3} ms");
        if docker_version.is_some() {
            let (dr, d50, d99) = medians(d);
            println!("    docker: median {dr:>9.1} {what}  p50 {d50:.3} ms  p99 {d99:.3} ms");
            println!(
                "    ratio shoal/docker: {what} {:.2}, p50 {:.2}, p99 {:.2}  (target: {what} > 1)",
                sr / dr,
                s50 / d50,
                s99 / d99
            );
            json["ratio_".to_string() + mode] = serde_json::json!({
                "per_s": round2(sr / dr), "p50": round2(s50 / d50), "p99": round2(s99 / d99)});
        }
    }
    if let Some(v) = &docker_version {
        json["docker"] = serde_json::json!({"version": v, "docker_proxy": proxy.is_some(),
            "requests": mode_json(&docker.requests),
            "connections": mode_json(&docker.connections)});
    }
    println!("  load average (1 min): {load_start:.2} at the start, {load_max:.2} max, {load_end:.2} at the end");
    println!("{json}");
    drop(c);
    drop(tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Running 10s test @ http://127.0.0.1:8080/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  500.00us  20.00ms   90.00%
    Req/Sec     6.00k   300.00     7.00k    70.00%
  Latency Distribution
     50%  530.00us
     75%    1.10ms
     90%    2.00ms
     99%    1.50s
  120000 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  12000.50
Transfer/sec:      2.00MB
";

    #[test]
    fn parses_wrk_latency_output() {
        let w = parse_wrk(OUT).unwrap();
        assert_eq!(
            w,
            Wrk {
                requests_per_s: 12000.5,
                p50_ms: 0.53,
                p99_ms: 1500.0,
                requests: 120000,
                socket_errors: 16,
                non_2xx: 5,
            }
        );
        assert!(parse_wrk("Requests/sec: 1.0\n").is_err());
    }

    #[test]
    fn times_and_medians() {
        assert_eq!(parse_time("2.00m"), Some(120e3));
        assert_eq!(parse_time("7ms"), Some(7.0));
        assert_eq!(parse_time("7"), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
    }
}
