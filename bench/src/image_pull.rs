//! An image pull from a registry, shoal against skopeo and Docker in the same run: a ~200 MiB
//! image of 5 gzip-compressed layers (`application/vnd.oci.image.layer.v1.tar+gzip`, made here
//! with GNU tar and the `gzip` binary) is pushed once (`skopeo copy --preserve-digests`) to
//! Debian's docker-registry on a 127.0.0.1 port (`shoal_tests::registry::Registry`). Each layer
//! holds files of pseudo-random content, half raw bytes (which gzip cannot shrink) and half
//! random hex text (which it halves with real Huffman coding), so inflating is real work and
//! the compressed image is still ~200 MiB.
//!
//! Every round pulls it once per side, each into a fresh empty destination, the sides
//! interleaved and the first one rotating:
//! - shoal: `shoal image pull REF` with `SHOAL_DATA_DIR` a fresh directory (download, verify,
//!   store the blobs and unpack every layer, fsynced: a runnable image);
//! - skopeo: `skopeo copy --src-tls-verify=false docker://REF oci:DIR:big` (download into an
//!   OCI layout: blobs only, nothing unpacked);
//! - docker: `docker pull REF` (download, unpack into its layer store), then `docker rmi REF`
//!   untimed (127.0.0.0/8 registries are insecure to Docker by default). Either the Docker
//!   daemon that already answers `docker info`, or with `--start-dockerd` one this run starts:
//!   its data root, exec root, pid file, config file and socket (`-H unix://…`) in the run's
//!   temp dir, `--iptables=false --bridge=none` (nothing changed on the host), killed by pid
//!   when the run ends, on error too.
//!
//! Each destination is removed and `sync` run, untimed, before the next pull, so no side pays
//! for another's writeback. For reference, `shoal image load` of skopeo's layout (the same
//! blobs, no network: copied and hashed, then unpacked, synced) is timed as many times at the
//! end. A pull unpacks its layers while they download, so the pull's time minus the load's is
//! not the download's share.
//!
//! Everything lives in a tempdir under `--workdir`; the registry is killed (by pid) and the
//! image removed from Docker when the run ends, on error too. Traffic goes to 127.0.0.1 only.

use crate::publish::median;
use crate::services::{run, shoal_bin};
use crate::stats::round3;
use anyhow::{bail, Context, Result};
use shoal_tests::registry::{digest, oci_arch, Layout, Registry, SKOPEO_BIN};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest one pull (or load) may take before it is killed.
const PULL_DEADLINE: Duration = Duration::from_secs(600);
/// Longest `docker info` may take to say whether dockerd runs.
const DOCKER_INFO_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a dockerd this run starts may take to answer `docker info`.
const DOCKERD_START_DEADLINE: Duration = Duration::from_secs(60);
/// Longest a dockerd this run started may take to exit after SIGTERM before it gets SIGKILL.
const DOCKERD_STOP_DEADLINE: Duration = Duration::from_secs(20);
/// Pause between checks on a running child.
const POLL: Duration = Duration::from_millis(10);
/// Bounds on the arguments.
const MAX_ROUNDS: usize = 20;
const MAX_LAYERS: usize = 64;
const MAX_LAYER_MIB: usize = 1024;
/// Files per layer (alternately raw random bytes and random hex text).
const FILES_PER_LAYER: usize = 4;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(clap::Args)]
pub struct ImagePullArgs {
    /// Rounds; each pulls the image once per side (interleaved, the first side rotating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Layers of the image.
    #[arg(long, default_value_t = 5)]
    layers: usize,
    /// Uncompressed MiB of files in each layer (52 × 5 gives ~200 MiB compressed).
    #[arg(long, default_value_t = 52)]
    layer_mib: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Leave Docker out even if its daemon runs.
    #[arg(long, conflicts_with = "start_dockerd")]
    no_docker: bool,
    /// Start a dockerd of this run's own (data and exec root in the run's temp dir, its own
    /// socket, no iptables rules, no bridge), killed by pid at the end; without it Docker is
    /// measured only if a daemon already answers `docker info`.
    #[arg(long)]
    start_dockerd: bool,
    /// Skip timing `shoal image load` of skopeo's layout (the same blobs from disk).
    #[arg(long)]
    no_breakdown: bool,
    /// Parent of the run's temporary directory (image build, pull destinations).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
}

