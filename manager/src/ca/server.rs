//! The `CA` gRPC service: the root certificate for anyone, a first certificate for a holder of
//! a join token, renewal for a node with a current certificate.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::v1::ca_server::{Ca, CaServer};
use shoal_proto::v1::{
    GetRootCertificateRequest, GetRootCertificateResponse, IssueRequest, IssueResponse,
    RenewRequest, RenewResponse,
};
use tonic::{Request, Response, Status};

use super::identity::cert_info;
use super::token::random_id;
use super::{CaError, JoinToken, JoinTokens, Role, RootCa, DEFAULT_NODE_CERT_LIFETIME};
use crate::tls::Authorizer;

/// Largest CA request or response on the wire.
pub const MAX_CA_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest CSR accepted (a P-256 CSR is well under 1 KiB).
const MAX_CSR_PEM_BYTES: usize = 16 * 1024;
/// Longest hostname (DNS limit).
const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest advertise address ("host:port").
const MAX_ADDR_BYTES: usize = 300;

/// A node that has just joined, for the cluster to record.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub node_id: String,
    pub role: Role,
    pub hostname: String,
    pub advertise_addr: String,
    /// Serial of its first certificate (lowercase hex).
    pub cert_serial: String,
}

/// What the CA service needs from the cluster state (the store, through Raft, in the daemon).
#[tonic::async_trait]
pub trait CaBackend: Send + Sync + 'static {
    /// The cluster's current join tokens.
    fn join_tokens(&self) -> Result<JoinTokens, CaError>;

    /// Lifetime of the node certificates issued from now on.
    fn node_cert_lifetime(&self) -> Duration {
        DEFAULT_NODE_CERT_LIFETIME
    }

    /// The role a node should hold now, if it differs from its certificate's (a promote or
    /// demote takes effect at its next renewal). `None` keeps the certificate's role.
    fn desired_role(&self, _node_id: &str) -> Option<Role> {
        None
    }

    /// Records a newly joined node. Its certificate is handed out only if this succeeds.
    async fn register_node(&self, node: NewNode) -> Result<(), CaError>;

    /// Records the serial of a renewed certificate.
    async fn record_renewal(&self, _node_id: &str, _serial: &str) -> Result<(), CaError> {
        Ok(())
    }
}

/// The `CA` service of `ca.proto`.
pub struct CaService {
    ca: Arc<RootCa>,
    backend: Arc<dyn CaBackend>,
    authorizer: Authorizer,
    /// The secrets data key, handed to managers with the CA key.
    secrets: Option<Arc<crate::secrets::Keyring>>,
}

impl CaService {
    /// A CA service issuing from `ca`; `authorizer` guards renewal.
    pub fn new(ca: Arc<RootCa>, backend: Arc<dyn CaBackend>, authorizer: Authorizer) -> Self {
        CaService {
            ca,
            backend,
            authorizer,
            secrets: None,
        }
    }

    /// Hands `keys` (the secrets data key) to the managers it issues certificates to.
    pub fn with_secrets(mut self, keys: Option<Arc<crate::secrets::Keyring>>) -> Self {
        self.secrets = keys;
        self
    }

    fn secrets_key(&self, role: Role) -> Vec<u8> {
        match (role, &self.secrets) {
            (Role::Manager, Some(k)) => k.raw().to_vec(),
            _ => Vec::new(),
        }
    }

    /// The tonic service, with message sizes bounded by [`MAX_CA_MESSAGE_BYTES`].
    pub fn into_server(self) -> CaServer<CaService> {
        CaServer::new(self)
            .max_decoding_message_size(MAX_CA_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CA_MESSAGE_BYTES)
    }
}

