//! Forming shoal clusters for the tests, the benchmarks and the chaos suite, in one place.
//!
//! Two steps, each written once here:
//! - [`Launch::spawn`] starts one `shoal agent` on a loopback address (its data dir, control
//!   socket and log under one directory) and waits until its socket accepts. Agents in test
//!   bed hosts start through [`crate::testbed::Host::spawn_agent`] (`testbed.sh agent`).
//! - [`ClusterBuilder::form`] runs `cluster init` on the first [`Member`], sets the cluster's
//!   timers, and joins the others as managers or workers with the tokens the first hands out,
//!   then (if asked) waits until every node is Ready.
//!
//! Each harness keeps its own process handles and helpers; it implements [`Member`] (how to run
//! the CLI against one node) and calls these two.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::testbed::{describe, tail, Host, TestbedError};

/// How long [`Launch::spawn`] waits for the agent's control socket.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
/// Polling period of the waits here.
const POLL: Duration = Duration::from_millis(20);
/// Pause between join attempts refused for a passing reason.
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// A free TCP port on `ip` (bound, then released).
pub fn free_port(ip: &str) -> Result<u16, TestbedError> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| TestbedError::Io {
            what: format!("finding a free port on {ip}"),
            source,
        })
}

/// Where [`VniLease`]s are held (one lock file per range).
const VNI_LEASE_DIR: &str = "/run/shoal-test-vni";
/// VXLAN ids per leased range: the ingress network's and the networks' above it.
const VNI_RANGE: u32 = 4096;
/// The last range (VNIs are 24 bits: it ends at 16777215). Range 1 (4096…) is a cluster's
/// default, never leased; range 0 is below swarm's and shoal's first VNI.
const VNI_LAST_RANGE: u32 = (1 << 24) / VNI_RANGE - 1;

/// A range of VXLAN ids of its own for a cluster of loopback agents, held while this lives
/// (an flock, so a test that dies gives it back). Agents on loopback share the machine's
/// network namespace, where a cluster network's devices and records are named by its VNI:
/// clusters formed at the same time by tests running beside each other must not share one
/// (`cluster init --vni-start`, see [`ClusterBuilder::vni_start`]).
#[derive(Debug)]
pub struct VniLease {
    start: u32,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl VniLease {
    /// The lowest range no live test holds.
    pub fn take() -> Result<VniLease, TestbedError> {
        let io = |what: String| move |source| TestbedError::Io { what, source };
        fs::create_dir_all(VNI_LEASE_DIR).map_err(io(format!("creating {VNI_LEASE_DIR}")))?;
        for range in 2..=VNI_LAST_RANGE {
            let p = Path::new(VNI_LEASE_DIR).join(range.to_string());
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(io(format!("opening {}", p.display())))?;
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return Ok(VniLease {
                        start: range * VNI_RANGE,
                        _lock: lock,
                    })
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(io(format!("locking {}", p.display()))(e.into())),
            }
        }
        Err(TestbedError::Io {
            what: "leasing a VXLAN id range".into(),
            source: std::io::Error::other("every range is held"),
        })
    }

    /// The range's first VNI (`cluster init --vni-start`).
    pub fn start(&self) -> u32 {
        self.start
    }
}

/// How to start one `shoal agent` outside the test bed: it listens (and advertises) on
/// `listen`; its data dir is `dir/data`, its socket `dir/shoal.sock`, its log `dir/agent.log`
/// (appended to across restarts).
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub bin: &'a Path,
    pub hostname: &'a str,
    pub listen: &'a str,
    pub dir: &'a Path,
    /// More agent flags (`--executor sim`, `--advertise-addr ...`, ...).
    pub args: &'a [&'a str],
}

