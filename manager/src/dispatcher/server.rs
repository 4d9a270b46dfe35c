//! The tonic `Dispatcher` service.

use std::sync::Arc;

use shoal_proto::limits::{bound_task_status, MAX_NODE_DESCRIPTION_BYTES};
use shoal_proto::v1 as pb;
use shoal_proto::v1::dispatcher_server::Dispatcher as DispatcherRpc;
use shoal_proto::v1::{NodeState, NodeStatus};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::heartbeat::{jittered, update, write_nodes};
use super::session::{stream, SessionEvent};
use super::status::StatusRequest;
use super::{
    lock, managers, new_session_id, Backend, Inner, Leadership, SessionHandle, Timers,
    MAX_UPDATES_PER_CALL, SESSION_EVENT_QUEUE, SESSION_STREAM_BUFFER,
};
use crate::ca::{NodeIdentity, Role};

/// The dispatcher's gRPC face; see [`super::Dispatcher::service`].
pub struct DispatcherService<B: Backend> {
    pub(super) inner: Arc<Inner<B>>,
}

impl<B: Backend> DispatcherService<B> {
    fn caller<T>(&self, req: &Request<T>) -> Result<NodeIdentity, Status> {
        self.inner
            .authorizer
            .authorize(req, &[Role::Worker, Role::Manager])
    }

    /// Refuses a call whose session is not the node's current one.
    fn check_session(&self, node_id: &str, session_id: &str) -> Result<(), Status> {
        match lock(&self.inner.sessions).get(node_id) {
            Some(s) if s.id == session_id => Ok(()),
            _ => Err(Status::failed_precondition(
                "session is not current: open a new session",
            )),
        }
    }

    fn require_leader(&self) -> Result<(), Status> {
        match self.inner.backend.leadership() {
            Leadership::Leader => Ok(()),
            Leadership::Follower { .. } => Err(Status::failed_precondition(
                "this manager is not the leader: open a new session",
            )),
        }
    }
}

/// The role the cluster wants `node_id` to hold (its spec's), which is how a promoted
/// worker learns of its promotion; `None` when the store cannot say.
fn desired_role(store: &crate::store::Store, node_id: &str) -> Option<i32> {
    let node = store.get_node(node_id).ok()??;
    Some(node.spec.map_or(node.role, |s| s.desired_role))
}

#[tonic::async_trait]
impl<B: Backend> DispatcherRpc for DispatcherService<B> {
    type SessionStream = ReceiverStream<Result<pb::SessionMessage, Status>>;

    async fn publish_logs(
        &self,
        req: Request<tonic::Streaming<pb::PublishLogsMessage>>,
    ) -> Result<Response<pb::PublishLogsResponse>, Status> {
        let who = self.caller(&req)?;
        self.require_leader()?;
        let mut stream = req.into_inner();
        let Some(mut msg) = stream.message().await? else {
            return Ok(Response::new(pb::PublishLogsResponse {}));
        };
        self.check_session(&who.node_id, &msg.session_id)?;
        let sub = msg.subscription_id.clone();
        // Gone already (the subscriber left): the worker stops on this answer.
        let Some(att) = self.inner.logs.attach(&sub, &who.node_id) else {
            return Ok(Response::new(pb::PublishLogsResponse {}));
        };
        loop {
            // Checked per message: a followed service's subscription gains tasks.
            let mut tasks = att.tasks.clone();
            if msg.lines.iter().any(|l| !tasks.contains(&l.task_id)) {
                tasks = self
                    .inner
                    .logs
                    .attach(&sub, &who.node_id)
                    .map(|a| a.tasks)
                    .unwrap_or_default();
            }
            if let Some(l) = msg.lines.iter().find(|l| !tasks.contains(&l.task_id)) {
                return Err(Status::invalid_argument(format!(
                    "task {} is not in log subscription {sub} for this node",
                    l.task_id
                )));
            }
            if !msg.lines.is_empty() || !msg.notices.is_empty() {
                let out = pb::SubscribeLogsMessage {
                    tasks: vec![],
                    lines: std::mem::take(&mut msg.lines),
                    notices: std::mem::take(&mut msg.notices),
                };
                // Waits while the subscriber is slow: the worker waits in turn.
                if att.out.send(Ok(out)).await.is_err() {
                    return Ok(Response::new(pb::PublishLogsResponse {}));
                }
            }
            if msg.done {
                self.inner.logs.node_done(&sub, &who.node_id);
                return Ok(Response::new(pb::PublishLogsResponse {}));
            }
            msg = tokio::select! {
                m = stream.message() => match m? {
                    Some(m) => m,
                    None => return Ok(Response::new(pb::PublishLogsResponse {})),
                },
                _ = att.out.closed() => return Ok(Response::new(pb::PublishLogsResponse {})),
            };
        }
    }

