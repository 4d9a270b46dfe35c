//! Service convergence on one node with real containers: `service create --replicas N` until
//! all N run, then scale to 0 until none runs, shoal against Docker swarm mode on the same
//! machine (same busybox rootfs, same `sleep 3600`, same stop grace period). The shoal agent is
//! started here (own data dir and socket in a tempdir) and killed by pid, its task containers
//! deleted, on error too; dockerd must already run with a one-node swarm and `bb:latest`
//! (shared/peers/docker-swarm.sh setup).

use crate::cluster::{free_port, Proc};
use crate::stats::percentile;
use anyhow::{bail, Context, Result};
use shoal_tests::cluster::{ClusterBuilder, Launch, Loopback};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How often both sides are polled for their running count (the same pause for both).
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for a create or a scale to converge (swarm needs ~32 s for 100 here).
const CONVERGE_DEADLINE: Duration = Duration::from_secs(180);
/// Longest wait for the agent to open its socket and for `cluster init` to take effect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a removed service's containers to go before the next round.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(120);
/// Most replicas and rounds accepted.
const MAX_REPLICAS: usize = 1000;
const MAX_ROUNDS: usize = 20;
/// Task containers' runtime state under the agent's data dir (node-agent's TASK_RUNTIME_DIR).
const TASK_RUNTIME_DIR: &str = "containers/.tasks";

#[derive(clap::Args)]
pub struct ConvergeArgs {
    /// Replicas of the service.
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// Rounds of create + scale to 0 on each side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Stop grace period of both services (SIGTERM to SIGKILL).
    #[arg(long, default_value = "1s")]
    stop_grace_period: String,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Skip the Docker side (dockerd not running).
    #[arg(long)]
    shoal_only: bool,
    /// Parent of the run's temporary directory.
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
}

pub(crate) fn shoal_bin(given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let p = std::env::current_exe()?.with_file_name("shoal");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p shoal) or pass --shoal",
            p.display()
        );
    }
    Ok(p)
}

/// Runs `cmd`; its stdout, or its stderr as the error.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `done` every POLL until it holds; the time from `start`.
pub(crate) fn until(
    start: Instant,
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    loop {
        if done()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > CONVERGE_DEADLINE {
            bail!("{what}: not done after {CONVERGE_DEADLINE:?}");
        }
        std::thread::sleep(POLL);
    }
}

/// One round's two times.
#[derive(Clone, Copy)]
struct Round {
    up: Duration,
    down: Duration,
}

// ---- shoal ----

/// One agent, a one-node cluster; its task containers are deleted and the agent killed on drop.
pub(crate) struct ShoalNode {
    addr: String,
    bin: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
    agent: Option<Proc>,
}

impl ShoalNode {
    pub(crate) fn start(bin: &Path, dir: &Path) -> Result<ShoalNode> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let mut node = ShoalNode {
            addr,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            socket: dir.join("shoal.sock"),
            agent: None,
        };
        // The image first: the agent's image store is the same directory.
        let rootfs = dir.join("rootfs");
        crate::fixture::busybox_rootfs(&rootfs)?;
        let tar = dir.join("bb.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))?;
        run(Command::new(bin)
            .args(["image", "--data-dir"])
            .arg(&data)
            .arg("import")
            .arg(&tar)
            .arg("bb:latest"))?;
        let child = Launch {
            bin,
            hostname: "bench-svc",
            listen: &node.addr,
            dir,
            args: &[],
        }
        .spawn()?;
        node.agent = Some(Proc::adopt(child, "shoal agent"));
        // The node must be ready to take tasks before the first round is timed.
        let member = Loopback {
            bin: node.bin.clone(),
            host: "bench-svc".into(),
            addr: node.addr.clone(),
            socket: node.socket.clone(),
        };
        ClusterBuilder::new()
            .wait_ready(STARTUP_TIMEOUT)
            .form(&[&member])?;
        Ok(node)
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        run(Command::new(&self.bin)
            .args(args)
            .env("SHOAL_SOCKET", &self.socket))
    }

    fn runtime_root(&self) -> PathBuf {
        self.dir.join("data").join(TASK_RUNTIME_DIR)
    }

