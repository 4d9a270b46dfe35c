//! Mutual TLS between nodes (rustls, ring) and per-request authorisation by role.
//!
//! shoal builds its own rustls configurations rather than tonic's `ServerTlsConfig` /
//! `ClientTlsConfig`, for two reasons: the server must accept connections *without* a client
//! certificate (a joining node has none yet), and a renewed node certificate must be used by
//! new connections — server and client side — without restarting the server or rebuilding
//! cached channels. Both configurations resolve the node certificate through a shared,
//! swappable slot ([`NodeTls::replace`]). Servers serve over [`tls_incoming`] with tonic's
//! `serve_with_incoming`; tonic then exposes the verified client chain to handlers through
//! `Request::peer_certs()`, which [`Authorizer::authorize`] reads.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::{self, Uri};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tower::layer::util::{Identity, Stack};
use x509_parser::prelude::FromDer;

use crate::ca::{self, CertInfo, NodeIdentity, Role};

/// How long a TCP connect plus TLS handshake to a peer may take by default (LAN).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a server waits for a client to finish its TLS handshake and send the HTTP/2
/// preface: a silent or trickling client is dropped after this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS handshakes a server runs at once; further connections wait in the listen backlog.
/// Large enough that a burst of silent connections (each dropped after [`HANDSHAKE_TIMEOUT`])
/// does not hold up real clients; small enough that their buffers stay a few MiB.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Connections a server holds at once, handshaking or served; at the cap it stops accepting
/// (new ones wait in the kernel's listen backlog), so a flood cannot exhaust file descriptors
/// or memory. A cluster needs a few per node.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a connection without a client certificate is served: such a caller can only
/// fetch the root certificate or join (a call or two, each on a fresh connection), so an
/// anonymous client cannot park idle connections and fill [`MAX_CONNECTIONS`].
pub const ANONYMOUS_CONNECTION_LIFETIME: Duration = Duration::from_secs(20);
/// Concurrent HTTP/2 streams (calls) one connection may open; a node uses a handful.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Largest HTTP/2 header block a server accepts (gRPC metadata is small).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Longest a server works on one call until its response starts (reading a trickled request
/// included); streamed responses (sessions, watches) are not cut by it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest error text (`grpc-message`) a server sends: handlers quote what the caller sent
/// ("service <name> not found"), and a huge name would make a header the client refuses,
/// tearing down the whole connection with every call on it.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;
/// What every HTTP/2 client sends first.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Handshaken connections queued for the gRPC server to pick up.
const ACCEPTED_QUEUE: usize = 64;
/// Pause after a failed `accept` (for example out of file descriptors) before the next.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 flow-control window, per stream and per connection, both directions: large enough
/// that a Raft batch or snapshot chunk crosses a LAN in one or two round trips instead of
/// waiting on the 64 KiB default's window updates.
pub const HTTP2_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 keepalive ping period, so a silently dead peer's connection is noticed.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection is dropped.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// ALPN protocol gRPC runs over.
const ALPN_H2: &[u8] = b"h2";

/// Errors of TLS configuration and connection set-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Material { what: &'static str, reason: String },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("bad peer address {0:?}")]
    BadAddress(String),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("saving node certificate: {0}")]
    Save(String),
}

/// How far from now a registry token's time may be.
pub const REGISTRY_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// What a registry token signs.
fn token_message(cluster_id: &str, unix_secs: u64) -> String {
    format!("shoal-registry-token\n{cluster_id}\n{unix_secs}")
}

