//! Bind mounts and named volumes, as docker's `-v`, `--mount` and `docker volume` give them,
//! for the front door's containers and the worker's task containers alike.
//!
//! On disk, under the data dir:
//! - `volumes/` (0700: only root reaches a volume's files from the host) holds one dir per
//!   volume, `volumes/<name>/`, with `volume.json` (creation time, labels, whether it is
//!   anonymous) and `_data/`, the directory a container mounts.
//! - `volumes/.lock` serialises creation, removal and the recording of volume users.
//! - A container dir (`containers/<id>/`, the front door's or a task's) that mounts volumes
//!   holds `volumes.json`, the volumes it uses: a volume is in use while such a file names it,
//!   so `volume rm` refuses it until the container is removed.
//!
//! A mount is made by the container's init inside the container's mount namespace, before it
//! pivots (`container::init`), as a non-recursive bind with `nosuid,nodev` (and a read-only
//! remount for `ro`); the host never holds it. A bind source is resolved here once (symlinks
//! followed, as docker does) and checked to be outside shoal's private trees; the init then
//! opens that resolved path component by component without following any symlink and mounts
//! what it opened, so a path swapped for a symlink in between is refused rather than followed
//! ([`OPT_SOURCE_NOFOLLOW`]). A volume that is empty when mounted first gets the image's
//! content at the target copied in by the init ([`OPT_COPY_UP`], docker's behaviour).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where volumes live under the data dir.
pub const VOLUMES_DIR: &str = "volumes";
/// A volume's mounted directory, in its dir.
pub const DATA_DIR: &str = "_data";
/// A volume's metadata, in its dir.
const META_FILE: &str = "volume.json";
/// In a container dir: the volumes the container mounts.
pub const USE_FILE: &str = "volumes.json";
/// Mount option (shoal's own, in `config.json`): the source is opened without following any
/// symlink, and what was opened is mounted.
pub const OPT_SOURCE_NOFOLLOW: &str = "x-shoal.source-nofollow";
/// Mount option: an empty source directory first gets the rootfs's content at the
/// destination (owners, modes and times kept), under a lock on the source.
pub const OPT_COPY_UP: &str = "x-shoal.copy-up";
/// Largest metadata or use file read.
const MAX_META_BYTES: u64 = 1 << 20;
/// The trees of shoal's runtime state outside the data dir, never a bind source.
const RUN_DIR: &str = "/run/shoal";
/// Longest volume name accepted (a file name).
const MAX_NAME_LEN: usize = 255;
/// Most mounts one container may ask for.
pub const MAX_MOUNTS: usize = 128;

/// What a mount mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A host path.
    Bind,
    /// A named (or anonymous) volume of this node.
    Volume,
}

impl MountKind {
    pub fn name(self) -> &'static str {
        match self {
            MountKind::Bind => "bind",
            MountKind::Volume => "volume",
        }
    }
}

/// One mount as the user asked for it (`-v`, `--mount`, a service's spec).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: Option<MountKind>,
    /// Bind: the host path. Volume: its name, empty for an anonymous volume.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    pub read_only: bool,
    /// Volume: no copy of the image's content into it when it is empty.
    pub nocopy: bool,
    /// Volume: labels it is created with (when it does not exist yet).
    pub labels: BTreeMap<String, String>,
    /// Bind: a missing source is created as a directory (`-v`'s habit) rather than refused
    /// (`--mount`'s, and a service's).
    pub create_source: bool,
}

impl MountSpec {
    fn kind(&self) -> MountKind {
        self.kind.unwrap_or(MountKind::Volume)
    }
}

/// A mount ready for a container's `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    /// The host directory (or file) mounted: a resolved bind source, or a volume's `_data`.
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
    /// An empty source gets the image's content at the target.
    pub copy_up: bool,
}

impl ResolvedMount {
    /// The mount's entry in an OCI `config.json`.
    pub fn to_oci(&self) -> Result<oci_spec::runtime::Mount, oci_spec::OciSpecError> {
        let mut options: Vec<String> = ["bind", "nosuid", "nodev", OPT_SOURCE_NOFOLLOW]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if self.read_only {
            options.push("ro".into());
        }
        if self.copy_up {
            options.push(OPT_COPY_UP.into());
        }
        oci_spec::runtime::MountBuilder::default()
            .destination(&self.target)
            .typ("bind")
            .source(&self.source)
            .options(options)
            .build()
    }
}

/// Errors of mounts and volumes, worded as docker words them where docker has the case.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume specification: '{0}'")]
    InvalidSpec(String),
    #[error("invalid volume specification: '{spec}': {reason}")]
    InvalidSpecBecause {
        spec: String,
        reason: Box<VolumeError>,
    },
    #[error("invalid mode: {0}")]
    InvalidMode(String),
    #[error("invalid argument \"{value}\" for \"--mount\" flag: {reason}")]
    InvalidMountFlag { value: String, reason: String },
    #[error("invalid mount config for type \"{kind}\": {reason}")]
    Config { kind: String, reason: String },
    #[error("create {0}: \"{0}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path")]
    InvalidName(String),
    #[error("Duplicate mount point: {0}")]
    Duplicate(String),
    #[error("too many mounts: at most {MAX_MOUNTS}")]
    TooMany,
    #[error("no such volume: {0}")]
    NoSuchVolume(String),
    #[error("remove {name}: volume is in use - [{}]", users.join(", "))]
    InUse { name: String, users: Vec<String> },
    #[error("corrupt volume {name}: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

