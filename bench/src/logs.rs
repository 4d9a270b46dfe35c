//! `service logs -f` throughput: N tasks on one node write 100-byte lines as fast as they can
//! (busybox `yes`); the client follows with `--tail 0` and counts the lines and bytes it
//! receives over a fixed window (after a warm-up). shoal (its agent started here, one-node
//! cluster) against `docker service logs -f` on a one-node swarm of a dockerd this run starts
//! (its own data and exec root; `--bridge=none --iptables=false`), both with the same busybox
//! rootfs, the same task command and the same log bounds (10 MiB × 3 files per task).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::Proc;
use crate::image_pull::OwnDockerd;
use crate::services::{run, shoal_bin, ShoalNode};

/// The line every task writes (99 characters and a newline).
const LINE: &str =
    "shoal-log-bench-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-012345678";
/// Time the followers get before counting starts (the subscription reaching every task).
const WARMUP: Duration = Duration::from_secs(2);
/// Longest wait for the tasks to run.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// Most tasks and seconds accepted.
const MAX_TASKS: usize = 100;
const MAX_SECONDS: u64 = 600;

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Tasks writing at once.
    #[arg(long, default_value_t = 10)]
    tasks: usize,
    /// Seconds counted (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<std::path::PathBuf>,
    /// Skip the Docker side.
    #[arg(long)]
    shoal_only: bool,
    /// Parent of the run's temporary directory.
    #[arg(long, default_value = "/var/tmp")]
    workdir: std::path::PathBuf,
}

/// What one follower received in the window.
struct Received {
    lines: u64,
    bytes: u64,
    secs: f64,
}

impl Received {
    fn lines_per_s(&self) -> f64 {
        self.lines as f64 / self.secs
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
}

/// Runs `cmd` (a follower), counts its stdout's lines and bytes over `window` after `WARMUP`,
/// then kills it (by pid).
fn measure(cmd: &mut Command, window: Duration) -> Result<Received> {
    let mut p = Proc::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "log follower",
    )?;
    let mut out = p.take_stdout().context("follower stdout")?;
    let (lines, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (l, b) = (lines.clone(), bytes.clone());
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                return;
            }
            b.fetch_add(n as u64, Ordering::Relaxed);
            l.fetch_add(
                buf[..n].iter().filter(|&&c| c == b'\n').count() as u64,
                Ordering::Relaxed,
            );
        }
    });
    std::thread::sleep(WARMUP);
    let (l0, b0, t0) = (
        lines.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(window);
    let r = Received {
        lines: lines.load(Ordering::Relaxed) - l0,
        bytes: bytes.load(Ordering::Relaxed) - b0,
        secs: t0.elapsed().as_secs_f64(),
    };
    p.kill();
    let _ = reader.join();
    if r.lines == 0 {
        bail!("the follower received no line in {window:?}");
    }
    Ok(r)
}

fn task_command() -> String {
    format!("yes {LINE}")
}

fn shoal_side(a: &LogsArgs, bin: &Path) -> Result<Received> {
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-logs-")
        .tempdir_in(&a.workdir)?;
    let node = ShoalNode::start(bin, tmp.path())?;
    node.cli(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "flood",
        "--replicas",
        &a.tasks.to_string(),
        "--stop-grace-period",
        "1s",
        "bb:latest",
        "sh",
        "-c",
        &task_command(),
    ])?;
    let t = Instant::now();
    while node.runtime_containers()?.0 < a.tasks {
        if t.elapsed() > RUN_DEADLINE {
            bail!(
                "shoal: {} tasks not running after {RUN_DEADLINE:?}",
                a.tasks
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = measure(
        Command::new(bin)
            .args(["service", "logs", "-f", "--tail", "0", "flood"])
            .env("SHOAL_SOCKET", tmp.path().join("shoal.sock")),
        Duration::from_secs(a.seconds),
    );
    let _ = node.cli(&["service", "rm", "flood"]);
    drop(node);
    r
}

fn docker_side(a: &LogsArgs, workdir: &Path) -> Result<Received> {
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-logs-docker-")
        .tempdir_in(workdir)?;
    let d = OwnDockerd::start(tmp.path())?;
    let docker = |args: &[&str]| run(Command::new("docker").args(["-H", &d.host]).args(args));
    let rootfs = tmp.path().join("rootfs");
    crate::fixture::busybox_rootfs(&rootfs)?;
    let tar = tmp.path().join("bb.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    docker(&["import", tar.to_str().context("path")?, "bb:latest"])?;
    docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
    let result = (|| {
        docker(&[
            "service",
            "create",
            "--detach",
            "--name",
            "flood",
            "--replicas",
            &a.tasks.to_string(),
            "--log-driver",
            "json-file",
            "--log-opt",
            "max-size=10m",
            "--log-opt",
            "max-file=3",
            "bb:latest",
            "sh",
            "-c",
            &task_command(),
        ])?;
        let t = Instant::now();
        let want = format!("{0}/{0}", a.tasks);
        while docker(&[
            "service",
            "ls",
            "--filter",
            "name=flood",
            "--format",
            "{{.Replicas}}",
        ])?
        .trim()
            != want
        {
            if t.elapsed() > RUN_DEADLINE {
                bail!("docker: {want} not running after {RUN_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        measure(
            Command::new("docker").args([
                "-H", &d.host, "service", "logs", "-f", "--tail", "0", "flood",
            ]),
            Duration::from_secs(a.seconds),
        )
    })();
    let _ = docker(&["service", "rm", "flood"]);
    // The tasks' containers go before the daemon does.
    let t = Instant::now();
    while !docker(&["ps", "-q"]).unwrap_or_default().trim().is_empty() && t.elapsed() < RUN_DEADLINE
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = docker(&["swarm", "leave", "--force"]);
    drop(d);
    result
}

/// `shoal-bench service-logs`.
pub fn service_logs(a: &LogsArgs) -> Result<()> {
    if a.tasks == 0 || a.tasks > MAX_TASKS || a.seconds == 0 || a.seconds > MAX_SECONDS {
        bail!("--tasks 1..={MAX_TASKS}, --seconds 1..={MAX_SECONDS}");
    }
    let bin = shoal_bin(&a.shoal)?;
    eprintln!(
        "service logs -f: {} tasks writing 100-byte lines, {} s counted",
        a.tasks, a.seconds
    );
    let s = shoal_side(a, &bin)?;
    println!(
        "  shoal:  {:.0} lines/s, {:.1} MB/s ({} lines in {:.1} s)",
        s.lines_per_s(),
        s.mb_per_s(),
        s.lines,
        s.secs
    );
    let mut json = serde_json::json!({
        "bench": "service-logs",
        "tasks": a.tasks,
        "seconds": a.seconds,
        "shoal_lines_per_s": s.lines_per_s(),
        "shoal_mb_per_s": s.mb_per_s(),
    });
    if !a.shoal_only {
        let d = docker_side(a, &a.workdir)?;
        println!(
            "  docker: {:.0} lines/s, {:.1} MB/s ({} lines in {:.1} s)",
            d.lines_per_s(),
            d.mb_per_s(),
            d.lines,
            d.secs
        );
        json["docker_lines_per_s"] = serde_json::json!(d.lines_per_s());
        json["docker_mb_per_s"] = serde_json::json!(d.mb_per_s());
    }
    println!("{json}");
    Ok(())
}