impl Launch<'_> {
    /// The control socket of an agent launched in `dir`.
    pub fn socket_in(dir: &Path) -> PathBuf {
        dir.join("shoal.sock")
    }

    /// The data dir of an agent launched in `dir`.
    pub fn data_in(dir: &Path) -> PathBuf {
        dir.join("data")
    }

    /// Starts the agent and waits until its control socket accepts; an agent that exits first
    /// is an error carrying the end of its log. The child is the caller's to kill.
    pub fn spawn(&self) -> Result<Child, TestbedError> {
        let io = |what: String| move |source| TestbedError::Io { what, source };
        let data = Launch::data_in(self.dir);
        fs::create_dir_all(&data).map_err(io(format!("creating {}", data.display())))?;
        let socket = Launch::socket_in(self.dir);
        // A socket file left by a killed agent must not pass for the new one being ready.
        let _ = fs::remove_file(&socket);
        let log_path = self.dir.join("agent.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let mut cmd = Command::new(self.bin);
        cmd.args(["agent", "--listen-addr", self.listen])
            .args(["--hostname", self.hostname])
            .arg("--data-dir")
            .arg(&data)
            .arg("--socket")
            .arg(&socket)
            .args(self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            cmd: describe(&cmd),
            source,
        })?;
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let died = !matches!(child.try_wait(), Ok(None));
            if died || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                if !died {
                    return Err(TestbedError::Timeout {
                        what: format!("the socket of agent {}", self.hostname),
                        secs: SOCKET_TIMEOUT.as_secs(),
                    });
                }
                return Err(TestbedError::AgentDied {
                    host: self.hostname.to_string(),
                    log: tail(&fs::read(&log_path).unwrap_or_default()),
                });
            }
            sleep(POLL);
        }
        Ok(child)
    }
}

/// Runs `shoal ARGS` against the agent whose socket is `socket`.
pub fn shoal_at(bin: &Path, socket: &Path, args: &[&str]) -> Result<Output, TestbedError> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("SHOAL_SOCKET", socket)
        .stdin(Stdio::null());
    cmd.output().map_err(|source| TestbedError::Spawn {
        cmd: describe(&cmd),
        source,
    })
}

/// One node a cluster is formed from, as the builder needs it.
pub trait Member {
    /// Its name in messages.
    fn label(&self) -> String;
    /// The address the others join through (host:port of its agent).
    fn join_addr(&self) -> String;
    /// Passed as `--advertise-addr` to its `cluster init` / `cluster join`, if any (a test bed
    /// host's agent already advertises its address).
    fn advertise(&self) -> Option<String>;
    /// Runs the shoal CLI against its agent.
    fn shoal(&self, args: &[&str]) -> Result<Output, TestbedError>;

