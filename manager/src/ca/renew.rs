//! Certificate renewal: at a random point in 50–80 % of a certificate's lifetime, get a new
//! one for a new key through `RenewNodeCertificate`, replace the files, switch connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use shoal_proto::v1::ca_client::CaClient;
use shoal_proto::v1::RenewRequest;

use super::files::{save_node_pair, write_atomic, CA_KEY_FILE};
use super::join::{call, make_csr};
use super::server::MAX_CA_MESSAGE_BYTES;
use super::{CaError, CertInfo, Role, RootCa};
use crate::tls::NodeTls;

/// First pause after a failed renewal; doubled up to [`RENEW_RETRY_MAX_DELAY`].
const RENEW_RETRY_MIN_DELAY: Duration = Duration::from_millis(200);
/// Longest pause between renewal attempts.
pub const RENEW_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
/// Share of the lifetime, in per cent, between which renewal happens.
const RENEW_WINDOW_PERCENT: (u32, u32) = (50, 80);

/// When to renew the certificate: a random point in 50–80 % of its validity, so that a
/// cluster's nodes do not all renew at once.
pub fn renew_at(info: &CertInfo) -> SystemTime {
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or(Duration::ZERO);
    let permille =
        rand::thread_rng().gen_range(RENEW_WINDOW_PERCENT.0 * 10..=RENEW_WINDOW_PERCENT.1 * 10);
    info.not_before + life.mul_f64(f64::from(permille) / 1000.0)
}

/// Renews the node certificate once through the CA at `manager_addr`: a new key, the same
/// identity (the role may change if the cluster says so), files replaced atomically, and
/// new connections present the new certificate.
pub async fn renew_once(tls: &NodeTls, pki_dir: &Path, manager_addr: &str) -> Result<(), CaError> {
    let id = tls.identity();
    let (key_pem, csr_pem) = make_csr(Some(&id.node_id))?;
    let channel = tls.channel(manager_addr)?;
    let mut client = CaClient::new(channel).max_decoding_message_size(MAX_CA_MESSAGE_BYTES);
    let resp = call(
        manager_addr,
        client.renew_node_certificate(RenewRequest { csr_pem }),
    )
    .await?;
    // Check it fully before anything is written.
    let checked = NodeTls::from_pem(tls.ca_pem(), &resp.cert_pem, &key_pem)?;
    if !resp.ca_key_pem.is_empty() {
        if checked.identity().role != Role::Manager {
            return Err(CaError::CertInvalid(
                "the CA key came with a worker certificate".into(),
            ));
        }
        // The key must belong to the CA this node trusts, not whatever the response says.
        let ca = RootCa::from_pem(tls.ca_pem(), &resp.ca_key_pem)?;
        if ca.cluster_id() != id.cluster_id {
            return Err(CaError::CertInvalid("CA key is for another cluster".into()));
        }
        // Before the certificate: a manager certificate on disk always has its CA key.
        write_atomic(
            &pki_dir.join(CA_KEY_FILE),
            resp.ca_key_pem.as_bytes(),
            0o600,
        )?;
        super::join::save_secrets_key(pki_dir, &resp.secrets_key)?;
    }
    save_node_pair(pki_dir, &resp.cert_pem, &key_pem)?;
    tls.replace(&resp.cert_pem, &key_pem)?;
    let info = tls.cert_info();
    if info.identity.role != id.role {
        tracing::info!(from = %id.role, to = %info.identity.role, "role changed at renewal");
    }
    tracing::info!(serial = %info.serial, "node certificate renewed");
    Ok(())
}

/// Renews the node certificate for as long as it runs, each time at [`renew_at`], from one
/// of the addresses `managers` returns (tried in order). A failed round is retried with
/// backoff until the certificate expires, which ends the loop with [`CaError::Expired`].
pub async fn renew_loop(
    tls: NodeTls,
    pki_dir: PathBuf,
    managers: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
) -> Result<(), CaError> {
    loop {
        let info = tls.cert_info();
        let at = renew_at(&info);
        if let Ok(wait) = at.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut delay = RENEW_RETRY_MIN_DELAY;
        'round: loop {
            let Ok(left) = info.not_after.duration_since(SystemTime::now()) else {
                return Err(CaError::Expired);
            };
            let addrs = managers();
            if addrs.is_empty() {
                tracing::warn!("{}", CaError::NoManager);
            }
            for addr in &addrs {
                match renew_once(&tls, &pki_dir, addr).await {
                    Ok(()) => break 'round,
                    Err(e) => tracing::warn!(%addr, "certificate renewal failed: {e}"),
                }
            }
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(RENEW_RETRY_MAX_DELAY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{NodeIdentity, Role};

    #[test]
    fn renews_within_the_window() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = CertInfo {
            identity: NodeIdentity {
                node_id: "n".into(),
                role: Role::Worker,
                cluster_id: "c".into(),
            },
            serial: "01".into(),
            not_before: start,
            not_after: start + Duration::from_secs(1000),
            sans: vec![],
        };
        for _ in 0..200 {
            let at = renew_at(&info).duration_since(start).unwrap();
            assert!(
                at >= Duration::from_secs(500) && at <= Duration::from_secs(800),
                "{at:?}"
            );
        }
    }
}
