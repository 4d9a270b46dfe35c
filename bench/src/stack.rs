//! `stack-deploy`: one compose file of S services × R replicas of busybox `sleep 3600` on one
//! node, from `stack deploy` until every task runs; shoal against `docker stack deploy` on a
//! one-node swarm of a dockerd this run starts in its temp dir (`docker swarm init`, the same
//! busybox rootfs `docker import`ed), torn down by pid at the end, on error too. Each round
//! removes the stack (`stack rm`) and waits until no container of it is left.

use crate::image_pull::OwnDockerd;
use crate::publish::median;
use crate::services::{run, shoal_bin, until, ShoalNode};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);
/// Longest wait for a removed stack's containers and networks to go.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(180);
const STACK: &str = "benchstack";

#[derive(clap::Args)]
pub struct StackArgs {
    /// Services in the compose file.
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Replicas of each service.
    #[arg(long, default_value_t = 10)]
    replicas: usize,
    /// Rounds of deploy + rm on each side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Every service on the nodes' `host` network (an external network in the file) instead of
    /// the stack's default overlay network: tells the overlay attachments' share.
    #[arg(long)]
    host_network: bool,
    /// Skip the Docker side.
    #[arg(long)]
    shoal_only: bool,
    /// Parent of the run's temporary directory.
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
}

fn compose(services: usize, replicas: usize, host_network: bool) -> String {
    let mut s = String::from("version: \"3.8\"\nservices:\n");
    for i in 0..services {
        s.push_str(&format!(
            "  svc{i}:\n    image: bb:latest\n    command: [\"sleep\", \"3600\"]\n    stop_grace_period: 1s\n    deploy:\n      replicas: {replicas}\n"
        ));
        if host_network {
            s.push_str("    networks: [hostnet]\n");
        }
    }
    if host_network {
        s.push_str("networks:\n  hostnet:\n    external: true\n    name: host\n");
    }
    s
}

