//! The cluster registry: the OCI distribution API (pull and push) served by a manager from its
//! node's image store, over HTTPS with the node's certificate (the cluster CA's).
//!
//! Who may call: a cluster member, proved either by a client certificate the cluster CA issued
//! (mutual TLS: `skopeo --cert-dir`, docker's `certs.d/HOST:PORT/client.cert`) or by a registry
//! token in HTTP Basic auth (`shoal`'s own pulls and pushes, whose HTTP client offers no client
//! certificate; see `NodeTls::registry_token`). Pulls are open to every member; pushes need a
//! manager's certificate. A removed node is refused at once (the store decides).
//!
//! Pulls read the store's blobs (`images/blobs/sha256`) and tags (`NAME:TAG` as the pushed
//! repository path names them); pushed blobs wait under `<data>/registry/` until a manifest
//! names them, and a pushed manifest is stored with `ImageStore::load_consuming`, the same code
//! path as a pull or `image load`: every digest checked again, layers unpacked once.

// The handlers' error is the response to send (a distribution-spec error), as large as the
// success one; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use shoal_manager::ca::{NodeIdentity, Role};
use shoal_manager::tls::NodeTls;
use shoal_runtime::image::{sha256_digest, ImageStore};
use tokio::io::AsyncWriteExt;

/// Largest manifest accepted or served.
const MAX_MANIFEST: usize = 4 << 20;
/// Largest blob one upload may carry.
const MAX_BLOB: u64 = 64 << 30;
/// A pushed blob no manifest named within this long is removed.
const PUSHED_BLOB_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// How often pushed blobs are looked over.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Where pushes stage their blobs and layouts, under the data dir.
pub const REGISTRY_DIR: &str = "registry";

type Body = BoxBody<Bytes, std::io::Error>;

/// Decides whether the node a verified certificate (DER) names is a member now.
pub type Membership = Arc<dyn Fn(&[u8]) -> Result<NodeIdentity, String> + Send + Sync>;

/// On a manager: the peer registries (`host:port`) of the nodes that hold the image pinned to
/// a digest (their tasks of it got past PREPARING), leaving out the node asking (by id).
/// `None` on a node that is no manager now.
pub type Holders = Arc<dyn Fn(&str, &str) -> Option<Vec<String>> + Send + Sync>;

/// How long a node that set out to pull an image from its origin registry is waited for by
/// the others before they pull it from the origin too.
pub const CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(120);
/// Nodes one holder is given to serve at once: the others wait for more holders, so a new
/// image spreads as a tree (1, 3, 9, … holders) instead of every node fetching from the first.
pub const PER_HOLDER: usize = 2;
/// How long a node sent to a holder counts against it (or until it asks again).
pub const FETCH_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Which holder each node was sent to, per image: (node, holder, when).
pub type Fetching = Arc<
    std::sync::Mutex<std::collections::HashMap<String, Vec<(String, String, std::time::Instant)>>>,
>;

/// What the cluster registry serves from.
#[derive(Clone)]
pub struct RegistryServer {
    /// The node's TLS material (server certificate, CA for clients and tokens).
    pub tls: NodeTls,
    /// The node's image store.
    pub store: Arc<ImageStore>,
    /// The node's data dir (its store and `registry/` staging dir).
    pub data_dir: PathBuf,
    /// Whether a certificate's node is a member now (the manager's authorizer).
    pub member: Membership,
    /// Whether this node is a manager now (pushes and peer lookups are a manager's).
    pub is_manager: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Who holds an image (see [`Holders`]).
    pub holders: Holders,
    /// Images a node set out to pull from their origin, and when: the others wait for it.
    pub claims:
        Arc<std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>>,
    /// The nodes sent to each holder (see [`PER_HOLDER`]).
    pub fetching: Fetching,
}

impl RegistryServer {
    fn blobs(&self) -> PathBuf {
        self.data_dir.join("images/blobs/sha256")
    }

