//! Images from registries (OCI distribution spec / Docker registry API v2) into the node's
//! image store, with `oci-client` speaking the protocol (bearer-token challenges, basic auth,
//! redirects, digests checked as blobs stream in).
//!
//! A pull resolves the reference to one manifest (from an image index or Docker manifest list:
//! the node's platform), downloads its config, then its layers concurrently, straight into the
//! store's staging ([`ImageStore::ingest`]: each blob hashed as it is written, each layer
//! unpacked while it downloads), and has the store load that layout
//! ([`ImageStore::load_ingest`]: the checks of `image load`, every layer's diff id against the
//! config), which tags the image. A failure anywhere leaves nothing in the store.
//!
//! Plain HTTP is used only for loopback registries and the ones listed as insecure (Docker's
//! rule); everything else is HTTPS with the system's roots.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use shoal_manager::controlapi::images::{ImageResolver, Resolution};
use shoal_runtime::image::{
    sha256_digest, BlobWriter, ImageError, ImageInfo, ImageStore, IngestHandle,
};

/// Where pulls stage their downloads, under the data dir.
pub const PULL_DIR: &str = "pulls";
/// Largest manifest or index accepted (Docker's limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most layers one image may have.
pub const MAX_LAYERS: usize = 256;
/// Layers downloaded at once.
const CONCURRENT_LAYERS: usize = 4;
/// Attempts at one blob's transfer (the later ones resume where the last broke off).
const DOWNLOAD_ATTEMPTS: usize = 4;
/// Connecting to a registry may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A read from a registry may stall this long.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What can go wrong pulling, as the user reads it.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    // Registries end their error bodies with a newline: one line, always.
    #[error("{reference}: {}", reason.split_whitespace().collect::<Vec<_>>().join(" "))]
    Registry { reference: String, reason: String },
    #[error("{0}")]
    Store(#[from] shoal_runtime::image::ImageError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host[:port]`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Basic-auth credentials (user, password); anonymous (with bearer tokens the registry
    /// hands out) when none.
    pub credentials: Option<(String, String)>,
    /// CA certificates (PEM) trusted for this registry besides the system's: the node's
    /// `certs.d/HOST[:PORT]/*.crt`. A registry that has them is always reached over HTTPS.
    pub roots: Vec<Vec<u8>>,
    /// Peer registries (`host:port`, cluster registry servers of nodes that hold the image)
    /// asked for each blob before the origin ([`crate::peers`]).
    pub peers: Vec<String>,
}

/// Where a node keeps per-registry CA certificates: `<data>/certs.d/HOST[:PORT]/*.crt`, as
/// Docker's `/etc/docker/certs.d`.
pub const CERTS_DIR: &str = "certs.d";

/// The file in the data dir naming the cluster registry's port (`shoal agent --registry-port`,
/// the same on every node of a cluster).
pub const REGISTRY_PORT_FILE: &str = "registry-port";

