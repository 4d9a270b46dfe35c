//! The node-local image store: an OCI image layout under `<data_dir>/images` (blobs, `index.json`
//! with `name:tag` in `org.opencontainers.image.ref.name`) and every layer unpacked once, by
//! chain id, under `<data_dir>/layers/<chain-id-hex>/rootfs` in overlayfs form.
//!
//! Crash and concurrency rules:
//! - blobs and layers are staged in temp files/dirs on the same filesystem, fsynced, then
//!   renamed into place; a layer directory is used only when its `complete` marker (written
//!   last, after syncfs) exists;
//! - `index.json` is rewritten with temp + fsync + rename under an exclusive flock
//!   (`images/.shoal/index.lock`), so concurrent `shoal` processes never lose each other's tags;
//! - writers (import, load, prepare) hold `images/.shoal/store.lock` shared for their whole
//!   run and `gc` holds it exclusive, so gc never deletes what a writer is about to reference.

pub mod reference;
mod source;
mod timefmt;
mod unpack;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, Os, RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use reference::Reference;
pub use source::MAX_ARCHIVE_ENTRIES;
pub use timefmt::parse_rfc3339;
pub use unpack::MAX_LAYER_ENTRIES;

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

/// One load/import in progress: staged blobs and unpacked layers, committed together.
struct Txn<'a> {
    store: &'a ImageStore,
    staging: TempDir,
    blobs: BTreeMap<String, StagedBlob>,
    layers: BTreeMap<String, TempDir>,
    counter: u64,
    /// The source directory's files are the store's to take (a pull's download): blobs are
    /// hashed in place and renamed into staging instead of copied.
    consume: bool,
}

impl<'a> Txn<'a> {
    fn new(store: &'a ImageStore) -> Result<Txn<'a>, ImageError> {
        let staging = TempDir::new(store.tmp.join(format!("txn-{}", unique())))?;
        Ok(Txn {
            store,
            staging,
            blobs: BTreeMap::new(),
            layers: BTreeMap::new(),
            counter: 0,
            consume: false,
        })
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
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
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
                moved
                    .and_then(|()| File::open(&path)?.sync_all())
                    .map_err(|e| ImageError::io(format!("move {}", src.path.display()), e))?;
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
                let (digest, size) = hashing
                    .finish()
                    .map_err(|e| ImageError::io(format!("read {}", src.path.display()), e))?;
                out.sync_all()
                    .map_err(|e| ImageError::io(format!("sync {}", path.display()), e))?;
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

    /// Unpack a staged layer blob unless its chain is already unpacked; check its diff id.
    fn add_layer(
        &mut self,
        blob: &StagedBlob,
        diff_id: &str,
        chain_id: &str,
    ) -> Result<(), ImageError> {
        let chain_hex = sha256_hex(chain_id)?.to_string();
        if self.layers.contains_key(&chain_hex) || self.store.layer_complete(&chain_hex) {
            return Ok(());
        }
        let (tmp, _) = self
            .store
            .unpack_to_temp(&blob.path, Some(diff_id), &blob.digest)?;
        self.layers.insert(chain_hex, tmp);
        Ok(())
    }

    /// Move everything into the store: blobs, then layers; the index is the caller's last step.
    fn commit(mut self) -> Result<(), ImageError> {
        for b in self.blobs.values() {
            let dst = self.store.blob_path(&b.digest)?;
            if dst.exists() {
                continue;
            }
            fs::rename(&b.path, &dst)
                .map_err(|e| ImageError::io(format!("store blob {}", b.digest), e))?;
        }
        fsync_dir(&self.store.blobs)?;
        for (chain_hex, tmp) in std::mem::take(&mut self.layers) {
            self.store.commit_layer(tmp, &chain_hex)?;
        }
        Ok(())
    }
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
        fs::create_dir_all(data_dir)
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
        };
        for d in [&store.blobs, &store.layers, &store.tmp] {
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
        let _store = self.lock("store.lock", true)?;
        let _index = self.lock_index()?;
        let mut report = GcReport::default();
        let stored = self.stored()?;
        let doomed: BTreeSet<String> = stored
            .iter()
            .filter(|s| s.tags.is_empty() && !in_use_image_ids.contains(&s.config_digest))
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
    /// With `diff_id` None (an import) whatever the content hashes to is accepted.
    fn unpack_to_temp(
        &self,
        blob: &Path,
        diff_id: Option<&str>,
        label: &str,
    ) -> Result<(TempDir, String), ImageError> {
        let tmp = TempDir::new(self.layers.join(format!(".tmp-{}", unique())))?;
        let rootfs = tmp.path.join("rootfs");
        fs::create_dir(&rootfs)
            .map_err(|e| ImageError::io(format!("create {}", rootfs.display()), e))?;
        let f =
            File::open(blob).map_err(|e| ImageError::io(format!("open {}", blob.display()), e))?;
        let short = label
            .strip_prefix("sha256:")
            .map_or(label, |h| &h[..h.len().min(12)]);
        let got = unpack::unpack_layer(f, &rootfs, short)?;
        if let Some(expected) = diff_id.filter(|d| *d != got.diff_id) {
            return Err(ImageError::DigestMismatch {
                what: format!("layer {short} uncompressed content (diff id)"),
                expected: expected.to_string(),
                actual: got.diff_id,
            });
        }
        let marker = serde_json::json!({ "diff_id": got.diff_id, "size": got.size, "skipped_devices": got.skipped_devices });
        // Durable contents first, then the marker: a layer with a marker is whole.
        let dir = File::open(&tmp.path)
            .map_err(|e| ImageError::io(format!("open {}", tmp.path.display()), e))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
            .map_err(|e| ImageError::io(format!("syncfs {}", tmp.path.display()), e.into()))?;
        atomic_write(
            &tmp.path.join(LAYER_COMPLETE_MARKER),
            marker.to_string().as_bytes(),
        )?;
        Ok((tmp, got.diff_id))
    }

    /// Rename an unpacked temp layer to `layers/<chain_hex>`; a concurrent twin wins quietly.
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
        fsync_dir(&self.layers)?;
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
        let (tmp, diff_id) = self.unpack_to_temp(&layer.path, None, &layer.digest)?;
        let chain_hex = sha256_hex(&diff_id)?.to_string();
        if !self.layer_complete(&chain_hex) {
            txn.layers.insert(chain_hex, tmp);
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
        let candidates = Self::candidates(&src)?;
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
                    self.stage_oci(&mut txn, &src, &digest, size)?
                }
                ManifestSource::DockerLegacy { config, layers } => {
                    self.stage_docker(&mut txn, &src, &config, &layers)?
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
        for (i, chain) in info.chain_ids.iter().enumerate() {
            let hex = sha256_hex(chain)?;
            if self.layer_complete(hex) {
                layer_dirs.push(self.layers.join(hex).join("rootfs"));
                continue;
            }
            // Unpacked layers are disposable (gc, a crash before the marker): redo from the blob.
            let layer = &s.manifest.layers()[i];
            let blob = self.blob_path(layer.digest().as_ref())?;
            let (tmp, _) =
                self.unpack_to_temp(&blob, Some(&diff_ids[i]), layer.digest().as_ref())?;
            layer_dirs.push(self.commit_layer(tmp, hex)?);
        }
        Ok(PreparedImage {
            chain_ids: info.chain_ids.clone(),
            info,
            layer_dirs,
            config: s.config,
        })
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
}
