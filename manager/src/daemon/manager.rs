//! One running manager: sled, Raft, and the TLS gRPC port serving Raft, CA, Control and the
//! dispatcher.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use shoal_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::backend::{ManagerCaBackend, StoreRegistry};
use super::DaemonError;
use crate::ca::{CaService, RootCa, PKI_DIR};
use crate::controlapi::{ControlApi, ControlService};
use crate::dispatcher::Dispatcher;
use crate::raft::elect::{driven_config, follow_cluster_timers, ElectionDriver, LeaderContact};
use crate::raft::network::{Network, RaftService};
use crate::raft::{raft_config, Raft, RaftSetupError, Storage};
use crate::tls::{tls_incoming, Authorizer, NodeTls};

/// Directory of the Raft sled database under the data dir.
pub const RAFT_DIR: &str = "raft";
/// How long a stopping gRPC server may take to finish its calls (watch streams never do).
pub const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `cluster init` waits for the new one-manager cluster to elect itself.
pub const INIT_LEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long opening the Raft database waits for a previous manager of this process (a
/// restart within one process, as tests do) to release its lock.
pub const STORAGE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens the Raft storage, waiting out the lock of a manager that is still shutting down.
pub(super) async fn open_storage(dir: &Path) -> Result<Storage, DaemonError> {
    let deadline = tokio::time::Instant::now() + STORAGE_LOCK_WAIT;
    loop {
        match Storage::open(dir) {
            Err(RaftSetupError::Sled(sled::Error::Io(e)))
                if e.to_string().contains("lock") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// A manager's running parts.
pub struct Manager {
    api: ControlApi,
    dispatcher: Option<Dispatcher<Raft>>,
    /// Runs the orchestrators and the scheduler while this manager leads.
    leader_loops: Option<JoinHandle<()>>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    renew: Option<JoinHandle<()>>,
    /// Decides when this manager elects itself (openraft's own timer is off).
    elections: Option<ElectionDriver>,
    /// Counts leader changes for the metrics.
    leader_changes: Option<JoinHandle<()>>,
}

impl Manager {
    /// Opens the Raft storage in `data_dir`, starts Raft as `raft_id` and serves Raft, CA and
    /// Control with mTLS on `listen`. `timers` apply unless the stored cluster has its own.
    pub async fn start(
        data_dir: &Path,
        listen: SocketAddr,
        tls: NodeTls,
        raft_id: u64,
        timers: &pb::RaftConfig,
        renew_from: Vec<String>,
        resolver: Option<crate::controlapi::images::Resolver>,
    ) -> Result<Manager, DaemonError> {
        let pki = data_dir.join(PKI_DIR);
        let root_ca = Arc::new(RootCa::load(&pki)?);
        let secrets = crate::secrets::Keyring::load(&pki)
            .map_err(|e| DaemonError::Refused(e.to_string()))?
            .map(Arc::new);
        let storage = open_storage(&data_dir.join(RAFT_DIR)).await?;
        let stored = storage.store.get_cluster()?.and_then(|c| c.spec);
        let timers = stored.as_ref().and_then(|s| s.raft).unwrap_or(*timers);
        let name = stored.map(|s| s.name).unwrap_or_default();
        let config = raft_config(if name.is_empty() { "shoal" } else { &name }, &timers)?;
        let contact = LeaderContact::new();
        let network = Network::new(raft_id, tls.clone())
            .with_contact(contact.clone())
            .with_epoch(storage.epoch.clone());
        let raft = Raft::new(
            raft_id,
            driven_config(&config),
            network.clone(),
            storage.log.clone(),
            storage.state_machine.clone(),
        )
        .await
        .map_err(|e| DaemonError::Raft(e.to_string()))?;
        let identity = tls.identity();
        let registry = Arc::new(StoreRegistry(storage.store.clone()));
        let authorizer = Authorizer::new(identity.cluster_id.clone(), registry);
        let api = ControlApi::new(
            raft.clone(),
            storage.store.clone(),
            raft_id,
            tls.clone(),
            authorizer.clone(),
            resolver,
        );
        api.set_secrets(secrets.clone());
        api.set_epoch(storage.epoch.clone());

        let backend = Arc::new(ManagerCaBackend(api.clone()));
        let ca = CaService::new(root_ca, backend, authorizer.clone())
            .with_secrets(secrets.clone())
            .into_server();
        let elections = ElectionDriver::spawn(
            raft.clone(),
            follow_cluster_timers(storage.store.clone(), timers),
            contact.clone(),
            Some(network),
        );
        let raft_svc = RaftService::new(raft.clone(), authorizer.clone())
            .with_contact(contact)
            .with_epoch(storage.epoch.clone())
            .into_server();
        let control = ControlService::tls(api.clone()).into_server();
        let dispatcher = Dispatcher::start_with_secrets(
            storage.store.clone(),
            raft.clone(),
            authorizer.clone(),
            secrets,
        );
        let dispatch = dispatcher.service();
        api.set_log_broker(dispatcher.log_broker());
        api.set_session_count(dispatcher.session_count());
        let listener =
            tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| DaemonError::Listen {
                    addr: listen.to_string(),
                    source: e,
                })?;
        let incoming = tls_incoming(listener, tls.server_config()?);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let res = crate::tls::grpc_server()
                .layer(crate::tls::RequireClientCertLayer)
                .add_service(raft_svc)
                .add_service(ca)
                .add_service(control)
                .add_service(dispatch)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!("manager gRPC server stopped: {e}");
            }
        });
        let renew = tokio::spawn({
            let pki = pki.clone();
            async move {
                let managers: Arc<dyn Fn() -> Vec<String> + Send + Sync> =
                    Arc::new(move || renew_from.clone());
                if let Err(e) = crate::ca::renew_loop(tls, pki, managers).await {
                    tracing::error!("certificate renewal stopped: {e}");
                }
            }
        });
        tracing::info!(node_id = %identity.node_id, raft_id, %listen, "manager started");
        let leader_loops = tokio::spawn(lead_while_leader(raft.clone(), storage.store.clone()));
        let leader_changes = tokio::spawn(crate::metrics::count_leader_changes(raft.clone()));
        Ok(Manager {
            api,
            dispatcher: Some(dispatcher),
            server: Some((stop_tx, server)),
            renew: Some(renew),
            leader_loops: Some(leader_loops),
            elections: Some(elections),
            leader_changes: Some(leader_changes),
        })
    }

    /// The control API of this manager.
    pub fn api(&self) -> &ControlApi {
        &self.api
    }

    /// Makes this manager the single voter of a new cluster and waits until it leads.
    pub async fn initialize(&self, addr: &str) -> Result<(), DaemonError> {
        let raft = self.api.raft();
        let members = BTreeMap::from([(
            self.api.raft_id(),
            BasicNode {
                addr: addr.to_string(),
            },
        )]);
        raft.initialize(members)
            .await
            .map_err(|e| DaemonError::Raft(e.to_string()))?;
        self.wait_leader().await
    }

    /// Waits until this manager leads (the only voter of its group elects itself at once).
    pub async fn wait_leader(&self) -> Result<(), DaemonError> {
        self.api
            .raft()
            .wait(Some(INIT_LEADER_TIMEOUT))
            .current_leader(self.api.raft_id(), "lead")
            .await
            .map_err(|e| DaemonError::Raft(format!("waiting for leadership: {e}")))?;
        Ok(())
    }

    /// Stops serving and stops Raft; the sled database closes once the last handle drops.
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    /// [`Manager::shutdown`] in place: its control API stays (answering from the stopped
    /// Raft), nothing else runs. Doing it again does nothing more.
    pub async fn stop(&mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        if let Some(c) = self.leader_changes.take() {
            c.abort();
        }
        if let Some(l) = self.leader_loops.take() {
            l.abort();
            let _ = l.await;
        }
        if let Some(d) = self.dispatcher.take() {
            d.shutdown();
        }
        drop(self.elections.take());
        if let Err(e) = self.api.raft().shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            let abort = task.abort_handle();
            if tokio::time::timeout(SERVER_STOP_TIMEOUT, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Pause after the leader loops failed to start before trying again.
const LEADER_LOOPS_RETRY: Duration = Duration::from_secs(1);

fn leading(m: &openraft::RaftMetrics<u64, BasicNode>) -> bool {
    m.state == openraft::ServerState::Leader && m.current_leader == Some(m.id)
}

/// Runs the orchestrators and the scheduler each time this manager becomes the leader, and
/// stops them when it stops being the leader.
async fn lead_while_leader(raft: Raft, store: crate::store::Store) {
    let mut metrics = raft.metrics();
    loop {
        while !leading(&metrics.borrow_and_update()) {
            if metrics.changed().await.is_err() {
                return;
            }
        }
        let mut watch = raft.metrics();
        let lost = async move {
            while leading(&watch.borrow_and_update()) {
                if watch.changed().await.is_err() {
                    return;
                }
            }
        };
        tracing::info!("leading: orchestrators and scheduler running");
        match crate::orchestrator::run_leader(store.clone(), raft.clone(), lost).await {
            Ok(()) => tracing::info!("no longer leading: orchestrators and scheduler stopped"),
            Err(e) => {
                tracing::error!("leader loops: {e}");
                tokio::time::sleep(LEADER_LOOPS_RETRY).await;
            }
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        if let Some(c) = self.leader_changes.take() {
            c.abort();
        }
        if let Some(l) = self.leader_loops.take() {
            l.abort();
        }
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}
