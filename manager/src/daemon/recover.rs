//! Backup, restore and `--force-new-cluster`: the daemon's side (docs/design/backup.md).

use std::time::Duration;

use shoal_proto::v1 as pb;
use tonic::{Request, Status};

use super::manager::open_storage;
use super::{
    first_manager_node, host_of, new_raft_id, DaemonConfig, DaemonError, LocalState, Manager,
};
use crate::backup::{self, Body};
use crate::ca::{self, Role, RootCa, PKI_DIR};
use crate::controlapi::{new_id, now_ms, ApiSlot, ControlApi, ControlService};
use crate::raft::reseed::{reseed, Reseeded};
use crate::raft::Epoch;
use crate::store::{Mutation, Object};

/// Bytes per chunk of a backup on the local socket (its messages are bounded at 4 MiB).
pub const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;
/// How long a backup waits for its manager to have applied what the leader had committed
/// when the backup began; past it (no leader, a lagging follower) the backup is this
/// manager's own state, and says so.
pub const BACKUP_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// The status message of a node that a recovery marked down.
const DOWN_RESTORED: &str = "down since the cluster was restored from a backup";
const DOWN_FORCED: &str = "no longer a manager: the cluster was rebuilt with --force-new-cluster";

/// A backup of the store of `api`'s manager, taken after that manager has applied everything
/// the leader had committed (when a leader answers within [`BACKUP_CATCH_UP_TIMEOUT`]).
pub(super) async fn take_backup(
    cfg: &DaemonConfig,
    api: &ControlApi,
) -> Result<(pb::BackupInfo, Vec<u8>), Status> {
    let caught_up = catch_up(api).await;
    let pki = cfg.data_dir.join(PKI_DIR);
    let root = RootCa::load(&pki).map_err(|e| Status::internal(e.to_string()))?;
    let store = api.store().clone();
    let dump = tokio::task::spawn_blocking(move || store.dump())
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("reading the store: {e}")))?;
    let applied: Option<crate::raft::typ::LogId> = dump
        .meta_get(crate::raft::state_machine::KEY_LAST_APPLIED)
        .map(bincode::deserialize)
        .transpose()
        .map_err(|e| Status::internal(format!("reading the applied index: {e}")))?
        .flatten();
    let m = api.raft().metrics().borrow().clone();
    let body = Body {
        cluster_id: root.cluster_id().to_string(),
        created_ms: now_ms(),
        node_id: api.node_id().to_string(),
        leader: m.current_leader == Some(api.raft_id()),
        caught_up,
        raft_term: applied.map_or(0, |l| l.leader_id.term),
        raft_index: applied.map_or(0, |l| l.index),
        epoch: api.epoch().map(|e| e.get()).unwrap_or_default(),
        ca_cert_pem: root.cert_pem().to_string(),
        ca_key_pem: root.key_pem().to_string(),
        secrets_key: api.secrets().map(|k| k.raw().to_vec()),
        store: dump,
    };
    let counts = body.counts();
    let info = pb::BackupInfo {
        cluster_id: body.cluster_id.clone(),
        node_id: body.node_id.clone(),
        leader: body.leader,
        raft_index: body.raft_index,
        raft_term: body.raft_term,
        caught_up,
        bytes: 0,
        services: counts.services,
        nodes: counts.nodes,
        tasks: counts.tasks,
        networks: counts.networks,
        secrets: counts.secrets,
        configs: counts.configs,
        encrypted: false,
    };
    let file = tokio::task::spawn_blocking(move || backup::encode(&body))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok((
        pb::BackupInfo {
            bytes: file.len() as u64,
            ..info
        },
        file,
    ))
}

