//! Fixtures of the dispatcher tests: a real store on sled files, a backend applying commands
//! to it directly (standing in for Raft), and a dispatcher served over real mTLS on 127.0.0.1.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_manager::ca::{make_csr, Role, RootCa};
use shoal_manager::daemon::StoreRegistry;
use shoal_manager::dispatcher::{Backend, Dispatcher, Leadership, ProposeError};
use shoal_manager::store::{Command, Mutation, Object, Response, Store};
use shoal_manager::tls::{tls_incoming, Authorizer, NodeTls};
use shoal_proto::v1 as pb;
use shoal_proto::v1::dispatcher_client::DispatcherClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Applies commands straight to the store, as the Raft state machine would, and counts them.
#[derive(Clone)]
pub struct StoreBackend {
    pub store: Store,
    index: Arc<AtomicU64>,
    pub commands: Arc<AtomicUsize>,
    /// Proposals refused for exceeding the Raft entry bound.
    pub oversize: Arc<AtomicUsize>,
    pub leadership: Arc<Mutex<Leadership>>,
    /// Commands committed but not yet applied here (a new leader's state machine behind its
    /// log); `caught_up` applies them.
    backlog: Arc<Mutex<Vec<Command>>>,
}

impl Backend for StoreBackend {
    async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        if *self.leadership.lock().unwrap() != Leadership::Leader {
            return Err(ProposeError::NotLeader);
        }
        // Raft's bound on an entry, as `raft::propose` enforces it.
        let bytes = cmd.encoded_bytes();
        if bytes > shoal_manager::raft::MAX_ENTRY_BYTES {
            self.oversize.fetch_add(1, Ordering::SeqCst);
            return Err(ProposeError::Failed(format!("entry of {bytes} bytes")));
        }
        self.commands.fetch_add(1, Ordering::SeqCst);
        let i = self.index.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(self.store.apply(i, &cmd))
    }

    fn leadership(&self) -> Leadership {
        self.leadership.lock().unwrap().clone()
    }

    async fn caught_up(&self) -> Result<(), ProposeError> {
        let behind: Vec<Command> = std::mem::take(&mut *self.backlog.lock().unwrap());
        for cmd in behind {
            let i = self.index.fetch_add(1, Ordering::SeqCst) + 1;
            self.store
                .apply(i, &cmd)
                .result
                .expect("backlog write refused");
        }
        Ok(())
    }
}

impl StoreBackend {
    /// Commits `mutations` without applying them yet: they reach the store when the
    /// dispatcher waits for it to catch up.
    pub fn write_behind(&self, mutations: Vec<Mutation>) {
        self.backlog.lock().unwrap().push(Command {
            now_ms: 1,
            mutations,
        });
    }