/// Records (or, with 0, forgets) the cluster registry's port for this node's pulls and pushes.
pub fn set_cluster_registry_port(data_dir: &Path, port: u16) -> std::io::Result<()> {
    let path = data_dir.join(REGISTRY_PORT_FILE);
    if port == 0 {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(path, port.to_string())
}

/// When `registry` is this node's cluster registry — its host is one of the managers this node
/// knows (`node.json`) and its port the cluster registry's (`registry-port`) — this node's id,
/// a fresh registry token (the cluster registry's Basic auth) and the cluster CA it serves
/// with. A registry the node keeps a login or a CA for is never taken for it.
fn cluster_registry(data_dir: &Path, registry: &str) -> Option<(String, String, String)> {
    let port: u16 = std::fs::read_to_string(data_dir.join(REGISTRY_PORT_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let state = shoal_manager::daemon::LocalState::load(data_dir).ok()??;
    let host = |a: &str| -> String {
        match a.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or("").to_string(),
            None => a.rsplit_once(':').map_or(a, |(h, _)| h).to_string(),
        }
    };
    if !registry.ends_with(&format!(":{port}")) {
        return None;
    }
    let wanted = host(registry);
    let known = state
        .managers
        .iter()
        .chain(std::iter::once(&state.advertise_addr).filter(|_| state.role == "manager"))
        .any(|m| host(m) == wanted);
    if !known {
        return None;
    }
    member_credentials(data_dir)
}

/// This node's id, a fresh registry token and the cluster CA (PEM), if it is in a cluster.
fn member_credentials(data_dir: &Path) -> Option<(String, String, String)> {
    let state = shoal_manager::daemon::LocalState::load(data_dir).ok()??;
    let tls = shoal_manager::tls::NodeTls::load(&data_dir.join(shoal_manager::ca::PKI_DIR)).ok()?;
    let token = tls.registry_token().ok()?;
    Some((state.node_id, token, tls.ca_pem().to_string()))
}

/// How to fetch from a peer's registry (another node's, [`crate::peers`]): HTTPS with the
/// cluster CA and this node's registry token. `None` outside a cluster.
pub fn peer_options(data_dir: &Path) -> Option<PullOptions> {
    let (node, token, ca) = member_credentials(data_dir)?;
    Some(PullOptions {
        credentials: Some((node, token)),
        roots: vec![ca.into_bytes()],
        ..Default::default()
    })
}

/// The CA certificates (PEM files ending `.crt`) the node keeps for `registry`.
fn registry_roots(data_dir: &Path, registry: &str) -> Vec<Vec<u8>> {
    let dir = data_dir.join(CERTS_DIR).join(registry);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Registry credentials of one node (`shoal login`), in Docker's `config.json` format
/// (`{"auths": {"HOST[:PORT]": {"auth": base64("USER:PASSWORD")}}}`), at `<data>/auth.json`,
/// readable by root only. The CLI and the node's agent both pull with them.
pub struct AuthFile {
    path: PathBuf,
}

/// Docker Hub's key in config.json.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

impl AuthFile {
    /// The file of the node whose data dir is `data_dir`.
    pub fn of(data_dir: &Path) -> AuthFile {
        AuthFile {
            path: data_dir.join("auth.json"),
        }
    }

    /// The key a registry has in the file (Docker Hub's is its v1 URL, as docker writes it).
    pub fn key(registry: &str) -> String {
        match registry {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB_KEY.into(),
            r => r.to_string(),
        }
    }

    fn read(&self) -> Result<serde_json::Value, PullError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| PullError::Io {
                what: format!("{}", self.path.display()),
                source: std::io::Error::other(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(serde_json::json!({"auths": {}}))
            }
            Err(source) => Err(PullError::Io {
                what: format!("read {}", self.path.display()),
                source,
            }),
        }
    }

    fn write(&self, v: &serde_json::Value) -> Result<(), PullError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |what: &str| {
            let what = format!("{what} {}", self.path.display());
            move |source| PullError::Io { what, source }
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io("create the dir of"))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("write"))?;
        f.write_all(v.to_string().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io("write"))?;
        std::fs::rename(&tmp, &self.path).map_err(io("replace"))
    }

    /// The user and password kept for `registry`.
    pub fn get(&self, registry: &str) -> Option<(String, String)> {
        use base64::Engine;
        let v = self.read().ok()?;
        let auth = v["auths"][Self::key(registry)]["auth"].as_str()?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    }

    /// Keeps `user`/`password` for `registry` (replacing what was kept).
    pub fn set(&self, registry: &str, user: &str, password: &str) -> Result<(), PullError> {
        use base64::Engine;
        let mut v = self.read()?;
        if !v["auths"].is_object() {
            v["auths"] = serde_json::json!({});
        }
        v["auths"][Self::key(registry)] = serde_json::json!({
            "auth": base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
        });
        self.write(&v)
    }

    /// Forgets `registry`'s credentials; whether there were any.
    pub fn remove(&self, registry: &str) -> Result<bool, PullError> {
        let mut v = self.read()?;
        let had = v["auths"]
            .as_object_mut()
            .and_then(|m| m.remove(&Self::key(registry)))
            .is_some();
        if had {
            self.write(&v)?;
        }
        Ok(had)
    }
}

/// Checks `user`/`password` against `registry` (`host[:port]`): a read the registry must
/// authorise. A registry that refuses them answers 401; any other answer (the test repository
/// does not exist) means they were accepted.
pub async fn check_login(
    registry: &str,
    user: &str,
    password: &str,
    insecure: &[String],
    data_dir: &Path,
) -> Result<(), PullError> {
    let probe = format!("{registry}/shoal-login-check/probe:latest");
    let opts = PullOptions {
        insecure: insecure.to_vec(),
        credentials: Some((user.to_string(), password.to_string())),
        ..Default::default()
    }
    .with_node(data_dir, &probe);
    let (r, client, auth) = connect(&probe, &opts)?;
    match client
        .pull_manifest_raw(&r, &auth, &[OCI_MANIFEST, DOCKER_MANIFEST])
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            if refused(&text) {
                Err(PullError::Registry {
                    reference: registry.to_string(),
                    reason: "login refused: unauthorized (wrong user or password)".into(),
                })
            } else if text.contains("error sending request") {
                Err(PullError::Registry {
                    reference: registry.to_string(),
                    reason: text,
                })
            } else {
                Ok(())
            }
        }
    }
}

