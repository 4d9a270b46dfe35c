//! The cluster under test: a test bed of hosts, each running a real `shoal agent`; the first
//! `managers` hosts are managers, the rest workers. The last manager's data dir is a small
//! tmpfs (the disk-full fault), the one before it ext4 on a loop device (disk full on a real
//! file system, and a stuck disk: the file system frozen). Control calls go over each host's
//! local socket (gRPC).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_tests::cluster::{ClusterBuilder, Member};
use shoal_tests::disk::LoopFs;
use shoal_tests::testbed::{Host, Signal, Testbed};
use tonic::transport::Channel;

/// The image every service runs, imported into each host's store.
pub const IMAGE: &str = "busybox:latest";
/// Size of the tmpfs the disk-full manager keeps its data dir on: room for sled's growth
/// over a long run (tens of MiB) plus the space the manager needs free to start again.
pub const TMPFS_SIZE: &str = "160m";
/// Size of the ext4 file system (on a loop device) of the other disk-fault manager.
pub const EXT4_MIB: u64 = 160;
/// How long connecting to a host's socket may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a control call made by the harness itself (not the recorded workload) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(12);
/// How long bootstrapping may wait for every node to be Ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Tries at joining one node.
const JOIN_ATTEMPTS: u32 = 3;
/// Where a host's worker agent keeps its task containers (under its data dir).
const TASK_RUNTIME_DIR: &str = "containers/.tasks";
/// Rounds of force-deleting a host's containers (a create in flight may still finish).
const CONTAINER_KILL_ROUNDS: usize = 10;

/// The test bed with its agents.
pub struct Cluster {
    /// The ext4 data dir of [`Cluster::ext4_host`], if it could be made. Declared before the
    /// test bed, so that it is thawed before the test bed goes down (a frozen file system
    /// that is unmounted lazily could never be thawed).
    pub ext4: Option<LoopFs>,
    /// Why there is no ext4 data dir, when there is none.
    pub ext4_missing: Option<String>,
    pub tb: Testbed,
    pub managers: Vec<usize>,
    pub workers: Vec<usize>,
    /// The manager whose data dir is a tmpfs.
    pub disk_host: usize,
    /// The manager whose data dir is ext4 on a loop device (another than `disk_host`).
    pub ext4_host: usize,
}

/// What one `ListNodes` says about the cluster.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub leader: Option<usize>,
    pub ready: usize,
    pub reachable_managers: usize,
    pub nodes: usize,
    /// The host whose socket answered.
    pub via: String,
    /// Every node that is not Ready or whose manager is unreachable: "host state (message)".
    pub unwell: Vec<String>,
}

