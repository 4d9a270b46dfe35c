//! The joining side: fetch the CA, check it against the token, send a CSR, get a certificate.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use shoal_proto::v1::ca_client::CaClient;
use shoal_proto::v1::{GetRootCertificateRequest, IssueRequest};

use super::files::{save_node_pair, write_atomic, CA_CERT_FILE, CA_KEY_FILE};
use super::root::{cert_digest, pem_to_der};
use super::server::MAX_CA_MESSAGE_BYTES;
use super::{CaError, JoinToken, Role, RootCa};
use crate::tls::{self, NodeTls};

/// How long one join RPC may take.
const JOIN_RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh ECDSA P-256 key and a CSR for it: `(key_pem, csr_pem)`. The subject carries only
/// the CN given (the CA decides the subject; a renewing node names itself, a joining node
/// names nobody).
pub fn make_csr(common_name: Option<&str>) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(cn) = common_name {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Fetches the root CA certificate from `manager_addr` without trusting the server, and
/// returns it only if its digest is the one in `token`.
pub async fn fetch_root_ca(manager_addr: &str, token: &JoinToken) -> Result<String, CaError> {
    let channel = tls::unverified_channel(manager_addr)?;
    let mut client = CaClient::new(channel).max_decoding_message_size(MAX_CA_MESSAGE_BYTES);
    let ca_pem = call(
        manager_addr,
        client.get_root_certificate(GetRootCertificateRequest {}),
    )
    .await?
    .ca_pem;
    let der = pem_to_der(&ca_pem, "CERTIFICATE")?;
    let served = cert_digest(&der);
    if served != token.ca_digest() {
        return Err(CaError::ServedCaMismatch {
            addr: manager_addr.to_string(),
            token: token.ca_digest().to_string(),
            served,
        });
    }
    Ok(ca_pem)
}

/// What a node holds after joining.
#[derive(Clone)]
pub struct Joined {
    pub node_id: String,
    pub role: Role,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The root CA key, handed to managers only.
    pub ca_key_pem: Option<String>,
    /// The secrets data key, handed to managers only (empty from a cluster without one).
    pub secrets_key: Vec<u8>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("node_id", &self.node_id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Joined {
    /// The node's TLS material, ready for servers and channels.
    pub fn tls(&self) -> Result<NodeTls, CaError> {
        Ok(NodeTls::from_pem(
            &self.ca_pem,
            &self.cert_pem,
            &self.key_pem,
        )?)
    }

    /// Writes `ca.crt`, `node.key`, `node.crt` and (managers) `ca.key` into `pki_dir`.
    pub fn save(&self, pki_dir: &Path) -> Result<(), CaError> {
        if let Some(key) = &self.ca_key_pem {
            write_atomic(&pki_dir.join(CA_KEY_FILE), key.as_bytes(), 0o600)?;
            save_secrets_key(pki_dir, &self.secrets_key)?;
        }
        write_atomic(&pki_dir.join(CA_CERT_FILE), self.ca_pem.as_bytes(), 0o644)?;
        save_node_pair(pki_dir, &self.cert_pem, &self.key_pem)
    }
}

/// Joins the cluster served at `manager_addr` with `token`: checks the served CA against the
/// token, sends a CSR for a new key, and checks that the certificate it gets back is for
/// that key, signed by that CA, and names the node id and role it was told.
pub async fn join_cluster(
    manager_addr: &str,
    token: &str,
    hostname: &str,
    advertise_addr: &str,
) -> Result<Joined, CaError> {
    let parsed = JoinToken::parse(token)?;
    let ca_pem = fetch_root_ca(manager_addr, &parsed).await?;
    let (key_pem, csr_pem) = make_csr(None)?;
    let channel = tls::anonymous_channel(manager_addr, &ca_pem)?;
    let mut client = CaClient::new(channel).max_decoding_message_size(MAX_CA_MESSAGE_BYTES);
    let resp = call(
        manager_addr,
        client.issue_node_certificate(IssueRequest {
            csr_pem,
            token: parsed.to_string(),
            hostname: hostname.to_string(),
            advertise_addr: advertise_addr.to_string(),
        }),
    )
    .await?;
    // The CA we verified, not whatever the response says.
    let tls = NodeTls::from_pem(&ca_pem, &resp.cert_pem, &key_pem)?;
    let id = tls.identity();
    let role = shoal_proto::v1::NodeRole::try_from(resp.role)
        .map(Role::from_proto)
        .map_err(|_| CaError::CertInvalid(format!("unknown role {}", resp.role)))?;
    if id.node_id != resp.node_id || id.role != role {
        return Err(CaError::CertInvalid(format!(
            "issued certificate names {} ({}), the response {} ({role})",
            id.node_id, id.role, resp.node_id
        )));
    }
    let ca_key_pem = match resp.ca_key_pem.is_empty() {
        true => None,
        false => {
            let ca = RootCa::from_pem(&ca_pem, &resp.ca_key_pem)?;
            if ca.cluster_id() != id.cluster_id {
                return Err(CaError::CertInvalid("CA key is for another cluster".into()));
            }
            Some(resp.ca_key_pem)
        }
    };
    Ok(Joined {
        node_id: id.node_id,
        role,
        ca_pem,
        cert_pem: resp.cert_pem,
        key_pem,
        ca_key_pem,
        secrets_key: resp.secrets_key,
    })
}

/// Keeps the secrets data key a manager received (wrapped by its own key-encryption key).
pub(crate) fn save_secrets_key(pki_dir: &Path, raw: &[u8]) -> Result<(), CaError> {
    if raw.is_empty() {
        return Ok(());
    }
    crate::secrets::Keyring::from_raw(raw)
        .and_then(|k| k.save(pki_dir))
        .map_err(|e| CaError::CertInvalid(format!("secrets key: {e}")))
}

/// Awaits one RPC within [`JOIN_RPC_TIMEOUT`].
pub(crate) async fn call<T>(
    addr: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CaError> {
    match tokio::time::timeout(JOIN_RPC_TIMEOUT, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(CaError::Rpc {
            addr: addr.to_string(),
            status,
        }),
        Err(_) => Err(CaError::Rpc {
            addr: addr.to_string(),
            status: tonic::Status::deadline_exceeded("no answer in time"),
        }),
    }
}
