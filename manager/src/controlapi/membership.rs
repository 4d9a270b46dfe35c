//! Manager membership: joining, promotion, demotion and removal, with the quorum guard, and
//! the manager health that `node ls` shows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use shoal_proto::v1 as pb;
use shoal_proto::v1::ca_client::CaClient;
use tonic::Status;

use super::{store_status, ControlApi};
use crate::store::{Kind, Mutation, Object};

/// How long a reachability probe of a peer manager may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// How long a joining manager may take to catch up before it is given up on.
pub const JOIN_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(45);
/// Log entries a new manager's log may trail the leader's by when it is made a voter.
const MAX_PROMOTION_LAG: u64 = 64;
/// How long the leader's replication metrics may take to show a new learner caught up.
const PROMOTION_CHECK_WAIT: Duration = Duration::from_secs(2);
/// A membership write that met a concurrent change of the node (the dispatcher records
/// sessions and heartbeats on it) is re-read and retried this often.
pub const NODE_WRITE_RETRIES: usize = 5;

/// Whether a write failed only because the object changed since it was read.
fn is_version_conflict(s: &Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("version conflict")
}

/// Whether `reachable` managers out of `voters` keep a quorum (a strict majority).
pub fn quorum_after(voters: usize, reachable: usize) -> bool {
    voters > 0 && reachable > voters / 2
}

/// Which managers are leader and reachable, as seen from the serving manager.
#[derive(Clone, Debug, Default)]
pub struct ManagerHealth {
    /// Raft id of the leader.
    pub leader: Option<u64>,
    /// Raft id → reachable, for every member.
    pub reachable: BTreeMap<u64, bool>,
}

impl ManagerHealth {
    /// Fills a manager node's manager status (leader, reachable) from Raft. Its state
    /// (Ready, Down) stays what the dispatcher recorded for its agent, as docker shows STATUS
    /// and MANAGER STATUS apart: a restarted manager answers Raft before its agent is back.
    pub fn fill(&self, node: &mut pb::Node) {
        let Some(ms) = node.manager_status.as_mut() else {
            return;
        };
        if node.role != pb::NodeRole::Manager as i32 {
            return;
        }
        let reachable = self.reachable.get(&ms.raft_id).copied().unwrap_or(false);
        ms.leader = self.leader == Some(ms.raft_id);
        ms.reachable = reachable;
    }

    /// How many of `ids` are reachable.
    pub fn count_reachable(&self, ids: &BTreeSet<u64>) -> usize {
        ids.iter()
            .filter(|id| self.reachable.get(id).copied().unwrap_or(false))
            .count()
    }
}

impl ControlApi {
    /// The node id of the manager with Raft id `raft_id`, from the store.
    pub fn node_id_of_raft(&self, raft_id: u64) -> Option<String> {
        self.store().list_nodes().ok()?.into_iter().find_map(|n| {
            let ms = n.manager_status.as_ref()?;
            (ms.raft_id == raft_id).then(|| n.meta.map(|m| m.id).unwrap_or_default())
        })
    }

    /// Probes every Raft member: this manager is reachable; others must answer a cheap call
    /// on their gRPC port within `PROBE_TIMEOUT`.
    pub async fn manager_health(&self) -> ManagerHealth {
        let m = self.raft().metrics().borrow().clone();
        let members: Vec<(u64, String)> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let probes = members.into_iter().map(|(id, addr)| async move {
            if id == self.raft_id() {
                return (id, true);
            }
            (id, self.probe(&addr).await)
        });
        let reachable = futures::future::join_all(probes)
            .await
            .into_iter()
            .collect();
        ManagerHealth {
            leader: m.current_leader,
            reachable,
        }
    }

    async fn probe(&self, addr: &str) -> bool {
        let Ok(ch) = self.peer_channel(addr) else {
            return false;
        };
        let mut c = CaClient::new(ch).max_decoding_message_size(crate::ca::MAX_CA_MESSAGE_BYTES);
        let call = c.get_root_certificate(pb::GetRootCertificateRequest {});
        match tokio::time::timeout(PROBE_TIMEOUT, call).await {
            Ok(Ok(_)) => true,
            _ => {
                // A broken cached channel must not hide a manager that came back.
                self.drop_channel(addr);
                false
            }
        }
    }

