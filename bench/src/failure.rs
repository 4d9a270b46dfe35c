//! Node failure with real containers: a manager (drained, so it runs no task) and two workers,
//! each a `shoal agent` with its own data dir, socket and 127.0.0.1 port; a service of N
//! replicas of busybox `sleep 3600` all on one worker; then that worker's agent and its task
//! containers (monitors and inits) are killed with SIGKILL, and the time until `service ps`
//! shows all N running on the other worker is measured. The killed worker is restarted between
//! trials and the roles swap. Every process started here is killed by pid at the end, on error
//! too, and every task container left is deleted.
//!
//! No Docker swarm side: swarm cannot lose "a node" on one machine (one dockerd is one node),
//! so the peer figure is swarm's documented default detection (5 s heartbeat period, a node is
//! down after 3 missed ones: about 15 s before it even reschedules).

use crate::cluster::{free_port, Proc};
use crate::services::{run, shoal_bin};
use crate::stats::percentile;
use anyhow::{bail, Context, Result};
use shoal_tests::cluster::{ClusterBuilder, Launch, Loopback, Member};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How often the manager is polled (each poll is one CLI process and one RPC).
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for an agent's socket, the cluster to form, a node to come back Ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the tasks to run again after the kill (a failed trial, not a slow one).
const RECOVER_DEADLINE: Duration = Duration::from_secs(120);
/// Longest wait for the initial placement and for a restarted worker's stale tasks to go.
const SETTLE_DEADLINE: Duration = Duration::from_secs(120);
/// Most replicas and trials accepted.
const MAX_REPLICAS: usize = 200;
const MAX_TRIALS: usize = 50;
/// Task containers' runtime state under an agent's data dir (node-agent's TASK_RUNTIME_DIR).
const TASK_RUNTIME_DIR: &str = "containers/.tasks";
const IMAGE: &str = "bb:latest";
const MANAGER: usize = 0;

#[derive(clap::Args)]
pub struct FailureArgs {
    /// Trials (the killed worker alternates).
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Replicas of the service, all on the worker that is killed.
    #[arg(long, default_value_t = 20)]
    replicas: usize,
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
    dir: PathBuf,
    socket: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn runtime_root(&self) -> PathBuf {
        self.data().join(TASK_RUNTIME_DIR)
    }
}

/// One trial's times from the SIGKILL.
struct Trial {
    down: Option<Duration>,
    recovered: Duration,
}

/// The three agents; on drop every agent is killed and every task container deleted.
struct Cluster {
    bin: PathBuf,
    nodes: Vec<Node>,
}

