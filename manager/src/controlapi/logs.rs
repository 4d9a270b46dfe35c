//! `SubscribeLogs`: a service's (or a task's) lines, through the leader's log broker
//! (`dispatcher::logs`). A follower relays the leader's stream; when that stream breaks (the
//! leader went away) the client sees UNAVAILABLE and resumes with cursors (docs/design/logs.md).

use shoal_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::server::forwarded;
use super::store_status;
use super::ControlApi;
use crate::dispatcher::logs::LOG_SUBSCRIBER_BUFFER;

/// Cursors one request may carry (one per task: a service has far fewer tasks kept).
pub const MAX_LOG_CURSORS: usize = 10_000;

/// The stream `SubscribeLogs` answers with.
pub type LogStream = ReceiverStream<Result<pb::SubscribeLogsMessage, Status>>;

impl ControlApi {
    /// Serves `SubscribeLogs` on this manager: the broker's stream on the leader, the leader's
    /// relayed on a follower.
    pub(crate) async fn subscribe_logs(
        &self,
        req: Request<pb::SubscribeLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let options = req.get_ref().options.clone().unwrap_or_default();
        if options.cursors.len() > MAX_LOG_CURSORS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_LOG_CURSORS} log cursors"
            )));
        }
        if let Some(mut c) = self.read_route(&req).await? {
            let mut upstream = c.subscribe_logs(forwarded(req)).await?.into_inner();
            let (tx, rx) = mpsc::channel(LOG_SUBSCRIBER_BUFFER);
            tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        m = upstream.message() => m,
                        // The client left: dropping `upstream` ends the leader's stream too.
                        _ = tx.closed() => return,
                    };
                    let item = match m {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => return,
                        Err(e) => Err(Status::unavailable(format!(
                            "the leader's log stream broke: {}",
                            e.message()
                        ))),
                    };
                    let last = item.is_err();
                    if tx.send(item).await.is_err() || last {
                        return;
                    }
                }
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let broker = self
            .log_broker()
            .ok_or_else(|| Status::unavailable("this manager's log broker is not running"))?;
        let target = req.get_ref().target.clone();
        let (tasks, service) = self.log_tasks(&target)?;
        let (tx, rx) = mpsc::channel(LOG_SUBSCRIBER_BUFFER);
        let infos: Vec<pb::LogTask> = tasks.iter().map(|t| broker.log_task(t)).collect();
        let pairs: Vec<(String, String)> = tasks
            .iter()
            .filter(|t| !t.node_id.is_empty())
            .map(|t| (t.node_id.clone(), task_id(t).to_string()))
            .collect();
        tx.try_send(Ok(pb::SubscribeLogsMessage {
            tasks: infos,
            ..Default::default()
        }))
        .map_err(|_| Status::internal("log stream buffer"))?;
        if !pairs.is_empty() || (options.follow && service.is_some()) {
            let id = super::new_id();
            tokio::spawn(async move { broker.run(id, pairs, service, options, tx).await });
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// The tasks `target` names: a service's (by name, id or id prefix) that were given to a
    /// node, with the service's id, or one task (by id or id prefix).
    fn log_tasks(&self, target: &str) -> Result<(Vec<pb::Task>, Option<String>), Status> {
        if target.is_empty() {
            return Err(Status::invalid_argument("no service or task named"));
        }
        if let Ok(s) = self.find_service(target) {
            let id = s.meta.map(|m| m.id).unwrap_or_default();
            let mut tasks: Vec<pb::Task> = self
                .store()
                .tasks_by_service(&id)
                .map_err(store_status)?
                .into_iter()
                .filter(|t| !t.node_id.is_empty())
                .collect();
            tasks.sort_by(|a, b| (a.slot, task_id(a)).cmp(&(b.slot, task_id(b))));
            return Ok((tasks, Some(id)));
        }
        if let Some(t) = self.store().get_task(target).map_err(store_status)? {
            return Ok((vec![t], None));
        }
        let mut found: Vec<pb::Task> = self
            .store()
            .list_tasks()
            .map_err(store_status)?
            .into_iter()
            .filter(|t| task_id(t).starts_with(target))
            .collect();
        match found.len() {
            1 => Ok((found, None)),
            0 => Err(Status::not_found(format!(
                "no such service or task: {target}"
            ))),
            n => {
                found.clear();
                Err(Status::invalid_argument(format!(
                    "task {target} is ambiguous ({n} matches)"
                )))
            }
        }
    }
}

fn task_id(t: &pb::Task) -> &str {
    t.meta.as_ref().map_or("", |m| m.id.as_str())
}
