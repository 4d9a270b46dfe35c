//! The leader's orchestrators: make the tasks in the store match each service's spec.
//!
//! Each component is a pure decision function over a [`ClusterView`] returning store
//! mutations, plus a loop (see [`run_leader`]) that runs it on the leader whenever the view
//! changes. Components never call each other: they read the view (fed by the store's watch
//! events) and write through Raft; the events of one component's writes wake the others.
//!
//! - [`replicated`]: slots 1..N per replicated service; replaces tasks of down or drained nodes.
//! - [`global`]: one task per eligible node per global service.
//! - [`restart`]: replaces terminal tasks that should run, per the restart policy.
//! - [`updater`]: rolls tasks onto a new spec (rolling updates, rollback), from the store.
//! - [`task_reaper`]: removes tasks of deleted services, deletes removed and surplus history
//!   tasks, marks tasks of long-gone nodes ORPHANED.

pub mod global;
pub mod replicated;
pub mod restart;
mod runner;
pub mod task_reaper;
pub mod updater;
pub mod view;

use std::future::Future;

use shoal_proto::v1::{Service, Task, TaskState, TaskStatus};

pub use runner::{
    run_leader, LeaderRunError, BATCH_WINDOW, MAX_COMMAND_BYTES, MAX_COMMAND_MUTATIONS,
};
pub use view::ClusterView;

use crate::store::{Command, Mutation, Object, Response};

/// Why a proposal did not reach the store.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// This manager is not (or no longer) the leader.
    #[error("not the raft leader")]
    NotLeader,
    /// Raft failed to commit the command.
    #[error("propose: {0}")]
    Failed(String),
}

/// How the leader components write: one atomic command through Raft.
pub trait Proposer: Send + Sync + 'static {
    /// Proposes `cmd` and waits until it is applied; the store's answer comes back.
    fn propose(&self, cmd: Command) -> impl Future<Output = Result<Response, ProposeError>> + Send;

    /// The highest index in this manager's Raft log. After a proposal whose outcome is
    /// unknown (an error after it may have been appended), it is at or below this index if it
    /// is in the log at all.
    fn last_log_index(&self) -> u64;

    /// Completes once the entry at `index` (and all before it) has been applied to the store
    /// here; never completes if that cannot happen while this manager leads (the leader loops
    /// are ended when leadership is lost).
    fn applied(&self, index: u64) -> impl Future<Output = ()> + Send;
}

impl Proposer for crate::raft::Raft {
    async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        use crate::raft::ProposeRefused;
        // Bounded like the dispatcher's writes: a proposal never answered (a leadership blip)
        // would otherwise hold its component for as long as this manager leads.
        let wait = crate::dispatcher::PROPOSE_WAIT * 2;
        let Ok(written) = tokio::time::timeout(wait, crate::raft::propose(self, cmd)).await else {
            return Err(ProposeError::Failed(
                "no commit in time: outcome unknown".into(),
            ));
        };
        written.map_err(|e| match e {
            ProposeRefused::NotLeader => ProposeError::NotLeader,
            e @ ProposeRefused::TooLarge { .. } => {
                // Never commits however often it is tried: say so where it can be seen.
                tracing::warn!("leader loops: {e}");
                ProposeError::Failed(e.to_string())
            }
            e => ProposeError::Failed(e.to_string()),
        })
    }

    fn last_log_index(&self) -> u64 {
        self.metrics().borrow().last_log_index.unwrap_or(0)
    }

    async fn applied(&self, index: u64) {
        let applied = self
            .wait(None)
            // Index 0 asks for nothing (as `last_log_index` answers for an empty log).
            .applied_index_at_least((index > 0).then_some(index), "leader loops: log applied")
            .await;
        if applied.is_err() {
            // Raft stopped: nothing more will be applied; the leader loops end with it.
            std::future::pending::<()>().await;
        }
    }
}

/// What one round of a component decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// Store writes, in order; proposed in commands of at most [`MAX_COMMAND_MUTATIONS`].
    /// Mutations that must be atomic (retire a task and create its replacement) are adjacent
    /// and grouped by [`Decision::groups`].
    pub mutations: Vec<Mutation>,
    /// Lengths of the atomic groups `mutations` is made of (each group goes in one command).
    pub groups: Vec<usize>,
    /// When the component wants to run again although nothing changed (a restart delay or an
    /// orphaning deadline), ms since the epoch.
    pub wake_at_ms: Option<i64>,
}

impl Decision {
    /// Adds mutations that must be applied together.
    pub fn push_group(&mut self, group: Vec<Mutation>) {
        if group.is_empty() {
            return;
        }
        self.groups.push(group.len());
        self.mutations.extend(group);
    }

    /// Adds one mutation.
    pub fn push(&mut self, m: Mutation) {
        self.push_group(vec![m]);
    }