fn material(what: &'static str, reason: impl fmt::Display) -> TlsError {
    TlsError::Material {
        what,
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node certificate in use now, with what shoal read out of it.
struct Current {
    certified: Arc<CertifiedKey>,
    cert_pem: String,
    key_pem: String,
    info: CertInfo,
}

struct Inner {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    roots: Arc<RootCertStore>,
    current: RwLock<Arc<Current>>,
}

/// A node's TLS material (cluster CA, node certificate and key), shared by its servers and
/// clients. Cloning is cheap; a [`NodeTls::replace`] is seen by every clone.
#[derive(Clone)]
pub struct NodeTls {
    inner: Arc<Inner>,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("identity", &self.identity())
            .field("serial", &self.serial())
            .finish()
    }
}

impl NodeTls {
    /// From PEM: the cluster CA certificate, the node certificate (must be signed by that
    /// CA and name a node) and the node's private key (must match the certificate).
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeTls, TlsError> {
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| material("CA certificate", e))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_der.clone())
            .map_err(|e| material("CA certificate", e))?;
        let current = load_current(&ca_der, cert_pem, key_pem)?;
        Ok(NodeTls {
            inner: Arc::new(Inner {
                ca_pem: ca_pem.to_string(),
                ca_der,
                roots: Arc::new(roots),
                current: RwLock::new(Arc::new(current)),
            }),
        })
    }

    /// Loads `ca.crt`, `node.crt` and `node.key` from a PKI directory. If a renewal was cut
    /// short after the key was replaced, the previous key (`node.key.prev`) is used.
    pub fn load(pki_dir: &Path) -> Result<NodeTls, TlsError> {
        let read = |name: &str| {
            let path = pki_dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        let ca_pem = read(ca::CA_CERT_FILE)?;
        let cert_pem = read(ca::NODE_CERT_FILE)?;
        let key_pem = read(ca::NODE_KEY_FILE)?;
        match NodeTls::from_pem(&ca_pem, &cert_pem, &key_pem) {
            Ok(tls) => Ok(tls),
            Err(first) => match read(ca::NODE_KEY_PREV_FILE) {
                Ok(prev) => NodeTls::from_pem(&ca_pem, &cert_pem, &prev).map_err(|_| first),
                Err(_) => Err(first),
            },
        }
    }

    /// Writes the CA certificate, node certificate and key into a PKI directory, atomically
    /// file by file, keys mode 0600.
    pub fn save(&self, pki_dir: &Path) -> Result<(), TlsError> {
        let cur = self.current();
        ca::write_atomic(
            &pki_dir.join(ca::CA_CERT_FILE),
            self.inner.ca_pem.as_bytes(),
            0o644,
        )
        .and_then(|()| ca::save_node_pair(pki_dir, &cur.cert_pem, &cur.key_pem))
        .map_err(|e| TlsError::Save(e.to_string()))
    }

    /// Switches to a renewed certificate and key: new connections, client and server side,
    /// present it from now on. It must be signed by the same CA and name the same node.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let next = load_current(&self.inner.ca_der, cert_pem, key_pem)?;
        let mut slot = self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if next.info.identity.node_id != slot.info.identity.node_id
            || next.info.identity.cluster_id != slot.info.identity.cluster_id
        {
            return Err(material(
                "renewed certificate",
                "names a different node or cluster",
            ));
        }
        *slot = Arc::new(next);
        Ok(())
    }

    fn current(&self) -> Arc<Current> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Who this node is, by its current certificate.
    pub fn identity(&self) -> NodeIdentity {
        self.current().info.identity.clone()
    }

    /// Identity, serial, validity and SANs of the current certificate.
    pub fn cert_info(&self) -> CertInfo {
        self.current().info.clone()
    }

    /// Serial of the current certificate (lowercase hex).
    pub fn serial(&self) -> String {
        self.current().info.serial.clone()
    }

    /// A registry token of this node: proof, for the cluster registry's HTTP Basic auth, that
    /// the caller holds this node's key now (its certificate, the time, and the node key's
    /// signature over both; good for [`REGISTRY_TOKEN_LIFETIME`] either side of now).
    pub fn registry_token(&self) -> Result<String, TlsError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.registry_token_at(now)
    }

    fn registry_token_at(&self, now: u64) -> Result<String, TlsError> {
        use base64::Engine;
        let cur = self.current();
        let msg = token_message(&cur.info.identity.cluster_id, now);
        let signer = cur
            .certified
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .ok_or_else(|| material("registry token", "the node key is not ECDSA P-256"))?;
        let sig = signer
            .sign(msg.as_bytes())
            .map_err(|e| material("registry token", e))?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let cert = cur
            .certified
            .cert
            .first()
            .ok_or_else(|| material("registry token", "no node certificate"))?;
        Ok(format!("{}.{now}.{}", b64.encode(cert), b64.encode(sig)))
    }

    /// The node a registry token (see [`NodeTls::registry_token`]) stands for: its certificate
    /// chains to this cluster's CA, the time is within [`REGISTRY_TOKEN_LIFETIME`] of now, and
    /// the signature is the certificate key's. The caller still checks the node is a member.
    pub fn verify_registry_token(&self, token: &str) -> Result<(NodeIdentity, Vec<u8>), String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.trim().splitn(3, '.');
        let (Some(cert), Some(when), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("not a shoal registry token".into());
        };
        let der = b64.decode(cert).map_err(|_| "not a shoal registry token")?;
        let sig = b64.decode(sig).map_err(|_| "not a shoal registry token")?;
        let when: u64 = when.parse().map_err(|_| "not a shoal registry token")?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now.abs_diff(when) > REGISTRY_TOKEN_LIFETIME.as_secs() {
            return Err("the registry token has expired".into());
        }
        let cert = CertificateDer::from(der.clone());
        WebPkiClientVerifier::builder_with_provider(self.inner.roots.clone(), provider())
            .build()
            .map_err(|e| e.to_string())?
            .verify_client_cert(&cert, &[], UnixTime::now())
            .map_err(|e| format!("the token's certificate: {e}"))?;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&der)
            .map_err(|e| format!("the token's certificate: {e}"))?;
        let info = ca::cert_info(&der).map_err(|e| format!("the token's certificate: {e}"))?;
        let msg = token_message(&info.identity.cluster_id, when);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            parsed.public_key().subject_public_key.data.as_ref(),
        )
        .verify(msg.as_bytes(), &sig)
        .map_err(|_| "the registry token's signature is not its certificate's".to_string())?;
        Ok((info.identity, der))
    }

    /// The cluster CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.inner.ca_pem
    }

    /// The current node certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.current().cert_pem.clone()
    }

    /// A rustls server configuration: presents the current node certificate, verifies a
    /// client certificate against the cluster CA when one is offered, and lets clients
    /// without one connect (joining nodes); [`Authorizer`] decides per method.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_for(&[ALPN_H2])
    }

    /// [`NodeTls::server_config`] offering the ALPN protocols `alpn` (an HTTPS server that
    /// speaks HTTP/1.1 too, say).
    pub fn server_config_for(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.inner.roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| material("client verifier", e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCert(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A rustls client configuration: the cluster CA as the only root, the current node
    /// certificate as client identity.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.inner.roots.clone())
            .with_client_cert_resolver(Arc::new(CurrentCert(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// A lazily connecting mutual-TLS channel to `addr` ("host:port"), with
    /// [`CONNECT_TIMEOUT`]. The server's certificate must carry `host` as a SAN.
    pub fn channel(&self, addr: &str) -> Result<Channel, TlsError> {
        self.channel_with_timeout(addr, CONNECT_TIMEOUT)
    }

    /// As [`NodeTls::channel`], with another connect (TCP + TLS) timeout.
    pub fn channel_with_timeout(
        &self,
        addr: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, TlsError> {
        tls_channel(addr, self.client_config()?, connect_timeout)
    }
}

fn load_current(
    ca_der: &CertificateDer<'static>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Current, TlsError> {
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| material("node certificate", e))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| material("node key", e))?;
    let info = ca::cert_info(&cert_der).map_err(|e| material("node certificate", e))?;
    signed_by(&cert_der, ca_der).map_err(|e| material("node certificate", e))?;
    let certified = CertifiedKey::from_der(vec![cert_der], key_der, &provider())
        .map_err(|e| material("node key", e))?;
    Ok(Current {
        certified: Arc::new(certified),
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        info,
    })
}

/// Whether `cert` carries a valid signature of the CA certificate `ca`.
pub(crate) fn signed_by(cert: &[u8], ca: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| format!("not a certificate: {e}"))?;
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(ca)
        .map_err(|e| format!("CA is not a certificate: {e}"))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| "not signed by the cluster CA".to_string())
}

/// Resolves to the node certificate current at handshake time.
struct CurrentCert(NodeTls);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts TCP connections on `listener` and runs each TLS handshake in its own task (at most
/// [`MAX_PENDING_HANDSHAKES`] at once, at most [`MAX_CONNECTIONS`] connections in all, each
/// handshake plus the client's HTTP/2 preface within [`HANDSHAKE_TIMEOUT`]); yields the
/// connections that complete one. A failed handshake (a certificate from another CA, say) or a
/// client that is not speaking HTTP/2 is logged and dropped. Stops accepting when the stream
/// is dropped. Use with `tonic::transport::Server::serve_with_incoming`.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<Result<ServedConn, io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permits = tokio::select! {
                p = async {
                    let slot = connections.clone().acquire_owned().await?;
                    let handshake = handshakes.clone().acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((slot, handshake))
                } => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let (slot, handshake) = permits;
                let open = async {
                    let mut tls = acceptor.accept(tcp).await?;
                    let mut preface = vec![0u8; HTTP2_PREFACE.len()];
                    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut preface).await?;
                    if preface != HTTP2_PREFACE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "not an HTTP/2 client",
                        ));
                    }
                    Ok(tls)
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, open).await {
                    Ok(Ok(tls)) => {
                        drop(handshake);
                        let anonymous = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_none_or(|c| c.is_empty());
                        let expires = anonymous
                            .then(|| Box::pin(tokio::time::sleep(ANONYMOUS_CONNECTION_LIFETIME)));
                        let conn = ServedConn {
                            tls,
                            preface_sent: 0,
                            expires,
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "tls handshake refused: {e}"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A connection [`tls_incoming`] accepted: the TLS stream with the HTTP/2 preface it already
/// read put back in front, holding one of the server's [`MAX_CONNECTIONS`] slots until dropped.
pub struct ServedConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    /// How much of [`HTTP2_PREFACE`] the server has read back so far.
    preface_sent: usize,
    /// When a connection without a client certificate ends (it then reads as closed).
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for ServedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(expires) = self.expires.as_mut() {
            if expires.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(())); // end of stream: the server closes
            }
        }
        if self.preface_sent < HTTP2_PREFACE.len() {
            let rest = &HTTP2_PREFACE[self.preface_sent..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface_sent += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ServedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for ServedConn {
    // The TLS stream's own: handlers read the peer certificates from it.
    type ConnectInfo =
        <tokio_rustls::server::TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

/// A tonic server builder with shoal's transport settings: HTTP/2 windows of
/// [`HTTP2_WINDOW_BYTES`], keepalive (a peer that stops answering pings is dropped), at most
/// [`MAX_CONCURRENT_STREAMS`] calls per connection, headers up to [`MAX_HEADER_LIST_BYTES`],
/// [`REQUEST_TIMEOUT`] per call. Serve with [`tls_incoming`]:
/// `grpc_server().add_service(..).serve_with_incoming(tls_incoming(listener, config))`.
pub fn grpc_server() -> tonic::transport::Server<Stack<TrimStatusLayer, Identity>> {
    tonic::transport::Server::builder()
        .initial_stream_window_size(HTTP2_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_WINDOW_BYTES)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .timeout(REQUEST_TIMEOUT)
        .layer(TrimStatusLayer)
}

/// True for a call to the one service callers without a certificate may reach: the CA
/// (fetching the root certificate, joining with a token), whose messages are capped small.
fn is_public_call(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(shoal_proto::v1::ca_server::SERVICE_NAME))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Refuses, before a byte of the request body is read, every call without a verified client
/// certificate except to the CA: an anonymous client cannot make the server buffer a Raft,
/// Control or Dispatcher message (up to 16 MiB each). Handlers still authorise the caller
/// (cluster, role, removal); this only stops the unauthenticated early. For the TLS port.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequireClientCertLayer;

impl<S> tower::Layer<S> for RequireClientCertLayer {
    type Service = RequireClientCert<S>;

    fn layer(&self, inner: S) -> RequireClientCert<S> {
        RequireClientCert(inner)
    }
}

/// The service [`RequireClientCertLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct RequireClientCert<S>(S);

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequireClientCert<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<http::Response<ResBody>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let has_cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .is_some_and(|c| !c.is_empty());
        if has_cert || is_public_call(req.uri().path()) {
            return futures::future::Either::Left(self.0.call(req));
        }
        let refused = Status::unauthenticated("a client certificate is required").into_http();
        futures::future::Either::Right(futures::future::ready(Ok(refused)))
    }
}

/// Cuts every error text a server sends to [`MAX_STATUS_MESSAGE_BYTES`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TrimStatusLayer;

impl<S> tower::Layer<S> for TrimStatusLayer {
    type Service = TrimStatus<S>;

    fn layer(&self, inner: S) -> TrimStatus<S> {
        TrimStatus(inner)
    }
}

/// The service [`TrimStatusLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct TrimStatus<S>(S);

type Trim<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, Req, B> tower::Service<Req> for TrimStatus<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, Trim<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        futures::TryFutureExt::map_ok(self.0.call(req), trim_status as Trim<B>)
    }
}

