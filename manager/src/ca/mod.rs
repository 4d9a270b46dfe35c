//! The cluster certificate authority: the root CA and node certificates (rcgen, ECDSA P-256),
//! join tokens, the `CA` gRPC service, and the joining and renewing side of a node.
//!
//! A node certificate names its holder: CN = node id, OU = role, O = cluster id. The CA always
//! sets that subject itself; a CSR only contributes its public key.

mod files;
mod identity;
mod join;
mod renew;
mod root;
mod server;
mod token;

pub(crate) use files::{save_node_pair, NODE_KEY_PREV_FILE};
pub use files::{write_atomic, CA_CERT_FILE, CA_KEY_FILE, NODE_CERT_FILE, NODE_KEY_FILE, PKI_DIR};
pub use identity::{cert_info, identity_from_cert, CertInfo, NodeIdentity, Role};
pub use join::{fetch_root_ca, join_cluster, make_csr, Joined};
pub use renew::{renew_at, renew_loop, renew_once, RENEW_RETRY_MAX_DELAY};
pub use root::{IssuedCert, RootCa, DEFAULT_NODE_CERT_LIFETIME};
pub use server::{CaBackend, CaService, NewNode, MAX_CA_MESSAGE_BYTES};
pub use token::{JoinToken, JoinTokens};

use std::path::PathBuf;

/// Errors of the CA, tokens, joining and renewal.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate signing request is invalid: {0}")]
    CsrInvalid(String),
    #[error(
        "certificate signing request asks for {field} {asked:?}, but the CA issues {issued:?}"
    )]
    CsrIdentityMismatch {
        field: &'static str,
        asked: String,
        issued: String,
    },
    #[error("certificate is invalid: {0}")]
    CertInvalid(String),
    #[error("certificate lifetime {0:?} is out of range")]
    BadLifetime(std::time::Duration),
    #[error("address {0:?} is neither an IP address nor a DNS name")]
    BadAddress(String),
    #[error("malformed join token: {0}")]
    TokenMalformed(&'static str),
    #[error("join token is for a different CA (token digest {token}, CA digest {ca})")]
    TokenCaMismatch { token: String, ca: String },
    #[error("join token is not valid (wrong, or rotated out)")]
    TokenRefused,
    #[error("the CA served by {addr} does not match the join token's digest (token {token}, served {served})")]
    ServedCaMismatch {
        addr: String,
        token: String,
        served: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{addr}: {status}")]
    Rpc { addr: String, status: tonic::Status },
    #[error("the cluster refused to record the node: {0}")]
    Register(String),
    #[error("node certificate expired before it could be renewed")]
    Expired,
    #[error("no manager address to renew the certificate from")]
    NoManager,
}