/// The registry (`host[:port]`) `reference` names and the credentials this node keeps for it
/// (`shoal login`), if any.
pub fn login_for(data_dir: &Path, reference: &str) -> Option<(String, String, String)> {
    let r: Reference = reference.parse().ok()?;
    let file = AuthFile::of(data_dir);
    let (user, password) = file
        .get(r.registry())
        .or_else(|| file.get(r.resolve_registry()))?;
    Some((r.registry().to_string(), user, password))
}

impl PullOptions {
    /// These options with what the node keeps for `reference`'s registry: its login
    /// (`shoal login`), unless credentials were given, and its CA certificates (`certs.d`).
    pub fn with_node(mut self, data_dir: &Path, reference: &str) -> PullOptions {
        let Ok(r) = reference.parse::<Reference>() else {
            return self;
        };
        if self.credentials.is_none() {
            let file = AuthFile::of(data_dir);
            self.credentials = file
                .get(r.registry())
                .or_else(|| file.get(r.resolve_registry()));
        }
        self.roots = registry_roots(data_dir, r.resolve_registry());
        if self.credentials.is_none() && self.roots.is_empty() {
            if let Some((node, token, ca)) = cluster_registry(data_dir, r.resolve_registry()) {
                self.credentials = Some((node, token));
                self.roots = vec![ca.into_bytes()];
            }
        }
        self
    }
}

/// Words registries and oci-client use when credentials are missing or wrong. The status is
/// matched with its context: a bare "401" is also in URLs of registries on ports like 40121.
const REFUSED: [&str; 7] = [
    "code: 401",
    "(401 ",
    "UNAUTHORIZED",
    "unauthorized",
    "Not authorized",
    "Authentication failure",
    "authentication required",
];

/// Whether a registry's error says the credentials are missing or wrong.
fn refused(text: &str) -> bool {
    REFUSED.iter().any(|w| text.contains(w))
}

/// A registry's error as the user reads it: a refusal for want of credentials says so and
/// what to do.
fn explain(registry: &str, e: impl std::error::Error) -> String {
    let text = causes(&e);
    if refused(&text) {
        format!("unauthorized (shoal login {registry} first): {text}")
    } else {
        text
    }
}

/// An error with the causes beneath it (`error sending request …: invalid peer certificate:
/// UnknownIssuer`), each said once.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        next = cause.source();
    }
    text
}

/// The platform this node runs, in OCI's words.
fn node_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// True for a registry host on the loopback (`localhost`, 127.0.0.0/8, ::1), with or without a
/// port.
fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The name the store tags a pulled image with: the reference as given (`busybox`,
/// `127.0.0.1:5000/app:1.4`), or none for a pull by digest.
fn store_name(given: &str) -> Option<String> {
    if given.contains('@') {
        return None;
    }
    shoal_runtime::image::Reference::parse(given)
        .ok()
        .map(|r| r.to_string())
}

/// The parsed reference, a client for its registry (plain HTTP only where allowed) and the
/// credentials to use.
fn connect(
    reference: &str,
    opts: &PullOptions,
) -> Result<(Reference, oci_client::Client, RegistryAuth), PullError> {
    // reqwest's rustls without a provider of its own: the one shoal uses everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r: Reference = reference.parse().map_err(|e| PullError::Reference {
        reference: reference.to_string(),
        reason: format!("{e}"),
    })?;
    let registry = r.resolve_registry().to_string();
    let mut plain: Vec<String> = opts.insecure.clone();
    if is_loopback(&registry) {
        plain.push(registry.clone());
    }
    if !opts.roots.is_empty() {
        // A registry the node keeps a CA for speaks TLS, loopback or listed as insecure.
        plain.retain(|p| p != &registry);
    }
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain),
        extra_root_certificates: opts
            .roots
            .iter()
            .map(|pem| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.clone(),
            })
            .collect(),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        max_concurrent_download: CONCURRENT_LAYERS,
        max_concurrent_upload: CONCURRENT_LAYERS,
        ..Default::default()
    });
    let auth = match &opts.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => RegistryAuth::Anonymous,
    };
    Ok((r, client, auth))
}