/// An error's `grpc-message` (percent-encoded) cut to [`MAX_STATUS_MESSAGE_BYTES`], never in
/// the middle of an escape. Statuses in trailers (after a streamed body) are left alone: they
/// come from shoal's own stream code, not from echoing a request.
fn trim_status<B>(mut r: http::Response<B>) -> http::Response<B> {
    const NAME: &str = "grpc-message";
    let Some(v) = r.headers().get(NAME) else {
        return r;
    };
    let bytes = v.as_bytes();
    if bytes.len() <= MAX_STATUS_MESSAGE_BYTES {
        return r;
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES;
    if let Some(p) = bytes[end - 2..end].iter().position(|b| *b == b'%') {
        end = end - 2 + p;
    }
    let mut cut = bytes[..end].to_vec();
    cut.extend_from_slice(b"...");
    if let Ok(v) = http::HeaderValue::from_bytes(&cut) {
        r.headers_mut().insert(NAME, v);
    }
    r
}

/// A channel over TLS to a server this node does not hold a certificate for yet: the server
/// is verified against `ca_pem`, no client certificate is sent (join: `IssueNodeCertificate`).
pub fn anonymous_channel(addr: &str, ca_pem: &str) -> Result<Channel, TlsError> {
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| material("CA certificate", e))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_der)
        .map_err(|e| material("CA certificate", e))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    tls_channel(addr, Arc::new(config), CONNECT_TIMEOUT)
}

