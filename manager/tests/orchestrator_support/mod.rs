//! A real store (sled in a tempdir) driven round by round: the leader components decide over a
//! fresh view, their commands are applied, and a simulated agent moves tasks as a worker would.
#![allow(dead_code)]

use std::collections::BTreeMap;

use shoal_manager::orchestrator::{
    global, replicated, restart, task_reaper, ClusterView, Decision,
};
use shoal_manager::scheduler;
use shoal_manager::store::{Command, Mutation, Object, Store};
use shoal_proto::v1::{
    service_spec::Mode, ContainerSpec, GlobalService, Meta, Node, NodeAvailability,
    NodeDescription, NodeRole, NodeSpec, NodeState, NodeStatus, Placement, PlacementPreference,
    ReplicatedService, ResourceRequirements, Resources, RestartPolicy, Service, ServiceSpec, Task,
    TaskSpec, TaskState, TaskStatus,
};

/// Rounds `converge` runs at most before declaring the components never settle.
pub const MAX_ROUNDS: usize = 50;

pub struct Harness {
    _dir: tempfile::TempDir,
    pub store: Store,
    index: u64,
    pub now_ms: i64,
    next_id: u64,
}

pub fn meta(id: &str) -> Option<Meta> {
    Some(Meta {
        id: id.into(),
        ..Default::default()
    })
}

pub fn state(t: &Task) -> TaskState {
    TaskState::try_from(t.status.as_ref().map_or(0, |s| s.state)).unwrap()
}

pub fn desired(t: &Task) -> TaskState {
    TaskState::try_from(t.desired_state).unwrap()
}

