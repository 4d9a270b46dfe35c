//! The node-local image store: an OCI image layout under `<data_dir>/images` (blobs, `index.json`
//! with `name:tag` in `org.opencontainers.image.ref.name`) and every layer unpacked once, by
//! chain id, under `<data_dir>/layers/<chain-id-hex>/rootfs` in overlayfs form.
//!
//! Crash and concurrency rules:
//! - blobs and layers are staged in temp files/dirs on the same filesystem, made durable by
//!   one `syncfs` of everything a load or pull staged, then renamed into place; a layer
//!   directory is used only when its `complete` marker (written after that syncfs) exists;
//! - `index.json` is rewritten with temp + fsync + rename under an exclusive flock
//!   (`images/.shoal/index.lock`), so concurrent `shoal` processes never lose each other's tags;
//! - writers (import, load, prepare, a pull's ingest) hold `images/.shoal/store.lock` shared
//!   for their whole run and `gc` holds it exclusive, so gc never deletes what a writer is
//!   about to reference.

pub mod reference;
mod source;
pub mod timefmt;
mod unpack;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, Os, RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use reference::Reference;
pub use source::MAX_ARCHIVE_ENTRIES;
pub use timefmt::{format_unix, parse_rfc3339};
pub use unpack::{UnpackBudget, IMAGE_BUDGET_ENV, LAYER_BUDGET_ENV, MAX_LAYER_ENTRIES};

/// Largest manifest, config, index or `manifest.json` read into memory.
pub const MAX_JSON_BYTES: u64 = 4 << 20;
/// Most layers one image may have (Docker's limit is 127 too).
pub const MAX_LAYERS: usize = 127;
/// Most images one `load` may bring in.
pub const MAX_IMAGES_PER_LOAD: usize = 1024;
/// Deepest nesting of image indexes followed (index → platform index → manifest).
const MAX_INDEX_DEPTH: usize = 3;
/// Most entries `index.json` may list.
pub const MAX_INDEX_ENTRIES: usize = 100_000;
/// Annotation holding an image's `name:tag` in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd and Docker ≥ 25 put the full name in.
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";
/// Marker file written last into a layer dir.
const LAYER_COMPLETE_MARKER: &str = "complete";
/// PATH a rootfs import gets, as Docker's default.
const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation failed.
    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },
    /// A reference that is not a valid `name[:tag]`, id or digest.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// No image matches the reference.
    #[error("no such image: {0}")]
    NotFound(String),
    /// An id prefix matching several images.
    #[error("image id prefix {0:?} matches several images")]
    Ambiguous(String),
    /// Content whose sha256 is not what its descriptor says.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// Content whose length is not what its descriptor says.
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// A layer entry refused because it could write outside the layer.
    #[error("layer {layer}: refusing entry {entry:?}: {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    /// A layer that is not a readable tar stream.
    #[error("layer {layer}: corrupt: {reason}")]
    CorruptLayer { layer: String, reason: String },
    /// A malformed image: bad JSON, missing blob, inconsistent manifest.
    #[error("invalid image: {0}")]
    Invalid(String),
    /// A format this store does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Removal refused because a container uses the image.
    #[error("image {0} is in use by a container")]
    InUse(String),
    /// Input over one of the named bounds.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: String, limit: u64 },
    /// Unpacking would write more file contents than its budget allows.
    #[error("{what} unpacks to more than {limit} bytes (set {var} to allow more)")]
    UnpackBudget {
        what: String,
        limit: u64,
        var: &'static str,
    },
}

impl ImageError {
    fn io(context: impl Into<String>, cause: io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            cause,
        }
    }
}

/// What the store knows about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image id: the config's digest, `sha256:<hex>` (Docker's image id).
    pub id: String,
    /// Digest of the stored manifest.
    pub manifest_digest: String,
    /// Every `name:tag` pointing at it, sorted; empty for a dangling image.
    pub repo_tags: Vec<String>,
    /// Creation time from the config (RFC 3339), if any.
    pub created: Option<String>,
    /// Bytes of config and layer blobs as stored (layers possibly compressed).
    pub size: u64,
    /// GOARCH-style architecture from the config.
    pub architecture: String,
    /// OS from the config.
    pub os: String,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// Uncompressed layer digests, lowest first.
    pub diff_ids: Vec<String>,
    /// Chain ids, lowest first; `layers/<hex>` holds each unpacked layer.
    pub chain_ids: Vec<String>,
    /// `repository@sha256:…` for each digest a registry knows the image by (its manifest's,
    /// or the image index's it was picked from); empty for an image that came from no
    /// registry (imported, loaded, built here).
    #[serde(default)]
    pub repo_digests: Vec<String>,
}

impl ImageInfo {
    /// The short id `docker images` shows (12 hex digits).
    pub fn short_id(&self) -> &str {
        let hex = self.id.strip_prefix("sha256:").unwrap_or(&self.id);
        &hex[..hex.len().min(12)]
    }
    /// Creation time as seconds since the epoch.
    pub fn created_unix(&self) -> Option<i64> {
        self.created.as_deref().and_then(parse_rfc3339)
    }
}

/// An image ready to run: its unpacked layers and its config.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The image.
    pub info: ImageInfo,
    /// `layers/<chain-hex>/rootfs` for each layer, lowest first (overlayfs wants the reverse
    /// order in `lowerdir=`, topmost first).
    pub layer_dirs: Vec<PathBuf>,
    /// Chain ids (`sha256:<hex>`), lowest first: what a container keeps alive in `gc`.
    pub chain_ids: Vec<String>,
    /// The image config (Env, Cmd, Entrypoint, WorkingDir, User under `.config()`).
    pub config: ImageConfiguration,
    /// The image's HEALTHCHECK (docker's `config.Healthcheck`, which the OCI config type drops).
    pub healthcheck: Option<ImageHealthcheck>,
}

/// Docker's `config.Healthcheck` of an image (`HEALTHCHECK` in a Dockerfile): not part of the
/// OCI image spec, docker writes it into the config and shoal reads it from the raw blob.
/// Durations are nanoseconds, as docker stores them; 0 means "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageHealthcheck {
    /// `[]` (inherit), `["NONE"]`, `["CMD", argv…]` or `["CMD-SHELL", command]`.
    #[serde(default)]
    pub test: Vec<String>,
    #[serde(default)]
    pub interval: i64,
    #[serde(default)]
    pub timeout: i64,
    #[serde(default)]
    pub start_period: i64,
    #[serde(default)]
    pub retries: i64,
}

/// The part of a raw image config blob the OCI type drops.
#[derive(Deserialize, Default)]
struct RawConfigExtras {
    #[serde(default)]
    config: Option<RawContainerConfig>,
}

#[derive(Deserialize, Default)]
struct RawContainerConfig {
    /// Kept raw: a malformed health check means "none", not an unusable image.
    #[serde(default, rename = "Healthcheck")]
    healthcheck: Option<serde_json::Value>,
}

impl RawConfigExtras {
    fn healthcheck(self) -> Option<ImageHealthcheck> {
        let v = self.config?.healthcheck?;
        serde_json::from_value::<ImageHealthcheck>(v).ok()
    }
}

/// What garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Bytes of blobs deleted.
    pub blob_bytes_freed: u64,
    /// Unpacked layer dirs deleted.
    pub layers_removed: usize,
    /// Dangling images deleted (by `prune`).
    pub images_removed: usize,
}

/// The local image store rooted at a data dir.
pub struct ImageStore {
    images: PathBuf,
    blobs: PathBuf,
    layers: PathBuf,
    meta: PathBuf,
    tmp: PathBuf,
    /// What one load, import, pull or run may unpack.
    budget: UnpackBudget,
}

/// sha256 of `bytes` as `sha256:<hex>`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Chain ids for `diff_ids` (lowest first), as the OCI image spec defines them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The hex of a `sha256:<64 hex>` digest, refusing anything else.
fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => Err(ImageError::Invalid(format!(
            "unsupported digest {digest:?} (want sha256:<64 hex>)"
        ))),
    }
}

fn parse_digest(s: &str) -> Result<Digest, ImageError> {
    Digest::from_str(s).map_err(|e| ImageError::Invalid(format!("digest {s:?}: {e}")))
}

fn json_err(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid(format!("{what}: {e}"))
}

fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImageError::io(format!("sync {}", dir.display()), e))
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        unique()
    ));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(ImageError::io(format!("write {}", path.display()), e));
    }
    fsync_dir(dir)
}

/// A name unique within this host for temp files: pid, time and a counter.
fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temp directory removed on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(path: PathBuf) -> Result<TempDir, ImageError> {
        fs::create_dir(&path)
            .map_err(|e| ImageError::io(format!("create {}", path.display()), e))?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// An image as a registry push needs it (see [`ImageStore::push_parts`]).
#[derive(Debug, Clone)]
pub struct PushParts {
    pub manifest: Vec<u8>,
    pub media_type: String,
    /// (digest, size, file), the config first.
    pub blobs: Vec<(String, u64, PathBuf)>,
}

fn read_bounded_file(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    source::read_bounded(path, what)
}

/// A blob verified and staged for commit.
#[derive(Debug, Clone)]
struct StagedBlob {
    digest: String,
    size: u64,
    path: PathBuf,
}

/// A layer unpacked into a temp dir under `layers/`, its diff id checked (or, for a layer a
/// pull unpacked while it downloaded, to be checked): not yet synced, no marker yet.
struct UnpackedLayer {
    tmp: TempDir,
    got: unpack::Unpacked,
}

/// A layer to unpack from a staged blob before the transaction commits.
struct LayerJob {
    blob: PathBuf,
    digest: String,
    diff_id: String,
    chain_hex: String,
}

/// One load/import in progress: staged blobs and unpacked layers, committed together.
struct Txn<'a> {
    store: &'a ImageStore,
    staging: TempDir,
    blobs: BTreeMap<String, StagedBlob>,
    layers: BTreeMap<String, UnpackedLayer>,
    /// Layers still to unpack (in parallel, at commit), lowest first.
    pending: Vec<LayerJob>,
    /// Layers a pull unpacked while they downloaded, by blob digest (their diff ids are
    /// checked against the config when the manifest names them).
    streamed: HashMap<String, UnpackedLayer>,
    counter: u64,
    /// The source directory's files are the store's to take (a pull's download): blobs are
    /// hashed in place and renamed into staging instead of copied.
    consume: bool,
    /// What the transaction's layers may unpack, together.
    allowance: Arc<unpack::Allowance>,
}