    fn staging(&self) -> PathBuf {
        self.data_dir.join(REGISTRY_DIR)
    }

    /// Serves on `listener` until `stop` fires. A connection whose TLS handshake fails is
    /// dropped; each connection is served on its own task.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let config = self
            .tls
            .server_config_for(&[b"h2", b"http/1.1"])
            .map_err(std::io::Error::other)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        for dir in ["uploads", "blobs", "layouts"] {
            let d = self.staging().join(dir);
            // What an interrupted push left is of no use to anyone.
            if dir != "blobs" {
                let _ = std::fs::remove_dir_all(&d);
            }
            std::fs::create_dir_all(&d)?;
        }
        let me = Arc::new(self);
        let sweeper = {
            let blobs = me.staging().join("blobs");
            tokio::spawn(async move {
                loop {
                    let dir = blobs.clone();
                    let _ = tokio::task::spawn_blocking(move || sweep(&dir, PUSHED_BLOB_TTL)).await;
                    tokio::time::sleep(SWEEP_EVERY).await;
                }
            })
        };
        let _stop_sweeper = AbortOnDrop(sweeper);
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => r?,
                _ = stop.changed() => return Ok(()),
            };
            let (acceptor, me) = (acceptor.clone(), me.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "registry: tls handshake refused: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let cert: Option<Vec<u8>> = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (me, cert) = (me.clone(), cert.clone());
                    async move { Ok::<_, Infallible>(me.handle(cert.as_deref(), req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(io, svc)
                .await;
            });
        }
    }

    /// The caller, by its client certificate or its registry token.
    fn caller(&self, cert: Option<&[u8]>, req: &Request<Incoming>) -> Result<NodeIdentity, String> {
        if let Some(der) = cert {
            return (self.member)(der);
        }
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .ok_or("a client certificate of this cluster or a shoal registry token is required")?;
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| "malformed Basic credentials")?;
        let text = String::from_utf8(raw).map_err(|_| "malformed Basic credentials")?;
        let (_, token) = text.split_once(':').ok_or("malformed Basic credentials")?;
        let (_, der) = self.tls.verify_registry_token(token)?;
        (self.member)(&der)
    }

    async fn handle(&self, cert: Option<&[u8]>, req: Request<Incoming>) -> Response<Body> {
        let who = match self.caller(cert, &req) {
            Ok(w) => w,
            Err(why) => {
                let mut r = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", &why);
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Basic realm=\"shoal\""),
                );
                return r;
            }
        };
        let path = req.uri().path().to_string();
        let Some(rest) = path.strip_prefix("/v2/") else {
            return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a registry path");
        };
        if rest.is_empty() {
            return json(StatusCode::OK, b"{}".to_vec());
        }
        if let Some(digest) = rest.strip_prefix("_shoal/peers/") {
            return self.peers(&who, digest);
        }
        let push = !matches!(*req.method(), Method::GET | Method::HEAD);
        if push && !(self.is_manager)() {
            return error(
                StatusCode::FORBIDDEN,
                "DENIED",
                "this node is no manager: its registry only serves what it holds to its peers",
            );
        }
        if push && who.role != Role::Manager {
            return error(
                StatusCode::FORBIDDEN,
                "DENIED",
                "only a manager's certificate may push to the cluster registry",
            );
        }
        let route = Route::parse(rest);
        let r = match route {
            Some(Route::Manifest(name, reference)) => match *req.method() {
                Method::GET | Method::HEAD => {
                    self.get_manifest(&name, &reference, req.method() == Method::HEAD)
                        .await
                }
                Method::PUT => self.put_manifest(&name, &reference, req).await,
                _ => Err(unsupported()),
            },
            Some(Route::Blob(_, digest)) => match *req.method() {
                Method::GET | Method::HEAD => {
                    self.get_blob(&digest, req.method() == Method::HEAD).await
                }
                _ => Err(unsupported()),
            },
            Some(Route::Tags(name)) if req.method() == Method::GET => self.tags(&name).await,
            Some(Route::Uploads(name)) if req.method() == Method::POST => {
                self.start_upload(&name, req).await
            }
            Some(Route::Upload(name, id)) => match *req.method() {
                Method::PATCH => self.patch_upload(&name, &id, req).await,
                Method::PUT => self.finish_upload(&name, &id, req).await,
                _ => Err(unsupported()),
            },
            _ => Err(error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "no such registry path",
            )),
        };
        r.unwrap_or_else(|e| e)
    }

    /// `_shoal/peers/DIGEST` (a manager's): where the caller may fetch the layers of the image
    /// pinned to DIGEST. `{"peers": [...]}` — nodes that hold it; `{"wait": true}` — another
    /// node is pulling it from its origin now; `{"peers": []}` — pull it from the origin (the
    /// caller is then the one the others wait for, for at most [`CLAIM_TTL`]).
    fn peers(&self, who: &NodeIdentity, digest: &str) -> Response<Body> {
        if digest_hex(digest).is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "not a sha256 digest",
            );
        }
        let Some(holders) = (self.holders)(digest, &who.node_id) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "this node is no manager now",
            );
        };
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        claims.retain(|_, (_, at)| at.elapsed() < CLAIM_TTL);
        let body = if !holders.is_empty() {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            fetching.retain(|_, v| {
                v.retain(|(_, _, at)| at.elapsed() < FETCH_TTL);
                !v.is_empty()
            });
            match spread(
                fetching.entry(digest.to_string()).or_default(),
                &holders,
                &who.node_id,
            ) {
                Some(order) => serde_json::json!({ "peers": order }),
                None => serde_json::json!({"wait": true}),
            }
        } else {
            match claims.get(digest) {
                Some((node, _)) if node != &who.node_id => serde_json::json!({"wait": true}),
                _ => {
                    claims.insert(
                        digest.to_string(),
                        (who.node_id.clone(), std::time::Instant::now()),
                    );
                    serde_json::json!({ "peers": [] })
                }
            }
        };
        json(StatusCode::OK, body.to_string().into_bytes())
    }

    /// Where a blob the registry holds is: the store's, or a pushed one waiting for its
    /// manifest.
    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest_hex(digest)?;
        [
            self.blobs().join(hex),
            self.staging().join("blobs").join(hex),
        ]
        .into_iter()
        .find(|p| p.is_file())
    }

    async fn get_manifest(
        &self,
        name: &str,
        reference: &str,
        head: bool,
    ) -> Result<Response<Body>, Response<Body>> {
        let unknown = || {
            error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                &format!("{name}:{reference} is not in the cluster registry"),
            )
        };
        let digest = if digest_hex(reference).is_some() {
            reference.to_string()
        } else {
            let (store, tag) = (self.store.clone(), format!("{name}:{reference}"));
            tokio::task::spawn_blocking(move || store.inspect(&tag))
                .await
                .map_err(|_| unknown())?
                .map_err(|_| unknown())?
                .manifest_digest
        };
        let path = self.blob_path(&digest).ok_or_else(unknown)?;
        let bytes = tokio::fs::read(&path).await.map_err(|_| unknown())?;
        if bytes.len() > MAX_MANIFEST || sha256_digest(&bytes) != digest {
            return Err(unknown());
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| unknown())?;
        if v.get("config").is_none() && v.get("manifests").is_none() {
            // A config or layer blob named by digest: not a manifest.
            return Err(unknown());
        }
        let media = v["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string();
        let len = bytes.len();
        let body = if head { Vec::new() } else { bytes };
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, media)
            .header(hyper::header::CONTENT_LENGTH, len)
            .header("Docker-Content-Digest", digest)
            .body(full(body))
            .unwrap_or_else(|_| internal("response")))
    }

    /// `tags/list`: the tags the store holds for `name`.
    async fn tags(&self, name: &str) -> Result<Response<Body>, Response<Body>> {
        let store = self.store.clone();
        let images = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| internal(&e.to_string()))?
            .map_err(|e| internal(&e.to_string()))?;
        let prefix = format!("{name}:");
        let mut tags: Vec<String> = images
            .iter()
            .flat_map(|i| i.repo_tags.iter())
            .filter_map(|t| t.strip_prefix(&prefix))
            .map(str::to_string)
            .collect();
        if tags.is_empty() {
            return Err(error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                &format!("{name} is not in the cluster registry"),
            ));
        }
        tags.sort();
        let body = serde_json::json!({"name": name, "tags": tags});
        Ok(json(StatusCode::OK, body.to_string().into_bytes()))
    }

    async fn get_blob(&self, digest: &str, head: bool) -> Result<Response<Body>, Response<Body>> {
        let unknown = || {
            error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                &format!("blob {digest} is not in the cluster registry"),
            )
        };
        let path = self.blob_path(digest).ok_or_else(unknown)?;
        let file = tokio::fs::File::open(&path).await.map_err(|_| unknown())?;
        let len = file.metadata().await.map_err(|_| unknown())?.len();
        let body: Body = if head {
            full(Vec::new())
        } else {
            let chunks = futures::stream::unfold(file, |mut f| async move {
                let mut buf = vec![0u8; 256 << 10];
                match tokio::io::AsyncReadExt::read(&mut f, &mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Frame::data(Bytes::from(buf))), f))
                    }
                    Err(e) => Some((Err(e), f)),
                }
            });
            BodyExt::boxed(StreamBody::new(chunks))
        };
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header(hyper::header::CONTENT_LENGTH, len)
            .header("Docker-Content-Digest", digest)
            .body(body)
            .unwrap_or_else(|_| internal("response")))
    }

    async fn start_upload(
        &self,
        name: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Response<Body>> {
        let query = query(&req);
        // A blob it already has needs no upload (a cross-repository mount, say).
        if let Some(d) = query.get("mount") {
            if self.blob_path(d).is_some() {
                return Ok(created(&format!("/v2/{name}/blobs/{d}"), d));
            }
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let file = self.staging().join("uploads").join(&id);
        let mut f = tokio::fs::File::create(&file)
            .await
            .map_err(|e| internal(&format!("upload: {e}")))?;
        let written = write_body(&mut f, req.into_body(), 0).await;
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&file).await;
                return Err(e);
            }
        };
        if let Some(d) = query.get("digest") {
            // Monolithic: the whole blob in this request.
            return self.commit_upload(name, &id, d).await;
        }
        Ok(accepted(name, &id, written))
    }

    async fn patch_upload(
        &self,
        name: &str,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Response<Body>> {
        let file = self.upload_file(id)?;
        let mut f = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .await
            .map_err(|_| upload_unknown(id))?;
        let had = f.metadata().await.map_or(0, |m| m.len());
        let n = write_body(&mut f, req.into_body(), had).await?;
        Ok(accepted(name, id, had + n))
    }

    async fn finish_upload(
        &self,
        name: &str,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Response<Body>> {
        let digest = query(&req).get("digest").cloned().ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "the upload's digest is missing",
            )
        })?;
        let file = self.upload_file(id)?;
        let mut f = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .await
            .map_err(|_| upload_unknown(id))?;
        let had = f.metadata().await.map_or(0, |m| m.len());
        write_body(&mut f, req.into_body(), had).await?;
        drop(f);
        self.commit_upload(name, id, &digest).await
    }

    fn upload_file(&self, id: &str) -> Result<PathBuf, Response<Body>> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(upload_unknown(id));
        }
        Ok(self.staging().join("uploads").join(id))
    }

    /// Checks an upload's bytes against `digest` and keeps it until a manifest names it.
    async fn commit_upload(
        &self,
        name: &str,
        id: &str,
        digest: &str,
    ) -> Result<Response<Body>, Response<Body>> {
        let file = self.upload_file(id)?;
        let bad = |why: String| {
            let _ = std::fs::remove_file(&file);
            error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &why)
        };
        let Some(hex) = digest_hex(digest) else {
            return Err(bad(format!("{digest:?} is not a sha256 digest")));
        };
        let f2 = file.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file(&f2))
            .await
            .map_err(|e| internal(&e.to_string()))?
            .map_err(|e| internal(&format!("upload: {e}")))?;
        if actual != digest {
            return Err(bad(format!(
                "the uploaded bytes hash to {actual}, not {digest}"
            )));
        }
        tokio::fs::rename(&file, self.staging().join("blobs").join(hex))
            .await
            .map_err(|e| internal(&format!("upload: {e}")))?;
        Ok(created(&format!("/v2/{name}/blobs/{digest}"), digest))
    }

    async fn put_manifest(
        &self,
        name: &str,
        reference: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Response<Body>> {
        let invalid = |why: String| error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", &why);
        let bytes = read_limited(req.into_body(), MAX_MANIFEST).await?;
        let digest = sha256_digest(&bytes);
        if digest_hex(reference).is_some() && reference != digest {
            return Err(invalid(format!(
                "the manifest hashes to {digest}, not {reference}"
            )));
        }
        let m: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("manifest: {e}")))?;
        if m.get("manifests").is_some() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                "the cluster registry keeps single-platform images: push one platform's manifest",
            ));
        }
        let mut wanted = vec![m["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()];
        for l in m["layers"].as_array().into_iter().flatten() {
            wanted.push(l["digest"].as_str().unwrap_or_default().to_string());
        }
        // The layout the store loads from: links to the blobs, the manifest, an index.
        let layout = self
            .staging()
            .join("layouts")
            .join(format!("{:032x}", rand::random::<u128>()));
        let _gone = RemoveOnDrop(layout.clone());
        let dir = layout.join("blobs/sha256");
        std::fs::create_dir_all(&dir).map_err(|e| internal(&e.to_string()))?;
        for d in &wanted {
            let Some(src) = self.blob_path(d) else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UNKNOWN",
                    &format!("the manifest names blob {d:?}, which was not pushed"),
                ));
            };
            let dst = dir.join(digest_hex(d).unwrap_or_default());
            if !dst.exists() {
                std::fs::hard_link(&src, &dst)
                    .or_else(|_| std::fs::copy(&src, &dst).map(|_| ()))
                    .map_err(|e| internal(&e.to_string()))?;
            }
        }
        let hex = digest_hex(&digest).unwrap_or_default().to_string();
        std::fs::write(dir.join(&hex), &bytes).map_err(|e| internal(&e.to_string()))?;
        let mut entry = serde_json::json!({
            "mediaType": m["mediaType"].as_str().unwrap_or("application/vnd.oci.image.manifest.v1+json"),
            "digest": digest,
            "size": bytes.len(),
        });
        if digest_hex(reference).is_none() {
            entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": format!("{name}:{reference}")});
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
        std::fs::write(layout.join("index.json"), index.to_string())
            .and_then(|()| {
                std::fs::write(
                    layout.join("oci-layout"),
                    br#"{"imageLayoutVersion":"1.0.0"}"#,
                )
            })
            .map_err(|e| internal(&e.to_string()))?;
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || store.load_consuming(&layout))
            .await
            .map_err(|e| internal(&e.to_string()))?;
        if let Err(e) = loaded {
            return Err(invalid(e.to_string()));
        }
        // Stored now: the pushed copies are no longer needed.
        for d in &wanted {
            if let Some(h) = digest_hex(d) {
                let _ = std::fs::remove_file(self.staging().join("blobs").join(h));
            }
        }
        Ok(created(&format!("/v2/{name}/manifests/{digest}"), &digest))
    }
}

