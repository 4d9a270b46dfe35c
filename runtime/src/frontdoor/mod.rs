//! The node-local front door: containers from images, as `docker run/ps/stop/rm/logs/exec`
//! gives them, on top of [`crate::container`] and [`crate::image`].
//!
//! On disk, under the data dir:
//! - `containers/<id>/` is the container's bundle and everything it owns: `record.json` (name,
//!   image, command, times), `config.json`, the overlay's `upper/` and `work/`, the `rootfs/`
//!   mount point (the overlay is mounted there only inside the container's mount namespace)
//!   and the log `<id>.log` (+ `.1`, `.2` once rotated; one record per line with its stream and time, see `logfile`).
//! - `containers/.runtime/<id>/` is the runtime's state dir ([`Container`]'s root is
//!   `containers/.runtime`): on the data dir's disk, not under `/run`, so a record and its
//!   exit status live and die together, and one data dir is one self-contained node.
//! - `containers/.lock` serialises name reservation and removal.
//!
//! A container's cgroup is `shoal/<id>` in every hierarchy.

mod config;
mod names;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use crate::logfile::{files_oldest_first, LogFollower};
pub use config::{
    parse_cpus, parse_memory, parse_pids_limit, read_account_file, resolve_user, ResolvedUser,
};
pub use names::{check_name, generated_name, is_full_id, new_id};

use crate::container::{
    self, state, Container, ContainerError, CreateOptions, ExecOptions, ExecProcess, ExitStatus,
    LogConfig, Overlay, Status, Stdio,
};
use crate::image::{ImageError, ImageStore};
use crate::network::{self, Attachment, BridgeConfig, EtcOptions, Mode, NetError, NetRequest};
use crate::spec::SpecError;
use crate::volume::{MountSpec, VolumeError, VolumeUse, Volumes};