impl<'a> Txn<'a> {
    fn new(store: &'a ImageStore) -> Result<Txn<'a>, ImageError> {
        let staging = TempDir::new(store.tmp.join(format!("txn-{}", unique())))?;
        Ok(Txn::with_staging(store, staging))
    }

    fn with_staging(store: &'a ImageStore, staging: TempDir) -> Txn<'a> {
        Txn {
            store,
            staging,
            blobs: BTreeMap::new(),
            layers: BTreeMap::new(),
            pending: Vec::new(),
            streamed: HashMap::new(),
            counter: 0,
            consume: false,
            allowance: unpack::Allowance::new(store.budget),
        }
    }

    fn next_path(&mut self, prefix: &str) -> PathBuf {
        self.counter += 1;
        self.staging.path.join(format!("{prefix}-{}", self.counter))
    }

    /// Stage bytes as a blob.
    fn add_bytes(&mut self, bytes: &[u8]) -> Result<StagedBlob, ImageError> {
        let digest = sha256_digest(bytes);
        if let Some(b) = self.blobs.get(&digest) {
            return Ok(b.clone());
        }
        let path = self.next_path("blob");
        let mut f = File::create(&path)
            .map_err(|e| ImageError::io(format!("create {}", path.display()), e))?;
        // Made durable with everything else the transaction staged, at commit.
        f.write_all(bytes)
            .map_err(|e| ImageError::io(format!("write {}", path.display()), e))?;
        let b = StagedBlob {
            digest: digest.clone(),
            size: bytes.len() as u64,
            path,
        };
        self.blobs.insert(digest, b.clone());
        Ok(b)
    }

    /// Stage a source file as a blob, checking digest and size when `expected` is given.
    fn add_file(
        &mut self,
        src: &source::SourceFile,
        expected: Option<(&str, u64)>,
        what: &str,
    ) -> Result<StagedBlob, ImageError> {
        if let Some((d, size)) = expected {
            sha256_hex(d)?;
            if src.size != size {
                return Err(ImageError::SizeMismatch {
                    what: what.to_string(),
                    expected: size,
                    actual: src.size,
                });
            }
            if let Some(b) = self.blobs.get(d) {
                return Ok(b.clone());
            }
        }
        let (digest, size, path) = match &src.digest {
            // Archive members were hashed while staged in this transaction's directory.
            Some(d) if src.path.starts_with(&self.staging.path) => {
                (d.clone(), src.size, src.path.clone())
            }
            // A download of our own: read once to hash, then moved, not copied.
            None if self.consume => {
                let path = self.next_path("blob");
                let mut input = File::open(&src.path)
                    .map_err(|e| ImageError::io(format!("open {}", src.path.display()), e))?;
                let mut hashing = unpack::HashingReader::new(&mut input);
                io::copy(&mut hashing, &mut io::sink())
                    .map_err(|e| ImageError::io(format!("read {}", src.path.display()), e))?;
                let (digest, size) = hashing
                    .finish()
                    .map_err(|e| ImageError::io(format!("read {}", src.path.display()), e))?;
                let moved = match fs::rename(&src.path, &path) {
                    // Another file system: copied after all.
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                        fs::copy(&src.path, &path).map(drop)
                    }
                    r => r,
                };
                moved.map_err(|e| ImageError::io(format!("move {}", src.path.display()), e))?;
                (digest, size, path)
            }
            _ => {
                let path = self.next_path("blob");
                let mut input = File::open(&src.path)
                    .map_err(|e| ImageError::io(format!("open {}", src.path.display()), e))?;
                let mut out = File::create(&path)
                    .map_err(|e| ImageError::io(format!("create {}", path.display()), e))?;
                let mut hashing = unpack::HashingReader::new(&mut input);
                io::copy(&mut hashing, &mut out)
                    .map_err(|e| ImageError::io(format!("copy {}", src.path.display()), e))?;
                unpack::start_writeback(&out);
                let (digest, size) = hashing
                    .finish()
                    .map_err(|e| ImageError::io(format!("read {}", src.path.display()), e))?;
                (digest, size, path)
            }
        };
        if let Some((d, s)) = expected {
            if digest != d {
                return Err(ImageError::DigestMismatch {
                    what: what.to_string(),
                    expected: d.to_string(),
                    actual: digest,
                });
            }
            if size != s {
                return Err(ImageError::SizeMismatch {
                    what: what.to_string(),
                    expected: s,
                    actual: size,
                });
            }
        }
        let b = StagedBlob {
            digest: digest.clone(),
            size,
            path,
        };
        self.blobs.entry(digest).or_insert_with(|| b.clone());
        Ok(b)
    }

    /// Have a staged layer blob unpacked unless its chain is already unpacked (or about to
    /// be); its diff id is checked. A layer the pull already unpacked from these very bytes
    /// is taken if its diff id is the one asked for; the others are unpacked at commit.
    fn add_layer(
        &mut self,
        blob: &StagedBlob,
        diff_id: &str,
        chain_id: &str,
    ) -> Result<(), ImageError> {
        let chain_hex = sha256_hex(chain_id)?.to_string();
        if self.layers.contains_key(&chain_hex)
            || self.pending.iter().any(|j| j.chain_hex == chain_hex)
            || self.store.layer_complete(&chain_hex)
        {
            return Ok(());
        }
        if let Some(l) = self.streamed.remove(&blob.digest) {
            check_diff_id(&blob.digest, Some(diff_id), &l.got)?;
            self.layers.insert(chain_hex, l);
            return Ok(());
        }
        self.pending.push(LayerJob {
            blob: blob.path.clone(),
            digest: blob.digest.clone(),
            diff_id: diff_id.to_string(),
            chain_hex,
        });
        Ok(())
    }

    /// Move everything into the store: layers unpacked (several at once), one sync of all that
    /// was staged, then blobs and layers renamed in; the index is the caller's last step.
    fn commit(mut self) -> Result<(), ImageError> {
        let jobs = std::mem::take(&mut self.pending);
        for (chain_hex, l) in self.store.unpack_all(jobs, &self.allowance)? {
            self.layers.insert(chain_hex, l);
        }
        // Nothing is renamed into the store before its data is durable.
        self.store.sync_staged(&self.staging.path)?;
        for b in self.blobs.values() {
            let dst = self.store.blob_path(&b.digest)?;
            if dst.exists() {
                continue;
            }
            fs::rename(&b.path, &dst)
                .map_err(|e| ImageError::io(format!("store blob {}", b.digest), e))?;
        }
        fsync_dir(&self.store.blobs)?;
        let layers = std::mem::take(&mut self.layers);
        self.store
            .store_layers(layers.into_iter().collect(), true)?;
        Ok(())
    }
}

/// `got`'s diff id against the one the image names (none for an import, which takes it).
fn check_diff_id(
    label: &str,
    diff_id: Option<&str>,
    got: &unpack::Unpacked,
) -> Result<(), ImageError> {
    match diff_id {
        Some(expected) if expected != got.diff_id => Err(ImageError::DigestMismatch {
            what: format!(
                "layer {} uncompressed content (diff id)",
                short_label(label)
            ),
            expected: expected.to_string(),
            actual: got.diff_id.clone(),
        }),
        _ => Ok(()),
    }
}

/// The first 12 hex digits of a `sha256:` digest (a layer's name in errors).
fn short_label(label: &str) -> &str {
    label
        .strip_prefix("sha256:")
        .map_or(label, |h| &h[..h.len().min(12)])
}

/// Layers unpacked at once: a few per core (unequal layers then share the cores instead of
/// the last one unpacking alone while the other cores idle), at most 16.
fn unpack_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_mul(4)
        .clamp(2, 16)
}

/// Unpack `r` (a layer blob, plain or compressed) into a fresh temp dir under `layers`.
fn unpack_into(
    layers: &Path,
    r: impl io::Read,
    label: &str,
    allowance: &unpack::Allowance,
) -> Result<UnpackedLayer, ImageError> {
    let tmp = TempDir::new(layers.join(format!(".tmp-{}", unique())))?;
    let rootfs = tmp.path.join("rootfs");
    fs::create_dir(&rootfs)
        .map_err(|e| ImageError::io(format!("create {}", rootfs.display()), e))?;
    let got = unpack::unpack_layer(r, &rootfs, short_label(label), allowance)?;
    Ok(UnpackedLayer { tmp, got })
}

/// An image found in a source, ready to stage.
struct Candidate {
    tags: Vec<String>,
    manifest: ManifestSource,
}

enum ManifestSource {
    /// An OCI/Docker v2 manifest from the source, with its descriptor.
    Oci { digest: String, size: u64 },
    /// A `docker save` entry (legacy layout): config and layer member names.
    DockerLegacy { config: String, layers: Vec<String> },
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A stored image read back: manifest, config and where it sits in the index.
struct Stored {
    manifest_digest: String,
    manifest: ImageManifest,
    config_digest: String,
    config: ImageConfiguration,
    tags: Vec<String>,
    /// `repository@digest` (see [`ImageInfo::repo_digests`]).
    repo_digests: Vec<String>,
}

/// One digest a registry knows a stored image by (`images/.shoal/repo-digests.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RepoDigest {
    /// The repository as the pull named it (`busybox`, `registry:5000/app`).
    repository: String,
    /// The registry's digest: the manifest's, or the index's the manifest was picked from.
    digest: String,
    /// The stored manifest it stands for.
    manifest: String,
}

