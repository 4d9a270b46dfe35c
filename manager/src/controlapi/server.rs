//! The tonic `Control` service: authorisation, forwarding, validation, then the store.

use std::sync::{Arc, RwLock};

use shoal_proto::v1 as pb;
use shoal_proto::v1::control_server::Control;
use shoal_proto::v1::service_spec::Mode;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    images, membership, network, new_id, paging, secrets, store_status, update, validate,
    ControlApi, FORWARDED_HEADER,
};
use crate::ca::{NodeIdentity, Role};
use crate::store::{Action, Event, Kind, Mutation, Object};

/// Where the local socket's control service finds the manager: empty while this node is
/// not a manager.
#[derive(Clone, Default)]
pub struct ApiSlot(Arc<RwLock<Option<ControlApi>>>);

impl ApiSlot {
    /// A slot holding `api`.
    pub fn with(api: ControlApi) -> Self {
        ApiSlot(Arc::new(RwLock::new(Some(api))))
    }

    /// The manager's API, if this node is one now.
    pub fn get(&self) -> Option<ControlApi> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs (or with `None`, removes) the manager's API.
    pub fn set(&self, api: Option<ControlApi>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = api;
    }
}

/// Events buffered per watch stream before the stream is told to resync.
pub const WATCH_STREAM_BUFFER: usize = 1024;

/// The `Control` gRPC service of one manager, as served on one listener.
#[derive(Clone)]
pub struct ControlService {
    api: ApiSlot,
    /// Served on the root-only Unix socket: the caller is the local administrator.
    local: bool,
    /// The local socket's: this node's membership, so that a worker can still ask a manager
    /// for its standalone containers' network attachments (with its own certificate).
    membership: Option<tokio::sync::watch::Receiver<Option<crate::daemon::Membership>>>,
}

impl ControlService {
    /// The service for the manager's TLS port: callers need a manager certificate.
    pub fn tls(api: ControlApi) -> Self {
        ControlService {
            api: ApiSlot::with(api),
            local: false,
            membership: None,
        }
    }

    /// The service for the local Unix socket (whose mode already restricts it to root).
    pub fn local(api: ApiSlot) -> Self {
        ControlService {
            api,
            local: true,
            membership: None,
        }
    }

    /// Lets the local socket of a worker forward network attachments to a manager.
    pub fn with_membership(
        mut self,
        m: tokio::sync::watch::Receiver<Option<crate::daemon::Membership>>,
    ) -> Self {
        self.membership = Some(m);
        self
    }

