//! Multi-host test bed for integration tests: a driver of `deploy/testbed.sh`.
//!
//! [`Testbed::up`] claims a free slot `k` (1..=[`MAX_SLOTS`], held by a file lock for the
//! test bed's lifetime, so parallel test processes never share one), clears whatever a crashed
//! earlier holder of that slot left, and brings up `n` hosts `sh<k>-h1..n` on `10.77.<k>.0/24`
//! with the bridge `sh<k>-br0` at `10.77.<k>.254`. Dropping the [`Testbed`] brings it all down
//! (processes, mounts, namespaces, links, host dirs). Everything the script does is the real
//! thing: tests that use this need root.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

/// Slots (and so `10.77.<k>.0/24` subnets) test beds are drawn from; 0 is the script's default.
pub const MAX_SLOTS: u32 = 200;
/// The port `testbed.sh agent` makes the agent listen on, on the host's address.
pub const AGENT_PORT: u16 = 4242;
/// Where the script keeps its state and the hosts' directories.
pub const STATE_ROOT: &str = "/run/shoal-testbed";
/// How long [`Host::spawn_agent`] waits for the agent's control socket.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Host::kill`] with [`Signal::Kill`] waits for the agent to be gone.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling period of the waits above.
const POLL: Duration = Duration::from_millis(50);
/// Bytes of a failed command's stderr (or an agent's log) kept in an error.
const ERR_TAIL_BYTES: usize = 2000;

/// What can go wrong driving the test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the test bed needs root (network namespaces)")]
    NotRoot,
    #[error("no free test bed slot among {0}")]
    NoFreeSlot(u32),
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("no shoal binary: set SHOAL_BIN or build the shoal binary (tried {0})")]
    NoShoalBin(String),
    #[error("exec needs a command")]
    NoCommand,
    #[error("no host {0} in this test bed (hosts are numbered from 1)")]
    NoHost(usize),
    #[error("unexpected output from {cmd}: {output}")]
    BadOutput { cmd: String, output: String },
    #[error("the agent in {host} exited before its socket appeared; log: {log}")]
    AgentDied { host: String, log: String },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
}

/// A signal [`Host::kill`] sends to the host's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Int,
    Kill,
    Stop,
    Cont,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Int => "-INT",
            Signal::Kill => "-KILL",
            Signal::Stop => "-STOP",
            Signal::Cont => "-CONT",
        }
    }
}

/// The script, next to this crate in the repository.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/testbed.sh")
}

/// The shoal binary: $SHOAL_BIN, else the one cargo built next to this test executable, else
/// the repository's target/debug or target/release.
pub fn shoal_bin() -> Result<PathBuf, TestbedError> {
    if let Some(b) = std::env::var_os("SHOAL_BIN") {
        return Ok(PathBuf::from(b));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test>-<hash> -> target/<profile>/shoal
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join("shoal"));
        }
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(repo.join("target/debug/shoal"));
    candidates.push(repo.join("target/release/shoal"));
    let mut tried = Vec::new();
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(TestbedError::NoShoalBin(tried.join(", ")))
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub(crate) fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(ERR_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying its stderr.
fn run_ok(cmd: &mut Command) -> Result<String, TestbedError> {
    let out = run(cmd)?;
    if !out.status.success() {
        return Err(TestbedError::Failed {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: tail(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<Output, TestbedError> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            cmd: describe(cmd),
            source,
        })
}

/// True while `pid` is a process that has not exited (a zombie has).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rsplit_once(") ") {
            Some((_, rest)) => !matches!(rest.chars().next(), Some('Z' | 'X') | None),
            None => false,
        },
        Err(_) => false,
    }
}

/// Whether `pid` is stopped (SIGSTOP).
pub fn pid_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
        .unwrap_or(false)
}

