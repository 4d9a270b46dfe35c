//! Fixtures of the agent tests: a real store on sled files, a backend applying commands to it
//! directly (standing in for Raft), the real dispatcher served over mTLS on 127.0.0.1, and
//! node certificates from a real cluster CA.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_manager::ca::{make_csr, Role, RootCa};
use shoal_manager::daemon::StoreRegistry;
use shoal_manager::dispatcher::{Backend, Dispatcher, Leadership, ProposeError};
use shoal_manager::store::{Command, Mutation, Object, Response, Store};
use shoal_manager::tls::{tls_incoming, Authorizer, NodeTls};
use shoal_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Clone)]
pub struct StoreBackend {
    pub store: Store,
    index: Arc<AtomicU64>,
    pub leadership: Arc<Mutex<Leadership>>,
}

impl Backend for StoreBackend {
    async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        if *self.leadership.lock().unwrap() != Leadership::Leader {
            return Err(ProposeError::NotLeader);
        }
        let i = self.index.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(self.store.apply(i, &cmd))
    }

    fn leadership(&self) -> Leadership {
        self.leadership.lock().unwrap().clone()
    }
}

impl StoreBackend {
    pub fn write(&self, mutations: Vec<Mutation>) {
        let i = self.index.fetch_add(1, Ordering::SeqCst) + 1;
        self.store
            .apply(
                i,
                &Command {
                    now_ms: 1,
                    mutations,
                },
            )
            .result
            .expect("write refused");
    }

    /// Applies `f` to a task and writes it back.
    pub fn update_task(&self, id: &str, f: impl FnOnce(&mut pb::Task)) {
        let mut t = self.store.get_task(id).unwrap().unwrap();
        f(&mut t);
        self.write(vec![Mutation::Update {
            object: Object::Task(t),
            expect_version: None,
        }]);
    }
}

pub fn node_tls(ca: &RootCa, node_id: &str, role: Role) -> NodeTls {
    let (key, csr) = make_csr(None).unwrap();
    let issued = ca
        .issue(
            &csr,
            node_id,
            role,
            &["127.0.0.1".to_string()],
            Duration::from_secs(3600),
        )
        .unwrap();
    NodeTls::from_pem(ca.cert_pem(), &issued.cert_pem, &key).unwrap()
}

fn node(id: &str, role: pb::NodeRole) -> pb::Node {
    pb::Node {
        meta: Some(pb::Meta {
            id: id.into(),
            ..Default::default()
        }),
        role: role as i32,
        ..Default::default()
    }
}