    /// Asks for another round no later than `at_ms`.
    pub fn wake_at(&mut self, at_ms: i64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(at_ms, |w| w.min(at_ms)));
    }

    /// Splits the mutations into commands of at most `max` mutations, never splitting a group
    /// (a group larger than `max` gets a command of its own).
    pub fn into_commands(self, now_ms: i64, max: usize) -> Vec<Command> {
        self.into_commands_within(now_ms, max, usize::MAX)
    }

    /// Like [`Decision::into_commands`], and also at most about `max_bytes` of encoded objects
    /// per command (a group larger than that gets a command of its own), so one Raft entry —
    /// and the AppendEntries carrying it — stays small.
    pub fn into_commands_within(self, now_ms: i64, max: usize, max_bytes: usize) -> Vec<Command> {
        let mut out = Vec::new();
        let mut current: Vec<Mutation> = Vec::new();
        let mut bytes = 0usize;
        let mut it = self.mutations.into_iter();
        for len in self.groups {
            let group: Vec<Mutation> = it.by_ref().take(len).collect();
            let group_bytes: usize = group.iter().map(mutation_bytes).sum();
            if !current.is_empty() && (current.len() + len > max || bytes + group_bytes > max_bytes)
            {
                out.push(Command {
                    now_ms,
                    mutations: std::mem::take(&mut current),
                });
                bytes = 0;
            }
            current.extend(group);
            bytes += group_bytes;
        }
        if !current.is_empty() {
            out.push(Command {
                now_ms,
                mutations: current,
            });
        }
        out
    }
}

/// About how many bytes a mutation takes in a Raft entry (its object's encoding, plus a little).
pub fn mutation_bytes(m: &Mutation) -> usize {
    use prost::Message;
    const OVERHEAD: usize = 16;
    let object = |o: &Object| match o {
        Object::Node(n) => n.encoded_len(),
        Object::Service(s) => s.encoded_len(),
        Object::Task(t) => t.encoded_len(),
        Object::Cluster(c) => c.encoded_len(),
        Object::Network(n) => n.encoded_len(),
        Object::Secret(x) => x.encoded_len(),
        Object::Config(x) => x.encoded_len(),
    };
    OVERHEAD
        + match m {
            Mutation::Create(o) | Mutation::Update { object: o, .. } => object(o),
            Mutation::Delete { id, .. } => id.len(),
            Mutation::Group(cmds) => cmds
                .iter()
                .flat_map(|c| c.mutations.iter())
                .map(mutation_bytes)
                .sum(),
        }
}

/// A fresh task id: 25 lowercase base-36 characters, like docker's.
pub fn new_task_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..25)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The spec version tasks of `service` record: the service's `spec_version`, or its object
/// version while nothing set one.
pub fn spec_version(service: &Service) -> u64 {
    if service.spec_version != 0 {
        service.spec_version
    } else {
        service.meta.as_ref().map_or(0, |m| m.version)
    }
}

/// A new PENDING task of `service` wanting to run, in `slot` (replicated) or on `node_id`
/// (global: slot 0 and the node fixed).
pub fn new_task(service: &Service, slot: u64, node_id: &str, id: String, now_ms: i64) -> Task {
    let spec = service.spec.as_ref();
    Task {
        meta: Some(shoal_proto::v1::Meta {
            id,
            ..Default::default()
        }),
        service_id: service
            .meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_default(),
        slot,
        node_id: node_id.to_string(),
        spec: spec.and_then(|s| s.task.clone()),
        spec_version: spec_version(service),
        desired_state: TaskState::Running as i32,
        status: Some(TaskStatus {
            state: TaskState::Pending as i32,
            timestamp_ms: now_ms,
            message: "pending task scheduling".into(),
            ..Default::default()
        }),
        service_name: spec.map(|s| s.name.clone()).unwrap_or_default(),
        ports: spec.map(|s| s.ports.clone()).unwrap_or_default(),
        // Cluster networks (by id; `host` and `none` are node-local modes): apply allocates
        // each attachment's address.
        networks: spec
            .and_then(|s| s.task.as_ref())
            .map(|t| {
                t.networks
                    .iter()
                    .filter(|n| *n != "host" && *n != "none")
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            // A service publishing through the routing mesh: its tasks are on ingress too.
            .chain(
                spec.is_some_and(|s| s.ports.iter().any(|p| p.publish_mode == "ingress"))
                    .then(|| crate::store::INGRESS_NETWORK.to_string()),
            )
            .map(|network_id| shoal_proto::v1::NetworkAttachment {
                network_id,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// `Create` of a task.
pub fn create(task: Task) -> Mutation {
    Mutation::Create(Object::Task(task))
}

/// `Update` of a task from `old` to `new`, conditional on `old`'s version. Asserts that the
/// change moves the task's states forward only (the store refuses the rest anyway).
pub fn update(old: &Task, new: Task) -> Mutation {
    debug_assert!(
        new.desired_state >= old.desired_state && view::state(&new) >= view::state(old),
        "task {} moved backwards",
        task_id(old)
    );
    Mutation::Update {
        object: Object::Task(new),
        expect_version: Some(old.meta.as_ref().map_or(0, |m| m.version)),
    }
}

/// `Delete` of a task, conditional on its version.
pub fn delete(t: &Task) -> Mutation {
    Mutation::Delete {
        kind: crate::store::Kind::Task,
        id: task_id(t).to_string(),
        expect_version: Some(t.meta.as_ref().map_or(0, |m| m.version)),
    }
}

/// The task's id.
pub fn task_id(t: &Task) -> &str {
    t.meta.as_ref().map_or("", |m| m.id.as_str())
}

/// `t` with its desired state raised to `desired` (never lowered).
pub fn with_desired(t: &Task, desired: TaskState) -> Task {
    let mut n = t.clone();
    n.desired_state = n.desired_state.max(desired as i32);
    n
}