/// Most repo digests kept (the oldest go first).
const MAX_REPO_DIGESTS: usize = 4096;

impl ImageStore {
    /// Open (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<ImageStore, ImageError> {
        // Private: `layers/` below holds unpacked image files, setuid ones among them.
        crate::dirs::private_dir(data_dir)
            .map_err(|e| ImageError::io(format!("create {}", data_dir.display()), e))?;
        // Absolute paths: layer dirs go into overlay mount options, and gc matches them
        // against /proc/*/mountinfo.
        let data_dir = &fs::canonicalize(data_dir)
            .map_err(|e| ImageError::io(format!("resolve {}", data_dir.display()), e))?;
        let images = data_dir.join("images");
        let store = ImageStore {
            blobs: images.join("blobs").join("sha256"),
            layers: data_dir.join("layers"),
            meta: images.join(".shoal"),
            tmp: images.join(".shoal").join("tmp"),
            images,
            budget: UnpackBudget::from_env()?,
        };
        crate::dirs::private_dir(&store.layers)
            .map_err(|e| ImageError::io(format!("create {}", store.layers.display()), e))?;
        for d in [&store.blobs, &store.tmp] {
            fs::create_dir_all(d)
                .map_err(|e| ImageError::io(format!("create {}", d.display()), e))?;
        }
        let layout = store.images.join("oci-layout");
        if !layout.exists() {
            atomic_write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.images.join("index.json");
        if !index.exists() {
            let _lock = store.lock_index()?;
            if !index.exists() {
                store.write_index(&[])?;
            }
        }
        Ok(store)
    }

    fn read_repo_digests(&self) -> Vec<RepoDigest> {
        // A missing or unreadable record only loses what registries call the images.
        source::read_bounded(&self.meta.join("repo-digests.json"), "repo-digests.json")
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records that the registry knows the stored manifest `manifest` as
    /// `repository@digest` (a pull's): lookups by that digest find it, and the image counts
    /// as one from a registry. Records of images no longer stored are dropped.
    pub fn record_repo_digest(
        &self,
        repository: &str,
        digest: &str,
        manifest: &str,
    ) -> Result<(), ImageError> {
        sha256_hex(digest)?;
        let _lock = self.lock_index()?;
        let stored: std::collections::HashSet<String> = self
            .read_index()?
            .iter()
            .map(|d| d.digest().to_string())
            .collect();
        let mut all = self.read_repo_digests();
        all.retain(|r| {
            stored.contains(&r.manifest) && !(r.repository == repository && r.digest == digest)
        });
        all.push(RepoDigest {
            repository: repository.to_string(),
            digest: digest.to_string(),
            manifest: manifest.to_string(),
        });
        if all.len() > MAX_REPO_DIGESTS {
            all.drain(..all.len() - MAX_REPO_DIGESTS);
        }
        let bytes = serde_json::to_vec(&all).map_err(|e| json_err("repo digests", e))?;
        atomic_write(&self.meta.join("repo-digests.json"), &bytes)
    }

    /// Unpack within `budget` instead of the default (or the environment's).
    pub fn with_unpack_budget(mut self, budget: UnpackBudget) -> ImageStore {
        self.budget = budget;
        self
    }

    /// The data dir's `layers/` directory.
    pub fn layers_dir(&self) -> &Path {
        &self.layers
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.blobs.join(sha256_hex(digest)?))
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<File, ImageError> {
        let path = self.meta.join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
        let r = if exclusive { f.lock() } else { f.lock_shared() };
        r.map_err(|e| ImageError::io(format!("lock {}", path.display()), e))?;
        Ok(f)
    }

    fn lock_index(&self) -> Result<File, ImageError> {
        self.lock("index.lock", true)
    }

    fn lock_store_shared(&self) -> Result<File, ImageError> {
        self.lock("store.lock", false)
    }

    fn read_index(&self) -> Result<Vec<Descriptor>, ImageError> {
        let path = self.images.join("index.json");
        let bytes = source::read_bounded(&path, "index.json")?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| json_err("store index.json", e))?;
        Ok(index.manifests().clone())
    }