    /// Task containers the runtime reports running, and all of them.
    pub(crate) fn runtime_containers(&self) -> Result<(usize, usize)> {
        let root = self.runtime_root();
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

    /// Running tasks of service `name` as `service ls` reports them (its REPLICAS column).
    fn running_tasks(&self, name: &str) -> Result<u64> {
        let out = self.cli(&["service", "ls", "--format", "json"])?;
        let list: serde_json::Value = serde_json::from_str(&out).context("service ls json")?;
        let svc = list
            .as_array()
            .and_then(|a| a.iter().find(|s| s["Spec"]["Name"] == name))
            .with_context(|| format!("service {name} not listed"))?;
        svc["ServiceStatus"]["RunningTasks"]
            .as_u64()
            .context("service ls: no RunningTasks")
    }

    fn round(&self, name: &str, n: usize, grace: &str) -> Result<Round> {
        let t = Instant::now();
        self.cli(&[
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--replicas",
            &n.to_string(),
            "--stop-grace-period",
            grace,
            "bb:latest",
            "sleep",
            "3600",
        ])?;
        let up = until(t, &format!("shoal: {name} to {n} running"), || {
            Ok(self.running_tasks(name)? == n as u64)
        })?;
        let (running, _) = self.runtime_containers()?;
        if running != n {
            bail!("shoal reports {n}/{n} but the runtime has {running} task containers running");
        }
        let t = Instant::now();
        self.cli(&["service", "scale", "--detach", &format!("{name}=0")])?;
        // Done when both the manager's view and the runtime say none runs.
        let down = until(t, &format!("shoal: {name} to 0 running"), || {
            Ok(self.running_tasks(name)? == 0 && self.runtime_containers()?.0 == 0)
        })?;
        self.cli(&["service", "rm", name])?;
        Ok(Round { up, down })
    }

    /// Kills the agent, then deletes every task container it left.
    pub(crate) fn stop(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
        }
        let root = self.runtime_root();
        let Ok(out) = run(Command::new(&self.bin)
            .arg("runtime")
            .arg("--root")
            .arg(&root)
            .args(["list", "-q"]))
        else {
            return;
        };
        for id in out.lines().filter(|l| !l.is_empty()) {
            let _ = run(Command::new(&self.bin)
                .arg("runtime")
                .arg("--root")
                .arg(&root)
                .args(["delete", "-f", id]));
        }
        // Networks of containers the killed agent was still taking down (its data dir goes
        // with the run, and with it the next start's sweep).
        shoal_runtime::network::release_all(&self.dir.join("data").join("containers"));
    }
}

impl Drop for ShoalNode {
    fn drop(&mut self) {
        self.stop();
    }
}

fn shoal_rounds(a: &ConvergeArgs, bin: &Path) -> Result<Vec<Round>> {
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-svc-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("creating a directory under {}", a.workdir.display()))?;
    let mut node = ShoalNode::start(bin, tmp.path())?;
    let mut rounds = Vec::with_capacity(a.rounds);
    for i in 0..a.rounds {
        let name = format!("conv{}-{i}", std::process::id());
        let r = node.round(&name, a.replicas, &a.stop_grace_period)?;
        eprintln!(
            "  shoal round {}: up {:.3} s, down {:.3} s",
            i + 1,
            r.up.as_secs_f64(),
            r.down.as_secs_f64()
        );
        rounds.push(r);
        // The next round starts with no task container left at all.
        let t = Instant::now();
        while node.runtime_containers()?.1 > 0 {
            if t.elapsed() > CLEANUP_DEADLINE {
                bail!("shoal: task containers of {name} still there after {CLEANUP_DEADLINE:?}");
            }
            std::thread::sleep(POLL);
        }
    }
    node.stop();
    Ok(rounds)
}

// ---- Docker swarm mode ----

fn docker(args: &[&str]) -> Result<String> {
    run(Command::new("docker").args(args))
}

/// Removes service `name` (if there) and waits until its containers are gone.
fn docker_cleanup(name: &str) -> Result<()> {
    let _ = docker(&["service", "rm", name]);
    let label = format!("label=com.docker.swarm.service.name={name}");
    let t = Instant::now();
    while !docker(&["ps", "-aq", "--filter", &label])?
        .trim()
        .is_empty()
    {
        if t.elapsed() > CLEANUP_DEADLINE {
            bail!("docker: containers of {name} still there after {CLEANUP_DEADLINE:?}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn docker_round(name: &str, n: usize, grace: &str) -> Result<Round> {
    let want = format!("{n}/{n}");
    let t = Instant::now();
    docker(&[
        "service",
        "create",
        "-q",
        "--detach",
        "--name",
        name,
        "--replicas",
        &n.to_string(),
        "--stop-grace-period",
        grace,
        "bb:latest",
        "sleep",
        "3600",
    ])?;
    let filter = format!("name={name}");
    let up = until(t, &format!("docker: {name} to {want}"), || {
        let out = docker(&[
            "service",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Name}} {{.Replicas}}",
        ])?;
        Ok(out
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [name, &want]))
    })?;
    let label = format!("label=com.docker.swarm.service.name={name}");
    let t = Instant::now();
    docker(&["service", "scale", "-d", &format!("{name}=0")])?;
    let down = until(t, &format!("docker: {name} to 0 running"), || {
        Ok(docker(&["ps", "-q", "--filter", &label])?.trim().is_empty())
    })?;
    Ok(Round { up, down })
}

