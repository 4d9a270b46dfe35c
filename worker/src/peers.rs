//! Peer-to-peer layers: a node about to pull an image pinned to a digest asks a manager's
//! cluster registry which nodes hold it (the managers know: those nodes' tasks of that image got
//! past PREPARING), and fetches the layers from them — each still checked against its digest —
//! before its origin registry. When nobody holds it yet, one node pulls it from the origin and
//! the others wait for it (at most [`CLAIM_TTL`](crate::registry_server::CLAIM_TTL)), so the
//! origin serves each layer about once however many nodes start the image together.

use std::path::Path;
use std::time::{Duration, Instant};

/// How often a waiting node asks again.
const ASK_EVERY: Duration = Duration::from_millis(250);
/// One lookup may take this long.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a manager said about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// These peer registries (`host:port`) hold it.
    Peers(Vec<String>),
    /// Nobody holds it and this node is the one to pull it from the origin (or no manager
    /// could say: the origin too).
    Origin,
}

/// The cluster's registry settings of this node, if it has any: the port, the managers'
/// hosts, and a client with the cluster CA, plus this node's id and a fresh token.
struct Cluster {
    port: u16,
    managers: Vec<String>,
    client: reqwest::Client,
    node: String,
    token: String,
}

fn cluster(data_dir: &Path) -> Option<Cluster> {
    let port: u16 = std::fs::read_to_string(data_dir.join(crate::registry::REGISTRY_PORT_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let state = shoal_manager::daemon::LocalState::load(data_dir).ok()??;
    let tls = shoal_manager::tls::NodeTls::load(&data_dir.join(shoal_manager::ca::PKI_DIR)).ok()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(tls.ca_pem().as_bytes()).ok()?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(ASK_TIMEOUT)
        .build()
        .ok()?;
    let mut managers: Vec<String> = state
        .managers
        .iter()
        .chain(std::iter::once(&state.advertise_addr).filter(|_| state.role == "manager"))
        .map(|a| match a.rsplit_once(':') {
            Some((h, _)) => h.to_string(),
            None => a.clone(),
        })
        .collect();
    // Every node asks the managers in one order, so their claims meet at one manager.
    managers.sort();
    managers.dedup();
    Some(Cluster {
        port,
        managers,
        client,
        node: state.node_id,
        token: tls.registry_token().ok()?,
    })
}

/// Where to fetch the layers of the image pinned to `digest` from: peers that hold it, or the
/// origin. Waits (up to `wait_at_most`) while another node pulls it from the origin. Any
/// failure to ask means the origin.
pub async fn locate(data_dir: &Path, digest: &str, wait_at_most: Duration) -> Located {
    let Some(c) = cluster(data_dir) else {
        return Located::Origin;
    };
    let deadline = Instant::now() + wait_at_most;
    loop {
        let mut answer = None;
        for m in &c.managers {
            let url = format!("https://{m}:{}/v2/_shoal/peers/{digest}", c.port);
            let r = c
                .client
                .get(&url)
                .basic_auth(&c.node, Some(&c.token))
                .send()
                .await;
            if let Ok(r) = r {
                if r.status().is_success() {
                    answer = r.json::<serde_json::Value>().await.ok();
                    break;
                }
            }
        }
        let Some(v) = answer else {
            return Located::Origin;
        };
        if let Some(peers) = v["peers"].as_array() {
            let peers: Vec<String> = peers
                .iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect();
            return if peers.is_empty() {
                Located::Origin
            } else {
                Located::Peers(peers)
            };
        }
        if Instant::now() >= deadline {
            return Located::Origin;
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}
