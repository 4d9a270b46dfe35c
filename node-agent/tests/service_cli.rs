//! Services end to end: `shoal agent` processes on 127.0.0.x (each with its own data dir,
//! socket and address, each running its worker agent), real busybox containers, driven through
//! the CLI as a user would. Every test kills its agents by pid and force-deletes the
//! containers its nodes made (which removes their cgroups); overlay mounts live in the
//! containers' own mount namespaces.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
const IMAGE: &str = "busybox:latest";
/// The worker agent's runtime root under a node's data dir (node-agent/src/cmd/agent.rs).
const TASK_RUNTIME_DIR: &str = "containers/.tasks";
/// Fast failure detection: a silent node is down after 4 × 500 ms.
const FAST_HEARTBEAT: (&str, u32) = ("500ms", 4);
/// For tests that restart agents on purpose: a node is down only after 10 s of silence, so
/// a restart on a loaded machine is not taken for a failure.
const PATIENT_HEARTBEAT: (&str, u32) = ("1s", 10);
/// How long a test waits for the cluster to reach a state.
const CONVERGE: Duration = Duration::from_secs(20);

fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// A root filesystem tar of the host's static busybox: bin/busybox, applet links, passwd.
fn busybox_tar(path: &Path) {
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
struct Node {
    dir: PathBuf,
    addr: String,
    host: String,
    child: Option<Child>,
    /// Runs the sim executor (a hollow node: no containers).
    hollow: bool,
}

impl Node {
    fn new(root: &Path, n: u8, tar: &Path) -> Node {
        let ip = format!("127.0.0.{n}");
        let node = Node {
            dir: root.join(format!("node{n}")),
            addr: format!("{ip}:{}", free_port(&ip)),
            host: format!("host{n}"),
            child: None,
            hollow: false,
        };
        std::fs::create_dir_all(node.data()).unwrap();
        // The image must be in each node's own store: there is no cluster registry yet.
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

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("shoal.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(SHOAL)
            .args([
                "agent",
                "--listen-addr",
                &self.addr,
                "--hostname",
                &self.host,
            ])
            .arg("--data-dir")
            .arg(self.data())
            .arg("--socket")
            .arg(self.socket())
            .args(if self.hollow {
                &["--executor", "sim"][..]
            } else {
                &[][..]
            })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not open its socket",
                self.host
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to the agent only: its containers keep running.
    fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn runtime(&self, args: &[&str]) -> Output {
        Command::new(SHOAL)
            .arg("runtime")
            .arg("--root")
            .arg(self.data().join(TASK_RUNTIME_DIR))
            .args(args)
            .output()
            .unwrap()
    }

    /// The containers the node's runtime holds, by id.
    fn containers(&self) -> Vec<String> {
        let out = self.runtime(&["list", "-q"]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The host pid of a running container, if it runs.
    fn container_pid(&self, id: &str) -> Option<i32> {
        let out = self.runtime(&["state", id]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["status"] == "running").then(|| v["pid"].as_i64().map(|p| p as i32))?
    }

    /// Force-deletes every container of the node (kills them, removes their cgroups). A
    /// `runtime create` the killed agent started may still finish: the runtime root is watched
    /// until it stays empty.
    fn remove_containers(&self) {
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

    fn shoal(&self, args: &[&str]) -> Output {
        Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", self.socket())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "shoal {args:?} on {} failed: {}",
            self.host,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A row of `service ps --no-trunc`.
#[derive(Debug, Clone)]
struct TaskRow {
    id: String,
    name: String,
    node: String,
    desired: String,
    current: String,
    error: String,
}

/// Nodes of one test, cleaned up on drop.
struct Cluster {
    nodes: Vec<Node>,
    _root: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_agent();
        }
        for n in &self.nodes {
            n.remove_containers();
        }
    }
}

impl Cluster {
    /// `size` nodes: node 1 inits the cluster, `managers - 1` more join as managers, the rest
    /// as workers; returns once every node is Ready.
    fn new(size: u8, managers: u8) -> Cluster {
        Self::build(size, managers, 0, FAST_HEARTBEAT)
    }

    /// Like [`Cluster::new`], plus `spare` nodes started but not joined.
    fn with_spare(size: u8, managers: u8, spare: u8) -> Cluster {
        Self::build(size, managers, spare, FAST_HEARTBEAT)
    }

    /// `heartbeat`: the dispatcher's period and the heartbeats a node may miss.
    fn build(size: u8, managers: u8, spare: u8, heartbeat: (&str, u32)) -> Cluster {
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
        let mut c = Cluster { nodes, _root: root };
        for n in &mut c.nodes {
            n.spawn();
        }
        let first = &c.nodes[0];
        first.ok(&["cluster", "init", "--advertise-addr", &first.addr]);
        first.ok(&[
            "cluster",
            "update",
            "--dispatcher-heartbeat",
            heartbeat.0,
            "--missed-heartbeats",
            &heartbeat.1.to_string(),
        ]);
        for i in 1..size as usize {
            c.join(i, i < managers as usize);
        }
        c.wait_ready(size as usize);
        c
    }

    fn join(&self, i: usize, manager: bool) {
        let first = &self.nodes[0];
        let role = if manager { "manager" } else { "worker" };
        let token = first.ok(&["cluster", "join-token", role, "-q"]);
        self.nodes[i].ok(&["cluster", "join", "--token", token.trim(), &first.addr]);
    }

    /// Some node whose daemon answers cluster calls (the first one still running).
    fn any(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.child.is_some() && n.shoal(&["node", "ls"]).status.success())
            .expect("a node that answers")
    }

    fn wait_ready(&self, count: usize) {
        self.until("nodes ready", || {
            let ls = String::from_utf8(self.any().shoal(&["node", "ls"]).stdout).unwrap();
            ls.lines().filter(|l| l.contains(" Ready ")).count() == count
        });
    }

    fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
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

    fn ps(&self, service: &str) -> Vec<TaskRow> {
        let out = self.any().ok(&["service", "ps", "--no-trunc", service]);
        parse_ps(&out)
    }

    /// Running tasks wanted running: task id → hostname.
    fn running(&self, service: &str) -> BTreeMap<String, String> {
        self.ps(service)
            .into_iter()
            .filter(|t| t.desired == "Running" && t.current == "Running")
            .map(|t| (t.id, t.node))
            .collect()
    }

    fn per_node(&self, service: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for host in self.running(service).values() {
            *m.entry(host.clone()).or_default() += 1;
        }
        m
    }

    fn node(&self, host: &str) -> &Node {
        self.nodes.iter().find(|n| n.host == host).unwrap()
    }

    /// Each running task is a live container on its node (the container id is the task id).
    fn assert_real(&self, service: &str) {
        for (id, host) in self.running(service) {
            let pid = self
                .node(&host)
                .container_pid(&id)
                .unwrap_or_else(|| panic!("task {id} has no running container on {host}"));
            assert!(Path::new(&format!("/proc/{pid}")).exists());
        }
    }
}

fn parse_ps(out: &str) -> Vec<TaskRow> {
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

#[test]
fn replicas_spread_over_three_nodes_scale_and_go() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    let out = m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "6",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    // Progress, docker's way, in plain lines (stdout is not a terminal).
    assert!(out.contains("overall progress: 6 out of 6 tasks"), "{out}");
    assert!(
        out.trim_end().ends_with("verify: Service converged"),
        "{out}"
    );
    let spread = c.per_node("web");
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{spread:?}"
    );
    c.assert_real("web");
    let ls = m.ok(&["service", "ls"]);
    assert!(ls.contains("replicated   6/6"), "{ls}");
    // The front door lists only its own containers.
    for n in &c.nodes {
        let ps = n.shoal(&["ps", "-a", "--data-dir", n.data().to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&ps.stdout).lines().count(),
            1,
            "{ps:?}"
        );
    }

    let out = m.ok(&["service", "scale", "web=9"]);
    assert!(out.starts_with("web scaled to 9\n"), "{out}");
    assert!(out.contains("verify: Service converged"), "{out}");
    let spread = c.per_node("web");
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "{spread:?}"
    );

    m.ok(&["service", "scale", "web=2"]);
    assert_eq!(c.running("web").len(), 2);
    let total: usize = c.nodes.iter().map(|n| n.containers().len()).sum();
    assert_eq!(total, 2, "stopped containers are removed");
    c.assert_real("web");

    m.ok(&["service", "rm", "web"]);
    c.until("containers removed", || {
        c.nodes.iter().all(|n| n.containers().is_empty())
    });
    assert!(!m.ok(&["service", "ls"]).contains("web"));
}

#[test]
fn a_killed_worker_s_tasks_come_back_elsewhere() {
    let mut c = Cluster::new(3, 1);
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "6",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.running("web");
    let on3: Vec<String> = before
        .iter()
        .filter(|(_, h)| *h == "host3")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(on3.len(), 2);
    // The machine dies: its agent and its containers.
    c.nodes[2].kill_agent();
    c.nodes[2].remove_containers();
    c.until("6 tasks running on the two live nodes", || {
        let r = c.running("web");
        r.len() == 6 && r.values().all(|h| h != "host3")
    });
    let after = c.running("web");
    for id in before.keys().filter(|id| !on3.contains(id)) {
        assert!(
            after.contains_key(id),
            "task {id} on a live node was disturbed"
        );
    }
    c.assert_real("web");
    let ls = c.nodes[0].ok(&["node", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.contains("host3") && l.contains("Down")),
        "{ls}"
    );
}

#[test]
fn drain_moves_tasks_and_pause_stops_new_ones() {
    let c = Cluster::new(3, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    m.ok(&["node", "update", "--availability", "drain", "host3"]);
    c.until("host3 drained", || {
        let r = c.running("web");
        r.len() == 3 && r.values().all(|h| h != "host3")
    });
    c.until("host3's container gone", || {
        c.nodes[2].containers().is_empty()
    });

    m.ok(&["node", "update", "--availability", "pause", "host2"]);
    let on2 = c.per_node("web").get("host2").copied().unwrap_or(0);
    m.ok(&["service", "scale", "web=6"]);
    let spread = c.per_node("web");
    assert_eq!(spread.get("host2").copied().unwrap_or(0), on2, "{spread:?}");
    assert_eq!(spread.get("host1").copied(), Some(6 - on2), "{spread:?}");
    assert_eq!(spread.get("host3"), None);
    c.assert_real("web");
}

#[test]
fn on_failure_restarts_stop_at_max_attempts() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "fail",
        "--restart-condition",
        "on-failure",
        "--restart-max-attempts",
        "2",
        "--restart-delay",
        "100ms",
        IMAGE,
        "sh",
        "-c",
        "exit 3",
    ]);
    // The first run and two restarts, all failed with the exit code.
    c.until("three failed tasks", || {
        let ps = c.ps("fail");
        ps.len() == 3 && ps.iter().all(|t| t.current == "Failed")
    });
    std::thread::sleep(Duration::from_secs(2));
    let ps = c.ps("fail");
    assert_eq!(ps.len(), 3, "no restart past max attempts: {ps:?}");
    assert!(ps.iter().all(|t| t.error.contains('3')), "{ps:?}");
    assert!(ps.iter().all(|t| t.name.ends_with("fail.1")), "{ps:?}");

    // A clean exit is not a failure: on-failure leaves it alone.
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "done",
        "--restart-condition",
        "on-failure",
        "--restart-delay",
        "100ms",
        IMAGE,
        "true",
    ]);
    c.until("complete", || {
        c.ps("done").iter().any(|t| t.current == "Complete")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.ps("done").len(), 1);
}