fn docker_rounds(a: &ConvergeArgs) -> Result<Vec<Round>> {
    let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]).context(
        "dockerd not reachable: run shared/peers/docker-swarm.sh setup, or --shoal-only",
    )?;
    if state.trim() != "active" {
        bail!("docker is not in swarm mode: run shared/peers/docker-swarm.sh setup");
    }
    docker(&["image", "inspect", "bb:latest"])
        .context("no bb:latest image: run shared/peers/docker-swarm.sh setup")?;
    let mut rounds = Vec::with_capacity(a.rounds);
    for i in 0..a.rounds {
        let name = format!("conv{}-{i}", std::process::id());
        let r = docker_round(&name, a.replicas, &a.stop_grace_period);
        let cleaned = docker_cleanup(&name);
        let r = r?;
        cleaned?;
        eprintln!(
            "  docker round {}: up {:.3} s, down {:.3} s",
            i + 1,
            r.up.as_secs_f64(),
            r.down.as_secs_f64()
        );
        rounds.push(r);
    }
    Ok(rounds)
}

// ---- report ----

fn medians(rounds: &[Round]) -> Result<(f64, f64)> {
    let up: Vec<Duration> = rounds.iter().map(|r| r.up).collect();
    let down: Vec<Duration> = rounds.iter().map(|r| r.down).collect();
    Ok((
        percentile(&up, 0.5).context("no rounds")?.as_secs_f64(),
        percentile(&down, 0.5).context("no rounds")?.as_secs_f64(),
    ))
}

fn secs(rounds: &[Round], f: impl Fn(&Round) -> Duration) -> Vec<f64> {
    rounds
        .iter()
        .map(|r| (f(r).as_secs_f64() * 1e3).round() / 1e3)
        .collect()
}

/// `service-converge`: shoal's rounds, then Docker's, medians side by side.
pub fn converge(a: &ConvergeArgs) -> Result<()> {
    if a.replicas == 0 || a.replicas > MAX_REPLICAS {
        bail!("--replicas must be 1..={MAX_REPLICAS}");
    }
    if a.rounds == 0 || a.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    let bin = shoal_bin(&a.shoal)?;
    let shoal = shoal_rounds(a, &bin)?;
    let docker = if a.shoal_only {
        None
    } else {
        Some(docker_rounds(a)?)
    };
    let n = a.replicas;
    println!(
        "service-converge: {n} replicas of busybox `sleep 3600` on one node, stop grace {}, {} rounds each",
        a.stop_grace_period, a.rounds
    );
    let (su, sd) = medians(&shoal)?;
    println!("  shoal:  create to {n}/{n} running median {su:.3} s, scale to 0 median {sd:.3} s  (target: converge < 2 s)");
    let mut json = serde_json::json!({"bench": "service-converge", "replicas": n,
        "rounds": a.rounds, "stop_grace_period": a.stop_grace_period,
        "shoal_up_s": secs(&shoal, |r| r.up), "shoal_down_s": secs(&shoal, |r| r.down),
        "shoal_up_median_s": su, "shoal_down_median_s": sd});
    if let Some(d) = &docker {
        let (du, dd) = medians(d)?;
        println!(
            "  docker: create to {n}/{n} running median {du:.3} s, scale to 0 median {dd:.3} s"
        );
        println!(
            "  ratio docker/shoal: create {:.1}x, scale to 0 {:.1}x",
            du / su,
            dd / sd
        );
        json["docker_up_s"] = serde_json::json!(secs(d, |r| r.up));
        json["docker_down_s"] = serde_json::json!(secs(d, |r| r.down));
        json["docker_up_median_s"] = serde_json::json!(du);
        json["docker_down_median_s"] = serde_json::json!(dd);
    }
    println!("{json}");
    Ok(())
}