/// The holders for `asker` to fetch from, the one it is sent to first (the least busy of those
/// serving fewer than [`PER_HOLDER`] nodes), the others after it as fallbacks; `None` when
/// every holder is busy (wait for more). `sent` is who was sent where for this image.
fn spread(
    sent: &mut Vec<(String, String, std::time::Instant)>,
    holders: &[String],
    asker: &str,
) -> Option<Vec<String>> {
    sent.retain(|(n, _, _)| n != asker);
    let load = |h: &String| sent.iter().filter(|(_, x, _)| x == h).count();
    let first = holders
        .iter()
        .filter(|h| load(h) < PER_HOLDER)
        .min_by_key(|h| load(h))?
        .clone();
    sent.push((asker.to_string(), first.clone(), std::time::Instant::now()));
    let mut order = vec![first.clone()];
    order.extend(holders.iter().filter(|h| **h != first).cloned());
    Some(order)
}

/// What a `/v2/…` path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Manifest(String, String),
    Blob(String, String),
    Uploads(String),
    Upload(String, String),
    Tags(String),
}

impl Route {
    fn parse(rest: &str) -> Option<Route> {
        let name_ok = |n: &str| {
            !n.is_empty() && shoal_runtime::image::Reference::parse(&format!("{n}:x")).is_ok()
        };
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return name_ok(name).then(|| Route::Tags(name.to_string()));
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return name_ok(name).then(|| Route::Uploads(name.to_string()));
        }
        if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
            return name_ok(name).then(|| Route::Upload(name.to_string(), id.to_string()));
        }
        if let Some((name, r)) = rest.rsplit_once("/manifests/") {
            return (name_ok(name) && !r.is_empty())
                .then(|| Route::Manifest(name.to_string(), r.to_string()));
        }
        if let Some((name, d)) = rest.rsplit_once("/blobs/") {
            return name_ok(name).then(|| Route::Blob(name.to_string(), d.to_string()));
        }
        None
    }
}

