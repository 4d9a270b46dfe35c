//! Rolling update on one node with real containers: a service of N busybox `sleep` tasks gets
//! new args with parallelism P, delay 0, monitor M, stop grace G; the time from the update
//! request until the service's update status says completed. shoal against Docker swarm mode
//! on the same machine, same settings, both sides polled the same way (detached update, then
//! the update state every POLL). dockerd must already run with a one-node swarm and
//! `bb:latest` (shared/peers/docker-swarm.sh setup).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::services::{run, shoal_bin, ShoalNode};
use crate::stats::percentile;

/// How often both sides are polled.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for a create, an update or a cleanup.
const DEADLINE: Duration = Duration::from_secs(180);
/// Most replicas and rounds accepted.
const MAX_REPLICAS: usize = 500;
const MAX_ROUNDS: usize = 20;

#[derive(clap::Args)]
pub struct UpdateArgs {
    /// Replicas of the service.
    #[arg(long, default_value_t = 20)]
    replicas: usize,
    /// Tasks updated at once.
    #[arg(long, default_value_t = 5)]
    parallelism: u64,
    /// Update delay between tasks.
    #[arg(long, default_value = "0s")]
    delay: String,
    /// Update monitor period.
    #[arg(long, default_value = "1s")]
    monitor: String,
    /// Stop grace period (busybox `sleep` as pid 1 ignores SIGTERM: each stop takes all of it).
    #[arg(long, default_value = "1s")]
    stop_grace_period: String,
    /// Rounds on each side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<std::path::PathBuf>,
    /// Skip the Docker side (dockerd not running).
    #[arg(long)]
    shoal_only: bool,
    /// Parent of the run's temporary directory.
    #[arg(long, default_value = "/var/tmp")]
    workdir: std::path::PathBuf,
}

/// Polls `done` every POLL until it holds; the time from `start`.
fn until(start: Instant, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<Duration> {
    loop {
        if done()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > DEADLINE {
            bail!("{what}: not done after {DEADLINE:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn settings<'a>(a: &'a UpdateArgs, par: &'a str, n: &'a str) -> Vec<&'a str> {
    vec![
        "--replicas",
        n,
        "--update-parallelism",
        par,
        "--update-delay",
        &a.delay,
        "--update-monitor",
        &a.monitor,
        "--stop-grace-period",
        &a.stop_grace_period,
    ]
}

// ---- shoal ----

fn shoal_state(node: &ShoalNode, name: &str) -> Result<(String, serde_json::Value)> {
    let out = node.cli(&["service", "inspect", name])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("service inspect json")?;
    let s = v[0]["UpdateStatus"]["State"]
        .as_str()
        .unwrap_or("")
        .to_string();
    Ok((s, v[0].clone()))
}

fn shoal_round(a: &UpdateArgs, node: &ShoalNode, name: &str) -> Result<Duration> {
    let (par, n) = (a.parallelism.to_string(), a.replicas.to_string());
    let mut create = vec!["service", "create", "--name", name];
    create.extend(settings(a, &par, &n));
    create.extend(["bb:latest", "sleep", "3600"]);
    node.cli(&create)?;
    let t = Instant::now();
    node.cli(&["service", "update", "-d", "--args", "sleep 3601", name])?;
    let took = until(t, &format!("shoal: {name} update"), || {
        let (state, v) = shoal_state(node, name)?;
        if state == "paused" || state.starts_with("rollback") {
            let ps = node.cli(&["service", "ps", "--no-trunc", name])?;
            bail!(
                "shoal: the update of {name} ended {state}: {}\n{ps}",
                v["UpdateStatus"]["Message"]
            );
        }
        Ok(state == "completed")
    })?;
    // Every task runs the new args.
    let out = node.cli(&["service", "ps", "--format", "json", name])?;
    let tasks: serde_json::Value = serde_json::from_str(&out).context("service ps json")?;
    let new_running = tasks
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| {
                    t["DesiredState"] == "running"
                        && t["Status"]["State"] == "running"
                        && t["Args"] == serde_json::json!(["sleep", "3601"])
                })
                .count()
        })
        .unwrap_or(0);
    if new_running != a.replicas {
        bail!(
            "shoal: update completed with {new_running} of {} tasks on the new spec",
            a.replicas
        );
    }
    node.cli(&["service", "rm", name])?;
    let t = Instant::now();
    until(t, &format!("shoal: containers of {name} gone"), || {
        Ok(node.runtime_containers()?.1 == 0)
    })?;
    Ok(took)
}

fn shoal_rounds(a: &UpdateArgs, bin: &Path) -> Result<Vec<Duration>> {
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-upd-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("creating a directory under {}", a.workdir.display()))?;
    let mut node = ShoalNode::start(bin, tmp.path())?;
    let mut out = Vec::new();
    for i in 0..a.rounds {
        let name = format!("upd{}-{i}", std::process::id());
        let d = shoal_round(a, &node, &name)?;
        eprintln!("  shoal round {}: {:.3} s", i + 1, d.as_secs_f64());
        out.push(d);
    }
    node.stop();
    Ok(out)
}

