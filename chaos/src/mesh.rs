//! The cluster's networks under faults.
//!
//! - The workload's services join one overlay network ([`NETWORK`]), so every task the
//!   workload makes gets an address there and the sampler can check that no two tasks ever
//!   hold one address.
//! - A published web service ([`SERVICE`]: busybox httpd, 2 replicas, port [`PORT`] in ingress
//!   mode) is requested through the routing mesh for the whole run, through each node's test
//!   bed address in turn, from the harness (the root namespace; only test bed addresses). Each
//!   failed request is tagged with the fault in progress (or healed less than
//!   [`crate::observe::HEAL_GRACE_MS`] before): failures outside every fault fail the check.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use shoal_tests::cluster::Member;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{Cluster, IMAGE};
use crate::observe::FaultTag;
use crate::workload::Shared;

/// The overlay network the workload's services join.
pub const NETWORK: &str = "chaos-net";
/// The published web service.
pub const SERVICE: &str = "chaos-mesh";
/// Its port in ingress mode, on every node.
pub const PORT: u16 = 18080;
/// Pause between two requests.
const PERIOD: Duration = Duration::from_millis(100);
/// Longest a request may take (connect, send, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the mesh to answer through every node before the faults start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Failures kept (each kind); counting goes on beyond.
const MAX_RECORDED: usize = 100;
/// What the service answers.
const BODY: &str = "mesh-ok";

/// Per fault: requests made while it was in progress, and how many failed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    pub requests: u64,
    pub failed: u64,
}

/// What the mesh client saw.
#[derive(Debug, Default, Serialize)]
pub struct MeshStats {
    pub requests: u64,
    pub failed: u64,
    /// By fault ("" for none in progress).
    pub per_fault: BTreeMap<String, Tally>,
    /// Failed requests outside every fault: "t=MS via ADDR: why".
    pub outside: Vec<String>,
    pub outside_count: u64,
}

/// Makes the network and the published service, then waits until the service answers through
/// every node. Returns the addresses to request and the network's id.
pub fn setup(cluster: &Cluster) -> Result<(Vec<SocketAddr>, String)> {
    let h1 = cluster.host(1)?;
    let id = h1
        .shoal_ok(&["network", "create", NETWORK])
        .context("creating the workload's network")?
        .trim()
        .to_string();
    let script =
        format!("mkdir -p /www; echo {BODY} > /www/index.html; exec httpd -f -p 80 -h /www");
    let published = format!("published={PORT},target=80");
    h1.shoal_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        SERVICE,
        "--replicas",
        "2",
        "--stop-grace-period",
        "1s",
        "--publish",
        &published,
        IMAGE,
        "sh",
        "-c",
        &script,
    ])
    .context("creating the mesh service")?;
    let targets: Vec<SocketAddr> = cluster
        .tb
        .hosts()
        .iter()
        .map(|h| SocketAddr::new(h.addr().into(), PORT))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for the mesh probe")?;
    let start = Instant::now();
    for t in &targets {
        loop {
            match rt.block_on(request(*t)) {
                Ok(()) => break,
                Err(e) if start.elapsed() > READY_TIMEOUT => {
                    bail!("the mesh never answered through {t}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    Ok((targets, id))
}

/// One GET of `/` through `to`; Ok when the service's page comes back.
async fn request(to: SocketAddr) -> Result<()> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(to)
            .await
            .context("connect")?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: mesh\r\n\r\n")
            .await
            .context("send")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.context("read")?;
        let text = String::from_utf8_lossy(&buf);
        if !text.contains(BODY) {
            bail!(
                "unexpected answer: {:?}",
                text.lines().next().unwrap_or("(empty)")
            );
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, go)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {REQUEST_TIMEOUT:?}"))?
}

/// Requests the service through each target in turn until `stop` is set.
pub async fn client(
    targets: Vec<SocketAddr>,
    shared: Arc<Shared>,
    tag: Arc<Mutex<FaultTag>>,
    stop: Arc<AtomicBool>,
) -> MeshStats {
    let mut stats = MeshStats::default();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && !targets.is_empty() {
        let to = targets[i % targets.len()];
        i += 1;
        let r = request(to).await;
        let now_ms = shared.now_us() / 1000;
        let fault = tag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fault(now_ms)
            .unwrap_or_default();
        stats.requests += 1;
        let tally = stats.per_fault.entry(fault.clone()).or_default();
        tally.requests += 1;
        if let Err(e) = r {
            tally.failed += 1;
            stats.failed += 1;
            if fault.is_empty() {
                stats.outside_count += 1;
                if stats.outside.len() < MAX_RECORDED {
                    stats.outside.push(format!("t={now_ms} ms via {to}: {e:#}"));
                }
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
    stats
}