/// splitmix64: fast, seedable, good enough that gzip finds no structure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `buf` filled with raw random bytes, or with random lowercase hex text (lines of 64).
    fn fill(&mut self, buf: &mut [u8], text: bool) {
        if text {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let (mut word, mut nibbles) = (0u64, 0);
            for (i, b) in buf.iter_mut().enumerate() {
                if i % 65 == 64 {
                    *b = b'\n';
                    continue;
                }
                if nibbles == 0 {
                    (word, nibbles) = (self.next(), 16);
                }
                *b = HEX[(word & 15) as usize];
                (word, nibbles) = (word >> 4, nibbles - 1);
            }
        } else {
            for chunk in buf.chunks_mut(8) {
                let w = self.next().to_le_bytes();
                chunk.copy_from_slice(&w[..chunk.len()]);
            }
        }
    }
}

/// Writes `bytes` of pseudo-random content (seeded by `seed`) to `path`.
fn random_file(path: &Path, bytes: usize, seed: u64, text: bool) -> Result<()> {
    let mut rng = Rng(seed);
    let mut out = BufWriter::new(File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n], text);
        out.write_all(&buf[..n])?;
        left -= n;
    }
    out.flush()?;
    Ok(())
}

/// The image built for the run: what the sides must end up with.
struct Image {
    manifest_digest: String,
    /// Manifest + config + layers, as the registry serves them.
    bytes: u64,
    /// The layers' tars, uncompressed.
    uncompressed: u64,
}

/// Builds the image as an OCI layout in `dir` (tagged `latest`), its layers under `scratch`.
fn build_image(a: &ImagePullArgs, dir: &Path, scratch: &Path) -> Result<Image> {
    let layout = Layout { dir };
    let file_bytes = a.layer_mib * (1 << 20) / FILES_PER_LAYER;
    let mut tars = Vec::new();
    for l in 0..a.layers {
        let root = scratch.join(format!("layer{l}"));
        let files = root.join(format!("data/layer{l}"));
        std::fs::create_dir_all(&files)?;
        for f in 0..FILES_PER_LAYER {
            let seed = ((l as u64) << 32) | f as u64;
            let text = f % 2 == 1;
            let name = if text { "text" } else { "bin" };
            random_file(&files.join(format!("{name}{f}")), file_bytes, seed, text)?;
        }
        let tar = scratch.join(format!("layer{l}.tar"));
        run(Command::new("tar")
            .args([
                "--format=gnu",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "-C",
            ])
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("data"))
        .context("tar (GNU tar) of a layer")?;
        std::fs::remove_dir_all(&root)?;
        tars.push(tar);
    }
    // Compress all layers at once (one gzip per layer; the machine's cores share them).
    let mut gzips = Vec::new();
    for tar in &tars {
        let out = File::create(tar.with_extension("tar.gz"))?;
        let child = Command::new("gzip")
            .args(["-n", "-c"])
            .arg(tar)
            .stdin(Stdio::null())
            .stdout(out)
            .spawn()
            .context("starting gzip")?;
        gzips.push(child);
    }
    let mut failed = false;
    for mut g in gzips {
        failed |= !g.wait()?.success();
    }
    if failed {
        bail!("gzip of a layer failed");
    }
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut uncompressed = 0u64;
    for tar in &tars {
        let plain = std::fs::read(tar)?;
        uncompressed += plain.len() as u64;
        diff_ids.push(digest(&plain));
        drop(plain);
        let gz = std::fs::read(tar.with_extension("tar.gz"))?;
        let d = layout.blob(&gz);
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": gz.len(),
        }));
        std::fs::remove_file(tar)?;
        std::fs::remove_file(tar.with_extension("tar.gz"))?;
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = layout.blob(&config);
    let layer_bytes: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layers,
    }))?;
    layout.blob(&manifest);
    layout.finish(&manifest, false);
    Ok(Image {
        manifest_digest: digest(&manifest),
        bytes: manifest.len() as u64 + config.len() as u64 + layer_bytes,
        uncompressed,
    })
}

/// Runs `cmd` (stdout and stderr to files in `logs`), killing it by pid after `deadline`; its
/// wall time and stdout.
fn timed(cmd: &mut Command, logs: &Path, deadline: Duration) -> Result<(Duration, String)> {
    let out_path = logs.join("stdout");
    let err_path = logs.join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish in {deadline:?}");
        }
        std::thread::sleep(POLL);
    };
    let took = t.elapsed();
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!("{cmd:?} failed ({status}): {}", err.trim());
    }
    Ok((took, out))
}

/// `docker` talking to `host` (`unix://…`), or to the default daemon.
fn docker(host: Option<&str>) -> Command {
    let mut c = Command::new("docker");
    if let Some(h) = host {
        c.args(["-H", h]);
    }
    c
}

