//! The cost of a Prometheus scrape of `shoal agent --metrics-addr`: three agents on 127.0.0.1
//! (all managers, so each has every series: Raft, store, leader loops, dispatcher, worker,
//! containers, process), a service of N busybox `sleep 3600` replicas spread over them; then
//! each agent's `/metrics` is fetched back to back (one HTTP/1.0 connection per scrape, as
//! timed by the client) and its size counted. The agent's CPU per scrape is its CPU time over
//! the scrapes less what it used idle over a window as long. No peer: reference only. Every
//! process started here is killed by pid at the end, on error too, and every task container
//! left is deleted.

use crate::cluster::{free_port, Proc};
use crate::services::{run, shoal_bin};
use crate::stats::{ms, percentile, round2};
use anyhow::{bail, Context, Result};
use shoal_tests::cluster::{ClusterBuilder, Launch, Loopback, Member};
use shoal_tests::prometheus::http_get;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Longest wait for the agents, the cluster and the replicas.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Task containers' runtime state under an agent's data dir (node-agent's TASK_RUNTIME_DIR).
const TASK_RUNTIME_DIR: &str = "containers/.tasks";
const IMAGE: &str = "bb:latest";
const MAX_REPLICAS: usize = 300;
const MAX_SCRAPES: usize = 10_000;

#[derive(clap::Args)]
pub struct ScrapeArgs {
    /// Replicas of the service (spread over the three nodes).
    #[arg(long, default_value_t = 20)]
    replicas: usize,
    /// Scrapes of each agent.
    #[arg(long, default_value_t = 200)]
    scrapes: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Parent of the run's temporary directory.
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
}

struct Node {
    host: String,
    addr: String,
    metrics: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// The three agents; on drop every agent is killed and every task container deleted.
struct Cluster {
    bin: PathBuf,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(bin: &Path, root: &Path) -> Result<Cluster> {
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            nodes: Vec::new(),
        };
        let rootfs = root.join("rootfs");
        crate::fixture::busybox_rootfs(&rootfs)?;
        let tar = root.join("bb.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))?;
        for host in ["bench-mx1", "bench-mx2", "bench-mx3"] {
            let dir = root.join(host);
            std::fs::create_dir_all(dir.join("data"))
                .with_context(|| format!("creating {}", dir.display()))?;
            run(Command::new(bin)
                .args(["image", "--data-dir"])
                .arg(dir.join("data"))
                .arg("import")
                .arg(&tar)
                .arg(IMAGE))?;
            c.nodes.push(Node {
                host: host.to_string(),
                addr: format!("127.0.0.1:{}", free_port()?),
                metrics: format!("127.0.0.1:{}", free_port()?),
                dir,
                proc: None,
            });
        }
        for n in &mut c.nodes {
            let args = ["--metrics-addr", n.metrics.as_str()];
            let child = Launch {
                bin,
                hostname: &n.host,
                listen: &n.addr,
                dir: &n.dir,
                args: &args,
            }
            .spawn()?;
            n.proc = Some(Proc::adopt(child, &format!("shoal agent {}", n.host)));
        }
        let members: Vec<Loopback> = c
            .nodes
            .iter()
            .map(|n| Loopback {
                bin: bin.to_path_buf(),
                host: n.host.clone(),
                addr: n.addr.clone(),
                socket: Launch::socket_in(&n.dir),
            })
            .collect();
        let members: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
        ClusterBuilder::new()
            .managers(3)
            .wait_ready(STARTUP_TIMEOUT)
            .form(&members)
            .context("forming the cluster")?;
        Ok(c)
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        run(Command::new(&self.bin)
            .args(args)
            .env("SHOAL_SOCKET", Launch::socket_in(&self.nodes[0].dir)))
    }

    fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
        for n in &self.nodes {
            let root = n.dir.join("data").join(TASK_RUNTIME_DIR);
            let Ok(out) = run(Command::new(&self.bin)
                .arg("runtime")
                .arg("--root")
                .arg(&root)
                .args(["list", "-q"]))
            else {
                continue;
            };
            for id in out.lines().filter(|l| !l.is_empty()) {
                let _ = run(Command::new(&self.bin)
                    .arg("runtime")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "-f", id]));
            }
        }
        for n in &self.nodes {
            shoal_runtime::network::release_all(&n.dir.join("data").join("containers"));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One scrape of `addr`: the body.
fn scrape(addr: &str) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics").with_context(|| format!("scraping {addr}"))?;
    if status != 200 {
        bail!("{addr}/metrics answered {status}");
    }
    Ok(body)
}

/// The sum of a series' samples in a scrape (`name` followed by `{` or a space).
fn sum_of(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
                && l.contains(labels)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// User + system CPU time of `pid`.
fn cpu_of(pid: u32) -> Result<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// `metrics-scrape`: per agent, scrape time (median, p99), size, series, CPU per scrape.
pub fn metrics_scrape(a: &ScrapeArgs) -> Result<()> {
    if a.replicas == 0 || a.replicas > MAX_REPLICAS {
        bail!("--replicas must be 1..={MAX_REPLICAS}");
    }
    if a.scrapes == 0 || a.scrapes > MAX_SCRAPES {
        bail!("--scrapes must be 1..={MAX_SCRAPES}");
    }
    let bin = shoal_bin(&a.shoal)?;
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-scrape-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("creating a directory under {}", a.workdir.display()))?;
    let c = Cluster::start(&bin, tmp.path())?;
    c.cli(&[
        "service",
        "create",
        "--detach",
        "--name",
        "scraped",
        "--replicas",
        &a.replicas.to_string(),
        IMAGE,
        "sleep",
        "3600",
    ])?;
    // Wait on the metrics themselves: every replica running, its container's usage read.
    let t = Instant::now();
    loop {
        let mut running = 0.0;
        let mut containers = 0.0;
        for n in &c.nodes {
            let text = scrape(&n.metrics)?;
            running += sum_of(&text, "shoal_worker_tasks", "state=\"running\"");
            containers += text
                .lines()
                .filter(|l| l.starts_with("shoal_container_pids{"))
                .count() as f64;
        }
        if running == a.replicas as f64 && containers == a.replicas as f64 {
            break;
        }
        if t.elapsed() > STARTUP_TIMEOUT {
            bail!(
                "{running} of {} replicas running after {STARTUP_TIMEOUT:?}",
                a.replicas
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "3 managers, {} replicas running; {} scrapes of each agent, back to back",
        a.replicas, a.scrapes
    );
    for n in &c.nodes {
        let pid = n.proc.as_ref().context("agent")?.pid();
        let mut times = Vec::with_capacity(a.scrapes);
        let mut bytes = 0;
        let mut series = 0;
        let cpu0 = cpu_of(pid)?;
        let wall0 = Instant::now();
        for _ in 0..a.scrapes {
            let t = Instant::now();
            let text = scrape(&n.metrics)?;
            times.push(t.elapsed());
            bytes = text.len();
            series = text.lines().filter(|l| !l.starts_with('#')).count();
        }
        let wall = wall0.elapsed();
        let busy = cpu_of(pid)? - cpu0;
        // The same time idle, for what the agent does anyway (heartbeats, Raft, leader loops).
        let idle0 = cpu_of(pid)?;
        std::thread::sleep(wall);
        let idle = cpu_of(pid)? - idle0;
        let per_scrape = busy.saturating_sub(idle) / a.scrapes as u32;
        let text = scrape(&n.metrics)?;
        let leader = sum_of(&text, "shoal_raft_is_leader", "") == 1.0;
        println!(
            "{} ({}, {} task containers): scrape median {} ms, p99 {} ms; {} bytes, {} samples; agent CPU {} ms per scrape",
            n.host,
            if leader { "leader" } else { "follower" },
            text.lines()
                .filter(|l| l.starts_with("shoal_container_pids{"))
                .count(),
            ms(percentile(&times, 0.5).unwrap_or_default()),
            ms(percentile(&times, 0.99).unwrap_or_default()),
            bytes,
            series,
            round2(per_scrape.as_secs_f64() * 1e3),
        );
    }
    Ok(())
}
