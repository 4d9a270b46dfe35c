//! Applying commands: checks, index maintenance and the all-or-nothing commit.

use std::collections::BTreeMap;

use shoal_proto::v1::{FileReference, Network, NetworkAttachment, Node, Service, Task, TaskState};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{
    decode, index_key, Action, Command, Event, Kind, Mutation, Object, Response, Store, StoreError,
    TreeId,
};

/// Pending writes: (tree, key) → new value, `None` = delete. Ordered, so the commit writes in a
/// deterministic order.
type Writes = BTreeMap<(TreeId, Vec<u8>), Option<Vec<u8>>>;

/// Writes to one sled tree outside the store for [`Batch::commit_with`]: key → value, `None`
/// = delete.
pub type RawWrites<'t> = (&'t sled::Tree, Vec<(Vec<u8>, Option<Vec<u8>>)>);

/// Commands (and commits) of at least this many mutations (writes) run through
/// [`super::block_in_place`]: applying a large task batch takes tens of ms, which must not
/// hold up Raft's heartbeats and votes on the same runtime worker.
const BLOCKING_MUTATIONS: usize = 64;

/// Commands applied in memory on top of the store, committed in one sled transaction.
///
/// Each command sees the writes of the commands before it in the same batch; a refused command
/// leaves no trace. Events are published by [`Batch::commit`] after the transaction committed.
pub struct Batch<'a> {
    store: &'a Store,
    writes: Writes,
    events: Vec<Event>,
}

impl<'a> Batch<'a> {
    pub(super) fn new(store: &'a Store) -> Batch<'a> {
        Batch {
            store,
            writes: Writes::new(),
            events: Vec::new(),
        }
    }

    /// Applies `cmd` at `log_index` on top of the batch. A refused command (conflict, not
    /// found, ...) is `Ok` with the refusal in the response and changes nothing; `Err` is a
    /// storage failure (the batch should be dropped).
    ///
    /// A group command (`Mutation::Group`) applies each of its commands this way in turn and
    /// answers with their responses in `Response::each`.
    pub fn apply(&mut self, log_index: u64, cmd: &Command) -> Result<Response, StoreError> {
        if cmd.mutations.len() >= BLOCKING_MUTATIONS {
            return super::block_in_place(|| self.apply_inline(log_index, cmd));
        }
        self.apply_inline(log_index, cmd)
    }

    fn apply_inline(&mut self, log_index: u64, cmd: &Command) -> Result<Response, StoreError> {
        let [Mutation::Group(group)] = cmd.mutations.as_slice() else {
            return self.apply_one(log_index, cmd);
        };
        let mut each = Vec::with_capacity(group.len());
        for c in group {
            each.push(self.apply_one(log_index, c)?);
        }
        Ok(Response {
            result: Ok(Vec::new()),
            each,
        })
    }

    /// Applies one command that is not a group (a group inside is refused as malformed).
    fn apply_one(&mut self, log_index: u64, cmd: &Command) -> Result<Response, StoreError> {
        let mut staged = Staged {
            batch: self,
            writes: Writes::new(),
            events: Vec::new(),
        };
        let mut versions = Vec::with_capacity(cmd.mutations.len());
        for m in &cmd.mutations {
            match staged.mutate(log_index, cmd.now_ms, m) {
                Ok(()) => versions.push(log_index),
                Err(StoreError::Storage(e)) => return Err(StoreError::Storage(e)),
                Err(refused) => return Ok(Response::single(Err(refused))),
            }
        }
        let Staged { writes, events, .. } = staged;
        self.writes.extend(writes);
        self.events.extend(events);
        Ok(Response::single(Ok(versions)))
    }

    /// Sets a key of the state machine's metadata tree in this batch.
    pub fn put_meta(&mut self, key: &[u8], value: Vec<u8>) {
        self.writes
            .insert((TreeId::SmMeta, key.to_vec()), Some(value));
    }

    /// Writes everything in one sled transaction, then publishes the events.
    pub fn commit(self) -> Result<(), StoreError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        if self.writes.len() >= BLOCKING_MUTATIONS {
            return super::block_in_place(|| self.commit_inline());
        }
        self.commit_inline()
    }