/// Writes a root filesystem tar holding /bin/busybox, its applets as symlinks and a root
/// user: an image for `shoal image import` made from this machine's busybox.
pub fn busybox_rootfs_tar(path: &Path) -> Result<(), TestbedError> {
    let io_err = |what: &str| {
        let what = format!("{what} for {}", path.display());
        move |source| TestbedError::Io { what, source }
    };
    let busybox = fs::read("/bin/busybox").map_err(io_err("reading /bin/busybox"))?;
    let list = run_ok(Command::new("/bin/busybox").arg("--list"))?;
    let file = File::create(path).map_err(io_err("creating the tar"))?;
    let mut b = tar::Builder::new(file);
    let mut add = |h: &mut tar::Header, name: &str, data: &[u8]| {
        h.set_size(data.len() as u64);
        b.append_data(h, name, data)
    };
    for d in ["bin", "etc", "tmp", "root"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        add(&mut h, d, &[]).map_err(io_err("writing the tar"))?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    add(&mut h, "bin/busybox", &busybox).map_err(io_err("writing the tar"))?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    add(&mut h, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .map_err(io_err("writing the tar"))?;
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .map_err(io_err("writing the tar"))?;
    }
    b.into_inner()
        .and_then(|f| f.sync_all())
        .map_err(io_err("finishing the tar"))
}

/// A set of test hosts; dropping it brings them all down.
pub struct Testbed {
    slot: u32,
    prefix: String,
    subnet: String,
    hosts: Vec<Host>,
    script: PathBuf,
    down_done: bool,
    // Held until drop: the slot is ours while this socket is bound.
    _claim: UnixListener,
}

impl Testbed {
    /// Claims a free slot and brings up `n` hosts in it.
    pub fn up(n: usize) -> Result<Testbed, TestbedError> {
        let hint = std::thread::current()
            .name()
            .map(str::to_string)
            .unwrap_or_default();
        Self::up_with_hint(&hint, n)
    }

    /// [`Testbed::up`], starting the slot search from a hash of `hint` (a test's name).
    pub fn up_with_hint(hint: &str, n: usize) -> Result<Testbed, TestbedError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(TestbedError::NotRoot);
        }
        let (slot, claim) = claim_slot(hint)?;
        let script = script_path();
        let prefix = format!("sh{slot}-h");
        let subnet = format!("10.77.{slot}");
        let mut tb = Testbed {
            slot,
            prefix,
            subnet,
            hosts: Vec::new(),
            script,
            down_done: false,
            _claim: claim,
        };
        // A test that died without dropping its test bed left this slot's hosts behind.
        tb.script(&["down"])?;
        tb.grow(n)?;
        Ok(tb)
    }

    /// Brings the test bed to `n` hosts (`up n` again: existing hosts stay as they are).
    pub fn grow(&mut self, n: usize) -> Result<(), TestbedError> {
        let out = self.script(&["up", &n.to_string(), "--subnet", &self.subnet.clone()])?;
        let shoal = shoal_bin().ok();
        let mut hosts = Vec::new();
        for line in out.lines() {
            let mut it = line.split_whitespace();
            let (Some(name), Some(addr), None) = (it.next(), it.next(), it.next()) else {
                return Err(self.bad_output("up", &out));
            };
            let addr: Ipv4Addr = addr.parse().map_err(|_| self.bad_output("up", &out))?;
            hosts.push(Host {
                name: name.to_string(),
                index: hosts.len() + 1,
                addr,
                dir: Path::new(STATE_ROOT).join(name),
                script: self.script.clone(),
                shoal: shoal.clone(),
            });
        }
        if hosts.len() < n {
            return Err(self.bad_output("up", &out));
        }
        self.hosts = hosts;
        Ok(())
    }

    fn bad_output(&self, what: &str, out: &str) -> TestbedError {
        TestbedError::BadOutput {
            cmd: format!("testbed.sh {what} --prefix {}", self.prefix),
            output: out.trim().to_string(),
        }
    }

    /// Runs `testbed.sh ARGS... --prefix <ours>` and returns its stdout.
    pub fn script(&self, args: &[&str]) -> Result<String, TestbedError> {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .arg("--prefix")
            .arg(&self.prefix)
            .args(args);
        if let Ok(b) = shoal_bin() {
            cmd.env("SHOAL_BIN", b);
        }
        run_ok(&mut cmd)
    }

    /// The slot number `k` (the subnet is `10.77.<k>.0/24`).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Host name prefix, like `sh7-h`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bridge's name in the root namespace.
    pub fn bridge(&self) -> String {
        format!("{}-br0", self.prefix.trim_end_matches("-h"))
    }

    /// The root namespace's address on the bridge (`.254`).
    pub fn bridge_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.slot as u8, 254)
    }

    /// Every host, in order (host 1 first).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`, numbered from 1.
    pub fn host(&self, i: usize) -> Result<&Host, TestbedError> {
        i.checked_sub(1)
            .and_then(|j| self.hosts.get(j))
            .ok_or(TestbedError::NoHost(i))
    }

    /// Drops traffic between each pair of groups of host numbers (both ways).
    pub fn partition(&self, groups: &[&[usize]]) -> Result<(), TestbedError> {
        let mut args = vec!["partition".to_string()];
        for g in groups {
            let names: Result<Vec<&str>, _> =
                g.iter().map(|&i| self.host(i).map(Host::name)).collect();
            args.push(names?.join(","));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.script(&args).map(drop)
    }

    /// Drops what host `from` sends to host `to`; the other way still flows.
    pub fn partition_one_way(&self, from: usize, to: usize) -> Result<(), TestbedError> {
        let (f, t) = (self.host(from)?.name(), self.host(to)?.name());
        self.script(&["partition-one-way", f, t]).map(drop)
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<(), TestbedError> {
        self.script(&["heal"]).map(drop)
    }

    /// Brings everything down now, reporting what failed (dropping does the same silently).
    pub fn down(mut self) -> Result<(), TestbedError> {
        self.down_done = true;
        self.script(&["down"]).map(drop)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if !self.down_done {
            if let Err(e) = self.script(&["down"]) {
                eprintln!("testbed {}: down failed: {e}", self.prefix);
            }
        }
    }
}

/// A slot is ours while we hold an abstract unix socket named after it: the kernel frees the
/// name when this process dies, however it dies, and nothing is left on disk.
fn claim_slot(hint: &str) -> Result<(u32, UnixListener), TestbedError> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    hint.hash(&mut h);
    std::process::id().hash(&mut h);
    let start = (h.finish() % u64::from(MAX_SLOTS)) as u32;
    for i in 0..MAX_SLOTS {
        let slot = (start + i) % MAX_SLOTS + 1;
        let name = format!("shoal-testbed-slot-{slot}");
        let addr =
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(|source| TestbedError::Io {
                what: format!("naming {name}"),
                source,
            })?;
        match UnixListener::bind_addr(&addr) {
            Ok(l) => return Ok((slot, l)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(source) => {
                return Err(TestbedError::Io {
                    what: format!("binding {name}"),
                    source,
                })
            }
        }
    }
    Err(TestbedError::NoFreeSlot(MAX_SLOTS))
}

/// One test host: a network namespace with its own address, data dir and control socket.
#[derive(Debug, Clone)]
pub struct Host {
    name: String,
    index: usize,
    addr: Ipv4Addr,
    dir: PathBuf,
    script: PathBuf,
    shoal: Option<PathBuf>,
}

impl Host {
    /// The host's (and its namespace's) name, like `sh7-h2`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its number in the test bed, from 1.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its address on the bridge.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Where its agent listens (and advertises).
    pub fn agent_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, AGENT_PORT)
    }

    /// Its directory under [`STATE_ROOT`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its SHOAL_DATA_DIR.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Its SHOAL_SOCKET.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("shoal.sock")
    }

    /// Its agent's log (stdout and stderr, appended across restarts).
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// A command that runs `program` in this host's network namespace with the host's
    /// SHOAL_DATA_DIR and SHOAL_SOCKET (what `testbed.sh exec` does), ready to spawn.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program)
            .env("SHOAL_DATA_DIR", self.data_dir())
            .env("SHOAL_SOCKET", self.socket())
            .env("SHOAL_TESTBED_HOST", &self.name);
        cmd
    }

    /// Runs `args[0] args[1..]` in the host to completion (whatever its exit status).
    pub fn exec(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let (prog, rest) = args.split_first().ok_or(TestbedError::NoCommand)?;
        run(self.command(prog).args(rest))
    }

    /// [`Host::exec`] that must succeed; returns its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String, TestbedError> {
        let (prog, rest) = args.split_first().ok_or(TestbedError::NoCommand)?;
        run_ok(self.command(prog).args(rest))
    }

    fn shoal_path(&self) -> Result<&Path, TestbedError> {
        self.shoal.as_deref().ok_or_else(|| match shoal_bin() {
            Err(e) => e,
            Ok(p) => TestbedError::NoShoalBin(p.display().to_string()),
        })
    }

    /// Runs the shoal CLI in the host (talking to this host's agent through its socket).
    pub fn shoal(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let bin = self.shoal_path()?;
        run(self.command(bin).args(args))
    }

    /// [`Host::shoal`] killed after `secs` seconds (`timeout -s KILL`): its stdout when it
    /// exits 0, else `shoal ARGS on HOST: STDERR (STATUS)`.
    pub fn shoal_within(&self, secs: u32, args: &[&str]) -> Result<String, String> {
        let bin = self.shoal_path().map_err(|e| e.to_string())?;
        let secs = secs.to_string();
        let bin = bin.to_string_lossy().into_owned();
        let mut argv = vec!["timeout", "-s", "KILL", secs.as_str(), bin.as_str()];
        argv.extend_from_slice(args);
        let out = self.exec(&argv).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "shoal {args:?} on {}: {} ({})",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ))
        }
    }

    /// Imports a busybox image (see [`busybox_rootfs_tar`]) into the host's data dir as `tag`.
    pub fn import_busybox(&self, tag: &str) -> Result<(), TestbedError> {
        let tar = self.dir.join("busybox-rootfs.tar");
        busybox_rootfs_tar(&tar)?;
        let bin = self.shoal_path()?;
        let r = run_ok(
            self.command(bin)
                .args(["image", "import"])
                .arg(&tar)
                .arg(tag),
        );
        let _ = fs::remove_file(&tar);
        r.map(drop)
    }

    /// Starts `shoal agent` in the host (`testbed.sh agent`) and waits until its control
    /// socket accepts connections; returns the agent's pid.
    pub fn spawn_agent(&self, extra: &[&str]) -> Result<u32, TestbedError> {
        let pid = self.spawn_agent_unready(extra)?;
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return Ok(pid);
            }
            // (Not `runs_here`: until `nsenter` has run, the pid is the starting shell's, still
            // in the root namespace.)
            if !pid_alive(pid) {
                return Err(TestbedError::AgentDied {
                    host: self.name.clone(),
                    log: tail(&fs::read(self.agent_log()).unwrap_or_default()),
                });
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!("the agent's socket in {}", self.name),
                    secs: AGENT_READY_TIMEOUT.as_secs(),
                });
            }
            sleep(POLL);
        }
    }

    /// Starts `shoal agent` in the host without waiting for its socket; returns its pid.
    pub fn spawn_agent_unready(&self, extra: &[&str]) -> Result<u32, TestbedError> {
        let bin = self.shoal_path()?;
        // A socket file left by a killed agent must not pass for the new one being ready.
        let _ = fs::remove_file(self.socket());
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .arg("agent")
            .arg(&self.name)
            .args(extra)
            .env("SHOAL_BIN", bin);
        let out = run_ok(&mut cmd)?;
        out.trim().parse().map_err(|_| TestbedError::BadOutput {
            cmd: describe(&cmd),
            output: out.trim().to_string(),
        })
    }

    /// The agent's pid while it runs (stopped counts as running).
    pub fn agent_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.dir.join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.runs_here(pid).then_some(pid)
    }

    /// Whether `pid` is a live process in this host's network namespace: pids are reused (a
    /// busy 2-core machine wraps its 32,768 in minutes), so a recorded agent pid alone may name
    /// another process once the agent is gone (chaos seed 20261208101: a killed leader's pid,
    /// taken by a build job, passed for its agent and kept it from being restarted).
    pub fn runs_here(&self, pid: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ns = |p: String| fs::metadata(p).map(|m| (m.dev(), m.ino()));
        pid_alive(pid)
            && matches!(
                (ns(format!("/proc/{pid}/ns/net")), ns(format!("/run/netns/{}", self.name))),
                (Ok(a), Ok(b)) if a == b
            )
    }

    /// Sends `sig` to the host's agent; returns once a kill has ended it, a stop has stopped it
    /// or a continue has resumed it.
    pub fn kill(&self, sig: Signal) -> Result<(), TestbedError> {
        let pid = self.agent_pid();
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .arg("kill")
            .arg(&self.name)
            .arg(sig.flag());
        run_ok(&mut cmd)?;
        let Some(pid) = pid else { return Ok(()) };
        // Signals reach every thread asynchronously: wait until the whole process shows it.
        match sig {
            Signal::Kill => self.wait_exit(pid, KILL_TIMEOUT),
            Signal::Stop => self.wait_for(KILL_TIMEOUT, "the agent to stop", || {
                pid_stopped(pid) || !self.runs_here(pid)
            }),
            Signal::Cont => {
                self.wait_for(KILL_TIMEOUT, "the agent to continue", || !pid_stopped(pid))
            }
            Signal::Term | Signal::Int => Ok(()),
        }
    }

    fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!("{what} in {}", self.name),
                    secs: timeout.as_secs(),
                });
            }
            sleep(POLL);
        }
        Ok(())
    }

    /// Waits until process `pid` has exited.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> Result<(), TestbedError> {
        self.wait_for(timeout, &format!("pid {pid} to exit"), || {
            !self.runs_here(pid)
        })
    }

    /// Runs `f` on a thread that has joined this host's network namespace: sockets it makes
    /// live in the host (and stay there when used from other threads). Such a socket keeps
    /// the namespace alive: close it before the test bed goes down.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, TestbedError> {
        let path = format!("/run/netns/{}", self.name);
        let ns = File::open(&path).map_err(|source| TestbedError::Io {
            what: format!("opening {path}"),
            source,
        })?;
        std::thread::scope(|s| {
            let joined = s
                .spawn(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| TestbedError::Io {
                            what: format!("joining {path}"),
                            source: e.into(),
                        })
                        .map(|()| f())
                })
                .join();
            match joined {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Pids of the live processes in this host's network namespace.
    pub fn pids(&self) -> Result<Vec<u32>, TestbedError> {
        let out = run_ok(Command::new("ip").args(["netns", "pids", &self.name]))?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| pid_alive(p))
            .collect())
    }
}
