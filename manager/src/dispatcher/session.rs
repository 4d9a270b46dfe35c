//! Sessions: the router fanning store events out to nodes, and each session's assignment
//! stream (full set first, then changes).

use std::collections::HashMap;
use std::sync::Arc;

use shoal_proto::v1 as pb;
use shoal_proto::v1::{Task, TaskState};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::{lock, Backend, Inner, MAX_CHANGES_PER_MESSAGE};
use crate::secrets::Keyring;
use crate::store::{Action, Event, Object, Store, INGRESS_NETWORK};

/// What the router tells one session.
#[derive(Debug)]
pub(super) enum SessionEvent {
    /// A task on this node was created or changed.
    Task(Box<Task>),
    /// A task left this node (deleted, or moved to another node).
    Removed(String),
    /// The router lost events: send the full set again.
    Resync,
    /// A node joined, left or changed: send the peer list again if it changed.
    Peers,
    /// A task on some cluster network changed: send the DNS records again if they changed.
    Records,
    /// The log broker asks the node for lines.
    Logs(Box<pb::LogSubscription>),
}

/// Whether a service port is published through the routing mesh.
fn is_ingress(p: &pb::PortConfig) -> bool {
    p.publish_mode == "ingress" && p.published_port > 0
}

/// The routing mesh as `node` serves it: its own ingress address and, per port published in
/// ingress mode, the service's serving tasks ([`serves`]) on the ingress network. `None` while no service
/// publishes one (no node then keeps an ingress sandbox).
fn ingress(
    store: &Store,
    node: &str,
    services: &[pb::Service],
) -> Result<Option<pb::Ingress>, Status> {
    let services: Vec<&pb::Service> = services
        .iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .is_some_and(|sp| sp.ports.iter().any(is_ingress))
        })
        .collect();
    if services.is_empty() {
        return Ok(None);
    }
    let Some(me) = store
        .get_node(node)
        .map_err(|e| Status::internal(format!("reading the node: {e}")))?
        .and_then(|n| {
            n.networks
                .into_iter()
                .find(|a| a.network_id == INGRESS_NETWORK)
        })
        .filter(|a| !a.address.is_empty())
    else {
        return Ok(None);
    };
    let mut ports = Vec::new();
    for svc in &services {
        let id = svc.meta.as_ref().map_or("", |m| m.id.as_str());
        let mut targets: Vec<String> = store
            .tasks_by_service(id)
            .map_err(|e| Status::internal(format!("reading the tasks: {e}")))?
            .into_iter()
            .filter(serves)
            .filter_map(|t| {
                t.networks
                    .into_iter()
                    .find(|a| a.network_id == INGRESS_NETWORK)
                    .and_then(|a| a.address.split('/').next().map(str::to_string))
            })
            .collect();
        targets.sort();
        for p in svc
            .spec
            .as_ref()
            .map_or(&[][..], |s| &s.ports[..])
            .iter()
            .filter(|p| is_ingress(p))
        {
            ports.push(pb::IngressPort {
                published_port: p.published_port,
                protocol: if p.protocol.is_empty() {
                    "tcp".into()
                } else {
                    p.protocol.clone()
                },
                target_port: p.target_port,
                targets: targets.clone(),
            });
        }
    }
    ports.sort_by_key(|p| (p.published_port, p.protocol.clone()));
    Ok(Some(pb::Ingress {
        node: Some(me),
        ports,
    }))
}

/// A task service discovery and the routing mesh send traffic to: desired and reported
/// RUNNING and, when it has a health check, neither starting nor unhealthy (docker keeps such
/// a task STARTING, out of its balancer, until it is healthy).
pub fn serves(t: &pb::Task) -> bool {
    let running = TaskState::Running as i32;
    t.desired_state == running
        && t.status.as_ref().is_some_and(|s| {
            s.state == running
                && s.health != pb::HealthState::Starting as i32
                && s.health != pb::HealthState::Unhealthy as i32
        })
}

