//! The multi-process harness of the service tests: `shoal agent` processes on 127.0.0.x (each
//! with its own data dir, socket and address, each running its worker agent) over real busybox
//! containers, driven through the CLI. Used by service_cli.rs and service_update_cli.rs.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use shoal_tests::cluster::{
    free_port, shoal_at, ClusterBuilder, Launch, Loopback, Member, VniLease,
};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
pub const IMAGE: &str = "busybox:latest";
/// The worker agent's runtime root under a node's data dir (node-agent/src/cmd/agent.rs).
pub const TASK_RUNTIME_DIR: &str = "containers/.tasks";
/// Fast failure detection: a silent node is down after 4 × 500 ms.
pub const FAST_HEARTBEAT: (&str, u32) = ("500ms", 4);
/// For tests that restart agents on purpose: a node is down only after 10 s of silence, so
/// a restart on a loaded machine is not taken for a failure.
pub const PATIENT_HEARTBEAT: (&str, u32) = ("1s", 10);
/// How long a test waits for the cluster to reach a state.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// A root filesystem tar of the host's static busybox: bin/busybox, applet links, passwd.
pub fn busybox_tar(path: &Path) {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, &[][..]).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    b.append_data(&mut h, "etc/passwd", &passwd[..]).unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    b.finish().unwrap();
}

/// One `shoal agent` process (manager or worker, and its worker agent).
pub struct Node {
    pub dir: PathBuf,
    pub addr: String,
    pub host: String,
    pub child: Option<Child>,
    /// Runs the sim executor (a hollow node: no containers).
    pub hollow: bool,
    /// More agent flags.
    pub args: Vec<String>,
}

impl Node {
    pub fn new(root: &Path, n: u8, tar: &Path) -> Node {
        let ip = format!("127.0.0.{n}");
        let node = Node {
            dir: root.join(format!("node{n}")),
            addr: format!("{ip}:{}", free_port(&ip).unwrap()),
            host: format!("host{n}"),
            child: None,
            hollow: false,
            args: Vec::new(),
        };
        std::fs::create_dir_all(node.data()).unwrap();
        // In each node's own store: the tests pull from no registry.
        let out = Command::new(SHOAL)
            .args(["image", "import", "--data-dir"])
            .arg(node.data())
            .arg(tar)
            .arg(IMAGE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("shoal.sock")
    }

    pub fn spawn(&mut self) {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        if self.hollow {
            args.extend(["--executor", "sim"]);
        }
        let args = args.as_slice();
        let child = Launch {
            bin: Path::new(SHOAL),
            hostname: &self.host,
            listen: &self.addr,
            dir: &self.dir,
            args,
        }
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", self.host));
        self.child = Some(child);
    }

    /// SIGKILL to the agent only: its containers keep running.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn runtime(&self, args: &[&str]) -> Output {
        Command::new(SHOAL)
            .arg("runtime")
            .arg("--root")
            .arg(self.data().join(TASK_RUNTIME_DIR))
            .args(args)
            .output()
            .unwrap()
    }

    /// The containers the node's runtime holds, by id.
    pub fn containers(&self) -> Vec<String> {
        let out = self.runtime(&["list", "-q"]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The host pid of a running container, if it runs.
    pub fn container_pid(&self, id: &str) -> Option<i32> {
        let out = self.runtime(&["state", id]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["status"] == "running").then(|| v["pid"].as_i64().map(|p| p as i32))?
    }

    /// The pids of the `shoal runtime create` processes working on this node's containers (the
    /// agent's children; they outlive a killed agent).
    pub fn creators(&self) -> Vec<i32> {
        let root = self.data().join(TASK_RUNTIME_DIR);
        let root = root.to_string_lossy();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<String> = cmd
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let ours = args.windows(2).any(|w| w[0] == "--root" && w[1] == root)
                    && args.iter().any(|a| a == "create");
                ours.then_some(pid)
            })
            .collect()
    }