    fn write_index(&self, manifests: &[Descriptor]) -> Result<(), ImageError> {
        if manifests.len() > MAX_INDEX_ENTRIES {
            return Err(ImageError::TooLarge {
                what: "index.json entry count".into(),
                limit: MAX_INDEX_ENTRIES as u64,
            });
        }
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests.to_vec())
            .build()
            .map_err(|e| json_err("build index", e))?;
        let bytes =
            serde_json::to_vec_pretty(&index).map_err(|e| json_err("serialise index", e))?;
        atomic_write(&self.images.join("index.json"), &bytes)
    }

    fn read_blob_json<T: serde::de::DeserializeOwned>(
        &self,
        digest: &str,
        what: &str,
    ) -> Result<T, ImageError> {
        let path = self.blob_path(digest)?;
        let bytes = match source::read_bounded(&path, what) {
            Err(ImageError::Io { cause, .. }) if cause.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::Invalid(format!(
                    "{what}: blob {digest} is missing from the store"
                )));
            }
            r => r?,
        };
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| json_err(what, e))
    }

    /// Every stored image, in index order, with its tags.
    fn stored(&self) -> Result<Vec<Stored>, ImageError> {
        let mut order: Vec<String> = Vec::new();
        let mut tags: HashMap<String, Vec<String>> = HashMap::new();
        for d in self.read_index()? {
            let digest = d.digest().to_string();
            let entry = tags.entry(digest.clone()).or_insert_with(|| {
                order.push(digest.clone());
                Vec::new()
            });
            if let Some(name) = d
                .annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION))
            {
                entry.push(name.clone());
            }
        }
        let repo_digests = self.read_repo_digests();
        let mut out = Vec::with_capacity(order.len());
        for digest in order {
            let manifest: ImageManifest =
                self.read_blob_json(&digest, &format!("manifest {digest}"))?;
            let config_digest = manifest.config().digest().to_string();
            let config: ImageConfiguration =
                self.read_blob_json(&config_digest, &format!("config {config_digest}"))?;
            let mut t = tags.remove(&digest).unwrap_or_default();
            t.sort();
            t.dedup();
            out.push(Stored {
                manifest,
                config_digest,
                config,
                tags: t,
                repo_digests: repo_digests
                    .iter()
                    .filter(|r| r.manifest == digest)
                    .map(|r| format!("{}@{}", r.repository, r.digest))
                    .collect(),
                manifest_digest: digest,
            });
        }
        Ok(out)
    }

    fn info(s: &Stored) -> ImageInfo {
        let diff_ids = s.config.rootfs().diff_ids().clone();
        ImageInfo {
            id: s.config_digest.clone(),
            manifest_digest: s.manifest_digest.clone(),
            repo_tags: s.tags.clone(),
            created: s.config.created().clone(),
            size: s.manifest.config().size()
                + s.manifest.layers().iter().map(|l| l.size()).sum::<u64>(),
            architecture: s.config.architecture().to_string(),
            os: s.config.os().to_string(),
            layers: s
                .manifest
                .layers()
                .iter()
                .map(|l| l.digest().to_string())
                .collect(),
            chain_ids: chain_ids(&diff_ids),
            diff_ids,
            repo_digests: s.repo_digests.clone(),
        }
    }

    /// Find the stored image a reference names: `name[:tag]` first, then an id (or manifest
    /// digest) with or without `sha256:`, by unique prefix.
    fn resolve(
        &self,
        reference: &str,
        images: Vec<Stored>,
    ) -> Result<(Stored, Option<String>), ImageError> {
        let parsed = Reference::parse(reference);
        if let Ok(r) = &parsed {
            let want = r.to_string();
            if let Some(i) = images.iter().position(|s| s.tags.contains(&want)) {
                return Ok((
                    images
                        .into_iter()
                        .nth(i)
                        .ok_or_else(|| ImageError::NotFound(want.clone()))?,
                    Some(want),
                ));
            }
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        let is_hex = !hex.is_empty()
            && hex.len() <= 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_hex {
            return match parsed {
                Err(e) => Err(e),
                Ok(r) => Err(ImageError::NotFound(r.to_string())),
            };
        }
        let full = format!("sha256:{hex}");
        let mut matches: Vec<Stored> = images
            .into_iter()
            .filter(|s| {
                s.config_digest.starts_with(&full)
                    || (hex.len() == 64
                        && (s.manifest_digest == full
                            || s.repo_digests
                                .iter()
                                .any(|r| r.ends_with(&format!("@{full}")))))
            })
            .collect();
        // Manifests that share a config (one image stored with gzip and with plain layers,
        // say) are one image by id: the first in index order answers for it.
        if matches
            .iter()
            .all(|s| s.config_digest == matches[0].config_digest)
        {
            matches.truncate(1);
        }
        match matches.len() {
            0 => Err(ImageError::NotFound(reference.to_string())),
            1 => Ok((matches.remove(0), None)),
            _ => Err(ImageError::Ambiguous(reference.to_string())),
        }
    }

    /// Every image, one entry per image (its tags in `repo_tags`).
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        Ok(self.stored()?.iter().map(Self::info).collect())
    }

    /// One image by `name:tag`, id prefix or `sha256:` digest.
    pub fn inspect(&self, reference: &str) -> Result<ImageInfo, ImageError> {
        let (s, _) = self.resolve(reference, self.stored()?)?;
        Ok(Self::info(&s))
    }

    /// Gives the image `source` names the tag `target` too (moving `target` off any other
    /// image, as Docker does).
    pub fn tag(&self, source: &str, target: &str) -> Result<ImageInfo, ImageError> {
        let _store = self.lock_store_shared()?;
        let (s, _) = self.resolve(source, self.stored()?)?;
        let tag = Reference::parse(target)?.to_string();
        let path = self.blob_path(&s.manifest_digest)?;
        let size = std::fs::metadata(&path)
            .map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?
            .len();
        let manifest = StagedBlob {
            digest: s.manifest_digest.clone(),
            size,
            path,
        };
        self.add_to_index(&[(manifest, vec![tag.clone()])])?;
        self.inspect(&tag)
    }

    /// What a push of the image `reference` names sends: its manifest's bytes and media type,
    /// then its config and layer blobs as (digest, size, file), config first.
    pub fn push_parts(&self, reference: &str) -> Result<PushParts, ImageError> {
        let (s, _) = self.resolve(reference, self.stored()?)?;
        let manifest_path = self.blob_path(&s.manifest_digest)?;
        let manifest = read_bounded_file(&manifest_path, "manifest")?;
        let mut blobs = vec![(
            s.config_digest.clone(),
            s.manifest.config().size(),
            self.blob_path(&s.config_digest)?,
        )];
        for l in s.manifest.layers() {
            blobs.push((
                l.digest().to_string(),
                l.size(),
                self.blob_path(l.digest().as_ref())?,
            ));
        }
        let media_type = s
            .manifest
            .media_type()
            .as_ref()
            .map_or(MediaType::ImageManifest.to_string(), |m| m.to_string());
        Ok(PushParts {
            manifest,
            media_type,
            blobs,
        })
    }

    /// The image config of one image (what `inspect` shows under `config`).
    pub fn image_config(&self, reference: &str) -> Result<ImageConfiguration, ImageError> {
        Ok(self.resolve(reference, self.stored()?)?.0.config)
    }

    /// Untag (by `name:tag`) or remove (by id); no container use check — see `remove_unless_used`.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        self.remove_unless_used(reference, &[])
    }

    /// As `remove`, but refuse to delete an image whose id (`sha256:<hex>`) is in
    /// `in_use_image_ids`. Untagging while other tags remain is always allowed. Run `gc` after.
    pub fn remove_unless_used(
        &self,
        reference: &str,
        in_use_image_ids: &[String],
    ) -> Result<(), ImageError> {
        let _lock = self.lock_index()?;
        let (image, by_tag) = self.resolve(reference, self.stored()?)?;
        let mut entries = self.read_index()?;
        let removes_image = match &by_tag {
            Some(_) => image.tags.len() <= 1,
            None => true,
        };
        if removes_image && in_use_image_ids.iter().any(|id| id == &image.config_digest) {
            return Err(ImageError::InUse(reference.to_string()));
        }
        entries.retain(|d| {
            if d.digest().as_ref() != image.manifest_digest {
                return true;
            }
            if removes_image {
                return false;
            }
            let name = d
                .annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION));
            name != by_tag.as_ref()
        });
        self.write_index(&entries)
    }

    /// Delete blobs and unpacked layers no image in the index references, except layers whose
    /// chain id is in `in_use_chain_ids` or which an overlay mount on this host uses; also
    /// clears temp files left by crashed writers.
    pub fn gc(&self, in_use_chain_ids: &[String]) -> Result<GcReport, ImageError> {
        let _store = self.lock("store.lock", true)?;
        let _index = self.lock_index()?;
        self.gc_locked(in_use_chain_ids, GcReport::default())
    }

    /// Remove dangling (untagged) images not in `in_use_image_ids`, then `gc`.
    pub fn prune(
        &self,
        in_use_image_ids: &[String],
        in_use_chain_ids: &[String],
    ) -> Result<GcReport, ImageError> {
        self.prune_images(false, in_use_image_ids, in_use_chain_ids)
    }

    /// Remove the images not in `in_use_image_ids` — dangling ones, or with `all` tagged ones
    /// too (`system prune -a`) — then `gc`.
    pub fn prune_images(
        &self,
        all: bool,
        in_use_image_ids: &[String],
        in_use_chain_ids: &[String],
    ) -> Result<GcReport, ImageError> {
        let _store = self.lock("store.lock", true)?;
        let _index = self.lock_index()?;
        let mut report = GcReport::default();
        let stored = self.stored()?;
        let doomed: BTreeSet<String> = stored
            .iter()
            .filter(|s| (all || s.tags.is_empty()) && !in_use_image_ids.contains(&s.config_digest))
            .map(|s| s.manifest_digest.clone())
            .collect();
        if !doomed.is_empty() {
            let mut entries = self.read_index()?;
            entries.retain(|d| !doomed.contains(d.digest().as_ref()));
            self.write_index(&entries)?;
            report.images_removed = doomed.len();
        }
        self.gc_locked(in_use_chain_ids, report)
    }

    fn gc_locked(
        &self,
        in_use_chain_ids: &[String],
        mut report: GcReport,
    ) -> Result<GcReport, ImageError> {
        let mut live_blobs: BTreeSet<String> = BTreeSet::new();
        let mut live_layers: BTreeSet<String> = BTreeSet::new();
        for s in self.stored()? {
            live_blobs.insert(sha256_hex(&s.manifest_digest)?.to_string());
            live_blobs.insert(sha256_hex(&s.config_digest)?.to_string());
            for l in s.manifest.layers() {
                live_blobs.insert(sha256_hex(l.digest().as_ref())?.to_string());
            }
            for c in chain_ids(s.config.rootfs().diff_ids()) {
                live_layers.insert(sha256_hex(&c)?.to_string());
            }
        }
        for c in in_use_chain_ids {
            live_layers.insert(c.strip_prefix("sha256:").unwrap_or(c).to_string());
        }
        live_layers.extend(self.mounted_layers());

        for entry in read_dir(&self.blobs)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if live_blobs.contains(&name) {
                continue;
            }
            let size = entry.metadata().map_or(0, |m| m.len());
            fs::remove_file(entry.path())
                .map_err(|e| ImageError::io(format!("remove blob {name}"), e))?;
            report.blobs_removed += 1;
            report.blob_bytes_freed += size;
        }
        for entry in read_dir(&self.layers)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if live_layers.contains(&name) {
                continue;
            }
            let is_layer = sha256_hex(&format!("sha256:{name}")).is_ok();
            fs::remove_dir_all(entry.path())
                .map_err(|e| ImageError::io(format!("remove layer {name}"), e))?;
            if is_layer {
                report.layers_removed += 1;
            }
        }
        // Writers hold the store lock shared, so with it exclusive every temp entry is stale.
        for entry in read_dir(&self.tmp)? {
            let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
        }
        for entry in read_dir(&self.images)? {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".index.json.tmp-")
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(report)
    }

    /// Chain hexes of layers some overlay mount on this host uses as a lower, in any mount
    /// namespace: a safety net so gc never pulls a layer from under a running container.
    fn mounted_layers(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let prefix = format!("{}/", self.layers.display());
        let mut seen_ns: BTreeSet<PathBuf> = BTreeSet::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return out;
        };
        for p in procs.flatten() {
            let pid = p.file_name();
            if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(ns) = fs::read_link(p.path().join("ns/mnt")) else {
                continue;
            };
            if !seen_ns.insert(ns) {
                continue;
            }
            let Ok(info) = fs::read_to_string(p.path().join("mountinfo")) else {
                continue;
            };
            for line in info.lines().filter(|l| l.contains(" - overlay ")) {
                for part in line.split([',', ' ', ':', '=']) {
                    if let Some(rest) = part.strip_prefix(prefix.as_str()) {
                        if let Some(hex) = rest.split('/').next() {
                            out.insert(hex.to_string());
                        }
                    }
                }
            }
        }
        out
    }

    fn layer_complete(&self, chain_hex: &str) -> bool {
        self.layers
            .join(chain_hex)
            .join(LAYER_COMPLETE_MARKER)
            .is_file()
    }

    /// Unpack a layer blob into a fresh temp dir under `layers/` and check its diff id.
    /// With `diff_id` None (an import) whatever the content hashes to is accepted. Nothing is
    /// synced: [`ImageStore::store_layers`] does that for all the layers of a load at once.
    fn unpack_to_temp(
        &self,
        blob: &Path,
        diff_id: Option<&str>,
        label: &str,
        allowance: &unpack::Allowance,
    ) -> Result<UnpackedLayer, ImageError> {
        let f =
            File::open(blob).map_err(|e| ImageError::io(format!("open {}", blob.display()), e))?;
        let l = unpack_into(&self.layers, f, label, allowance)?;
        check_diff_id(label, diff_id, &l.got)?;
        Ok(l)
    }

    /// Unpack `jobs` (layers with their blobs and diff ids), as many at once as there are
    /// cores; (chain hex, layer) for each. On failure the lowest failed layer's error (what
    /// unpacking them in order would have reported), and nothing left behind.
    fn unpack_all(
        &self,
        jobs: Vec<LayerJob>,
        allowance: &unpack::Allowance,
    ) -> Result<Vec<(String, UnpackedLayer)>, ImageError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let work = || {
            let mut done = Vec::new();
            // Jobs are taken in order, so every job below a failed one was taken and finishes.
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(j) = jobs.get(i) else { break };
                let r = self.unpack_to_temp(&j.blob, Some(&j.diff_id), &j.digest, allowance);
                failed.fetch_or(r.is_err(), Ordering::Relaxed);
                done.push((i, r));
            }
            done
        };
        let threads = unpack_threads().min(jobs.len());
        let mut results: Vec<(usize, Result<UnpackedLayer, ImageError>)> = if threads == 1 {
            work()
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        };
        results.sort_by_key(|(i, _)| *i);
        let mut out = Vec::with_capacity(results.len());
        for (i, r) in results {
            out.push((jobs[i].chain_hex.clone(), r?));
        }
        Ok(out)
    }

    /// One `syncfs` of the file system holding `staging` (blobs staged, archive members) and,
    /// if it is another one, of the one holding `layers/` (layers unpacked).
    fn sync_staged(&self, staging: &Path) -> Result<(), ImageError> {
        let mut devices = Vec::new();
        for dir in [staging, self.layers.as_path()] {
            let f = File::open(dir)
                .map_err(|e| ImageError::io(format!("open {}", dir.display()), e))?;
            let dev = std::os::unix::fs::MetadataExt::dev(
                &f.metadata()
                    .map_err(|e| ImageError::io(format!("stat {}", dir.display()), e))?,
            );
            if devices.contains(&dev) {
                continue;
            }
            devices.push(dev);
            nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f))
                .map_err(|e| ImageError::io(format!("syncfs {}", dir.display()), e.into()))?;
        }
        Ok(())
    }

    /// Mark unpacked layers whole and rename them to `layers/<chain hex>`: their contents are
    /// made durable first (one syncfs for all, unless `synced` says the caller just did),
    /// then each gets its marker, so a layer with a marker is whole; `layers/` is synced last.
    fn store_layers(
        &self,
        layers: Vec<(String, UnpackedLayer)>,
        synced: bool,
    ) -> Result<Vec<PathBuf>, ImageError> {
        if layers.is_empty() {
            return Ok(Vec::new());
        }
        if !synced {
            self.sync_staged(&self.layers)?;
        }
        let mut out = Vec::with_capacity(layers.len());
        for (chain_hex, l) in layers {
            let marker = serde_json::json!({ "diff_id": l.got.diff_id, "size": l.got.size, "skipped_devices": l.got.skipped_devices });
            let path = l.tmp.path.join(LAYER_COMPLETE_MARKER);
            // Durability of the marker itself is not needed: without it a layer is unpacked
            // again from its blob (the contents it vouches for are already on disk).
            fs::write(&path, marker.to_string())
                .map_err(|e| ImageError::io(format!("write {}", path.display()), e))?;
            out.push(self.commit_layer(l.tmp, &chain_hex)?);
        }
        fsync_dir(&self.layers)?;
        Ok(out)
    }

    /// Rename an unpacked temp layer to `layers/<chain_hex>`; a concurrent twin wins quietly.
    /// The caller syncs `layers/`.
    fn commit_layer(&self, mut tmp: TempDir, chain_hex: &str) -> Result<PathBuf, ImageError> {
        let dst = self.layers.join(chain_hex);
        if dst.exists() && !self.layer_complete(chain_hex) {
            // Left by a crash before the marker existed (only possible from an older layout).
            fs::remove_dir_all(&dst)
                .map_err(|e| ImageError::io(format!("remove incomplete {}", dst.display()), e))?;
        }
        match fs::rename(&tmp.path, &dst) {
            Ok(()) => tmp.keep = true,
            Err(_) if self.layer_complete(chain_hex) => {}
            Err(e) => return Err(ImageError::io(format!("store layer {chain_hex}"), e)),
        }
        Ok(dst.join("rootfs"))
    }

    /// Record `tags` (and the image itself) in the index; a tag moves off any other image,
    /// which stays listed as dangling (`<none>`) if it has no tag left.
    fn add_to_index(&self, additions: &[(StagedBlob, Vec<String>)]) -> Result<(), ImageError> {
        let _lock = self.lock_index()?;
        let mut entries = self.read_index()?;
        for (manifest, tags) in additions {
            for tag in tags {
                let mut orphaned: Vec<Descriptor> = Vec::new();
                let before = entries.clone();
                entries.retain(|d| {
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME_ANNOTATION))
                        != Some(tag)
                });
                for d in before
                    .iter()
                    .filter(|d| !entries.iter().any(|e| e.digest() == d.digest()))
                {
                    if d.digest().as_ref() != manifest.digest
                        && !orphaned.iter().any(|o| o.digest() == d.digest())
                    {
                        let mut dangling = d.clone();
                        dangling.set_annotations(None);
                        orphaned.push(dangling);
                    }
                }
                entries.extend(orphaned);
            }
            let mut desc = Descriptor::new(
                MediaType::ImageManifest,
                manifest.size,
                parse_digest(&manifest.digest)?,
            );
            if tags.is_empty() {
                if !entries
                    .iter()
                    .any(|d| d.digest().as_ref() == manifest.digest)
                {
                    entries.push(desc);
                }
                continue;
            }
            // A tagged image needs no dangling entry.
            entries.retain(|d| d.digest().as_ref() != manifest.digest || d.annotations().is_some());
            for tag in tags {
                desc.set_annotations(Some(
                    [(REF_NAME_ANNOTATION.to_string(), tag.clone())]
                        .into_iter()
                        .collect(),
                ));
                entries.push(desc.clone());
            }
        }
        self.write_index(&entries)
    }

    /// Import a rootfs tar (plain or gzip) as a one-layer image tagged `reference`.
    pub fn import_rootfs_tar(&self, tar: &Path, reference: &str) -> Result<ImageInfo, ImageError> {
        let r = Reference::parse(reference)?;
        let meta =
            fs::metadata(tar).map_err(|e| ImageError::io(format!("open {}", tar.display()), e))?;
        if !meta.is_file() {
            return Err(ImageError::Invalid(format!(
                "{} is not a file",
                tar.display()
            )));
        }
        let _store = self.lock_store_shared()?;
        let mut txn = Txn::new(self)?;
        let src = source::SourceFile {
            path: tar.to_path_buf(),
            digest: None,
            size: meta.len(),
        };
        let layer = txn.add_file(&src, None, "rootfs tar")?;
        let compression = {
            let mut f = io::BufReader::new(
                File::open(&layer.path).map_err(|e| ImageError::io("open staged layer", e))?,
            );
            unpack::detect_compression(&mut f)
                .map_err(|e| ImageError::io("read staged layer", e))?
        };
        let media = match compression {
            unpack::Compression::Gzip => MediaType::ImageLayerGzip,
            unpack::Compression::None => MediaType::ImageLayer,
            unpack::Compression::Zstd => MediaType::ImageLayerZstd,
        };
        // The diff id is only known after unpacking, so unpack to temp and read it back.
        let unpacked = self.unpack_to_temp(&layer.path, None, &layer.digest, &txn.allowance)?;
        let diff_id = unpacked.got.diff_id.clone();
        let chain_hex = sha256_hex(&diff_id)?.to_string();
        if !self.layer_complete(&chain_hex) {
            txn.layers.insert(chain_hex, unpacked);
        }
        let created = timefmt::now_rfc3339();
        let build = |e: oci_spec::OciSpecError| json_err("build image config", e);
        let config = ImageConfigurationBuilder::default()
            .created(created.clone())
            .architecture(Arch::default())
            .os(Os::Linux)
            .config(
                ConfigBuilder::default()
                    .env(vec![DEFAULT_PATH_ENV.to_string()])
                    .cmd(vec!["/bin/sh".to_string()])
                    .build()
                    .map_err(build)?,
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![diff_id])
                    .build()
                    .map_err(build)?,
            )
            .history(vec![HistoryBuilder::default()
                .created(created)
                .created_by(format!("shoal image import {}", tar.display()))
                .build()
                .map_err(build)?])
            .build()
            .map_err(build)?;
        let config_bytes =
            serde_json::to_vec(&config).map_err(|e| json_err("serialise config", e))?;
        let config_blob = txn.add_bytes(&config_bytes)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_blob.size,
                parse_digest(&config_blob.digest)?,
            ))
            .layers(vec![Descriptor::new(
                media,
                layer.size,
                parse_digest(&layer.digest)?,
            )])
            .build()
            .map_err(|e| json_err("build manifest", e))?;
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| json_err("serialise manifest", e))?;
        let manifest_blob = txn.add_bytes(&manifest_bytes)?;
        txn.commit()?;
        self.add_to_index(&[(manifest_blob, vec![r.to_string()])])?;
        self.inspect(&r.to_string())
    }

    /// Load every image from an OCI layout directory or archive, or a `docker save` archive.
    pub fn load(&self, path: &Path) -> Result<Vec<ImageInfo>, ImageError> {
        self.load_with(path, false)
    }

    /// [`ImageStore::load`] of an OCI layout directory the store may take its blobs from (a
    /// pull's download, on the data dir's file system): they are moved in, not copied, so the
    /// directory is left without them.
    pub fn load_consuming(&self, dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
        self.load_with(dir, true)
    }

    fn load_with(&self, path: &Path, consume: bool) -> Result<Vec<ImageInfo>, ImageError> {
        let _store = self.lock_store_shared()?;
        let mut txn = Txn::new(self)?;
        txn.consume = consume && path.is_dir();
        let src = source::Source::open(path, &txn.staging.path)?;
        self.load_source(txn, &src)
    }

    /// A pull's way in: blobs written straight into the store's staging through
    /// [`BlobWriter`]s (each hashed as it is written: the one check of its digest), layers
    /// unpacked while they download. [`ImageStore::load_ingest`] stores the image; dropped
    /// without that, nothing is left behind. Holds the store lock (shared) until then.
    pub fn ingest(&self) -> Result<Ingest, ImageError> {
        let lock = self.lock_store_shared()?;
        let staging = TempDir::new(self.tmp.join(format!("ingest-{}", unique())))?;
        Ok(Ingest {
            shared: Arc::new(IngestShared {
                staging: staging.path.clone(),
                layers: self.layers.clone(),
                counter: AtomicU64::new(0),
                members: Mutex::new(HashMap::new()),
                unpacks: Mutex::new((false, Vec::new())),
                slots: Slots::new(unpack_threads()),
                allowance: unpack::Allowance::new(self.budget),
            }),
            staging: Some(staging),
            _lock: lock,
        })
    }

    /// [`ImageStore::load`] of what `ingest` received (an OCI layout: `oci-layout`,
    /// `index.json`, `blobs/sha256/…`): the same checks of manifests, configs, sizes and
    /// diff ids; blobs are not hashed again (their writers did, in the store's own staging),
    /// and layers unpacked during the download are taken if their diff ids match.
    pub fn load_ingest(&self, mut ingest: Ingest) -> Result<Vec<ImageInfo>, ImageError> {
        let staging = match ingest.staging.take() {
            Some(st) if st.path.starts_with(&self.tmp) => st,
            other => {
                ingest.staging = other;
                return Err(ImageError::Invalid(
                    "an ingest of another image store".into(),
                ));
            }
        };
        let streamed = ingest.shared.close();
        let members = std::mem::take(
            &mut *ingest
                .shared
                .members
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let mut txn = Txn::with_staging(self, staging);
        txn.allowance = ingest.shared.allowance.clone();
        // Only layers unpacked from blobs whose digest checked out.
        txn.streamed = streamed
            .into_iter()
            .filter(|(d, _)| {
                sha256_hex(d).is_ok_and(|h| {
                    members
                        .get(&format!("blobs/sha256/{h}"))
                        .is_some_and(|f| f.digest.as_deref() == Some(d.as_str()))
                })
            })
            .collect();
        let src = source::Source::Archive(members);
        let out = self.load_source(txn, &src);
        drop(ingest);
        out
    }

    /// Stage every image `src` holds into `txn`, commit, record them in the index.
    fn load_source(
        &self,
        mut txn: Txn<'_>,
        src: &source::Source,
    ) -> Result<Vec<ImageInfo>, ImageError> {
        let candidates = Self::candidates(src)?;
        if candidates.is_empty() {
            return Err(ImageError::Invalid("the archive holds no image".into()));
        }
        if candidates.len() > MAX_IMAGES_PER_LOAD {
            return Err(ImageError::TooLarge {
                what: "images in one load".into(),
                limit: MAX_IMAGES_PER_LOAD as u64,
            });
        }
        let mut additions = Vec::new();
        for c in candidates {
            let manifest_blob = match c.manifest {
                ManifestSource::Oci { digest, size } => {
                    self.stage_oci(&mut txn, src, &digest, size)?
                }
                ManifestSource::DockerLegacy { config, layers } => {
                    self.stage_docker(&mut txn, src, &config, &layers)?
                }
            };
            additions.push((manifest_blob, c.tags));
        }
        txn.commit()?;
        self.add_to_index(&additions)?;
        let stored = self.stored()?;
        let mut out = Vec::new();
        for (m, _) in &additions {
            if let Some(s) = stored.iter().find(|s| s.manifest_digest == m.digest) {
                if !out
                    .iter()
                    .any(|i: &ImageInfo| i.manifest_digest == m.digest)
                {
                    out.push(Self::info(s));
                }
            }
        }
        Ok(out)
    }

    /// The images a source holds, with their tags.
    fn candidates(src: &source::Source) -> Result<Vec<Candidate>, ImageError> {
        if let (Some(_), Some(bytes)) = (src.get("oci-layout")?, src.read_small("index.json")?) {
            let index: ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| json_err("index.json", e))?;
            let mut out = Vec::new();
            for d in index.manifests() {
                let ann = d.annotations().clone().unwrap_or_default();
                let name = ann
                    .get(CONTAINERD_NAME_ANNOTATION)
                    .or_else(|| ann.get(REF_NAME_ANNOTATION));
                let tags = match name {
                    Some(n) => vec![Reference::parse(n)?.to_string()],
                    None => Vec::new(),
                };
                let (digest, size) = Self::pick_manifest(src, d, 0)?;
                out.push(Candidate {
                    tags,
                    manifest: ManifestSource::Oci { digest, size },
                });
            }
            return Ok(out);
        }
        if let Some(bytes) = src.read_small("manifest.json")? {
            let entries: Vec<DockerSaveEntry> =
                serde_json::from_slice(&bytes).map_err(|e| json_err("manifest.json", e))?;
            let mut out = Vec::new();
            for e in entries {
                let mut tags = Vec::new();
                for t in e.repo_tags.unwrap_or_default() {
                    tags.push(Reference::parse(&t)?.to_string());
                }
                out.push(Candidate {
                    tags,
                    manifest: ManifestSource::DockerLegacy {
                        config: e.config,
                        layers: e.layers,
                    },
                });
            }
            return Ok(out);
        }
        Err(ImageError::Invalid(
            "not an OCI image layout or docker save archive (no oci-layout + index.json, no manifest.json)".into(),
        ))
    }

    /// Follow nested indexes to the manifest for this platform.
    fn pick_manifest(
        src: &source::Source,
        d: &Descriptor,
        depth: usize,
    ) -> Result<(String, u64), ImageError> {
        let digest = d.digest().to_string();
        let is_index = matches!(d.media_type(), MediaType::ImageIndex)
            || d.media_type().to_string() == DOCKER_MANIFEST_LIST;
        if !is_index {
            return Ok((digest, d.size()));
        }
        if depth >= MAX_INDEX_DEPTH {
            return Err(ImageError::TooLarge {
                what: "image index nesting".into(),
                limit: MAX_INDEX_DEPTH as u64,
            });
        }
        let bytes = Self::read_verified(src, &digest, d.size(), "image index")?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| json_err("image index", e))?;
        let arch = Arch::default();
        let chosen = index
            .manifests()
            .iter()
            .find(|m| {
                m.platform()
                    .as_ref()
                    .is_some_and(|p| *p.architecture() == arch && *p.os() == Os::Linux)
            })
            .or_else(|| index.manifests().iter().find(|m| m.platform().is_none()))
            .ok_or_else(|| {
                ImageError::Unsupported(format!(
                    "image index {digest} has no linux/{arch} manifest"
                ))
            })?;
        Self::pick_manifest(src, chosen, depth + 1)
    }

    /// Read a small blob from the source and check it against its descriptor.
    fn read_verified(
        src: &source::Source,
        digest: &str,
        size: u64,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let hex = sha256_hex(digest)?;
        let bytes = src
            .read_small(&format!("blobs/sha256/{hex}"))?
            .ok_or_else(|| ImageError::Invalid(format!("{what} blob {digest} is missing")))?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        if bytes.len() as u64 != size {
            return Err(ImageError::SizeMismatch {
                what: what.to_string(),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    fn check_layers(
        config: &ImageConfiguration,
        layer_count: usize,
    ) -> Result<Vec<String>, ImageError> {
        let diff_ids = config.rootfs().diff_ids().clone();
        if layer_count == 0 {
            return Err(ImageError::Invalid("image has no layers".into()));
        }
        if layer_count > MAX_LAYERS {
            return Err(ImageError::TooLarge {
                what: "layer count".into(),
                limit: MAX_LAYERS as u64,
            });
        }
        if diff_ids.len() != layer_count {
            return Err(ImageError::Invalid(format!(
                "config lists {} diff ids for {layer_count} layers",
                diff_ids.len()
            )));
        }
        for d in &diff_ids {
            sha256_hex(d)?;
        }
        Ok(diff_ids)
    }

    /// Stage an OCI manifest, its config and its layers; returns the manifest blob.
    fn stage_oci(
        &self,
        txn: &mut Txn<'_>,
        src: &source::Source,
        digest: &str,
        size: u64,
    ) -> Result<StagedBlob, ImageError> {
        let bytes = Self::read_verified(src, digest, size, "manifest")?;
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| json_err("manifest", e))?;
        let mt = manifest.media_type().as_ref().map(|m| m.to_string());
        if let Some(mt) =
            mt.filter(|m| m != &MediaType::ImageManifest.to_string() && m != DOCKER_MANIFEST_V2)
        {
            return Err(ImageError::Unsupported(format!("manifest media type {mt}")));
        }
        let cd = manifest.config();
        let config_bytes =
            Self::read_verified(src, cd.digest().as_ref(), cd.size(), "image config")?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| json_err("image config", e))?;
        let diff_ids = Self::check_layers(&config, manifest.layers().len())?;
        let chains = chain_ids(&diff_ids);
        for (i, l) in manifest.layers().iter().enumerate() {
            let hex = sha256_hex(l.digest().as_ref())?;
            let what = format!("layer {}", &hex[..12]);
            let file = src.get(&format!("blobs/sha256/{hex}"))?.ok_or_else(|| {
                ImageError::Invalid(format!("layer blob {} is missing", l.digest()))
            })?;
            let blob = txn.add_file(&file, Some((l.digest().as_ref(), l.size())), &what)?;
            txn.add_layer(&blob, &diff_ids[i], &chains[i])?;
        }
        txn.add_bytes(&config_bytes)?;
        txn.add_bytes(&bytes)
    }

    /// Stage a legacy `docker save` image, building an OCI manifest for it.
    fn stage_docker(
        &self,
        txn: &mut Txn<'_>,
        src: &source::Source,
        config: &str,
        layers: &[String],
    ) -> Result<StagedBlob, ImageError> {
        let config_bytes = src.read_small(config)?.ok_or_else(|| {
            ImageError::Invalid(format!("config {config} is missing from the archive"))
        })?;
        let config_digest = sha256_digest(&config_bytes);
        // The config file is named by its digest (`<hex>.json` or `blobs/sha256/<hex>`).
        let named = config
            .rsplit('/')
            .next()
            .unwrap_or(config)
            .trim_end_matches(".json");
        if named.len() == 64 && format!("sha256:{named}") != config_digest {
            return Err(ImageError::DigestMismatch {
                what: format!("config {config}"),
                expected: format!("sha256:{named}"),
                actual: config_digest,
            });
        }
        let parsed: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| json_err("image config", e))?;
        let diff_ids = Self::check_layers(&parsed, layers.len())?;
        let chains = chain_ids(&diff_ids);
        let mut descs = Vec::with_capacity(layers.len());
        for (i, name) in layers.iter().enumerate() {
            let file = src.get(name)?.ok_or_else(|| {
                ImageError::Invalid(format!("layer {name} is missing from the archive"))
            })?;
            // A blobs/sha256/<hex> member (Docker ≥ 25) is named by its digest: check it.
            let expected = name
                .strip_prefix("blobs/sha256/")
                .map(|h| (format!("sha256:{h}"), file.size));
            let blob = txn.add_file(
                &file,
                expected.as_ref().map(|(d, s)| (d.as_str(), *s)),
                &format!("layer {name}"),
            )?;
            txn.add_layer(&blob, &diff_ids[i], &chains[i])?;
            let mut head = io::BufReader::new(
                File::open(&blob.path).map_err(|e| ImageError::io("open staged layer", e))?,
            );
            let media = match unpack::detect_compression(&mut head)
                .map_err(|e| ImageError::io("read staged layer", e))?
            {
                unpack::Compression::Gzip => MediaType::ImageLayerGzip,
                _ => MediaType::ImageLayer,
            };
            descs.push(Descriptor::new(
                media,
                blob.size,
                parse_digest(&blob.digest)?,
            ));
        }
        let config_blob = txn.add_bytes(&config_bytes)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_blob.size,
                parse_digest(&config_blob.digest)?,
            ))
            .layers(descs)
            .build()
            .map_err(|e| json_err("build manifest", e))?;
        let bytes = serde_json::to_vec(&manifest).map_err(|e| json_err("serialise manifest", e))?;
        txn.add_bytes(&bytes)
    }

    /// Unpack (once, by chain id) every layer and return the dirs, lowest layer first, plus the
    /// image config (env, cmd, entrypoint, workdir, user) for the spec generator.
    pub fn prepare(&self, reference: &str) -> Result<PreparedImage, ImageError> {
        let _store = self.lock_store_shared()?;
        let (s, _) = self.resolve(reference, self.stored()?)?;
        let info = Self::info(&s);
        let diff_ids = Self::check_layers(&s.config, s.manifest.layers().len())?;
        let mut layer_dirs = Vec::with_capacity(diff_ids.len());
        let mut jobs = Vec::new();
        for (i, chain) in info.chain_ids.iter().enumerate() {
            let hex = sha256_hex(chain)?;
            layer_dirs.push(self.layers.join(hex).join("rootfs"));
            if self.layer_complete(hex) || jobs.iter().any(|j: &LayerJob| j.chain_hex == hex) {
                continue;
            }
            // Unpacked layers are disposable (gc, a crash before the marker): redo from the blob.
            let layer = &s.manifest.layers()[i];
            jobs.push(LayerJob {
                blob: self.blob_path(layer.digest().as_ref())?,
                digest: layer.digest().to_string(),
                diff_id: diff_ids[i].clone(),
                chain_hex: hex.to_string(),
            });
        }
        let unpacked = self.unpack_all(jobs, &unpack::Allowance::new(self.budget))?;
        self.store_layers(unpacked, false)?;
        let healthcheck = self
            .read_blob_json::<RawConfigExtras>(&s.config_digest, "image config")
            .map(RawConfigExtras::healthcheck)?;
        Ok(PreparedImage {
            chain_ids: info.chain_ids.clone(),
            info,
            layer_dirs,
            config: s.config,
            healthcheck,
        })
    }
}