/// How a CA error reaches a client.
pub(crate) fn status(e: CaError) -> Status {
    match e {
        CaError::CsrInvalid(_)
        | CaError::BadAddress(_)
        | CaError::TokenMalformed(_)
        | CaError::CertInvalid(_)
        | CaError::BadLifetime(_) => Status::invalid_argument(e.to_string()),
        CaError::CsrIdentityMismatch { .. }
        | CaError::TokenRefused
        | CaError::TokenCaMismatch { .. } => Status::permission_denied(e.to_string()),
        CaError::Register(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    Ok(())
}

/// The host part of "host:port", "[v6]:port", "host" or "v6".
fn addr_host(addr: &str) -> &str {
    if addr.parse::<std::net::IpAddr>().is_ok() {
        return addr;
    }
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The names a joining node's certificate carries: its advertise host, and its hostname when
/// that is a usable DNS name.
fn join_sans(advertise_addr: &str, hostname: &str) -> Vec<String> {
    let mut sans = Vec::new();
    let host = addr_host(advertise_addr.trim());
    if !host.is_empty() {
        sans.push(host.to_string());
    }
    let hostname = hostname.trim();
    let usable = !hostname.is_empty()
        && hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if usable && !sans.iter().any(|s| s == hostname) {
        sans.push(hostname.to_string());
    }
    sans
}

#[tonic::async_trait]
impl Ca for CaService {
    async fn get_root_certificate(
        &self,
        _req: Request<GetRootCertificateRequest>,
    ) -> Result<Response<GetRootCertificateResponse>, Status> {
        Ok(Response::new(GetRootCertificateResponse {
            ca_pem: self.ca.cert_pem().to_string(),
        }))
    }

    async fn issue_node_certificate(
        &self,
        req: Request<IssueRequest>,
    ) -> Result<Response<IssueResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        check_len("csr_pem", &r.csr_pem, MAX_CSR_PEM_BYTES)?;
        check_len("hostname", &r.hostname, MAX_HOSTNAME_BYTES)?;
        check_len("advertise_addr", &r.advertise_addr, MAX_ADDR_BYTES)?;
        let token = JoinToken::parse(&r.token).map_err(status)?;
        let digest = self.ca.digest();
        if token.ca_digest() != digest {
            return Err(status(CaError::TokenCaMismatch {
                token: token.ca_digest().to_string(),
                ca: digest,
            }));
        }
        let tokens = self.backend.join_tokens().map_err(status)?;
        let Some(role) = tokens.role_of(&token) else {
            tracing::warn!(?peer, "join refused: wrong or rotated-out token");
            return Err(status(CaError::TokenRefused));
        };
        let node_id = random_id();
        let sans = join_sans(&r.advertise_addr, &r.hostname);
        let issued = self
            .ca
            .issue(
                &r.csr_pem,
                &node_id,
                role,
                &sans,
                self.backend.node_cert_lifetime(),
            )
            .map_err(status)?;
        self.backend
            .register_node(NewNode {
                node_id: node_id.clone(),
                role,
                hostname: r.hostname,
                advertise_addr: r.advertise_addr,
                cert_serial: issued.serial,
            })
            .await
            .map_err(status)?;
        tracing::info!(%node_id, %role, ?peer, "node joined");
        Ok(Response::new(IssueResponse {
            node_id,
            cert_pem: issued.cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            role: role.to_proto() as i32,
            ca_key_pem: match role {
                Role::Manager => self.ca.key_pem().to_string(),
                Role::Worker => String::new(),
            },
            secrets_key: self.secrets_key(role),
        }))
    }

    async fn renew_node_certificate(
        &self,
        req: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let id = self
            .authorizer
            .authorize(&req, &[Role::Manager, Role::Worker])?;
        // Renewal keeps the names the node was issued with.
        let sans = req
            .peer_certs()
            .and_then(|chain| chain.first().and_then(|c| cert_info(c).ok()))
            .map(|info| info.sans)
            .unwrap_or_default();
        let r = req.into_inner();
        check_len("csr_pem", &r.csr_pem, MAX_CSR_PEM_BYTES)?;
        let role = self.backend.desired_role(&id.node_id).unwrap_or(id.role);
        let issued = self
            .ca
            .issue(
                &r.csr_pem,
                &id.node_id,
                role,
                &sans,
                self.backend.node_cert_lifetime(),
            )
            .map_err(status)?;
        self.backend
            .record_renewal(&id.node_id, &issued.serial)
            .await
            .map_err(status)?;
        tracing::debug!(node_id = %id.node_id, serial = %issued.serial, "certificate renewed");
        if role != id.role {
            tracing::info!(node_id = %id.node_id, from = %id.role, to = %role, "role changed at renewal");
        }
        Ok(Response::new(RenewResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            role: role.to_proto() as i32,
            // A promoted worker becomes a manager only with the CA key (any manager issues).
            ca_key_pem: match role {
                Role::Manager => self.ca.key_pem().to_string(),
                Role::Worker => String::new(),
            },
            secrets_key: self.secrets_key(role),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_hosts() {
        assert_eq!(addr_host("10.0.0.1:4242"), "10.0.0.1");
        assert_eq!(addr_host("[::1]:4242"), "::1");
        assert_eq!(addr_host("::1"), "::1");
        assert_eq!(addr_host("h1.lan:4242"), "h1.lan");
        assert_eq!(addr_host("h1.lan"), "h1.lan");
        assert_eq!(
            join_sans("127.0.0.1:1", "box-1"),
            vec!["127.0.0.1".to_string(), "box-1".to_string()]
        );
        assert_eq!(join_sans("", "bad host!"), Vec::<String>::new());
    }
}