#[test]
fn a_global_service_follows_a_node_join() {
    let c = Cluster::with_spare(2, 1, 1);
    let m = &c.nodes[0];
    let out = m.ok(&[
        "service", "create", "--name", "agent", "--mode", "global", IMAGE, "sleep", "3600",
    ]);
    assert!(out.contains("overall progress: 2 out of 2 tasks"), "{out}");
    assert_eq!(c.per_node("agent").len(), 2);
    let ls = m.ok(&["service", "ls"]);
    assert!(
        ls.lines().any(|l| l
            .split_whitespace()
            .skip(1)
            .take(3)
            .eq(["agent", "global", "2/2"])),
        "{ls}"
    );

    c.join(2, false);
    c.until("a task on the new node", || {
        let p = c.per_node("agent");
        p.len() == 3 && p.values().all(|n| *n == 1)
    });
    c.assert_real("agent");
}

#[test]
fn an_unsatisfiable_constraint_pends_until_a_label_matches() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    // Without --detach the CLI waits; Ctrl-C stops the waiting, not the service.
    let create = Command::new(SHOAL)
        .args([
            "service",
            "create",
            "--name",
            "blue",
            "--replicas",
            "2",
            "--constraint",
            "node.labels.zone==blue",
            IMAGE,
            "sleep",
            "3600",
        ])
        .env("SHOAL_SOCKET", m.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(create.id() as i32, libc::SIGINT) };
    let out = create.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no suitable node"), "{text}");
    assert!(
        text.contains("Operation continuing in background."),
        "{text}"
    );
    c.until("pending with a reason", || {
        let ps = c.ps("blue");
        ps.len() == 2
            && ps
                .iter()
                .all(|t| t.current == "Pending" && t.error.contains("no suitable node"))
    });
    assert!(c.nodes.iter().all(|n| n.containers().is_empty()));
    m.ok(&["node", "update", "--label-add", "zone=blue", "host2"]);
    c.until("running on the labelled node", || {
        c.per_node("blue") == BTreeMap::from([("host2".to_string(), 2)])
    });
    c.assert_real("blue");
}