/// The DNS records of `node`: per network its tasks are on, every service's serving tasks'
/// addresses there. O(tasks) per call; only changes of networked tasks trigger one.
fn records(store: &Store, node: &str) -> Result<pb::ServiceRecords, Status> {
    let mine: std::collections::BTreeSet<String> = store
        .tasks_by_node(node)
        .map_err(|e| Status::internal(format!("reading the node's tasks: {e}")))?
        .iter()
        .flat_map(|t| t.networks.iter().map(|a| a.network_id.clone()))
        .collect();
    // Read once: the mesh and the virtual IPs both come from the services.
    let services = store
        .list_services()
        .map_err(|e| Status::internal(format!("reading the services: {e}")))?;
    let ingress = ingress(store, node, &services)?;
    if mine.is_empty() {
        return Ok(pb::ServiceRecords {
            services: Vec::new(),
            ingress,
        });
    }
    let mut by: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for t in store
        .list_tasks()
        .map_err(|e| Status::internal(format!("reading the tasks: {e}")))?
    {
        if t.networks.is_empty() {
            continue;
        }
        let up = serves(&t);
        // The task's own name, as docker's DNS answers it: SERVICE.SLOT.ID (global: the node).
        let task_name = {
            let id = t.meta.as_ref().map_or("", |m| m.id.as_str());
            match t.slot {
                0 => format!("{}.{}.{}", t.service_name, t.node_id, id),
                slot => format!("{}.{slot}.{id}", t.service_name),
            }
        };
        for a in t.networks.iter().filter(|a| mine.contains(&a.network_id)) {
            let entry = by
                .entry((a.network_id.clone(), t.service_name.clone()))
                .or_default();
            if let (true, Some(ip)) = (up, a.address.split('/').next().filter(|s| !s.is_empty())) {
                entry.push(ip.to_string());
                // A standalone container answers to its name (its "service") and its aliases.
                let names: Vec<String> = if t.network_attachment {
                    t.spec
                        .as_ref()
                        .map(|s| &s.network_aliases[..])
                        .unwrap_or_default()
                        .iter()
                        .filter(|al| al.network == a.network_id)
                        .flat_map(|al| al.aliases.iter().cloned())
                        .collect()
                } else {
                    vec![task_name.clone()]
                };
                for n in names {
                    by.entry((a.network_id.clone(), n))
                        .or_default()
                        .push(ip.to_string());
                }
            }
        }
    }
    // Virtual IPs: services in endpoint mode vip, on the networks that matter here.
    let mut vips: std::collections::BTreeMap<(String, String), String> = Default::default();
    for svc in &services {
        let name = svc.spec.as_ref().map_or(String::new(), |s| s.name.clone());
        for v in svc
            .virtual_ips
            .iter()
            .filter(|v| mine.contains(&v.network_id))
        {
            if let Some(ip) = v.address.split('/').next().filter(|s| !s.is_empty()) {
                vips.insert((v.network_id.clone(), name.clone()), ip.to_string());
                by.entry((v.network_id.clone(), name.clone())).or_default();
            }
        }
    }
    // Network aliases answer as their service does, on that network only.
    for svc in &services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let aliases = spec
            .task
            .as_ref()
            .map_or(&[][..], |t| &t.network_aliases[..]);
        for a in aliases.iter().filter(|a| mine.contains(&a.network)) {
            let key = (a.network.clone(), spec.name.clone());
            let addresses = by.get(&key).cloned().unwrap_or_default();
            let vip = vips.get(&key).cloned();
            for alias in a.aliases.iter().filter(|al| **al != spec.name) {
                let k = (a.network.clone(), alias.clone());
                by.entry(k.clone())
                    .or_default()
                    .extend(addresses.iter().cloned());
                if let Some(v) = &vip {
                    vips.insert(k, v.clone());
                }
            }
        }
    }
    Ok(pb::ServiceRecords {
        ingress,
        services: by
            .into_iter()
            .map(|(key, mut addresses)| {
                addresses.sort();
                pb::ServiceRecord {
                    vip: vips.get(&key).cloned().unwrap_or_default(),
                    network_id: key.0,
                    service_name: key.1,
                    addresses,
                }
            })
            .collect(),
    })
}

/// The IP of a node's recorded address (`NodeStatus.addr`: an IP, or IP:port).
pub(crate) fn node_ip(addr: &str) -> Option<std::net::IpAddr> {
    addr.parse::<std::net::SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| addr.parse::<std::net::IpAddr>())
        .ok()
}

/// Hands `event()` to every session.
fn send_all<B: Backend>(inner: &Inner<B>, event: impl Fn() -> SessionEvent) {
    let nodes: Vec<String> = lock(&inner.sessions).keys().cloned().collect();
    for node in nodes {
        send(inner, &node, event());
    }
}