/// A Ready, active worker node with 4 CPUs and 8 GiB.
pub fn ready_node(id: &str) -> Node {
    Node {
        meta: meta(id),
        spec: Some(NodeSpec::default()),
        description: Some(NodeDescription {
            hostname: id.into(),
            resources: Some(Resources {
                nano_cpus: 4_000_000_000,
                memory_bytes: 8 << 30,
            }),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            state: NodeState::Ready as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A replicated service `id` (named `id` too) of `replicas`.
pub fn replicated_service(id: &str, replicas: u64) -> Service {
    Service {
        meta: meta(id),
        spec: Some(spec(id, Some(replicas))),
        ..Default::default()
    }
}

/// A service spec with `replicas` (None = global).
pub fn spec(name: &str, replicas: Option<u64>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        task: Some(TaskSpec {
            container: Some(ContainerSpec {
                image: "busybox@sha256:00".into(),
                command: vec!["sleep".into(), "1000".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(match replicas {
            Some(n) => Mode::Replicated(ReplicatedService { replicas: n }),
            None => Mode::Global(GlobalService {}),
        }),
        ..Default::default()
    }
}

pub fn with_constraints(mut s: ServiceSpec, cs: &[&str]) -> ServiceSpec {
    let t = s.task.get_or_insert_with(Default::default);
    t.placement
        .get_or_insert_with(Placement::default)
        .constraints = cs.iter().map(|c| c.to_string()).collect();
    s
}

pub fn with_spread(mut s: ServiceSpec, descriptor: &str) -> ServiceSpec {
    let t = s.task.get_or_insert_with(Default::default);
    t.placement
        .get_or_insert_with(Placement::default)
        .preferences
        .push(PlacementPreference {
            spread_descriptor: descriptor.into(),
        });
    s
}

pub fn with_reservation(mut s: ServiceSpec, nano_cpus: i64, memory_bytes: i64) -> ServiceSpec {
    let t = s.task.get_or_insert_with(Default::default);
    t.resources = Some(ResourceRequirements {
        reservations: Some(Resources {
            nano_cpus,
            memory_bytes,
        }),
        limits: None,
    });
    s
}

pub fn with_restart(mut s: ServiceSpec, policy: RestartPolicy) -> ServiceSpec {
    s.task.get_or_insert_with(Default::default).restart = Some(policy);
    s
}

pub const GIB: i64 = 1 << 30;

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("sled");
        let store = Store::open(&db).expect("store");
        Harness {
            _dir: dir,
            store,
            index: 0,
            now_ms: 1_000_000,
            next_id: 0,
        }
    }

    /// Applies one command; panics if the store refuses it.
    pub fn apply(&mut self, mutations: Vec<Mutation>) {
        self.index += 1;
        let resp = self.store.apply(
            self.index,
            &Command {
                now_ms: self.now_ms,
                mutations,
            },
        );
        resp.result.expect("store accepts the command");
    }

    pub fn view(&self) -> ClusterView {
        ClusterView::load(&self.store).expect("load view")
    }

    fn ids(&mut self) -> impl FnMut() -> String + '_ {
        move || {
            self.next_id += 1;
            format!("t{:06}", self.next_id)
        }
    }

    /// Applies a decision's commands as the runner would; returns how many mutations it had.
    pub fn commit(&mut self, d: Decision) -> usize {
        let n = d.mutations.len();
        for cmd in d.into_commands(
            self.now_ms,
            shoal_manager::orchestrator::MAX_COMMAND_MUTATIONS,
        ) {
            self.apply(cmd.mutations);
        }
        n
    }

    pub fn orchestrate(&mut self) -> usize {
        let now = self.now_ms;
        let mut n = 0;
        let v = self.view();
        let d = replicated::reconcile(&v, now, &mut self.ids());
        n += self.commit(d);
        let v = self.view();
        let d = global::reconcile(&v, now, &mut self.ids());
        n += self.commit(d);
        let v = self.view();
        let d = restart::supervise(&v, now, &mut self.ids());
        n += self.commit(d);
        let v = self.view();
        n += self.commit(task_reaper::reap(&v, now));
        n
    }

    pub fn schedule(&mut self) -> usize {
        let v = self.view();
        let d = scheduler::schedule(&v, self.now_ms);
        self.commit(d)
    }

    /// Runs orchestrators and scheduler until nothing changes (bounded).
    pub fn converge(&mut self) {
        for _ in 0..MAX_ROUNDS {
            if self.orchestrate() + self.schedule() == 0 {
                return;
            }
        }
        panic!("components did not settle in {MAX_ROUNDS} rounds");
    }

    /// What agents on reachable nodes do: start assigned tasks, stop tasks not wanted.
    pub fn agents(&mut self) -> usize {
        let mut muts = Vec::new();
        for t in self.store.list_tasks().unwrap() {
            let Some(node) = self.store.get_node(&t.node_id).unwrap() else {
                continue;
            };
            if node.status.as_ref().map_or(0, |s| s.state) != NodeState::Ready as i32 {
                continue;
            }
            let s = state(&t) as i32;
            let next = if t.desired_state > TaskState::Running as i32 {
                (s >= TaskState::Assigned as i32 && s < TaskState::Complete as i32)
                    .then_some(TaskState::Shutdown)
            } else {
                (s >= TaskState::Assigned as i32 && s < TaskState::Running as i32)
                    .then_some(TaskState::Running)
            };
            if let Some(next) = next {
                muts.push(task_status(&t, next, 0));
            }
        }
        let n = muts.len();
        if n > 0 {
            self.apply(muts);
        }
        n
    }

    /// Converges with agents acting in between.
    pub fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS {
            self.converge();
            if self.agents() == 0 {
                return;
            }
        }
        panic!("cluster did not settle in {MAX_ROUNDS} rounds");
    }

    pub fn add_node(&mut self, id: &str, labels: &[(&str, &str)], cpus: i64, mem: i64) {
        let n = Node {
            meta: meta(id),
            spec: Some(NodeSpec {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            role: NodeRole::Worker as i32,
            description: Some(NodeDescription {
                hostname: format!("host-{id}"),
                resources: Some(Resources {
                    nano_cpus: cpus * 1_000_000_000,
                    memory_bytes: mem,
                }),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                state: NodeState::Ready as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.apply(vec![Mutation::Create(Object::Node(n))]);
    }

    pub fn edit_node(&mut self, id: &str, f: impl FnOnce(&mut Node)) {
        let mut n = self.store.get_node(id).unwrap().expect("node exists");
        f(&mut n);
        self.apply(vec![Mutation::Update {
            object: Object::Node(n),
            expect_version: None,
        }]);
    }

    pub fn set_node_state(&mut self, id: &str, s: NodeState) {
        self.edit_node(id, |n| {
            n.status.get_or_insert_with(Default::default).state = s as i32
        });
    }

    pub fn set_availability(&mut self, id: &str, a: NodeAvailability) {
        self.edit_node(id, |n| {
            n.spec.get_or_insert_with(Default::default).availability = a as i32
        });
    }

    pub fn remove_node(&mut self, id: &str) {
        self.apply(vec![Mutation::Delete {
            kind: shoal_manager::store::Kind::Node,
            id: id.into(),
            expect_version: None,
        }]);
    }

    pub fn create_service(&mut self, id: &str, spec: ServiceSpec) {
        self.apply(vec![Mutation::Create(Object::Service(Service {
            meta: meta(id),
            spec: Some(spec),
            ..Default::default()
        }))]);
    }

    pub fn edit_service(&mut self, id: &str, f: impl FnOnce(&mut ServiceSpec)) {
        let mut s = self.store.get_service(id).unwrap().expect("service exists");
        f(s.spec.as_mut().unwrap());
        self.apply(vec![Mutation::Update {
            object: Object::Service(s),
            expect_version: None,
        }]);
    }

    pub fn scale(&mut self, id: &str, replicas: u64) {
        self.edit_service(id, |s| {
            s.mode = Some(Mode::Replicated(ReplicatedService { replicas }))
        });
    }

    pub fn remove_service(&mut self, id: &str) {
        self.apply(vec![Mutation::Delete {
            kind: shoal_manager::store::Kind::Service,
            id: id.into(),
            expect_version: None,
        }]);
    }

    pub fn tasks(&self, service_id: &str) -> Vec<Task> {
        self.store.tasks_by_service(service_id).unwrap()
    }

    /// Tasks of the service that should run, by slot (replicated) or node (global).
    pub fn wanted(&self, service_id: &str) -> Vec<Task> {
        self.tasks(service_id)
            .into_iter()
            .filter(|t| t.desired_state <= TaskState::Running as i32)
            .collect()
    }

    /// Count of the service's running tasks per node.
    pub fn running_per_node(&self, service_id: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.tasks(service_id) {
            if state(&t) == TaskState::Running && desired(&t) == TaskState::Running {
                *m.entry(t.node_id.clone()).or_default() += 1;
            }
        }
        m
    }

    /// An agent's report that task `id` reached `s` (with an exit code).
    pub fn report(&mut self, id: &str, s: TaskState, exit_code: i32) {
        let t = self.store.get_task(id).unwrap().expect("task exists");
        self.apply(vec![task_status(&t, s, exit_code)]);
    }
}

pub fn task_status(t: &Task, s: TaskState, exit_code: i32) -> Mutation {
    let mut n = t.clone();
    n.status = Some(TaskStatus {
        state: s as i32,
        exit_code,
        ..Default::default()
    });
    Mutation::Update {
        object: Object::Task(n),
        expect_version: None,
    }
}

pub fn restart_policy(
    condition: shoal_proto::v1::RestartCondition,
    delay_ms: u64,
    max_attempts: u64,
    window_ms: u64,
) -> RestartPolicy {
    RestartPolicy {
        condition: condition as i32,
        delay_ms,
        max_attempts,
        window_ms,
    }
}
