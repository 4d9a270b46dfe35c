//! Containers from OCI bundles: create, start, state, kill, pause, resume, wait, stats, exec,
//! delete, list — runc's lifecycle as a library.
//!
//! Process shape: `create` forks an intermediate child that forks the **monitor** and exits,
//! so the monitor is reparented away from the caller and outlives it. The monitor forks the
//! container's **init** straight into its new namespaces (a clone with namespace flags, no
//! exec of any runtime binary), so the init is the monitor's only child. The init sets up the
//! rootfs, reports `ready`, and blocks in `accept` on `<state dir>/start.sock` until `start`
//! connects; it then becomes the spec's process and execs it (the connection is close-on-exec:
//! EOF means the exec happened, a line means it failed). The monitor records the exit status in
//! `exit.json` (fsync + rename) and, when asked, copies output to a rotated log.

mod init;
mod monitor;
mod mountsrc;
mod plan;
pub mod state;
mod sys;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use state::{ExitStatus, State, Status};
pub use sys::close_range;

use crate::cgroups::{self, CgroupError, CgroupStats};
use crate::spec::{self, SpecError};

/// Default state root of the `shoal runtime` CLI.
pub const DEFAULT_ROOT: &str = "/run/shoal/runtime";
/// How long `create` waits for the init to be set up.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `delete -f` waits for the monitor after killing the init.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at removing a state dir the monitor is still writing into.
const REMOVE_RETRIES: u32 = 200;
/// Longest container id (ids name directories and cgroups).
const MAX_ID_LEN: usize = 128;
/// How long removing a container that is still being created waits for its creator.
const CREATOR_WAIT: Duration = Duration::from_secs(40);
/// Pause between two looks at a creator's lock.
const CREATOR_POLL: Duration = Duration::from_millis(20);

/// Overlayfs for the root: mounted at the spec's `root.path` inside the container's own mount
/// namespace, so the host never holds the mount.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// Read-only layers, lowest first.
    pub lower_dirs: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Capture of the container's stdout and stderr into `path`, rotated at `max_bytes` into
/// `path.1` … `path.<max_files>` (0: truncate instead).
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub max_files: u32,
}

/// Where the init's stdio goes when no log is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stdio {
    /// The caller's fds 0, 1, 2 (a foreground `run`).
    #[default]
    Inherit,
    /// /dev/null.
    Null,
}

/// How to create a container beyond what the bundle says.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub overlay: Option<Overlay>,
    /// When set, stdout and stderr go to the log and stdin is /dev/null.
    pub log: Option<LogConfig>,
    pub stdio: Stdio,
    /// Run even when the calling binary is not an immutable copy (see [`crate::exe`]); only for
    /// test binaries that embed the runtime.
    pub allow_unprotected_exe: bool,
}

/// An extra process in a running container.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs added to (or replacing in) the container's environment.
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// Return once it runs, without waiting for it.
    pub detach: bool,
    /// Kill it (its whole process group, which it leads) when it has not exited by then; a
    /// health check's bound. The process and its helper also die with their parents.
    pub timeout: Option<Duration>,
}

/// What `shoal runtime exec --timeout` says (exit 124) of a process killed at its timeout.
pub const EXEC_TIMED_OUT: &str = "exceeded its timeout";

/// How long an exec killed at its timeout may take to be reported gone before its helper is
/// killed too.
const EXEC_KILL_WAIT: Duration = Duration::from_secs(5);