/// The underlay addresses (IPs, no ports) of every node but `me`, sorted.
pub(crate) fn peers(store: &Store, me: &str) -> Result<Vec<String>, Status> {
    let mut out: Vec<String> = store
        .list_nodes()
        .map_err(|e| Status::internal(format!("reading the nodes: {e}")))?
        .into_iter()
        .filter(|n| n.meta.as_ref().is_some_and(|m| m.id != me))
        .filter_map(|n| n.status.and_then(|s| node_ip(&s.addr)))
        .map(|ip| ip.to_string())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

fn task_id(t: &Task) -> &str {
    t.meta.as_ref().map_or("", |m| m.id.as_str())
}

/// Whether the agent of `t.node_id` should hold `t`: the scheduler (or the agent) has moved
/// it to ASSIGNED or later.
fn assigned(t: &Task) -> bool {
    !t.node_id.is_empty() && t.status.as_ref().map_or(0, |s| s.state) >= TaskState::Assigned as i32
}

/// Reads every store event and hands task events to the session of the node concerned.
pub(super) async fn route<B: Backend>(inner: Arc<Inner<B>>, mut watch: broadcast::Receiver<Event>) {
    // task id → node it was last routed to, so a task moving away is removed from the old one.
    let mut placed: HashMap<String, String> = HashMap::new();
    // node id → its underlay address as last seen: a node's other changes (labels, heartbeat
    // status) leave every node's peers as they are, and reading them costs each session a
    // read of every node.
    let mut underlays: HashMap<String, Option<std::net::IpAddr>> = HashMap::new();
    loop {
        let ev = match watch.recv().await {
            Ok(ev) => ev,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!("dispatcher fell {n} store events behind: resyncing every session");
                placed.clear();
                underlays.clear();
                let sessions = lock(&inner.sessions);
                for s in sessions.values() {
                    let _ = s.events.try_send(SessionEvent::Resync);
                }
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match (ev.action, ev.object) {
            (Action::Delete, Object::Task(t)) => {
                if !t.networks.is_empty() {
                    // Service discovery on its networks may have changed for every node.
                    send_all(&inner, || SessionEvent::Records);
                }
                let id = task_id(&t).to_string();
                let node = placed.remove(&id).unwrap_or_else(|| t.node_id.clone());
                send(&inner, &node, SessionEvent::Removed(id));
            }
            (_, Object::Task(t)) => {
                if !t.networks.is_empty() {
                    // Service discovery on its networks may have changed for every node.
                    send_all(&inner, || SessionEvent::Records);
                }
                let id = task_id(&t).to_string();
                if let Some(old) = placed.get(&id) {
                    if *old != t.node_id {
                        send(&inner, old, SessionEvent::Removed(id.clone()));
                    }
                }
                if !assigned(&t) {
                    placed.remove(&id);
                    continue;
                }
                let node = t.node_id.clone();
                placed.insert(id, node.clone());
                send(&inner, &node, SessionEvent::Task(Box::new(t)));
            }
            (_, Object::Service(svc))
                if !svc.virtual_ips.is_empty()
                    || svc
                        .spec
                        .as_ref()
                        .is_some_and(|s| s.ports.iter().any(is_ingress)) =>
            {
                // A virtual IP came, went or moved: every node's records may follow.
                send_all(&inner, || SessionEvent::Records);
            }
            (action, Object::Node(n)) => {
                let id = n.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                let changed = if action == Action::Delete {
                    // A removed node's session ends; its certificate is refused from now on.
                    lock(&inner.sessions).remove(&id);
                    lock(&inner.deadlines).remove(&id);
                    underlays.remove(&id);
                    true
                } else {
                    let ip = n.status.as_ref().and_then(|s| node_ip(&s.addr));
                    underlays.insert(id, ip) != Some(ip)
                };
                if changed {
                    // Every node's overlay forwarding follows the nodes' addresses.
                    send_all(&inner, || SessionEvent::Peers);
                }
            }
            _ => {}
        }
    }
}

fn send<B: Backend>(inner: &Inner<B>, node: &str, ev: SessionEvent) {
    if node.is_empty() {
        return;
    }
    let mut sessions = lock(&inner.sessions);
    let Some(s) = sessions.get(node) else {
        return;
    };
    match s.events.try_send(ev) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            // The session cannot keep up: end it; the agent reconnects and gets the full set.
            tracing::warn!(node_id = %node, "session fell behind: closing it");
            sessions.remove(node);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            sessions.remove(node);
        }
    }
}

/// What the agent was told about one task: a change of either is sent again.
#[derive(PartialEq, Eq)]
struct Sent {
    desired_state: i32,
    spec_version: u64,
}

fn sent_of(t: &Task) -> Sent {
    Sent {
        desired_state: t.desired_state,
        spec_version: t.spec_version,
    }
}