/// A channel that does not verify the server at all. Only for fetching the root CA during a
/// join, whose answer is trusted only once its digest matches the join token's.
pub(crate) fn unverified_channel(addr: &str) -> Result<Channel, TlsError> {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    tls_channel(addr, Arc::new(config), CONNECT_TIMEOUT)
}

/// Accepts any server certificate (handshake signatures are still checked).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A lazily connecting channel to `addr` over TLS with any rustls client configuration (its
/// ALPN must include `h2`).
pub fn channel_with_config(
    addr: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    tls_channel(addr, config, connect_timeout)
}

fn tls_channel(
    addr: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    // The URI says http: the connector below does the TLS, so tonic must not try to.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| TlsError::BadAddress(addr.to_string()))?
        .connect_timeout(connect_timeout)
        .initial_stream_window_size(HTTP2_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_WINDOW_BYTES)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let uri = endpoint.uri();
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(TlsError::BadAddress(addr.to_string()));
    }
    Ok(endpoint.connect_with_connector_lazy(TlsConnect {
        connector: TlsConnector::from(config),
        timeout: connect_timeout,
    }))
}

/// TCP connect plus TLS handshake, verifying the server's certificate for the URI's host.
#[derive(Clone)]
struct TlsConnect {
    connector: TlsConnector,
    timeout: Duration,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error>>
            + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> ConnectFuture {
        let connector = self.connector.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad address {uri}"));
            let host = uri.host().ok_or_else(bad)?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().ok_or_else(bad)?;
            let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                connector.connect(name, tcp).await
            };
            let tls = tokio::time::timeout(timeout, connect).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {host}:{port} timed out"),
                )
            })??;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Answers whether a node has been removed from the cluster (the store decides; a removed
/// node's certificate is refused at once though it has not expired).
pub trait NodeRegistry: Send + Sync + 'static {
    /// True if `node_id` was removed from the cluster.
    fn is_removed(&self, node_id: &str) -> bool;
}

