//! Whole-store dumps for Raft snapshots: build one, and replace the store with one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{decode, Action, Event, Kind, Store, StoreError, TreeId, TREE_NAMES};

/// Every tree of the store (objects, indexes, state machine metadata) at one applied index.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Dump {
    /// One entry per tree, in `TREE_NAMES` order.
    pub trees: Vec<DumpTree>,
}

/// The key/value pairs of one sled tree, in key order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DumpTree {
    /// The sled tree's name.
    pub name: String,
    /// Its contents.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Dump {
    /// The bincode encoding, as carried in a snapshot.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StoreError> {
        bincode::serialize(self).map_err(|e| StoreError::Decode {
            what: "store dump".into(),
            reason: e.to_string(),
        })
    }

    /// Decodes `to_bytes` output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Dump, StoreError> {
        bincode::deserialize(bytes).map_err(|e| StoreError::Decode {
            what: "store dump".into(),
            reason: e.to_string(),
        })
    }

    /// A value of the state machine's metadata tree in this dump.
    pub fn meta_get(&self, key: &[u8]) -> Option<&[u8]> {
        self.trees
            .iter()
            .find(|t| t.name == TREE_NAMES[TreeId::SmMeta as usize])?
            .entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets a value of the state machine's metadata tree in this dump.
    pub fn meta_set(&mut self, key: &[u8], value: Vec<u8>) {
        let name = TREE_NAMES[TreeId::SmMeta as usize];
        let idx = match self.trees.iter().position(|t| t.name == name) {
            Some(i) => i,
            None => {
                self.trees.push(DumpTree {
                    name: name.to_string(),
                    entries: Vec::new(),
                });
                self.trees.len() - 1
            }
        };
        let entries = &mut self.trees[idx].entries;
        match entries.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
            Ok(i) => entries[i].1 = value,
            Err(i) => entries.insert(i, (key.to_vec(), value)),
        }
    }

    /// How many objects of `kind` the dump holds.
    pub fn objects(&self, kind: Kind) -> usize {
        self.tree(TreeId::of(kind)).map_or(0, |t| t.entries.len())
    }

    fn tree(&self, t: TreeId) -> Option<&DumpTree> {
        self.trees.iter().find(|d| d.name == TREE_NAMES[t as usize])
    }
}

const OBJECT_KINDS: [Kind; 7] = [
    Kind::Node,
    Kind::Service,
    Kind::Task,
    Kind::Cluster,
    Kind::Network,
    Kind::Secret,
    Kind::Config,
];

impl Store {
    /// Reads every tree at one point between commits.
    pub fn dump(&self) -> Result<Dump, StoreError> {
        let _guard = self
            .inner
            .commit_lock
            .lock()
            .map_err(|_| StoreError::Storage("commit lock poisoned".into()))?;
        let mut trees = Vec::with_capacity(TREE_NAMES.len());
        for (i, name) in TREE_NAMES.iter().enumerate() {
            let entries = self.inner.trees[i]
                .iter()
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<Vec<_>, _>>()?;
            trees.push(DumpTree {
                name: name.to_string(),
                entries,
            });
        }
        Ok(Dump { trees })
    }

    /// Replaces the whole store with `dump` in one transaction, then tells watchers what
    /// changed (creates, updates, and deletes stamped with `applied_index`).
    pub fn restore(&self, dump: &Dump, applied_index: u64) -> Result<(), StoreError> {
        for t in &dump.trees {
            if !TREE_NAMES.contains(&t.name.as_str()) {
                return Err(StoreError::Decode {
                    what: "store dump".into(),
                    reason: format!("unknown tree {}", t.name),
                });
            }
        }
        let empty = Vec::new();
        let events;
        {
            let _guard = self
                .inner
                .commit_lock
                .lock()
                .map_err(|_| StoreError::Storage("commit lock poisoned".into()))?;
            let mut old_keys: Vec<Vec<sled::IVec>> = Vec::with_capacity(TREE_NAMES.len());
            for tree in &self.inner.trees {
                old_keys.push(tree.iter().keys().collect::<Result<Vec<_>, _>>()?);
            }
            events = self.restore_events(dump, applied_index)?;
            let trees = &self.inner.trees[..];
            trees
                .transaction(|views| {
                    for (i, keys) in old_keys.iter().enumerate() {
                        for k in keys {
                            views[i].remove(k.clone())?;
                        }
                    }
                    for (i, name) in TREE_NAMES.iter().enumerate() {
                        let entries = dump
                            .trees
                            .iter()
                            .find(|t| t.name == *name)
                            .map(|t| &t.entries)
                            .unwrap_or(&empty);
                        for (k, v) in entries {
                            views[i].insert(k.as_slice(), v.as_slice())?;
                        }
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .map_err(|e| match e {
                    TransactionError::Abort(()) => {
                        StoreError::Storage("transaction aborted".into())
                    }
                    TransactionError::Storage(e) => StoreError::from(e),
                })?;
        }
        self.publish(events);
        Ok(())
    }

    /// The events that turn the current objects into those of `dump`, by kind then id.
    fn restore_events(&self, dump: &Dump, applied_index: u64) -> Result<Vec<Event>, StoreError> {
        let mut events = Vec::new();
        for kind in OBJECT_KINDS {
            let t = TreeId::of(kind);
            let mut old: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for kv in self.tree(t).iter() {
                let (k, v) = kv?;
                old.insert(k.to_vec(), v.to_vec());
            }
            if let Some(new) = dump.tree(t) {
                for (k, v) in &new.entries {
                    let action = match old.remove(k) {
                        Some(o) if o == *v => continue,
                        Some(_) => Action::Update,
                        None => Action::Create,
                    };
                    let object = decode(kind, v)?;
                    events.push(Event {
                        version: object.version(),
                        action,
                        object,
                        time_ms: 0,
                    });
                }
            }
            for v in old.values() {
                events.push(Event {
                    version: applied_index,
                    action: Action::Delete,
                    object: decode(kind, v)?,
                    time_ms: 0,
                });
            }
        }
        Ok(events)
    }
}