    /// Force-deletes every container of the node (kills them, removes their cgroups). A
    /// `runtime create` the killed agent started would finish after this looked, with nobody
    /// left to delete its container: those are killed first (by pid), and what they had made
    /// is listed as creating and removed whole.
    pub fn remove_containers(&self) {
        for pid in self.creators() {
            // SAFETY: kill(2) of a process of this node's agent, by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut quiet = 0;
        while quiet < 3 && Instant::now() < deadline {
            let ids = self.containers();
            if ids.is_empty() {
                quiet += 1;
            } else {
                quiet = 0;
            }
            for id in ids {
                let _ = self.runtime(&["delete", "--force", &id]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// This node as the cluster builder sees it.
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

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "shoal {args:?} on {} failed: {}",
            self.host,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            !out.status.success(),
            "shoal {args:?} on {} succeeded unexpectedly",
            self.host
        );
        String::from_utf8(out.stderr).unwrap()
    }
}

/// A row of `service ps --no-trunc`.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: String,
    pub name: String,
    pub node: String,
    pub desired: String,
    pub current: String,
    pub error: String,
}

/// Nodes of one test, cleaned up on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub _root: tempfile::TempDir,
    /// The cluster's VXLAN ids, apart from those of clusters of tests running beside it.
    pub vnis: VniLease,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_agent();
        }
        for n in &self.nodes {
            n.remove_containers();
            // Networks of containers a killed agent was still making.
            shoal_runtime::network::release_all(&n.data().join("containers"));
        }
    }
}

impl Cluster {
    /// `size` nodes: node 1 inits the cluster, `managers - 1` more join as managers, the rest
    /// as workers; returns once every node is Ready.
    pub fn new(size: u8, managers: u8) -> Cluster {
        Self::build(size, managers, 0, FAST_HEARTBEAT)
    }

    /// Like [`Cluster::new`], plus `spare` nodes started but not joined.
    pub fn with_spare(size: u8, managers: u8, spare: u8) -> Cluster {
        Self::build(size, managers, spare, FAST_HEARTBEAT)
    }

    /// `heartbeat`: the dispatcher's period and the heartbeats a node may miss.
    pub fn build(size: u8, managers: u8, spare: u8, heartbeat: (&str, u32)) -> Cluster {
        Self::build_with_images(size, managers, spare, heartbeat, &[])
    }

    /// Like [`Cluster::new`], every agent started with the flags `args` too.
    pub fn with_agent_args(size: u8, managers: u8, args: &[&str]) -> Cluster {
        Self::build_full(size, managers, 0, FAST_HEARTBEAT, &[], args)
    }

    /// Like [`Cluster::new`], each agent started with the flags `args` gives for its node
    /// (its own address for something, say).
    pub fn with_node_args(size: u8, managers: u8, args: &dyn Fn(&Node) -> Vec<String>) -> Cluster {
        Self::build_per_node(size, managers, 0, FAST_HEARTBEAT, &[], args, &[])
    }

    /// Like [`Cluster::build`], with the busybox tar also imported as `(node index, name)`
    /// before the agents start (a running agent reads its image store's index once).
    pub fn build_with_images(
        size: u8,
        managers: u8,
        spare: u8,
        heartbeat: (&str, u32),
        images: &[(usize, &str)],
    ) -> Cluster {
        Self::build_full(size, managers, spare, heartbeat, images, &[])
    }

    /// Like [`Cluster::new`], with the image archives `loads` (`shoal image load`) in every
    /// node's store before the agents start.
    pub fn with_loaded_images(size: u8, managers: u8, loads: &[&Path]) -> Cluster {
        Self::build_loaded(size, managers, 0, FAST_HEARTBEAT, &[], &[], loads)
    }

    fn build_full(
        size: u8,
        managers: u8,
        spare: u8,
        heartbeat: (&str, u32),
        images: &[(usize, &str)],
        args: &[&str],
    ) -> Cluster {
        Self::build_loaded(size, managers, spare, heartbeat, images, args, &[])
    }