/// Pushes the stored image `reference` names to its registry: the blobs the registry lacks,
/// then the manifest, byte for byte as stored (so its digest does not change). Returns the
/// manifest's digest. Each blob is read into memory whole before it is sent.
pub async fn push(
    store: Arc<ImageStore>,
    reference: &str,
    opts: &PullOptions,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<String, PullError> {
    let (r, client, auth) = connect(reference, opts)?;
    let fail = |reason: String| PullError::Registry {
        reference: reference.to_string(),
        reason,
    };
    let local = store_name(reference).unwrap_or_else(|| reference.to_string());
    let reader = store.clone();
    let parts = tokio::task::spawn_blocking(move || reader.push_parts(&local))
        .await
        .map_err(|e| fail(format!("reading the image: {e}")))??;
    client
        .auth(&r, &auth, oci_client::RegistryOperation::Push)
        .await
        .map_err(|e| fail(explain(r.registry(), e)))?;
    for (digest, size, path) in &parts.blobs {
        if client.blob_exists(&r, digest).await.unwrap_or(false) {
            progress(digest, *size, *size);
            continue;
        }
        let data = tokio::fs::read(path)
            .await
            .map_err(|source| PullError::Io {
                what: format!("read blob {digest}"),
                source,
            })?;
        client
            .push_blob(&r, data, digest)
            .await
            .map_err(|e| fail(format!("blob {digest}: {}", explain(r.registry(), e))))?;
        progress(digest, *size, *size);
    }
    let content_type = parts
        .media_type
        .parse()
        .map_err(|_| fail(format!("media type {:?}", parts.media_type)))?;
    client
        .push_manifest_raw(&r, parts.manifest.clone(), content_type)
        .await
        .map_err(|e| fail(format!("manifest: {}", explain(r.registry(), e))))?;
    let digest = sha256_digest(&parts.manifest);
    // The registry knows it now: as Docker's RepoDigests, and so a service made from it is
    // pinned to this digest.
    if let Some(repo) = repository_of(reference) {
        let d = digest.clone();
        let _ = tokio::task::spawn_blocking(move || store.record_repo_digest(&repo, &d, &d)).await;
    }
    Ok(digest)
}

/// Pulls `reference` into `store` (kept under `data_dir`); returns the stored image. Each
/// layer's progress is reported to `progress` (layer digest, bytes so far, size).
pub async fn pull(
    store: Arc<ImageStore>,
    data_dir: &Path,
    reference: &str,
    opts: &PullOptions,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<ImageInfo, PullError> {
    let (r, client, auth) = connect(reference, opts)?;
    let fail = |reason: String| PullError::Registry {
        reference: reference.to_string(),
        reason,
    };
    let accept = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
    let (mut bytes, _) = client
        .pull_manifest_raw(&r, &auth, &accept)
        .await
        .map_err(|e| fail(explain(r.registry(), e)))?;
    check_manifest(&bytes, r.digest()).map_err(&fail)?;
    // What the registry calls the image: the digest of what the reference named (an index's,
    // for a multi-platform image).
    let registry_digest = sha256_digest(&bytes);
    let mut manifest_ref = r.clone();
    // An index: the node's platform's manifest, by digest.
    if let Some(platform_digest) = pick_platform(&bytes).map_err(&fail)? {
        manifest_ref = Reference::with_digest(
            r.registry().to_string(),
            r.repository().to_string(),
            platform_digest.clone(),
        );
        (bytes, _) = client
            .pull_manifest_raw(&manifest_ref, &auth, &accept)
            .await
            .map_err(|e| fail(explain(r.registry(), e)))?;
        check_manifest(&bytes, Some(&platform_digest)).map_err(&fail)?;
        if pick_platform(&bytes).map_err(&fail)?.is_some() {
            return Err(fail("an image index points at another index".into()));
        }
    }
    let digest = sha256_digest(&bytes);
    let m: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("manifest: {e}")))?;
    let media_type = m["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string();
    let mut blobs: Vec<(String, u64)> = Vec::new();
    let desc = |d: &serde_json::Value| -> Result<(String, u64), PullError> {
        let digest = d["digest"].as_str().unwrap_or_default().to_string();
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(fail(format!("manifest: bad blob digest {digest:?}")));
        }
        Ok((digest, d["size"].as_u64().unwrap_or(0)))
    };
    blobs.push(desc(&m["config"])?);
    let layers = m["layers"].as_array().cloned().unwrap_or_default();
    if layers.len() > MAX_LAYERS {
        return Err(fail(format!(
            "{} layers, more than {MAX_LAYERS}",
            layers.len()
        )));
    }
    for l in &layers {
        blobs.push(desc(l)?);
    }

    // The blobs go straight into the store's staging, each hashed as it arrives (the one
    // check of its digest), and the layers are unpacked while they download.
    let hex_of = |d: &str| d.trim_start_matches("sha256:").to_string();
    // What an older shoal that stopped mid-pull may have left.
    let _ = std::fs::remove_dir_all(data_dir.join(PULL_DIR).join(hex_of(&digest)));
    let ingest = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.ingest())
            .await
            .map_err(|e| fail(format!("staging: {e}")))??
    };
    let handle = ingest.handle();
    handle.add_file(&format!("blobs/sha256/{}", hex_of(&digest)), &bytes)?;
    // The config first (it is small): its diff ids tell which layers the store already holds
    // unpacked, which are then not unpacked again while they download.
    let (config_digest, config_size) = blobs.remove(0);
    if config_size > shoal_runtime::image::MAX_JSON_BYTES {
        return Err(fail(format!(
            "config: {config_size} bytes, more than {}",
            shoal_runtime::image::MAX_JSON_BYTES
        )));
    }
    let config = download(
        &client,
        &manifest_ref,
        &config_digest,
        config_size,
        (handle.clone(), None),
        true,
        &|n| progress(&config_digest, n, config_size),
    )
    .await
    .map_err(|why| fail(format!("blob {config_digest}: {why}")))?;
    let diff_ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|c| {
            c["rootfs"]["diff_ids"].as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    // Only hints: the store checks every layer against the config itself.
    let chains = if diff_ids.len() == blobs.len() {
        shoal_runtime::image::chain_ids(&diff_ids)
    } else {
        Vec::new()
    };
    // Peers that hold the image first (each blob still checked against its digest), the
    // origin last.
    let mut sources: Vec<(oci_client::Client, Reference)> = Vec::new();
    if let Some(popts) = (!opts.peers.is_empty())
        .then(|| peer_options(data_dir))
        .flatten()
    {
        for p in &opts.peers {
            let at = format!("{p}/{}@{digest}", manifest_ref.repository());
            if let Ok((r, c, _)) = connect(&at, &popts) {
                let auth = popts
                    .credentials
                    .as_ref()
                    .map(|(u, t)| RegistryAuth::Basic(u.clone(), t.clone()))
                    .unwrap_or(RegistryAuth::Anonymous);
                // The token goes with every request to that peer.
                let _ = c.auth(&r, &auth, oci_client::RegistryOperation::Pull).await;
                sources.push((c, r));
            }
        }
    }
    sources.push((client.clone(), manifest_ref.clone()));
    let sources = Arc::new(sources);
    let (tick, mut ticks) = tokio::sync::mpsc::unbounded_channel::<(String, u64, u64)>();
    let mut downloads = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_LAYERS));
    let mut seen = std::collections::HashSet::new();
    seen.insert(config_digest.clone());
    for (i, (blob, size)) in blobs.into_iter().enumerate() {
        if !seen.insert(blob.clone()) {
            continue;
        }
        let (sources, sem, tick, handle) =
            (sources.clone(), sem.clone(), tick.clone(), handle.clone());
        let chain = chains.get(i).cloned();
        downloads.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut last = String::new();
            for (client, from) in sources.iter() {
                let got = download(
                    client,
                    from,
                    &blob,
                    size,
                    (handle.clone(), chain.clone()),
                    false,
                    &|n| {
                        let _ = tick.send((blob.clone(), n, size));
                    },
                )
                .await;
                match got {
                    Ok(_) => return Ok(()),
                    Err(why) => {
                        tracing::debug!(%blob, from = %from.registry(), "blob not fetched: {why}");
                        last = why;
                    }
                }
            }
            Err((blob.clone(), last))
        });
    }
    drop(tick);
    loop {
        tokio::select! {
            Some((blob, n, size)) = ticks.recv() => progress(&blob, n, size),
            done = downloads.join_next() => match done {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err((blob, why)))) => return Err(fail(format!("blob {blob}: {why}"))),
                Some(Err(e)) => return Err(fail(format!("a download stopped: {e}"))),
            },
        }
    }
    let name = store_name(reference);
    let mut entry = serde_json::json!({
        "mediaType": media_type,
        "digest": digest,
        "size": bytes.len(),
    });
    if let Some(n) = &name {
        entry["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": n });
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry],
    });
    handle.add_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    handle.add_file("index.json", index.to_string().as_bytes())?;
    drop(handle);
    let repository = repository_of(reference);
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = store.load_ingest(ingest)?;
        let Some(mut image) = loaded.into_iter().next() else {
            return Ok(None);
        };
        if let Some(repo) = repository {
            store.record_repo_digest(&repo, &registry_digest, &image.manifest_digest)?;
            image.repo_digests.push(format!("{repo}@{registry_digest}"));
        }
        Ok::<_, shoal_runtime::image::ImageError>(Some(image))
    })
    .await
    .map_err(|e| fail(format!("loading: {e}")))??;
    loaded.ok_or_else(|| fail("the registry's image held nothing to store".into()))
}