type Result<T, E = VolumeError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
    let what = what.into();
    move |source| VolumeError::Io { what, source }
}

fn config(kind: MountKind, reason: impl Into<String>) -> VolumeError {
    VolumeError::Config {
        kind: kind.name().into(),
        reason: reason.into(),
    }
}

/// Docker's local volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn check_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = b.len() >= 2
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_string()))
    }
}

/// Docker's mode words after `-v SRC:DST:`: `ro`/`rw`, `nocopy`, the SELinux relabels `z`/`Z`
/// (accepted and ignored: shoal does no labelling) and a private propagation, comma-separated,
/// each kind at most once. Returns (read-only, nocopy).
fn parse_mode(mode: &str) -> Result<(bool, bool)> {
    let bad = || VolumeError::InvalidMode(mode.to_string());
    let (mut rw, mut copy, mut label, mut prop) = (None, None, false, false);
    for m in mode.split(',') {
        match m {
            "ro" | "rw" if rw.is_none() => rw = Some(m == "ro"),
            "nocopy" if copy.is_none() => copy = Some(false),
            "z" | "Z" if !label => label = true,
            "private" | "rprivate" if !prop => prop = true,
            _ => return Err(bad()),
        }
    }
    Ok((rw.unwrap_or(false), copy == Some(false)))
}

/// A relative host path as docker's CLI takes it (`.`, `./x`, `../x`), made absolute.
fn absolute_if_dotted(source: &str) -> String {
    let dotted = source == "." || source.starts_with("./") || source.starts_with("../");
    if !dotted {
        return source.to_string();
    }
    std::path::absolute(source)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| source.to_string())
}

/// `-v` as docker reads it: `CTR` (an anonymous volume), `SRC:CTR` or `SRC:CTR:MODE`; a
/// source that is an absolute path (or starts with `.`) is a bind mount, else a volume name.
/// The spec is checked too ([`validate`]).
pub fn parse_volume_flag(raw: &str) -> Result<MountSpec> {
    if raw.matches(':').count() > 2 || raw.is_empty() || raw.starts_with(':') {
        return Err(VolumeError::InvalidSpec(raw.to_string()));
    }
    let parts: Vec<&str> = raw.splitn(3, ':').collect();
    let mut m = MountSpec::default();
    let mut mode = "";
    match parts.as_slice() {
        [t] => m.target = t.to_string(),
        [s, t] => {
            if parse_mode(t).is_ok() {
                // `/ctr:ro`: an anonymous volume takes no mode.
                return Err(VolumeError::InvalidSpec(raw.to_string()));
            }
            m.source = absolute_if_dotted(s);
            m.target = t.to_string();
        }
        [s, t, md] => {
            m.source = absolute_if_dotted(s);
            m.target = t.to_string();
            mode = md;
        }
        _ => return Err(VolumeError::InvalidSpec(raw.to_string())),
    }
    if !mode.is_empty() {
        let (ro, nocopy) = parse_mode(mode)?;
        m.read_only = ro;
        m.nocopy = nocopy;
    }
    m.kind = Some(if m.source.starts_with('/') {
        MountKind::Bind
    } else {
        MountKind::Volume
    });
    if m.kind == Some(MountKind::Bind) {
        if m.nocopy {
            return Err(VolumeError::InvalidSpecBecause {
                spec: raw.to_string(),
                reason: Box::new(config(
                    MountKind::Bind,
                    "field VolumeOptions must not be specified",
                )),
            });
        }
        m.create_source = true;
    }
    validate(&m).map_err(|e| match e {
        e @ VolumeError::InvalidName(_) => e,
        e => VolumeError::InvalidSpecBecause {
            spec: raw.to_string(),
            reason: Box::new(e),
        },
    })?;
    Ok(m)
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `--mount` as docker's CLI reads it: `type=bind|volume,source=…,target=…[,readonly]`
/// (`src`, `dst`/`destination`, `ro`, `volume-nocopy`, `volume-label=K=V`,
/// `bind-propagation=rprivate`); the type defaults to volume. The spec is checked too.
pub fn parse_mount_flag(raw: &str) -> Result<MountSpec> {
    let flag = |reason: String| VolumeError::InvalidMountFlag {
        value: raw.to_string(),
        reason,
    };
    let mut m = MountSpec::default();
    let mut kind = "volume".to_string();
    let (mut volume_opts, mut bind_opts) = (false, false);
    for field in split_csv(raw).map_err(flag)? {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(val) = val else {
            match key.as_str() {
                "readonly" | "ro" => m.read_only = true,
                "volume-nocopy" => {
                    m.nocopy = true;
                    volume_opts = true;
                }
                _ => {
                    return Err(flag(format!(
                        "invalid field '{field}' must be a key=value pair"
                    )))
                }
            }
            continue;
        };
        match key.as_str() {
            "type" => kind = val.to_ascii_lowercase(),
            "source" | "src" => m.source = absolute_if_dotted(val),
            "target" | "dst" | "destination" => m.target = val.to_string(),
            "readonly" | "ro" => {
                m.read_only = parse_bool(val)
                    .ok_or_else(|| flag(format!("invalid value for {key}: {val}")))?
            }
            "volume-nocopy" => {
                m.nocopy = parse_bool(val)
                    .ok_or_else(|| flag(format!("invalid value for volume-nocopy: {val}")))?;
                volume_opts = true;
            }
            "volume-label" => {
                let (k, v) = val.split_once('=').unwrap_or((val, ""));
                m.labels.insert(k.to_string(), v.to_string());
                volume_opts = true;
            }
            "bind-propagation" => {
                if !matches!(val, "private" | "rprivate") {
                    return Err(flag(format!(
                        "bind-propagation {val} is not supported: shoal's mounts are private"
                    )));
                }
                bind_opts = true;
            }
            _ => return Err(flag(format!("unexpected key '{key}' in '{field}'"))),
        }
    }
    if kind.is_empty() {
        return Err(flag("type is required".into()));
    }
    if m.target.is_empty() {
        return Err(flag("target is required".into()));
    }
    m.kind = match kind.as_str() {
        "bind" => Some(MountKind::Bind),
        "volume" => Some(MountKind::Volume),
        "tmpfs" | "npipe" | "cluster" | "image" => {
            return Err(VolumeError::Config {
                kind,
                reason: "mount type not supported by shoal (bind or volume)".into(),
            })
        }
        _ => {
            return Err(VolumeError::Config {
                kind,
                reason: "mount type unknown".into(),
            })
        }
    };
    if volume_opts && m.kind != Some(MountKind::Volume) {
        return Err(flag(format!(
            "cannot mix 'volume-*' options with mount type '{kind}'"
        )));
    }
    if bind_opts && m.kind != Some(MountKind::Bind) {
        return Err(flag(format!(
            "cannot mix 'bind-*' options with mount type '{kind}'"
        )));
    }
    validate(&m)?;
    Ok(m)
}

/// Fields of one CSV record (docker's `--mount` is read as CSV: a field in double quotes may
/// hold commas, `""` is a quote).
fn split_csv(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' if quoted => {
                quoted = false;
                if !matches!(chars.peek(), None | Some(',')) {
                    return Err("extraneous or missing \" in quoted-field".into());
                }
            }
            '"' if at_start => quoted = true,
            '"' => return Err("bare \" in non-quoted-field".into()),
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                at_start = true;
                continue;
            }
            c => cur.push(c),
        }
        at_start = false;
    }
    if quoted {
        return Err("extraneous or missing \" in quoted-field".into());
    }
    out.push(cur);
    Ok(out)
}