/// Whether a task on the node may still start a container, so needs its secrets and configs:
/// desired to run and not yet past RUNNING.
fn needs_files(t: &Task) -> bool {
    let running = TaskState::Running as i32;
    t.desired_state <= running && t.status.as_ref().map_or(0, |s| s.state) <= running
}

/// Whether a task's containers get secret or config files.
fn uses_files(t: &Task) -> bool {
    t.spec
        .as_ref()
        .and_then(|s| s.container.as_ref())
        .is_some_and(|c| !c.secrets.is_empty() || !c.configs.is_empty())
}

/// The ids of the secrets and of the configs `node`'s tasks use, sorted: what the node
/// should hold.
type Needed = (Vec<String>, Vec<String>);

fn read_err(e: crate::store::StoreError) -> Status {
    Status::internal(format!("reading the store: {e}"))
}

fn needed(store: &Store, node: &str) -> Result<Needed, Status> {
    let mut secrets = std::collections::BTreeSet::new();
    let mut configs = std::collections::BTreeSet::new();
    for t in store.tasks_by_node(node).map_err(read_err)? {
        if !assigned(&t) || !needs_files(&t) {
            continue;
        }
        if let Some(c) = t.spec.as_ref().and_then(|s| s.container.as_ref()) {
            secrets.extend(c.secrets.iter().map(|r| r.id.clone()));
            configs.extend(c.configs.iter().map(|r| r.id.clone()));
        }
    }
    Ok((secrets.into_iter().collect(), configs.into_iter().collect()))
}

/// The secrets (opened) and configs of `needed`, and no others. A secret that does not open
/// (no key, or a key that does not match) is left out and logged by id: the task then fails
/// to start with a clear message on the node.
fn dependencies(
    store: &Store,
    keys: Option<&Keyring>,
    needed: &Needed,
) -> Result<pb::Dependencies, Status> {
    let mut out = pb::Dependencies::default();
    for id in &needed.0 {
        let Some(mut s) = store.get_secret(id).map_err(read_err)? else {
            continue;
        };
        let Some(spec) = s.spec.as_mut() else {
            continue;
        };
        match keys.map(|k| k.open(id, &spec.data)) {
            Some(Ok(plain)) => spec.data = plain,
            Some(Err(e)) => {
                tracing::error!(secret_id = %id, "secret not sent: {e}");
                continue;
            }
            None => {
                tracing::error!(secret_id = %id, "secret not sent: this manager has no secrets key");
                continue;
            }
        }
        out.secrets.push(s);
    }
    for id in &needed.1 {
        if let Some(c) = store.get_config(id).map_err(read_err)? {
            out.configs.push(c);
        }
    }
    Ok(out)
}

/// The full assignment set of `node`, recording it in `sent`.
fn full_set(
    store: &Store,
    keys: Option<&Keyring>,
    node: &str,
    sent: &mut HashMap<String, Sent>,
    sent_deps: &mut Needed,
) -> Result<pb::Assignments, Status> {
    let tasks: Vec<Task> = store
        .tasks_by_node(node)
        .map_err(|e| Status::internal(format!("reading the node's tasks: {e}")))?
        .into_iter()
        .filter(assigned)
        .collect();
    sent.clear();
    for t in &tasks {
        sent.insert(task_id(t).to_string(), sent_of(t));
    }
    Ok(pb::Assignments {
        full: true,
        tasks,
        removed: vec![],
        peers: Some(pb::Peers {
            addrs: peers(store, node)?,
        }),
        records: Some(records(store, node)?),
        dependencies: Some({
            *sent_deps = needed(store, node)?;
            dependencies(store, keys, sent_deps)?
        }),
    })
}