/// Whether `docker info` succeeds within DOCKER_INFO_DEADLINE (dockerd runs and answers).
fn docker_running(host: Option<&str>) -> bool {
    let Ok(mut child) = docker(host)
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if t.elapsed() < DOCKER_INFO_DEADLINE => std::thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The 1-minute load average.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// An image Docker holds because of this run, removed (`docker rmi`) when dropped.
struct DockerImage {
    reference: Option<String>,
    host: Option<String>,
}

impl DockerImage {
    fn remove(&mut self) -> Result<()> {
        if let Some(r) = self.reference.take() {
            run(docker(self.host.as_deref()).args(["rmi", &r]))?;
        }
        Ok(())
    }
}

/// A dockerd this run started, everything of it under `dir`; stopped by pid when dropped
/// (SIGTERM, then SIGKILL), with the containerd it started and any mount left under `dir`.
pub(crate) struct OwnDockerd {
    child: std::process::Child,
    dir: PathBuf,
    /// `unix://DIR/docker.sock`.
    pub(crate) host: String,
}

impl OwnDockerd {
    pub(crate) fn start(dir: &Path) -> Result<OwnDockerd> {
        let data = dir.join("data");
        let exec = dir.join("exec");
        std::fs::create_dir_all(&data)?;
        std::fs::create_dir_all(&exec)?;
        // An empty config file: nothing from /etc/docker/daemon.json.
        let config = dir.join("daemon.json");
        std::fs::write(&config, "{}")?;
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let log = File::create(dir.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(&data)
            .arg("--exec-root")
            .arg(&exec)
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["-H", &host, "--iptables=false", "--bridge=none"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (apt-get install docker.io)")?;
        let mut d = OwnDockerd {
            child,
            dir: dir.to_path_buf(),
            host,
        };
        let t = Instant::now();
        loop {
            if let Some(st) = d.child.try_wait()? {
                let log = std::fs::read_to_string(d.dir.join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "dockerd exited ({st}): {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            if docker_running(Some(&d.host)) {
                return Ok(d);
            }
            if t.elapsed() > DOCKERD_START_DEADLINE {
                bail!("dockerd did not answer within {DOCKERD_START_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The containerd this dockerd started (its pid file under the exec root), if it runs.
    fn containerd_pid(&self) -> Option<nix::unistd::Pid> {
        let s = std::fs::read_to_string(self.dir.join("exec/containerd/containerd.pid")).ok()?;
        let pid = nix::unistd::Pid::from_raw(s.trim().parse().ok()?);
        nix::sys::signal::kill(pid, None).ok().map(|()| pid)
    }
}

impl Drop for OwnDockerd {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let containerd = self.containerd_pid();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let t = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if t.elapsed() < DOCKERD_STOP_DEADLINE => std::thread::sleep(POLL),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        // dockerd stops the containerd it started; make sure of it (by its pid).
        if let Some(c) = containerd {
            let t = Instant::now();
            while kill(c, None).is_ok() && t.elapsed() < DOCKERD_STOP_DEADLINE {
                std::thread::sleep(POLL);
            }
            if kill(c, None).is_ok() {
                let _ = kill(c, Signal::SIGKILL);
            }
        }
        // Mounts dockerd left under its directories (none expected without containers).
        let prefix = format!("{}/", self.dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for DockerImage {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("shoal-bench: {e:#}");
        }
    }
}

/// The sides.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Side {
    Shoal,
    Skopeo,
    Docker,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Shoal => "shoal",
            Side::Skopeo => "skopeo",
            Side::Docker => "docker",
        }
    }
}

/// One side's figures for the report and the JSON line: (median s, MiB/s, JSON).
fn summary(secs: &[f64], bytes: u64) -> (f64, f64, serde_json::Value) {
    let m = median(secs);
    let mibs = bytes as f64 / MIB / m;
    let json = serde_json::json!({
        "secs": secs.iter().map(|&s| round3(s)).collect::<Vec<_>>(),
        "median_secs": round3(m), "mib_per_s": round3(mibs),
    });
    (m, mibs, json)
}

/// `image-pull`: build and push the image once, then interleaved rounds of pulls.
pub fn image_pull(a: &ImagePullArgs) -> Result<()> {
    if a.rounds == 0 || a.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    if a.layers == 0 || a.layers > MAX_LAYERS {
        bail!("--layers must be 1..={MAX_LAYERS}");
    }
    if a.layer_mib == 0 || a.layer_mib > MAX_LAYER_MIB {
        bail!("--layer-mib must be 1..={MAX_LAYER_MIB}");
    }
    let bin = shoal_bin(&a.shoal)?;
    let skopeo_version = run(Command::new(SKOPEO_BIN).arg("--version"))
        .context("skopeo not runnable: apt-get install skopeo")?
        .trim()
        .to_string();
    std::fs::create_dir_all(&a.workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("shoal-image-pull-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("a tempdir in {}", a.workdir.display()))?;
    // Declared after `tmp`: stopped before it is removed.
    let own_dockerd = if a.start_dockerd {
        let t = Instant::now();
        let d = OwnDockerd::start(&tmp.path().join("dockerd"))?;
        eprintln!(
            "  started dockerd (pid {}) on {} in {:.1} s",
            d.child.id(),
            d.host,
            t.elapsed().as_secs_f64()
        );
        Some(d)
    } else {
        None
    };
    let docker_host = own_dockerd.as_ref().map(|d| d.host.clone());
    let docker_version = if a.no_docker {
        eprintln!("  docker: left out (--no-docker)");
        None
    } else if !docker_running(docker_host.as_deref()) {
        eprintln!("  docker: SKIPPED — `docker info` fails: no Docker daemon is running (--start-dockerd starts one)");
        None
    } else {
        Some(
            run(docker(docker_host.as_deref()).args([
                "version",
                "--format",
                "{{.Server.Version}}",
            ]))?
            .trim()
            .to_string(),
        )
    };
    let t = Instant::now();
    let layout_dir = tmp.path().join("layout");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let image = build_image(a, &layout_dir, &scratch)?;
    eprintln!(
        "  built {} layers: {:.1} MiB compressed ({:.1} MiB of tars) in {:.1} s",
        a.layers,
        image.bytes as f64 / MIB,
        image.uncompressed as f64 / MIB,
        t.elapsed().as_secs_f64()
    );
    let reg = Registry::start("127.0.0.1")?;
    let t = Instant::now();
    reg.push(&layout_dir, "big:1")?;
    eprintln!(
        "  pushed to {}/big:1 in {:.1} s",
        reg.addr(),
        t.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&layout_dir)?;
    let reference = format!("{}/big:1", reg.addr());

    let mut sides = vec![Side::Shoal, Side::Skopeo];
    if docker_version.is_some() {
        sides.push(Side::Docker);
    }
    // Declared after `tmp`, the dockerd and `reg`: dropped first.
    let mut docker_image = DockerImage {
        reference: None,
        host: docker_host.clone(),
    };
    let mut secs: Vec<(Side, Vec<f64>)> = sides.iter().map(|&s| (s, Vec::new())).collect();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    // skopeo's last layout, kept for the load breakdown.
    let kept = tmp.path().join("kept-oci");
    let load_start = load1();
    let mut load_max = load_start;
    nix::unistd::sync();
    for round in 0..a.rounds {
        let mut order = sides.clone();
        order.rotate_left(round % sides.len());
        for &side in &order {
            let dest = tmp.path().join(format!("dest-{}-{round}", side.name()));
            let (took, out) = match side {
                Side::Shoal => timed(
                    Command::new(&bin)
                        .args(["image", "pull", &reference])
                        .env("SHOAL_DATA_DIR", &dest)
                        .env_remove("SHOAL_INSECURE_REGISTRIES"),
                    &logs,
                    PULL_DEADLINE,
                )?,
                Side::Skopeo => timed(
                    Command::new(SKOPEO_BIN)
                        .args(["copy", "--src-tls-verify=false"])
                        .arg(format!("docker://{reference}"))
                        .arg(format!("oci:{}:big", dest.display())),
                    &logs,
                    PULL_DEADLINE,
                )?,
                Side::Docker => {
                    docker_image.reference = Some(reference.clone());
                    timed(
                        docker(docker_host.as_deref()).args(["pull", &reference]),
                        &logs,
                        PULL_DEADLINE,
                    )?
                }
            };
            load_max = load_max.max(load1());
            // Each side must have got the very image pushed.
            let got = match side {
                Side::Shoal | Side::Docker => out.clone(),
                Side::Skopeo => std::fs::read_to_string(dest.join("index.json"))?,
            };
            if !got.contains(&image.manifest_digest) {
                bail!(
                    "{} did not report the pushed manifest {}: {}",
                    side.name(),
                    image.manifest_digest,
                    got.trim()
                );
            }
            eprintln!(
                "  round {} {:<6} {:>7.2} s  {:>6.1} MiB/s",
                round + 1,
                side.name(),
                took.as_secs_f64(),
                image.bytes as f64 / MIB / took.as_secs_f64()
            );
            if let Some((_, v)) = secs.iter_mut().find(|(s, _)| *s == side) {
                v.push(took.as_secs_f64());
            }
            // Untimed: empty the destination, then flush so the next side starts clean.
            match side {
                Side::Docker => docker_image.remove()?,
                Side::Skopeo if !a.no_breakdown => {
                    let _ = std::fs::remove_dir_all(&kept);
                    std::fs::rename(&dest, &kept)?;
                }
                _ => {}
            }
            if dest.exists() {
                std::fs::remove_dir_all(&dest)
                    .with_context(|| format!("removing {}", dest.display()))?;
            }
            nix::unistd::sync();
        }
    }

    // For reference: the same blobs loaded from disk, no network.
    let mut loads = Vec::new();
    if !a.no_breakdown {
        for round in 0..a.rounds {
            let dest = tmp.path().join(format!("load-{round}"));
            let (took, _) = timed(
                Command::new(&bin)
                    .args(["image", "load"])
                    .arg(&kept)
                    .env("SHOAL_DATA_DIR", &dest),
                &logs,
                PULL_DEADLINE,
            )?;
            load_max = load_max.max(load1());
            eprintln!(
                "  shoal image load of skopeo's layout {}: {:.2} s",
                round + 1,
                took.as_secs_f64()
            );
            loads.push(took.as_secs_f64());
            std::fs::remove_dir_all(&dest)?;
            nix::unistd::sync();
        }
    }
    let load_end = load1();

    println!(
        "image-pull: {} gzip layers, {:.1} MiB compressed ({:.1} MiB uncompressed), from docker-registry on {}, {} rounds, interleaved, each into an empty destination",
        a.layers,
        image.bytes as f64 / MIB,
        image.uncompressed as f64 / MIB,
        reg.addr(),
        a.rounds
    );
    let mut json = serde_json::json!({
        "bench": "image-pull", "rounds": a.rounds, "layers": a.layers,
        "compression": "gzip", "image_bytes": image.bytes,
        "uncompressed_bytes": image.uncompressed,
        "load1_start": load_start, "load1_max": load_max, "load1_end": load_end,
    });
    let shoal_secs = &secs[0].1;
    let (shoal_m, shoal_mibs, shoal_json) = summary(shoal_secs, image.bytes);
    println!("  shoal:  median {shoal_m:>7.2} s  {shoal_mibs:>6.1} MiB/s  (`shoal image pull`: download, store, unpack)");
    json["shoal"] = shoal_json;
    for (side, v) in &secs[1..] {
        let (m, mibs, mut j) = summary(v, image.bytes);
        let (version, what) = match side {
            Side::Skopeo => (
                skopeo_version.clone(),
                "`skopeo copy` to an OCI layout: blobs only",
            ),
            _ => (
                format!("Docker {}", docker_version.clone().unwrap_or_default()),
                "`docker pull`: download, unpack",
            ),
        };
        println!(
            "  {:<7} median {m:>7.2} s  {mibs:>6.1} MiB/s  ({what}; {version})",
            format!("{}:", side.name())
        );
        println!(
            "    ratio shoal/{}: time {:.2}  (target: < 1, shoal ahead)",
            side.name(),
            shoal_m / m
        );
        j["version"] = serde_json::json!(version);
        json[side.name()] = j;
        json["ratio_time"][side.name()] = serde_json::json!(round3(shoal_m / m));
    }
    if docker_version.is_none() {
        println!(
            "  docker: skipped ({})",
            if a.no_docker {
                "--no-docker"
            } else {
                "no Docker daemon running; --start-dockerd starts one"
            }
        );
        json["docker"] = serde_json::Value::Null;
    }
    if !loads.is_empty() {
        let lm = median(&loads);
        println!(
            "  for reference: `shoal image load` of the same blobs from disk median {lm:.2} s ({:.0} % of the pull, which unpacks while it downloads)",
            100.0 * lm / shoal_m,
        );
        json["shoal_load"] = serde_json::json!({
            "secs": loads.iter().map(|&s| round3(s)).collect::<Vec<_>>(),
            "median_secs": round3(lm),
        });
    }
    println!("  load average (1 min): {load_start:.2} at the start, {load_max:.2} max, {load_end:.2} at the end");
    println!("{json}");
    drop(docker_image);
    drop(reg);
    drop(own_dockerd);
    drop(tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_content_is_seeded_and_text_is_hex_lines() {
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 1000]);
        Rng(7).fill(&mut a, false);
        Rng(7).fill(&mut b, false);
        assert_eq!(a, b);
        Rng(8).fill(&mut b, false);
        assert_ne!(a, b);
        let mut t = vec![0u8; 130];
        Rng(7).fill(&mut t, true);
        assert_eq!(t[64], b'\n');
        assert_eq!(t[129], b'\n');
        assert!(t
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase() || *c == b'\n'));
    }
}
