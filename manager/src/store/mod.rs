//! The replicated cluster state: typed objects in sled trees, applied from Raft.
//!
//! Every write comes through [`Store::apply`] (or a [`Batch`] the Raft state machine drives):
//! one command is checked and applied all-or-nothing, objects and their secondary indexes in
//! the same sled transaction, and the change events go to watchers once that transaction
//! committed. Reads go straight to sled.

mod apply;
mod dump;
mod types;

use std::ops::Bound;
use std::sync::{Arc, Mutex};

use prost::Message;
use shoal_proto::v1::{Cluster, Config, Network, Node, Secret, Service, Task};
use tokio::sync::broadcast;

pub use apply::{
    check_task_forward, file_refs, overlaps, parse_cidr, Batch, RawWrites, INGRESS_NETWORK, MAX_VNI,
};
pub use dump::{Dump, DumpTree};
pub use types::{Action, Command, Event, Kind, Mutation, Object, Response, StoreError};

/// How many events a watcher may fall behind before it gets `RecvError::Lagged` and must
/// resync (list again, then continue from the live stream).
pub const WATCH_CAPACITY: usize = 16_384;

/// Events each manager keeps for `shoal events --since` (docker's daemon keeps 256; a
/// service of a few hundred tasks makes a thousand task events).
pub const EVENT_HISTORY: usize = 4_096;

/// `e` as the history keeps it: a task without its spec and networks (what an event line
/// names fits in a few hundred bytes; the history stays a few MiB at most).
fn slim(e: &Event) -> Event {
    let object = match &e.object {
        Object::Task(t) => Object::Task(shoal_proto::v1::Task {
            meta: t.meta.clone(),
            service_id: t.service_id.clone(),
            service_name: t.service_name.clone(),
            slot: t.slot,
            node_id: t.node_id.clone(),
            desired_state: t.desired_state,
            status: t.status.clone(),
            ..Default::default()
        }),
        other => {
            let mut o = other.clone();
            // The history never holds secret or config data, not even sealed.
            match &mut o {
                Object::Secret(x) => x.spec.iter_mut().for_each(|sp| sp.data.clear()),
                Object::Config(x) => x.spec.iter_mut().for_each(|sp| sp.data.clear()),
                _ => {}
            }
            o
        }
    };
    Event {
        version: e.version,
        action: e.action,
        object,
        time_ms: e.time_ms,
    }
}

/// Index of each sled tree in `Inner::trees`; the order is `TREE_NAMES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TreeId {
    Nodes = 0,
    Services = 1,
    Tasks = 2,
    Cluster = 3,
    /// service name → service id (names are unique).
    ServiceNames = 4,
    /// "<service id>\0<task id>" → empty.
    TasksByService = 5,
    /// "<node id>\0<task id>" → empty.
    TasksByNode = 6,
    /// The state machine's own keys (last applied log id, membership), written in the same
    /// transaction as the data they describe.
    SmMeta = 7,
    Networks = 8,
    /// network name → network id (names are unique).
    NetworkNames = 9,
    /// "<network id>\0<address>" → the id of the task holding it.
    NetworkAddrs = 10,
    Secrets = 11,
    /// secret name → secret id (names are unique).
    SecretNames = 12,
    Configs = 13,
    /// config name → config id (names are unique).
    ConfigNames = 14,
}

/// Names of the sled trees of the store, in `TreeId` order.
pub(crate) const TREE_NAMES: [&str; 15] = [
    "store.nodes",
    "store.services",
    "store.tasks",
    "store.cluster",
    "store.idx.service_name",
    "store.idx.tasks_by_service",
    "store.idx.tasks_by_node",
    "store.sm_meta",
    "store.networks",
    "store.idx.network_name",
    "store.idx.network_addr",
    "store.secrets",
    "store.idx.secret_name",
    "store.configs",
    "store.idx.config_name",
];

impl TreeId {
    /// The tree holding objects of `kind`.
    pub(crate) fn of(kind: Kind) -> TreeId {
        match kind {
            Kind::Node => TreeId::Nodes,
            Kind::Service => TreeId::Services,
            Kind::Task => TreeId::Tasks,
            Kind::Cluster => TreeId::Cluster,
            Kind::Network => TreeId::Networks,
            Kind::Secret => TreeId::Secrets,
            Kind::Config => TreeId::Configs,
        }
    }
}

/// Runs `f`, a long synchronous piece of work (a sled transaction of thousands of writes, a
/// decision over 100,000 tasks), so that it does not hold up the other tasks of the runtime
/// worker it runs on: on a multi-threaded tokio runtime through `block_in_place` (the worker's
/// other tasks — Raft heartbeats and votes among them — move to another thread meanwhile);
/// elsewhere (a current-thread runtime, no runtime) simply inline.
pub fn block_in_place<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Key of an index entry: the indexed value, a NUL, the object id (ids and names hold no NUL).
pub(crate) fn index_key(value: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 1 + id.len());
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