/// Downloads one blob of `size` bytes into the pull's ingest (`to`: its handle, and for a
/// layer the chain id the config gives it, so that it is unpacked as it arrives), which
/// checks its size and digest; a broken transfer resumes where it stopped (a ranged request),
/// up to [`DOWNLOAD_ATTEMPTS`] times. More bytes than the manifest says are refused as they
/// arrive. `got` hears the bytes so far. With `keep`, the blob's bytes are returned too.
async fn download(
    client: &oci_client::Client,
    image: &Reference,
    digest: &str,
    size: u64,
    to: (IngestHandle, Option<String>),
    keep: bool,
    got: &(dyn Fn(u64) + Sync),
) -> Result<Vec<u8>, String> {
    use futures::StreamExt;
    /// Bytes gathered before they are handed to the writer (on a blocking thread).
    const BATCH: usize = 1 << 20;
    type Written = (BlobWriter, Result<(), ImageError>, Vec<u8>);
    let (ingest, chain) = to;
    let writer = ingest
        .blob(digest, size, chain.as_deref())
        .map_err(|e| e.to_string())?;
    // The writer and a spare buffer, or the write under way that gives them back.
    let mut idle = Some((writer, Vec::with_capacity(BATCH)));
    let mut busy: Option<tokio::task::JoinHandle<Written>> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
    let mut kept = Vec::new();
    // Waits for the write under way; a failed write ends the download.
    async fn settle(
        idle: &mut Option<(BlobWriter, Vec<u8>)>,
        busy: &mut Option<tokio::task::JoinHandle<Written>>,
    ) -> Result<(), String> {
        if let Some(h) = busy.take() {
            let (w, r, mut spare) = h.await.map_err(|e| e.to_string())?;
            spare.clear();
            *idle = Some((w, spare));
            r.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    // Hands `buf` to the writer on a blocking thread, receiving meanwhile into the spare.
    async fn hand_over(
        buf: &mut Vec<u8>,
        idle: &mut Option<(BlobWriter, Vec<u8>)>,
        busy: &mut Option<tokio::task::JoinHandle<Written>>,
    ) -> Result<(), String> {
        settle(idle, busy).await?;
        let Some((mut w, spare)) = idle.take() else {
            return Err("the blob's writer is gone".into());
        };
        let data = std::mem::replace(buf, spare);
        *busy = Some(tokio::task::spawn_blocking(move || {
            let r = w.write(&data);
            (w, r, data)
        }));
        Ok(())
    }
    let mut have = 0u64;
    let desc = oci_client::manifest::OciDescriptor {
        digest: digest.to_string(),
        size: size as i64,
        ..Default::default()
    };
    let mut last = String::new();
    for _ in 0..DOWNLOAD_ATTEMPTS {
        let resp = if have == 0 && size == 0 {
            client
                .pull_blob_stream(image, &desc)
                .await
                .map(|s| (s, false))
        } else if have == 0 {
            // The whole blob as a range: oci-client then leaves the digest to the writer,
            // which checks it anyway (a registry that answers 200 gets it checked twice).
            client
                .pull_blob_stream_partial(image, &desc, 0, Some(size))
                .await
                .map(|r| match r {
                    oci_client::client::BlobResponse::Full(s) => (s, false),
                    oci_client::client::BlobResponse::Partial(s) => (s, false),
                })
        } else {
            client
                .pull_blob_stream_partial(image, &desc, have, None)
                .await
                .map(|r| match r {
                    oci_client::client::BlobResponse::Full(s) => (s, true),
                    oci_client::client::BlobResponse::Partial(s) => (s, false),
                })
        };
        let mut stream = match resp {
            Ok((stream, restart)) => {
                if restart {
                    // The registry sent the whole blob again: start over.
                    settle(&mut idle, &mut busy).await?;
                    if let Some((w, _)) = idle.as_mut() {
                        w.restart().map_err(|e| e.to_string())?;
                    }
                    buf.clear();
                    kept.clear();
                    have = 0;
                }
                stream.stream
            }
            Err(e) => {
                let text = causes(&e);
                // A registry's refusal is final; only a broken transfer is resumed.
                if !text.contains("error sending request") && !text.contains("error decoding") {
                    return Err(text);
                }
                last = text;
                continue;
            }
        };
        let mut broken = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    have += bytes.len() as u64;
                    if have > size {
                        return Err(format!("more than the {size} bytes the manifest says"));
                    }
                    buf.extend_from_slice(&bytes);
                    if keep {
                        kept.extend_from_slice(&bytes);
                    }
                    if buf.len() >= BATCH {
                        hand_over(&mut buf, &mut idle, &mut busy).await?;
                    }
                    got(have);
                }
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        match broken {
            // A stream that verifies its digest says so when the bytes end: not resumable.
            Some(e) if e.contains("digest") => return Err(e),
            Some(e) => last = e,
            None if have < size => {
                last = format!("the transfer ended after {have} of {size} bytes")
            }
            None => break,
        }
    }
    if have != size {
        return Err(format!("{last} (after {DOWNLOAD_ATTEMPTS} attempts)"));
    }
    if !buf.is_empty() {
        hand_over(&mut buf, &mut idle, &mut busy).await?;
    }
    settle(&mut idle, &mut busy).await?;
    let Some((w, _)) = idle else {
        return Err("the blob's writer is gone".into());
    };
    match w.finish() {
        Ok(()) => Ok(kept),
        Err(ImageError::DigestMismatch { actual, .. }) => {
            Err(format!("digest mismatch: the bytes hash to {actual}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The repository a reference names, as given (`busybox`, `registry:5000/app`); `None` for
/// one that does not parse.
fn repository_of(given: &str) -> Option<String> {
    let base = given.split('@').next().unwrap_or(given);
    shoal_runtime::image::Reference::parse(base)
        .ok()
        .map(|r| r.name)
}

/// The digest `reference`'s registry gives what it names now (an image index's for a
/// multi-platform image): what a service spec is pinned to.
pub async fn resolve(reference: &str, opts: &PullOptions) -> Result<String, PullError> {
    let (r, client, auth) = connect(reference, opts)?;
    let (bytes, _) = client
        .pull_manifest_raw(
            &r,
            &auth,
            &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST],
        )
        .await
        .map_err(|e| PullError::Registry {
            reference: reference.to_string(),
            reason: explain(r.registry(), e),
        })?;
    check_manifest(&bytes, r.digest()).map_err(|reason| PullError::Registry {
        reference: reference.to_string(),
        reason,
    })?;
    Ok(sha256_digest(&bytes))
}

/// A registry that does not answer a digest lookup in this long leaves the tag unpinned.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The control API's image resolver on this node: its registry access (`shoal login`,
/// insecure registries) and its image store, where an image that came from no registry
/// (imported, loaded) is never looked up.
pub struct NodeResolver {
    /// The node's data dir (image store, `auth.json`).
    pub data_dir: PathBuf,
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
}

#[tonic::async_trait]
impl ImageResolver for NodeResolver {
    async fn resolve(
        &self,
        image: &str,
        credentials: Option<&shoal_proto::v1::RegistryCredentials>,
    ) -> Result<Resolution, String> {
        let (data, name) = (self.data_dir.clone(), image.to_string());
        let held = tokio::task::spawn_blocking(move || {
            ImageStore::open(&data).and_then(|s| s.inspect(&name)).ok()
        })
        .await
        .ok()
        .flatten();
        if held.is_some_and(|i| i.repo_digests.is_empty()) {
            return Ok(Resolution::LocalOnly);
        }
        let opts = PullOptions {
            insecure: self.insecure.clone(),
            credentials: credentials.map(|c| (c.username.clone(), c.password.clone())),
            ..Default::default()
        }
        .with_node(&self.data_dir, image);
        match tokio::time::timeout(RESOLVE_TIMEOUT, resolve(image, &opts)).await {
            Ok(Ok(d)) => Ok(Resolution::Digest(d)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the registry did not answer in {} s",
                RESOLVE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Refuses a manifest that is too large or whose bytes are not what was asked for.
fn check_manifest(bytes: &[u8], wanted: Option<&str>) -> Result<(), String> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "manifest of {} bytes, more than {MAX_MANIFEST_BYTES}",
            bytes.len()
        ));
    }
    if let Some(w) = wanted {
        let got = sha256_digest(bytes);
        if got != w {
            return Err(format!(
                "manifest digest mismatch: asked for {w}, got {got}"
            ));
        }
    }
    Ok(())
}

/// For an image index or manifest list: the digest of the linux manifest for this node's
/// architecture. `None` for a plain manifest.
fn pick_platform(bytes: &[u8]) -> Result<Option<String>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest: {e}"))?;
    let mt = v["mediaType"].as_str().unwrap_or_default();
    let Some(list) = v["manifests"].as_array() else {
        if mt == OCI_INDEX || mt == DOCKER_LIST {
            return Err("an image index without manifests".into());
        }
        return Ok(None);
    };
    let arch = node_arch();
    list.iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str())
        .map(|d| Some(d.to_string()))
        .ok_or_else(|| format!("no linux/{arch} image in the index"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_other_errors_whatever_the_port() {
        for yes in [
            "Server error: url http://127.0.0.1:5000/v2/a/manifests/1, code: 401, message: ",
            "HTTP status client error (401 Unauthorized) for url (http://127.0.0.1:5000/v2/)",
            "Not authorized: url http://127.0.0.1:5000/v2/a/manifests/1",
            "Registry error: url http://x/v2/, envelope: OCI API errors: [UNAUTHORIZED]",
        ] {
            assert!(refused(yes), "{yes}");
        }
        // A registry on port 40121 that has no such repository: not a refusal.
        for no in [
            "Server error: url http://127.0.0.1:40121/v2/shoal-login-check/probe/manifests/latest, code: 404, message: ",
            "Registry error: url http://127.0.0.1:40121/v2/p/manifests/1, envelope: OCI API errors: [NAME_UNKNOWN]",
        ] {
            assert!(!refused(no), "{no}");
        }
    }

    #[test]
    fn loopback_registries_are_recognised() {
        for yes in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.4.5",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "registry.example.com",
            "10.77.1.1:5000",
            "index.docker.io",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn an_index_gives_the_node_s_platform() {
        let arch = node_arch();
        let idx = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"digest": "sha256:aa", "platform": {"os": "linux", "architecture": "s390x-not-this"}},
                {"digest": "sha256:bb", "platform": {"os": "linux", "architecture": arch}},
            ]
        });
        let bytes = serde_json::to_vec(&idx).unwrap();
        assert_eq!(pick_platform(&bytes).unwrap().as_deref(), Some("sha256:bb"));
        let none = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"digest": "sha256:aa", "platform": {"os": "windows", "architecture": arch}}]});
        assert!(pick_platform(&serde_json::to_vec(&none).unwrap())
            .unwrap_err()
            .contains("no linux/"));
        let plain =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []});
        assert_eq!(
            pick_platform(&serde_json::to_vec(&plain).unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn manifests_are_checked_by_size_and_digest() {
        let b = b"{}";
        assert!(check_manifest(b, Some(&sha256_digest(b))).is_ok());
        assert!(check_manifest(b, Some("sha256:00"))
            .unwrap_err()
            .contains("mismatch"));
        assert!(check_manifest(&vec![b' '; MAX_MANIFEST_BYTES + 1], None)
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn store_names_keep_what_was_asked() {
        assert_eq!(store_name("busybox").as_deref(), Some("busybox:latest"));
        assert_eq!(
            store_name("127.0.0.1:5000/app:1.4").as_deref(),
            Some("127.0.0.1:5000/app:1.4")
        );
        assert_eq!(store_name("app@sha256:abcd"), None);
    }
}
