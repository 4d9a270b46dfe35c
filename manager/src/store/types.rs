//! What travels through Raft to the store: commands, their mutations, the objects they carry,
//! the responses and the watch events.

use prost::Message;
use serde::{Deserialize, Serialize};
use shoal_proto::v1::{Cluster, Config, Meta, Network, Node, Secret, Service, Task};

/// An atomic batch of mutations proposed through Raft, checked and applied in order,
/// all-or-nothing.
///
/// Apply is deterministic: it reads only the store and the command; `now_ms` is stamped by the
/// proposer and becomes `created_at_ms`/`updated_at_ms` of the written objects.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Command {
    /// Wall-clock time of the proposer, milliseconds since the Unix epoch.
    pub now_ms: i64,
    /// Applied in order; the first failure discards the whole command.
    pub mutations: Vec<Mutation>,
}

impl Command {
    /// A command stamped with the proposer's wall clock (only proposers read the clock; apply
    /// never does).
    pub fn now(mutations: Vec<Mutation>) -> Command {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Command { now_ms, mutations }
    }

    /// Bytes of this command's encoding in a Raft entry (bincode, as the log and the
    /// transport write it), computed from the objects' prost lengths without encoding them.
    pub fn encoded_bytes(&self) -> usize {
        // now_ms, the mutations' length.
        8 + 8
            + self
                .mutations
                .iter()
                .map(Mutation::encoded_bytes)
                .sum::<usize>()
    }
}

impl Mutation {
    /// Bytes of this mutation's encoding within a command (see [`Command::encoded_bytes`]).
    pub fn encoded_bytes(&self) -> usize {
        // bincode: enum tags are u32, lengths u64, `Option<u64>` a byte and its value.
        const TAG: usize = 4;
        const LEN: usize = 8;
        let version = |v: &Option<u64>| if v.is_some() { 9 } else { 1 };
        TAG + match self {
            Mutation::Create(o) => o.encoded_bytes(),
            Mutation::Update {
                object,
                expect_version,
            } => object.encoded_bytes() + version(expect_version),
            Mutation::Delete {
                id, expect_version, ..
            } => TAG + LEN + id.len() + version(expect_version),
            Mutation::Group(cmds) => LEN + cmds.iter().map(Command::encoded_bytes).sum::<usize>(),
        }
    }
}

/// One change to one object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Mutation {
    /// Create an object; its id (`meta.id`) must be new and a service's name unused.
    Create(Object),
    /// Replace an object; `expect_version` is the version the writer read (`None` = blind write).
    Update {
        /// The new contents; `meta.version`/timestamps are set by the store.
        object: Object,
        /// Optimistic concurrency token: the `meta.version` the writer based its change on.
        expect_version: Option<u64>,
    },
    /// Delete an object by kind and id.
    Delete {
        /// Which tree the object lives in.
        kind: Kind,
        /// The object's `meta.id`.
        id: String,
        /// Optimistic concurrency token, as for `Update`.
        expect_version: Option<u64>,
    },
    /// Several proposers' commands carried in one Raft entry (group commit): each is checked
    /// and applied on its own, in order, all-or-nothing by itself, as if it had its own entry
    /// at this index; their results are the response's `each`. Only valid as the sole
    /// mutation of a command, and never nested. (Last variant: entries written before it
    /// existed still decode.)
    Group(Vec<Command>),
}

/// A stored cluster object (serde-encoded as its prost bytes).
// Unboxed so callers match and build objects plainly; objects are moved around singly, never
// held in large arrays where the size difference would matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A worker or manager node.
    Node(Node),
    /// A service.
    Service(Service),
    /// A task of a service.
    Task(Task),
    /// The cluster object (one per cluster).
    Cluster(Cluster),
    /// A cluster network.
    Network(Network),
    /// A secret (its data sealed).
    Secret(Secret),
    /// A config.
    Config(Config),
}

/// The kinds of stored objects.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `Object::Node`.
    Node,
    /// `Object::Service`.
    Service,
    /// `Object::Task`.
    Task,
    /// `Object::Cluster`.
    Cluster,
    /// `Object::Network`.
    Network,
    /// `Object::Secret`.
    Secret,
    /// `Object::Config`.
    Config,
}

impl Kind {
    /// `Kind::Service`: what a name clash recorded before the kind was kept named.
    fn service() -> Kind {
        Kind::Service
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Node => "node",
            Kind::Service => "service",
            Kind::Task => "task",
            Kind::Cluster => "cluster",
            Kind::Network => "network",
            Kind::Secret => "secret",
            Kind::Config => "config",
        })
    }
}