    /// Writes directly (as the orchestrators or scheduler would); panics if refused.
    pub fn write(&self, mutations: Vec<Mutation>) {
        let i = self.index.fetch_add(1, Ordering::SeqCst) + 1;
        let r = self.store.apply(
            i,
            &Command {
                now_ms: 1,
                mutations,
            },
        );
        r.result.expect("write refused");
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: RootCa,
    pub backend: StoreBackend,
    pub dispatcher: Dispatcher<StoreBackend>,
    pub addr: String,
    /// The secrets data key the dispatcher opens secrets with.
    pub keys: Arc<shoal_manager::secrets::Keyring>,
    server: JoinHandle<()>,
}

/// Any node's TLS material, 127.0.0.1 as SAN.
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

pub fn node(id: &str, role: pb::NodeRole) -> pb::Node {
    pb::Node {
        meta: Some(pb::Meta {
            id: id.into(),
            ..Default::default()
        }),
        role: role as i32,
        ..Default::default()
    }
}

pub fn task(id: &str, node_id: &str, state: pb::TaskState) -> pb::Task {
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
            state: state as i32,
            ..Default::default()
        }),
        spec: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: "busybox:latest".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Cluster {
    /// A store with a cluster object (heartbeat `period_ms`), the given worker nodes, a
    /// manager node, and the dispatcher serving on a fresh port.
    pub async fn start(period_ms: u64, workers: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let store = Store::open(&db).unwrap();
        let ca = RootCa::create("cluster-d").unwrap();
        let backend = StoreBackend {
            store: store.clone(),
            index: Arc::new(AtomicU64::new(0)),
            commands: Arc::new(AtomicUsize::new(0)),
            oversize: Arc::new(AtomicUsize::new(0)),
            leadership: Arc::new(Mutex::new(Leadership::Leader)),
            backlog: Arc::new(Mutex::new(Vec::new())),
        };
        let cluster = pb::Cluster {
            meta: Some(pb::Meta {
                id: "cluster-d".into(),
                ..Default::default()
            }),
            spec: Some(pb::ClusterSpec {
                name: "test".into(),
                dispatcher: Some(pb::DispatcherConfig {
                    heartbeat_period_ms: period_ms,
                    missed_heartbeats_down: 3,
                    status_batch_ms: 10,
                    status_batch_max: 1000,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = vec![Mutation::Create(Object::Cluster(cluster))];
        let mut mgr = node("manager-0", pb::NodeRole::Manager);
        mgr.manager_status = Some(pb::ManagerStatus {
            raft_id: 1,
            addr: "127.0.0.1:1".into(),
            leader: true,
            reachable: true,
        });
        m.push(Mutation::Create(Object::Node(mgr)));
        for w in workers {
            m.push(Mutation::Create(Object::Node(node(
                w,
                pb::NodeRole::Worker,
            ))));
        }
        backend.write(m);

        let authorizer = Authorizer::new("cluster-d", Arc::new(StoreRegistry(store.clone())));
        let keys = Arc::new(shoal_manager::secrets::Keyring::generate().unwrap());
        let dispatcher = Dispatcher::start_with_secrets(
            store.clone(),
            backend.clone(),
            authorizer,
            Some(keys.clone()),
        );
        let tls = node_tls(&ca, "manager-0", Role::Manager);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = tls_incoming(listener, tls.server_config().unwrap());
        let svc = dispatcher.service();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        Cluster {
            dir,
            ca,
            backend,
            dispatcher,
            addr,
            keys,
            server,
        }
    }

    pub fn client(&self, node_id: &str, role: Role) -> DispatcherClient<Channel> {
        let tls = node_tls(&self.ca, node_id, role);
        DispatcherClient::new(tls.channel(&self.addr).unwrap())
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

    pub fn task_state(&self, id: &str) -> i32 {
        self.backend
            .store
            .get_task(id)
            .unwrap()
            .unwrap()
            .status
            .map_or(0, |s| s.state)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Opens a session and returns the stream after checking the `started` message.
pub async fn open(
    client: &mut DispatcherClient<Channel>,
    hostname: &str,
) -> (pb::SessionStarted, tonic::Streaming<pb::SessionMessage>) {
    let mut stream = client
        .session(pb::SessionRequest {
            description: Some(pb::NodeDescription {
                hostname: hostname.into(),
                resources: Some(pb::Resources {
                    nano_cpus: 2_000_000_000,
                    memory_bytes: 1 << 30,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    match next(&mut stream).await {
        pb::session_message::Kind::Started(s) => (s, stream),
        other => panic!("expected started, got {other:?}"),
    }
}

/// The next message of a session stream (within 5 s).
pub async fn next(stream: &mut tonic::Streaming<pb::SessionMessage>) -> pb::session_message::Kind {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no session message within 5 s")
        .unwrap()
        .expect("stream ended")
        .kind
        .unwrap()
}

pub async fn next_assignments(
    stream: &mut tonic::Streaming<pb::SessionMessage>,
) -> pb::Assignments {
    match next(stream).await {
        pb::session_message::Kind::Assignments(a) => a,
        other => panic!("expected assignments, got {other:?}"),
    }
}

pub fn ids(a: &pb::Assignments) -> Vec<String> {
    let mut v: Vec<String> = a
        .tasks
        .iter()
        .map(|t| t.meta.as_ref().unwrap().id.clone())
        .collect();
    v.sort();
    v
}

/// Polls `f` until true or 5 s passed.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