/// Where containers live under the data dir.
pub const CONTAINERS_DIR: &str = "containers";
/// The runtime's state root, under the containers dir.
pub const RUNTIME_DIR: &str = ".runtime";
/// A container's record file.
pub const RECORD_FILE: &str = "record.json";
/// In a container dir made by something other than the front door (a service task's), the
/// image it runs, so that `image rm` and `prune` keep that image and its layers.
pub const IMAGE_USE_FILE: &str = "image-use.json";
/// Rotate a container's log at this size.
pub const LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated log files kept beside the live one.
pub const LOG_MAX_FILES: u32 = 2;
/// How long `stop` waits for the container to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries at a generated name before falling back to `shoal_<short id>`.
const NAME_ATTEMPTS: usize = 8;
/// Largest record file read.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Errors of the front door.
#[derive(Debug, thiserror::Error)]
pub enum FrontDoorError {
    #[error("must run as root")]
    NotRoot,
    #[error("invalid {flag} value {value:?}: {reason}")]
    InvalidOption {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid container name {0:?}: use letters, digits, '_', '.', '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("the container name {name:?} is already in use by container {id}")]
    NameInUse { name: String, id: String },
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("container id prefix {0:?} matches several containers")]
    Ambiguous(String),
    #[error("no command given and image {0} has none")]
    NoCommand(String),
    #[error("{0}")]
    User(String),
    #[error("container {0} is running: stop it first or use rm -f")]
    Running(String),
    #[error("container {0} is being created")]
    Busy(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("corrupt record of container {id}: {reason}")]
    Corrupt { id: String, reason: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Oci(#[from] oci_spec::OciSpecError),
    #[error(transparent)]
    Network(#[from] NetError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

type Result<T, E = FrontDoorError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FrontDoorError {
    let what = what.into();
    move |source| FrontDoorError::Io { what, source }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `shoal run` asks for.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Image reference (`name:tag`, id prefix or digest).
    pub image: String,
    /// Container name; generated when `None`.
    pub name: Option<String>,
    /// Replaces the image's Cmd when not empty.
    pub command: Vec<String>,
    /// `KEY=VALUE` (or `KEY`, taken from the caller) merged over the image's Env.
    pub env: Vec<String>,
    /// Defaults to the short id.
    pub hostname: Option<String>,
    /// Memory limit in bytes (see [`parse_memory`]).
    pub memory: Option<i64>,
    /// CPUs as a CFS quota over a 100 ms period (see [`parse_cpus`]).
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub read_only: bool,
    /// Working directory (absolute); overrides the image's.
    pub workdir: Option<String>,
    /// `user[:group]` or `uid[:gid]`; overrides the image's.
    pub user: Option<String>,
    /// Remove the container once it exits.
    pub auto_remove: bool,
    /// `--network` and `-p`.
    pub network: NetRequest,
    /// `--dns*` and `--add-host` (the hostname is filled in by `create`).
    pub etc: EtcOptions,
    /// `-v` and `--mount`: bind mounts and volumes.
    pub mounts: Vec<MountSpec>,
}

/// What the front door keeps about a container beside the runtime's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub name: String,
    /// The image reference as the user gave it.
    pub image: String,
    /// `sha256:<hex>` of the image config.
    pub image_id: String,
    /// The image's layer chain ids, lowest first (kept alive by image gc).
    pub chain_ids: Vec<String>,
    /// The process's argv.
    pub command: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    pub started: Option<u64>,
    pub auto_remove: bool,
    /// The image's StopSignal, if any.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

impl ContainerRecord {
    /// The 12-digit short id.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Made but never started (or mid-creation).
    Created,
    /// Running since `started`.
    Running { started: u64 },
    /// Frozen, running since `started`.
    Paused { started: u64 },
    /// Ended with `code` (the shell's convention: 128 + signal) at `finished`.
    Exited { code: i32, finished: u64 },
    /// Its processes are gone without a recorded exit (e.g. the host rebooted).
    Dead,
}

impl RunState {
    /// True while its processes exist.
    pub fn is_running(&self) -> bool {
        matches!(self, RunState::Running { .. } | RunState::Paused { .. })
    }
}

/// The state of a loaded container that has been running since `started`.
fn run_state_of(c: &Container, started: u64) -> RunState {
    match c.status() {
        Status::Creating | Status::Created => RunState::Created,
        Status::Running => RunState::Running { started },
        Status::Paused => RunState::Paused { started },
        Status::Stopped => match c.exit_status() {
            Some(s) => {
                let exit = c.root().join(c.id()).join(state::EXIT_FILE);
                let finished = std::fs::metadata(exit)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(started, |d| d.as_secs());
                RunState::Exited {
                    code: s.shell_code(),
                    finished,
                }
            }
            None => RunState::Dead,
        },
    }
}

/// A container the front door did not make (a service task's, made by the worker agent), as
/// `ps` shows it.
#[derive(Debug, Clone)]
pub struct OtherContainer {
    pub state: RunState,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// The process arguments it runs.
    pub command: Vec<String>,
    pub network: Option<Attachment>,
}

/// Container `id` of the runtime root `runtime_root`, its directory `container_dir`, for `ps`:
/// running since `started` (default: its creation). `None` when it has no runtime state.
pub fn other_container(
    runtime_root: &Path,
    container_dir: &Path,
    id: &str,
    started: Option<u64>,
) -> Result<Option<OtherContainer>> {
    let (c, command) = match Container::load_with_args(runtime_root, id) {
        Ok(c) => c,
        Err(ContainerError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let created = c.state().created;
    Ok(Some(OtherContainer {
        state: run_state_of(&c, started.unwrap_or(created)),
        created,
        command,
        network: Attachment::load(container_dir),
    }))
}

/// One container for `ps`.
#[derive(Debug, Clone)]
pub struct ContainerSummary {
    pub record: ContainerRecord,
    pub state: RunState,
    /// Its network, if it was given one.
    pub network: Option<Attachment>,
}

/// Image ids and layer chain ids that local containers use (for image rm and prune).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagesInUse {
    pub image_ids: Vec<String>,
    pub chain_ids: Vec<String>,
}

impl ImagesInUse {
    fn add(&mut self, image_id: String, chain_ids: Vec<String>) {
        if !self.image_ids.contains(&image_id) {
            self.image_ids.push(image_id);
        }
        for c in chain_ids {
            if !self.chain_ids.contains(&c) {
                self.chain_ids.push(c);
            }
        }
    }
}

/// What an [`IMAGE_USE_FILE`] holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageUse {
    image_id: String,
    chain_ids: Vec<String>,
}

/// Records in `container_dir` that its container runs the image `image_id` with these layer
/// chain ids (for containers the front door did not make; removed with the dir).
pub fn record_image_use(
    container_dir: &Path,
    image_id: &str,
    chain_ids: &[String],
) -> std::io::Result<()> {
    let u = ImageUse {
        image_id: image_id.to_string(),
        chain_ids: chain_ids.to_vec(),
    };
    let text = serde_json::to_vec(&u).map_err(std::io::Error::other)?;
    crate::dirs::private_dir(container_dir)?;
    let tmp = container_dir.join(format!("{IMAGE_USE_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, container_dir.join(IMAGE_USE_FILE))
}

fn read_image_use(container_dir: &Path) -> Option<ImageUse> {
    use std::io::Read;
    let f = File::open(container_dir.join(IMAGE_USE_FILE)).ok()?;
    let mut text = Vec::new();
    f.take(MAX_RECORD_BYTES).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// A container just created, its process not yet started.
pub struct NewContainer {
    pub record: ContainerRecord,
    /// The runtime's handle (it holds the monitor's channel, so `wait` is immediate).
    pub container: Container,
}

/// Removes a half-made container's network and directory, and the volumes made for it,
/// unless disarmed.
struct DirGuard(Option<PathBuf>, Vec<String>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if let Some(id) = d.file_name().and_then(|n| n.to_str()) {
                let _ = network::detach(id);
            }
            let _ = std::fs::remove_dir_all(&d);
            // <data>/containers/<id>: the data dir is two levels up.
            if let Some(data) = d.parent().and_then(Path::parent) {
                if let Ok(v) = Volumes::open(data) {
                    let _ = v.remove_unused(&self.1);
                }
            }
        }
    }
}

/// The containers of one data dir.
pub struct FrontDoor {
    data_dir: PathBuf,
    dir: PathBuf,
    runtime_root: PathBuf,
    allow_unprotected_exe: bool,
}

impl FrontDoor {
    /// The front door over `data_dir` (made absolute; nothing is created yet, but the data
    /// dir and `containers/` are narrowed to 0700 if found wider).
    pub fn open(data_dir: &Path) -> Result<FrontDoor> {
        let data_dir = std::path::absolute(data_dir).map_err(io_err("data dir path"))?;
        let dir = data_dir.join(CONTAINERS_DIR);
        for d in [&data_dir, &dir] {
            crate::dirs::narrow(d).map_err(io_err(format!("narrow {}", d.display())))?;
        }
        Ok(FrontDoor {
            runtime_root: dir.join(RUNTIME_DIR),
            dir,
            data_dir,
            allow_unprotected_exe: false,
        })
    }

    /// Let a test binary that embeds the runtime create containers (see
    /// [`CreateOptions::allow_unprotected_exe`]).
    pub fn allow_unprotected_exe(mut self) -> FrontDoor {
        self.allow_unprotected_exe = true;
        self
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `<data_dir>/containers/<id>`.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The runtime's state root.
    pub fn runtime_root(&self) -> &Path {
        &self.runtime_root
    }

    /// The live log file of a container.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join(format!("{id}.log"))
    }

    /// The log files of a container, oldest first.
    pub fn log_files(&self, id: &str) -> Vec<PathBuf> {
        files_oldest_first(&self.log_path(id), LOG_MAX_FILES)
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        // Private, the data dir too: containers' files hold what their images hold.
        for d in [&self.data_dir, &self.dir] {
            crate::dirs::private_dir(d).map_err(io_err(format!("create {}", d.display())))?;
        }
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

    /// Every container's record (unreadable ones skipped), by creation time.
    pub fn records(&self) -> Result<Vec<ContainerRecord>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("read {}", self.dir.display()))(e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_full_id(&name) {
                if let Ok(r) = self.record(&name) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    fn record(&self, id: &str) -> Result<ContainerRecord> {
        use std::io::Read;
        let p = self.dir.join(id).join(RECORD_FILE);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FrontDoorError::NoSuchContainer(id.to_string()))
            }
            Err(e) => return Err(io_err(format!("read {}", p.display()))(e)),
        };
        let mut text = Vec::new();
        f.take(MAX_RECORD_BYTES)
            .read_to_end(&mut text)
            .map_err(io_err(format!("read {}", p.display())))?;
        serde_json::from_slice(&text).map_err(|e| FrontDoorError::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        })
    }

    fn save_record(&self, r: &ContainerRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(r).map_err(|e| FrontDoorError::Corrupt {
            id: r.id.clone(),
            reason: e.to_string(),
        })?;
        state::write_atomic(&self.dir.join(&r.id), RECORD_FILE, &data, true)
            .map_err(io_err("write container record"))
    }

    /// Find a container by exact name, full id, or unique id prefix.
    pub fn resolve(&self, name_or_id: &str) -> Result<ContainerRecord> {
        let records = self.records()?;
        let key = name_or_id.strip_prefix('/').unwrap_or(name_or_id);
        if let Some(r) = records.iter().find(|r| r.name == key || r.id == key) {
            return Ok(r.clone());
        }
        let hex = !key.is_empty() && key.bytes().all(|b| b.is_ascii_hexdigit());
        let mut by_prefix = records.iter().filter(|r| hex && r.id.starts_with(key));
        match (by_prefix.next(), by_prefix.next()) {
            (Some(r), None) => Ok(r.clone()),
            (Some(_), Some(_)) => Err(FrontDoorError::Ambiguous(name_or_id.to_string())),
            _ => Err(FrontDoorError::NoSuchContainer(name_or_id.to_string())),
        }
    }

    /// The runtime's handle of a container, `None` when it has no runtime state (yet).
    pub fn container(&self, id: &str) -> Result<Option<Container>> {
        match Container::load(&self.runtime_root, id) {
            Ok(c) => Ok(Some(c)),
            Err(ContainerError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The current state of a container.
    pub fn run_state(&self, r: &ContainerRecord) -> RunState {
        let Ok(Some(c)) = self.container(&r.id) else {
            return RunState::Created;
        };
        run_state_of(&c, r.started.unwrap_or(r.created))
    }

    /// Containers (running ones only unless `all`), newest first. Exited `--rm` containers
    /// whose remover did not get to them are removed here.
    pub fn list(&self, all: bool) -> Result<Vec<ContainerSummary>> {
        let mut out = Vec::new();
        for record in self.records()? {
            let state = self.run_state(&record);
            let ended = matches!(state, RunState::Exited { .. } | RunState::Dead);
            if record.auto_remove && ended {
                let _ = self.remove_with_volumes(&record.id, true, true);
                continue;
            }
            if all || state.is_running() {
                let network = Attachment::load(&self.dir.join(&record.id));
                out.push(ContainerSummary {
                    record,
                    state,
                    network,
                });
            }
        }
        Ok(out)
    }

    /// Image ids and chain ids of every local container's image: the front door's own
    /// containers and every other container dir that carries an [`IMAGE_USE_FILE`] (the
    /// worker's service tasks).
    pub fn images_in_use(&self) -> Result<ImagesInUse> {
        let mut u = ImagesInUse::default();
        for r in self.records()? {
            u.add(r.image_id, r.chain_ids);
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if let Some(used) = read_image_use(&e.path()) {
                    u.add(used.image_id, used.chain_ids);
                }
            }
        }
        Ok(u)
    }

    /// Create a container from an image: its dirs, record, `config.json` and the runtime's
    /// container (process waiting for [`start`](Self::start)). On failure nothing is left.
    pub fn create(&self, opts: &RunOptions) -> Result<NewContainer> {
        if !container::is_root() {
            return Err(FrontDoorError::NotRoot);
        }
        let wanted_name = opts.name.as_deref().map(check_name).transpose()?;
        // Bad mounts are refused before anything is made.
        crate::volume::validate_all(&opts.mounts)?;
        let store = ImageStore::open(&self.data_dir)?;
        // Fails on a missing image before anything is made.
        store.inspect(&opts.image)?;
        let prepared = store.prepare(&opts.image)?;

        let (record, mut guard, _creating) = {
            let _lock = self.lock()?;
            let records = self.records()?;
            let taken = |n: &str| records.iter().find(|r| r.name == n).map(|r| r.id.clone());
            if let Some(n) = &wanted_name {
                if let Some(id) = taken(n) {
                    return Err(FrontDoorError::NameInUse {
                        name: n.clone(),
                        id: id[..12].to_string(),
                    });
                }
            }
            let id = loop {
                let id = names::new_id()?;
                if !self.dir.join(&id).exists() {
                    break id;
                }
            };
            let name = match wanted_name {
                Some(n) => n,
                None => {
                    let mut chosen = None;
                    for attempt in 0..NAME_ATTEMPTS {
                        let n = names::generated_name(attempt)?;
                        if taken(&n).is_none() {
                            chosen = Some(n);
                            break;
                        }
                    }
                    chosen.unwrap_or_else(|| format!("shoal_{}", &id[..12]))
                }
            };
            let cdir = self.dir.join(&id);
            crate::dirs::create_private(&cdir)
                .map_err(io_err(format!("create {}", cdir.display())))?;
            let guard = DirGuard(Some(cdir.clone()), Vec::new());
            // Held until the runtime has the container, so `rm` cannot pull the dirs from
            // under a create in progress (and is free again if this process dies).
            let creating = lock_dir(&cdir, false)?;
            for d in ["upper", "work", "rootfs"] {
                std::fs::create_dir(cdir.join(d)).map_err(io_err(format!("create {d} dir")))?;
            }
            let icfg = prepared.config.config().as_ref();
            let record = ContainerRecord {
                id: id.clone(),
                name,
                image: opts.image.clone(),
                image_id: prepared.info.id.clone(),
                chain_ids: prepared.chain_ids.clone(),
                command: config::process_args(&prepared.config, &opts.command),
                created: now(),
                started: None,
                auto_remove: opts.auto_remove,
                stop_signal: icfg.and_then(|c| c.stop_signal().clone()),
            };
            // The record reserves the name: it is written before the lock is released.
            self.save_record(&record)?;
            (record, guard, creating)
        };
        let cdir = self.dir.join(&record.id);
        let attached = Volumes::open(&self.data_dir)?.attach(&cdir, &opts.mounts)?;
        guard.1 = attached.made.clone();
        let mut named = opts.clone();
        named.name = Some(record.name.clone());
        let bridge = BridgeConfig::from_env()?;
        let att = network::attach(&bridge, &record.id, &cdir, &opts.network)?;
        if att.mode == Mode::Host && named.hostname.is_none() {
            // Docker's: a host-network container is named like its host.
            named.hostname = nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned());
        }
        let mut etc = opts.etc.clone();
        etc.hostname = named
            .hostname
            .clone()
            .unwrap_or_else(|| record.short_id().to_string());
        network::write_etc_files(&cdir, &att, &etc)?;
        let mut spec = config::build_spec(
            &record.id,
            &named,
            &config::ImageView {
                layer_dirs: &prepared.layer_dirs,
                config: &prepared.config,
            },
            &cdir.join("upper"),
        )?;
        network::apply_to_spec(&mut spec, &att, &cdir)?;
        crate::volume::add_to_spec(&mut spec, &attached.mounts)?;
        let text = serde_json::to_vec_pretty(&spec).map_err(|e| FrontDoorError::Corrupt {
            id: record.id.clone(),
            reason: e.to_string(),
        })?;
        state::write_atomic(&cdir, "config.json", &text, false)
            .map_err(io_err("write config.json"))?;
        let copts = CreateOptions {
            overlay: Some(Overlay {
                lower_dirs: prepared.layer_dirs.clone(),
                upper: cdir.join("upper"),
                work: cdir.join("work"),
            }),
            log: Some(LogConfig {
                path: self.log_path(&record.id),
                max_bytes: LOG_MAX_BYTES,
                max_files: LOG_MAX_FILES,
            }),
            stdio: Stdio::Null,
            allow_unprotected_exe: self.allow_unprotected_exe,
        };
        let container = Container::create(&self.runtime_root, &record.id, &cdir, &copts)?;
        guard.0 = None;
        Ok(NewContainer { record, container })
    }

    /// Start a created container's process; on failure the container is removed (its
    /// anonymous volumes with it).
    pub fn start(&self, c: &mut NewContainer) -> Result<()> {
        if let Err(e) = c.container.start() {
            let _ = self.remove_with_volumes(&c.record.id, true, true);
            return Err(e.into());
        }
        c.record.started = Some(now());
        self.save_record(&c.record)
    }

    /// `create` then `start`.
    pub fn run(&self, opts: &RunOptions) -> Result<NewContainer> {
        let mut c = self.create(opts)?;
        self.start(&mut c)?;
        Ok(c)
    }

    /// Stop a container: its stop signal (SIGTERM unless the image says otherwise), then
    /// SIGKILL once `grace` has passed. Returns how it ended (`None` if it never ran).
    pub fn stop(&self, id: &str, grace: Duration) -> Result<Option<ExitStatus>> {
        let r = self.record(id)?;
        let Some(mut c) = self.container(id)? else {
            return Ok(None);
        };
        match c.status() {
            Status::Stopped => return Ok(c.exit_status()),
            // A frozen process cannot act on its signal; a never-started init has no handler.
            Status::Paused => c.resume()?,
            Status::Created | Status::Creating => {
                let _ = c.kill(libc::SIGKILL);
                return Ok(c.wait_timeout(Some(KILL_TIMEOUT))?);
            }
            Status::Running => {}
        }
        let sig = r
            .stop_signal
            .as_deref()
            .and_then(signal_number)
            .unwrap_or(libc::SIGTERM);
        if let Err(e) = c.kill(sig) {
            if c.status() != Status::Stopped {
                return Err(e.into());
            }
        }
        if let Some(s) = c.wait_timeout(Some(grace))? {
            return Ok(Some(s));
        }
        if let Err(e) = c.kill(libc::SIGKILL) {
            if c.status() != Status::Stopped {
                return Err(e.into());
            }
        }
        Ok(c.wait_timeout(Some(KILL_TIMEOUT))?)
    }

    /// Wait up to `timeout` (forever when `None`) for a container to exit.
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        match self.container(id)? {
            Some(mut c) => Ok(c.wait_timeout(timeout)?),
            None => Ok(None),
        }
    }

    /// Remove a container: its runtime state, cgroup, dirs and logs. A running one needs
    /// `force` (it is killed). Removing one that is already gone is not an error.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        self.remove_with_volumes(id, force, false)
    }

    /// [`remove`](Self::remove), and with `volumes` (`rm -v`, `run --rm`) the anonymous
    /// volumes the container used that no other container uses.
    pub fn remove_with_volumes(&self, id: &str, force: bool, volumes: bool) -> Result<()> {
        let _lock = self.lock()?;
        let cdir = self.dir.join(id);
        if !cdir.exists() {
            return Ok(());
        }
        let _creating = match lock_dir(&cdir, true) {
            Ok(l) => l,
            Err(FrontDoorError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EWOULDBLOCK) =>
            {
                return Err(FrontDoorError::Busy(id.to_string()))
            }
            Err(FrontDoorError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if let Some(c) = self.container(id)? {
            let status = c.status();
            if matches!(status, Status::Running | Status::Paused) && !force {
                let name = self
                    .record(id)
                    .map(|r| r.name)
                    .unwrap_or_else(|_| id.into());
                return Err(FrontDoorError::Running(name));
            }
            c.delete(true)?;
        }
        network::detach(id)?;
        let used = VolumeUse::load(&cdir);
        std::fs::remove_dir_all(&cdir).map_err(io_err(format!("remove {}", cdir.display())))?;
        if volumes {
            Volumes::open(&self.data_dir)?.remove_anonymous(&used)?;
        }
        Ok(())
    }

    /// Run another process in a running container.
    pub fn exec(&self, id: &str, opts: &ExecOptions) -> Result<ExecProcess> {
        let r = self.record(id)?;
        let c = self
            .container(id)?
            .ok_or_else(|| FrontDoorError::NotRunning(r.name.clone()))?;
        if !matches!(c.status(), Status::Running) {
            return Err(FrontDoorError::NotRunning(r.name));
        }
        Ok(c.exec(opts)?)
    }

    /// Remove the container once it exits, from a process of its own that outlives the
    /// caller (`run -d --rm`). The caller must be single-threaded or hold no locks.
    pub fn spawn_auto_remove(&self, id: &str) -> Result<()> {
        // SAFETY: the child only forks again and exits; the grandchild waits and removes
        // (allocating, which glibc's fork makes safe).
        let mid = unsafe { libc::fork() };
        if mid < 0 {
            return Err(io_err("fork")(std::io::Error::last_os_error()));
        }
        if mid == 0 {
            let _ = nix::unistd::setsid();
            // SAFETY: as above.
            if unsafe { libc::fork() } == 0 {
                // Hold none of the caller's files: its pipes would not see EOF until the
                // container ends.
                if let Ok(null) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    use std::os::fd::AsRawFd;
                    for fd in 0..3 {
                        let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
                    }
                }
                // Not closed, the caller's pipes would stay open: better to leave the
                // container for `rm` than to hold them.
                if crate::container::close_range(3, u32::MAX).is_err() {
                    // SAFETY: leaving a forked child without running the parent's destructors.
                    unsafe { libc::_exit(1) }
                }
                let _ = std::env::set_current_dir("/");
                let _ = self.wait(id, None);
                let _ = self.remove_with_volumes(id, true, true);
            }
            // SAFETY: leaving a forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        let mut st = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(mid, &mut st, 0) };
        Ok(())
    }
}

/// An exclusive flock on a directory (`try_only`: fail with EWOULDBLOCK instead of waiting).
fn lock_dir(dir: &Path, try_only: bool) -> Result<nix::fcntl::Flock<File>> {
    let f = File::open(dir).map_err(io_err(format!("open {}", dir.display())))?;
    let how = if try_only {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    } else {
        nix::fcntl::FlockArg::LockExclusive
    };
    nix::fcntl::Flock::lock(f, how)
        .map_err(|(_, e)| io_err(format!("lock {}", dir.display()))(e.into()))
}

/// `SIGTERM`, `TERM` or `15` as a signal number.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Some(n);
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse() {
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("quit"), Some(libc::SIGQUIT));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGNOPE"), None);
    }

    #[test]
    fn resolve_by_name_id_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let fd = FrontDoor::open(dir.path()).unwrap();
        let mk = |id: &str, name: &str| ContainerRecord {
            id: id.to_string(),
            name: name.to_string(),
            image: "bb".into(),
            image_id: "sha256:00".into(),
            chain_ids: vec!["sha256:c1".into()],
            command: vec!["sh".into()],
            created: 1,
            started: None,
            auto_remove: false,
            stop_signal: None,
        };
        let a = format!("abc{}", "0".repeat(61));
        let b = format!("abd{}", "1".repeat(61));
        for r in [mk(&a, "web"), mk(&b, "db")] {
            std::fs::create_dir_all(fd.container_dir(&r.id)).unwrap();
            fd.save_record(&r).unwrap();
        }
        assert_eq!(fd.resolve("web").unwrap().id, a);
        assert_eq!(fd.resolve(&b).unwrap().name, "db");
        assert_eq!(fd.resolve("abc").unwrap().id, a);
        assert!(matches!(
            fd.resolve("ab"),
            Err(FrontDoorError::Ambiguous(_))
        ));
        assert!(matches!(
            fd.resolve("nope"),
            Err(FrontDoorError::NoSuchContainer(_))
        ));
        let used = fd.images_in_use().unwrap();
        assert_eq!(used.image_ids, vec!["sha256:00".to_string()]);
        assert_eq!(used.chain_ids, vec!["sha256:c1".to_string()]);
    }

    #[test]
    fn task_containers_count_as_image_users() {
        let dir = tempfile::tempdir().unwrap();
        let fd = FrontDoor::open(dir.path()).unwrap();
        assert_eq!(fd.images_in_use().unwrap(), ImagesInUse::default());
        let task_dir = fd.container_dir("taskabc");
        record_image_use(
            &task_dir,
            "sha256:11",
            &["sha256:c1".into(), "sha256:c2".into()],
        )
        .unwrap();
        // A dir without the file (or with garbage in it) is no user.
        std::fs::create_dir_all(fd.container_dir("other")).unwrap();
        std::fs::create_dir_all(fd.container_dir("bad")).unwrap();
        std::fs::write(fd.container_dir("bad").join(IMAGE_USE_FILE), b"{").unwrap();
        let used = fd.images_in_use().unwrap();
        assert_eq!(used.image_ids, vec!["sha256:11".to_string()]);
        assert_eq!(
            used.chain_ids,
            vec!["sha256:c1".to_string(), "sha256:c2".to_string()]
        );
        std::fs::remove_dir_all(&task_dir).unwrap();
        assert_eq!(fd.images_in_use().unwrap(), ImagesInUse::default());
    }
}