pub fn task(id: &str, node_id: &str, image: &str, args: &[&str]) -> pb::Task {
    pb::Task {
        meta: Some(pb::Meta {
            id: id.into(),
            ..Default::default()
        }),
        service_id: "svc".into(),
        slot: 1,
        node_id: node_id.into(),
        desired_state: pb::TaskState::Running as i32,
        status: Some(pb::TaskStatus {
            state: pb::TaskState::Assigned as i32,
            ..Default::default()
        }),
        spec: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: image.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A dispatcher server over `backend`'s store.
pub struct Server {
    pub addr: String,
    pub dispatcher: Dispatcher<StoreBackend>,
    handle: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

pub async fn serve(ca: &RootCa, name: &str, backend: StoreBackend) -> Server {
    let authorizer = Authorizer::new(
        ca.cluster_id(),
        Arc::new(StoreRegistry(backend.store.clone())),
    );
    let dispatcher = Dispatcher::start(backend.store.clone(), backend, authorizer);
    let tls = node_tls(ca, name, Role::Manager);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tls_incoming(listener, tls.server_config().unwrap());
    let svc = dispatcher.service();
    let handle = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    Server {
        addr,
        dispatcher,
        handle,
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: RootCa,
    pub backend: StoreBackend,
    pub leader: Server,
}

impl Cluster {
    /// A store with a cluster object (heartbeat `period_ms`), worker nodes, and the leader's
    /// dispatcher (its manager node carrying its real address).
    pub async fn start(period_ms: u64, workers: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("store"))
            .open()
            .unwrap();
        let store = Store::open(&db).unwrap();
        let ca = RootCa::create("cluster-w").unwrap();
        let backend = StoreBackend {
            store,
            index: Arc::new(AtomicU64::new(0)),
            leadership: Arc::new(Mutex::new(Leadership::Leader)),
        };
        let cluster = pb::Cluster {
            meta: Some(pb::Meta {
                id: "cluster-w".into(),
                ..Default::default()
            }),
            spec: Some(pb::ClusterSpec {
                name: "test".into(),
                dispatcher: Some(pb::DispatcherConfig {
                    heartbeat_period_ms: period_ms,
                    missed_heartbeats_down: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = vec![Mutation::Create(Object::Cluster(cluster))];
        for w in workers {
            m.push(Mutation::Create(Object::Node(node(
                w,
                pb::NodeRole::Worker,
            ))));
        }
        backend.write(m);
        let leader = serve(&ca, "manager-0", backend.clone()).await;
        let mut mgr = node("manager-0", pb::NodeRole::Manager);
        mgr.manager_status = Some(pb::ManagerStatus {
            raft_id: 1,
            addr: leader.addr.clone(),
            leader: true,
            reachable: true,
        });
        backend.write(vec![Mutation::Create(Object::Node(mgr))]);
        Cluster {
            dir,
            ca,
            backend,
            leader,
        }
    }

    pub fn task_status(&self, id: &str) -> pb::TaskStatus {
        self.backend
            .store
            .get_task(id)
            .unwrap()
            .unwrap()
            .status
            .unwrap_or_default()
    }

    pub fn node_state(&self, id: &str) -> i32 {
        self.backend
            .store
            .get_node(id)
            .unwrap()
            .unwrap()
            .status
            .map_or(0, |s| s.state)
    }

    /// Waits until task `id` reaches `state` in the store (within `secs`).
    pub async fn wait_task(&self, id: &str, state: pb::TaskState, secs: u64) -> pb::TaskStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.task_status(id);
            if s.state == state as i32 {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} is {:?}, not {state:?}, after {secs} s: {s:?}",
                pb::TaskState::try_from(s.state)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `f` until true or `secs` passed.
pub async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `shoal` binary of this build, for the runtime executor's `shoal runtime create`
/// subprocess: `<target>/<profile>/shoal` beside this test binary (`<target>/<profile>/deps/`).
/// `cargo nextest run --workspace` builds it fresh along with the tests (the shoal package has
/// integration tests); when it is missing (only this package's tests were built) it is built
/// here. A run of this package alone after a change to the binary needs
/// `cargo build -p shoal` first.
pub fn shoal_binary() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let me = std::env::current_exe().expect("path of the test binary");
            let profile_dir = me
                .parent()
                .and_then(|deps| deps.parent())
                .expect("test binary under <target>/<profile>/deps");
            let bin = profile_dir.join("shoal");
            if bin.is_file() {
                return bin;
            }
            let target = profile_dir.parent().expect("target dir");
            let profile = profile_dir
                .file_name()
                .and_then(|n| n.to_str())
                .expect("profile dir name");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .args(["build", "--quiet", "-p", "shoal", "--bin", "shoal"])
                .arg("--target-dir")
                .arg(target);
            // What cargo set for this test (package name, manifest dir...) must not leak into
            // the build: build scripts that watch such variables would rebuild for nothing.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().into_owned();
                if (k.starts_with("CARGO_") && k != "CARGO_HOME") || k.starts_with("NEXTEST") {
                    build.env_remove(k);
                }
            }
            match profile {
                "debug" => {}
                "release" => {
                    build.arg("--release");
                }
                other => {
                    build.args(["--profile", other]);
                }
            }
            let status = build.status().expect("run cargo build -p shoal");
            assert!(status.success(), "cargo build -p shoal failed");
            assert!(bin.is_file(), "{} missing after the build", bin.display());
            bin
        })
        .clone()
}