/// Start time (clock ticks since boot) of `pid`, to tell it from a reused pid.
fn start_time(pid: i64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
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
        for host in ["bench-fm", "bench-fw1", "bench-fw2"] {
            let dir = root.join(host);
            std::fs::create_dir_all(dir.join("data"))
                .with_context(|| format!("creating {}", dir.display()))?;
            let node = Node {
                host: host.to_string(),
                addr: format!("127.0.0.1:{}", free_port()?),
                socket: dir.join("shoal.sock"),
                dir,
                proc: None,
            };
            run(Command::new(bin)
                .args(["image", "--data-dir"])
                .arg(node.data())
                .arg("import")
                .arg(&tar)
                .arg(IMAGE))?;
            c.nodes.push(node);
        }
        for i in 0..c.nodes.len() {
            c.spawn(i)?;
        }
        let members: Vec<Loopback> = c
            .nodes
            .iter()
            .map(|n| Loopback {
                bin: bin.to_path_buf(),
                host: n.host.clone(),
                addr: n.addr.clone(),
                socket: n.socket.clone(),
            })
            .collect();
        let members: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
        ClusterBuilder::new()
            .wait_ready(STARTUP_TIMEOUT)
            .form(&members)
            .context("forming the cluster")?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let child = Launch {
            bin: &self.bin,
            hostname: &n.host,
            listen: &n.addr,
            dir: &n.dir,
            args: &[],
        }
        .spawn()?;
        self.nodes[i].proc = Some(Proc::adopt(child, &format!("shoal agent {}", n.host)));
        Ok(())
    }

    fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        run(Command::new(&self.bin)
            .args(args)
            .env("SHOAL_SOCKET", &self.nodes[i].socket))
    }

    /// Each node's hostname and state ("ready", "down", ...) as the manager sees it.
    fn node_states(&self) -> Result<Vec<(String, String)>> {
        let out = self.cli(MANAGER, &["node", "ls", "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("node ls json")?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .map(|n| {
                        (
                            n["Description"]["Hostname"]
                                .as_str()
                                .unwrap_or("")
                                .to_string(),
                            n["Status"]["State"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn state_of(&self, i: usize) -> Result<String> {
        Ok(self
            .node_states()?
            .into_iter()
            .find(|(h, _)| h == &self.nodes[i].host)
            .map(|(_, s)| s)
            .unwrap_or_default())
    }

    /// Tasks of `service` on node `i` that are meant to run, and how many of them run.
    fn tasks_on(&self, service: &str, i: usize) -> Result<(usize, usize)> {
        let node = format!("node={}", self.nodes[i].host);
        let out = self.cli(
            MANAGER,
            &[
                "service",
                "ps",
                service,
                "--filter",
                "desired-state=running",
                "--filter",
                &node,
            ],
        )?;
        let (mut all, mut running) = (0, 0);
        // Columns after IMAGE: NODE, DESIRED STATE, CURRENT STATE ("Running 2 seconds ago").
        for line in out.lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let Some(img) = w.iter().position(|x| *x == IMAGE) else {
                continue;
            };
            if w.get(img + 1) != Some(&self.nodes[i].host.as_str()) {
                continue;
            }
            all += 1;
            if w.get(img + 3) == Some(&"Running") {
                running += 1;
            }
        }
        Ok((all, running))
    }

    /// Task containers node `i`'s runtime reports running, and all of them.
    fn runtime_containers(&self, i: usize) -> Result<(usize, usize)> {
        let root = self.nodes[i].runtime_root();
        if !root.exists() {
            return Ok((0, 0));
        }
        let out = run(Command::new(&self.bin)
            .arg("runtime")
            .arg("--root")
            .arg(&root)
            .arg("list"))?;
        let rows: Vec<&str> = out.lines().skip(1).collect();
        let running = rows
            .iter()
            .filter(|l| l.split_whitespace().nth(2) == Some("running"))
            .count();
        Ok((running, rows.len()))
    }

    /// The (pid, start time) of every live monitor and init of node `i`'s task containers,
    /// read from their state files.
    fn container_processes(&self, i: usize) -> Result<Vec<(i64, u64)>> {
        let root = self.nodes[i].runtime_root();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
            let f = e?.path().join("state.json");
            let Ok(bytes) = std::fs::read(&f) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", f.display()))?;
            for (pid, start) in [("monitorPid", "monitorStartTime"), ("pid", "initStartTime")] {
                if let (Some(p), Some(s)) = (v[pid].as_i64(), v[start].as_u64()) {
                    if p > 0 && start_time(p) == Some(s) {
                        out.push((p, s));
                    }
                }
            }
        }
        Ok(out)
    }

    /// SIGKILL to node `i`'s agent, then to its task containers' monitors and inits.
    fn kill_node(&mut self, i: usize, procs: &[(i64, u64)]) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
        for &(pid, start) in procs {
            // Only the very process recorded: a pid reused since would have another start time.
            if start_time(pid) == Some(start) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// One failure of `victim` with all `n` tasks of `service` on it.
    fn trial(&mut self, service: &str, n: usize, victim: usize, survivor: usize) -> Result<Trial> {
        let (_, running) = self.tasks_on(service, victim)?;
        let (live, _) = self.runtime_containers(victim)?;
        if running != n || live != n {
            bail!(
                "before the kill {} runs {running}/{n} tasks ({live} containers)",
                self.nodes[victim].host
            );
        }
        let procs = self.container_processes(victim)?;
        if procs.len() != 2 * n {
            bail!(
                "found {} monitor and init processes for {n} containers",
                procs.len()
            );
        }
        let t = Instant::now();
        self.kill_node(victim, &procs);
        let mut down = None;
        loop {
            if down.is_none() && self.state_of(victim)? != "ready" {
                down = Some(t.elapsed());
            }
            if self.tasks_on(service, survivor)?.1 == n {
                break;
            }
            if t.elapsed() > RECOVER_DEADLINE {
                bail!(
                    "{}'s tasks do not all run on {} after {RECOVER_DEADLINE:?}",
                    self.nodes[victim].host,
                    self.nodes[survivor].host
                );
            }
            std::thread::sleep(POLL);
        }
        let recovered = t.elapsed();
        let (live, _) = self.runtime_containers(survivor)?;
        if live != n {
            bail!("the manager reports {n} running but the survivor has {live} task containers running");
        }
        Ok(Trial { down, recovered })
    }

    /// Restarts node `i` and waits until it is Ready with no task meant to run on it and no
    /// task container running; returns how many dead task containers its runtime still holds.
    fn restore(&mut self, service: &str, i: usize) -> Result<usize> {
        self.spawn(i)?;
        let t = Instant::now();
        loop {
            let ready = self.state_of(i)? == "ready";
            if ready && self.tasks_on(service, i)?.0 == 0 && self.runtime_containers(i)?.0 == 0 {
                return Ok(self.runtime_containers(i)?.1);
            }
            if t.elapsed() > SETTLE_DEADLINE {
                bail!(
                    "{} not back (Ready, no tasks) after {SETTLE_DEADLINE:?}",
                    self.nodes[i].host
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
        for n in &self.nodes {
            let root = n.runtime_root();
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
        // Networks of containers a killed agent was still taking down.
        for n in &self.nodes {
            shoal_runtime::network::release_all(&n.data().join("containers"));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

/// `node-failure`: the trials, then median and max.
pub fn node_failure(a: &FailureArgs) -> Result<()> {
    if a.replicas == 0 || a.replicas > MAX_REPLICAS {
        bail!("--replicas must be 1..={MAX_REPLICAS}");
    }
    if a.trials == 0 || a.trials > MAX_TRIALS {
        bail!("--trials must be 1..={MAX_TRIALS}");
    }
    let bin = shoal_bin(&a.shoal)?;
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-fail-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("creating a directory under {}", a.workdir.display()))?;
    let mut c = Cluster::start(&bin, tmp.path())?;
    let n = a.replicas;
    let service = format!("fail{}", std::process::id());
    // The manager runs no task (as a production manager often does), so "elsewhere" is the
    // other worker; that one is paused while the service is placed, so all land on worker 1.
    let (mut victim, mut survivor) = (1, 2);
    let mhost = c.nodes[MANAGER].host.clone();
    let shost = c.nodes[survivor].host.clone();
    c.cli(
        MANAGER,
        &["node", "update", "--availability", "drain", &mhost],
    )?;
    c.cli(
        MANAGER,
        &["node", "update", "--availability", "pause", &shost],
    )?;
    c.cli(
        MANAGER,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            &service,
            "--replicas",
            &n.to_string(),
            "--stop-grace-period",
            "1s",
            IMAGE,
            "sleep",
            "3600",
        ],
    )?;
    let t = Instant::now();
    while c.tasks_on(&service, victim)?.1 != n {
        if t.elapsed() > SETTLE_DEADLINE {
            bail!("{n} tasks not running on the first worker after {SETTLE_DEADLINE:?}");
        }
        std::thread::sleep(POLL);
    }
    c.cli(
        MANAGER,
        &["node", "update", "--availability", "active", &shost],
    )?;
    let mut trials = Vec::with_capacity(a.trials);
    for k in 0..a.trials {
        let tr = c.trial(&service, n, victim, survivor)?;
        let left = c.restore(&service, victim)?;
        eprintln!(
            "  trial {}: killed {}, down after {}, all {n} running on {} after {:.3} s ({left} dead task containers left in its runtime after restart)",
            k + 1,
            c.nodes[victim].host,
            tr.down
                .map(|d| format!("{:.3} s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            c.nodes[survivor].host,
            tr.recovered.as_secs_f64()
        );
        trials.push(tr);
        std::mem::swap(&mut victim, &mut survivor);
    }
    let _ = c.cli(MANAGER, &["service", "rm", &service]);
    c.stop();
    let rec: Vec<Duration> = trials.iter().map(|t| t.recovered).collect();
    let downs: Vec<Duration> = trials.iter().filter_map(|t| t.down).collect();
    let med = percentile(&rec, 0.5).context("no trials")?;
    let max = percentile(&rec, 1.0).context("no trials")?;
    println!(
        "node-failure: {n} tasks (busybox `sleep 3600`) on the killed worker, manager drained, {} trials",
        a.trials
    );
    println!(
        "  shoal: all {n} running elsewhere median {:.3} s, max {:.3} s (node seen down median {}) (target < 5 s)",
        med.as_secs_f64(),
        max.as_secs_f64(),
        percentile(&downs, 0.5)
            .map(|d| format!("{:.3} s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into())
    );
    println!("  swarm: not measurable on one machine (one dockerd is one node); its default detection alone is 3 missed 5 s heartbeats, about 15 s");
    let json = serde_json::json!({"bench": "node-failure", "replicas": n, "trials": a.trials,
        "recovered_s": rec.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
        "down_s": downs.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
        "median_s": secs(med), "max_s": secs(max)});
    println!("{json}");
    Ok(())
}