/// `p` without `.` components, repeated or trailing slashes (a target as the container sees
/// it), or `None` when it holds `..`.
fn clean_target(p: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Docker's checks of one mount (its `validateMountConfig`), and shoal's: no `..` or NUL in
/// a target, a volume name by docker's rules.
pub fn validate(m: &MountSpec) -> Result<()> {
    let kind = m.kind();
    if m.target.is_empty() {
        return Err(config(kind, "field Target must not be empty"));
    }
    if clean_target(&m.target).as_deref() == Some("/") {
        return Err(config(
            kind,
            "invalid specification: destination can't be '/'",
        ));
    }
    if !m.target.starts_with('/') {
        return Err(config(
            kind,
            format!(
                "invalid mount path: '{}' mount path must be absolute",
                m.target
            ),
        ));
    }
    if m.target.contains('\0') || clean_target(&m.target).is_none() {
        return Err(config(
            kind,
            format!("invalid mount path: '{}' must not hold '..'", m.target),
        ));
    }
    match kind {
        MountKind::Bind => {
            if m.source.is_empty() {
                return Err(config(kind, "field Source must not be empty"));
            }
            if !m.source.starts_with('/') {
                return Err(config(
                    kind,
                    format!(
                        "invalid mount path: '{}' mount path must be absolute",
                        m.source
                    ),
                ));
            }
            if m.source.contains('\0') {
                return Err(config(kind, "the source holds a NUL"));
            }
            if m.nocopy || !m.labels.is_empty() {
                return Err(config(kind, "field VolumeOptions must not be specified"));
            }
        }
        MountKind::Volume => {
            if m.source.is_empty() {
                if m.read_only {
                    return Err(config(
                        kind,
                        "must not set ReadOnly mode when using anonymous volumes",
                    ));
                }
            } else {
                check_name(&m.source)?;
            }
        }
    }
    Ok(())
}

/// Every mount checked, and no two on one target.
pub fn validate_all(specs: &[MountSpec]) -> Result<()> {
    if specs.len() > MAX_MOUNTS {
        return Err(VolumeError::TooMany);
    }
    let mut seen = Vec::new();
    for m in specs {
        validate(m)?;
        let t = clean_target(&m.target).unwrap_or_default();
        if seen.contains(&t) {
            return Err(VolumeError::Duplicate(t));
        }
        seen.push(t);
    }
    Ok(())
}

/// A bind source resolved on the host (symlinks followed once, here, as docker does): it
/// must exist (or is made, for `-v`) and must not be inside shoal's data dir `data_dir` or its
/// runtime state under `/run/shoal` (image layers, containers' files, other volumes).
pub fn resolve_bind_source(data_dir: &Path, m: &MountSpec) -> Result<PathBuf> {
    let src = Path::new(&m.source);
    let resolved = match std::fs::canonicalize(src) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && m.create_source => {
            // Docker's `-v`: a missing host path is made, as a directory — where it would
            // land (its deepest existing ancestor resolved) is checked before anything is made.
            let landing = resolve_missing(src).ok_or_else(|| {
                config(
                    MountKind::Bind,
                    format!("invalid bind source path {}", m.source),
                )
            })?;
            check_outside_private(data_dir, &landing, &m.source)?;
            std::fs::create_dir_all(&landing)
                .map_err(io_err(format!("create bind source {}", m.source)))?;
            std::fs::canonicalize(&landing).map_err(io_err(format!("resolve {}", m.source)))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(config(
                MountKind::Bind,
                format!("bind source path does not exist: {}", m.source),
            ))
        }
        Err(e) => return Err(io_err(format!("resolve bind source {}", m.source))(e)),
    };
    check_outside_private(data_dir, &resolved, &m.source)?;
    Ok(resolved)
}

