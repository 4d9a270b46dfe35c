//! What the networking benchmarks (`overlay`, `mesh`, `scale-answer`, `node-loss`) share: a
//! test bed of network namespaces (deploy/testbed.sh, driven by `shoal_tests::testbed`), a
//! cluster of its first hosts formed by `shoal_tests::cluster::ClusterBuilder` (the one place
//! clusters are formed), the tasks of a service as `service ps` reports them, partitions of the
//! test bed, and child processes run in a network namespace (`nsenter --net=…`), bounded in
//! time and killed by pid when they overrun or when their handle is dropped.
//!
//! Dropping the [`Bed`] brings the whole test bed down (`testbed.sh down`: agents, task
//! containers, namespaces, links), so an error anywhere tears everything down.

use crate::cluster::Proc;
use crate::services::shoal_bin;
use anyhow::{bail, Context, Result};
use shoal_tests::cluster::{ClusterBuilder, Member};
use shoal_tests::testbed::{Host, Testbed};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for every node to be Ready once the cluster is formed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a service's tasks to run.
pub const TASKS_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between polls of the manager (each is one CLI process).
const POLL: Duration = Duration::from_millis(200);
/// Pause between checks of a bounded child process.
const CHILD_POLL: Duration = Duration::from_millis(20);
/// Where a task container's network namespace is (runtime/src/network: `/run/shoal/netns/<id>`;
/// a task's container id is its task id).
const TASK_NETNS_DIR: &str = "/run/shoal/netns";
/// The image every task runs.
pub const IMAGE: &str = "busybox:latest";
/// A task that serves its own hostname (the task's short id) over HTTP on port 80, as the
/// testbed tests' `WEB`.
pub const WEB: &str =
    "mkdir -p /www; echo hello-from-$(hostname) > /www/index.html; exec httpd -f -p 80 -h /www";

/// A test bed whose first hosts form a cluster (host 1 the manager, the others workers).
pub struct Bed {
    tb: Testbed,
}

/// One running task of a service.
#[derive(Clone, Debug)]
pub struct Task {
    pub id: String,
    pub node: String,
    /// Its address on the service's first cluster network.
    pub addr: Ipv4Addr,
}

impl Task {
    /// The container's network namespace (a file the task's container id names).
    pub fn netns(&self) -> PathBuf {
        Path::new(TASK_NETNS_DIR).join(&self.id)
    }

    /// The container's hostname, which WEB serves: the task's short id.
    pub fn hostname(&self) -> String {
        self.id.chars().take(12).collect()
    }
}

impl Bed {
    /// Brings up `hosts` test bed hosts; the first `members` import busybox, run an agent
    /// (`--dns-upstream none`: no DNS traffic leaves the test bed) and form a cluster.
    pub fn up(shoal: &Option<PathBuf>, hosts: usize, members: usize) -> Result<Bed> {
        Self::up_with(shoal, hosts, members, |_| Ok(Vec::new()))
    }