#[test]
fn restarting_an_agent_leaves_its_containers_running() {
    let mut c = Cluster::build(2, 1, 0, PATIENT_HEARTBEAT);
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "4",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.running("web");
    let pids: HashMap<String, i32> = before
        .iter()
        .map(|(id, h)| (id.clone(), c.node(h).container_pid(id).unwrap()))
        .collect();
    // The worker's agent dies hard and comes back; its containers are adopted.
    c.nodes[1].kill_agent();
    for (id, h) in &before {
        if h == "host2" {
            assert_eq!(c.node(h).container_pid(id), Some(pids[id]));
        }
    }
    c.nodes[1].spawn();
    c.wait_ready(2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.running("web"), before, "same tasks on the same nodes");
    for (id, h) in &before {
        assert_eq!(
            c.node(h).container_pid(id),
            Some(pids[id]),
            "task {id} restarted"
        );
    }
    assert_eq!(c.ps("web").len(), 4, "no replacement tasks");
}

#[test]
fn a_leader_change_does_not_disturb_running_tasks() {
    let mut c = Cluster::build(3, 3, 0, PATIENT_HEARTBEAT);
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.running("web");
    let pids: HashMap<String, i32> = before
        .iter()
        .map(|(id, h)| (id.clone(), c.node(h).container_pid(id).unwrap()))
        .collect();
    // The leader's process dies: another manager takes over; then it comes back.
    c.nodes[0].kill_agent();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let out = c.nodes[1].shoal(&["node", "ls"]);
        let ls = String::from_utf8_lossy(&out.stdout).to_string();
        let leader = ls
            .lines()
            .find(|l| l.contains("Leader"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("host")));
        if leader.is_some_and(|h| h != "host1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader: {ls} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.nodes[0].spawn();
    c.wait_ready(3);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.running("web"), before, "same tasks on the same nodes");
    for (id, h) in &before {
        assert_eq!(
            c.node(h).container_pid(id),
            Some(pids[id]),
            "task {id} restarted"
        );
    }
    assert_eq!(c.ps("web").len(), 3, "no replacement tasks");
}