/// Waits until this manager has applied what the leader had applied (after confirming its
/// leadership) when called: a linearizable read's index. False if that took too long.
async fn catch_up(api: &ControlApi) -> bool {
    let svc = ControlService::local(ApiSlot::with(api.clone()));
    let work = async {
        let mut req = Request::new(pb::GetClusterRequest {});
        req.set_timeout(BACKUP_CATCH_UP_TIMEOUT);
        let index = <ControlService as pb::control_server::Control>::get_cluster(&svc, req)
            .await
            .ok()?
            .into_inner()
            .raft_last_applied;
        api.raft()
            .wait(Some(BACKUP_CATCH_UP_TIMEOUT))
            .applied_index_at_least(Some(index), "backup")
            .await
            .ok()
            .map(|_| ())
    };
    matches!(
        tokio::time::timeout(BACKUP_CATCH_UP_TIMEOUT, work).await,
        Ok(Some(()))
    )
}

/// Whether a stored node is (or is becoming) a manager.
fn managerish(n: &pb::Node) -> bool {
    let manager = pb::NodeRole::Manager as i32;
    n.role == manager
        || n.spec.as_ref().is_some_and(|s| s.desired_role == manager)
        || n.manager_status.is_some()
}

/// `n` as a worker that is down (`why`), conditional on the version it was read at.
fn demoted_down(mut n: pb::Node, demote: bool, why: &str) -> Mutation {
    let version = n.meta.as_ref().map_or(0, |m| m.version);
    if demote {
        n.role = pb::NodeRole::Worker as i32;
        n.spec.get_or_insert_with(Default::default).desired_role = pb::NodeRole::Worker as i32;
        n.manager_status = None;
    }
    let st = n.status.get_or_insert_with(Default::default);
    st.state = pb::NodeState::Down as i32;
    st.message = why.to_string();
    Mutation::Update {
        object: Object::Node(n),
        expect_version: Some(version),
    }
}

fn id_of(n: &pb::Node) -> &str {
    n.meta.as_ref().map_or("", |m| m.id.as_str())
}

/// What `--force-new-cluster` made.
pub(super) struct Forced {
    pub reseeded: Reseeded,
    pub removed: Vec<String>,
}

/// Starts the manager's Raft group in `data_dir` over with this manager alone: every other
/// manager leaves the group and becomes a worker that is down; this node is the leader.
/// Raft must be stopped.
pub(super) async fn force_new_cluster(
    cfg: &DaemonConfig,
    st: &LocalState,
    addr: &str,
    epoch: Epoch,
) -> Result<Forced, DaemonError> {
    let storage = open_storage(&cfg.data_dir.join(super::RAFT_DIR)).await?;
    let mut removed = Vec::new();
    let reseeded = reseed(
        &storage,
        st.raft_id,
        addr,
        epoch.next(),
        now_ms(),
        |nodes| {
            let mut muts = Vec::new();
            for n in nodes {
                let id = id_of(n).to_string();
                if id == st.node_id {
                    let mut me = n.clone();
                    let version = me.meta.as_ref().map_or(0, |m| m.version);
                    me.role = pb::NodeRole::Manager as i32;
                    me.spec.get_or_insert_with(Default::default).desired_role =
                        pb::NodeRole::Manager as i32;
                    me.manager_status = Some(pb::ManagerStatus {
                        raft_id: st.raft_id,
                        addr: addr.to_string(),
                        leader: true,
                        reachable: true,
                    });
                    muts.push(Mutation::Update {
                        object: Object::Node(me),
                        expect_version: Some(version),
                    });
                } else if managerish(n) {
                    removed.push(id);
                    muts.push(demoted_down(n.clone(), true, DOWN_FORCED));
                }
            }
            muts
        },
    )
    .await
    .map_err(|e| DaemonError::Refused(format!("rebuilding the raft group: {e}")))?;
    drop(storage);
    Ok(Forced { reseeded, removed })
}

/// What a restore made.
pub(super) struct Restored {
    pub manager: Manager,
    pub state: LocalState,
    pub response: pb::RestoreResponse,
}

