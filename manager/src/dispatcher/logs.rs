//! The log broker (swarmkit's `logbroker`): the leader publishes a subscription to the nodes
//! that hold the wanted tasks on their dispatcher sessions; each node sends the lines back with
//! `PublishLogs`; the broker hands them to the subscriber's stream. See docs/design/logs.md.
//!
//! Nothing here buffers without bound: a subscriber's stream holds [`LOG_SUBSCRIBER_BUFFER`]
//! messages, and a `PublishLogs` call reads its next message only once the last one was
//! queued, so a slow client slows the workers down through HTTP/2 flow control (the worker's
//! own queue is bounded too). A subscription ends when its client goes away.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use shoal_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::store::{Action, Event, Object, Store};

/// Messages queued towards one subscriber before the publishers wait.
pub const LOG_SUBSCRIBER_BUFFER: usize = 64;
/// Subscriptions one leader serves at once; more are refused.
pub const MAX_LOG_SUBSCRIPTIONS: usize = 256;
/// Without `follow`: how long the broker waits for every node to send all its lines (a node
/// without a session may still open one: a leader change) before it ends the stream with a
/// notice naming the nodes that did not.
pub const LOG_NODE_WAIT: Duration = Duration::from_secs(15);

/// The subscriber's stream, as the control API serves it.
pub type LogSender = mpsc::Sender<Result<pb::SubscribeLogsMessage, Status>>;

/// Sends a subscription to a node's session; false when the node has none.
pub(super) type Publish = dyn Fn(&str, pb::LogSubscription) -> bool + Send + Sync;

struct Subscription {
    out: LogSender,
    options: pb::LogOptions,
    /// node id → its tasks in this subscription, and whether it sent everything.
    nodes: HashMap<String, NodeSub>,
    /// Woken when a node is done.
    changed: Arc<Notify>,
}

struct NodeSub {
    tasks: BTreeSet<String>,
    done: bool,
}

/// The leader's log subscriptions; cheap to clone.
#[derive(Clone)]
pub struct LogBroker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    subs: Mutex<HashMap<String, Subscription>>,
    publish: Box<Publish>,
    /// The leader's store: names of tasks, and tasks new to a followed service.
    store: Store,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A subscription as a node's `PublishLogs` call sees it.
pub(super) struct Attached {
    pub out: LogSender,
    pub tasks: BTreeSet<String>,
}

impl LogBroker {
    pub(super) fn new(publish: Box<Publish>, store: Store) -> LogBroker {
        LogBroker {
            inner: Arc::new(BrokerInner {
                subs: Mutex::new(HashMap::new()),
                publish,
                store,
            }),
        }
    }

