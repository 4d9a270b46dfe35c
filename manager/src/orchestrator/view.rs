//! The leader's in-memory read view of the store, kept current from the store's watch events.
//!
//! All leader components decide over one shared view instead of each listing sled: a list of
//! 100,000 tasks costs far more than applying the events of one round. The view also keeps the
//! per-node reservations and task counts the scheduler needs, updated as tasks change.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use shoal_proto::v1::{Cluster, HealthState, Node, Service, Task, TaskState};

use crate::store::{Action, Event, Object, Store, StoreError};

/// The cluster's task history per slot when the cluster object does not say.
pub const DEFAULT_TASK_HISTORY_PER_SLOT: usize = 5;

/// What the tasks that hold a node (assigned and not yet terminal) reserve on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeUsage {
    /// Sum of the tasks' cpu reservations, nano-CPUs.
    pub reserved_nano_cpus: i64,
    /// Sum of the tasks' memory reservations, bytes.
    pub reserved_memory_bytes: i64,
    /// How many tasks hold the node.
    pub tasks: u64,
    /// How many of them belong to each service (by service id).
    pub per_service: HashMap<String, u64>,
}

/// A read view of the replicated objects.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Nodes by id.
    pub nodes: BTreeMap<String, Node>,
    /// Services by id.
    pub services: BTreeMap<String, Service>,
    /// Tasks by id.
    pub tasks: BTreeMap<String, Task>,
    /// The cluster object, if any.
    pub cluster: Option<Cluster>,
    by_service: HashMap<String, BTreeSet<String>>,
    by_node: HashMap<String, BTreeSet<String>>,
    usage: HashMap<String, NodeUsage>,
    /// Ids of the tasks whose observed state is PENDING (what the scheduler looks at).
    pending: BTreeSet<String>,
    changes: Changes,
}

/// Kinds of change a component can be interested in (bits of [`Interest`]).
pub mod change {
    /// A service was created, updated or deleted.
    pub const SERVICES: u8 = 1;
    /// A node was created, updated or deleted.
    pub const NODES: u8 = 1 << 1;
    /// The cluster object changed.
    pub const CLUSTER: u8 = 1 << 2;
    /// A task was created.
    pub const TASK_CREATED: u8 = 1 << 3;
    /// A task moved forward without ending: PENDING → ASSIGNED on a node, a status change
    /// between ASSIGNED and RUNNING, a pending task's scheduling message. Desired state, node
    /// and restart hold unchanged. (The bulk of the events of a large deployment.)
    pub const TASK_PROGRESS: u8 = 1 << 4;
    /// Any other task change: it ended (terminal state), its desired state, node or restart
    /// hold changed, or it was deleted.
    pub const TASK_SETTLED: u8 = 1 << 5;
    /// Every kind.
    pub const ALL: u8 = 0x3f;
}

/// A set of [`change`] bits.
pub type Interest = u8;

/// Per-kind change counters of a view: a component remembers the counters its last round saw
/// and skips rounds in which nothing it is interested in changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes([u64; 6]);

impl Changes {
    fn bump(&mut self, kinds: u8) {
        for (i, c) in self.0.iter_mut().enumerate() {
            if kinds & (1 << i) != 0 {
                *c += 1;
            }
        }
    }

    /// True if any kind in `interest` changed between `earlier` and `self`.
    pub fn since(&self, earlier: &Changes, interest: Interest) -> bool {
        (0..6).any(|i| interest & (1 << i) != 0 && self.0[i] != earlier.0[i])
    }
}

/// What kind of change going from `old` to `new` is for a task (see [`change`]).
pub fn task_change(old: Option<&Task>, new: Option<&Task>) -> u8 {
    match (old, new) {
        (None, Some(_)) => change::TASK_CREATED,
        (Some(o), Some(n)) => {
            let same_node = o.node_id == n.node_id
                || (o.node_id.is_empty()
                    && state(o) == TaskState::Pending as i32
                    && state(n) == TaskState::Assigned as i32);
            if same_node
                && !is_terminal(o)
                && !is_terminal(n)
                && o.desired_state == n.desired_state
                && o.not_before_ms == n.not_before_ms
                && o.spec_version == n.spec_version
                && o.slot == n.slot
            {
                change::TASK_PROGRESS
            } else {
                change::TASK_SETTLED
            }
        }
        _ => change::TASK_SETTLED,
    }
}