    fn build_loaded(
        size: u8,
        managers: u8,
        spare: u8,
        heartbeat: (&str, u32),
        images: &[(usize, &str)],
        args: &[&str],
        loads: &[&Path],
    ) -> Cluster {
        let args = |_: &Node| args.iter().map(|a| a.to_string()).collect();
        Self::build_per_node(size, managers, spare, heartbeat, images, &args, loads)
    }

    fn build_per_node(
        size: u8,
        managers: u8,
        spare: u8,
        heartbeat: (&str, u32),
        images: &[(usize, &str)],
        args: &dyn Fn(&Node) -> Vec<String>,
        loads: &[&Path],
    ) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("shoal-svc-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let tar = root.path().join("busybox.tar");
        busybox_tar(&tar);
        let mut nodes = Vec::new();
        for n in 1..=size + spare {
            nodes.push(Node::new(root.path(), n, &tar));
        }
        let mut c = Cluster {
            nodes,
            _root: root,
            vnis: VniLease::take().unwrap(),
        };
        for (i, name) in images {
            c.import(*i, name);
        }
        for n in &c.nodes {
            for archive in loads {
                let out = Command::new(SHOAL)
                    .args(["image", "load", "--data-dir"])
                    .arg(n.data())
                    .arg(archive)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for n in &mut c.nodes {
            n.args = args(n);
            n.spawn();
        }
        let members: Vec<Loopback> = c.nodes[..size as usize].iter().map(Node::member).collect();
        let members: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
        ClusterBuilder::new()
            .managers(managers as usize)
            .heartbeat(heartbeat.0, heartbeat.1)
            .vni_start(c.vnis.start())
            .wait_ready(CONVERGE)
            .form(&members)
            .unwrap();
        c
    }

    pub fn join(&self, i: usize, manager: bool) {
        ClusterBuilder::new()
            .join(
                &self.nodes[0].member(),
                &self.nodes[i].member(),
                manager,
                &|_| {},
            )
            .unwrap();
    }

    /// Some node whose daemon answers cluster calls (the first one still running).
    pub fn any(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.child.is_some() && n.shoal(&["node", "ls"]).status.success())
            .expect("a node that answers")
    }

    pub fn wait_ready(&self, count: usize) {
        self.until("nodes ready", || {
            let ls = String::from_utf8(self.any().shoal(&["node", "ls"]).stdout).unwrap();
            ls.lines().filter(|l| l.contains(" Ready ")).count() == count
        });
    }

    pub fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + CONVERGE;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; tasks: {}",
                self.any()
                    .shoal(&["service", "ls"])
                    .stdout
                    .iter()
                    .map(|b| *b as char)
                    .collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn ps(&self, service: &str) -> Vec<TaskRow> {
        let out = self.any().ok(&["service", "ps", "--no-trunc", service]);
        parse_ps(&out)
    }

    /// Running tasks wanted running: task id → hostname.
    pub fn running(&self, service: &str) -> BTreeMap<String, String> {
        self.ps(service)
            .into_iter()
            .filter(|t| t.desired == "Running" && t.current == "Running")
            .map(|t| (t.id, t.node))
            .collect()
    }

    pub fn per_node(&self, service: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for host in self.running(service).values() {
            *m.entry(host.clone()).or_default() += 1;
        }
        m
    }

    pub fn node(&self, host: &str) -> &Node {
        self.nodes.iter().find(|n| n.host == host).unwrap()
    }

    /// Each running task is a live container on its node (the container id is the task id).
    pub fn assert_real(&self, service: &str) {
        for (id, host) in self.running(service) {
            let pid = self
                .node(&host)
                .container_pid(&id)
                .unwrap_or_else(|| panic!("task {id} has no running container on {host}"));
            assert!(Path::new(&format!("/proc/{pid}")).exists());
        }
    }
}

pub fn parse_ps(out: &str) -> Vec<TaskRow> {
    let mut lines = out.lines();
    let Some(header) = lines.next() else {
        return vec![];
    };
    let cols: Vec<usize> = [
        "ID",
        "NAME",
        "IMAGE",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
        "PORTS",
    ]
    .iter()
    .map(|h| header.find(h).unwrap())
    .collect();
    let cell = |l: &str, i: usize| -> String {
        let end = cols.get(i + 1).copied().unwrap_or(l.len()).min(l.len());
        l.get(cols[i]..end).unwrap_or("").trim().to_string()
    };
    lines
        .map(|l| TaskRow {
            id: cell(l, 0),
            name: cell(l, 1),
            node: cell(l, 3),
            desired: cell(l, 4),
            current: cell(l, 5).split(' ').next().unwrap_or("").to_string(),
            error: cell(l, 6),
        })
        .collect()
}

impl Cluster {
    /// Imports the test's busybox tar into node `i`'s image store under another name (before
    /// its agent starts).
    pub fn import(&self, i: usize, name: &str) {
        let n = &self.nodes[i];
        let out = Command::new(SHOAL)
            .args(["image", "import", "--data-dir"])
            .arg(n.data())
            .arg(self._root.path().join("busybox.tar"))
            .arg(name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every task of the service in full (`service ps --format json`).
    pub fn tasks_json(&self, service: &str) -> Vec<serde_json::Value> {
        let out = self
            .any()
            .ok(&["service", "ps", "--format", "json", service]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    }

    /// The service as `service inspect` shows it.
    pub fn inspect(&self, service: &str) -> serde_json::Value {
        let out = self.any().ok(&["service", "inspect", service]);
        let mut v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        v.remove(0)
    }

    /// The hostname of the Raft leader, as `node ls` on node `via` sees it.
    pub fn leader(&self, via: usize) -> Option<String> {
        let out = self.nodes[via].shoal(&["node", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("Leader"))
            .and_then(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("host"))
                    .map(str::to_string)
            })
    }
}

impl Cluster {
    /// What is on this machine of task `id`, one line each: its container on a node, its
    /// container dir, its secret and config files, its cgroups (every hierarchy), its network
    /// namespace and that namespace's mount, its veths (node bridge `shv…`, overlays `so…`)
    /// and the addresses or ports reserved in its name. Empty once the task is removed.
    pub fn task_traces(&self, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        for n in &self.nodes {
            if n.containers().iter().any(|c| c == id) {
                found.push(format!("container {id} on {}", n.host));
            }
            let files = shoal_worker::executor::files::agent_root(&n.data()).join(id);
            for p in [n.data().join("containers").join(id), files] {
                if p.exists() {
                    found.push(format!("dir {}", p.display()));
                }
            }
        }
        let cgroup_roots = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for root in cgroup_roots {
            let p = root.join("shoal").join(id);
            if p.is_dir() {
                found.push(format!("cgroup {}", p.display()));
            }
        }
        let ns = shoal_runtime::network::netns_path(id);
        for p in [ns.clone(), ns.with_file_name(format!("{id}.json"))] {
            if p.exists() {
                found.push(format!("netns {}", p.display()));
            }
        }
        found.extend(
            mounts_under(Path::new("/"))
                .into_iter()
                .filter(|m| m.contains(id))
                .map(|m| format!("mount {m}")),
        );
        let short = |prefix_len: usize| -> String {
            id.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(15 - prefix_len)
                .collect()
        };
        for l in link_names() {
            let ours = l.strip_prefix("shv").is_some_and(|r| r == short(3))
                || l.strip_prefix("so")
                    .and_then(|r| r.get(1..))
                    .is_some_and(|r| r == short(4));
            if ours {
                found.push(format!("link {l}"));
            }
        }
        let net = Path::new(shoal_runtime::network::RUN_DIR).join("net");
        for state in std::fs::read_dir(net).into_iter().flatten().flatten() {
            for kind in ["ip", "ports"] {
                let dir = state.path().join(kind);
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if std::fs::read_to_string(e.path())
                        .is_ok_and(|h| h.split_whitespace().next() == Some(id))
                    {
                        found.push(format!("reservation {}", e.path().display()));
                    }
                }
            }
        }
        found
    }
}

/// The mount points in this process's mount namespace at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect()
}

/// The network interfaces of this process's network namespace.
pub fn link_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}