    fn commit_inline(self) -> Result<(), StoreError> {
        self.commit_with(&[])
    }

    /// The nodes as this batch would leave them (the store's, with the batch's writes).
    pub fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let mut nodes: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for kv in self.store.tree(TreeId::Nodes).iter() {
            let (k, v) = kv?;
            nodes.insert(k.to_vec(), v.to_vec());
        }
        for ((t, k), v) in &self.writes {
            if *t != TreeId::Nodes {
                continue;
            }
            match v {
                Some(v) => nodes.insert(k.clone(), v.clone()),
                None => nodes.remove(k),
            };
        }
        nodes
            .values()
            .map(|v| match decode(Kind::Node, v)? {
                Object::Node(n) => Ok(n),
                _ => Err(StoreError::Storage("node tree holds another kind".into())),
            })
            .collect()
    }

    /// [`Batch::commit`] with `raw` writes to trees outside the store (key → value, `None` =
    /// delete) in the same sled transaction: the Raft log's, when a group is started over
    /// (`raft::reseed`), so the store and the log never disagree after a crash.
    pub fn commit_with(self, raw: &[RawWrites<'_>]) -> Result<(), StoreError> {
        {
            let _guard = self
                .store
                .inner
                .commit_lock
                .lock()
                .map_err(|_| StoreError::Storage("commit lock poisoned".into()))?;
            let ours = self.store.inner.trees.len();
            let mut trees = self.store.inner.trees.clone();
            trees.extend(raw.iter().map(|(t, _)| (*t).clone()));
            trees[..]
                .transaction(|views| {
                    for ((t, k), v) in &self.writes {
                        let view = &views[*t as usize];
                        match v {
                            Some(v) => view.insert(k.as_slice(), v.as_slice())?,
                            None => view.remove(k.as_slice())?,
                        };
                    }
                    for (i, (_, writes)) in raw.iter().enumerate() {
                        let view = &views[ours + i];
                        for (k, v) in writes {
                            match v {
                                Some(v) => view.insert(k.as_slice(), v.as_slice())?,
                                None => view.remove(k.as_slice())?,
                            };
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
        self.store.publish(self.events);
        Ok(())
    }
}

/// One command's writes on top of its batch, merged only if every mutation passed.
struct Staged<'b, 'a> {
    batch: &'b Batch<'a>,
    writes: Writes,
    events: Vec<Event>,
}

impl Staged<'_, '_> {
    fn read(&self, t: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let k = (t, key.to_vec());
        if let Some(v) = self.writes.get(&k) {
            return Ok(v.clone());
        }
        if let Some(v) = self.batch.writes.get(&k) {
            return Ok(v.clone());
        }
        Ok(self.batch.store.tree(t).get(key)?.map(|v| v.to_vec()))
    }

    fn put(&mut self, t: TreeId, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert((t, key), Some(value));
    }

    fn del(&mut self, t: TreeId, key: Vec<u8>) {
        self.writes.insert((t, key), None);
    }

    fn get_object(&self, kind: Kind, id: &str) -> Result<Option<Object>, StoreError> {
        match self.read(TreeId::of(kind), id.as_bytes())? {
            Some(v) => Ok(Some(decode(kind, &v)?)),
            None => Ok(None),
        }
    }

    fn mutate(&mut self, log_index: u64, now_ms: i64, m: &Mutation) -> Result<(), StoreError> {
        match m {
            Mutation::Create(object) => self.create(log_index, now_ms, object),
            Mutation::Update {
                object,
                expect_version,
            } => self.update(log_index, now_ms, object, *expect_version),
            Mutation::Delete {
                kind,
                id,
                expect_version,
            } => self.delete(log_index, now_ms, *kind, id, *expect_version),
            Mutation::Group(_) => Err(StoreError::Malformed(
                "a group must be the only mutation of a command, and groups do not nest".into(),
            )),
        }
    }

    fn create(&mut self, log_index: u64, now_ms: i64, object: &Object) -> Result<(), StoreError> {
        let kind = object.kind();
        let id = object.id().to_string();
        check_id(kind, &id)?;
        if self.read(TreeId::of(kind), id.as_bytes())?.is_some() {
            return Err(StoreError::AlreadyExists { kind, id });
        }
        let mut object = object.clone();
        stamp_spec_version(&mut object, log_index);
        self.attach_networks(None, &mut object)?;
        let meta = object.meta_mut();
        meta.version = log_index;
        meta.created_at_ms = now_ms;
        meta.updated_at_ms = now_ms;
        self.index(None, &object)?;
        self.put(TreeId::of(kind), id.into_bytes(), object.encode_to_vec());
        self.events.push(Event {
            version: log_index,
            action: Action::Create,
            object,
            time_ms: now_ms,
        });
        Ok(())
    }

    fn update(
        &mut self,
        log_index: u64,
        now_ms: i64,
        object: &Object,
        expect_version: Option<u64>,
    ) -> Result<(), StoreError> {
        let kind = object.kind();
        let id = object.id().to_string();
        check_id(kind, &id)?;
        let Some(old) = self.get_object(kind, &id)? else {
            return Err(StoreError::NotFound { kind, id });
        };
        check_version(&id, expect_version, old.version())?;
        if let (Object::Task(old), Object::Task(new)) = (&old, object) {
            check_task_forward(old, new)?;
        }
        let mut object = object.clone();
        stamp_spec_version(&mut object, log_index);
        self.attach_networks(Some(&old), &mut object)?;
        let created = old.meta().map(|m| m.created_at_ms).unwrap_or(now_ms);
        let meta = object.meta_mut();
        meta.version = log_index;
        meta.created_at_ms = created;
        meta.updated_at_ms = now_ms;
        self.index(Some(&old), &object)?;
        self.put(TreeId::of(kind), id.into_bytes(), object.encode_to_vec());
        self.events.push(Event {
            version: log_index,
            action: Action::Update,
            object,
            time_ms: now_ms,
        });
        Ok(())
    }

    fn delete(
        &mut self,
        log_index: u64,
        now_ms: i64,
        kind: Kind,
        id: &str,
        expect_version: Option<u64>,
    ) -> Result<(), StoreError> {
        let Some(old) = self.get_object(kind, id)? else {
            return Err(StoreError::NotFound {
                kind,
                id: id.to_string(),
            });
        };
        check_version(id, expect_version, old.version())?;
        if matches!(kind, Kind::Secret | Kind::Config) {
            let users = self.users_of(kind, id)?;
            if !users.is_empty() {
                return Err(StoreError::Invalid {
                    kind,
                    reason: format!("{kind} {id} is in use by service {}", users.join(", ")),
                });
            }
        }
        self.unindex(&old);
        // A task's addresses and a service's virtual IPs are free again once it is gone.
        let held = match &old {
            Object::Task(t) => t.networks.clone(),
            Object::Service(s) => s.virtual_ips.clone(),
            Object::Node(n) => n.networks.clone(),
            _ => Vec::new(),
        };
        for a in &held {
            self.free_address(a);
        }
        self.del(TreeId::of(kind), id.as_bytes().to_vec());
        self.events.push(Event {
            version: log_index,
            action: Action::Delete,
            object: old,
            time_ms: now_ms,
        });
        Ok(())
    }

    /// Claims `name` in the unique-name index `names` for object `id` of `kind` (moving it
    /// from `old_name` on a rename).
    fn claim_name(
        &mut self,
        names: TreeId,
        kind: Kind,
        name: &str,
        old_name: Option<&str>,
        id: &str,
    ) -> Result<(), StoreError> {
        if name.is_empty() || name.contains('\0') {
            return Err(StoreError::Invalid {
                kind,
                reason: format!("{kind} name must be non-empty and hold no NUL"),
            });
        }
        if let Some(holder) = self.read(names, name.as_bytes())? {
            if holder != id.as_bytes() {
                return Err(StoreError::NameTaken {
                    kind,
                    name: name.to_string(),
                    existing_id: String::from_utf8_lossy(&holder).into_owned(),
                });
            }
        }
        if let Some(old_name) = old_name.filter(|o| *o != name) {
            self.del(names, old_name.as_bytes().to_vec());
        }
        self.put(names, name.as_bytes().to_vec(), id.as_bytes().to_vec());
        Ok(())
    }

    /// The values of tree `t` as this command sees them (the store under the batch's and this
    /// command's writes), ordered by key.
    fn all(&self, t: TreeId) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut all: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for kv in self.batch.store.tree(t).iter() {
            let (k, v) = kv?;
            all.insert(k.to_vec(), v.to_vec());
        }
        for writes in [&self.batch.writes, &self.writes] {
            for ((wt, k), v) in writes.range((t, Vec::new())..) {
                if *wt != t {
                    break;
                }
                match v {
                    Some(v) => all.insert(k.clone(), v.clone()),
                    None => all.remove(k),
                };
            }
        }
        Ok(all.into_values().collect())
    }

    /// Every network as this command sees it.
    fn networks(&self) -> Result<Vec<Network>, StoreError> {
        self.all(TreeId::Networks)?
            .iter()
            .map(|v| match decode(Kind::Network, v)? {
                Object::Network(n) => Ok(n),
                _ => Err(StoreError::Storage(
                    "a non-network in the networks tree".into(),
                )),
            })
            .collect()
    }

    /// The names of the services whose containers use secret (or config) `id`.
    fn users_of(&self, kind: Kind, id: &str) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for v in self.all(TreeId::Services)? {
            let Object::Service(s) = decode(Kind::Service, &v)? else {
                continue;
            };
            if file_refs(&s, kind).iter().any(|r| r.id == id) {
                names.push(service_name(&s).to_string());
            }
        }
        Ok(names)
    }

    /// Every secret and config a service's containers use exists.
    fn check_file_refs(&self, s: &Service) -> Result<(), StoreError> {
        for kind in [Kind::Secret, Kind::Config] {
            for r in file_refs(s, kind) {
                if self.read(TreeId::of(kind), r.id.as_bytes())?.is_none() {
                    return Err(StoreError::Invalid {
                        kind: Kind::Service,
                        reason: format!("{kind} {} not found", r.name),
                    });
                }
            }
        }
        Ok(())
    }

    /// A network's subnet is a valid IPv4 CIDR overlapping no other network's, and its VNI is
    /// its own.
    fn check_network(&self, n: &Network) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::Invalid {
            kind: Kind::Network,
            reason,
        };
        let mine = parse_cidr(&n.subnet)
            .ok_or_else(|| invalid(format!("subnet {:?} is not an IPv4 CIDR", n.subnet)))?;
        if n.vni == 0 || n.vni > MAX_VNI {
            return Err(invalid(format!("VNI {} is not 1-{MAX_VNI}", n.vni)));
        }
        let id = n.meta.as_ref().map_or("", |m| m.id.as_str());
        for other in self.networks()? {
            if other.meta.as_ref().map_or("", |m| m.id.as_str()) == id {
                continue;
            }
            let name = other.spec.as_ref().map_or("", |s| s.name.as_str());
            if parse_cidr(&other.subnet).is_some_and(|o| overlaps(mine, o)) {
                return Err(invalid(format!(
                    "subnet {} overlaps network {name}'s {}",
                    n.subnet, other.subnet
                )));
            }
            if other.vni == n.vni {
                return Err(invalid(format!(
                    "VNI {} is network {name}'s already",
                    n.vni
                )));
            }
        }
        Ok(())
    }

    /// Gives each network attachment of a task, and each virtual IP of a service, an address
    /// of its own and the network's facts (VNI, gateway, name): an attachment the old object
    /// had keeps its address; a new one gets the lowest free host address of the network's
    /// subnet. Deterministic (ordered scan of the store), so every manager allocates the same;
    /// never two holders of one address. A service's virtual IPs follow its spec's networks
    /// (none in endpoint mode dnsrr); those it no longer needs are freed.
    fn attach_networks(
        &mut self,
        old: Option<&Object>,
        new: &mut Object,
    ) -> Result<(), StoreError> {
        let (kind, id, old, atts): (
            Kind,
            String,
            Vec<NetworkAttachment>,
            &mut Vec<NetworkAttachment>,
        ) = match new {
            Object::Task(t) => (
                Kind::Task,
                t.meta.as_ref().map_or(String::new(), |m| m.id.clone()),
                match old {
                    Some(Object::Task(o)) => o.networks.clone(),
                    _ => Vec::new(),
                },
                &mut t.networks,
            ),
            Object::Service(s) => {
                let spec = s.spec.clone().unwrap_or_default();
                let wanted: Vec<String> = if spec.endpoint_mode == "dnsrr" {
                    Vec::new()
                } else {
                    spec.task
                        .map(|t| t.networks)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|n| n != "host" && n != "none")
                        .collect()
                };
                let old = match old {
                    Some(Object::Service(o)) => o.virtual_ips.clone(),
                    _ => Vec::new(),
                };
                s.virtual_ips = wanted
                    .into_iter()
                    .map(|network_id| NetworkAttachment {
                        network_id,
                        ..Default::default()
                    })
                    .collect();
                (
                    Kind::Service,
                    s.meta.as_ref().map_or(String::new(), |m| m.id.clone()),
                    old,
                    &mut s.virtual_ips,
                )
            }
            Object::Node(n) => {
                // Every node is on the ingress network, once there is one.
                let ingress = self
                    .read(TreeId::Networks, INGRESS_NETWORK.as_bytes())?
                    .is_some();
                let old = match old {
                    Some(Object::Node(o)) => o.networks.clone(),
                    _ => Vec::new(),
                };
                if ingress && n.networks.is_empty() {
                    n.networks = vec![NetworkAttachment {
                        network_id: INGRESS_NETWORK.into(),
                        ..Default::default()
                    }];
                }
                (
                    Kind::Node,
                    n.meta.as_ref().map_or(String::new(), |m| m.id.clone()),
                    old,
                    &mut n.networks,
                )
            }
            _ => return Ok(()),
        };
        if atts.is_empty() && old.is_empty() {
            return Ok(());
        }
        let keep = |a: &NetworkAttachment| {
            old.iter()
                .find(|o| o.network_id == a.network_id && !o.address.is_empty())
                .cloned()
        };
        if atts.iter().all(|a| keep(a).as_ref() == Some(a)) && atts.len() == old.len() {
            return Ok(());
        }
        let invalid = |reason: String| StoreError::Invalid { kind, reason };
        let mut atts_new = std::mem::take(atts);
        for a in atts_new.iter_mut() {
            if let Some(o) = keep(a) {
                *a = o;
                continue;
            }
            let Some(Object::Network(net)) = self.get_object(Kind::Network, &a.network_id)? else {
                return Err(invalid(format!("network {} not found", a.network_id)));
            };
            let (base, prefix) = parse_cidr(&net.subnet)
                .ok_or_else(|| invalid(format!("network {} has no subnet", a.network_id)))?;
            let gateway: Option<std::net::Ipv4Addr> = net.gateway.parse().ok();
            let wanted: Option<std::net::Ipv4Addr> = a
                .address
                .split('/')
                .next()
                .filter(|s| !s.is_empty())
                .map(|s| s.parse())
                .transpose()
                .map_err(|_| invalid(format!("invalid address {:?}", a.address)))?;
            let last = base | !(u32::MAX << (32 - prefix));
            let free = |s: &Self, ip: std::net::Ipv4Addr| -> Result<bool, StoreError> {
                Ok(
                    match s.read(
                        TreeId::NetworkAddrs,
                        &index_key(&a.network_id, &ip.to_string()),
                    )? {
                        None => true,
                        Some(holder) => holder == id.as_bytes(),
                    },
                )
            };
            let ip = match wanted {
                Some(ip) => {
                    let n = u32::from(ip);
                    if n <= base || n >= last || Some(ip) == gateway || !free(self, ip)? {
                        return Err(invalid(format!(
                            "address {ip} is not free in network {}",
                            a.network_id
                        )));
                    }
                    ip
                }
                None => {
                    let mut found = None;
                    for n in base + 1..last {
                        let ip = std::net::Ipv4Addr::from(n);
                        if Some(ip) != gateway && free(self, ip)? {
                            found = Some(ip);
                            break;
                        }
                    }
                    found.ok_or_else(|| {
                        invalid(format!("no free address left in network {}", a.network_id))
                    })?
                }
            };
            self.put(
                TreeId::NetworkAddrs,
                index_key(&a.network_id, &ip.to_string()),
                id.as_bytes().to_vec(),
            );
            let spec = net.spec.clone().unwrap_or_default();
            a.address = format!("{ip}/{prefix}");
            a.vni = net.vni;
            a.gateway = net.gateway.clone();
            a.network_name = spec.name;
            a.internal = spec.internal;
        }
        // Addresses of networks the object left are free again.
        for o in old
            .iter()
            .filter(|o| !atts_new.iter().any(|a| a.network_id == o.network_id))
        {
            self.free_address(o);
        }
        *atts = atts_new;
        Ok(())
    }

    fn free_address(&mut self, a: &NetworkAttachment) {
        if let Some(ip) = a.address.split('/').next().filter(|s| !s.is_empty()) {
            self.del(TreeId::NetworkAddrs, index_key(&a.network_id, ip));
        }
    }

    /// Moves the index entries of an object from `old` (none for a create) to `new`.
    fn index(&mut self, old: Option<&Object>, new: &Object) -> Result<(), StoreError> {
        match new {
            Object::Secret(x) => {
                let old_name = match old {
                    Some(Object::Secret(o)) => o.spec.as_ref().map(|s| s.name.as_str()),
                    _ => None,
                };
                let name = x.spec.as_ref().map_or("", |s| s.name.as_str());
                self.claim_name(TreeId::SecretNames, Kind::Secret, name, old_name, new.id())?;
            }
            Object::Config(x) => {
                let old_name = match old {
                    Some(Object::Config(o)) => o.spec.as_ref().map(|s| s.name.as_str()),
                    _ => None,
                };
                let name = x.spec.as_ref().map_or("", |s| s.name.as_str());
                self.claim_name(TreeId::ConfigNames, Kind::Config, name, old_name, new.id())?;
            }
            Object::Service(s) => {
                self.check_file_refs(s)?;
                let old_name = match old {
                    Some(Object::Service(o)) => Some(service_name(o)),
                    _ => None,
                };
                self.claim_name(
                    TreeId::ServiceNames,
                    Kind::Service,
                    service_name(s),
                    old_name,
                    new.id(),
                )?;
            }
            Object::Network(n) => {
                self.check_network(n)?;
                let old_name = match old {
                    Some(Object::Network(o)) => Some(network_name(o)),
                    _ => None,
                };
                self.claim_name(
                    TreeId::NetworkNames,
                    Kind::Network,
                    network_name(n),
                    old_name,
                    new.id(),
                )?;
            }
            Object::Task(t) => {
                for v in [&t.service_id, &t.node_id] {
                    if v.contains('\0') {
                        return Err(StoreError::Invalid {
                            kind: Kind::Task,
                            reason: "service_id and node_id must hold no NUL".into(),
                        });
                    }
                }
                if let Some(Object::Task(o)) = old {
                    if o.service_id == t.service_id && o.node_id == t.node_id {
                        // Same index entries (most updates: status reports): nothing to move.
                        return Ok(());
                    }
                }
                if let Some(old) = old {
                    self.unindex(old);
                }
                let id = new.id();
                if !t.service_id.is_empty() {
                    self.put(
                        TreeId::TasksByService,
                        index_key(&t.service_id, id),
                        Vec::new(),
                    );
                }
                if !t.node_id.is_empty() {
                    self.put(TreeId::TasksByNode, index_key(&t.node_id, id), Vec::new());
                }
            }
            Object::Node(_) | Object::Cluster(_) => {}
        }
        Ok(())
    }

    /// Removes the index entries of `old` (services: only by `delete`; an update re-checks the
    /// name in `index`).
    fn unindex(&mut self, old: &Object) {
        match old {
            Object::Secret(x) => {
                let name = x.spec.as_ref().map_or("", |s| s.name.as_str());
                self.del(TreeId::SecretNames, name.as_bytes().to_vec());
            }
            Object::Config(x) => {
                let name = x.spec.as_ref().map_or("", |s| s.name.as_str());
                self.del(TreeId::ConfigNames, name.as_bytes().to_vec());
            }
            Object::Service(s) => {
                self.del(TreeId::ServiceNames, service_name(s).as_bytes().to_vec());
            }
            Object::Network(n) => {
                self.del(TreeId::NetworkNames, network_name(n).as_bytes().to_vec());
            }
            Object::Task(t) => {
                let id = old.id();
                if !t.service_id.is_empty() {
                    self.del(TreeId::TasksByService, index_key(&t.service_id, id));
                }

                if !t.node_id.is_empty() {
                    self.del(TreeId::TasksByNode, index_key(&t.node_id, id));
                }
            }
            Object::Node(_) | Object::Cluster(_) => {}
        }
    }
}

/// The secret (or config) references of a service's containers.
pub fn file_refs(s: &Service, kind: Kind) -> &[FileReference] {
    let Some(c) = s
        .spec
        .as_ref()
        .and_then(|sp| sp.task.as_ref())
        .and_then(|t| t.container.as_ref())
    else {
        return &[];
    };
    match kind {
        Kind::Secret => &c.secrets,
        Kind::Config => &c.configs,
        _ => &[],
    }
}

fn service_name(s: &Service) -> &str {
    s.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("")
}

fn network_name(n: &Network) -> &str {
    n.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("")
}

/// The id (and name) of the routing mesh's network.
pub const INGRESS_NETWORK: &str = "ingress";

/// The largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// `a.b.c.d/n` as (network address, prefix), host bits cleared.
pub fn parse_cidr(s: &str) -> Option<(u32, u8)> {
    let (a, p) = s.split_once('/')?;
    let addr: std::net::Ipv4Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok().filter(|p| *p <= 32)?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Some((u32::from(addr) & mask, prefix))
}

/// Whether two subnets share an address.
pub fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let p = a.1.min(b.1);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    a.0 & mask == b.0 & mask
}