/// A pull in progress (see [`ImageStore::ingest`]).
pub struct Ingest {
    shared: Arc<IngestShared>,
    staging: Option<TempDir>,
    _lock: File,
}

/// What the writers of one [`Ingest`] share; cloned into download tasks.
#[derive(Clone)]
pub struct IngestHandle(Arc<IngestShared>);

struct IngestShared {
    staging: PathBuf,
    layers: PathBuf,
    counter: AtomicU64,
    /// The layout as received, by member name: small files, and blobs whose digest and size
    /// their writer checked.
    members: Mutex<HashMap<String, source::SourceFile>>,
    /// (closed, streaming unpacks): once closed, no writer may start another.
    unpacks: Mutex<(bool, Vec<StreamedUnpack>)>,
    slots: Slots,
    /// What the pull's layers may unpack, together (while downloading and at commit).
    allowance: Arc<unpack::Allowance>,
}

/// A layer being unpacked by its own thread as its blob arrives.
struct StreamedUnpack {
    digest: String,
    tail: Arc<unpack::Tail>,
    thread: std::thread::JoinHandle<Result<UnpackedLayer, ImageError>>,
}

impl IngestShared {
    /// Closes the ingest to new unpacks and hands over the ones started.
    fn take_unpacks(&self) -> Vec<StreamedUnpack> {
        let mut u = self.unpacks.lock().unwrap_or_else(|e| e.into_inner());
        u.0 = true;
        std::mem::take(&mut u.1)
    }