/// Per-request authorisation from the peer's certificate.
#[derive(Clone)]
pub struct Authorizer {
    cluster_id: String,
    registry: Arc<dyn NodeRegistry>,
    local: Option<NodeIdentity>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("cluster_id", &self.cluster_id)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// Authorises peers of cluster `cluster_id`, asking `registry` about removed nodes.
    pub fn new(cluster_id: impl Into<String>, registry: Arc<dyn NodeRegistry>) -> Authorizer {
        Authorizer {
            cluster_id: cluster_id.into(),
            registry,
            local: None,
        }
    }

    /// Lets requests that arrive over a Unix socket (the root-only local control socket)
    /// through as `identity` (this node); without this they are refused like any peer
    /// without a certificate.
    pub fn allow_local(mut self, identity: NodeIdentity) -> Authorizer {
        self.local = Some(identity);
        self
    }

    /// The cluster this authoriser admits.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The identity of the peer that sent `req`, if its certificate is from this cluster,
    /// unexpired, of one of the `allowed` roles, and its node has not been removed.
    /// No certificate → `Unauthenticated`; anything else refused → `PermissionDenied`.
    pub fn authorize<T>(&self, req: &Request<T>, allowed: &[Role]) -> Result<NodeIdentity, Status> {
        let identity = match req.peer_certs() {
            Some(chain) if !chain.is_empty() => self.check_cert(&chain[0])?,
            _ => match (&self.local, is_unix_socket(req)) {
                (Some(local), true) => local.clone(),
                _ => {
                    return Err(Status::unauthenticated(
                        "a client certificate signed by the cluster CA is required",
                    ))
                }
            },
        };
        if !allowed.contains(&identity.role) {
            let need: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "a {} certificate may not call this method (needs {})",
                identity.role,
                need.join(" or ")
            )));
        }
        Ok(identity)
    }

    /// Who a client certificate (DER, already verified against the cluster CA) belongs to, if
    /// that node is a member of this cluster now.
    pub fn check_cert(&self, der: &[u8]) -> Result<NodeIdentity, Status> {
        let info = ca::cert_info(der)
            .map_err(|e| Status::permission_denied(format!("client certificate: {e}")))?;
        let id = info.identity;
        if id.cluster_id != self.cluster_id {
            return Err(Status::permission_denied(format!(
                "client certificate is for cluster {:?}, not this one",
                id.cluster_id
            )));
        }
        // The handshake checked validity once; a long-lived connection must not outlive it.
        if SystemTime::now() > info.not_after {
            return Err(Status::unauthenticated("client certificate has expired"));
        }
        if self.registry.is_removed(&id.node_id) {
            return Err(Status::permission_denied(format!(
                "node {} has been removed from the cluster",
                id.node_id
            )));
        }
        Ok(id)
    }
}

