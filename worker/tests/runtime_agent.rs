//! The runtime executor end to end: real busybox containers from an image imported into a
//! temporary image store, driven by an agent through the real dispatcher. Needs root.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_manager::ca::Role;
use shoal_manager::store::{Mutation, Object};
use shoal_proto::v1 as pb;
use shoal_proto::v1::TaskState;
use shoal_runtime::container::Container;
use shoal_runtime::image::ImageStore;
use shoal_worker::{Agent, AgentConfig, RuntimeExecutor, RuntimeExecutorConfig};
use support::*;

const IMAGE: &str = "busybox:agent-test";

/// A rootfs tar of /bin/busybox with the applets the tests use, and /etc/passwd.
fn busybox_tar(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    let dir = |b: &mut tar::Builder<std::fs::File>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    };
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        dir(&mut b, d);
    }
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .unwrap();
    for applet in ["sh", "sleep", "echo", "trap"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    b.append_data(&mut h, "etc/passwd", &passwd[..]).unwrap();
    b.finish().unwrap();
}

/// Deletes whatever containers a test left under its state root.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for s in Container::list(&self.0).unwrap_or_default() {
            // Half-made ones too.
            let _ = Container::remove(&self.0, &s.id);
            // And the network the executor gave it (the agent is gone by now).
            let _ = shoal_runtime::network::detach(&s.id);
        }
    }
}

struct Node {
    // First: fields drop in order, and the containers must go before their directories.
    _cleanup: Cleanup,
    data: tempfile::TempDir,
    state_root: PathBuf,
}

impl Node {
    fn new() -> Node {
        let data = tempfile::tempdir().unwrap();
        let tar = data.path().join("rootfs.tar");
        busybox_tar(&tar);
        ImageStore::open(data.path())
            .unwrap()
            .import_rootfs_tar(&tar, IMAGE)
            .unwrap();
        let state_root = data.path().join("run");
        Node {
            _cleanup: Cleanup(state_root.clone()),
            data,
            state_root,
        }
    }

    /// An executor over this node's data dir, as its agent has.
    fn executor(&self) -> RuntimeExecutor {
        RuntimeExecutor::new(RuntimeExecutorConfig {
            data_dir: self.data.path().to_path_buf(),
            state_root: self.state_root.clone(),
            allow_unprotected_exe: true,
            bridge: shoal_runtime::network::BridgeConfig::default(),
            dns_upstream: Vec::new(),
            insecure_registries: Vec::new(),
        })
        .unwrap()
        .with_shoal_binary(shoal_binary())
    }