fn shoal_rounds(a: &StackArgs, bin: &Path, file: &Path, dir: &Path) -> Result<Vec<f64>> {
    let node = ShoalNode::start(bin, dir)?;
    let want = a.services * a.replicas;
    let file = file.to_str().context("path")?;
    let mut out = Vec::new();
    for i in 0..a.rounds {
        let t = Instant::now();
        node.cli(&[
            "stack",
            "deploy",
            "-c",
            file,
            "--resolve-image",
            "never",
            STACK,
        ])?;
        let up = until(t, "shoal: every task of the stack running", || {
            let ls = node.cli(&["service", "ls", "--format", "json"])?;
            let list: serde_json::Value = serde_json::from_str(&ls).context("service ls json")?;
            let running: u64 = list
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|s| {
                            s["Spec"]["Name"]
                                .as_str()
                                .is_some_and(|n| n.starts_with(&format!("{STACK}_")))
                        })
                        .map(|s| s["ServiceStatus"]["RunningTasks"].as_u64().unwrap_or(0))
                        .sum()
                })
                .unwrap_or(0);
            Ok(running == want as u64 && node.runtime_containers()?.0 == want)
        })?;
        eprintln!("  shoal round {}: {:.3} s", i + 1, up.as_secs_f64());
        out.push(up.as_secs_f64());
        node.cli(&["stack", "rm", STACK])?;
        let t = Instant::now();
        while node.runtime_containers()?.1 > 0 || node.cli(&["network", "ls"])?.contains(STACK) {
            if t.elapsed() > CLEANUP_DEADLINE {
                bail!("shoal: the stack's containers still there after {CLEANUP_DEADLINE:?}");
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(out)
}

fn docker(host: &str, args: &[&str]) -> Result<String> {
    run(Command::new("docker").args(["-H", host]).args(args))
}

fn docker_rounds(a: &StackArgs, file: &Path, dir: &Path) -> Result<Vec<f64>> {
    let d = OwnDockerd::start(&dir.join("dockerd"))?;
    let host = d.host.clone();
    let port = crate::cluster::free_port()?;
    docker(
        &host,
        &[
            "swarm",
            "init",
            "--advertise-addr",
            "127.0.0.1",
            "--listen-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    let rootfs = dir.join("docker-rootfs");
    crate::fixture::busybox_rootfs(&rootfs)?;
    let tar = dir.join("docker-bb.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    docker(
        &host,
        &["import", tar.to_str().context("path")?, "bb:latest"],
    )?;
    let want = a.services * a.replicas;
    let file = file.to_str().context("path")?;
    let name_filter = format!("name={STACK}_");
    let label = format!("label=com.docker.stack.namespace={STACK}");
    let mut out = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..a.rounds {
            let t = Instant::now();
            docker(
                &host,
                &[
                    "stack",
                    "deploy",
                    "--detach=true",
                    "--resolve-image",
                    "never",
                    "-c",
                    file,
                    STACK,
                ],
            )?;
            let up = until(t, "docker: every task of the stack running", || {
                let ps = docker(
                    &host,
                    &[
                        "ps",
                        "-q",
                        "--filter",
                        &name_filter,
                        "--filter",
                        "status=running",
                    ],
                )?;
                Ok(ps.lines().filter(|l| !l.is_empty()).count() == want)
            })?;
            eprintln!("  docker round {}: {:.3} s", i + 1, up.as_secs_f64());
            out.push(up.as_secs_f64());
            docker(&host, &["stack", "rm", STACK])?;
            let t = Instant::now();
            while !docker(&host, &["ps", "-aq", "--filter", &name_filter])?
                .trim()
                .is_empty()
                || !docker(&host, &["network", "ls", "-q", "--filter", &label])?
                    .trim()
                    .is_empty()
            {
                if t.elapsed() > CLEANUP_DEADLINE {
                    bail!("docker: the stack still there after {CLEANUP_DEADLINE:?}");
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    })();
    let _ = docker(&host, &["stack", "rm", STACK]);
    let _ = docker(&host, &["swarm", "leave", "--force"]);
    drop(d);
    result?;
    Ok(out)
}

pub fn stack_deploy(a: &StackArgs) -> Result<()> {
    if a.services == 0 || a.replicas == 0 || a.services * a.replicas > 1000 {
        bail!("--services × --replicas must be 1..=1000");
    }
    if a.rounds == 0 || a.rounds > 20 {
        bail!("--rounds must be 1..=20");
    }
    let bin = shoal_bin(&a.shoal)?;
    let tmp = tempfile::Builder::new()
        .prefix("shoal-bench-stack-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("creating a directory under {}", a.workdir.display()))?;
    let file = tmp.path().join("stack.yml");
    std::fs::write(&file, compose(a.services, a.replicas, a.host_network))?;
    let shoal_dir = tmp.path().join("shoal");
    std::fs::create_dir_all(&shoal_dir)?;
    let shoal = shoal_rounds(a, &bin, &file, &shoal_dir)?;
    let docker = if a.shoal_only {
        None
    } else {
        Some(docker_rounds(a, &file, tmp.path())?)
    };
    let (s, r) = (a.services, a.replicas);
    println!(
        "stack-deploy: {s} services × {r} replicas of busybox `sleep 3600` on one node, {} rounds each",
        a.rounds
    );
    let sm = median(&shoal);
    println!(
        "  shoal:  stack deploy → {}/{} running median {sm:.3} s",
        s * r,
        s * r
    );
    let mut json = serde_json::json!({"bench": "stack-deploy", "services": s, "replicas": r,
        "rounds": a.rounds, "shoal_s": shoal, "shoal_median_s": sm});
    if let Some(d) = &docker {
        let dm = median(d);
        println!(
            "  docker: stack deploy → {}/{} running median {dm:.3} s",
            s * r,
            s * r
        );
        println!("  ratio docker/shoal: {:.1}x", dm / sm);
        json["docker_s"] = serde_json::json!(d);
        json["docker_median_s"] = serde_json::json!(dm);
    }
    println!("{json}");
    Ok(())
}