/// A task's observed state as a number (`TaskState` values are ordered).
pub fn state(t: &Task) -> i32 {
    t.status.as_ref().map(|s| s.state).unwrap_or(0)
}

/// True if the task is RUNNING and, when it has a health check, healthy: not starting (no
/// check passed yet) nor unhealthy (about to be stopped). What a rolling update waits for.
pub fn is_up(t: &Task) -> bool {
    t.status.as_ref().is_some_and(|s| {
        s.state == TaskState::Running as i32
            && s.health != HealthState::Starting as i32
            && s.health != HealthState::Unhealthy as i32
    })
}

/// True if the task's observed state is final (complete, shutdown, failed, rejected, orphaned).
pub fn is_terminal(t: &Task) -> bool {
    state(t) >= TaskState::Complete as i32
}

/// True if the orchestrators still want the task to run (desired state RUNNING or earlier).
pub fn wants_running(t: &Task) -> bool {
    t.desired_state <= TaskState::Running as i32
}

/// True if the task occupies its node: assigned there and not yet terminal.
pub fn holds_node(t: &Task) -> bool {
    let s = state(t);
    !t.node_id.is_empty() && s >= TaskState::Assigned as i32 && s <= TaskState::Running as i32
}

/// The task's cpu and memory reservations.
pub fn reservations(t: &Task) -> (i64, i64) {
    t.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.reservations.as_ref())
        .map(|r| (r.nano_cpus, r.memory_bytes))
        .unwrap_or((0, 0))
}

impl ClusterView {
    /// Reads every object of the store. Subscribe to `store.watch()` before calling this, then
    /// apply the events that follow: those already reflected are skipped by version.
    pub fn load(store: &Store) -> Result<ClusterView, StoreError> {
        let mut view = ClusterView::default();
        for n in store.list_nodes()? {
            view.put(Object::Node(n));
        }
        for s in store.list_services()? {
            view.put(Object::Service(s));
        }
        for t in store.list_tasks()? {
            view.put(Object::Task(t));
        }
        if let Some(c) = store.get_cluster()? {
            view.put(Object::Cluster(c));
        }
        Ok(view)
    }