/// Errors of the container lifecycle.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("shoal runtime must run as root")]
    NotRoot,
    #[error("invalid container id {0:?}: use 1-128 letters, digits, '_', '-', '.', not starting with '.'")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("cannot {op} container {id}: it is {status}")]
    WrongState {
        id: String,
        status: Status,
        op: &'static str,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Exe(#[from] crate::exe::ExeError),
    #[error(
        "the runtime binary is not protected: call shoal_runtime::exe::reexec_protected() first"
    )]
    ExeNotProtected,
    #[error("container setup failed: {0}")]
    Setup(String),
    #[error("start failed: {0}")]
    Start(String),
    #[error("exec failed: {0}")]
    Exec(String),
    #[error("the monitor of container {0} is gone and recorded no exit status")]
    MonitorGone(String),
    #[error("container {0} is still being created")]
    Creating(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

type Result<T, E = ContainerError> = std::result::Result<T, E>;

/// How long `create` looks for the init's own reason once talking to it failed.
const INIT_FAILURE_WAIT: Duration = Duration::from_secs(2);

/// The init builds the rootfs while `create` moves it into its cgroup, so it can fail and be
/// gone before `create` is done with it (ESRCH, EPIPE): its reason, if it gave one, is the
/// truer error.
fn init_failure(events: &mut Lines) -> Option<ContainerError> {
    match events.next(Some(Instant::now() + INIT_FAILURE_WAIT)) {
        Some(l) if l != "ready" => Some(setup_error(&l)),
        _ => None,
    }
}

/// What [`Lines::next_line`] found.
enum Next {
    Line(String),
    Eof,
    TimedOut,
}

/// Line protocol reader over a pipe or socket (messages from monitor and init).
struct Lines {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Lines {
    fn new(fd: OwnedFd) -> Lines {
        Lines {
            fd,
            buf: Vec::new(),
        }
    }

    /// The next line, `None` on EOF or when `deadline` passes.
    fn next(&mut self, deadline: Option<Instant>) -> Option<String> {
        match self.next_line(deadline) {
            Next::Line(l) => Some(l),
            Next::Eof | Next::TimedOut => None,
        }
    }

    /// The next line, telling EOF (or a read error) from `deadline` passing.
    fn next_line(&mut self, deadline: Option<Instant>) -> Next {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Next::Line(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let timeout = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Next::TimedOut;
                    }
                    // Rounded up: poll's milliseconds must not wake before the deadline.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            match sys::pidfd_wait(self.fd.as_raw_fd(), timeout) {
                Ok(true) => {}
                // Timed out: the deadline check above decides (a poll may wake a bit early).
                Ok(false) => continue,
                Err(_) => return Next::Eof,
            }
            let mut chunk = [0u8; 4096];
            match sys::read(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) | Err(_) => return Next::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn parse_exit(rest: &str) -> ExitStatus {
    let mut it = rest.split(' ').map(|s| s.parse::<i32>().unwrap_or(-1));
    let code = it.next().unwrap_or(-1);
    let sig = it.next().unwrap_or(0);
    if code >= 0 {
        ExitStatus {
            code: Some(code),
            signal: None,
        }
    } else {
        ExitStatus {
            code: None,
            signal: Some(sig),
        }
    }
}

/// True when the effective user is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

/// `dir/name` as a path short enough for a unix socket address (through the dir's fd).
fn socket_path(dir_fd: &std::fs::File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir_fd.as_raw_fd()))
}

/// A container under a state root.
pub struct Container {
    root: PathBuf,
    dir: PathBuf,
    state: State,
    /// The monitor's channel, held by the process that created the container (fast `wait`).
    events: Option<Lines>,
}

/// What `create` has done so far, undone on failure.
struct Undo {
    dir: Option<PathBuf>,
    cgroup: Option<Box<dyn cgroups::CgroupManager>>,
    init: Option<OwnedFd>,
    monitor: Option<OwnedFd>,
}

impl Undo {
    fn run(&mut self) {
        if let Some(p) = self.init.take() {
            let _ = sys::pidfd_send_signal(p.as_raw_fd(), libc::SIGKILL);
            let _ = sys::pidfd_wait(p.as_raw_fd(), 5000);
        }
        if let Some(m) = self.monitor.take() {
            let _ = sys::pidfd_wait(m.as_raw_fd(), 5000);
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.destroy();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Container {
    /// Create container `id` from the bundle at `bundle`: namespaces and rootfs ready, its
    /// process waiting to be started. On failure nothing is left behind.
    pub fn create(root: &Path, id: &str, bundle: &Path, opts: &CreateOptions) -> Result<Container> {
        if !is_root() {
            return Err(ContainerError::NotRoot);
        }
        check_id(id)?;
        if !opts.allow_unprotected_exe && !crate::exe::is_protected() {
            return Err(ContainerError::ExeNotProtected);
        }
        let bundle = std::path::absolute(bundle).map_err(io_err("bundle path"))?;
        let spec = spec::load(&bundle)?;
        let cgroup_rel = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().trim_start_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("shoal/{id}"));
        std::fs::create_dir_all(root).map_err(io_err(format!("create {}", root.display())))?;
        let dir = root.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists(id.to_string()))
            }
            Err(e) => return Err(io_err(format!("create {}", dir.display()))(e)),
        }
        // Held until this returns (the monitor closes its copy at once): a remover tells a
        // container still being made from one whose creator died half-way by it.
        let _creating = match lock_dir(&dir, None) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut undo = Undo {
            dir: Some(dir.clone()),
            cgroup: None,
            init: None,
            monitor: None,
        };
        let r = Self::create_in(root, &dir, id, &bundle, &spec, &cgroup_rel, opts, &mut undo);
        if r.is_err() {
            undo.run();
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn create_in(
        root: &Path,
        dir: &Path,
        id: &str,
        bundle: &Path,
        spec: &oci_spec::runtime::Spec,
        cgroup_rel: &str,
        opts: &CreateOptions,
        undo: &mut Undo,
    ) -> Result<Container> {
        let resources = resources_with_default_devices(spec)?;
        // Before the cgroup exists, so nothing can make one this dir does not name.
        std::fs::write(dir.join(state::CGROUP_FILE), cgroup_rel)
            .map_err(io_err("record the cgroup path"))?;
        let cg = cgroups::create(cgroup_rel, resources.as_ref())?;
        undo.cgroup = Some(cg);
        let plan = plan::build(spec, bundle, cgroup_rel, opts.overlay.clone())?;

        let dir_fd = std::fs::File::open(dir).map_err(io_err("open state dir"))?;
        let listener = UnixListener::bind(socket_path(&dir_fd, state::START_SOCKET))
            .map_err(io_err("bind start socket"))?;
        let (ev_r, ev_w) = sys::pipe().map_err(io_err("pipe"))?;
        let (go_r, go_w) = sys::pipe().map_err(io_err("pipe"))?;
        let launch = monitor::Launch {
            to_creator: ev_w.as_raw_fd(),
            go: go_r.as_raw_fd(),
            listen: listener.as_raw_fd(),
            state_dir: dir,
            log: opts.log.as_ref(),
            stdio: opts.stdio,
        };
        // SAFETY: the child only forks again and runs the monitor, touching no lock another
        // thread of the caller could hold except malloc's, which glibc's fork makes safe.
        let mid = unsafe { libc::fork() };
        if mid < 0 {
            return Err(io_err("fork")(std::io::Error::last_os_error()));
        }
        if mid == 0 {
            monitor::intermediate(&plan, &launch);
        }
        let mut st = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(mid, &mut st, 0) };
        drop(ev_w);
        drop(go_r);
        drop(listener);
        let mut events = Lines::new(ev_r);
        let deadline = Some(Instant::now() + CREATE_TIMEOUT);

        let (monitor_pid, init_pid) = match events.next(deadline) {
            Some(l) if l.starts_with("pid ") => {
                let mut it = l[4..].split(' ').map(|s| s.parse::<i32>().unwrap_or(0));
                (it.next().unwrap_or(0), it.next().unwrap_or(0))
            }
            Some(l) => return Err(setup_error(&l)),
            None => {
                return Err(ContainerError::Setup(
                    "the monitor exited before starting the init".into(),
                ))
            }
        };
        undo.init = sys::pidfd_open(init_pid).ok();
        undo.monitor = sys::pidfd_open(monitor_pid).ok();
        let init_start_time = sys::start_time(init_pid).unwrap_or(0);
        let monitor_start_time = sys::start_time(monitor_pid).unwrap_or(0);
        if let Some(cg) = &undo.cgroup {
            if let Err(e) = cg.add_task(init_pid) {
                return Err(init_failure(&mut events).unwrap_or(e.into()));
            }
        }
        if plan.new_user_ns {
            for (file, map) in [("uid_map", &plan.uid_map), ("gid_map", &plan.gid_map)] {
                if !map.is_empty() {
                    std::fs::write(format!("/proc/{init_pid}/{file}"), map)
                        .map_err(io_err(format!("write {file}")))?;
                }
            }
        }
        if let Err(e) = sys::write_all(go_w.as_raw_fd(), b"g") {
            return Err(init_failure(&mut events).unwrap_or(io_err("signal the init")(e)));
        }
        drop(go_w);
        match events.next(deadline) {
            Some(l) if l == "ready" => {}
            Some(l) => return Err(setup_error(&l)),
            None => {
                return Err(ContainerError::Setup(
                    "timed out waiting for the container init".into(),
                ))
            }
        }
        let state = State {
            oci_version: spec.version().clone(),
            id: id.to_string(),
            status: Status::Created,
            pid: init_pid,
            bundle: bundle.to_path_buf(),
            annotations: spec.annotations().clone().unwrap_or_default(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            init_start_time,
            monitor_pid,
            monitor_start_time,
            cgroup: cgroup_rel.to_string(),
        };
        let c = Container {
            root: root.to_path_buf(),
            dir: dir.to_path_buf(),
            state,
            events: Some(events),
        };
        // The spec rides along in state.json (one file to write and remove) for `exec`.
        let file = state::StateFile {
            state: c.state.clone(),
            config: spec.clone(),
        };
        let data = serde_json::to_vec(&file).map_err(|e| ContainerError::Setup(e.to_string()))?;
        state::write_atomic(dir, state::STATE_FILE, &data, false).map_err(io_err("write state"))?;
        undo.dir = None;
        undo.cgroup = None;
        undo.init = None;
        undo.monitor = None;
        Ok(c)
    }

    /// Open an existing container (from any process).
    pub fn load(root: &Path, id: &str) -> Result<Container> {
        Ok(Self::load_with_config(root, id)?.0)
    }

    /// Open an existing container with the process arguments it was created with.
    pub fn load_with_args(root: &Path, id: &str) -> Result<(Container, Vec<String>)> {
        let (c, spec) = Self::load_with_config(root, id)?;
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default();
        Ok((c, args))
    }

    fn load_with_config(root: &Path, id: &str) -> Result<(Container, oci_spec::runtime::Spec)> {
        check_id(id)?;
        let dir = root.join(id);
        let text = match std::fs::read(dir.join(state::STATE_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ContainerError::NotFound(id.to_string()))
            }
            Err(e) => return Err(io_err("read state")(e)),
        };
        let file: state::StateFile = serde_json::from_slice(&text)
            .map_err(|e| ContainerError::Setup(format!("corrupt state of {id}: {e}")))?;
        let c = Container {
            root: root.to_path_buf(),
            dir,
            state: file.state,
            events: None,
        };
        Ok((c, file.config))
    }

    /// Every container under `root`, with current status.
    pub fn list(root: &Path) -> Result<Vec<State>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(format!("read {}", root.display()))(e)),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match Container::load(root, &name) {
                Ok(c) => out.push(c.state()),
                Err(ContainerError::NotFound(_)) if check_id(&name).is_ok() => {
                    if let Some(s) = half_made(&e.path(), &name) {
                        out.push(s);
                    }
                }
                Err(_) => {}
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Removes container `id` whatever it is doing, as `delete --force` does: a container is
    /// killed and deleted; one still being created is waited for (up to a bound) and then
    /// deleted; what a creator that died half-way left (a state dir without `state.json`, and
    /// the cgroup it names, with any process in it) is removed. `NotFound` when there is
    /// nothing of it.
    pub fn remove(root: &Path, id: &str) -> Result<()> {
        check_id(id)?;
        let dir = root.join(id);
        match Container::load(root, id) {
            Ok(c) => return c.delete(true),
            Err(ContainerError::NotFound(_)) if dir.is_dir() => {}
            Err(e) => return Err(e),
        }
        let _creating = match lock_dir(&dir, Some(CREATOR_WAIT)) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(ContainerError::Creating(id.to_string())),
            // Removed meanwhile by someone else.
            Err(ContainerError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(ContainerError::NotFound(id.to_string()))
            }
            Err(e) => return Err(e),
        };
        match Container::load(root, id) {
            // Its creator finished meanwhile.
            Ok(c) => return c.delete(true),
            Err(ContainerError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        // Its creator is gone: it either never made the cgroup, or put the init in it (the
        // monitor, outside it, ends with the init or, without a `go`, by itself).
        let rel = std::fs::read_to_string(dir.join(state::CGROUP_FILE))
            .ok()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| format!("shoal/{id}"));
        match cgroups::open(rel.trim()) {
            Ok(cg) => cg.destroy()?,
            Err(CgroupError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        remove_state_dir(&dir)
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// The state root this container lives under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The init's pid on the host.
    pub fn pid(&self) -> i32 {
        self.state.pid
    }

    /// The monitor's pid on the host.
    pub fn monitor_pid(&self) -> i32 {
        self.state.monitor_pid
    }

    fn init_alive(&self) -> bool {
        sys::same_process(self.state.pid, self.state.init_start_time)
    }

    /// The current status, read from the processes and files.
    pub fn status(&self) -> Status {
        if self.dir.join(state::EXIT_FILE).exists() || !self.init_alive() {
            return Status::Stopped;
        }
        if self.dir.join(state::START_SOCKET).exists() {
            return Status::Created;
        }
        match cgroups::open(&self.state.cgroup).and_then(|c| c.is_frozen()) {
            Ok(true) => Status::Paused,
            _ => Status::Running,
        }
    }

    /// The OCI state with the current status (pid 0 once stopped).
    pub fn state(&self) -> State {
        let mut s = self.state.clone();
        s.status = self.status();
        if s.status == Status::Stopped {
            s.pid = 0;
        }
        s
    }

    fn require(&self, op: &'static str, ok: &[Status]) -> Result<Status> {
        let s = self.status();
        if ok.contains(&s) {
            Ok(s)
        } else {
            Err(ContainerError::WrongState {
                id: self.state.id.clone(),
                status: s,
                op,
            })
        }
    }

    /// Run the spec's process in a created container.
    pub fn start(&mut self) -> Result<()> {
        self.require("start", &[Status::Created])?;
        let dir_fd = std::fs::File::open(&self.dir).map_err(io_err("open state dir"))?;
        let mut conn = UnixStream::connect(socket_path(&dir_fd, state::START_SOCKET))
            .map_err(io_err("connect to the container init"))?;
        let mut reply = String::new();
        use std::io::Read;
        let _ = conn.read_to_string(&mut reply);
        // Status is read from the processes and this socket's presence: no state rewrite.
        let _ = std::fs::remove_file(self.dir.join(state::START_SOCKET));
        match reply.trim().strip_prefix("error ") {
            Some(msg) => Err(ContainerError::Start(msg.to_string())),
            None => Ok(()),
        }
    }

    /// Send `signal` to the container's init.
    pub fn kill(&self, signal: i32) -> Result<()> {
        self.require("kill", &[Status::Created, Status::Running, Status::Paused])?;
        let fd = sys::pidfd_open(self.state.pid).map_err(io_err("open the init"))?;
        if !self.init_alive() {
            return Err(ContainerError::WrongState {
                id: self.state.id.clone(),
                status: Status::Stopped,
                op: "kill",
            });
        }
        sys::pidfd_send_signal(fd.as_raw_fd(), signal)
            .map_err(io_err(format!("send signal {signal}")))
    }

    /// Freeze every process of the container.
    pub fn pause(&self) -> Result<()> {
        self.require("pause", &[Status::Running])?;
        Ok(cgroups::open(&self.state.cgroup)?.freeze()?)
    }

    /// Thaw a paused container.
    pub fn resume(&self) -> Result<()> {
        self.require("resume", &[Status::Paused])?;
        Ok(cgroups::open(&self.state.cgroup)?.thaw()?)
    }

    /// Cpu time, memory usage and peak, pids of the container's cgroup.
    pub fn stats(&self) -> Result<CgroupStats> {
        Ok(cgroups::open(&self.state.cgroup)?.stats()?)
    }

    /// Host pids of every process in the container.
    pub fn pids(&self) -> Result<Vec<i32>> {
        Ok(cgroups::open(&self.state.cgroup)?.pids()?)
    }

    /// The exit status once the init has exited (without waiting).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        state::read_exit(&self.dir)
    }

    /// Wait for the init to exit and return how it ended.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.wait_timeout(None)?
            .ok_or_else(|| ContainerError::MonitorGone(self.state.id.clone()))
    }

    /// Like [`wait`](Self::wait) but gives up after `timeout` with `Ok(None)`.
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        self.wait_inner(timeout, true)
    }

    /// Like [`wait`](Self::wait) but returns as soon as the monitor has reaped the init, before
    /// `exit.json` is durable: for a creator that deletes the container next (`run`). Other
    /// processes may briefly see the container stopped with no exit status yet.
    pub fn wait_reaped(&mut self) -> Result<ExitStatus> {
        self.wait_inner(None, false)?
            .ok_or_else(|| ContainerError::MonitorGone(self.state.id.clone()))
    }

    fn wait_inner(
        &mut self,
        timeout: Option<Duration>,
        durable: bool,
    ) -> Result<Option<ExitStatus>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if let Some(ev) = self.events.as_mut() {
            let mut reaped = None;
            while let Some(line) = ev.next(deadline) {
                if let Some(rest) = line.strip_prefix("exit ") {
                    reaped = Some(parse_exit(rest));
                    if !durable {
                        return Ok(reaped);
                    }
                } else if line == "recorded" && reaped.is_some() {
                    return Ok(reaped);
                }
            }
            if reaped.is_some() && deadline.is_none_or(|d| Instant::now() < d) {
                // The monitor failed to record it; what it reaped is still the truth.
                return Ok(reaped);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            self.events = None;
        }
        if let Some(s) = self.exit_status() {
            return Ok(Some(s));
        }
        if let Ok(fd) = sys::pidfd_open(self.state.monitor_pid) {
            if sys::same_process(self.state.monitor_pid, self.state.monitor_start_time) {
                let ms = match deadline {
                    None => -1,
                    Some(d) => d
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(i32::MAX as u128) as i32,
                };
                if !sys::pidfd_wait(fd.as_raw_fd(), ms).map_err(io_err("wait for the monitor"))? {
                    return Ok(None);
                }
            }
        }
        match self.exit_status() {
            Some(s) => Ok(Some(s)),
            None => Err(ContainerError::MonitorGone(self.state.id.clone())),
        }
    }

    /// Remove the container: its cgroup, state dir and (inside its mount namespace) every
    /// mount. A running or paused container needs `force`, which kills it first.
    pub fn delete(mut self, force: bool) -> Result<()> {
        let status = self.status();
        match status {
            Status::Stopped | Status::Created => {}
            _ if force => {}
            _ => {
                return Err(ContainerError::WrongState {
                    id: self.state.id.clone(),
                    status,
                    op: "delete",
                })
            }
        }
        let cg = match cgroups::open(&self.state.cgroup) {
            Ok(c) => Some(c),
            Err(CgroupError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if status != Status::Stopped {
            if let Ok(fd) = sys::pidfd_open(self.state.pid) {
                if self.init_alive() {
                    let _ = sys::pidfd_send_signal(fd.as_raw_fd(), libc::SIGKILL);
                }
            }
        }
        if let Some(c) = &cg {
            // A frozen init cannot die; destroy thaws and kills whatever is left.
            c.destroy()?;
        }
        if status != Status::Stopped {
            let _ = self.wait_inner(Some(DELETE_TIMEOUT), false);
        }
        remove_state_dir(&self.dir)
    }

    /// Run another process inside the running container.
    pub fn exec(&self, opts: &ExecOptions) -> Result<ExecProcess> {
        self.require("exec", &[Status::Created, Status::Running])?;
        let (_, spec) = Self::load_with_config(&self.root, &self.state.id)?;
        let mut process = spec
            .process()
            .clone()
            .ok_or_else(|| ContainerError::Exec("no process in spec".into()))?;
        if opts.args.is_empty() {
            return Err(ContainerError::Exec("no command given".into()));
        }
        process.set_args(Some(opts.args.clone()));
        let mut env = process.env().clone().unwrap_or_default();
        for kv in &opts.env {
            let key = kv.split('=').next().unwrap_or(kv);
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        process.set_env(Some(env));
        if let Some(cwd) = &opts.cwd {
            process.set_cwd(cwd.clone());
        }
        let pplan = plan::process_plan(&spec, &process)?;
        let mut nss = Vec::new();
        for (name, flag) in [
            ("user", nix::sched::CloneFlags::CLONE_NEWUSER),
            ("ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
            ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
            ("net", nix::sched::CloneFlags::CLONE_NEWNET),
            ("cgroup", nix::sched::CloneFlags::CLONE_NEWCGROUP),
            ("pid", nix::sched::CloneFlags::CLONE_NEWPID),
            ("mnt", nix::sched::CloneFlags::CLONE_NEWNS),
        ] {
            let theirs = format!("/proc/{}/ns/{name}", self.state.pid);
            let mine = format!("/proc/self/ns/{name}");
            let (a, b) = (std::fs::metadata(&theirs), std::fs::metadata(&mine));
            use std::os::unix::fs::MetadataExt;
            if let (Ok(a), Ok(b)) = (&a, &b) {
                if a.ino() == b.ino() && a.dev() == b.dev() {
                    continue;
                }
            }
            let f = std::fs::File::open(&theirs).map_err(io_err(format!("open {theirs}")))?;
            nss.push((f, flag));
        }
        if !self.init_alive() {
            return Err(ContainerError::WrongState {
                id: self.state.id.clone(),
                status: Status::Stopped,
                op: "exec",
            });
        }
        let cg = cgroups::open(&self.state.cgroup)?;
        let (ev_r, ev_w) = sys::pipe().map_err(io_err("pipe"))?;
        // SAFETY: see `create`; the child only joins namespaces, forks and execs.
        let helper = unsafe { libc::fork() };
        if helper < 0 {
            return Err(io_err("fork")(std::io::Error::last_os_error()));
        }
        if helper == 0 {
            let bounded = opts.timeout.is_some() && !opts.detach;
            exec_helper(
                &nss,
                cg.as_ref(),
                &pplan,
                ev_w.as_raw_fd(),
                opts.detach,
                bounded,
            );
        }
        drop(ev_w);
        let mut events = Lines::new(ev_r);
        let mut pid = 0;
        let mut exit = None;
        let mut deadline = opts
            .timeout
            .filter(|_| !opts.detach)
            .map(|t| Instant::now() + t);
        let mut timed_out = false;
        loop {
            let line = match events.next_line(deadline) {
                Next::Line(l) => l,
                Next::Eof => break, // the helper is gone
                Next::TimedOut if timed_out => {
                    // Killed, and still not reported gone: give up on the helper too.
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(helper, libc::SIGKILL) };
                    break;
                }
                Next::TimedOut => {
                    timed_out = true;
                    if pid > 0 {
                        // SAFETY: plain kill(2); the process leads its own group (see
                        // exec_helper), so whatever it started in the group goes too.
                        unsafe {
                            libc::kill(-pid, libc::SIGKILL);
                            libc::kill(pid, libc::SIGKILL);
                        }
                    } else {
                        // SAFETY: signalling our own child; its child dies with it.
                        unsafe { libc::kill(helper, libc::SIGKILL) };
                    }
                    deadline = Some(Instant::now() + EXEC_KILL_WAIT);
                    continue;
                }
            };
            if let Some(p) = line.strip_prefix("pid ") {
                pid = p.parse().unwrap_or(0);
            } else if let Some(msg) = line.strip_prefix("error ") {
                let mut st = 0;
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(helper, &mut st, 0) };
                return Err(ContainerError::Exec(msg.to_string()));
            } else if let Some(rest) = line.strip_prefix("exit ") {
                exit = Some(parse_exit(rest));
                break;
            }
        }
        let mut st = 0;
        if opts.detach || exit.is_some() || opts.timeout.is_some() {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(helper, &mut st, 0) };
        }
        Ok(ExecProcess {
            pid,
            exit,
            detached: opts.detach,
            timed_out,
        })
    }
}

/// Removes a container's state dir. The monitor may be writing exit.json right now (it writes
/// through its own fd of this dir, so nothing lands in a later container of the same name):
/// retry while it does.
fn remove_state_dir(dir: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tries < REMOVE_RETRIES && e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(io_err(format!("remove {}", dir.display()))(e)),
        }
    }
}