    /// On a node that is no manager: `call` on the first manager that answers, over mutual
    /// TLS with this node's certificate (the manager acts for this node only).
    async fn as_worker<T, R, F, Fut>(&self, req: T, call: F) -> Result<Response<R>, Status>
    where
        T: Clone,
        F: Fn(pb::control_client::ControlClient<tonic::transport::Channel>, T) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let m = self
            .membership
            .as_ref()
            .and_then(|m| m.borrow().clone())
            .ok_or_else(|| {
                Status::failed_precondition(
                    "this node is in no cluster: only a cluster member can join cluster networks",
                )
            })?;
        let mut last = Status::unavailable("no manager to ask");
        for addr in &m.managers {
            let ch = match m.tls.channel(addr) {
                Ok(ch) => ch,
                Err(e) => {
                    last = Status::unavailable(format!("manager {addr}: {e}"));
                    continue;
                }
            };
            match call(pb::control_client::ControlClient::new(ch), req.clone()).await {
                Err(e) if e.code() == tonic::Code::Unavailable => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    /// Who asks for a network attachment: `None` for the local socket; over TLS any node of
    /// this cluster (a worker for itself, a manager forwarding for any).
    fn authorize_node<T>(
        &self,
        api: &ControlApi,
        req: &Request<T>,
    ) -> Result<Option<NodeIdentity>, Status> {
        if self.local {
            return Ok(None);
        }
        Ok(Some(
            api.authorizer()
                .authorize(req, &[Role::Manager, Role::Worker])?,
        ))
    }

    fn api(&self) -> Result<ControlApi, Status> {
        self.api.get().ok_or_else(|| {
            Status::failed_precondition(
                "this node is not a manager: only managers can show or change the cluster",
            )
        })
    }

    /// The tonic server wrapper with message size limits.
    pub fn into_server(self) -> pb::control_server::ControlServer<ControlService> {
        pb::control_server::ControlServer::new(self)
            .max_decoding_message_size(super::MAX_CONTROL_MESSAGE_BYTES)
            .max_encoding_message_size(super::MAX_CONTROL_MESSAGE_BYTES)
    }

    /// Who is calling: `None` for the local socket; over TLS, a manager of this cluster whose
    /// node is (or is becoming) a manager in the store. A missing certificate, another
    /// cluster's, a worker's, a demoted or a removed node's is refused.
    fn authorize<T>(
        &self,
        api: &ControlApi,
        req: &Request<T>,
    ) -> Result<Option<NodeIdentity>, Status> {
        if self.local {
            return Ok(None);
        }
        let id = api.authorizer().authorize(req, &[Role::Manager])?;
        // A node not recorded here yet (this replica is catching up) passes: the authorizer
        // already refused nodes that were removed.
        if let Some(n) = api.store().get_node(&id.node_id).map_err(store_status)? {
            let manager = pb::NodeRole::Manager as i32;
            if n.role != manager && n.spec.as_ref().is_none_or(|s| s.desired_role != manager) {
                return Err(Status::permission_denied(format!(
                    "node {} is no longer a manager",
                    id.node_id
                )));
            }
        }
        Ok(Some(id))
    }
}

impl ControlApi {
    /// Writes `next` over the service as it was at `version` and returns it as now stored.
    async fn write_service(&self, next: pb::Service, version: u64) -> Result<pb::Service, Status> {
        let id = id_of(next.meta.as_ref()).to_string();
        self.propose(vec![Mutation::Update {
            object: Object::Service(next),
            expect_version: Some(version),
        }])
        .await?;
        self.find_service(&id)
    }

    /// The service as this leader's replica has it, when it is at `version`. Otherwise (or
    /// when it is missing) the replica may only lag behind (a new leader still applying its
    /// predecessor's entries) or this manager may have been deposed: confirm leadership with
    /// a quorum, which also waits until everything committed is applied, and read again, so
    /// that a refusal never comes from a stale replica.
    pub(crate) async fn service_at(&self, key: &str, version: u64) -> Result<pb::Service, Status> {
        self.read_before_write(
            |api| api.find_service(key),
            |s| version_of(s.meta.as_ref()) == version,
        )
        .await
    }

    /// What a write reads before it proposes: `read` from this replica, kept when `fits` (the
    /// write goes ahead and apply checks it again); otherwise, before the caller refuses on
    /// it, leadership is confirmed with a quorum (which also waits until everything committed
    /// is applied) and `read` runs again.
    async fn read_before_write<T>(
        &self,
        read: impl Fn(&ControlApi) -> Result<T, Status>,
        fits: impl Fn(&T) -> bool,
    ) -> Result<T, Status> {
        if let Ok(v) = read(self) {
            if fits(&v) {
                return Ok(v);
            }
        }
        self.linearize().await?;
        read(self)
    }

    pub(crate) fn find_service(&self, key: &str) -> Result<pb::Service, Status> {
        let store = self.store();
        find_by_key(
            "service",
            key,
            |k| store.get_service(k),
            || store.list_services(),
            |s| s.meta.as_ref(),
        )
    }

    /// Refuses a port published through the routing mesh that another service publishes
    /// there already (every node answers on it, so it is the cluster's to give once), and gives
    /// each mesh port without a published port the lowest free one of [`AUTO_INGRESS_PORTS`]
    /// (swarm's range), kept in the spec so that updates keep it.
    fn check_ingress_ports(&self, spec: &mut pb::ServiceSpec) -> Result<(), Status> {
        let mesh = |p: &pb::PortConfig| p.publish_mode.is_empty() || p.publish_mode == "ingress";
        let proto = |p: &pb::PortConfig| {
            if p.protocol.is_empty() {
                "tcp".to_string()
            } else {
                p.protocol.clone()
            }
        };
        let mut taken = std::collections::BTreeSet::new();
        for other in self.store().list_services().map_err(store_status)? {
            let Some(o) = other.spec else { continue };
            if o.name == spec.name {
                continue;
            }
            for q in o.ports.iter().filter(|q| mesh(q) && q.published_port > 0) {
                taken.insert((q.published_port, proto(q)));
            }
            for p in spec
                .ports
                .iter()
                .filter(|p| mesh(p) && p.published_port > 0)
            {
                if taken.contains(&(p.published_port, proto(p))) {
                    return Err(Status::already_exists(format!(
                        "port {}/{} is already published by service {}",
                        p.published_port,
                        proto(p),
                        o.name
                    )));
                }
            }
        }
        for p in spec
            .ports
            .iter()
            .filter(|p| mesh(p) && p.published_port > 0)
        {
            taken.insert((p.published_port, proto(p)));
        }
        for p in spec
            .ports
            .iter_mut()
            .filter(|p| mesh(p) && p.published_port == 0)
        {
            let free = AUTO_INGRESS_PORTS
                .clone()
                .find(|port| !taken.contains(&(*port, proto(p))))
                .ok_or_else(|| {
                    Status::resource_exhausted(format!(
                        "port {}: no free port left in {}-{} to publish it on",
                        p.target_port,
                        AUTO_INGRESS_PORTS.start(),
                        AUTO_INGRESS_PORTS.end()
                    ))
                })?;
            p.published_port = free;
            taken.insert((free, proto(p)));
        }
        Ok(())
    }

    /// Host-mode ports need the node bridge, which a task only on internal networks lacks.
    fn resolve_networks(&self, spec: &mut pb::ServiceSpec) -> Result<(), Status> {
        let mut internal = Vec::new();
        if let Some(task) = spec.task.as_mut() {
            let given = task.networks.clone();
            for n in task.networks.iter_mut() {
                if n != "host" && n != "none" {
                    let net = self.find_network(n)?;
                    let s = net.spec.unwrap_or_default();
                    internal.push(s.internal.then_some(s.name));
                    *n = id_of(net.meta.as_ref()).to_string();
                }
            }
            // Aliases name their network as the networks list does (by name, or already by id).
            for a in task.network_aliases.iter_mut() {
                let at = given
                    .iter()
                    .position(|g| *g == a.network)
                    .or_else(|| task.networks.iter().position(|id| *id == a.network))
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "aliases for network {}, which the service is not on",
                            a.network
                        ))
                    })?;
                a.network = task.networks[at].clone();
            }
        }
        let host_port = spec.ports.iter().find(|p| p.publish_mode == "host");
        if let (Some(p), false, true) = (
            host_port,
            internal.is_empty(),
            internal.iter().all(Option::is_some),
        ) {
            return Err(Status::invalid_argument(format!(
                "port {} is published in host mode, but network {} is internal (no node bridge, no way in or out)",
                p.target_port,
                internal[0].as_deref().unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Names the secrets and configs of a service's containers by id (and their names as
    /// they are now); an unknown one is refused.
    fn resolve_files(&self, spec: &mut pb::ServiceSpec) -> Result<(), Status> {
        let Some(c) = spec.task.as_mut().and_then(|t| t.container.as_mut()) else {
            return Ok(());
        };
        for r in c.secrets.iter_mut() {
            let key = if r.name.is_empty() { &r.id } else { &r.name };
            let s = self.find_secret(key)?;
            r.id = id_of(s.meta.as_ref()).to_string();
            r.name = s.spec.map(|s| s.name).unwrap_or_default();
        }
        for r in c.configs.iter_mut() {
            let key = if r.name.is_empty() { &r.id } else { &r.name };
            let x = self.find_config(key)?;
            r.id = id_of(x.meta.as_ref()).to_string();
            r.name = x.spec.map(|s| s.name).unwrap_or_default();
        }
        Ok(())
    }

    /// A secret by id, unique id prefix or name, its data sealed.
    pub(crate) fn find_secret(&self, key: &str) -> Result<pb::Secret, Status> {
        let store = self.store();
        find_by_key(
            "secret",
            key,
            |k| store.get_secret(k),
            || store.list_secrets(),
            |n| n.meta.as_ref(),
        )
    }

    /// A config by id, unique id prefix or name.
    pub(crate) fn find_config(&self, key: &str) -> Result<pb::Config, Status> {
        let store = self.store();
        find_by_key(
            "config",
            key,
            |k| store.get_config(k),
            || store.list_configs(),
            |n| n.meta.as_ref(),
        )
    }

    /// Removes secret (or config) `name`, refused while a service's containers use it (the
    /// services named); its id.
    async fn remove_unused(
        &self,
        kind: Kind,
        meta: Option<&pb::Meta>,
        name: &str,
    ) -> Result<String, Status> {
        let id = id_of(meta).to_string();
        let users: Vec<String> = self
            .store()
            .list_services()
            .map_err(store_status)?
            .into_iter()
            .filter(|s| crate::store::file_refs(s, kind).iter().any(|r| r.id == id))
            .filter_map(|s| s.spec.map(|s| s.name))
            .collect();
        if !users.is_empty() {
            let what = if kind == Kind::Secret {
                "secret"
            } else {
                "config"
            };
            return Err(Status::failed_precondition(format!(
                "{what} {name} is in use by service {}",
                users.join(", ")
            )));
        }
        self.propose(vec![Mutation::Delete {
            kind,
            id: id.clone(),
            expect_version: Some(version_of(meta)),
        }])
        .await?;
        Ok(id)
    }

    pub(crate) fn find_network(&self, key: &str) -> Result<pb::Network, Status> {
        let store = self.store();
        find_by_key(
            "network",
            key,
            |k| store.get_network(k),
            || store.list_networks(),
            |n| n.meta.as_ref(),
        )
    }

    pub(crate) fn find_node(&self, key: &str) -> Result<pb::Node, Status> {
        let store = self.store();
        let key = if key == "self" { self.node_id() } else { key };
        if key.is_empty() {
            return Err(Status::invalid_argument("no node named"));
        }
        if let Some(n) = store.get_node(key).map_err(store_status)? {
            return Ok(n);
        }
        let nodes = store.list_nodes().map_err(store_status)?;
        let by_id: Vec<&pb::Node> = nodes
            .iter()
            .filter(|n| id_of(n.meta.as_ref()).starts_with(key))
            .collect();
        let by_host: Vec<&pb::Node> = nodes
            .iter()
            .filter(|n| n.description.as_ref().is_some_and(|d| d.hostname == key))
            .collect();
        let found = if by_id.len() == 1 {
            by_id
        } else if by_id.is_empty() {
            by_host
        } else {
            by_id
        };
        match found.len() {
            1 => Ok(found[0].clone()),
            0 => Err(Status::not_found(format!("node {key} not found"))),
            n => Err(Status::invalid_argument(format!(
                "node {key} is ambiguous ({n} matches)"
            ))),
        }
    }

    fn summary(&self, s: pb::Service) -> Result<pb::ServiceSummary, Status> {
        let id = id_of(s.meta.as_ref()).to_string();
        let tasks = self.store().tasks_by_service(&id).map_err(store_status)?;
        let running = pb::TaskState::Running as i32;
        let desired = tasks.iter().filter(|t| t.desired_state == running).count() as u64;
        let up = tasks
            .iter()
            .filter(|t| t.desired_state == running)
            .filter(|t| t.status.as_ref().is_some_and(|st| st.state == running))
            .count() as u64;
        // Docker's count: a replicated service wants its replicas (not every task meant to
        // run: a paused update leaves failed new tasks among them), a global one a task per
        // node it runs on.
        let desired = match &s.spec.as_ref().and_then(|sp| sp.mode) {
            Some(Mode::Replicated(r)) => r.replicas,
            _ => desired,
        };
        Ok(pb::ServiceSummary {
            service: Some(images::redact_service(s)),
            desired_tasks: desired,
            running_tasks: up,
        })
    }
}

/// An object by full id or name (`get`), else by unique id prefix among `list`.
fn find_by_key<T: Default>(
    what: &str,
    key: &str,
    get: impl Fn(&str) -> Result<Option<T>, crate::store::StoreError>,
    list: impl Fn() -> Result<Vec<T>, crate::store::StoreError>,
    meta: impl Fn(&T) -> Option<&pb::Meta>,
) -> Result<T, Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument(format!("no {what} named")));
    }
    if let Some(o) = get(key).map_err(store_status)? {
        return Ok(o);
    }
    let mut matches: Vec<T> = list()
        .map_err(store_status)?
        .into_iter()
        .filter(|o| meta(o).is_some_and(|m| m.id.starts_with(key)))
        .collect();
    match matches.len() {
        1 => Ok(matches.pop().unwrap_or_default()),
        0 => Err(Status::not_found(format!("{what} {key} not found"))),
        n => Err(Status::invalid_argument(format!(
            "{what} {key} is ambiguous ({n} matches)"
        ))),
    }
}

