//! The `shoal agent` process harness shared by the multi-process CLI tests: each agent on its
//! own 127.x address and port, with its own data dir and socket, driven through the CLI.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use shoal_tests::cluster::{free_port, shoal_at, Launch, Loopback};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
/// How long `eventually` retries (an election may be under way).
const EVENTUALLY_WAIT: Duration = Duration::from_secs(15);

/// How to start the agents of one test file (distinct `net`s let test files run at once).
#[derive(Clone, Copy)]
pub struct AgentKind {
    /// The first three octets of the agents' loopback addresses, e.g. "127.0.0".
    pub net: &'static str,
    /// Hostnames are `<prefix><n>`.
    pub host_prefix: &'static str,
    /// The hollow (`sim`) executor: tasks without containers.
    pub hollow: bool,
    /// Pass `--advertise-addr` (the listen address).
    pub advertise: bool,
}

/// One `shoal agent` process; killed (by pid) when dropped.
pub struct Agent {
    pub dir: PathBuf,
    pub addr: String,
    pub host: String,
    kind: AgentKind,
    child: Option<Child>,
}

impl Agent {
    pub fn start(root: &Path, n: u8, kind: AgentKind) -> Agent {
        let ip = format!("{}.{n}", kind.net);
        let addr = format!("{ip}:{}", free_port(&ip).unwrap());
        let dir = root.join(format!("node{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Agent {
            dir,
            addr,
            host: format!("{}{n}", kind.host_prefix),
            kind,
            child: None,
        };
        a.spawn();
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("shoal.sock")
    }

    /// Starts (or restarts) the agent on its data dir; the log is appended to across restarts.
    pub fn spawn(&mut self) {
        let mut args = Vec::new();
        if self.kind.hollow {
            args.extend(["--executor", "sim"]);
        }
        if self.kind.advertise {
            args.extend(["--advertise-addr", &self.addr]);
        }
        let child = Launch {
            bin: Path::new(SHOAL),
            hostname: &self.host,
            listen: &self.addr,
            dir: &self.dir,
            args: &args,
        }
        .spawn()
        .unwrap_or_else(|e| panic!("agent {}: {e}", self.host));
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// This agent as the cluster builder sees it.
    pub fn member(&self) -> Loopback {
        Loopback {
            bin: SHOAL.into(),
            host: self.host.clone(),
            addr: self.addr.clone(),
            socket: self.socket(),
        }
    }

    pub fn shoal(&self, args: &[&str]) -> Output {
        shoal_at(Path::new(SHOAL), &self.socket(), args).unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "shoal {args:?} on {} failed: {}\n{}",
            self.host,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            !out.status.success(),
            "shoal {args:?} on {} succeeded unexpectedly",
            self.host
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Retries a command until it succeeds (an election may be under way).
    pub fn eventually(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + EVENTUALLY_WAIT;
        loop {
            let out = self.shoal(args);
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "shoal {args:?} kept failing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The role this node's daemon recorded in node.json.
    pub fn recorded_role(&self) -> String {
        let raw = std::fs::read(self.dir.join("data/node.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        v["role"].as_str().unwrap().to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The MANAGER STATUS column of each row of `node ls`, by hostname.
pub fn manager_statuses(ls: &str) -> Vec<(String, String)> {
    let mut lines = ls.lines();
    let header = lines.next().unwrap();
    let col = header.find("MANAGER STATUS").unwrap();
    let host_col = header.find("HOSTNAME").unwrap();
    lines
        .map(|l| {
            let host = l[host_col..].split_whitespace().next().unwrap().to_string();
            let status = l.get(col..).unwrap_or("").trim().to_string();
            (host, status)
        })
        .collect()
}