/// An exclusive flock on a container's state dir: `None` waits for it, `Some(bound)` gives up
/// after `bound` with `Ok(None)`.
fn lock_dir(
    dir: &Path,
    bound: Option<Duration>,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use nix::fcntl::{Flock, FlockArg};
    let open = || std::fs::File::open(dir).map_err(io_err(format!("open {}", dir.display())));
    let Some(bound) = bound else {
        return Flock::lock(open()?, FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, e)| io_err(format!("lock {}", dir.display()))(e.into()));
    };
    let deadline = Instant::now() + bound;
    let mut f = open()?;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(Some(l)),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                f = back;
                std::thread::sleep(CREATOR_POLL);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(io_err(format!("lock {}", dir.display()))(e.into())),
        }
    }
}

/// The state of a container that has a state dir but no `state.json` yet: being created, or
/// left by a creator that died half-way (`None` for anything else in the root).
fn half_made(dir: &Path, id: &str) -> Option<State> {
    let meta = std::fs::symlink_metadata(dir).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let created = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Some(State {
        oci_version: String::new(),
        id: id.to_string(),
        status: Status::Creating,
        pid: 0,
        bundle: PathBuf::new(),
        annotations: Default::default(),
        created,
        init_start_time: 0,
        monitor_pid: 0,
        monitor_start_time: 0,
        cgroup: std::fs::read_to_string(dir.join(state::CGROUP_FILE))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    })
}