    async fn agent(&self, c: &Cluster, node: &str) -> Agent {
        let exec = self.executor();
        Agent::start(AgentConfig {
            tls: node_tls(&c.ca, node, Role::Worker),
            managers: vec![c.leader.addr.clone()],
            data_dir: Some(self.data.path().to_path_buf()),
            description: pb::NodeDescription {
                hostname: node.into(),
                resources: Some(shoal_worker::host_resources()),
                ..Default::default()
            },
            executor: Arc::new(exec),
            on_desired_role: None,
        })
        .await
        .unwrap()
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

/// The cgroup dirs of container `id` in every hierarchy (`shoal/<id>`).
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain([PathBuf::from("/sys/fs/cgroup")])
        .map(|root| root.join("shoal").join(id))
        .filter(|p| p.is_dir())
        .collect()
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_containers_run_fail_stop_and_reject() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = Cluster::start(200, &["w1"]).await;
    let node = Node::new();
    let agent = node.agent(&c, "w1").await;
    let (failing, sleeper, missing) = (unique("fail"), unique("sleep"), unique("missing"));
    let mut sleeper_task = task(&sleeper, "w1", IMAGE, &["sleep", "1000"]);
    sleeper_task
        .spec
        .as_mut()
        .unwrap()
        .container
        .as_mut()
        .unwrap()
        .stop_grace_period_ms = 500;
    c.backend.write(vec![
        Mutation::Create(Object::Task(task(
            &failing,
            "w1",
            IMAGE,
            &["sh", "-c", "echo hello from $HOSTNAME; exit 3"],
        ))),
        Mutation::Create(Object::Task(sleeper_task)),
        Mutation::Create(Object::Task(task(
            &missing,
            "w1",
            "127.0.0.1:9/nope:1",
            &["true"],
        ))),
    ]);

    let s = c.wait_task(&failing, TaskState::Failed, 20).await;
    assert_eq!(s.exit_code, 3);
    assert_eq!(s.container_id, failing);
    let mut log = String::new();
    shoal_runtime::logfile::read_file(
        &node
            .data
            .path()
            .join("containers")
            .join(&failing)
            .join("container.log"),
        &mut |r| log.push_str(&String::from_utf8_lossy(r.data)),
    )
    .unwrap();
    assert!(log.starts_with("hello from "), "output captured: {log:?}");

    let s = c.wait_task(&missing, TaskState::Rejected, 20).await;
    // Not on the node: pulled from its registry, which is not there (loopback port 9).
    assert!(s.err.starts_with("pull 127.0.0.1:9/nope:1: "), "{}", s.err);

    let s = c.wait_task(&sleeper, TaskState::Running, 20).await;
    assert!(s.pid > 0);
    let ct = Container::load(&node.state_root, &sleeper).unwrap();
    assert_eq!(ct.pid(), s.pid);

    // `sleep` as the container's pid 1 ignores SIGTERM: killed after the 500 ms grace period.
    let t0 = std::time::Instant::now();
    c.backend
        .update_task(&sleeper, |t| t.desired_state = TaskState::Shutdown as i32);
    let s = c.wait_task(&sleeper, TaskState::Shutdown, 20).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "waited the grace period: {took:?}"
    );
    assert_eq!(s.exit_code, 137, "SIGKILLed");
    // The executor deletes the container, then its directory.
    let dir = node.data.path().join("containers").join(&sleeper);
    eventually("container and its directory deleted", 10, || {
        Container::load(&node.state_root, &sleeper).is_err() && !dir.exists()
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_running_containers() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = Cluster::start(200, &["w1"]).await;
    let node = Node::new();
    let agent = node.agent(&c, "w1").await;
    let (keeper, quitter) = (unique("keep"), unique("quit"));
    c.backend.write(vec![
        Mutation::Create(Object::Task(task(&keeper, "w1", IMAGE, &["sleep", "1000"]))),
        Mutation::Create(Object::Task(task(
            &quitter,
            "w1",
            IMAGE,
            &["sh", "-c", "sleep 1; exit 4"],
        ))),
    ]);
    let kept = c.wait_task(&keeper, TaskState::Running, 20).await;
    c.wait_task(&quitter, TaskState::Running, 20).await;
    agent.shutdown().await;

    // While no agent runs, the quitter exits.
    let mut q = Container::load(&node.state_root, &quitter).unwrap();
    q.wait_timeout(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("quitter exited");

    let agent = node.agent(&c, "w1").await;
    let s = c.wait_task(&quitter, TaskState::Failed, 20).await;
    assert_eq!(s.exit_code, 4, "the real exit code");
    // The keeper was adopted: same process, still running, never restarted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let k = Container::load(&node.state_root, &keeper).unwrap();
    assert_eq!(k.pid(), kept.pid);
    assert_eq!(k.status(), shoal_runtime::container::Status::Running);
    assert_eq!(c.task_status(&keeper).state, TaskState::Running as i32);
    assert_eq!(agent.statuses()[&keeper].pid, kept.pid);

    c.backend
        .update_task(&keeper, |t| t.desired_state = TaskState::Shutdown as i32);
    c.wait_task(&keeper, TaskState::Shutdown, 20).await;
    agent.shutdown().await;
}

/// An agent killed after its executor made a task's container but before the task's STARTING
/// was recorded leaves the container with the task READY in its database. When the task is
/// removed before the agent is back, the restarted agent must still remove that container,
/// its cgroups (every hierarchy), network and dir: it holds no task for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_removes_the_containers_it_has_no_task_for() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = Cluster::start(200, &["w1"]).await;
    let node = Node::new();
    let stray = unique("stray");
    let t = task(&stray, "w1", IMAGE, &["sleep", "1000"]);
    let exec = node.executor();
    use shoal_worker::Executor;
    exec.prepare(&t, &|_| {}).await.expect("prepare");
    let started = exec.start(&t).await.expect("start");
    drop(exec);
    {
        let db = shoal_worker::db::TaskDb::open(node.data.path()).expect("task db");
        let mut rec = t.clone();
        rec.status = Some(pb::TaskStatus {
            state: TaskState::Ready as i32,
            ..Default::default()
        });
        db.put(&rec).expect("record");
        db.flush().expect("flush");
    }
    let cgroups = cgroup_dirs(&stray);
    assert!(!cgroups.is_empty(), "the container has cgroups");
    let dir = node.data.path().join("containers").join(&stray);
    assert!(dir.is_dir());

    // The task is not in the cluster: the dispatcher's full set does not have it.
    let agent = node.agent(&c, "w1").await;
    eventually(
        "the stray container, its cgroups and its dir removed",
        30,
        || {
            Container::load(&node.state_root, &stray).is_err()
                && cgroup_dirs(&stray).is_empty()
                && !dir.exists()
                && !shoal_runtime::network::netns_path(&stray).exists()
        },
    )
    .await;
    assert!(
        !Path::new(&format!("/proc/{}", started.pid)).exists(),
        "its process is gone"
    );
    // And the dispatcher's full set makes the agent forget the task.
    eventually("the task forgotten", 20, || {
        !agent.statuses().contains_key(&stray)
    })
    .await;
    agent.shutdown().await;
}

/// A container removed behind the agent's back while it was down (chaos's
/// kill-9-worker-and-containers deletes them): the task fails, and once it is shut down
/// nothing of it is left on the node, not even its dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_container_vanished_leaves_nothing_once_shut_down() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = Cluster::start(200, &["w1"]).await;
    let node = Node::new();
    let agent = node.agent(&c, "w1").await;
    let id = unique("gone");
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        &id,
        "w1",
        IMAGE,
        &["sleep", "1000"],
    )))]);
    c.wait_task(&id, TaskState::Running, 20).await;
    agent.shutdown().await;
    Container::remove(&node.state_root, &id).expect("delete the container");
    shoal_runtime::network::detach(&id).expect("release its network");

    let agent = node.agent(&c, "w1").await;
    let s = c.wait_task(&id, TaskState::Failed, 20).await;
    assert!(s.err.contains("vanished"), "{}", s.err);
    c.backend
        .update_task(&id, |t| t.desired_state = TaskState::Shutdown as i32);
    let dir = node.data.path().join("containers").join(&id);
    eventually("the task's dir removed", 20, || !dir.exists()).await;
    assert!(cgroup_dirs(&id).is_empty());
    agent.shutdown().await;
}