/// The hex of a `sha256:` digest, if it is one.
fn digest_hex(d: &str) -> Option<&str> {
    let hex = d.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn query(req: &Request<Incoming>) -> std::collections::HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%3a", ":")))
        .collect()
}

/// Appends a request body to `f`; the bytes written. Refuses to grow a blob past
/// [`MAX_BLOB`].
async fn write_body(
    f: &mut tokio::fs::File,
    mut body: Incoming,
    had: u64,
) -> Result<u64, Response<Body>> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                &e.to_string(),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
            if had + n > MAX_BLOB {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "SIZE_INVALID",
                    &format!("a blob may hold at most {MAX_BLOB} bytes"),
                ));
            }
            f.write_all(&data)
                .await
                .map_err(|e| internal(&format!("upload: {e}")))?;
        }
    }
    f.flush()
        .await
        .map_err(|e| internal(&format!("upload: {e}")))?;
    Ok(n)
}

async fn read_limited(mut body: Incoming, limit: usize) -> Result<Vec<u8>, Response<Body>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", &e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "MANIFEST_INVALID",
                    &format!("a manifest may hold at most {limit} bytes"),
                ));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Removes the files in `dir` older than `ttl`; how many.
fn sweep(dir: &Path, ttl: std::time::Duration) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ttl);
        if old && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn full(b: Vec<u8>) -> Body {
    Full::new(Bytes::from(b))
        .map_err(|never| match never {})
        .boxed()
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("Docker-Distribution-API-Version", "registry/2.0")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}