/// A process started by [`Container::exec`].
pub struct ExecProcess {
    /// Its pid on the host.
    pub pid: i32,
    exit: Option<ExitStatus>,
    detached: bool,
    timed_out: bool,
}

impl ExecProcess {
    /// It outlived [`ExecOptions::timeout`] and was killed.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// How it ended (`None` when it was detached).
    pub fn wait(self) -> Option<ExitStatus> {
        if self.detached {
            None
        } else {
            self.exit
        }
    }
}

/// The forked helper of `exec`: join the container, fork the process (a pid namespace applies
/// to children only), and relay its exit status unless detached.
fn exec_helper(
    nss: &[(std::fs::File, nix::sched::CloneFlags)],
    cg: &dyn cgroups::CgroupManager,
    p: &plan::ProcessPlan,
    ev: RawFd,
    detach: bool,
    bounded: bool,
) -> ! {
    let fail = |msg: String| -> ! {
        monitor::send(ev, &format!("error {msg}"));
        // SAFETY: leaving a forked child.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: prctl and signal calls with plain arguments. Non-dumpable: nothing in the
    // container may open this process's /proc/<pid>/exe (the runtime binary) before exec.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    if bounded {
        // A bounded exec dies with its caller (killed at its timeout, or gone): so does this
        // helper, and (below) the process.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    }
    if let Err(e) = cg.add_task(std::process::id() as i32) {
        fail(format!("join cgroup: {e}"));
    }
    for (f, flag) in nss {
        if let Err(e) = nix::sched::setns(f, *flag) {
            fail(format!("join {flag:?} namespace: {e}"));
        }
    }
    // SAFETY: single-threaded fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        if bounded {
            // Its own process group, so the timeout kills what it started as well.
            // SAFETY: setpgid and prctl with integer arguments.
            unsafe {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
        }
        if let Err(init::Fail(msg)) = init::exec_process(p, &[ev]) {
            fail(msg);
        }
        // SAFETY: leaving a forked child.
        unsafe { libc::_exit(127) }
    }
    // The pid the host sees: this helper is still in the caller's pid namespace.
    monitor::send(ev, &format!("pid {pid}"));
    if detach {
        // SAFETY: leaving a forked child.
        unsafe { libc::_exit(0) }
    }
    let mut st = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    let line = if libc::WIFEXITED(st) {
        format!("exit {} 0", libc::WEXITSTATUS(st))
    } else {
        format!("exit -1 {}", libc::WTERMSIG(st))
    };
    monitor::send(ev, &line);
    // SAFETY: leaving a forked child.
    unsafe { libc::_exit(0) }
}

