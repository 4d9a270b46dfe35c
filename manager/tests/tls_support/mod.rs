//! Fixtures of the CA, TLS and Raft-transport tests: a root CA, an in-memory cluster backend,
//! and a manager serving the CA and Raft services over real TLS on 127.0.0.1.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_manager::ca::{
    make_csr, CaBackend, CaError, CaService, JoinTokens, NewNode, Role, RootCa,
};
use shoal_manager::raft::network::{Network, RaftService};
use shoal_manager::raft::{default_raft_timers, raft_config, NodeId, Raft, Storage};
use shoal_manager::store::Store;
use shoal_manager::tls::{grpc_server, tls_incoming, Authorizer, NodeRegistry, NodeTls};
use shoal_proto::v1::ca_server::{Ca, CaServer};
use shoal_proto::v1::raft_client::RaftClient;
use shoal_proto::v1::{
    GetRootCertificateRequest, GetRootCertificateResponse, IssueRequest, IssueResponse,
    RaftMessage, RenewRequest, RenewResponse,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The cluster state the CA consults, in memory.
pub struct MemBackend {
    pub tokens: Mutex<JoinTokens>,
    pub removed: Mutex<HashSet<String>>,
    pub joined: Mutex<Vec<NewNode>>,
    pub renewals: Mutex<Vec<(String, String)>>,
    pub lifetime: Mutex<Duration>,
    /// Roles the cluster wants nodes to hold (promote/demote), by node id.
    pub desired: Mutex<HashMap<String, Role>>,
}

impl MemBackend {
    pub fn new(ca: &RootCa) -> MemBackend {
        MemBackend {
            tokens: Mutex::new(JoinTokens::generate(&ca.digest())),
            removed: Mutex::new(HashSet::new()),
            joined: Mutex::new(Vec::new()),
            renewals: Mutex::new(Vec::new()),
            lifetime: Mutex::new(shoal_manager::ca::DEFAULT_NODE_CERT_LIFETIME),
            desired: Mutex::new(HashMap::new()),
        }
    }

    pub fn remove(&self, node_id: &str) {
        self.removed.lock().unwrap().insert(node_id.to_string());
    }
}

impl NodeRegistry for MemBackend {
    fn is_removed(&self, node_id: &str) -> bool {
        self.removed.lock().unwrap().contains(node_id)
    }
}

#[tonic::async_trait]
impl CaBackend for MemBackend {
    fn join_tokens(&self) -> Result<JoinTokens, CaError> {
        Ok(self.tokens.lock().unwrap().clone())
    }

    fn node_cert_lifetime(&self) -> Duration {
        *self.lifetime.lock().unwrap()
    }

    fn desired_role(&self, node_id: &str) -> Option<Role> {
        self.desired.lock().unwrap().get(node_id).copied()
    }

    async fn register_node(&self, node: NewNode) -> Result<(), CaError> {
        self.joined.lock().unwrap().push(node);
        Ok(())
    }

    async fn record_renewal(&self, node_id: &str, serial: &str) -> Result<(), CaError> {
        self.renewals
            .lock()
            .unwrap()
            .push((node_id.to_string(), serial.to_string()));
        Ok(())
    }
}

/// A manager's TLS material issued straight from the CA, with 127.0.0.1 as its SAN.
pub fn manager_tls(ca: &RootCa, node_id: &str, lifetime: Duration) -> NodeTls {
    node_tls(ca, node_id, Role::Manager, lifetime)
}

/// Any node's TLS material issued straight from the CA, with 127.0.0.1 as its SAN.
pub fn node_tls(ca: &RootCa, node_id: &str, role: Role, lifetime: Duration) -> NodeTls {
    let (key, csr) = make_csr(None).unwrap();
    let issued = ca
        .issue(&csr, node_id, role, &["127.0.0.1".to_string()], lifetime)
        .unwrap();
    NodeTls::from_pem(ca.cert_pem(), &issued.cert_pem, &key).unwrap()
}

/// A Raft node on real sled files in `dir`, talking through the mTLS network.
pub async fn raft_node(id: NodeId, dir: &std::path::Path, tls: &NodeTls) -> (Raft, Store) {
    let storage = Storage::open(&dir.join(format!("raft-{id}"))).unwrap();
    let config = raft_config("shoal-test", &default_raft_timers()).unwrap();
    let raft = Raft::new(
        id,
        config,
        Network::new(id, tls.clone()),
        storage.log,
        storage.state_machine,
    )
    .await
    .unwrap();
    (raft, storage.store)
}

/// Serves the CA and Raft services with `tls` on a fresh 127.0.0.1 port.
pub async fn serve(
    tls: &NodeTls,
    ca: Arc<RootCa>,
    backend: Arc<MemBackend>,
    raft: Raft,
) -> (String, JoinHandle<()>) {
    serve_with_secrets(tls, ca, backend, raft, None).await
}

/// As [`serve`], the CA handing managers the secrets data key `keys`.
pub async fn serve_with_secrets(
    tls: &NodeTls,
    ca: Arc<RootCa>,
    backend: Arc<MemBackend>,
    raft: Raft,
    keys: Option<Arc<shoal_manager::secrets::Keyring>>,
) -> (String, JoinHandle<()>) {
    let authorizer = Authorizer::new(ca.cluster_id(), backend.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tls_incoming(listener, tls.server_config().unwrap());
    let router = grpc_server()
        .add_service(
            CaService::new(ca, backend, authorizer.clone())
                .with_secrets(keys)
                .into_server(),
        )
        .add_service(RaftService::new(raft, authorizer).into_server());
    let handle = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });
    (addr, handle)
}

