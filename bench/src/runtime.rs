//! Runtime benchmarks: start latency against runc, and the per-container monitor's memory.

use crate::fixture;
use crate::stats::{ms, percentile};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct StartArgs {
    /// Runs of each runtime (interleaved).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// The peer runtime.
    #[arg(long, default_value = "runc")]
    runc: String,
    #[arg(long, default_value = "/tmp/shoal-bench")]
    workdir: PathBuf,
}

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Containers to run at once.
    #[arg(long, default_value_t = 50)]
    count: usize,
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Also run the same count under Docker (dockerd must be running, image `bb:latest` present,
    /// see shared/peers/docker-swarm.sh setup) and measure its containerd shims.
    #[arg(long)]
    docker: bool,
    #[arg(long, default_value = "/tmp/shoal-bench")]
    workdir: PathBuf,
}

fn shoal_bin(given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("shoal");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p shoal) or pass --shoal",
            p.display()
        );
    }
    Ok(p)
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(d)
}

pub fn start_latency(a: &StartArgs) -> Result<()> {
    let shoal = shoal_bin(&a.shoal)?;
    let bundle = a.workdir.join("true-bundle");
    fixture::bundle(&bundle, &["/bin/true"])?;
    let (shoal_root, runc_root) = (a.workdir.join("shoal-root"), a.workdir.join("runc-root"));
    let (mut s, mut r) = (Vec::with_capacity(a.runs), Vec::with_capacity(a.runs));
    let pid = std::process::id();
    for i in 0..a.runs {
        let id = format!("bench-{pid}-{i}");
        let mut shoal_cmd = Command::new(&shoal);
        shoal_cmd
            .arg("runtime")
            .arg("--root")
            .arg(&shoal_root)
            .args(["run", "-b"])
            .arg(&bundle)
            .arg(&id);
        let mut runc_cmd = Command::new(&a.runc);
        runc_cmd
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "-b"])
            .arg(&bundle)
            .arg(&id);
        // Alternate who goes first so neither always runs on a warm cache.
        if i % 2 == 0 {
            s.push(timed(&mut shoal_cmd)?);
            r.push(timed(&mut runc_cmd)?);
        } else {
            r.push(timed(&mut runc_cmd)?);
            s.push(timed(&mut shoal_cmd)?);
        }
    }
    let (sm, rm) = (
        percentile(&s, 0.5).context("no runs")?,
        percentile(&r, 0.5).context("no runs")?,
    );
    let (s90, r90) = (
        percentile(&s, 0.9).context("no runs")?,
        percentile(&r, 0.9).context("no runs")?,
    );
    let ratio = sm.as_secs_f64() / rm.as_secs_f64();
    println!(
        "runtime-start: {} runs each, /bin/true in a busybox bundle",
        a.runs
    );
    println!(
        "  shoal runtime run: median {:.3} ms  p90 {:.3} ms",
        ms(sm),
        ms(s90)
    );
    println!(
        "  runc run:          median {:.3} ms  p90 {:.3} ms",
        ms(rm),
        ms(r90)
    );
    println!("  ratio shoal/runc (median): {ratio:.3}  (target <= 0.25)");
    println!(
        "{}",
        serde_json::json!({"bench": "runtime-start", "runs": a.runs,
            "shoal_median_ms": ms(sm), "shoal_p90_ms": ms(s90),
            "runc_median_ms": ms(rm), "runc_p90_ms": ms(r90), "ratio": ratio})
    );
    Ok(())
}

/// Memory of one process in KiB: resident, proportional (shared pages divided among sharers)
/// and private (unique to it).
#[derive(Default, Clone, Copy)]
struct Mem {
    rss: u64,
    pss: u64,
    private: u64,
}

fn mem_of(pid: i32) -> Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let mut m = Mem::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "Rss:" => m.rss = v,
            "Pss:" => m.pss = v,
            "Private_Clean:" | "Private_Dirty:" => m.private += v,
            _ => {}
        }
    }
    Ok(m)
}

fn ppid_of(pid: i32) -> Result<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    Ok(rest
        .split_whitespace()
        .nth(1)
        .context("bad stat")?
        .parse()?)
}

fn report(name: &str, mems: &[Mem]) {
    let n = mems.len().max(1) as u64;
    let sum = mems.iter().fold(Mem::default(), |a, m| Mem {
        rss: a.rss + m.rss,
        pss: a.pss + m.pss,
        private: a.private + m.private,
    });
    println!(
        "  {name}: {} processes, mean RSS {} KiB, mean PSS {} KiB, mean private {} KiB",
        mems.len(),
        sum.rss / n,
        sum.pss / n,
        sum.private / n
    );
    println!(
        "{}",
        serde_json::json!({"bench": "monitor-memory", "who": name, "processes": mems.len(),
            "mean_rss_kib": sum.rss / n, "mean_pss_kib": sum.pss / n, "mean_private_kib": sum.private / n})
    );
}

pub fn monitor_memory(a: &MemoryArgs) -> Result<()> {
    let shoal = shoal_bin(&a.shoal)?;
    let bundle = a.workdir.join("sleep-bundle");
    fixture::bundle(&bundle, &["/bin/sleep", "3600"])?;
    let root = a.workdir.join("shoal-mem-root");
    let ids: Vec<String> = (0..a.count)
        .map(|i| format!("mem-{}-{i}", std::process::id()))
        .collect();
    let result = measure_shoal(&shoal, &root, &bundle, &ids);
    for id in &ids {
        let _ = Command::new(&shoal)
            .arg("runtime")
            .arg("--root")
            .arg(&root)
            .args(["delete", "-f", id])
            .output();
    }
    println!(
        "monitor-memory: {} containers running `sleep 3600`",
        a.count
    );
    report("shoal monitor", &result?);
    if a.docker {
        report("docker containerd-shim", &measure_docker(a.count)?);
    }
    Ok(())
}

fn measure_shoal(shoal: &Path, root: &Path, bundle: &Path, ids: &[String]) -> Result<Vec<Mem>> {
    let mut mems = Vec::new();
    for id in ids {
        timed(
            Command::new(shoal)
                .arg("runtime")
                .arg("--root")
                .arg(root)
                .args(["run", "-d", "-b"])
                .arg(bundle)
                .arg(id),
        )?;
    }
    std::thread::sleep(Duration::from_millis(500));
    for id in ids {
        let out = Command::new(shoal)
            .arg("runtime")
            .arg("--root")
            .arg(root)
            .args(["state", id])
            .output()?;
        let state: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("state of {id}"))?;
        if state["status"] != "running" {
            bail!("container {id} is {} instead of running", state["status"]);
        }
        let monitor = state["monitorPid"]
            .as_i64()
            .context("state has no monitorPid")? as i32;
        mems.push(mem_of(monitor)?);
    }
    Ok(mems)
}

fn measure_docker(count: usize) -> Result<Vec<Mem>> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let out = Command::new("docker")
            .args(["run", "-d", "--rm", "bb:latest", "sleep", "3600"])
            .output()?;
        if !out.status.success() {
            bail!(
                "docker run: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut mems = Vec::new();
    for id in &ids {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", id])
            .output()?;
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        mems.push(mem_of(ppid_of(pid)?)?);
    }
    let _ = Command::new("docker").arg("kill").args(&ids).output();
    Ok(mems)
}