/// A distribution-spec error response.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    json(status, body.to_string().into_bytes())
}

fn internal(why: &str) -> Response<Body> {
    error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", why)
}

fn unsupported() -> Response<Body> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        "not supported by the cluster registry",
    )
}

fn upload_unknown(id: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
        &format!("no upload {id:?}"),
    )
}

fn accepted(name: &str, id: &str, len: u64) -> Response<Body> {
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .header(
            hyper::header::LOCATION,
            format!("/v2/{name}/blobs/uploads/{id}"),
        )
        .header("Docker-Upload-UUID", id)
        .header(hyper::header::RANGE, format!("0-{}", len.saturating_sub(1)))
        .header(hyper::header::CONTENT_LENGTH, 0)
        .body(full(Vec::new()))
        .unwrap_or_else(|_| internal("response"))
}

/// 201 for what now lives at `location` under `digest`.
fn created(location: &str, digest: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(hyper::header::LOCATION, location)
        .header("Docker-Content-Digest", digest)
        .header(hyper::header::CONTENT_LENGTH, 0)
        .body(full(Vec::new()))
        .unwrap_or_else(|_| internal("response"))
}

/// Serves the cluster registry on `addr` while `stop` is false; logs and returns on error.
pub async fn run(
    server: RegistryServer,
    addr: SocketAddr,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            tracing::info!(%addr, "cluster registry serving");
            if let Err(e) = server.serve(l, stop).await {
                tracing::error!(%addr, "cluster registry stopped: {e}");
            }
        }
        Err(e) => tracing::error!(%addr, "cluster registry: cannot listen: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_spreads_as_a_tree_over_its_holders() {
        let mut sent = Vec::new();
        let one = vec!["h1".to_string()];
        assert_eq!(spread(&mut sent, &one, "a").unwrap(), ["h1"]);
        assert_eq!(spread(&mut sent, &one, "b").unwrap(), ["h1"]);
        // h1 serves two already: wait for more holders.
        assert_eq!(spread(&mut sent, &one, "c"), None);
        // Asking again does not count twice.
        assert_eq!(spread(&mut sent, &one, "a").unwrap(), ["h1"]);
        // a and b hold it now: c goes to one of them, h1 next as a fallback.
        let three = vec!["h1".to_string(), "a".to_string(), "b".to_string()];
        let order = spread(&mut sent, &three, "c").unwrap();
        assert_eq!(order.len(), 3);
        assert_eq!(order[0], "a");
        // The least busy next: b, then a (one each), then a full h1 is left out.
        assert_eq!(spread(&mut sent, &three, "d").unwrap()[0], "b");
        assert_eq!(spread(&mut sent, &three, "e").unwrap()[0], "a");
        assert_eq!(spread(&mut sent, &three, "f").unwrap()[0], "b");
        assert_eq!(spread(&mut sent, &three, "g"), None);
    }

    #[test]
    fn pushed_blobs_no_manifest_named_are_swept_when_old() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("old"), b"x").unwrap();
        std::fs::write(d.path().join("new"), b"y").unwrap();
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(d.path().join("old"))
            .unwrap()
            .set_modified(past)
            .unwrap();
        assert_eq!(sweep(d.path(), std::time::Duration::from_secs(3600)), 1);
        assert!(!d.path().join("old").exists() && d.path().join("new").exists());
    }

    #[test]
    fn registry_paths_are_parsed() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            Route::parse("team/app/manifests/1.4"),
            Some(Route::Manifest("team/app".into(), "1.4".into()))
        );
        assert_eq!(
            Route::parse(&format!("app/blobs/{d}")),
            Some(Route::Blob("app".into(), d.clone()))
        );
        assert_eq!(
            Route::parse("app/blobs/uploads/"),
            Some(Route::Uploads("app".into()))
        );
        assert_eq!(
            Route::parse("app/blobs/uploads/abc"),
            Some(Route::Upload("app".into(), "abc".into()))
        );
        assert_eq!(
            Route::parse("team/app/tags/list"),
            Some(Route::Tags("team/app".into()))
        );
        assert_eq!(Route::parse("Bad Name/manifests/1"), None);
        assert_eq!(Route::parse("app/manifests/"), None);
        assert_eq!(digest_hex(&d), Some("a".repeat(64).as_str()));
        assert_eq!(digest_hex("sha256:../../etc"), None);
    }
}