    async fn write_node(&self, node: pb::Node) -> Result<pb::Node, Status> {
        let id = node.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        let version = node.meta.as_ref().map(|m| m.version).unwrap_or(0);
        self.propose(vec![Mutation::Update {
            object: Object::Node(node),
            expect_version: Some(version),
        }])
        .await?;
        self.store()
            .get_node(&id)
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("node {id} not found")))
    }

    /// Applies `change` to the stored node `id` and writes it, re-reading and retrying when
    /// the node changed meanwhile: these writes carry no version of the user's.
    async fn change_node(
        &self,
        id: &str,
        change: impl Fn(&mut pb::Node),
    ) -> Result<pb::Node, Status> {
        self.try_change_node(id, NODE_WRITE_RETRIES, |n| {
            change(n);
            Ok(())
        })
        .await
    }

    /// [`ControlApi::change_node`] with a change that may refuse (its error is answered as
    /// is), written at most `attempts` times.
    pub(crate) async fn try_change_node(
        &self,
        id: &str,
        attempts: usize,
        change: impl Fn(&mut pb::Node) -> Result<(), Status>,
    ) -> Result<pb::Node, Status> {
        let mut last = None;
        for _ in 0..attempts {
            let mut node = self
                .store()
                .get_node(id)
                .map_err(store_status)?
                .ok_or_else(|| Status::not_found(format!("node {id} not found")))?;
            change(&mut node)?;
            match self.write_node(node).await {
                Err(s) if is_version_conflict(&s) => last = Some(s),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Status::aborted("node write retries exhausted")))
    }

    /// Adds a manager that holds a manager certificate: a learner first, a voter once it has
    /// caught up (by snapshot if the log was purged); its Node object is recorded as a
    /// manager. Idempotent for a manager that is already a voter at the same address.
    pub async fn join_manager(
        &self,
        node_id: &str,
        raft_id: u64,
        addr: &str,
    ) -> Result<(), Status> {
        let _guard = self.membership_lock().await;
        let (voters, _) = self.membership();
        let m = self.raft().metrics().borrow().membership_config.clone();
        if let Some(existing) = m.membership().get_node(&raft_id) {
            let owner = self.node_id_of_raft(raft_id);
            if owner.as_deref().is_some_and(|o| o != node_id)
                || existing.addr != addr && voters.contains(&raft_id)
            {
                return Err(Status::already_exists(format!(
                    "raft id {raft_id} is already taken by another manager"
                )));
            }
        }
        let node = BasicNode {
            addr: addr.to_string(),
        };
        if !voters.contains(&raft_id) {
            let learner = self.raft().add_learner(raft_id, node.clone(), true);
            let added = match tokio::time::timeout(JOIN_CATCH_UP_TIMEOUT, learner).await {
                Err(_) => Err(Status::deadline_exceeded(
                    "the new manager did not catch up in time",
                )),
                Ok(r) => r.map(|_| ()).map_err(|e| {
                    Status::unavailable(format!("adding the manager as a learner: {e}"))
                }),
            };
            // A voter that never caught up (unreachable, or a learner left by an earlier
            // attempt) would cost the cluster its quorum: promote only a learner the leader
            // has replicated to, and drop one that failed.
            let caught_up = added.is_ok()
                && self
                    .raft()
                    .wait(Some(PROMOTION_CHECK_WAIT))
                    .metrics(
                        |m| {
                            let last = m.last_log_index.unwrap_or(0);
                            m.replication
                                .as_ref()
                                .and_then(|r| r.get(&raft_id).cloned().flatten())
                                .is_some_and(|l| l.index + MAX_PROMOTION_LAG >= last)
                        },
                        "new manager caught up",
                    )
                    .await
                    .is_ok();
            if !caught_up {
                let _ = self
                    .raft()
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([raft_id])), false)
                    .await;
                added?;
                return Err(Status::unavailable(format!(
                    "the new manager (raft id {raft_id}, {addr}) has not caught up with the leader's log"
                )));
            }
            self.raft()
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([raft_id])), false)
                .await
                .map_err(|e| Status::unavailable(format!("making the manager a voter: {e}")))?;
        }
        let manager_status = pb::ManagerStatus {
            raft_id,
            addr: addr.to_string(),
            leader: false,
            reachable: true,
        };
        match self.store().get_node(node_id).map_err(store_status)? {
            Some(_) => {
                self.change_node(node_id, |n| {
                    n.role = pb::NodeRole::Manager as i32;
                    n.spec.get_or_insert_with(Default::default).desired_role =
                        pb::NodeRole::Manager as i32;
                    n.manager_status = Some(manager_status.clone());
                    let st = n.status.get_or_insert_with(Default::default);
                    st.state = pb::NodeState::Ready as i32;
                })
                .await?;
            }
            None => {
                let n = pb::Node {
                    meta: Some(pb::Meta {
                        id: node_id.to_string(),
                        ..Default::default()
                    }),
                    spec: Some(pb::NodeSpec {
                        desired_role: pb::NodeRole::Manager as i32,
                        ..Default::default()
                    }),
                    role: pb::NodeRole::Manager as i32,
                    status: Some(pb::NodeStatus {
                        state: pb::NodeState::Ready as i32,
                        addr: addr.to_string(),
                        ..Default::default()
                    }),
                    manager_status: Some(manager_status),
                    ..Default::default()
                };
                self.propose(vec![Mutation::Create(Object::Node(n))])
                    .await?;
            }
        }
        Ok(())
    }

    /// Records a node the CA has just certified (on the leader): a new Node object, or for a
    /// renewal the new certificate serial. A joining manager is recorded as a worker that is
    /// to become a manager; `join_manager` makes it one.
    pub async fn register_node(&self, r: pb::RegisterNodeRequest) -> Result<(), Status> {
        let existing = self.store().get_node(&r.node_id).map_err(store_status)?;
        if r.renewal {
            let Some(mut n) = existing else {
                return Err(Status::not_found(format!("node {} not found", r.node_id)));
            };
            n.certificate_serial = r.cert_serial;
            self.write_node(n).await?;
            return Ok(());
        }
        if existing.is_some() {
            return Err(Status::already_exists(format!(
                "node {} already exists",
                r.node_id
            )));
        }
        let desired_role = pb::NodeRole::try_from(r.role)
            .map_err(|_| Status::invalid_argument(format!("invalid role {}", r.role)))?;
        let n = pb::Node {
            meta: Some(pb::Meta {
                id: r.node_id.clone(),
                ..Default::default()
            }),
            spec: Some(pb::NodeSpec {
                desired_role: desired_role as i32,
                ..Default::default()
            }),
            role: pb::NodeRole::Worker as i32,
            description: Some(pb::NodeDescription {
                hostname: r.hostname,
                ..Default::default()
            }),
            status: Some(pb::NodeStatus {
                state: pb::NodeState::Ready as i32,
                message: "joined".into(),
                addr: r.addr,
            }),
            certificate_serial: r.cert_serial,
            ..Default::default()
        };
        self.propose(vec![Mutation::Create(Object::Node(n))])
            .await?;
        Ok(())
    }

    /// `register_node` on the leader, wherever that is (used by this manager's CA).
    pub async fn register_node_anywhere(&self, r: pb::RegisterNodeRequest) -> Result<(), Status> {
        let req = tonic::Request::new(r);
        match self.leader_client(&req).await? {
            Some(mut c) => c.register_node(req).await.map(|_| ()),
            None => self.register_node(req.into_inner()).await,
        }
    }

    /// Marks a worker to become a manager: its agent sees the desired role, gets a manager
    /// certificate and joins Raft by itself.
    pub async fn promote(&self, node: pb::Node) -> Result<pb::Node, Status> {
        if node.role == pb::NodeRole::Manager as i32 {
            return Ok(node);
        }
        let id = node.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        self.change_node(&id, |n| {
            n.spec.get_or_insert_with(Default::default).desired_role = pb::NodeRole::Manager as i32;
        })
        .await
    }

    /// Turns a manager into a worker: out of Raft membership, role worker. Refused when the
    /// managers left could not keep a quorum, unless `force`; the last manager is never
    /// demoted.
    pub async fn demote(&self, node: pb::Node, force: bool) -> Result<pb::Node, Status> {
        let id = node.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        let _guard = self.membership_lock().await;
        let raft_id = node.manager_status.as_ref().map(|m| m.raft_id);
        let (voters, members) = self.membership();
        if node.role != pb::NodeRole::Manager as i32
            && raft_id.is_none_or(|r| !members.contains(&r))
        {
            return Err(Status::failed_precondition(format!(
                "node {id} is not a manager"
            )));
        }
        if let Some(raft_id) = raft_id.filter(|r| members.contains(r)) {
            let remaining: BTreeSet<u64> =
                voters.iter().copied().filter(|v| *v != raft_id).collect();
            if remaining.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the last manager of the cluster and cannot be demoted"
                )));
            }
            let health = self.manager_health().await;
            let now = health.count_reachable(&voters);
            if !quorum_after(voters.len(), now) {
                // The membership change itself needs a quorum of the managers there are now.
                return Err(Status::unavailable(format!(
                    "only {now} of {} managers are reachable: the cluster has lost quorum",
                    voters.len()
                )));
            }
            let reachable = health.count_reachable(&remaining);
            if !force && !quorum_after(remaining.len(), reachable) {
                return Err(Status::failed_precondition(format!(
                    "demoting node {id} would leave {reachable} reachable managers of {}: the cluster would lose quorum",
                    remaining.len()
                )));
            }
            // The node's record changes first: if this manager is the one leaving, it stops
            // being leader once the membership change commits, and could not write after.
            let updated = self
                .change_node(&id, |next| {
                    next.role = pb::NodeRole::Worker as i32;
                    next.spec.get_or_insert_with(Default::default).desired_role =
                        pb::NodeRole::Worker as i32;
                    next.manager_status = None;
                    if force {
                        // Only a leaving manager forces: it is going away.
                        let st = next.status.get_or_insert_with(Default::default);
                        st.state = pb::NodeState::Down as i32;
                        st.message = "left the cluster".into();
                    }
                })
                .await?;
            let change = if voters.contains(&raft_id) {
                ChangeMembers::RemoveVoters(BTreeSet::from([raft_id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([raft_id]))
            };
            self.raft()
                .change_membership(change, false)
                .await
                .map_err(|e| Status::unavailable(format!("removing the manager from raft: {e}")))?;
            if voters.contains(&raft_id) {
                // RemoveVoters leaves a learner behind; drop it too.
                let _ = self
                    .raft()
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([raft_id])), false)
                    .await;
            }
            return Ok(updated);
        }
        self.change_node(&id, |next| {
            next.role = pb::NodeRole::Worker as i32;
            next.spec.get_or_insert_with(Default::default).desired_role =
                pb::NodeRole::Worker as i32;
            next.manager_status = None;
        })
        .await
    }

    /// Deletes a node's record, which also revokes its certificate. A manager must be
    /// demoted first; a node that is not down needs `force`.
    pub async fn remove_node(&self, node: pb::Node, force: bool) -> Result<String, Status> {
        let id = node.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        let mut node = node;
        let mut last = None;
        for _ in 0..NODE_WRITE_RETRIES {
            match self.remove_node_once(&node, force).await {
                // The node's status moved on meanwhile (a heartbeat, a session): decide again
                // on what it is now.
                Err(s) if is_version_conflict(&s) => {
                    last = Some(s);
                    node = self
                        .store()
                        .get_node(&id)
                        .map_err(store_status)?
                        .ok_or_else(|| Status::not_found(format!("node {id} not found")))?;
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Status::aborted("node write retries exhausted")))
    }

    async fn remove_node_once(&self, node: &pb::Node, force: bool) -> Result<String, Status> {
        let id = node.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        let (_, members) = self.membership();
        let in_raft = node
            .manager_status
            .as_ref()
            .is_some_and(|m| members.contains(&m.raft_id));
        if node.role == pb::NodeRole::Manager as i32 || in_raft {
            return Err(Status::failed_precondition(format!(
                "node {id} is a cluster manager and a member of the raft cluster: demote it before removing it"
            )));
        }
        let down = node.status.as_ref().is_some_and(|s| {
            s.state == pb::NodeState::Down as i32 || s.state == pb::NodeState::Unknown as i32
        });
        if !force && !down {
            return Err(Status::failed_precondition(format!(
                "node {id} is not down and can't be removed: stop it first, or use --force"
            )));
        }
        let version = node.meta.as_ref().map(|m| m.version);
        self.propose(vec![Mutation::Delete {
            kind: Kind::Node,
            id: id.clone(),
            expect_version: version,
        }])
        .await?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_needs_a_strict_majority_of_the_voters_left() {
        assert!(quorum_after(1, 1));
        assert!(!quorum_after(1, 0));
        assert!(quorum_after(2, 2));
        assert!(!quorum_after(2, 1));
        assert!(quorum_after(3, 2));
        assert!(!quorum_after(4, 2));
        assert!(!quorum_after(0, 0));
    }
}