    /// How the CLI names `t`'s lines.
    pub fn log_task(&self, t: &pb::Task) -> pb::LogTask {
        let node_name = self
            .inner
            .store
            .get_node(&t.node_id)
            .ok()
            .flatten()
            .and_then(|n| n.description)
            .map(|d| d.hostname)
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| t.node_id.clone());
        pb::LogTask {
            task_id: t.meta.as_ref().map_or("", |m| m.id.as_str()).to_string(),
            service_name: t.service_name.clone(),
            slot: t.slot,
            node_id: t.node_id.clone(),
            node_name,
        }
    }

    /// Starts subscription `id` for `tasks` (node id, task id) and runs it until every node sent
    /// all its lines (not following) or the subscriber goes away. Following `service` (its id),
    /// tasks of it that reach a node later are added.
    pub async fn run(
        &self,
        id: String,
        tasks: Vec<(String, String)>,
        service: Option<String>,
        options: pb::LogOptions,
        out: LogSender,
    ) {
        // Before the subscription is published, so no new task falls in between.
        let mut events = service
            .filter(|_| options.follow)
            .map(|s| (s, self.inner.store.watch()));
        let changed = Arc::new(Notify::new());
        let mut nodes: HashMap<String, NodeSub> = HashMap::new();
        for (node, task) in tasks {
            nodes
                .entry(node)
                .or_insert_with(|| NodeSub {
                    tasks: BTreeSet::new(),
                    done: false,
                })
                .tasks
                .insert(task);
        }
        let publish: Vec<(String, Vec<String>)> = nodes
            .iter()
            .map(|(n, s)| (n.clone(), s.tasks.iter().cloned().collect()))
            .collect();
        {
            let mut subs = lock(&self.inner.subs);
            if subs.len() >= MAX_LOG_SUBSCRIPTIONS {
                let _ = out.try_send(Err(Status::resource_exhausted(format!(
                    "this manager serves {MAX_LOG_SUBSCRIPTIONS} log streams already"
                ))));
                return;
            }
            subs.insert(
                id.clone(),
                Subscription {
                    out: out.clone(),
                    options: options.clone(),
                    nodes,
                    changed: changed.clone(),
                },
            );
        }
        let _cleanup = Remove(Arc::downgrade(&self.inner), id.clone());
        for (node, task_ids) in publish {
            // A node without a session now gets it when it opens one (`for_node`).
            (self.inner.publish)(
                &node,
                pb::LogSubscription {
                    id: id.clone(),
                    task_ids,
                    options: Some(options.clone()),
                },
            );
        }
        let deadline = tokio::time::Instant::now() + LOG_NODE_WAIT;
        loop {
            let waiting: Vec<String> = {
                let subs = lock(&self.inner.subs);
                let Some(s) = subs.get(&id) else { return };
                let mut w: Vec<String> = s
                    .nodes
                    .iter()
                    .filter(|(_, n)| !n.done)
                    .map(|(k, _)| k.clone())
                    .collect();
                w.sort();
                w
            };
            if waiting.is_empty() && !options.follow {
                return;
            }
            let timeout = async {
                if options.follow {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep_until(deadline).await
                }
            };
            let event = async {
                match &mut events {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = out.closed() => return,
                _ = changed.notified() => {}
                ev = event => match ev {
                    Ok(ev) => {
                        let service = events.as_ref().map(|(s, _)| s.as_str()).unwrap_or("");
                        if let Some(add) = self.new_task(&id, service, ev) {
                            if out.send(Ok(add.0)).await.is_err() {
                                return;
                            }
                            (self.inner.publish)(&add.1.0, add.1.1);
                        }
                    }
                    // Lost events (a burst of task changes): tasks made meanwhile are missed.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => events = None,
                },
                _ = timeout => {
                    let notice = format!(
                        "incomplete log stream: no lines from node(s) {} within {} s",
                        waiting.join(", "),
                        LOG_NODE_WAIT.as_secs()
                    );
                    let _ = out
                        .send(Ok(pb::SubscribeLogsMessage {
                            notices: vec![notice],
                            ..Default::default()
                        }))
                        .await;
                    return;
                }
            }
        }
    }

    /// A task of the followed `service` given to a node and not in subscription `id` yet:
    /// added to it; what to tell the subscriber and what to publish to which node.
    #[allow(clippy::type_complexity)]
    fn new_task(
        &self,
        id: &str,
        service: &str,
        ev: Event,
    ) -> Option<(pb::SubscribeLogsMessage, (String, pb::LogSubscription))> {
        let (Action::Create | Action::Update, Object::Task(t)) = (ev.action, ev.object) else {
            return None;
        };
        if t.service_id != service || t.node_id.is_empty() {
            return None;
        }
        let task_id = t.meta.as_ref().map(|m| m.id.clone())?;
        let options = {
            let mut subs = lock(&self.inner.subs);
            let s = subs.get_mut(id)?;
            if s.nodes.values().any(|n| n.tasks.contains(&task_id)) {
                return None;
            }
            s.nodes
                .entry(t.node_id.clone())
                .or_insert_with(|| NodeSub {
                    tasks: BTreeSet::new(),
                    done: false,
                })
                .tasks
                .insert(task_id.clone());
            s.options.clone()
        };
        let msg = pb::SubscribeLogsMessage {
            tasks: vec![self.log_task(&t)],
            ..Default::default()
        };
        let sub = pb::LogSubscription {
            id: id.to_string(),
            task_ids: vec![task_id],
            options: Some(options),
        };
        Some((msg, (t.node_id, sub)))
    }

    /// The subscriptions a node that just opened a session must run.
    pub(super) fn for_node(&self, node: &str) -> Vec<pb::LogSubscription> {
        lock(&self.inner.subs)
            .iter()
            .filter_map(|(id, s)| {
                let n = s.nodes.get(node).filter(|n| !n.done)?;
                Some(pb::LogSubscription {
                    id: id.clone(),
                    task_ids: n.tasks.iter().cloned().collect(),
                    options: Some(s.options.clone()),
                })
            })
            .collect()
    }

    /// Subscription `id` as `node` may publish to it.
    pub(super) fn attach(&self, id: &str, node: &str) -> Option<Attached> {
        let subs = lock(&self.inner.subs);
        let s = subs.get(id)?;
        let n = s.nodes.get(node)?;
        Some(Attached {
            out: s.out.clone(),
            tasks: n.tasks.clone(),
        })
    }

    /// `node` sent every line subscription `id` asked of it.
    pub(super) fn node_done(&self, id: &str, node: &str) {
        let subs = &mut lock(&self.inner.subs);
        if let Some(s) = subs.get_mut(id) {
            if let Some(n) = s.nodes.get_mut(node) {
                n.done = true;
            }
            s.changed.notify_one();
        }
    }

    /// Subscriptions open now.
    pub fn len(&self) -> usize {
        lock(&self.inner.subs).len()
    }

    /// Whether no subscription is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forgets a subscription when its runner ends (however it ends).
struct Remove(Weak<BrokerInner>, String);

impl Drop for Remove {
    fn drop(&mut self) {
        if let Some(b) = self.0.upgrade() {
            lock(&b.subs).remove(&self.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the broker published, to which node.
    type Published = Arc<Mutex<Vec<(String, pb::LogSubscription)>>>;

    fn broker() -> (LogBroker, Published) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let store = Store::open(&db).unwrap();
        let published: Published = Default::default();
        let p = published.clone();
        let b = LogBroker::new(
            Box::new(move |node: &str, sub| {
                lock(&p).push((node.to_string(), sub));
                true
            }),
            store,
        );
        (b, published)
    }

    #[tokio::test]
    async fn a_followed_subscription_ends_when_its_client_goes_away() {
        let (b, published) = broker();
        let (tx, rx) = mpsc::channel(LOG_SUBSCRIBER_BUFFER);
        let tasks = vec![("n1".into(), "t1".into()), ("n2".into(), "t2".into())];
        let options = pb::LogOptions {
            follow: true,
            ..Default::default()
        };
        let run = tokio::spawn({
            let b = b.clone();
            async move { b.run("s1".into(), tasks, None, options, tx).await }
        });
        while b.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(lock(&published).len(), 2, "one subscription per node");
        let att = b.attach("s1", "n1").expect("n1 may publish");
        assert!(att.tasks.contains("t1") && !att.tasks.contains("t2"));
        assert!(b.attach("s1", "n3").is_none(), "a node not asked may not");
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("ended")
            .unwrap();
        assert!(b.is_empty(), "forgotten");
        assert!(att.out.is_closed(), "publishers see the client gone");
    }

    #[tokio::test]
    async fn a_slow_client_holds_publishers_back_and_nothing_is_dropped() {
        let (b, _) = broker();
        let (tx, mut rx) = mpsc::channel(LOG_SUBSCRIBER_BUFFER);
        let run = tokio::spawn({
            let b = b.clone();
            async move {
                let tasks = vec![("n1".into(), "t1".into())];
                b.run("s1".into(), tasks, None, Default::default(), tx)
                    .await
            }
        });
        while b.is_empty() {
            tokio::task::yield_now().await;
        }
        let att = b.attach("s1", "n1").unwrap();
        let line = |i: usize| pb::SubscribeLogsMessage {
            lines: vec![pb::LogLine {
                task_id: "t1".into(),
                data: format!("{i}").into_bytes(),
                ..Default::default()
            }],
            ..Default::default()
        };
        // The buffer fills; the next send waits for the client instead of growing.
        for i in 0..LOG_SUBSCRIBER_BUFFER {
            att.out.try_send(Ok(line(i))).unwrap();
        }
        assert!(att.out.try_send(Ok(line(999))).is_err(), "bounded");
        let more = tokio::spawn({
            let out = att.out.clone();
            async move { out.send(Ok(line(LOG_SUBSCRIBER_BUFFER))).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!more.is_finished(), "waits while the client is slow");
        b.node_done("s1", "n1");
        drop(att);
        let mut got = Vec::new();
        while let Some(m) = rx.recv().await {
            got.extend(m.unwrap().lines);
        }
        assert!(more.await.unwrap());
        assert_eq!(got.len(), LOG_SUBSCRIBER_BUFFER + 1, "every line arrived");
        run.await.unwrap();
    }
}