// ---- Docker swarm mode ----

fn docker(args: &[&str]) -> Result<String> {
    run(Command::new("docker").args(args))
}

fn docker_cleanup(name: &str) -> Result<()> {
    let _ = docker(&["service", "rm", name]);
    let label = format!("label=com.docker.swarm.service.name={name}");
    let t = Instant::now();
    until(t, &format!("docker: containers of {name} gone"), || {
        Ok(docker(&["ps", "-aq", "--filter", &label])?
            .trim()
            .is_empty())
    })
    .map(|_| ())
}

fn docker_round(a: &UpdateArgs, name: &str) -> Result<Duration> {
    let (par, n) = (a.parallelism.to_string(), a.replicas.to_string());
    let mut create = vec!["service", "create", "-q", "--name", name];
    create.extend(settings(a, &par, &n));
    create.extend(["bb:latest", "sleep", "3600"]);
    docker(&create)?;
    let t = Instant::now();
    docker(&[
        "service",
        "update",
        "-q",
        "-d",
        "--args",
        "sleep 3601",
        name,
    ])?;
    until(t, &format!("docker: {name} update"), || {
        let s = docker(&[
            "service",
            "inspect",
            "--format",
            "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
            name,
        ])?;
        let s = s.trim();
        if s == "paused" || s.starts_with("rollback") {
            bail!("docker: the update of {name} ended {s}");
        }
        Ok(s == "completed")
    })
}

fn docker_rounds(a: &UpdateArgs) -> Result<Vec<Duration>> {
    let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]).context(
        "dockerd not reachable: run shared/peers/docker-swarm.sh setup, or --shoal-only",
    )?;
    if state.trim() != "active" {
        bail!("docker is not in swarm mode: run shared/peers/docker-swarm.sh setup");
    }
    let mut out = Vec::new();
    for i in 0..a.rounds {
        let name = format!("upd{}-{i}", std::process::id());
        let r = docker_round(a, &name);
        let cleaned = docker_cleanup(&name);
        let d = r?;
        cleaned?;
        eprintln!("  docker round {}: {:.3} s", i + 1, d.as_secs_f64());
        out.push(d);
    }
    Ok(out)
}

fn secs(v: &[Duration]) -> Vec<f64> {
    v.iter()
        .map(|d| (d.as_secs_f64() * 1e3).round() / 1e3)
        .collect()
}

/// `service-update`: shoal's rounds, then Docker's, medians side by side.
pub fn service_update(a: &UpdateArgs) -> Result<()> {
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
    let sm = percentile(&shoal, 0.5).context("no rounds")?.as_secs_f64();
    println!(
        "service-update: {} replicas of busybox `sleep`, parallelism {}, delay {}, monitor {}, stop grace {}, {} rounds each",
        a.replicas, a.parallelism, a.delay, a.monitor, a.stop_grace_period, a.rounds
    );
    println!("  shoal:  update to completed median {sm:.3} s  (target < 9 s)");
    let mut json = serde_json::json!({"bench": "service-update", "replicas": a.replicas,
        "parallelism": a.parallelism, "delay": a.delay, "monitor": a.monitor,
        "stop_grace_period": a.stop_grace_period, "rounds": a.rounds,
        "shoal_s": secs(&shoal), "shoal_median_s": sm});
    if let Some(d) = &docker {
        let dm = percentile(d, 0.5).context("no rounds")?.as_secs_f64();
        println!("  docker: update to completed median {dm:.3} s");
        println!("  ratio docker/shoal: {:.2}x", dm / sm);
        json["docker_s"] = serde_json::json!(secs(d));
        json["docker_median_s"] = serde_json::json!(dm);
    }
    println!("{json}");
    Ok(())
}