fn check_id(kind: Kind, id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.contains('\0') {
        return Err(StoreError::Invalid {
            kind,
            reason: "meta.id must be non-empty and hold no NUL".into(),
        });
    }
    Ok(())
}

/// A service written with `spec_version` 0 has a new spec: it records the version of this
/// write (the proposer cannot know the log index in advance).
fn stamp_spec_version(object: &mut Object, log_index: u64) {
    if let Object::Service(s) = object {
        if s.spec_version == 0 {
            s.spec_version = log_index;
        }
    }
}

fn check_version(id: &str, expect: Option<u64>, actual: u64) -> Result<(), StoreError> {
    match expect {
        Some(expected) if expected != actual => Err(StoreError::VersionConflict {
            id: id.to_string(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Task states only move forward: both the observed state and the desired state. Apply
/// enforces it; proposers can `debug_assert!` it before proposing.
pub fn check_task_forward(old: &Task, new: &Task) -> Result<(), StoreError> {
    let state = |t: &Task| t.status.as_ref().map(|s| s.state).unwrap_or(0);
    for (field, from, to) in [
        ("status.state", state(old), state(new)),
        ("desired_state", old.desired_state, new.desired_state),
    ] {
        if to < from {
            return Err(StoreError::InvalidTransition {
                id: new.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
                field: field.to_string(),
                from: state_name(from),
                to: state_name(to),
            });
        }
    }
    Ok(())
}

fn state_name(v: i32) -> String {
    TaskState::try_from(v)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("unknown state {v}"))
}