/// The spec's device rules followed by the devices every container gets (as runc adds them),
/// so a deny-all rule list still lets the init create and use its minimal /dev.
fn resources_with_default_devices(
    spec: &oci_spec::runtime::Spec,
) -> Result<Option<oci_spec::runtime::LinuxResources>> {
    use oci_spec::runtime::{LinuxDeviceCgroupBuilder, LinuxDeviceType as T};
    let Some(linux) = spec.linux() else {
        return Ok(None);
    };
    let Some(res) = linux.resources() else {
        return Ok(None);
    };
    let mut res = res.clone();
    let Some(rules) = res.devices().clone().filter(|r| !r.is_empty()) else {
        return Ok(Some(res));
    };
    let mut rules = rules;
    let rule = |typ: T, major: Option<i64>, minor: Option<i64>, access: &str| {
        LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(typ)
            .major(major.unwrap_or(-1))
            .minor(minor.unwrap_or(-1))
            .access(access)
            .build()
            .map_err(|e| ContainerError::Spec(SpecError::Build(e)))
    };
    rules.push(rule(T::C, None, None, "m")?);
    rules.push(rule(T::B, None, None, "m")?);
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        rules.push(rule(T::C, Some(major), Some(minor), "rwm")?);
    }
    rules.push(rule(T::C, Some(136), None, "rwm")?);
    for d in linux.devices().iter().flatten().filter(|d| d.typ() != T::P) {
        rules.push(rule(d.typ(), Some(d.major()), Some(d.minor()), "rwm")?);
    }
    res.set_devices(Some(rules));
    Ok(Some(res))
}

fn setup_error(line: &str) -> ContainerError {
    if let Some(msg) = line.strip_prefix("error ") {
        ContainerError::Setup(msg.to_string())
    } else if let Some(rest) = line.strip_prefix("exit ") {
        let s = parse_exit(rest);
        ContainerError::Setup(format!(
            "the container init exited during setup ({})",
            s.shell_code()
        ))
    } else {
        ContainerError::Setup(format!("unexpected message from the monitor: {line}"))
    }
}