    /// No more unpacks: waits for the running ones (those of blobs not finished are stopped);
    /// the layers of those that succeeded, by blob digest.
    fn close(&self) -> HashMap<String, UnpackedLayer> {
        let all = self.take_unpacks();
        for u in &all {
            u.tail.stop_unless_done();
        }
        let mut out = HashMap::new();
        for u in all {
            if let Ok(Ok(l)) = u.thread.join() {
                out.entry(u.digest).or_insert(l);
            }
        }
        out
    }

    /// Stops every streaming unpack and waits for them (their temp dirs go with them).
    fn abort(&self) {
        let all = self.take_unpacks();
        for u in &all {
            u.tail.stop();
        }
        for u in all {
            let _ = u.thread.join();
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.shared.abort();
    }
}

impl Ingest {
    /// A handle for the download tasks (writers made from it after [`ImageStore::load_ingest`]
    /// or a drop fail).
    pub fn handle(&self) -> IngestHandle {
        IngestHandle(self.shared.clone())
    }
}

impl IngestHandle {
    /// A new file in the staging dir; its prefixes (`pulled-…`) are never those of the
    /// transaction's own files (`blob-N`), which share the directory later.
    fn next_path(&self, prefix: &str) -> PathBuf {
        let n = self.0.counter.fetch_add(1, Ordering::Relaxed);
        self.0.staging.join(format!("{prefix}-{n}"))
    }