    /// A view holding exactly these objects (tests and benchmarks build views directly).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> ClusterView {
        let mut view = ClusterView::default();
        for o in objects {
            view.put(o);
        }
        view
    }

    /// Per-kind change counters (every object put or removed counts).
    pub fn changes(&self) -> Changes {
        self.changes
    }

    /// Counts a change of every kind (after a reload: components must look again).
    pub fn note_all_changed(&mut self) {
        self.changes.bump(change::ALL);
    }

    /// Tasks whose observed state is PENDING, ordered by task id.
    pub fn pending_tasks(&self) -> impl Iterator<Item = &Task> {
        self.pending.iter().filter_map(|id| self.tasks.get(id))
    }

    /// Applies one watch event; events older than the object in the view are ignored.
    pub fn apply_event(&mut self, ev: &Event) {
        let current = self.version(&ev.object);
        match ev.action {
            Action::Create | Action::Update => {
                if current.is_none_or(|v| v < ev.version) {
                    self.put(ev.object.clone());
                }
            }
            Action::Delete => {
                if current.is_some_and(|v| v <= ev.version) {
                    self.remove(&ev.object);
                }
            }
        }
    }

    fn version(&self, o: &Object) -> Option<u64> {
        let id = o.id();
        match o {
            Object::Node(_) => self
                .nodes
                .get(id)
                .map(|n| n.meta.as_ref().map_or(0, |m| m.version)),
            Object::Service(_) => self
                .services
                .get(id)
                .map(|s| s.meta.as_ref().map_or(0, |m| m.version)),
            Object::Task(_) => self
                .tasks
                .get(id)
                .map(|t| t.meta.as_ref().map_or(0, |m| m.version)),
            Object::Cluster(_) => self
                .cluster
                .as_ref()
                .filter(|c| c.meta.as_ref().is_some_and(|m| m.id == id))
                .map(|c| c.meta.as_ref().map_or(0, |m| m.version)),
            // No leader component reads networks, secrets or configs yet.
            Object::Network(_) | Object::Secret(_) | Object::Config(_) => None,
        }
    }

    /// Inserts or replaces an object.
    pub fn put(&mut self, o: Object) {
        let id = o.id().to_string();
        match o {
            Object::Node(n) => {
                self.changes.bump(change::NODES);
                self.nodes.insert(id, n);
            }
            Object::Service(s) => {
                self.changes.bump(change::SERVICES);
                self.services.insert(id, s);
            }
            Object::Cluster(c) => {
                self.changes.bump(change::CLUSTER);
                self.cluster = Some(c)
            }
            Object::Task(t) => {
                let old = self.tasks.remove(&id);
                self.changes.bump(task_change(old.as_ref(), Some(&t)));
                if let Some(old) = old {
                    self.unindex(&id, &old);
                }
                self.index(&id, &t);
                self.tasks.insert(id, t);
            }
            Object::Network(_) | Object::Secret(_) | Object::Config(_) => {}
        }
    }

    fn remove(&mut self, o: &Object) {
        let id = o.id();
        match o {
            Object::Node(_) => {
                self.changes.bump(change::NODES);
                self.nodes.remove(id);
            }
            Object::Service(_) => {
                self.changes.bump(change::SERVICES);
                self.services.remove(id);
            }
            Object::Cluster(_) => {
                self.changes.bump(change::CLUSTER);
                self.cluster = None
            }
            Object::Task(_) => {
                if let Some(old) = self.tasks.remove(id) {
                    self.changes.bump(change::TASK_SETTLED);
                    self.unindex(id, &old);
                }
            }
            Object::Network(_) | Object::Secret(_) | Object::Config(_) => {}
        }
    }

    fn index(&mut self, id: &str, t: &Task) {
        if state(t) == TaskState::Pending as i32 {
            self.pending.insert(id.to_string());
        }
        self.by_service
            .entry(t.service_id.clone())
            .or_default()
            .insert(id.to_string());
        if !t.node_id.is_empty() {
            self.by_node
                .entry(t.node_id.clone())
                .or_default()
                .insert(id.to_string());
        }
        if holds_node(t) {
            let (cpu, mem) = reservations(t);
            let u = self.usage.entry(t.node_id.clone()).or_default();
            u.reserved_nano_cpus += cpu;
            u.reserved_memory_bytes += mem;
            u.tasks += 1;
            *u.per_service.entry(t.service_id.clone()).or_default() += 1;
        }
    }

    fn unindex(&mut self, id: &str, t: &Task) {
        if state(t) == TaskState::Pending as i32 {
            self.pending.remove(id);
        }
        if let Some(set) = self.by_service.get_mut(&t.service_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_service.remove(&t.service_id);
            }
        }
        if let Some(set) = self.by_node.get_mut(&t.node_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_node.remove(&t.node_id);
            }
        }
        if holds_node(t) {
            let (cpu, mem) = reservations(t);
            if let Some(u) = self.usage.get_mut(&t.node_id) {
                u.reserved_nano_cpus -= cpu;
                u.reserved_memory_bytes -= mem;
                u.tasks = u.tasks.saturating_sub(1);
                if let Some(c) = u.per_service.get_mut(&t.service_id) {
                    *c = c.saturating_sub(1);
                    if *c == 0 {
                        u.per_service.remove(&t.service_id);
                    }
                }
                if u.tasks == 0 {
                    self.usage.remove(&t.node_id);
                }
            }
        }
    }

    /// The tasks of a service (by service id), ordered by task id.
    pub fn tasks_of_service<'a>(&'a self, service_id: &str) -> impl Iterator<Item = &'a Task> {
        self.by_service
            .get(service_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// The ids of services that have tasks in the view (services may be gone already).
    pub fn service_ids_with_tasks(&self) -> impl Iterator<Item = &String> {
        self.by_service.keys()
    }

    /// The tasks whose node_id is `node_id`, ordered by task id.
    pub fn tasks_on_node<'a>(&'a self, node_id: &str) -> impl Iterator<Item = &'a Task> {
        self.by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// What the tasks holding `node_id` reserve there.
    pub fn usage(&self, node_id: &str) -> Option<&NodeUsage> {
        self.usage.get(node_id)
    }

    /// Tasks kept per slot, the running one included (the cluster's setting, else 5).
    pub fn task_history_per_slot(&self) -> usize {
        self.cluster
            .as_ref()
            .and_then(|c| c.spec.as_ref())
            .and_then(|s| s.orchestration.as_ref())
            .map(|o| o.task_history_per_slot as usize)
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_TASK_HISTORY_PER_SLOT)
    }
}