/// A missing absolute path as it would be made: its deepest existing ancestor resolved, the
/// missing components (plain names only) after it.
fn resolve_missing(p: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    let mut cur = p.to_path_buf();
    loop {
        match std::fs::canonicalize(&cur) {
            Ok(base) => {
                let mut out = base;
                for c in rest.iter().rev() {
                    out.push(c);
                }
                return Some(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match cur.components().next_back()? {
                    Component::Normal(n) => rest.push(n.to_os_string()),
                    _ => return None,
                }
                cur = cur.parent()?.to_path_buf();
            }
            Err(_) => return None,
        }
    }
}

fn check_outside_private(data_dir: &Path, p: &Path, given: &str) -> Result<()> {
    let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let run = std::fs::canonicalize(RUN_DIR).unwrap_or_else(|_| PathBuf::from(RUN_DIR));
    for (tree, what) in [(&data, "shoal's data dir"), (&run, "shoal's runtime state")] {
        if p.starts_with(tree) {
            return Err(config(
                MountKind::Bind,
                format!(
                    "bind source path {given} is inside {what} {}: mount a volume by name instead",
                    tree.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A container's mounts, ready ([`Volumes::attach`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    /// In the order asked.
    pub mounts: Vec<ResolvedMount>,
    /// The volumes made for it (to remove again if the container is not made after all).
    pub made: Vec<String>,
}

/// Adds `mounts` to a container's spec after its own (docker's defaults, network files),
/// parents before what is mounted inside them.
pub fn add_to_spec(
    spec: &mut oci_spec::runtime::Spec,
    mounts: &[ResolvedMount],
) -> Result<(), oci_spec::OciSpecError> {
    let mut all = spec.mounts().clone().unwrap_or_default();
    for m in sorted(mounts) {
        all.push(m.to_oci()?);
    }
    spec.set_mounts(Some(all));
    Ok(())
}

/// `mounts` by the depth of their targets (stable): a mount inside another comes after it.
pub fn sorted(mounts: &[ResolvedMount]) -> Vec<&ResolvedMount> {
    let mut v: Vec<&ResolvedMount> = mounts.iter().collect();
    v.sort_by_key(|m| {
        clean_target(&m.target)
            .unwrap_or_default()
            .split('/')
            .filter(|c| !c.is_empty())
            .count()
    });
    v
}

/// A volume as `volume ls` and `volume inspect` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    /// Its `_data` dir.
    pub mountpoint: PathBuf,
    /// RFC 3339.
    pub created_at: String,
    pub labels: BTreeMap<String, String>,
    /// Made for one container (`-v /ctr`), removed with it by `rm -v` and `run --rm`.
    pub anonymous: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    created_at: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    anonymous: bool,
}

/// What a container dir's [`USE_FILE`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeUse {
    /// Volume names.
    pub volumes: Vec<String>,
    /// Those of them made for this container alone.
    #[serde(default)]
    pub anonymous: Vec<String>,
}

impl VolumeUse {
    /// The use recorded in `container_dir` (none when it has no readable file).
    pub fn load(container_dir: &Path) -> VolumeUse {
        read_json(&container_dir.join(USE_FILE)).unwrap_or_default()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    let f = File::open(p).ok()?;
    let mut text = Vec::new();
    f.take(MAX_META_BYTES).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The volumes of one data dir.
pub struct Volumes {
    data_dir: PathBuf,
    dir: PathBuf,
}

impl Volumes {
    /// The volumes of `data_dir` (made absolute; nothing is created yet).
    pub fn open(data_dir: &Path) -> Result<Volumes> {
        let data_dir = std::path::absolute(data_dir).map_err(io_err("data dir path"))?;
        Ok(Volumes {
            dir: data_dir.join(VOLUMES_DIR),
            data_dir,
        })
    }

    /// The dir of volume `name` (checked).
    fn volume_dir(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.dir.join(name))
    }

    /// Exclusive hold on the volumes (creating `volumes/`, private, first).
    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        crate::dirs::private_dir(&self.data_dir)
            .map_err(io_err(format!("create {}", self.data_dir.display())))?;
        crate::dirs::private_dir(&self.dir)
            .map_err(io_err(format!("create {}", self.dir.display())))?;
        let p = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(format!("open {}", p.display())))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(format!("lock {}", p.display()))(e.into()))
    }

    /// Volume `name` as it is on disk.
    pub fn inspect(&self, name: &str) -> Result<VolumeInfo> {
        let dir = match self.volume_dir(name) {
            Ok(d) => d,
            Err(VolumeError::InvalidName(_)) => {
                return Err(VolumeError::NoSuchVolume(name.to_string()))
            }
            Err(e) => return Err(e),
        };
        let data = dir.join(DATA_DIR);
        match std::fs::symlink_metadata(&data) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(VolumeError::Corrupt {
                    name: name.into(),
                    reason: format!("{} is not a directory", data.display()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NoSuchVolume(name.to_string()))
            }
            Err(e) => return Err(io_err(format!("read {}", data.display()))(e)),
        }
        let meta: Meta = read_json(&dir.join(META_FILE)).ok_or_else(|| VolumeError::Corrupt {
            name: name.into(),
            reason: format!("unreadable {META_FILE}"),
        })?;
        Ok(VolumeInfo {
            name: name.to_string(),
            mountpoint: data,
            created_at: meta.created_at,
            labels: meta.labels,
            anonymous: meta.anonymous,
        })
    }

    /// Every volume, by name (half-made ones skipped).
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("read {}", self.dir.display()))(e)),
        };
        let mut out: Vec<VolumeInfo> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| check_name(n).is_ok())
            .filter_map(|n| self.inspect(&n).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// `volume create`: volume `name` (a new anonymous name when `None`) with `labels`; an
    /// existing one is kept as it is (docker's). Returns it and whether it was made now.
    pub fn create(
        &self,
        name: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(VolumeInfo, bool)> {
        let _lock = self.lock()?;
        self.create_locked(name, labels)
    }

    fn create_locked(
        &self,
        name: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(VolumeInfo, bool)> {
        let (name, anonymous) = match name {
            Some(n) => (n.to_string(), false),
            None => loop {
                let id = crate::frontdoor::new_id().map_err(|e| VolumeError::Io {
                    what: "volume name".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                if !self.dir.join(&id).exists() {
                    break (id, true);
                }
            },
        };
        let dir = self.volume_dir(&name)?;
        match self.inspect(&name) {
            Ok(v) => return Ok((v, false)),
            Err(VolumeError::NoSuchVolume(_)) => {}
            Err(e) => return Err(e),
        }
        // Made aside and renamed in: a volume is there whole or not at all.
        let tmp = self.dir.join(format!(".new-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir(&tmp)?;
            std::fs::create_dir(tmp.join(DATA_DIR))?;
            let meta = Meta {
                created_at: crate::image::timefmt::now_rfc3339(),
                labels: labels.clone(),
                anonymous,
            };
            let text = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
            std::fs::write(tmp.join(META_FILE), text)?;
            if dir.exists() {
                // A dir without its `_data` (left by hand): replaced.
                std::fs::remove_dir_all(&dir)?;
            }
            std::fs::rename(&tmp, &dir)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err(format!("create volume {name}"))(e));
        }
        Ok((self.inspect(&name)?, true))
    }

    /// Ids of the containers (front door's and tasks') whose dirs record a use of `name`.
    pub fn users(&self, name: &str) -> Vec<String> {
        let containers = self.data_dir.join(crate::frontdoor::CONTAINERS_DIR);
        let mut out: Vec<String> = std::fs::read_dir(containers)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| VolumeUse::load(&e.path()).volumes.iter().any(|v| v == name))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    /// `volume rm`: refused while a container uses it.
    pub fn remove(&self, name: &str) -> Result<()> {
        let _lock = self.lock()?;
        self.inspect(name)?;
        self.remove_locked(name)
    }

    fn remove_locked(&self, name: &str) -> Result<()> {
        let users = self.users(name);
        if !users.is_empty() {
            return Err(VolumeError::InUse {
                name: name.to_string(),
                users,
            });
        }
        let dir = self.volume_dir(name)?;
        // Renamed out first: a removal cut short leaves no half volume under its name.
        let gone = self.dir.join(format!(".rm-{name}"));
        let _ = std::fs::remove_dir_all(&gone);
        std::fs::rename(&dir, &gone).map_err(io_err(format!("remove volume {name}")))?;
        std::fs::remove_dir_all(&gone).map_err(io_err(format!("remove volume {name}")))
    }

    /// `volume prune`: removes the volumes no container uses — anonymous ones only unless
    /// `all` — and returns their names and the bytes their files held.
    pub fn prune(&self, all: bool) -> Result<Vec<(String, u64)>> {
        let _lock = self.lock()?;
        let mut out = Vec::new();
        for v in self.list()? {
            if !(all || v.anonymous) || !self.users(&v.name).is_empty() {
                continue;
            }
            let size = tree_size(&v.mountpoint);
            self.remove_locked(&v.name)?;
            out.push((v.name, size));
        }
        Ok(out)
    }

    /// Makes the mounts of the container whose dir is `container_dir` (it must exist) ready:
    /// bind sources resolved and checked, volumes found or made (anonymous ones afresh), and
    /// the container's use of them recorded in its dir. On error nothing this call made is
    /// left (but the host dirs `-v` makes for missing bind sources, as docker's).
    pub fn attach(&self, container_dir: &Path, specs: &[MountSpec]) -> Result<Attached> {
        validate_all(specs)?;
        let mut out = Vec::with_capacity(specs.len());
        for m in specs {
            if m.kind() == MountKind::Bind {
                out.push(Some(ResolvedMount {
                    source: resolve_bind_source(&self.data_dir, m)?,
                    target: m.target.clone(),
                    read_only: m.read_only,
                    copy_up: false,
                }));
            } else {
                out.push(None);
            }
        }
        if specs.iter().all(|m| m.kind() == MountKind::Bind) {
            return Ok(Attached {
                mounts: out.into_iter().flatten().collect(),
                made: Vec::new(),
            });
        }
        let _lock = self.lock()?;
        let mut made: Vec<String> = Vec::new();
        let mut used = VolumeUse::default();
        let r = (|| -> Result<()> {
            for (m, slot) in specs.iter().zip(out.iter_mut()) {
                if m.kind() != MountKind::Volume {
                    continue;
                }
                let name = (!m.source.is_empty()).then_some(m.source.as_str());
                let (v, new) = self.create_locked(name, &m.labels)?;
                if new {
                    made.push(v.name.clone());
                }
                if name.is_none() {
                    used.anonymous.push(v.name.clone());
                }
                if !used.volumes.contains(&v.name) {
                    used.volumes.push(v.name.clone());
                }
                *slot = Some(ResolvedMount {
                    source: v.mountpoint,
                    target: m.target.clone(),
                    read_only: m.read_only,
                    copy_up: !m.nocopy,
                });
            }
            let text = serde_json::to_vec(&used).map_err(|e| VolumeError::Io {
                what: "volume use".into(),
                source: std::io::Error::other(e),
            })?;
            crate::container::state::write_atomic(container_dir, USE_FILE, &text, true)
                .map_err(io_err(format!("write {USE_FILE}")))
        })();
        if let Err(e) = r {
            for name in made {
                let _ = self.remove_locked(&name);
            }
            return Err(e);
        }
        Ok(Attached {
            mounts: out.into_iter().flatten().collect(),
            made,
        })
    }

    /// After a container was removed (its dir gone): the anonymous volumes it used that no
    /// other container uses are removed.
    pub fn remove_anonymous(&self, used: &VolumeUse) -> Result<()> {
        self.remove_unused(&used.anonymous)
    }

    /// Removes those of the volumes `names` that exist and no container uses.
    pub fn remove_unused(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        for name in names {
            match self.inspect(name) {
                Ok(_) => {}
                Err(VolumeError::NoSuchVolume(_)) => continue,
                Err(e) => return Err(e),
            }
            match self.remove_locked(name) {
                Ok(()) | Err(VolumeError::InUse { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Bytes of the regular files under `dir` (symlinks not followed).
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(source: &str, target: &str) -> MountSpec {
        MountSpec {
            kind: Some(MountKind::Volume),
            source: source.into(),
            target: target.into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_docker() {
        for ok in ["data", "a1", "my-vol_1.x", "0abc"] {
            check_name(ok).unwrap();
        }
        for bad in ["a", "", "-x", ".x", "a/b", "a b", "é1", &"x".repeat(256)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("includes invalid characters"), "{bad}: {e}");
        }
    }

    #[test]
    fn dash_v_reads_like_docker() {
        let m = parse_volume_flag("data:/d").unwrap();
        assert_eq!(m, vol("data", "/d"));
        let m = parse_volume_flag("data:/d:ro").unwrap();
        assert!(m.read_only && !m.nocopy);
        let m = parse_volume_flag("data:/d:nocopy,rw").unwrap();
        assert!(!m.read_only && m.nocopy);
        let m = parse_volume_flag("/srv/x:/x:ro,z").unwrap();
        assert_eq!(m.kind, Some(MountKind::Bind));
        assert!(m.read_only && m.create_source);
        let m = parse_volume_flag("/anon").unwrap();
        assert_eq!(m, vol("", "/anon"));
        let m = parse_volume_flag("./rel:/r").unwrap();
        assert_eq!(m.kind, Some(MountKind::Bind));
        assert!(m.source.starts_with('/'), "{}", m.source);

        let err = |s: &str| parse_volume_flag(s).unwrap_err().to_string();
        assert_eq!(err("a:b:c:d"), "invalid volume specification: 'a:b:c:d'");
        assert_eq!(err(":/x"), "invalid volume specification: ':/x'");
        assert_eq!(err("/x:ro"), "invalid volume specification: '/x:ro'");
        assert_eq!(err("data:/d:rx"), "invalid mode: rx");
        assert_eq!(err("data:/d:ro,rw"), "invalid mode: ro,rw");
        assert_eq!(
            err("data:ctr"),
            "invalid volume specification: 'data:ctr': invalid mount config for type \"volume\": invalid mount path: 'ctr' mount path must be absolute"
        );
        assert_eq!(
            err("/h:/"),
            "invalid volume specification: '/h:/': invalid mount config for type \"bind\": invalid specification: destination can't be '/'"
        );
        assert!(err("a/b:/x").starts_with("create a/b: \"a/b\" includes invalid characters"));
        assert!(err("/h:/x:nocopy").contains("VolumeOptions"));
        assert!(err("data:/a/../b").contains("'..'"));
    }

    #[test]
    fn dash_dash_mount_reads_like_docker() {
        let m = parse_mount_flag("type=bind,source=/srv,target=/s,readonly").unwrap();
        assert_eq!(m.kind, Some(MountKind::Bind));
        assert!(m.read_only && !m.create_source);
        let m =
            parse_mount_flag("src=data,dst=/d,ro=false,volume-label=a=b,volume-nocopy").unwrap();
        assert_eq!(m.kind, Some(MountKind::Volume));
        assert!(!m.read_only && m.nocopy);
        assert_eq!(m.labels.get("a").map(String::as_str), Some("b"));
        let m = parse_mount_flag("target=/anon").unwrap();
        assert_eq!(m, vol("", "/anon"));
        let m = parse_mount_flag("type=volume,\"source=xy\",target=/q").unwrap();
        assert_eq!(m.source, "xy");

        let err = |s: &str| parse_mount_flag(s).unwrap_err().to_string();
        assert_eq!(
            err("type=bind,source=/x"),
            "invalid argument \"type=bind,source=/x\" for \"--mount\" flag: target is required"
        );
        assert!(err("type=volume,target=/x,bogus")
            .contains("invalid field 'bogus' must be a key=value pair"));
        assert!(err("type=volume,target=/x,size=1").contains("unexpected key 'size' in 'size=1'"));
        assert!(err("type=volume,target=/x,ro=maybe").contains("invalid value for ro: maybe"));
        assert_eq!(
            err("type=nfs,target=/x"),
            "invalid mount config for type \"nfs\": mount type unknown"
        );
        assert!(err("type=tmpfs,target=/x").contains("not supported"));
        assert!(err("type=bind,source=/x,target=/y,volume-nocopy")
            .contains("cannot mix 'volume-*' options with mount type 'bind'"));
        assert!(err("type=volume,target=/y,bind-propagation=rprivate")
            .contains("cannot mix 'bind-*' options with mount type 'volume'"));
        assert!(
            err("type=bind,source=/x,target=/y,bind-propagation=shared").contains("not supported")
        );
        assert_eq!(
            err("type=bind,source=rel,target=/y"),
            "invalid mount config for type \"bind\": invalid mount path: 'rel' mount path must be absolute"
        );
        assert_eq!(
            err("type=bind,target=/y"),
            "invalid mount config for type \"bind\": field Source must not be empty"
        );
        assert_eq!(
            err("target=/y,readonly"),
            "invalid mount config for type \"volume\": must not set ReadOnly mode when using anonymous volumes"
        );
        assert!(err("type=volume,src=ab,target=/x\"").contains("bare \" in non-quoted-field"));
        assert!(err("type=volume,src=ab,\"target=/x").contains("quoted-field"));
    }

    #[test]
    fn targets_are_unique() {
        let specs = vec![vol("a1", "/d"), vol("b1", "/d/")];
        assert_eq!(
            validate_all(&specs).unwrap_err().to_string(),
            "Duplicate mount point: /d"
        );
        validate_all(&[vol("a1", "/d"), vol("b1", "/d/e")]).unwrap();
    }

    #[test]
    fn bind_sources_are_resolved_and_kept_out_of_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("layers/x")).unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir(&host).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&host, &link).unwrap();
        let bind = |s: &Path, create| MountSpec {
            kind: Some(MountKind::Bind),
            source: s.to_string_lossy().into_owned(),
            target: "/x".into(),
            create_source: create,
            ..Default::default()
        };
        assert_eq!(
            resolve_bind_source(&data, &bind(&link, false)).unwrap(),
            std::fs::canonicalize(&host).unwrap()
        );
        let missing = dir.path().join("missing");
        let e = resolve_bind_source(&data, &bind(&missing, false))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "invalid mount config for type \"bind\": bind source path does not exist: {}",
                missing.display()
            )
        );
        assert!(!missing.exists());
        resolve_bind_source(&data, &bind(&missing, true)).unwrap();
        assert!(missing.is_dir());
        // Into the data dir, directly or through a symlink, and never made there.
        let sneaky = dir.path().join("sneaky");
        std::os::unix::fs::symlink(data.join("layers"), &sneaky).unwrap();
        for p in [data.join("layers/x"), sneaky.join("x"), data.clone()] {
            let e = resolve_bind_source(&data, &bind(&p, false))
                .unwrap_err()
                .to_string();
            assert!(e.contains("inside shoal's data dir"), "{e}");
        }
        let e = resolve_bind_source(&data, &bind(&data.join("containers/new"), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inside shoal's data dir"), "{e}");
        assert!(!data.join("containers").exists());
    }

    #[test]
    fn volumes_are_made_used_refused_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let vols = Volumes::open(&data).unwrap();
        let labels: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        let (v, new) = vols.create(Some("data"), &labels).unwrap();
        assert!(new && !v.anonymous);
        assert_eq!(v.mountpoint, data.join("volumes/data/_data"));
        assert!(v.mountpoint.is_dir());
        let (again, new) = vols.create(Some("data"), &BTreeMap::new()).unwrap();
        assert!(!new);
        assert_eq!(again.labels, labels);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("volumes"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        let c1 = data.join("containers/c1");
        std::fs::create_dir_all(&c1).unwrap();
        let att = vols
            .attach(&c1, &[vol("data", "/d"), vol("", "/anon")])
            .unwrap();
        assert_eq!(att.made.len(), 1, "{att:?}");
        let mounts = att.mounts;
        assert_eq!(mounts.len(), 2);
        assert!(mounts[0].copy_up && !mounts[0].read_only);
        let used = VolumeUse::load(&c1);
        assert_eq!(used.volumes.len(), 2);
        assert_eq!(used.anonymous.len(), 1);
        let anon = used.anonymous[0].clone();
        assert!(vols.inspect(&anon).unwrap().anonymous);
        let e = vols.remove("data").unwrap_err().to_string();
        assert_eq!(e, "remove data: volume is in use - [c1]");
        assert!(matches!(
            vols.remove("nosuch"),
            Err(VolumeError::NoSuchVolume(_))
        ));
        // Nothing unused to prune yet.
        assert!(vols.prune(true).unwrap().is_empty());
        std::fs::remove_dir_all(&c1).unwrap();
        vols.remove_anonymous(&used).unwrap();
        assert!(matches!(
            vols.inspect(&anon),
            Err(VolumeError::NoSuchVolume(_))
        ));
        // A failed attach leaves none of the volumes it made.
        let c2 = data.join("containers/c2");
        std::fs::create_dir_all(&c2).unwrap();
        let bad_bind = MountSpec {
            kind: Some(MountKind::Bind),
            source: "/nonexistent-shoal-src".into(),
            target: "/b".into(),
            ..Default::default()
        };
        assert!(vols.attach(&c2, &[vol("fresh", "/f"), bad_bind]).is_err());
        assert!(vols.inspect("fresh").is_err());
        assert!(vols
            .attach(&data.join("containers/none"), &[vol("fresh", "/f")])
            .is_err());
        assert!(vols.inspect("fresh").is_err());

        std::fs::write(v.mountpoint.join("f"), b"12345").unwrap();
        vols.create(None, &BTreeMap::new()).unwrap();
        let pruned = vols.prune(false).unwrap();
        assert_eq!(pruned.len(), 1, "{pruned:?}");
        let pruned = vols.prune(true).unwrap();
        assert_eq!(pruned, vec![("data".to_string(), 5)]);
        assert!(vols.list().unwrap().is_empty());
    }

    /// Cases per run of the flag property (`PROPTEST_CASES` overrides).
    const FLAG_CASES: u32 = 512;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(FLAG_CASES)
        ))]
        /// Whatever `-v` or `--mount` is given, the parsers answer an error or a spec that
        /// passes the checks: an absolute target other than `/` without `..`, a bind source
        /// absolute, a volume name by docker's rules (or none), no read-only anonymous volume.
        #[test]
        fn any_mount_flag_is_refused_or_valid(
            raw in proptest::string::string_regex(
                "([a-z]{0,6}|/[a-z./]{0,8}|\\.{1,2}/?[a-z]{0,3})(:[a-z/.]{0,8}){0,3}"
            ).unwrap(),
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "type", "source", "src", "target", "dst", "readonly", "ro",
                        "volume-nocopy", "volume-label", "bind-propagation", "x", "",
                    ]),
                    proptest::option::of("[a-z/.=\"]{0,8}"),
                ),
                0..6,
            ),
        ) {
            let flag: Vec<String> = fields
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.to_string(),
                })
                .collect();
            for m in [parse_volume_flag(&raw), parse_mount_flag(&flag.join(","))]
                .into_iter()
                .flatten()
            {
                validate(&m).unwrap();
                let t = clean_target(&m.target).unwrap();
                proptest::prop_assert!(t != "/" && m.target.starts_with('/'));
                match m.kind() {
                    MountKind::Bind => proptest::prop_assert!(m.source.starts_with('/')),
                    MountKind::Volume if m.source.is_empty() => {
                        proptest::prop_assert!(!m.read_only)
                    }
                    MountKind::Volume => proptest::prop_assert!(check_name(&m.source).is_ok()),
                }
            }
        }
    }
}