#[test]
fn a_node_that_leaves_removes_its_tasks() {
    let c = Cluster::new(2, 1);
    c.nodes[0].ok(&[
        "service", "create", "--name", "agent", "--mode", "global", IMAGE, "sleep", "3600",
    ]);
    assert_eq!(c.nodes[1].containers().len(), 1);
    c.nodes[1].ok(&["cluster", "leave"]);
    c.until("the leaver's container removed", || {
        c.nodes[1].containers().is_empty()
    });
    assert!(
        !c.nodes[1].data().join("worker").exists(),
        "task database forgotten"
    );
    assert_eq!(
        c.nodes[0].containers().len(),
        1,
        "the other node's task stays"
    );
}

#[test]
fn scaling_keeps_the_spec_version_and_a_new_spec_changes_it() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let version = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&m.ok(&["service", "inspect", "web"])).unwrap();
        v[0]["SpecVersion"].as_u64().unwrap()
    };
    m.ok(&[
        "service", "create", "-d", "--name", "web", IMAGE, "sleep", "3600",
    ]);
    let created = version();
    assert!(created > 0);
    m.ok(&["service", "scale", "-d", "web=2"]);
    assert_eq!(version(), created);
    m.ok(&["service", "update", "--force", "web"]);
    assert!(version() > created);
    let pretty = m.ok(&["service", "inspect", "--pretty", "web"]);
    assert!(pretty.contains("Replicas:      2"), "{pretty}");
    assert!(pretty.contains("Args:          sleep 3600"), "{pretty}");
}