/// A one-manager cluster: CA, backend, the manager's TLS, its Raft node and its server.
pub struct Manager {
    pub dir: tempfile::TempDir,
    pub ca: Arc<RootCa>,
    pub backend: Arc<MemBackend>,
    pub tls: NodeTls,
    pub raft: Raft,
    pub addr: String,
    /// The secrets data key the CA hands to managers.
    pub keys: Arc<shoal_manager::secrets::Keyring>,
    server: JoinHandle<()>,
}

impl Manager {
    pub async fn start() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(RootCa::create("cluster-test").unwrap());
        let backend = Arc::new(MemBackend::new(&ca));
        let tls = manager_tls(&ca, "manager-0", Duration::from_secs(3600));
        let (raft, _store) = raft_node(1, dir.path(), &tls).await;
        let keys = Arc::new(shoal_manager::secrets::Keyring::generate().unwrap());
        let (addr, server) = serve_with_secrets(
            &tls,
            ca.clone(),
            backend.clone(),
            raft.clone(),
            Some(keys.clone()),
        )
        .await;
        Manager {
            dir,
            ca,
            backend,
            tls,
            raft,
            addr,
            keys,
            server,
        }
    }

    pub fn token(&self, role: Role) -> String {
        self.backend.tokens.lock().unwrap().get(role).to_string()
    }

    pub fn pki_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name).join("pki")
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A Vote request as openraft would send it, encoded for the wire.
pub fn vote_message() -> RaftMessage {
    let req = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(1, 2), None);
    RaftMessage {
        data: bincode::serialize(&req).unwrap(),
        ..Default::default()
    }
}

/// Sends a raw Vote through `channel`.
pub async fn raw_vote(channel: Channel) -> Result<Response<RaftMessage>, Status> {
    RaftClient::new(channel).vote(vote_message()).await
}

/// A CA-shaped probe whose GetRootCertificate answers with the serial of the client
/// certificate the server saw (or "none"), so tests can tell which certificate a new
/// connection presented.
pub struct PeerProbe;

#[tonic::async_trait]
impl Ca for PeerProbe {
    async fn get_root_certificate(
        &self,
        req: Request<GetRootCertificateRequest>,
    ) -> Result<Response<GetRootCertificateResponse>, Status> {
        let serial = req
            .peer_certs()
            .and_then(|c| {
                c.first()
                    .map(|c| shoal_manager::ca::cert_info(c).unwrap().serial)
            })
            .unwrap_or_else(|| "none".to_string());
        Ok(Response::new(GetRootCertificateResponse { ca_pem: serial }))
    }

    async fn issue_node_certificate(
        &self,
        _req: Request<IssueRequest>,
    ) -> Result<Response<IssueResponse>, Status> {
        Err(Status::unimplemented("probe"))
    }

    async fn renew_node_certificate(
        &self,
        _req: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        Err(Status::unimplemented("probe"))
    }
}

/// Serves the probe with `tls` on a fresh 127.0.0.1 port.
pub async fn serve_probe(tls: &NodeTls) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tls_incoming(listener, tls.server_config().unwrap());
    let router = grpc_server().add_service(CaServer::new(PeerProbe));
    let handle = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });
    (addr, handle)
}