#[cfg(unix)]
fn is_unix_socket<T>(req: &Request<T>) -> bool {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .is_some()
}

#[cfg(not(unix))]
fn is_unix_socket<T>(_req: &Request<T>) -> bool {
    false
}

#[cfg(test)]
mod registry_token_tests {
    use super::*;
    use crate::ca::RootCa;

    fn node(ca: &RootCa, id: &str) -> NodeTls {
        let (key, csr) = ca::make_csr(None).unwrap();
        let cert = ca
            .issue(&csr, id, Role::Worker, &[], ca::DEFAULT_NODE_CERT_LIFETIME)
            .unwrap();
        NodeTls::from_pem(ca.cert_pem(), &cert.cert_pem, &key).unwrap()
    }

    #[test]
    fn registry_tokens_prove_a_node_key_of_this_cluster_and_expire() {
        let ca = RootCa::create("c1").unwrap();
        let (n1, n2) = (node(&ca, "n1"), node(&ca, "n2"));
        let t = n1.registry_token().unwrap();
        assert_eq!(n2.verify_registry_token(&t).unwrap().0.node_id, "n1");
        // Another cluster's node: its certificate does not chain to this CA.
        let stranger = node(&RootCa::create("c2").unwrap(), "n9");
        let err = n1
            .verify_registry_token(&stranger.registry_token().unwrap())
            .unwrap_err();
        assert!(err.contains("certificate"), "{err}");
        // n1's certificate with n2's signature: forged.
        let t2 = n2.registry_token().unwrap();
        let (c1, rest1) = t.split_once('.').unwrap();
        let (_, rest2) = t2.split_once('.').unwrap();
        let (when2, sig2) = rest2.split_once('.').unwrap();
        let _ = rest1;
        let forged = format!("{c1}.{when2}.{sig2}");
        assert!(n2
            .verify_registry_token(&forged)
            .unwrap_err()
            .contains("signature"));
        // Too old, and garbage.
        let old = n1.registry_token_at(1_000_000).unwrap();
        assert!(n2
            .verify_registry_token(&old)
            .unwrap_err()
            .contains("expired"));
        assert!(n2.verify_registry_token("x.y").is_err());
    }
}