impl Object {
    /// The kind of this object.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Service(_) => Kind::Service,
            Object::Task(_) => Kind::Task,
            Object::Cluster(_) => Kind::Cluster,
            Object::Network(_) => Kind::Network,
            Object::Secret(_) => Kind::Secret,
            Object::Config(_) => Kind::Config,
        }
    }

    /// The object's meta, if set.
    pub fn meta(&self) -> Option<&Meta> {
        match self {
            Object::Node(o) => o.meta.as_ref(),
            Object::Service(o) => o.meta.as_ref(),
            Object::Task(o) => o.meta.as_ref(),
            Object::Cluster(o) => o.meta.as_ref(),
            Object::Network(o) => o.meta.as_ref(),
            Object::Secret(o) => o.meta.as_ref(),
            Object::Config(o) => o.meta.as_ref(),
        }
    }

    /// The object's meta, created empty if absent.
    pub fn meta_mut(&mut self) -> &mut Meta {
        match self {
            Object::Node(o) => o.meta.get_or_insert_with(Meta::default),
            Object::Service(o) => o.meta.get_or_insert_with(Meta::default),
            Object::Task(o) => o.meta.get_or_insert_with(Meta::default),
            Object::Cluster(o) => o.meta.get_or_insert_with(Meta::default),
            Object::Network(o) => o.meta.get_or_insert_with(Meta::default),
            Object::Secret(o) => o.meta.get_or_insert_with(Meta::default),
            Object::Config(o) => o.meta.get_or_insert_with(Meta::default),
        }
    }

    /// The object's id (`meta.id`), empty when unset.
    pub fn id(&self) -> &str {
        self.meta().map(|m| m.id.as_str()).unwrap_or("")
    }

    /// The object's version (`meta.version`), 0 when unset.
    pub fn version(&self) -> u64 {
        self.meta().map(|m| m.version).unwrap_or(0)
    }

    /// Bytes of this object's encoding within a mutation: its kind and its prost bytes.
    pub fn encoded_bytes(&self) -> usize {
        let len = match self {
            Object::Node(o) => o.encoded_len(),
            Object::Service(o) => o.encoded_len(),
            Object::Task(o) => o.encoded_len(),
            Object::Cluster(o) => o.encoded_len(),
            Object::Network(o) => o.encoded_len(),
            Object::Secret(o) => o.encoded_len(),
            Object::Config(o) => o.encoded_len(),
        };
        4 + 8 + len
    }

    /// The prost encoding of the inner message.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            Object::Node(o) => o.encode_to_vec(),
            Object::Service(o) => o.encode_to_vec(),
            Object::Task(o) => o.encode_to_vec(),
            Object::Cluster(o) => o.encode_to_vec(),
            Object::Network(o) => o.encode_to_vec(),
            Object::Secret(o) => o.encode_to_vec(),
            Object::Config(o) => o.encode_to_vec(),
        }
    }

    /// Decodes prost bytes of the given kind.
    pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Object, prost::DecodeError> {
        Ok(match kind {
            Kind::Node => Object::Node(Node::decode(bytes)?),
            Kind::Service => Object::Service(Service::decode(bytes)?),
            Kind::Task => Object::Task(Task::decode(bytes)?),
            Kind::Cluster => Object::Cluster(Cluster::decode(bytes)?),
            Kind::Network => Object::Network(Network::decode(bytes)?),
            Kind::Secret => Object::Secret(Secret::decode(bytes)?),
            Kind::Config => Object::Config(Config::decode(bytes)?),
        })
    }
}