/// A secret as the control API answers with it: never its data.
fn without_data(mut s: pb::Secret) -> pb::Secret {
    if let Some(spec) = s.spec.as_mut() {
        spec.data.clear();
    }
    s
}

/// A node's place in `ListNodes`: by hostname, then id (NUL sorts before any hostname byte).
fn node_key(n: &pb::Node) -> String {
    let host = n.description.as_ref().map_or("", |d| d.hostname.as_str());
    format!("{host}\0{}", id_of(n.meta.as_ref()))
}

fn id_of(m: Option<&pb::Meta>) -> &str {
    m.map(|m| m.id.as_str()).unwrap_or("")
}

fn version_of(m: Option<&pb::Meta>) -> u64 {
    m.map(|m| m.version).unwrap_or(0)
}

/// A request carried on to the leader, marked so it is not forwarded again.
pub(super) fn forwarded<T>(req: Request<T>) -> Request<T> {
    let mut out = Request::new(req.into_inner());
    out.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    out
}

/// Docker's restart delay when the spec gives no restart policy.
pub const DEFAULT_RESTART_DELAY_MS: u64 = 5_000;

/// Fills in what docker fills in when the user gives none: the restart policy (any, 5 s).
/// The image reference is kept as given: the control API cannot see the nodes' image stores,
/// so it pins nothing (a cluster registry will resolve digests).
fn with_defaults(mut spec: pb::ServiceSpec) -> pb::ServiceSpec {
    let task = spec.task.get_or_insert_with(Default::default);
    task.restart.get_or_insert(pb::RestartPolicy {
        condition: pb::RestartCondition::Any as i32,
        delay_ms: DEFAULT_RESTART_DELAY_MS,
        max_attempts: 0,
        window_ms: 0,
    });
    spec
}

/// Whether two specs differ in their replica count at most (scaling keeps the spec version).
fn same_but_replicas(a: &pb::ServiceSpec, b: &pb::ServiceSpec) -> bool {
    use pb::service_spec::Mode;
    let mut b = b.clone();
    if let (Some(Mode::Replicated(ra)), Some(Mode::Replicated(rb))) = (&a.mode, &mut b.mode) {
        rb.replicas = ra.replicas;
    }
    *a == b
}

fn invalid(e: validate::Invalid) -> Status {
    Status::invalid_argument(e.0)
}

/// Forwards the call to the leader when this manager is not it; on the leader, confirms
/// leadership first, for writes too: a write is checked against the local store before it
/// is proposed (the name taken, the service missing, the version read), and a deposed
/// leader that has not heard of its successor yet would refuse from a stale state.
macro_rules! leader_only {
    ($api:ident, $req:ident, $method:ident, read) => {
        if let Some(mut c) = $api.read_route(&$req).await? {
            return c.$method(forwarded($req)).await;
        }
    };
    ($api:ident, $req:ident, $method:ident, write) => {
        if let Some(mut c) = $api.read_route(&$req).await? {
            return c.$method(forwarded($req)).await;
        }
    };
    // A write that confirms leadership only before it refuses (see `service_at`): the
    // proposal itself cannot commit on a deposed leader, so a write that goes ahead needs no
    // quorum round of its own.
    ($api:ident, $req:ident, $method:ident, propose) => {
        if let Some(mut c) = $api.leader_client(&$req).await? {
            return c.$method(forwarded($req)).await;
        }
    };
}

/// Where a port published through the routing mesh without a published port lands (swarm's).
const AUTO_INGRESS_PORTS: std::ops::RangeInclusive<u32> = 30000..=32767;