    async fn session(
        &self,
        req: Request<pb::SessionRequest>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = self.caller(&req)?;
        let peer = req.remote_addr().map(|a| a.ip().to_string());
        let desc = req.into_inner().description;
        if let Some(d) = &desc {
            let bytes = prost::Message::encoded_len(d);
            if bytes > MAX_NODE_DESCRIPTION_BYTES {
                return Err(Status::invalid_argument(format!(
                    "node description is {bytes} bytes: at most {MAX_NODE_DESCRIPTION_BYTES} \
                     are accepted"
                )));
            }
        }
        let inner = &self.inner;
        let (out, rx) = mpsc::channel(SESSION_STREAM_BUFFER);
        if let Leadership::Follower { leader_addr } = inner.backend.leadership() {
            let redirect = pb::SessionRedirect {
                leader_addr: leader_addr.unwrap_or_default(),
                managers: managers(&inner.store),
            };
            let _ = out
                .send(Ok(pb::SessionMessage {
                    kind: Some(pb::session_message::Kind::Redirect(redirect)),
                }))
                .await;
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        inner
            .backend
            .caught_up()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let node_id = who.node_id.clone();
        match inner.store.get_node(&node_id) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Status::permission_denied(format!(
                    "node {node_id} is not a member of the cluster"
                )))
            }
            Err(e) => return Err(Status::internal(format!("reading node: {e}"))),
        }
        let id = node_id.clone();
        write_nodes(inner, move |store| {
            let Some(mut n) = store.get_node(&id)? else {
                return Ok(vec![]);
            };
            if let Some(d) = &desc {
                n.description = Some(d.clone());
            }
            let status = n.status.get_or_insert_with(NodeStatus::default);
            if status.state == NodeState::Ready as i32 && desc.is_none() {
                return Ok(vec![]);
            }
            status.state = NodeState::Ready as i32;
            status.message = String::new();
            if status.addr.is_empty() {
                if let Some(p) = &peer {
                    status.addr = p.clone();
                }
            }
            Ok(vec![update(n)])
        })
        .await
        .map_err(|e| Status::unavailable(format!("recording the node as ready: {e}")))?;

        let timers = Timers::of(&inner.store);
        let period = jittered(timers.heartbeat_period);
        let session_id = new_session_id();
        let (events_tx, events_rx) = mpsc::channel::<SessionEvent>(SESSION_EVENT_QUEUE);
        // Registered before the full set is read, so no change falls between the two.
        lock(&inner.sessions).insert(
            node_id.clone(),
            SessionHandle {
                id: session_id.clone(),
                events: events_tx,
            },
        );
        lock(&inner.deadlines).insert(
            node_id.clone(),
            tokio::time::Instant::now() + timers.grace(period),
        );
        // Log subscriptions the node was asked for before it had this session (a new leader).
        if let Some(h) = lock(&inner.sessions).get(&node_id) {
            for sub in inner.logs.for_node(&node_id) {
                let _ = h.events.try_send(SessionEvent::Logs(Box::new(sub)));
            }
        }
        tracing::debug!(node_id = %node_id, session_id = %session_id, "session opened");
        let started = pb::SessionStarted {
            session_id,
            node_id: node_id.clone(),
            heartbeat_period_ms: period.as_millis() as u64,
            managers: managers(&inner.store),
            desired_role: desired_role(&inner.store, &node_id),
        };
        let inner = self.inner.clone();
        let session_id = started.session_id.clone();
        tokio::spawn(async move {
            stream(
                inner.store.clone(),
                inner.secrets.clone(),
                node_id.clone(),
                started,
                events_rx,
                out,
            )
            .await;
            // The agent went away: forget the session unless a newer one replaced it. The
            // heartbeat deadline stays: the node has until then to come back.
            let mut s = lock(&inner.sessions);
            if s.get(&node_id).is_some_and(|h| h.id == session_id) {
                s.remove(&node_id);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let who = self.caller(&req)?;
        self.require_leader()?;
        self.check_session(&who.node_id, &req.get_ref().session_id)?;
        let timers = Timers::of(&self.inner.store);
        let period = jittered(timers.heartbeat_period);
        let desired_role = desired_role(&self.inner.store, &who.node_id);
        lock(&self.inner.deadlines).insert(
            who.node_id.clone(),
            tokio::time::Instant::now() + timers.grace(period),
        );
        // A node whose current session heartbeats is up. A DOWN mark can still land after
        // the READY its session wrote: the monitor's write, retried on the version conflict
        // with that READY, re-reads it and marks the node DOWN again. Put it right here.
        let down = self
            .inner
            .store
            .get_node(&who.node_id)
            .ok()
            .flatten()
            .and_then(|n| n.status)
            .is_some_and(|s| s.state == NodeState::Down as i32);
        if down {
            let id = who.node_id.clone();
            write_nodes(&self.inner, move |store| {
                let Some(mut n) = store.get_node(&id)? else {
                    return Ok(vec![]);
                };
                let status = n.status.get_or_insert_with(NodeStatus::default);
                if status.state != NodeState::Down as i32 {
                    return Ok(vec![]);
                }
                status.state = NodeState::Ready as i32;
                status.message = String::new();
                Ok(vec![update(n)])
            })
            .await
            .map_err(|e| Status::unavailable(format!("recording the node as ready: {e}")))?;
            tracing::info!(node_id = %who.node_id, "a node in session was marked down: ready again");
        }
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_period_ms: period.as_millis() as u64,
            desired_role,
        }))
    }

    async fn update_task_status(
        &self,
        req: Request<pb::UpdateTaskStatusRequest>,
    ) -> Result<Response<pb::UpdateTaskStatusResponse>, Status> {
        let who = self.caller(&req)?;
        self.require_leader()?;
        let r = req.into_inner();
        self.check_session(&who.node_id, &r.session_id)?;
        if r.updates.len() > MAX_UPDATES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_UPDATES_PER_CALL} updates per call"
            )));
        }
        let updates: Vec<_> = r
            .updates
            .into_iter()
            .filter_map(|u| {
                u.status.map(|mut s| {
                    // Texts are cut here, whatever the worker sent: they go into the log.
                    bound_task_status(&mut s);
                    (u.task_id, s)
                })
            })
            .collect();
        if updates.is_empty() {
            return Ok(Response::new(pb::UpdateTaskStatusResponse {}));
        }
        let (done, wait) = oneshot::channel();
        self.inner
            .status_tx
            .send(StatusRequest {
                node_id: who.node_id,
                updates,
                done,
            })
            .await
            .map_err(|_| Status::unavailable("the dispatcher is stopping"))?;
        match wait.await {
            Ok(r) => r.map(|()| Response::new(pb::UpdateTaskStatusResponse {})),
            Err(_) => Err(Status::unavailable("the dispatcher is stopping")),
        }
    }
}