/// How an `Object` travels in serde formats: its kind and its prost bytes (as one byte string,
/// not a sequence of integers: bincode then copies them in one go).
#[derive(Serialize, Deserialize)]
enum ObjectWire {
    Node(#[serde(with = "serde_bytes")] Vec<u8>),
    Service(#[serde(with = "serde_bytes")] Vec<u8>),
    Task(#[serde(with = "serde_bytes")] Vec<u8>),
    Cluster(#[serde(with = "serde_bytes")] Vec<u8>),
    Network(#[serde(with = "serde_bytes")] Vec<u8>),
    Secret(#[serde(with = "serde_bytes")] Vec<u8>),
    Config(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Serialize for Object {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes = self.encode_to_vec();
        match self.kind() {
            Kind::Node => ObjectWire::Node(bytes),
            Kind::Service => ObjectWire::Service(bytes),
            Kind::Task => ObjectWire::Task(bytes),
            Kind::Cluster => ObjectWire::Cluster(bytes),
            Kind::Network => ObjectWire::Network(bytes),
            Kind::Secret => ObjectWire::Secret(bytes),
            Kind::Config => ObjectWire::Config(bytes),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (kind, bytes) = match ObjectWire::deserialize(deserializer)? {
            ObjectWire::Node(b) => (Kind::Node, b),
            ObjectWire::Service(b) => (Kind::Service, b),
            ObjectWire::Task(b) => (Kind::Task, b),
            ObjectWire::Cluster(b) => (Kind::Cluster, b),
            ObjectWire::Network(b) => (Kind::Network, b),
            ObjectWire::Secret(b) => (Kind::Secret, b),
            ObjectWire::Config(b) => (Kind::Config, b),
        };
        Object::decode(kind, &bytes).map_err(serde::de::Error::custom)
    }
}

/// The result of applying one `Command`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Response {
    /// The new version of each mutated object, one per mutation in order (all equal to the raft
    /// log index of the command), or why the whole command was refused. `Ok(vec![])` for a
    /// group.
    pub result: Result<Vec<u64>, StoreError>,
    /// For a `Mutation::Group` command: one response per grouped command, in order; else empty.
    pub each: Vec<Response>,
}

impl Response {
    /// The response of a command that is not a group.
    pub fn single(result: Result<Vec<u64>, StoreError>) -> Response {
        Response {
            result,
            each: Vec::new(),
        }
    }
}

/// Why the store refused a command or a read failed.
#[derive(thiserror::Error, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The writer read an older (or newer) version than the stored one.
    #[error("version conflict on {id}: expected version {expected}, found {actual}")]
    VersionConflict {
        /// The object's id.
        id: String,
        /// The version the writer expected.
        expected: u64,
        /// The version in the store.
        actual: u64,
    },
    /// No object of that kind with that id.
    #[error("{kind} {id} not found")]
    NotFound {
        /// The object's kind.
        kind: Kind,
        /// The id that was looked up.
        id: String,
    },
    /// `Create` of an id that exists.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// The object's kind.
        kind: Kind,
        /// The duplicate id.
        id: String,
    },
    /// A name held by another object of the kind (services, networks, secrets, configs).
    #[error("{kind} name {name} is already in use by {kind} {existing_id}")]
    NameTaken {
        /// The kind of both objects.
        #[serde(default = "Kind::service")]
        kind: Kind,
        /// The requested name.
        name: String,
        /// The object that holds the name.
        existing_id: String,
    },
    /// A task state (`status.state` or `desired_state`) moving backwards.
    #[error("task {id}: {field} cannot move backwards from {from} to {to}")]
    InvalidTransition {
        /// The task's id.
        id: String,
        /// "status.state" or "desired_state".
        field: String,
        /// The stored state (TaskState as i32, name in the message).
        from: String,
        /// The refused state.
        to: String,
    },
    /// A malformed mutation (no id, no service name, ...).
    #[error("invalid {kind}: {reason}")]
    Invalid {
        /// The object's kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// A command that cannot be applied as written (a misplaced or nested group).
    #[error("malformed command: {0}")]
    Malformed(String),
    /// sled failed (I/O, corruption).
    #[error("storage: {0}")]
    Storage(String),
    /// A stored value could not be decoded.
    #[error("decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// The decoder's message.
        reason: String,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// What happened to an object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The object was created.
    Create,
    /// The object was replaced.
    Update,
    /// The object was deleted (the event carries its last contents).
    Delete,
}

/// A change event, published to watchers after the command that caused it was committed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Event {
    /// Raft log index of the command (the object's new version; for a delete, the index of the
    /// delete).
    pub version: u64,
    /// Create, update or delete.
    pub action: Action,
    /// The object after the change (for a delete: before).
    pub object: Object,
    /// When the command was proposed (the proposer's clock, ms since the epoch): the same on
    /// every manager. 0 for the events a snapshot install synthesises.
    pub time_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_bytes_is_the_length_of_the_entry_encoding() {
        let svc = Object::Service(Service {
            meta: Some(Meta {
                id: "s1".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let task = Object::Task(Task {
            node_id: "n".repeat(300),
            ..Default::default()
        });
        let single = Command {
            now_ms: 7,
            mutations: vec![
                Mutation::Create(svc.clone()),
                Mutation::Update {
                    object: task.clone(),
                    expect_version: Some(3),
                },
                Mutation::Update {
                    object: svc,
                    expect_version: None,
                },
                Mutation::Delete {
                    kind: Kind::Task,
                    id: "t1".into(),
                    expect_version: Some(9),
                },
                Mutation::Delete {
                    kind: Kind::Node,
                    id: String::new(),
                    expect_version: None,
                },
            ],
        };
        let group = Command {
            now_ms: 8,
            mutations: vec![Mutation::Group(vec![
                single.clone(),
                Command {
                    now_ms: 1,
                    mutations: vec![],
                },
            ])],
        };
        for cmd in [&single, &group] {
            let wire = bincode::serialized_size(cmd).unwrap() as usize;
            assert_eq!(cmd.encoded_bytes(), wire, "{cmd:?}");
        }
    }
}