/// Makes this node, which is in no cluster, the one manager of the cluster in `body`: its CA
/// and secrets key, a new node id and certificate, the store at the backup's index with every
/// other node down (the managers among them demoted), at the next raft group epoch.
pub(super) async fn restore(
    cfg: &DaemonConfig,
    body: Body,
    addr: &str,
) -> Result<Restored, DaemonError> {
    let root = body
        .root_ca()
        .map_err(|e| DaemonError::Refused(e.to_string()))?;
    let pki = cfg.data_dir.join(PKI_DIR);
    root.save(&pki)?;
    if let Some(k) = &body.secrets_key {
        crate::secrets::Keyring::from_raw(k)
            .and_then(|k| k.save(&pki))
            .map_err(|e| DaemonError::Refused(format!("the backup's secrets key: {e}")))?;
    }
    let storage = open_storage(&cfg.data_dir.join(super::RAFT_DIR)).await?;
    {
        let store = storage.store.clone();
        let index = body.raft_index;
        let dump = body.store;
        tokio::task::spawn_blocking(move || store.restore(&dump, index))
            .await
            .map_err(|e| DaemonError::Refused(e.to_string()))??;
    }
    let cluster = storage
        .store
        .get_cluster()?
        .ok_or_else(|| DaemonError::Refused("the backup's store holds no cluster object".into()))?;
    let cluster_id = cluster.meta.as_ref().map_or("", |m| m.id.as_str());
    if cluster_id != body.cluster_id {
        return Err(DaemonError::Refused(format!(
            "the backup's store is cluster {cluster_id}'s, its header says {}",
            body.cluster_id
        )));
    }
    let lifetime = cluster
        .spec
        .as_ref()
        .and_then(|s| s.ca)
        .map(|c| c.node_cert_lifetime_ms)
        .filter(|&ms| ms > 0)
        .map_or(ca::DEFAULT_NODE_CERT_LIFETIME, Duration::from_millis);
    let node_id = new_id();
    let raft_id = new_raft_id();
    let (key_pem, csr_pem) = ca::make_csr(None)?;
    let issued = root.issue(
        &csr_pem,
        &node_id,
        Role::Manager,
        &[host_of(addr)],
        lifetime,
    )?;
    let tls = crate::tls::NodeTls::from_pem(root.cert_pem(), &issued.cert_pem, &key_pem)?;
    tls.save(&pki)?;

    let me = first_manager_node(
        node_id.clone(),
        cfg.hostname(),
        addr.to_string(),
        raft_id,
        issued.serial,
    );
    let mut down = 0u64;
    let reseeded = reseed(
        &storage,
        raft_id,
        addr,
        body.epoch.next(),
        now_ms(),
        |nodes| {
            let mut muts = Vec::new();
            for n in nodes {
                let down_already = n
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == pb::NodeState::Down as i32);
                if !down_already || managerish(n) {
                    muts.push(demoted_down(n.clone(), managerish(n), DOWN_RESTORED));
                }
                down += 1;
            }
            muts.push(Mutation::Create(Object::Node(me)));
            muts
        },
    )
    .await
    .map_err(|e| DaemonError::Refused(format!("starting the raft group: {e}")))?;
    drop(storage);
    tracing::info!(
        index = reseeded.log_id.index,
        epoch = %reseeded.epoch,
        "store restored from the backup"
    );

    let m = Manager::start(
        &cfg.data_dir,
        cfg.listen_addr,
        tls,
        raft_id,
        &cfg.timers(),
        vec![addr.to_string()],
        cfg.image_resolver.clone(),
    )
    .await?;
    if let Err(e) = m.wait_leader().await {
        m.shutdown().await;
        return Err(e);
    }
    let state = LocalState {
        role: "manager".into(),
        node_id: node_id.clone(),
        cluster_id: body.cluster_id.clone(),
        raft_id,
        advertise_addr: addr.to_string(),
        managers: vec![addr.to_string()],
    };
    if let Err(e) = state.save(&cfg.data_dir) {
        m.shutdown().await;
        return Err(e);
    }
    let tokens = cluster.join_tokens.unwrap_or_default();
    let services = m
        .api()
        .store()
        .list_services()
        .map_or(0, |s| s.len() as u64);
    let response = pb::RestoreResponse {
        node_id,
        cluster_id: body.cluster_id,
        advertise_addr: addr.to_string(),
        raft_index: body.raft_index,
        services,
        nodes_down: down,
        worker_token: tokens.worker,
        manager_token: tokens.manager,
    };
    Ok(Restored {
        manager: m,
        state,
        response,
    })
}
