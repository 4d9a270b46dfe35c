//! A new image to every node of a test bed cluster: shoal's peer-to-peer layers against every
//! node pulling from the one registry, in the same run.
//!
//! Debian's docker-registry listens on the test bed bridge's address in the host namespace;
//! its traffic to the test hosts leaves through the bridge, whose egress is limited with a
//! `tbf` qdisc (`--rate`, default 100 Mbit/s: a registry across a WAN or a busy uplink — on one
//! machine an unlimited origin is as fast as a peer, and there is nothing to win). Every round
//! pushes two fresh images (a busybox layer and `--layer-mib` of random bytes, so no node holds
//! them) and creates, one after the other, a service of one task per node on each:
//! - origin: `--no-resolve-image` — the tag is not pinned, so no peer is asked: every node
//!   pulls every layer from the registry (swarm's way);
//! - peer-to-peer: pinned to the digest — one node pulls from the registry while the others
//!   wait for it, then fetch the layers from it (`worker/src/peers.rs`).
//!
//! Timed: `service create` until every task is RUNNING. Counted: how many times the registry
//! served the random layer (its log). The agents run with `--registry-port 5000`, so each node
//! serves what it holds to its peers. The test bed (and with it the qdisc) goes down at the
//! end, on error too; the registry is killed by pid.

use crate::bed::Bed;
use crate::publish::median;
use crate::stats::round3;
use anyhow::{bail, Context, Result};
use shoal_tests::registry::{digest, oci_arch, Layout, Registry};
use shoal_tests::testbed::busybox_rootfs_tar;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Longest wait for one service's tasks to run.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct P2pArgs {
    /// Test bed nodes, each running one task
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Rounds (each: one service per side, the first side alternating)
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Size of the image's random layer, MiB
    #[arg(long, default_value_t = 64)]
    layer_mib: usize,
    /// The registry's bandwidth to the test bed (tc tbf rate)
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// The shoal binary (default: target/release/shoal, else target/debug/shoal)
    #[arg(long)]
    shoal: Option<PathBuf>,
}

/// Writes a two-layer image (busybox, then `mib` MiB of random bytes) into `dir` as an OCI
/// layout; the random layer's digest.
fn image(dir: &std::path::Path, mib: usize) -> Result<String> {
    let work = tempfile::tempdir()?;
    let base = work.path().join("busybox.tar");
    busybox_rootfs_tar(&base)?;
    let base = std::fs::read(&base)?;
    let mut noise = vec![0u8; mib << 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut noise)?;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(noise.len() as u64);
    b.append_data(&mut h, "noise", noise.as_slice())?;
    let top = b.into_inner()?;
    let l = Layout { dir };
    let (d1, d2) = (l.blob(&base), l.blob(&top));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [d1, d2]},
    }))?;
    let dc = l.blob(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": dc, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d1, "size": base.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d2, "size": top.len()},
        ],
    }))?;
    l.blob(&manifest);
    l.finish(&manifest, false);
    Ok(digest(&top))
}

/// Runs on every node until RUNNING; seconds since the create.
fn until_running(bed: &Bed, name: &str, image: &str, pinned: bool, n: usize) -> Result<f64> {
    let replicas = n.to_string();
    let mut args = vec![
        "service",
        "create",
        "-d",
        "--name",
        name,
        "--replicas",
        &replicas,
        "--replicas-max-per-node",
        "1",
        "--stop-grace-period",
        "1s",
    ];
    if !pinned {
        args.push("--no-resolve-image");
    }
    args.extend([image, "sleep", "3600"]);
    let t = Instant::now();
    bed.shoal(&args)?;
    loop {
        let out = bed.shoal(&["service", "ps", "--format", "json", name])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("service ps json")?;
        let tasks = v.as_array().cloned().unwrap_or_default();
        let running = tasks
            .iter()
            .filter(|t| t["Status"]["State"] == "running" && t["DesiredState"] == "running")
            .count();
        if running >= n {
            return Ok(t.elapsed().as_secs_f64());
        }
        if let Some(bad) = tasks.iter().find(|t| t["Status"]["State"] == "rejected") {
            bail!("{name}: a task was rejected: {}", bad["Status"]["Err"]);
        }
        if t.elapsed() > RUN_DEADLINE {
            bail!("{name}: {running} of {n} tasks running after {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn p2p(a: &P2pArgs) -> Result<()> {
    if a.nodes < 2 || a.rounds == 0 || a.layer_mib == 0 {
        bail!("--nodes must be at least 2, --rounds and --layer-mib at least 1");
    }
    let mut reg: Option<Registry> = None;
    let bed = Bed::up_with(&a.shoal, a.nodes, a.nodes, |tb| {
        let r = Registry::start(&tb.bridge_addr().to_string())?;
        let addr = r.addr().to_string();
        reg = Some(r);
        Ok(vec![
            "--insecure-registry".into(),
            addr,
            "--registry-port".into(),
            "5000".into(),
        ])
    })?;
    let reg = reg.context("the registry")?;
    let bridge = bed.testbed().bridge();
    let tc = std::process::Command::new("tc")
        .args([
            "qdisc", "add", "dev", &bridge, "root", "tbf", "rate", &a.rate,
        ])
        .args(["burst", "256kb", "latency", "500ms"])
        .status()
        .context("tc")?;
    if !tc.success() {
        bail!("tc qdisc add dev {bridge} root tbf failed");
    }
    eprintln!(
        "  origin {} limited to {} on {bridge}; {} nodes, a {} MiB layer",
        reg.addr(),
        a.rate,
        a.nodes,
        a.layer_mib
    );
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut served: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    let names = ["origin", "p2p"];
    for round in 0..a.rounds {
        for k in 0..2 {
            let side = (round + k) % 2;
            let work = tempfile::tempdir()?;
            let layout = work.path().join("layout");
            let noise = image(&layout, a.layer_mib)?;
            let tag = format!("bench:r{round}-{}", names[side]);
            reg.push(&layout, &tag)?;
            let svc = format!("p2p-r{round}-{}", names[side]);
            let image = format!("{}/{tag}", reg.addr());
            let secs = until_running(&bed, &svc, &image, side == 1, a.nodes)?;
            let n = reg.blob_served(&noise);
            eprintln!(
                "  round {round} {:>6}: all {} running after {:.2} s; the registry served the layer {n}×",
                names[side], a.nodes, secs
            );
            times[side].push(secs);
            served[side].push(n);
            bed.shoal(&["service", "rm", &svc])?;
        }
    }
    let (o, p) = (median(&times[0]), median(&times[1]));
    println!(
        "p2p-pull: {} nodes, {} MiB layer, origin at {}: every node from the registry median {} s \
         (layer served {:?}), peer-to-peer {} s (served {:?}): {}× faster",
        a.nodes,
        a.layer_mib,
        a.rate,
        round3(o),
        served[0],
        round3(p),
        served[1],
        round3(o / p)
    );
    Ok(())
}