pub async fn control(socket: &Path) -> Result<ControlClient<Channel>> {
    let ch = tokio::time::timeout(
        CONNECT_TIMEOUT,
        shoal_manager::daemon::connect_local(socket),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connecting to {}: timed out", socket.display()))??;
    Ok(ControlClient::new(ch))
}

impl Cluster {
    /// Brings up `managers + workers` hosts, their agents, and forms the cluster.
    pub fn start(managers: usize, workers: usize, log: &dyn Fn(&str)) -> Result<Cluster> {
        let n = managers + workers;
        let tb = Testbed::up_with_hint("shoal-chaos", n).context("bringing the test bed up")?;
        let mut c = Cluster {
            ext4: None,
            ext4_missing: None,
            tb,
            managers: (1..=managers).collect(),
            workers: (managers + 1..=n).collect(),
            disk_host: managers,
            ext4_host: managers - 1,
        };
        log(&format!(
            "test bed {} up: {} hosts on 10.77.{}.0/24",
            c.tb.prefix(),
            n,
            c.tb.slot()
        ));
        let disk = c.host(c.disk_host)?.name().to_string();
        c.tb.script(&["tmpfs", &disk, TMPFS_SIZE])
            .context("mounting the disk-full manager's tmpfs")?;
        let ext4_dir = c.host(c.ext4_host)?.data_dir();
        match LoopFs::mount(&ext4_dir, EXT4_MIB) {
            Ok(fs) => {
                log(&format!(
                    "{} keeps its data on ext4 ({} MiB, {})",
                    c.host(c.ext4_host)?.name(),
                    fs.size_mib(),
                    fs.device()
                ));
                c.ext4 = Some(fs);
            }
            Err(e) => {
                log(&format!(
                    "no ext4 data dir ({e}): the ext4 disk faults are skipped"
                ));
                c.ext4_missing = Some(e.to_string());
            }
        }
        for h in c.tb.hosts() {
            h.import_busybox(IMAGE)
                .with_context(|| format!("importing {IMAGE} into {}", h.name()))?;
            h.spawn_agent(&[])
                .with_context(|| format!("starting the agent in {}", h.name()))?;
        }
        let hosts: Vec<&dyn Member> = c.tb.hosts().iter().map(|h| h as &dyn Member).collect();
        ClusterBuilder::new()
            .managers(managers)
            .join_attempts(JOIN_ATTEMPTS)
            .form_logged(&hosts, log)
            .context("forming the cluster")?;
        log("cluster formed; waiting for every node to be Ready");
        Ok(c)
    }

    pub fn host(&self, i: usize) -> Result<&Host> {
        Ok(self.tb.host(i)?)
    }

    pub fn sockets(&self, hosts: &[usize]) -> Vec<(String, PathBuf)> {
        hosts
            .iter()
            .filter_map(|&i| self.tb.host(i).ok())
            .map(|h| (h.name().to_string(), h.socket()))
            .collect()
    }

    fn index_of(&self, hostname: &str) -> Option<usize> {
        self.tb
            .hosts()
            .iter()
            .find(|h| h.name() == hostname)
            .map(Host::index)
    }

    /// Asks the managers in turn (the first that answers) how the cluster is.
    pub async fn health(&self) -> Option<Health> {
        self.health_without(None).await
    }

    /// [`Cluster::health`] without asking host `skip` (a manager the caller stopped: its
    /// socket accepts and never answers, which would cost a whole [`CALL_TIMEOUT`]).
    pub async fn health_without(&self, skip: Option<usize>) -> Option<Health> {
        let ask: Vec<usize> = self
            .managers
            .iter()
            .copied()
            .filter(|&m| Some(m) != skip)
            .collect();
        for (via, sock) in self.sockets(&ask) {
            let Ok(mut c) = control(&sock).await else {
                continue;
            };
            let r =
                tokio::time::timeout(CALL_TIMEOUT, c.list_nodes(pb::ListNodesRequest::default()))
                    .await;
            let Ok(Ok(r)) = r else { continue };
            let nodes = r.into_inner().nodes;
            let mut h = Health {
                nodes: nodes.len(),
                via,
                ..Default::default()
            };
            for n in &nodes {
                let name = n
                    .description
                    .as_ref()
                    .map(|d| d.hostname.as_str())
                    .unwrap_or("");
                let state = n.status.as_ref().map_or(0, |s| s.state);
                if state == pb::NodeState::Ready as i32 {
                    h.ready += 1;
                } else {
                    let st = pb::NodeState::try_from(state)
                        .map(|s| s.as_str_name().to_string())
                        .unwrap_or_else(|_| state.to_string());
                    let msg = n.status.as_ref().map_or("", |s| s.message.as_str());
                    h.unwell.push(format!("{name} {st} ({msg})"));
                }
                if let Some(ms) = &n.manager_status {
                    if ms.reachable {
                        h.reachable_managers += 1;
                    } else {
                        h.unwell.push(format!("{name} manager unreachable"));
                    }
                    if ms.leader {
                        h.leader = self.index_of(name);
                    }
                }
            }
            return Some(h);
        }
        None
    }

    /// True when there is a leader, every manager is reachable and every node is Ready.
    pub fn all_well(&self, h: &Health) -> bool {
        h.leader.is_some()
            && h.reachable_managers == self.managers.len()
            && h.ready == self.tb.hosts().len()
            && h.nodes == self.tb.hosts().len()
    }

    /// Waits (up to `timeout`) for [`Cluster::all_well`]; returns how long it took.
    pub async fn wait_well(&self, timeout: Duration) -> Result<(Duration, Health)> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Some(h) = self.health().await {
                if self.all_well(&h) {
                    return Ok((start.elapsed(), h));
                }
                last = Some(h);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "the cluster was not well after {} s (last seen: {last:?})",
            timeout.as_secs()
        )
    }

    /// The leader's host number, asking until one is known (up to `timeout`).
    pub async fn leader(&self, timeout: Duration) -> Option<usize> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(l) = self.health().await.and_then(|h| h.leader) {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    }

    /// Starts host `i`'s agent unless it runs.
    pub fn ensure_agent(&self, i: usize) -> Result<()> {
        let h = self.host(i)?;
        if h.agent_pid().is_none() {
            h.spawn_agent(&[])
                .with_context(|| format!("restarting the agent in {}", h.name()))?;
        }
        Ok(())
    }

    pub fn kill_agent(&self, i: usize, sig: Signal) -> Result<()> {
        let h = self.host(i)?;
        h.kill(sig)
            .with_context(|| format!("signalling the agent in {} ({sig:?})", h.name()))
    }

    /// SIGKILLs every container the host's worker agent made (the machine dies with them).
    pub fn kill_containers(&self, i: usize) -> Result<usize> {
        let h = self.host(i)?;
        let root = h.data_dir().join(TASK_RUNTIME_DIR);
        let root = root.to_string_lossy().into_owned();
        let mut killed = 0;
        for _ in 0..CONTAINER_KILL_ROUNDS {
            let out = h.shoal(&["runtime", "--root", &root, "list", "-q"])?;
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if ids.is_empty() {
                break;
            }
            for id in &ids {
                h.shoal(&["runtime", "--root", &root, "delete", "--force", id])?;
                killed += 1;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(killed)
    }

    /// Where each host's agent runs now and how long its log is: taken before a fault, so
    /// that [`Cluster::wait_sessions`] can tell which agents were restarted.
    pub fn agent_marks(&self) -> Vec<(Option<u32>, u64)> {
        self.tb
            .hosts()
            .iter()
            .map(|h| {
                let len = std::fs::metadata(h.agent_log()).map_or(0, |m| m.len());
                (h.agent_pid(), len)
            })
            .collect()
    }

    /// Waits (up to `timeout`) until every agent that runs under another pid than in `marks`
    /// has logged a dispatcher session start since. Before 066798f a manager node showed Ready
    /// as soon as its Raft port answered, and only its agent's log told that it had a session
    /// with the leader again; the check stays as a second witness. Returns the hosts still
    /// without one.
    pub async fn wait_sessions(
        &self,
        marks: &[(Option<u32>, u64)],
        timeout: Duration,
    ) -> Vec<String> {
        let start = Instant::now();
        loop {
            let mut missing = Vec::new();
            for (h, (pid, len)) in self.tb.hosts().iter().zip(marks) {
                if h.agent_pid() == *pid {
                    continue;
                }
                let log = std::fs::read(h.agent_log()).unwrap_or_default();
                let since = log.get(*len as usize..).unwrap_or(&[]);
                if !String::from_utf8_lossy(since).contains("session started") {
                    missing.push(h.name().to_string());
                }
            }
            if missing.is_empty() || start.elapsed() >= timeout {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every host's agent log, by host name.
    pub fn logs(&self) -> BTreeMap<String, String> {
        self.tb
            .hosts()
            .iter()
            .map(|h| {
                let text = std::fs::read(h.agent_log())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                (h.name().to_string(), text)
            })
            .collect()
    }
}

/// Whether a container (by id) has live processes: its cgroup `shoal/<id>` in any hierarchy
/// lists one. Container ids are random task ids, so only this run's containers match.
pub fn container_live(id: &str) -> bool {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return false;
    }
    for base in [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
    ] {
        let p = Path::new(base).join("shoal").join(id).join("cgroup.procs");
        if let Ok(s) = std::fs::read_to_string(&p) {
            if s.lines().any(|l| !l.trim().is_empty()) {
                return true;
            }
        }
    }
    false
}