/// Drives one session's stream: the `started` message, the full set, then changes, until the
/// agent goes away or the router drops the session.
pub(super) async fn stream(
    store: Store,
    keys: Option<Arc<Keyring>>,
    node: String,
    started: pb::SessionStarted,
    mut events: mpsc::Receiver<SessionEvent>,
    out: mpsc::Sender<Result<pb::SessionMessage, Status>>,
) {
    use pb::session_message::Kind;
    let msg = |k: Kind| Ok(pb::SessionMessage { kind: Some(k) });
    if out.send(msg(Kind::Started(started))).await.is_err() {
        return;
    }
    let mut sent: HashMap<String, Sent> = HashMap::new();
    let mut sent_deps = Needed::default();
    let first = full_set(&store, keys.as_deref(), &node, &mut sent, &mut sent_deps);
    let mut sent_peers = first
        .as_ref()
        .ok()
        .and_then(|a| a.peers.clone())
        .unwrap_or_default();
    let mut sent_records = first
        .as_ref()
        .ok()
        .and_then(|a| a.records.clone())
        .unwrap_or_default();
    let ok = first.is_ok();
    if out
        .send(first.map(|a| pb::SessionMessage {
            kind: Some(Kind::Assignments(a)),
        }))
        .await
        .is_err()
        || !ok
    {
        return;
    }
    loop {
        let ev = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => ev,
                // The router dropped the session (replaced, removed node, lost leadership).
                None => return,
            },
            _ = out.closed() => return,
        };
        let mut batch = vec![ev];
        while batch.len() < MAX_CHANGES_PER_MESSAGE {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        // Log subscriptions go out at once, apart from the assignments.
        let mut subs = Vec::new();
        batch.retain_mut(|ev| match ev {
            SessionEvent::Logs(sub) => {
                subs.push(std::mem::take(&mut **sub));
                false
            }
            _ => true,
        });
        for sub in subs {
            if out.send(msg(Kind::Logs(sub))).await.is_err() {
                return;
            }
        }
        let mut changes = pb::Assignments::default();
        let mut resync = false;
        let mut records_changed = false;
        // A task of the node came, went or changed state: what it needs may differ.
        let mut deps_changed = false;
        for ev in batch {
            match ev {
                SessionEvent::Resync => resync = true,
                SessionEvent::Logs(_) => {}
                SessionEvent::Records => records_changed = true,
                SessionEvent::Peers => {
                    let now = pb::Peers {
                        addrs: peers(&store, &node).unwrap_or_else(|_| sent_peers.addrs.clone()),
                    };
                    if now != sent_peers {
                        sent_peers = now.clone();
                        changes.peers = Some(now);
                    }
                }
                SessionEvent::Removed(id) => {
                    deps_changed |= !sent_deps.0.is_empty() || !sent_deps.1.is_empty();
                    if sent.remove(&id).is_some() {
                        changes.tasks.retain(|t| task_id(t) != id);
                        changes.removed.push(id);
                    }
                }
                SessionEvent::Task(t) => {
                    if t.node_id != node {
                        continue;
                    }
                    // Also on a status change only (a task past RUNNING needs nothing more);
                    // nodes whose tasks use no secret or config never look.
                    deps_changed |= uses_files(&t);
                    let id = task_id(&t).to_string();
                    let now = sent_of(&t);
                    if sent.get(&id) == Some(&now) {
                        continue;
                    }
                    sent.insert(id.clone(), now);
                    changes.removed.retain(|r| *r != id);
                    changes.tasks.retain(|x| task_id(x) != id);
                    changes.tasks.push(*t);
                }
            }
        }
        if records_changed && !resync {
            // Once per batch of events, however many tasks changed.
            if let Ok(now) = records(&store, &node) {
                if now != sent_records {
                    sent_records = now.clone();
                    changes.records = Some(now);
                }
            }
        }
        if deps_changed && !resync {
            // The secrets and configs the node holds follow its tasks; opened only when the
            // set changed.
            if let Ok(now) = needed(&store, &node) {
                if now != sent_deps {
                    if let Ok(d) = dependencies(&store, keys.as_deref(), &now) {
                        sent_deps = now;
                        changes.dependencies = Some(d);
                    }
                }
            }
        }
        let m = if resync {
            match full_set(&store, keys.as_deref(), &node, &mut sent, &mut sent_deps) {
                Ok(a) => {
                    sent_peers = a.peers.clone().unwrap_or_default();
                    sent_records = a.records.clone().unwrap_or_default();
                    a
                }
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            }
        } else if changes.tasks.is_empty()
            && changes.removed.is_empty()
            && changes.peers.is_none()
            && changes.records.is_none()
            && changes.dependencies.is_none()
        {
            continue;
        } else {
            changes
        };
        if out.send(msg(Kind::Assignments(m))).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(desired: TaskState, state: TaskState, health: pb::HealthState) -> Task {
        Task {
            desired_state: desired as i32,
            status: Some(pb::TaskStatus {
                state: state as i32,
                health: health as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_running_tasks_that_are_not_starting_or_unhealthy_are_served() {
        use pb::HealthState as H;
        use TaskState as S;
        assert!(serves(&task(S::Running, S::Running, H::None)));
        assert!(serves(&task(S::Running, S::Running, H::Healthy)));
        assert!(!serves(&task(S::Running, S::Running, H::Starting)));
        assert!(!serves(&task(S::Running, S::Running, H::Unhealthy)));
        assert!(!serves(&task(S::Shutdown, S::Running, H::Healthy)));
        assert!(!serves(&task(S::Running, S::Starting, H::None)));
    }
}