#[tonic::async_trait]
impl Control for ControlService {
    async fn create_service(
        &self,
        req: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::ServiceResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let mut req = req;
        let spec = req
            .get_mut()
            .spec
            .as_mut()
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        validate::service_spec(spec).map_err(invalid)?;
        update::check_configs(spec).map_err(invalid)?;
        if let Some(c) = spec.task.as_mut().and_then(|t| t.container.as_mut()) {
            secrets::file_refs(c).map_err(invalid)?;
        }
        // Pinned where the request arrived (with this node's registry access), once.
        let warnings = if req.get_ref().no_resolve_image {
            Vec::new()
        } else {
            let spec = req.get_mut().spec.as_mut().expect("checked above");
            images::pin(api.image_resolver(), spec).await
        };
        req.get_mut().no_resolve_image = true;
        if let Some(mut c) = api.leader_client(&req).await? {
            let mut resp = c.create_service(forwarded(req)).await?;
            resp.get_mut().warnings.extend(warnings);
            return Ok(resp);
        }
        let mut spec = req.into_inner().spec.unwrap_or_default();
        api.resolve_networks(&mut spec)?;
        api.resolve_files(&mut spec)?;
        api.check_ingress_ports(&mut spec)?;
        // The name is checked again in apply.
        let taken = api
            .read_before_write(
                |api| {
                    api.store()
                        .service_id_by_name(&spec.name)
                        .map_err(store_status)
                },
                Option::is_none,
            )
            .await?;
        if let Some(id) = taken {
            return Err(Status::already_exists(format!(
                "service name {} is already in use by service {id}",
                spec.name
            )));
        }
        let id = new_id();
        let service = pb::Service {
            meta: Some(pb::Meta {
                id: id.clone(),
                ..Default::default()
            }),
            spec: Some(with_defaults(spec)),
            // The store stamps the version of this write.
            spec_version: 0,
            ..Default::default()
        };
        api.propose(vec![Mutation::Create(Object::Service(service))])
            .await?;
        let service = api.find_service(&id)?;
        Ok(Response::new(pb::ServiceResponse {
            service: Some(images::redact_service(service)),
            warnings,
        }))
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::ServiceResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, get_service, read);
        let service = api.find_service(&req.get_ref().service)?;
        Ok(Response::new(pb::ServiceResponse {
            service: Some(images::redact_service(service)),
            warnings: Vec::new(),
        }))
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, list_services, read);
        let r = req.get_ref();
        let store = api.store();
        let items = store
            .services_after(&r.page_token, &r.name_prefix)
            .map(|s| api.summary(s.map_err(store_status)?));
        let (services, next_page_token) = paging::page(items, r.page_size, |s| {
            s.service
                .as_ref()
                .and_then(|s| s.spec.as_ref())
                .map(|s| s.name.clone())
                .unwrap_or_default()
        })?;
        Ok(Response::new(pb::ListServicesResponse {
            services,
            next_page_token,
        }))
    }

    async fn update_service(
        &self,
        req: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::ServiceResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let mut req = req;
        let spec = req
            .get_mut()
            .spec
            .as_mut()
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        validate::service_spec(spec).map_err(invalid)?;
        update::check_configs(spec).map_err(invalid)?;
        if let Some(c) = spec.task.as_mut().and_then(|t| t.container.as_mut()) {
            secrets::file_refs(c).map_err(invalid)?;
        }
        let warnings = if req.get_ref().no_resolve_image {
            Vec::new()
        } else {
            // Looked up only when the image changed (a scale keeps the pinned one); this
            // node's copy of the service tells, and lends its credentials to the lookup.
            let r = req.get_mut();
            let old = api.find_service(&r.service).ok().and_then(|s| s.spec);
            let spec = r.spec.as_mut().expect("checked above");
            match old {
                Some(old) if images::same_image(&old, spec) => Vec::new(),
                Some(old) => {
                    let mut lookup = spec.clone();
                    images::keep_credentials(&old, &mut lookup);
                    let w = images::pin(api.image_resolver(), &mut lookup).await;
                    images::take_image(spec, &lookup);
                    w
                }
                None => images::pin(api.image_resolver(), spec).await,
            }
        };
        req.get_mut().no_resolve_image = true;
        if let Some(mut c) = api.leader_client(&req).await? {
            let mut resp = c.update_service(forwarded(req)).await?;
            resp.get_mut().warnings.extend(warnings);
            return Ok(resp);
        }
        let mut spec = req.get_ref().spec.clone().unwrap_or_default();
        api.resolve_networks(&mut spec)?;
        api.resolve_files(&mut spec)?;
        api.check_ingress_ports(&mut spec)?;
        let current = api
            .service_at(&req.get_ref().service, req.get_ref().version)
            .await?;
        let version = version_of(current.meta.as_ref());
        let old_spec = current.spec.clone().unwrap_or_default();
        if old_spec.name != spec.name {
            return Err(Status::invalid_argument(
                "renaming a service is not supported",
            ));
        }
        if req.get_ref().version != version {
            return Err(Status::failed_precondition(format!(
                "update out of sequence: service {} is at version {version}, not {}",
                old_spec.name,
                req.get_ref().version
            )));
        }
        images::keep_credentials(&old_spec, &mut spec);
        let spec = with_defaults(spec);
        let mut next = current.clone();
        if !same_but_replicas(&old_spec, &spec) {
            // A new spec: the store stamps this write's version, so tasks made from now on
            // differ from the old ones (rolling updates tell them apart by it).
            next.spec_version = 0;
        } else if next.spec_version == 0 {
            // Written before spec versions were stamped: pin the version the spec had.
            next.spec_version = version;
        }
        next.previous_spec = Some(old_spec);
        next.spec = Some(spec);
        update::on_update(&current, &mut next, super::now_ms());
        let service = api.write_service(next, version).await?;
        Ok(Response::new(pb::ServiceResponse {
            service: Some(images::redact_service(service)),
            warnings,
        }))
    }

    async fn rollback_service(
        &self,
        req: Request<pb::RollbackServiceRequest>,
    ) -> Result<Response<pb::ServiceResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, rollback_service, write);
        let current = api.find_service(&req.get_ref().service)?;
        let version = version_of(current.meta.as_ref());
        let wanted = req.get_ref().version;
        if wanted != 0 && wanted != version {
            return Err(Status::failed_precondition(format!(
                "rollback out of sequence: service is at version {version}, not {wanted}"
            )));
        }
        let next = update::rollback(&current, super::now_ms())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let service = api.write_service(next, version).await?;
        Ok(Response::new(pb::ServiceResponse {
            service: Some(images::redact_service(service)),
            warnings: Vec::new(),
        }))
    }

    async fn remove_service(
        &self,
        req: Request<pb::RemoveServiceRequest>,
    ) -> Result<Response<pb::RemoveServiceResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, remove_service, write);
        let s = api.find_service(&req.get_ref().service)?;
        let id = id_of(s.meta.as_ref()).to_string();
        api.propose(vec![Mutation::Delete {
            kind: Kind::Service,
            id: id.clone(),
            expect_version: Some(version_of(s.meta.as_ref())),
        }])
        .await?;
        Ok(Response::new(pb::RemoveServiceResponse { id }))
    }

    async fn create_secret(
        &self,
        req: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::SecretResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let spec = req
            .get_ref()
            .spec
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        secrets::spec("secret", &spec.name, &spec.data).map_err(invalid)?;
        validate::labels("secret", &spec.labels).map_err(invalid)?;
        leader_only!(api, req, create_secret, propose);
        let mut spec = req.into_inner().spec.unwrap_or_default();
        if let Some(s) = api.store().get_secret(&spec.name).map_err(store_status)? {
            return Err(Status::already_exists(format!(
                "secret name {} is already in use by secret {}",
                spec.name,
                id_of(s.meta.as_ref())
            )));
        }
        let keys = api.secrets().ok_or_else(|| {
            Status::failed_precondition(
                "this cluster has no secrets key (made before secrets existed): secrets cannot be stored",
            )
        })?;
        let id = new_id();
        spec.data = keys
            .seal(&id, &spec.data)
            .map_err(|e| Status::internal(e.to_string()))?;
        let secret = pb::Secret {
            meta: Some(pb::Meta {
                id: id.clone(),
                ..Default::default()
            }),
            spec: Some(spec),
        };
        api.propose(vec![Mutation::Create(Object::Secret(secret))])
            .await?;
        Ok(Response::new(pb::SecretResponse {
            secret: Some(without_data(api.find_secret(&id)?)),
        }))
    }

    async fn get_secret(
        &self,
        req: Request<pb::GetSecretRequest>,
    ) -> Result<Response<pb::SecretResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, get_secret, read);
        let secret = api.find_secret(&req.get_ref().secret)?;
        Ok(Response::new(pb::SecretResponse {
            secret: Some(without_data(secret)),
        }))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, list_secrets, read);
        let r = req.get_ref();
        let items = api
            .store()
            .secrets_after(&r.page_token)
            .map(|s| s.map(without_data).map_err(store_status));
        let (secrets, next_page_token) = paging::page(items, r.page_size, |s| {
            s.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
        })?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets,
            next_page_token,
        }))
    }

    async fn remove_secret(
        &self,
        req: Request<pb::RemoveSecretRequest>,
    ) -> Result<Response<pb::RemoveSecretResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, remove_secret, write);
        let s = api.find_secret(&req.get_ref().secret)?;
        let name = s.spec.as_ref().map_or("", |s| s.name.as_str());
        let id = api
            .remove_unused(Kind::Secret, s.meta.as_ref(), name)
            .await?;
        Ok(Response::new(pb::RemoveSecretResponse { id }))
    }

    async fn create_config(
        &self,
        req: Request<pb::CreateConfigRequest>,
    ) -> Result<Response<pb::ConfigResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let spec = req
            .get_ref()
            .spec
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        secrets::spec("config", &spec.name, &spec.data).map_err(invalid)?;
        validate::labels("config", &spec.labels).map_err(invalid)?;
        leader_only!(api, req, create_config, propose);
        let spec = req.into_inner().spec.unwrap_or_default();
        if let Some(c) = api.store().get_config(&spec.name).map_err(store_status)? {
            return Err(Status::already_exists(format!(
                "config name {} is already in use by config {}",
                spec.name,
                id_of(c.meta.as_ref())
            )));
        }
        let id = new_id();
        let config = pb::Config {
            meta: Some(pb::Meta {
                id: id.clone(),
                ..Default::default()
            }),
            spec: Some(spec),
        };
        api.propose(vec![Mutation::Create(Object::Config(config))])
            .await?;
        let mut c = api.find_config(&id)?;
        if let Some(s) = c.spec.as_mut() {
            s.data.clear();
        }
        Ok(Response::new(pb::ConfigResponse { config: Some(c) }))
    }

    async fn get_config(
        &self,
        req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ConfigResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, get_config, read);
        let config = api.find_config(&req.get_ref().config)?;
        Ok(Response::new(pb::ConfigResponse {
            config: Some(config),
        }))
    }

    async fn list_configs(
        &self,
        req: Request<pb::ListConfigsRequest>,
    ) -> Result<Response<pb::ListConfigsResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, list_configs, read);
        let r = req.get_ref();
        let items = api.store().configs_after(&r.page_token).map(|c| {
            let mut c = c.map_err(store_status)?;
            if let Some(s) = c.spec.as_mut() {
                s.data.clear();
            }
            Ok(c)
        });
        let (configs, next_page_token) = paging::page(items, r.page_size, |c| {
            c.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
        })?;
        Ok(Response::new(pb::ListConfigsResponse {
            configs,
            next_page_token,
        }))
    }

    async fn remove_config(
        &self,
        req: Request<pb::RemoveConfigRequest>,
    ) -> Result<Response<pb::RemoveConfigResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, remove_config, write);
        let c = api.find_config(&req.get_ref().config)?;
        let name = c.spec.as_ref().map_or("", |s| s.name.as_str());
        let id = api
            .remove_unused(Kind::Config, c.meta.as_ref(), name)
            .await?;
        Ok(Response::new(pb::RemoveConfigResponse { id }))
    }

    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::NetworkResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let mut spec = req
            .get_ref()
            .spec
            .clone()
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        network::network_spec(&spec).map_err(invalid)?;
        leader_only!(api, req, create_network, propose);
        let _serial = api.networks_lock().await;
        // Name, subnet and VNI are checked again in apply.
        let existing = api
            .read_before_write(
                |api| api.store().list_networks().map_err(store_status),
                |all| {
                    all.iter()
                        .all(|n| n.spec.as_ref().is_none_or(|s| s.name != spec.name))
                },
            )
            .await?;
        if let Some(n) = existing
            .iter()
            .find(|n| n.spec.as_ref().is_some_and(|s| s.name == spec.name))
        {
            return Err(Status::already_exists(format!(
                "network name {} is already in use by network {}",
                spec.name,
                id_of(n.meta.as_ref())
            )));
        }
        let node_ips: Vec<std::net::Ipv4Addr> = api
            .store()
            .list_nodes()
            .map_err(store_status)?
            .into_iter()
            .filter_map(|n| n.status)
            .filter_map(|st| crate::dispatcher::node_ip(&st.addr))
            .filter_map(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        let vni_start = network::vni_start(api.cluster()?.spec.as_ref());
        let (subnet, gateway, vni) =
            network::allocate(&spec, &existing, &node_ips, vni_start).map_err(invalid)?;
        if spec.driver.is_empty() {
            spec.driver = "overlay".into();
        }
        let id = new_id();
        let network = pb::Network {
            meta: Some(pb::Meta {
                id: id.clone(),
                ..Default::default()
            }),
            spec: Some(spec),
            subnet,
            gateway,
            vni,
        };
        api.propose(vec![Mutation::Create(Object::Network(network))])
            .await?;
        let network = api.find_network(&id)?;
        Ok(Response::new(pb::NetworkResponse {
            network: Some(network),
        }))
    }

    async fn get_network(
        &self,
        req: Request<pb::GetNetworkRequest>,
    ) -> Result<Response<pb::NetworkResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, get_network, read);
        let network = api.find_network(&req.get_ref().network)?;
        Ok(Response::new(pb::NetworkResponse {
            network: Some(network),
        }))
    }

    async fn list_networks(
        &self,
        req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, list_networks, read);
        let r = req.get_ref();
        let items = api
            .store()
            .networks_after(&r.page_token)
            .map(|n| n.map_err(store_status));
        let (networks, next_page_token) = paging::page(items, r.page_size, |n| {
            n.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
        })?;
        Ok(Response::new(pb::ListNetworksResponse {
            networks,
            next_page_token,
        }))
    }

    async fn remove_network(
        &self,
        req: Request<pb::RemoveNetworkRequest>,
    ) -> Result<Response<pb::RemoveNetworkResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, remove_network, write);
        let n = api.find_network(&req.get_ref().network)?;
        let id = id_of(n.meta.as_ref()).to_string();
        let name = n.spec.as_ref().map_or("", |s| s.name.as_str());
        if id == network::INGRESS {
            return Err(Status::failed_precondition(
                "network ingress is the routing mesh's: it cannot be removed",
            ));
        }
        let users: Vec<String> = api
            .store()
            .list_services()
            .map_err(store_status)?
            .into_iter()
            .filter_map(|s| s.spec)
            .filter(|s| {
                s.task
                    .as_ref()
                    .is_some_and(|t| t.networks.iter().any(|n| *n == id || n == name))
            })
            .map(|s| s.name)
            .collect();
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "network {name} is in use by service {}",
                users.join(", ")
            )));
        }
        let containers: Vec<String> = api
            .store()
            .list_tasks()
            .map_err(store_status)?
            .into_iter()
            .filter(|t| t.network_attachment && t.networks.iter().any(|a| a.network_id == id))
            .map(|t| t.service_name)
            .collect();
        if !containers.is_empty() {
            return Err(Status::failed_precondition(format!(
                "network {name} is in use by container {}",
                containers.join(", ")
            )));
        }
        api.propose(vec![Mutation::Delete {
            kind: Kind::Network,
            id: id.clone(),
            expect_version: Some(version_of(n.meta.as_ref())),
        }])
        .await?;
        Ok(Response::new(pb::RemoveNetworkResponse { id }))
    }

    async fn attach_network(
        &self,
        mut req: Request<pb::AttachNetworkRequest>,
    ) -> Result<Response<pb::AttachNetworkResponse>, Status> {
        let api = match self.api() {
            Ok(api) => api,
            Err(_) if self.local => {
                let mut r = req.into_inner();
                r.node.clear();
                return self
                    .as_worker(r, |mut c, r| async move { c.attach_network(r).await })
                    .await;
            }
            Err(e) => return Err(e),
        };
        match self.authorize_node(&api, &req)? {
            // A worker attaches containers on itself only.
            Some(id) if id.role == Role::Worker || req.get_ref().node.is_empty() => {
                req.get_mut().node = id.node_id;
            }
            Some(_) => {}
            // The node whose agent was asked: fixed before the request is forwarded.
            None if req.get_ref().node.is_empty() => {
                req.get_mut().node = api.node_id().to_string();
            }
            None => {}
        }
        let r = req.get_ref().clone();
        validate::service_name(&r.container_name).map_err(|e| {
            invalid(validate::Invalid(
                e.0.replace("service name", "container name"),
            ))
        })?;
        for a in &r.aliases {
            validate::service_name(a).map_err(|e| {
                invalid(validate::Invalid(
                    e.0.replace("service name", "network alias"),
                ))
            })?;
        }
        if r.aliases.len() > validate::MAX_ALIASES {
            return Err(Status::invalid_argument(format!(
                "more than {} network aliases",
                validate::MAX_ALIASES
            )));
        }
        leader_only!(api, req, attach_network, propose);
        let net = api.find_network(&r.network)?;
        let spec = net.spec.clone().unwrap_or_default();
        let net_id = id_of(net.meta.as_ref()).to_string();
        if net_id == network::INGRESS {
            return Err(Status::failed_precondition(
                "network ingress is the routing mesh's: containers cannot join it",
            ));
        }
        if !spec.attachable {
            return Err(Status::failed_precondition(format!(
                "network {} is not attachable: create it with --attachable to run containers on it",
                spec.name
            )));
        }
        let node = api.find_node(&r.node)?;
        let node_id = id_of(node.meta.as_ref()).to_string();
        let id = new_id();
        let task = pb::Task {
            meta: Some(pb::Meta {
                id: id.clone(),
                ..Default::default()
            }),
            node_id: node_id.clone(),
            service_name: r.container_name.clone(),
            desired_state: pb::TaskState::Running as i32,
            status: Some(pb::TaskStatus {
                state: pb::TaskState::Running as i32,
                timestamp_ms: super::now_ms(),
                message: "attached".into(),
                ..Default::default()
            }),
            spec: Some(pb::TaskSpec {
                network_aliases: if r.aliases.is_empty() {
                    Vec::new()
                } else {
                    vec![pb::NetworkAliases {
                        network: net_id.clone(),
                        aliases: r.aliases.clone(),
                    }]
                },
                ..Default::default()
            }),
            networks: vec![pb::NetworkAttachment {
                network_id: net_id,
                ..Default::default()
            }],
            network_attachment: true,
            ..Default::default()
        };
        // The address is given at apply, like a task's.
        api.propose(vec![Mutation::Create(Object::Task(task))])
            .await?;
        let stored = api
            .store()
            .get_task(&id)
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::internal("the attachment is not in the store after its write")
            })?;
        let peers = crate::dispatcher::peers(api.store(), &node_id)?;
        Ok(Response::new(pb::AttachNetworkResponse {
            id,
            attachment: stored.networks.into_iter().next(),
            peers,
        }))
    }

    async fn detach_network(
        &self,
        req: Request<pb::DetachNetworkRequest>,
    ) -> Result<Response<pb::DetachNetworkResponse>, Status> {
        let api = match self.api() {
            Ok(api) => api,
            Err(_) if self.local => {
                return self
                    .as_worker(req.into_inner(), |mut c, r| async move {
                        c.detach_network(r).await
                    })
                    .await;
            }
            Err(e) => return Err(e),
        };
        let caller = self.authorize_node(&api, &req)?;
        leader_only!(api, req, detach_network, write);
        let id = req.get_ref().id.clone();
        let Some(t) = api.store().get_task(&id).map_err(store_status)? else {
            return Ok(Response::new(pb::DetachNetworkResponse {}));
        };
        if !t.network_attachment {
            return Err(Status::invalid_argument(format!(
                "{id} is a service's task, not a network attachment"
            )));
        }
        if let Some(c) = caller.filter(|c| c.role == Role::Worker) {
            if c.node_id != t.node_id {
                return Err(Status::permission_denied(format!(
                    "attachment {id} belongs to another node"
                )));
            }
        }
        api.propose(vec![Mutation::Delete {
            kind: Kind::Task,
            id,
            expect_version: None,
        }])
        .await?;
        Ok(Response::new(pb::DetachNetworkResponse {}))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        // "self" means the node the caller talks to, so resolve it before forwarding.
        let mut req = req;
        if req.get_ref().node == "self" {
            req.get_mut().node = api.node_id().to_string();
        }
        leader_only!(api, req, list_tasks, read);
        let r = req.get_ref();
        let store = api.store();
        let node = if r.node.is_empty() {
            None
        } else {
            Some(id_of(api.find_node(&r.node)?.meta.as_ref()).to_string())
        };
        let after = r.page_token.as_str();
        let tasks: Box<dyn Iterator<Item = Result<pb::Task, crate::store::StoreError>>> =
            match (r.service.is_empty(), &node) {
                (false, _) => {
                    let s = api.find_service(&r.service)?;
                    let sid = id_of(s.meta.as_ref()).to_string();
                    let node = node.clone();
                    Box::new(store.service_tasks_after(&sid, after).filter(move |t| {
                        match (t, &node) {
                            (Ok(t), Some(n)) => t.node_id == *n,
                            _ => true,
                        }
                    }))
                }
                (true, Some(n)) => Box::new(store.node_tasks_after(n, after)),
                (true, None) => Box::new(store.tasks_after(after)),
            };
        let items = tasks.map(|t| t.map(images::redact_task).map_err(store_status));
        let (tasks, next_page_token) =
            paging::page(items, r.page_size, |t| id_of(t.meta.as_ref()).to_string())?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, list_nodes, read);
        let r = req.get_ref();
        // Nodes have no hostname index (a cluster has thousands at most): sorted per page.
        let mut nodes: Vec<(String, pb::Node)> = api
            .store()
            .list_nodes()
            .map_err(store_status)?
            .into_iter()
            .map(|n| (node_key(&n), n))
            .filter(|(k, _)| r.page_token.is_empty() || *k > r.page_token)
            .collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut nodes, next_page_token) =
            paging::page(nodes.into_iter().map(|(_, n)| Ok(n)), r.page_size, node_key)?;
        let health = api.manager_health().await;
        for n in &mut nodes {
            health.fill(n);
        }
        Ok(Response::new(pb::ListNodesResponse {
            nodes,
            next_page_token,
        }))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        // "self" means the node the caller talks to, so resolve it before forwarding.
        let mut req = req;
        if req.get_ref().node == "self" {
            req.get_mut().node = api.node_id().to_string();
        }
        leader_only!(api, req, get_node, read);
        let mut node = api.find_node(&req.get_ref().node)?;
        api.manager_health().await.fill(&mut node);
        Ok(Response::new(pb::NodeResponse { node: Some(node) }))
    }

    async fn update_node(
        &self,
        req: Request<pb::UpdateNodeRequest>,
    ) -> Result<Response<pb::NodeResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let r = req.get_ref();
        for k in r.label_add.keys().chain(r.label_rm.iter()) {
            if k.is_empty() {
                return Err(Status::invalid_argument("label key must not be empty"));
            }
        }
        if let Some(a) = r.availability {
            if pb::NodeAvailability::try_from(a).is_err() {
                return Err(Status::invalid_argument(format!(
                    "invalid availability {a}"
                )));
            }
        }
        leader_only!(api, req, update_node, write);
        let r = req.get_ref();
        let id = id_of(api.find_node(&r.node)?.meta.as_ref()).to_string();
        // A caller that named no version means "whatever is current": the dispatcher writes
        // heartbeats and status on the node too, so a conflict with those is re-read and
        // retried; a caller that named a version gets the conflict.
        let attempts = if r.version == 0 {
            membership::NODE_WRITE_RETRIES
        } else {
            1
        };
        let mut node = api
            .try_change_node(&id, attempts, |next| {
                let version = version_of(next.meta.as_ref());
                if r.version != 0 && r.version != version {
                    return Err(Status::failed_precondition(format!(
                        "update out of sequence: node is at version {version}, not {}",
                        r.version
                    )));
                }
                let spec = next.spec.get_or_insert_with(Default::default);
                if let Some(a) = r.availability {
                    spec.availability = a;
                }
                for k in &r.label_rm {
                    if spec.labels.remove(k).is_none() {
                        return Err(Status::not_found(format!(
                            "label {k} not found on the node"
                        )));
                    }
                }
                spec.labels.extend(r.label_add.clone());
                validate::labels("node", &spec.labels).map_err(invalid)?;
                let bytes = prost::Message::encoded_len(&*spec);
                if bytes > validate::MAX_NODE_SPEC_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "node spec would be {bytes} bytes: at most {} are allowed",
                        validate::MAX_NODE_SPEC_BYTES
                    )));
                }
                Ok(())
            })
            .await?;
        api.manager_health().await.fill(&mut node);
        Ok(Response::new(pb::NodeResponse { node: Some(node) }))
    }

    async fn promote_node(
        &self,
        req: Request<pb::PromoteNodeRequest>,
    ) -> Result<Response<pb::NodeResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, promote_node, write);
        let node = api.find_node(&req.get_ref().node)?;
        let node = api.promote(node).await?;
        Ok(Response::new(pb::NodeResponse { node: Some(node) }))
    }

    async fn demote_node(
        &self,
        req: Request<pb::DemoteNodeRequest>,
    ) -> Result<Response<pb::NodeResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, demote_node, write);
        let node = api.find_node(&req.get_ref().node)?;
        let node = api.demote(node, false).await?;
        Ok(Response::new(pb::NodeResponse { node: Some(node) }))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, remove_node, write);
        let node = api.find_node(&req.get_ref().node)?;
        let id = api.remove_node(node, req.get_ref().force).await?;
        Ok(Response::new(pb::RemoveNodeResponse { id }))
    }

    async fn get_cluster(
        &self,
        req: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::ClusterResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, get_cluster, read);
        api.cluster_response()
    }

    async fn update_cluster(
        &self,
        req: Request<pb::UpdateClusterRequest>,
    ) -> Result<Response<pb::ClusterResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let spec = req
            .get_ref()
            .spec
            .clone()
            .ok_or_else(|| Status::invalid_argument("no spec"))?;
        validate::cluster_spec(&spec).map_err(invalid)?;
        leader_only!(api, req, update_cluster, write);
        let cluster = api.cluster()?;
        let version = version_of(cluster.meta.as_ref());
        let asked = req.get_ref().version;
        if asked != 0 && asked != version {
            return Err(Status::failed_precondition(format!(
                "update out of sequence: cluster is at version {version}, not {asked}"
            )));
        }
        // The networks' VXLAN ids are set at init: the ingress network and every network
        // already made have theirs.
        let mut spec = spec;
        let stored = cluster.spec.as_ref().and_then(|s| s.network);
        match &spec.network {
            None => spec.network = stored,
            Some(n) if Some(n) == stored.as_ref() => {}
            Some(n) if n.vni_start == 0 && stored.is_none() => {}
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the cluster's VNI start is set at cluster init and cannot change",
                ))
            }
        }
        let mut next = cluster;
        next.spec = Some(spec);
        api.propose(vec![Mutation::Update {
            object: Object::Cluster(next),
            expect_version: Some(version),
        }])
        .await?;
        api.cluster_response()
    }

    async fn rotate_join_token(
        &self,
        req: Request<pb::RotateJoinTokenRequest>,
    ) -> Result<Response<pb::ClusterResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let role = pb::NodeRole::try_from(req.get_ref().role)
            .map_err(|_| Status::invalid_argument("role must be worker or manager"))?;
        leader_only!(api, req, rotate_join_token, write);
        let cluster = api.cluster()?;
        let version = version_of(cluster.meta.as_ref());
        let mut tokens =
            crate::ca::JoinTokens::from_proto(&cluster.join_tokens.clone().unwrap_or_default())
                .map_err(|e| Status::internal(format!("stored join tokens: {e}")))?;
        tokens.rotate(Role::from_proto(role));
        let mut next = cluster;
        next.join_tokens = Some(tokens.to_proto());
        api.propose(vec![Mutation::Update {
            object: Object::Cluster(next),
            expect_version: Some(version),
        }])
        .await?;
        api.cluster_response()
    }

    async fn join_manager(
        &self,
        req: Request<pb::JoinManagerRequest>,
    ) -> Result<Response<pb::JoinManagerResponse>, Status> {
        let api = self.api()?;
        let caller = self.authorize(&api, &req)?;
        let r = req.get_ref();
        // A forwarded call comes from a manager that checked its caller already.
        if let Some(id) = caller
            .as_ref()
            .filter(|_| !req.metadata().contains_key(FORWARDED_HEADER))
        {
            if id.node_id != r.node_id {
                return Err(Status::permission_denied(format!(
                    "certificate of node {} cannot join as node {}",
                    id.node_id, r.node_id
                )));
            }
        }
        if r.raft_id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument("raft id and address are required"));
        }
        leader_only!(api, req, join_manager, write);
        let r = req.into_inner();
        api.join_manager(&r.node_id, r.raft_id, &r.addr).await?;
        Ok(Response::new(pb::JoinManagerResponse {}))
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        leader_only!(api, req, register_node, write);
        api.register_node(req.into_inner()).await?;
        Ok(Response::new(pb::RegisterNodeResponse {}))
    }

    async fn leave_manager(
        &self,
        req: Request<pb::LeaveManagerRequest>,
    ) -> Result<Response<pb::LeaveManagerResponse>, Status> {
        let api = self.api()?;
        let caller = self.authorize(&api, &req)?;
        // A forwarded call comes from a manager that checked its caller already.
        if let Some(id) = caller
            .as_ref()
            .filter(|_| !req.metadata().contains_key(FORWARDED_HEADER))
        {
            if id.node_id != req.get_ref().node_id {
                return Err(Status::permission_denied(
                    "a manager can only remove itself",
                ));
            }
        }
        leader_only!(api, req, leave_manager, write);
        let node = api.find_node(&req.get_ref().node_id)?;
        api.demote(node, req.get_ref().force).await?;
        Ok(Response::new(pb::LeaveManagerResponse {}))
    }

    type SubscribeLogsStream = super::logs::LogStream;

    async fn subscribe_logs(
        &self,
        req: Request<pb::SubscribeLogsRequest>,
    ) -> Result<Response<Self::SubscribeLogsStream>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        api.subscribe_logs(req).await
    }

    type WatchStream = ReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let api = self.api()?;
        self.authorize(&api, &req)?;
        let kinds: Vec<Kind> = req
            .get_ref()
            .kinds
            .iter()
            .filter_map(|k| match pb::WatchKind::try_from(*k) {
                Ok(pb::WatchKind::Node) => Some(Kind::Node),
                Ok(pb::WatchKind::Service) => Some(Kind::Service),
                Ok(pb::WatchKind::Task) => Some(Kind::Task),
                Ok(pb::WatchKind::Cluster) => Some(Kind::Cluster),
                Ok(pb::WatchKind::Network) => Some(Kind::Network),
                Ok(pb::WatchKind::Secret) => Some(Kind::Secret),
                Ok(pb::WatchKind::Config) => Some(Kind::Config),
                _ => None,
            })
            .collect();
        let (since, until) = (req.get_ref().since_ms, req.get_ref().until_ms);
        if until > 0 && since > until {
            return Err(Status::invalid_argument(
                "the stream would end before it starts: since is after until",
            ));
        }
        let (past, mut events) = if since > 0 {
            api.store().watch_since(since)
        } else {
            (Vec::new(), api.store().watch())
        };
        let wanted = move |ev: &Event| kinds.is_empty() || kinds.contains(&ev.object.kind());
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_STREAM_BUFFER);
        tokio::spawn(async move {
            for ev in past.into_iter().filter(|e| wanted(e)) {
                if until > 0 && ev.time_ms > until {
                    return;
                }
                if tx.send(Ok(watch_event(ev))).await.is_err() {
                    return;
                }
            }
            // With an end: stop once it has passed (events proposed later are not sent).
            let end = async move {
                if until <= 0 {
                    return std::future::pending().await;
                }
                let wait = u64::try_from(until.saturating_sub(super::now_ms())).unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            };
            tokio::pin!(end);
            loop {
                let msg = tokio::select! {
                    _ = &mut end => return,
                    r = events.recv() => match r {
                        Ok(ev) if !wanted(&ev) => continue,
                        Ok(ev) if until > 0 && ev.time_ms > until => return,
                        Ok(ev) => watch_event(ev),
                        Err(RecvError::Lagged(_)) => pb::WatchEvent {
                            action: pb::WatchAction::Resync as i32,
                            ..Default::default()
                        },
                        Err(RecvError::Closed) => return,
                    },
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl ControlApi {
    fn cluster(&self) -> Result<pb::Cluster, Status> {
        self.store()
            .get_cluster()
            .map_err(store_status)?
            .ok_or_else(|| Status::failed_precondition("the cluster is not initialised"))
    }

    fn cluster_response(&self) -> Result<Response<pb::ClusterResponse>, Status> {
        let cluster = self.cluster()?;
        let m = self.raft().metrics().borrow().clone();
        let leader_node_id = match m.current_leader {
            Some(l) => self.node_id_of_raft(l).unwrap_or_default(),
            None => String::new(),
        };
        Ok(Response::new(pb::ClusterResponse {
            cluster: Some(cluster),
            leader_node_id,
            raft_term: m.current_term,
            raft_last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
        }))
    }
}

/// A store event as the watch stream sends it.
pub fn watch_event(ev: Event) -> pb::WatchEvent {
    use pb::watch_event::Object as W;
    let action = match ev.action {
        Action::Create => pb::WatchAction::Create,
        Action::Update => pb::WatchAction::Update,
        Action::Delete => pb::WatchAction::Delete,
    };
    let object = match ev.object {
        Object::Node(n) => W::Node(n),
        Object::Service(s) => W::Service(images::redact_service(s)),
        Object::Task(t) => W::Task(images::redact_task(t)),
        Object::Cluster(c) => W::Cluster(c),
        Object::Network(n) => W::Network(n),
        Object::Secret(mut x) => {
            if let Some(sp) = x.spec.as_mut() {
                sp.data.clear();
            }
            W::Secret(x)
        }
        Object::Config(mut x) => {
            if let Some(sp) = x.spec.as_mut() {
                sp.data.clear();
            }
            W::Config(x)
        }
    };
    pb::WatchEvent {
        version: ev.version,
        action: action as i32,
        object: Some(object),
        time_ms: ev.time_ms,
    }
}