    /// Adds a small file of the layout (`oci-layout`, `index.json`, a manifest as
    /// `blobs/sha256/<hex>`), hashed here.
    pub fn add_file(&self, name: &str, bytes: &[u8]) -> Result<(), ImageError> {
        let path = self.next_path("pulled-file");
        fs::write(&path, bytes)
            .map_err(|e| ImageError::io(format!("write {}", path.display()), e))?;
        let f = source::SourceFile {
            path,
            digest: Some(sha256_digest(bytes)),
            size: bytes.len() as u64,
        };
        self.0
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), f);
        Ok(())
    }

    /// A writer for the blob `digest` of `size` bytes. For a layer, `chain_id` (what the
    /// image's config says it is; only a hint) has it unpacked while it arrives, as soon as a
    /// core is free, unless the store already holds that layer unpacked.
    pub fn blob(
        &self,
        digest: &str,
        size: u64,
        chain_id: Option<&str>,
    ) -> Result<BlobWriter, ImageError> {
        sha256_hex(digest)?;
        let path = self.next_path("pulled-blob");
        let file = File::create(&path)
            .map_err(|e| ImageError::io(format!("create {}", path.display()), e))?;
        let mut w = BlobWriter {
            file,
            path,
            digest: digest.to_string(),
            size,
            hasher: Sha256::new(),
            written: 0,
            kicked: 0,
            tail: None,
            finished: false,
            shared: self.0.clone(),
        };
        let wanted = chain_id
            .and_then(|c| sha256_hex(c).ok())
            .is_some_and(|h| !self.0.layers.join(h).join(LAYER_COMPLETE_MARKER).is_file());
        if !wanted {
            return Ok(w);
        }
        let mut unpacks = self.0.unpacks.lock().unwrap_or_else(|e| e.into_inner());
        if unpacks.0 {
            return Err(ImageError::Invalid("the pull is over".into()));
        }
        let input = File::open(&w.path)
            .map_err(|e| ImageError::io(format!("open {}", w.path.display()), e))?;
        let tail = Arc::new(unpack::Tail::default());
        let (shared, reader_tail, label) = (self.0.clone(), tail.clone(), digest.to_string());
        let thread = std::thread::Builder::new()
            .name("layer-unpack".into())
            .spawn(move || {
                let _slot = shared.slots.take();
                unpack_into(
                    &shared.layers,
                    unpack::TailReader::new(input, reader_tail),
                    &label,
                    &shared.allowance,
                )
            })
            .map_err(|e| ImageError::io("start an unpacking thread", e))?;
        unpacks.1.push(StreamedUnpack {
            digest: digest.to_string(),
            tail: tail.clone(),
            thread,
        });
        w.tail = Some(tail);
        Ok(w)
    }
}

/// Writes one blob of a pull into the store's staging, hashing it; a layer's unpacking
/// follows the bytes written. Dropped unfinished, the blob is not part of the pull.
pub struct BlobWriter {
    file: File,
    path: PathBuf,
    digest: String,
    size: u64,
    hasher: Sha256,
    written: u64,
    /// `written` when writeback was last started.
    kicked: u64,
    tail: Option<Arc<unpack::Tail>>,
    finished: bool,
    shared: Arc<IngestShared>,
}