struct Inner {
    /// The database the trees are in (for its size).
    db: sled::Db,
    trees: Vec<sled::Tree>,
    events: broadcast::Sender<Event>,
    /// The last [`EVENT_HISTORY`] events of applied commands, oldest first. Held while an
    /// event is published, so a watcher that copies it and subscribes under the lock sees
    /// every later event exactly once.
    history: Mutex<std::collections::VecDeque<Event>>,
    /// Held while a batch commits and while a dump or restore reads or replaces the trees, so a
    /// dump sees the state of exactly one applied index.
    commit_lock: Mutex<()>,
}

/// The replicated cluster objects on sled, with indexes and a watch stream. Cheap to clone:
/// all clones share the trees and the watchers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store's trees in `db`.
    ///
    /// Open it once per process and share clones: watchers only see events of writes made
    /// through the same `Store` (or its clones).
    pub fn open(db: &sled::Db) -> Result<Store, StoreError> {
        let trees = TREE_NAMES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()?;
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        Ok(Store {
            inner: Arc::new(Inner {
                db: db.clone(),
                trees,
                events,
                history: Mutex::new(std::collections::VecDeque::new()),
                commit_lock: Mutex::new(()),
            }),
        })
    }

    pub(crate) fn tree(&self, t: TreeId) -> &sled::Tree {
        &self.inner.trees[t as usize]
    }

    /// Applies one command at raft log index `log_index`, all-or-nothing, and publishes its
    /// events once committed. The state machine uses [`Store::batch`] to apply several entries
    /// and its own metadata in one transaction.
    pub fn apply(&self, log_index: u64, cmd: &Command) -> Response {
        let mut batch = self.batch();
        match batch.apply(log_index, cmd) {
            Ok(resp) => match batch.commit() {
                Ok(()) => resp,
                Err(e) => Response::single(Err(e)),
            },
            Err(e) => Response::single(Err(e)),
        }
    }

    /// How many objects of `kind` the store holds, for metrics: a scan of the kind's tree,
    /// linear in its objects.
    pub fn count(&self, kind: Kind) -> usize {
        self.tree(TreeId::of(kind)).len()
    }

    /// Bytes of the database's files on disk (0 if they cannot be read), for metrics.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Starts a batch of commands committed together by [`Batch::commit`].
    pub fn batch(&self) -> Batch<'_> {
        Batch::new(self)
    }

    /// Subscribes to change events of every later commit, in commit order.
    ///
    /// To get a consistent view, subscribe first, then list: events whose `version` is not
    /// above the listed object's `meta.version` are already reflected. On
    /// `RecvError::Lagged` the subscriber must list again.
    pub fn watch(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub(crate) fn publish(&self, events: Vec<Event>) {
        let mut history = self.inner.history.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            // A snapshot install's synthetic events (time 0) are no history.
            if e.time_ms != 0 {
                if history.len() == EVENT_HISTORY {
                    history.pop_front();
                }
                history.push_back(slim(&e));
            }
            // An error only means nobody is subscribed right now.
            let _ = self.inner.events.send(e);
        }
    }

    /// The kept events proposed at or after `since_ms` (tasks without their spec), oldest first, and a subscription to
    /// every later one: together, each event once.
    pub fn watch_since(&self, since_ms: i64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let history = self.inner.history.lock().unwrap_or_else(|p| p.into_inner());
        let past = history
            .iter()
            .filter(|e| e.time_ms >= since_ms)
            .cloned()
            .collect();
        (past, self.inner.events.subscribe())
    }

    /// Reads one object of `kind` by id.
    pub fn get(&self, kind: Kind, id: &str) -> Result<Option<Object>, StoreError> {
        match self.tree(TreeId::of(kind)).get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(kind, &v)?)),
            None => Ok(None),
        }
    }

    /// Lists all objects of `kind`, ordered by id.
    pub fn list(&self, kind: Kind) -> Result<Vec<Object>, StoreError> {
        self.tree(TreeId::of(kind))
            .iter()
            .values()
            .map(|v| decode(kind, &v?))
            .collect()
    }

    fn get_typed<M: Message + Default>(
        &self,
        t: TreeId,
        id: &str,
    ) -> Result<Option<M>, StoreError> {
        match self.tree(t).get(id.as_bytes())? {
            Some(v) => Ok(Some(decode_msg(t, &v)?)),
            None => Ok(None),
        }
    }

    fn list_typed<M: Message + Default>(&self, t: TreeId) -> Result<Vec<M>, StoreError> {
        self.tree(t)
            .iter()
            .values()
            .map(|v| decode_msg(t, &v?))
            .collect()
    }

    /// Objects whose ids an index lists under `value`, ordered by id; entries whose object is
    /// gone (a commit between the index scan and the read) are skipped.
    fn by_index<M: Message + Default>(
        &self,
        index: TreeId,
        objects: TreeId,
        value: &str,
    ) -> Result<Vec<M>, StoreError> {
        let prefix = index_key(value, "");
        let mut out = Vec::new();
        for key in self.tree(index).scan_prefix(&prefix).keys() {
            let key = key?;
            if let Some(v) = self.tree(objects).get(&key[prefix.len()..])? {
                out.push(decode_msg(objects, &v)?);
            }
        }
        Ok(out)
    }

    /// Objects of tree `t` in id order, from the first id after `after` ("": the first).
    fn scan_after<M: Message + Default>(
        &self,
        t: TreeId,
        after: &str,
    ) -> impl Iterator<Item = Result<M, StoreError>> + '_ {
        self.tree(t)
            .range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded))
            .values()
            .map(move |v| decode_msg(t, &v?))
    }

    /// Objects an index lists under `value`, in id order from the first id after `after`;
    /// entries whose object is gone are skipped (as in `by_index`).
    fn index_after<M: Message + Default>(
        &self,
        index: TreeId,
        objects: TreeId,
        value: &str,
        after: &str,
    ) -> impl Iterator<Item = Result<M, StoreError>> + '_ {
        let prefix = index_key(value, "");
        let plen = prefix.len();
        let from = index_key(value, after);
        self.tree(index)
            .range::<&[u8], _>((Bound::Excluded(from.as_slice()), Bound::Unbounded))
            .keys()
            .take_while(move |k| k.as_ref().map_or(true, |k| k.starts_with(&prefix)))
            .filter_map(move |k| {
                let read = || -> Result<Option<M>, StoreError> {
                    let k = k?;
                    let id = &k[plen..];
                    match self.tree(objects).get(id)? {
                        Some(v) => Ok(Some(decode_msg(objects, &v)?)),
                        None => Ok(None),
                    }
                };
                read().transpose()
            })
    }

    /// Objects of a kind with unique names (`names`: name → id), in name order from the
    /// first name after `after`; names whose object is gone are skipped.
    fn names_after<M: Message + Default>(
        &self,
        names: TreeId,
        objects: TreeId,
        after: &str,
        prefix: &str,
    ) -> impl Iterator<Item = Result<M, StoreError>> + '_ {
        let from = if after.as_bytes() >= prefix.as_bytes() {
            Bound::Excluded(after.as_bytes().to_vec())
        } else {
            Bound::Included(prefix.as_bytes().to_vec())
        };
        let prefix = prefix.as_bytes().to_vec();
        self.tree(names)
            .range((from, Bound::Unbounded))
            .take_while(move |kv| kv.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .filter_map(move |kv| {
                let read = || -> Result<Option<M>, StoreError> {
                    let (_, id) = kv?;
                    match self.tree(objects).get(id)? {
                        Some(v) => Ok(Some(decode_msg(objects, &v)?)),
                        None => Ok(None),
                    }
                };
                read().transpose()
            })
    }

    /// Tasks in id order, after task id `after` (a page of `ListTasks`).
    pub fn tasks_after(&self, after: &str) -> impl Iterator<Item = Result<Task, StoreError>> + '_ {
        self.scan_after(TreeId::Tasks, after)
    }

    /// A service's tasks in id order, after task id `after`.
    pub fn service_tasks_after(
        &self,
        service_id: &str,
        after: &str,
    ) -> impl Iterator<Item = Result<Task, StoreError>> + '_ {
        self.index_after(TreeId::TasksByService, TreeId::Tasks, service_id, after)
    }

    /// A node's tasks in id order, after task id `after`.
    pub fn node_tasks_after(
        &self,
        node_id: &str,
        after: &str,
    ) -> impl Iterator<Item = Result<Task, StoreError>> + '_ {
        self.index_after(TreeId::TasksByNode, TreeId::Tasks, node_id, after)
    }

    /// Services whose name starts with `prefix`, in name order, after name `after`.
    pub fn services_after(
        &self,
        after: &str,
        prefix: &str,
    ) -> impl Iterator<Item = Result<Service, StoreError>> + '_ {
        self.names_after(TreeId::ServiceNames, TreeId::Services, after, prefix)
    }

    /// Networks in name order, after name `after`.
    pub fn networks_after(
        &self,
        after: &str,
    ) -> impl Iterator<Item = Result<Network, StoreError>> + '_ {
        self.names_after(TreeId::NetworkNames, TreeId::Networks, after, "")
    }

    /// Secrets in name order, after name `after` (their data sealed).
    pub fn secrets_after(
        &self,
        after: &str,
    ) -> impl Iterator<Item = Result<Secret, StoreError>> + '_ {
        self.names_after(TreeId::SecretNames, TreeId::Secrets, after, "")
    }

    /// Configs in name order, after name `after`.
    pub fn configs_after(
        &self,
        after: &str,
    ) -> impl Iterator<Item = Result<Config, StoreError>> + '_ {
        self.names_after(TreeId::ConfigNames, TreeId::Configs, after, "")
    }

    /// A node by id.
    pub fn get_node(&self, id: &str) -> Result<Option<Node>, StoreError> {
        self.get_typed(TreeId::Nodes, id)
    }

    /// All nodes, ordered by id.
    pub fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.list_typed(TreeId::Nodes)
    }

    /// A service by id, or else by name.
    pub fn get_service(&self, id_or_name: &str) -> Result<Option<Service>, StoreError> {
        if let Some(s) = self.get_typed(TreeId::Services, id_or_name)? {
            return Ok(Some(s));
        }
        match self.tree(TreeId::ServiceNames).get(id_or_name.as_bytes())? {
            Some(id) => self.get_typed(TreeId::Services, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// The id of the service named `name`, if any.
    pub fn service_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree(TreeId::ServiceNames)
            .get(name.as_bytes())?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    /// All services, ordered by id.
    pub fn list_services(&self) -> Result<Vec<Service>, StoreError> {
        self.list_typed(TreeId::Services)
    }

    /// A task by id.
    pub fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.get_typed(TreeId::Tasks, id)
    }

    /// All tasks, ordered by id.
    pub fn list_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.list_typed(TreeId::Tasks)
    }

    /// The tasks of a service (by service id), ordered by task id.
    pub fn tasks_by_service(&self, service_id: &str) -> Result<Vec<Task>, StoreError> {
        self.by_index(TreeId::TasksByService, TreeId::Tasks, service_id)
    }

    /// The tasks assigned to a node (by node id), ordered by task id.
    pub fn tasks_by_node(&self, node_id: &str) -> Result<Vec<Task>, StoreError> {
        self.by_index(TreeId::TasksByNode, TreeId::Tasks, node_id)
    }

    /// A network by id, or else by name.
    pub fn get_network(&self, id_or_name: &str) -> Result<Option<Network>, StoreError> {
        if let Some(n) = self.get_typed(TreeId::Networks, id_or_name)? {
            return Ok(Some(n));
        }
        match self.tree(TreeId::NetworkNames).get(id_or_name.as_bytes())? {
            Some(id) => self.get_typed(TreeId::Networks, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// All networks, ordered by id.
    pub fn list_networks(&self) -> Result<Vec<Network>, StoreError> {
        self.list_typed(TreeId::Networks)
    }

    /// A secret by id, or else by name (its data sealed).
    pub fn get_secret(&self, id_or_name: &str) -> Result<Option<Secret>, StoreError> {
        if let Some(s) = self.get_typed(TreeId::Secrets, id_or_name)? {
            return Ok(Some(s));
        }
        match self.tree(TreeId::SecretNames).get(id_or_name.as_bytes())? {
            Some(id) => self.get_typed(TreeId::Secrets, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// All secrets, ordered by id (their data sealed).
    pub fn list_secrets(&self) -> Result<Vec<Secret>, StoreError> {
        self.list_typed(TreeId::Secrets)
    }

    /// A config by id, or else by name.
    pub fn get_config(&self, id_or_name: &str) -> Result<Option<Config>, StoreError> {
        if let Some(c) = self.get_typed(TreeId::Configs, id_or_name)? {
            return Ok(Some(c));
        }
        match self.tree(TreeId::ConfigNames).get(id_or_name.as_bytes())? {
            Some(id) => self.get_typed(TreeId::Configs, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// All configs, ordered by id.
    pub fn list_configs(&self) -> Result<Vec<Config>, StoreError> {
        self.list_typed(TreeId::Configs)
    }

    /// The cluster object (the first by id if, wrongly, there were several).
    pub fn get_cluster(&self) -> Result<Option<Cluster>, StoreError> {
        match self.tree(TreeId::Cluster).first()? {
            Some((_, v)) => Ok(Some(decode_msg(TreeId::Cluster, &v)?)),
            None => Ok(None),
        }
    }

    /// A raw value of the state machine's metadata tree.
    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(TreeId::SmMeta).get(key)?.map(|v| v.to_vec()))
    }
}

pub(crate) fn decode(kind: Kind, bytes: &[u8]) -> Result<Object, StoreError> {
    Object::decode(kind, bytes).map_err(|e| StoreError::Decode {
        what: kind.to_string(),
        reason: e.to_string(),
    })
}

fn decode_msg<M: Message + Default>(t: TreeId, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Decode {
        what: TREE_NAMES[t as usize].to_string(),
        reason: e.to_string(),
    })
}