#[test]
fn bad_service_arguments_fail_on_one_line_before_the_daemon_is_asked() {
    // No daemon at this socket: the arguments are checked first.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    for (args, want) in [
        (
            &["service", "scale", "web"][..],
            "invalid scale specifier \"web\"",
        ),
        (&["service", "scale", "web=-1"][..], "must not be negative"),
        (
            &["service", "scale", "web=x"][..],
            "invalid scale specifier",
        ),
        (
            &["service", "ps", "--filter", "color=red", "web"][..],
            "invalid filter \"color\"",
        ),
        (
            &["service", "ps", "--filter", "desired-state=sleeping", "web"][..],
            "invalid filter desired-state=sleeping",
        ),
        (
            &[
                "service",
                "create",
                "--mode",
                "global",
                "--replicas",
                "2",
                IMAGE,
            ][..],
            "--replicas applies to replicated services only",
        ),
        (
            &["service", "create", "--restart-delay", "soon", IMAGE][..],
            "--restart-delay",
        ),
    ] {
        let out = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", &sock)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("shoal: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_hollow_node_is_marked_and_runs_tasks_without_containers() {
    let mut c = Cluster::with_spare(1, 1, 1);
    c.nodes[1].kill_agent();
    c.nodes[1].hollow = true;
    c.nodes[1].spawn();
    c.join(1, false);
    c.wait_ready(2);
    let ls = c.nodes[0].ok(&["node", "ls"]);
    assert!(ls.contains("host2 (hollow)"), "{ls}");
    assert!(!ls.contains("host1 (hollow)"), "{ls}");
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "sim",
        "--replicas",
        "3",
        "--constraint",
        "node.hostname==host2",
        IMAGE,
        "sleep",
        "3600",
    ]);
    assert_eq!(
        c.per_node("sim"),
        BTreeMap::from([("host2".to_string(), 3)])
    );
    assert!(c.nodes.iter().all(|n| n.containers().is_empty()));
}