    /// [`Member::shoal`] that must succeed; its stdout.
    fn shoal_ok(&self, args: &[&str]) -> Result<String, TestbedError> {
        let out = self.shoal(args)?;
        if !out.status.success() {
            return Err(TestbedError::Failed {
                cmd: format!("shoal {} on {}", args.join(" "), self.label()),
                status: out.status.to_string(),
                stderr: tail(&out.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// An agent on a loopback address as a [`Member`]: the CLI `bin` run against its control
/// `socket`; it listens, advertises and is joined on `addr`.
#[derive(Debug, Clone)]
pub struct Loopback {
    pub bin: PathBuf,
    pub host: String,
    pub addr: String,
    pub socket: PathBuf,
}

impl Member for Loopback {
    fn label(&self) -> String {
        self.host.clone()
    }

    fn join_addr(&self) -> String {
        self.addr.clone()
    }

    fn advertise(&self) -> Option<String> {
        Some(self.addr.clone())
    }

    fn shoal(&self, args: &[&str]) -> Result<Output, TestbedError> {
        shoal_at(&self.bin, &self.socket, args)
    }
}

impl Member for Host {
    fn label(&self) -> String {
        self.name().to_string()
    }

    fn join_addr(&self) -> String {
        self.agent_addr().to_string()
    }

    fn advertise(&self) -> Option<String> {
        None
    }

    fn shoal(&self, args: &[&str]) -> Result<Output, TestbedError> {
        Host::shoal(self, args)
    }
}

/// How a cluster is formed from running agents: see [`ClusterBuilder::form`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    managers: usize,
    heartbeat: Option<(String, u32)>,
    join_attempts: u32,
    ready: Option<Duration>,
    vni_start: Option<u32>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            managers: 1,
            heartbeat: None,
            join_attempts: 3,
            ready: None,
            vni_start: None,
        }
    }
}

impl ClusterBuilder {
    /// One manager (the first member), the rest workers, the cluster's default timers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first `n` members are managers (at least the first).
    pub fn managers(mut self, n: usize) -> Self {
        self.managers = n.max(1);
        self
    }

    /// The dispatcher's heartbeat period (`500ms`) and the heartbeats a node may miss before
    /// it is down, set with `cluster update` before anyone joins.
    pub fn heartbeat(mut self, period: &str, missed: u32) -> Self {
        self.heartbeat = Some((period.to_string(), missed));
        self
    }

    /// How many times a join refused for a passing reason (a busy machine) is tried.
    pub fn join_attempts(mut self, n: u32) -> Self {
        self.join_attempts = n.max(1);
        self
    }

    /// The cluster's networks take their VXLAN ids from `start` (`cluster init --vni-start`):
    /// a [`VniLease`]'s, for loopback agents beside other tests' clusters.
    pub fn vni_start(mut self, start: u32) -> Self {
        self.vni_start = Some(start);
        self
    }

    /// After the joins, wait up to `timeout` until `node ls` shows every member Ready.
    pub fn wait_ready(mut self, timeout: Duration) -> Self {
        self.ready = Some(timeout);
        self
    }

    /// Forms the cluster: `cluster init` on `members[0]`, then the joins in order.
    pub fn form(&self, members: &[&dyn Member]) -> Result<(), TestbedError> {
        self.form_logged(members, &|_| {})
    }

    /// [`ClusterBuilder::form`], telling `log` about retried joins.
    pub fn form_logged(
        &self,
        members: &[&dyn Member],
        log: &dyn Fn(&str),
    ) -> Result<(), TestbedError> {
        let Some(first) = members.first() else {
            return Ok(());
        };
        let mut init = vec!["cluster", "init"];
        let adv = first.advertise();
        if let Some(a) = &adv {
            init.extend(["--advertise-addr", a]);
        }
        let vni = self.vni_start.map(|v| v.to_string());
        if let Some(v) = &vni {
            init.extend(["--vni-start", v]);
        }
        first.shoal_ok(&init)?;
        if let Some((period, missed)) = &self.heartbeat {
            let missed = missed.to_string();
            first.shoal_ok(&[
                "cluster",
                "update",
                "--dispatcher-heartbeat",
                period,
                "--missed-heartbeats",
                &missed,
            ])?;
        }
        for (i, m) in members.iter().enumerate().skip(1) {
            self.join(*first, *m, i < self.managers, log)?;
        }
        if let Some(timeout) = self.ready {
            wait_ready(*first, members.len(), timeout)?;
        }
        Ok(())
    }

    /// Joins `m` to the cluster `first` belongs to, as a manager or a worker.
    pub fn join(
        &self,
        first: &dyn Member,
        m: &dyn Member,
        manager: bool,
        log: &dyn Fn(&str),
    ) -> Result<(), TestbedError> {
        let role = if manager { "manager" } else { "worker" };
        let token = first.shoal_ok(&["cluster", "join-token", "-q", role])?;
        let addr = first.join_addr();
        let mut args = vec!["cluster", "join", "--token", token.trim()];
        let adv = m.advertise();
        if let Some(a) = &adv {
            args.extend(["--advertise-addr", a]);
        }
        args.push(&addr);
        let mut attempt = 1;
        loop {
            match m.shoal_ok(&args) {
                Ok(_) => return Ok(()),
                Err(e) if attempt < self.join_attempts => {
                    log(&format!("{e}; trying again"));
                    attempt += 1;
                    sleep(JOIN_RETRY);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Waits up to `timeout` until `node ls` on `via` shows `count` nodes Ready.
pub fn wait_ready(via: &dyn Member, count: usize, timeout: Duration) -> Result<(), TestbedError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(ls) = via.shoal_ok(&["node", "ls"]) {
            if ls.lines().filter(|l| l.contains(" Ready ")).count() == count {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout {
                what: format!("{count} nodes Ready"),
                secs: timeout.as_secs(),
            });
        }
        sleep(POLL * 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_leases_are_apart_and_never_the_default_range() {
        let a = VniLease::take().expect("a lease");
        let b = VniLease::take().expect("another lease");
        assert_ne!(a.start(), b.start());
        for l in [&a, &b] {
            assert!(l.start() >= 2 * VNI_RANGE, "{}", l.start());
            assert!(l.start() + VNI_RANGE <= 1 << 24, "{}", l.start());
            assert_eq!(l.start() % VNI_RANGE, 0);
        }
    }
}