/// A blob being written has its writeback started every this many bytes.
const BLOB_WRITEBACK_EVERY: u64 = 8 << 20;

impl BlobWriter {
    /// Appends `bytes`; refuses to go past the size the manifest gave.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(ImageError::TooLarge {
                what: format!("blob {}", self.digest),
                limit: self.size,
            });
        }
        self.file
            .write_all(bytes)
            .map_err(|e| ImageError::io(format!("write {}", self.path.display()), e))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        if let Some(t) = &self.tail {
            t.wrote(self.written);
        }
        if self.written - self.kicked >= BLOB_WRITEBACK_EVERY {
            unpack::start_writeback(&self.file);
            self.kicked = self.written;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Starts the blob over (the registry sent all of it again); a layer is then unpacked
    /// from the finished blob instead of while it arrives.
    pub fn restart(&mut self) -> Result<(), ImageError> {
        if let Some(t) = self.tail.take() {
            t.stop();
        }
        self.file
            .set_len(0)
            .and_then(|()| io::Seek::rewind(&mut self.file))
            .map_err(|e| ImageError::io(format!("truncate {}", self.path.display()), e))?;
        self.hasher = Sha256::new();
        self.written = 0;
        self.kicked = 0;
        Ok(())
    }

    /// The blob is complete: its size and digest are checked, and only then is it part of the
    /// pull (and a layer unpacked from it usable).
    pub fn finish(mut self) -> Result<(), ImageError> {
        if self.written != self.size {
            return Err(ImageError::SizeMismatch {
                what: format!("blob {}", self.digest),
                expected: self.size,
                actual: self.written,
            });
        }
        let actual = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        if actual != self.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {}", self.digest),
                expected: self.digest.clone(),
                actual,
            });
        }
        if let Some(t) = &self.tail {
            t.done();
        }
        self.finished = true;
        let hex = sha256_hex(&self.digest)?.to_string();
        let f = source::SourceFile {
            path: self.path.clone(),
            digest: Some(self.digest.clone()),
            size: self.size,
        };
        self.shared
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(format!("blobs/sha256/{hex}"), f);
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(t) = &self.tail {
                t.stop();
            }
        }
    }
}

/// Turns for streaming unpacks, first come first served, so that no more run at once than
/// there are cores.
struct Slots {
    /// (free, next ticket to admit, next ticket to hand out).
    state: Mutex<(usize, u64, u64)>,
    changed: Condvar,
}

/// A turn taken; given back when dropped.
struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            state: Mutex::new((n, 0, 0)),
            changed: Condvar::new(),
        }
    }

    fn take(&self) -> Slot<'_> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = st.2;
        st.2 += 1;
        while !(st.1 == ticket && st.0 > 0) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.1 += 1;
        st.0 -= 1;
        self.changed.notify_all();
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += 1;
        self.0.changed.notify_all();
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, ImageError> {
    fs::read_dir(dir)
        .and_then(|it| it.collect::<io::Result<Vec<_>>>())
        .map_err(|e| ImageError::io(format!("read {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha256_digest(format!("{a} {b}").as_bytes()));
    }

    /// A gzip layer holding `etc/motd` with `text`: (blob, diff id).
    fn gzip_layer(text: &str) -> (Vec<u8>, String) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/motd", text.as_bytes()).unwrap();
        // Something large and incompressible, so the layer arrives in many writes.
        let mut big = vec![0u8; 3 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for c in big.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(big.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "data/big", &big[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        (gz.finish().unwrap(), sha256_digest(&tar))
    }

    /// Manifest and config of a one-layer image.
    fn one_layer_image(layer: &[u8], diff_id: &str) -> (Vec<u8>, Vec<u8>) {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": Arch::default().to_string(), "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256_digest(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha256_digest(layer), "size": layer.len()}],
        }))
        .unwrap();
        (manifest, config)
    }

    /// Writes `bytes` through a writer of `h`, in pieces of `piece` bytes.
    fn write_blob(
        h: &IngestHandle,
        bytes: &[u8],
        chain: Option<&str>,
        piece: usize,
    ) -> Result<(), ImageError> {
        let mut w = h.blob(&sha256_digest(bytes), bytes.len() as u64, chain)?;
        for c in bytes.chunks(piece) {
            w.write(c)?;
        }
        w.finish()
    }

    fn leftovers(data: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for dir in [data.join("layers"), data.join("images/.shoal/tmp")] {
            for e in fs::read_dir(&dir).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || dir.ends_with("tmp") {
                    out.push(name);
                }
            }
        }
        out
    }

    #[test]
    fn a_pull_s_ingest_unpacks_layers_as_they_arrive_and_loads_the_image() {
        let data = tempfile::tempdir().unwrap();
        let store = ImageStore::open(data.path()).unwrap();
        let (layer, diff_id) = gzip_layer("streamed\n");
        let (manifest, config) = one_layer_image(&layer, &diff_id);
        let ingest = store.ingest().unwrap();
        let h = ingest.handle();
        let md = sha256_digest(&manifest);
        h.add_file(&format!("blobs/sha256/{}", &md[7..]), &manifest)
            .unwrap();
        write_blob(&h, &config, None, 1 << 20).unwrap();
        // Small writes: the unpacking thread keeps waiting for more.
        write_blob(&h, &layer, Some(&diff_id), 1000).unwrap();
        h.add_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
            .unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
            "size": manifest.len(),
            "annotations": {REF_NAME_ANNOTATION: "streamed:1"}}]});
        h.add_file("index.json", index.to_string().as_bytes())
            .unwrap();
        let got = store.load_ingest(ingest).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].repo_tags, vec!["streamed:1".to_string()]);
        let p = store.prepare("streamed:1").unwrap();
        assert_eq!(
            fs::read_to_string(p.layer_dirs[0].join("etc/motd")).unwrap(),
            "streamed\n"
        );
        assert!(
            leftovers(data.path()).is_empty(),
            "{:?}",
            leftovers(data.path())
        );
        // After the load the handle takes nothing more.
        let elsewhere = sha256_digest(b"another chain");
        assert!(h.blob(&sha256_digest(b"x"), 1, Some(&elsewhere)).is_err());
    }

    #[test]
    fn a_pull_s_bad_or_unfinished_blobs_leave_nothing() {
        let data = tempfile::tempdir().unwrap();
        let store = ImageStore::open(data.path()).unwrap();
        let (layer, diff_id) = gzip_layer("bad\n");
        // Other bytes than the digest names: refused when finished.
        let ingest = store.ingest().unwrap();
        let h = ingest.handle();
        let mut w = h
            .blob(&sha256_digest(b"other"), layer.len() as u64, Some(&diff_id))
            .unwrap();
        w.write(&layer).unwrap();
        assert!(matches!(w.finish(), Err(ImageError::DigestMismatch { .. })));
        // More than the size given: refused as it arrives.
        let mut w = h.blob(&sha256_digest(&layer), 10, Some(&diff_id)).unwrap();
        assert!(w.write(&layer).is_err());
        // Half a layer, then the pull gives up.
        let mut w = h
            .blob(&sha256_digest(&layer), layer.len() as u64, Some(&diff_id))
            .unwrap();
        w.write(&layer[..layer.len() / 2]).unwrap();
        drop(ingest);
        drop(w);
        assert!(
            leftovers(data.path()).is_empty(),
            "{:?}",
            leftovers(data.path())
        );
        // A layer whose content is not the config's diff id: the load fails, nothing stays.
        let (manifest, config) = one_layer_image(&layer, &sha256_digest(b"not it"));
        let ingest = store.ingest().unwrap();
        let h = ingest.handle();
        let md = sha256_digest(&manifest);
        h.add_file(&format!("blobs/sha256/{}", &md[7..]), &manifest)
            .unwrap();
        write_blob(&h, &config, None, 1 << 20).unwrap();
        write_blob(&h, &layer, Some(&diff_id), 1 << 20).unwrap();
        h.add_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
            .unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
            "size": manifest.len()}]});
        h.add_file("index.json", index.to_string().as_bytes())
            .unwrap();
        assert!(matches!(
            store.load_ingest(ingest),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(store.list().unwrap().is_empty());
        assert!(
            leftovers(data.path()).is_empty(),
            "{:?}",
            leftovers(data.path())
        );
    }

    #[test]
    fn sha256_hex_refuses_other_forms() {
        assert!(sha256_hex(&format!("sha256:{}", "0".repeat(64))).is_ok());
        for bad in [
            "sha256:abc",
            "sha512:00",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:../{}", "0".repeat(61)),
        ] {
            assert!(sha256_hex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_healthcheck_is_read_from_the_raw_config() {
        let raw =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
            "config":{"Cmd":["sh"],"Healthcheck":{"Test":["CMD-SHELL","true"],
            "Interval":5000000000,"Retries":2}}}"#;
        let x: RawConfigExtras = serde_json::from_slice(raw).unwrap();
        let h = x.healthcheck().unwrap();
        assert_eq!(h.test, vec!["CMD-SHELL", "true"]);
        assert_eq!((h.interval, h.timeout, h.retries), (5_000_000_000, 0, 2));
        // None, and a malformed one, read as no health check at all.
        let none: RawConfigExtras =
            serde_json::from_slice(br#"{"config":{"Cmd":["sh"]}}"#).unwrap();
        assert_eq!(none.healthcheck(), None);
        let bad: RawConfigExtras =
            serde_json::from_slice(br#"{"config":{"Healthcheck":{"Test":"x","Retries":"y"}}}"#)
                .unwrap();
        assert_eq!(bad.healthcheck(), None);
    }
}