/// An agent killed while a task's container was being created leaves the task STARTING in its
/// database and a half-made container (a state dir without `state.json`): the restarted agent
/// removes it and starts the task afresh instead of failing it on "already exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_resumed_with_a_half_made_container_starts_afresh() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = Cluster::start(200, &["w1"]).await;
    let node = Node::new();
    let id = unique("half");
    let t = task(&id, "w1", IMAGE, &["sleep", "1000"]);
    c.backend
        .write(vec![Mutation::Create(Object::Task(t.clone()))]);
    {
        let db = shoal_worker::db::TaskDb::open(node.data.path()).expect("task db");
        let mut rec = t.clone();
        rec.status = Some(pb::TaskStatus {
            state: TaskState::Starting as i32,
            ..Default::default()
        });
        db.put(&rec).expect("record");
        db.flush().expect("flush");
    }
    let half = node.state_root.join(&id);
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("cgroup"), format!("shoal/{id}")).unwrap();

    let agent = node.agent(&c, "w1").await;
    let s = c.wait_task(&id, TaskState::Running, 30).await;
    let ct = Container::load(&node.state_root, &id).expect("a real container now");
    assert_eq!(ct.pid(), s.pid);
    c.backend
        .update_task(&id, |t| t.desired_state = TaskState::Shutdown as i32);
    c.wait_task(&id, TaskState::Shutdown, 20).await;
    agent.shutdown().await;
}