    /// [`Bed::up`], the agents given the flags `extra` returns (called once the test bed is up,
    /// before any agent starts: a registry on the bridge, say).
    pub fn up_with(
        shoal: &Option<PathBuf>,
        hosts: usize,
        members: usize,
        extra: impl FnOnce(&Testbed) -> Result<Vec<String>>,
    ) -> Result<Bed> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("run as root (the test bed is network namespaces)");
        }
        let bin = shoal_bin(shoal)?;
        let bin = bin
            .canonicalize()
            .with_context(|| format!("{} not found", bin.display()))?;
        // The test bed runs the shoal binary named here (its default would be a debug build
        // of the checkout). Set before any thread is started.
        std::env::set_var("SHOAL_BIN", &bin);
        let tb = Testbed::up_with_hint("shoal-bench", hosts)?;
        let bed = Bed { tb };
        let extra = extra(&bed.tb)?;
        let mut args: Vec<&str> = vec!["--dns-upstream", "none"];
        args.extend(extra.iter().map(String::as_str));
        let members_of: Vec<&Host> = bed.tb.hosts().iter().take(members).collect();
        for h in &members_of {
            h.import_busybox(IMAGE)?;
            h.spawn_agent(&args)?;
        }
        let m: Vec<&dyn Member> = members_of.iter().map(|h| *h as &dyn Member).collect();
        ClusterBuilder::new()
            .wait_ready(READY_TIMEOUT)
            .form(&m)
            .context("forming the cluster")?;
        eprintln!(
            "  test bed {} up: {}",
            bed.tb.prefix(),
            bed.tb
                .hosts()
                .iter()
                .map(|h| format!("{} {}", h.name(), h.addr()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(bed)
    }

    /// The test bed itself.
    pub fn testbed(&self) -> &Testbed {
        &self.tb
    }

    /// Host `i`, from 1.
    pub fn host(&self, i: usize) -> Result<&Host> {
        Ok(self.tb.host(i)?)
    }

    /// Cuts the test bed into `groups` of hosts (numbers from 1): traffic between groups is
    /// dropped both ways (`testbed.sh partition`), within a group it still flows.
    pub fn partition(&self, groups: &[&[usize]]) -> Result<()> {
        Ok(self.tb.partition(groups)?)
    }

    /// Removes every partition rule (`testbed.sh heal`).
    pub fn heal(&self) -> Result<()> {
        Ok(self.tb.heal()?)
    }

    /// The test bed's subnet, 10.77.<slot>.0/24: with the tasks' own overlay addresses, the only
    /// addresses traffic is sent to.
    pub fn on_test_bed(&self, a: Ipv4Addr) -> bool {
        let o = a.octets();
        o[0] == 10 && o[1] == 77 && u32::from(o[2]) == self.tb.slot()
    }

    /// `shoal ARGS` on the manager (host 1), which must succeed; its stdout.
    pub fn shoal(&self, args: &[&str]) -> Result<String> {
        Ok(self.host(1)?.shoal_ok(args)?)
    }

    /// Node id → hostname.
    pub fn node_names(&self) -> Result<HashMap<String, String>> {
        let out = self.shoal(&["node", "ls", "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("node ls json")?;
        Ok(v.as_array()
            .context("node ls: not an array")?
            .iter()
            .map(|n| {
                (
                    n["ID"].as_str().unwrap_or("").to_string(),
                    n["Description"]["Hostname"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect())
    }

    /// The running tasks of `svc` (observed and desired), with their first cluster address
    /// (unspecified for a task on no cluster network).
    pub fn tasks(&self, svc: &str) -> Result<Vec<Task>> {
        let out = self.shoal(&["service", "ps", "--format", "json", svc])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("service ps json")?;
        let mut tasks = Vec::new();
        for t in v.as_array().context("service ps: not an array")? {
            if t["Status"]["State"] != "running" || t["DesiredState"] != "running" {
                continue;
            }
            let s = |f: &serde_json::Value| f.as_str().unwrap_or("").to_string();
            let addr = s(&t["NetworksAttachments"][0]["Addresses"][0]);
            let addr = addr.split('/').next().unwrap_or("");
            tasks.push(Task {
                id: s(&t["ID"]),
                node: s(&t["NodeID"]),
                addr: addr.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            });
        }
        Ok(tasks)
    }

    /// Waits (bounded) until `svc` has `n` running tasks, each with its network namespace.
    pub fn wait_tasks(&self, svc: &str, n: usize) -> Result<Vec<Task>> {
        let t = Instant::now();
        loop {
            let tasks = self.tasks(svc)?;
            if tasks.len() == n && tasks.iter().all(|t| t.netns().exists()) {
                return Ok(tasks);
            }
            if t.elapsed() > TASKS_DEADLINE {
                bail!(
                    "service {svc}: {} of {n} tasks running after {TASKS_DEADLINE:?}",
                    tasks.len()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs `args` in task `id`'s container on host `h` (`shoal runtime exec`); its stdout if
    /// it succeeded.
    pub fn task_exec(&self, h: &Host, id: &str, args: &[&str]) -> Result<Option<String>> {
        let root = h.data_dir().join("containers/.tasks");
        let root = root.to_str().context("runtime root path")?;
        let mut argv = vec!["runtime", "--root", root, "exec", id];
        argv.extend_from_slice(args);
        let out = h.shoal(&argv)?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

/// The network namespace of a test bed host.
pub fn host_netns(h: &Host) -> PathBuf {
    Path::new("/run/netns").join(h.name())
}

/// `program` in the network namespace `ns` (nsenter execs it: the child is the program).
pub fn in_netns(ns: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(program)
        .stdin(Stdio::null());
    c
}

/// A child running in the background: killed by pid (and reaped) when dropped.
pub struct Background {
    proc: Proc,
    out: Option<BufReader<std::process::ChildStdout>>,
    what: String,
}

impl Background {
    /// Starts `cmd` with its stdout piped (stderr to ours) and waits, bounded by `timeout`,
    /// for a line of its stdout containing `ready`.
    pub fn start(cmd: &mut Command, what: &str, ready: &str, timeout: Duration) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut proc = Proc::spawn(cmd, what)?;
        let out = proc.take_stdout().context("child stdout")?;
        let pid = proc.pid();
        // The wait for the line is bounded by a watchdog that kills the child (by pid).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(timeout).is_err() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        let mut out = BufReader::new(out);
        let mut line = String::new();
        let found = loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => break false,
                Ok(_) if line.contains(ready) => break true,
                Ok(_) => {}
            }
        };
        let _ = tx.send(());
        let _ = watchdog.join();
        if !found {
            bail!("{what} did not get ready within {timeout:?} (or exited)");
        }
        Ok(Background {
            proc,
            out: Some(out),
            what: what.to_string(),
        })
    }

    /// Waits (bounded) for it to exit by itself; the rest of its stdout.
    pub fn finish(mut self, timeout: Duration) -> Result<String> {
        let t = Instant::now();
        while self.proc.exited().is_none() {
            if t.elapsed() > timeout {
                bail!("{} did not exit within {timeout:?}", self.what);
            }
            std::thread::sleep(CHILD_POLL);
        }
        let mut rest = String::new();
        if let Some(mut o) = self.out.take() {
            let _ = o.read_to_string(&mut rest);
        }
        Ok(rest)
    }
}

/// Runs `cmd` to completion, killed by pid if it takes longer than `timeout`; its stdout if it
/// succeeded, else an error with its stderr.
pub fn run_bounded(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (out.join(), err.join());
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(CHILD_POLL);
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("{what} failed ({status}): {}", err.trim());
    }
    Ok(out)
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// One `GET /` over HTTP/1.0 to `vip`:80 (`host` in the Host header, `connect` to connect,
/// `io` per read or write): the hostname of the task that answered, from WEB's
/// `hello-from-<hostname>` body.
pub fn hello_from(vip: Ipv4Addr, host: &str, connect: Duration, io: Duration) -> Result<String> {
    use std::io::Write;
    let mut s =
        std::net::TcpStream::connect_timeout(&std::net::SocketAddr::from((vip, 80)), connect)?;
    s.set_read_timeout(Some(io))?;
    s.set_write_timeout(Some(io))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.take(64 * 1024).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    match body.strip_prefix("hello-from-") {
        Some(h) if text.starts_with("HTTP/1.") && text.contains(" 200 ") => Ok(h.to_string()),
        _ => bail!("unexpected answer {:?}", text.lines().next().unwrap_or("")),
    }
}
