//! The real executor: one container per task through shoal's runtime, its rootfs an overlay of
//! the image's layers, its spec Docker's defaults plus the task's command, env, user, working
//! dir and limits, its output captured to a rotated log. The container id is the task id.
//!
//! Per task on disk: `<data_dir>/containers/<id>/` holds `bundle/` (config.json and the empty
//! `rootfs/` mount point), `upper/` and `work/` (the overlay's writable layer) and
//! `container.log`. The runtime's own state lives under the state root (default
//! `/run/shoal/runtime`), which survives an agent restart but not a reboot.
//!
//! Containers are created by a `shoal runtime create` subprocess, never by the daemon itself:
//! the runtime forks each container's monitor from the process that creates it, and a fork of
//! the multi-threaded daemon would carry the daemon's whole address space (and locks other
//! threads held at the fork) into every monitor. Health checks are `shoal runtime exec`
//! subprocesses for the same reason. Start, signal, wait and delete do not fork and stay
//! in-process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use shoal_proto::v1::Task;
use shoal_runtime::container::{Container, ContainerError, Status};
use shoal_runtime::image::{ImageError, ImageStore, PreparedImage};
use shoal_runtime::network::{
    self, Attachment, BridgeConfig, EtcOptions, Mode, NetRequest, OverlayAttach, PortSpec, Protocol,
};

use shoal_runtime::volume::{MountKind, MountSpec, VolumeError, VolumeUse, Volumes};

use super::{CheckResult, ExecError, Executor, Exit, Probe, Started, StopSignal};

/// Directory of the containers' bundles, writable layers and logs under the data dir.
pub const CONTAINERS_DIR: &str = "containers";
/// A task's log in its container dir.
pub const LOG_FILE: &str = "container.log";
/// A task's log is rotated at this size.
pub const LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated log files kept per task.
pub const LOG_MAX_FILES: u32 = 3;
/// CFS period used to express a CPU limit as a quota.
const CPU_PERIOD_US: u64 = 100_000;
/// How long one blocking wait on a container lasts before it is re-armed, so that a
/// cancelled wait frees its thread soon.
const WAIT_SLICE: Duration = Duration::from_secs(1);
/// Past a health check's own timeout (which `shoal runtime exec` enforces), how long the
/// executor waits for the exec before it kills it: its kill and report take a moment.
const CHECK_GRACE: Duration = Duration::from_secs(10);
/// How long a finished check's output is still read: something it left running in the
/// container may hold its stdout.
const CHECK_OUTPUT_WAIT: Duration = Duration::from_millis(500);
/// Bytes of a failed `shoal runtime create`'s stderr kept for the task's error message.
const MAX_CREATE_ERROR: usize = 2048;

/// Where the runtime executor keeps things.
#[derive(Clone, Debug)]
pub struct RuntimeExecutorConfig {
    /// The node's data dir: `images/` and `layers/` (the image store), `containers/`.
    pub data_dir: PathBuf,
    /// The runtime's state root (`shoal_runtime::container::DEFAULT_ROOT` in production).
    pub state_root: PathBuf,
    /// No longer consulted: containers are created by a `shoal runtime create` subprocess,
    /// which always runs from (and re-executes itself into) an immutable copy of the binary.
    pub allow_unprotected_exe: bool,
    /// The node bridge task containers are attached to.
    pub bridge: BridgeConfig,
    /// Where the tasks' embedded DNS forwards names that are not the cluster's (empty: none).
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// Registries pulled from over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
}

/// Runs tasks as containers.
pub struct RuntimeExecutor {
    cfg: RuntimeExecutorConfig,
    /// The other nodes' underlay addresses, as the dispatcher last said.
    peers: Arc<std::sync::Mutex<Vec<std::net::Ipv4Addr>>>,
    /// The service records of the node's cluster networks, for the tasks' resolvers.
    records: crate::dns::SharedRecords,
    /// What the routing mesh's sandbox serves now (`None`: no sandbox).
    mesh: Arc<std::sync::Mutex<Option<shoal_proto::v1::Ingress>>>,
    /// The resolvers of the tasks (and standalone containers) on cluster networks.
    dns: Resolvers,
    /// The network attachments of standalone containers on this node (dispatcher's).
    attachments: Arc<std::sync::Mutex<Vec<Task>>>,
    /// The task looking for their containers: one at a time, the newest set's.
    following: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    images: Arc<ImageStore>,
    /// The `shoal` binary whose `runtime create` makes the containers.
    shoal: PathBuf,
    /// One pull at a time per image reference (the tasks of one service start together).
    pulls: Arc<tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Images (by id) tasks were prepared with, and when: kept by image collection for a
    /// while even before their container exists.
    prepared: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
    /// The secrets and configs the node's tasks use (memory only; see `files.rs`).
    held: std::sync::Mutex<super::files::Held>,
}

/// How often a node collects images no container uses.
pub const IMAGE_GC_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// An image a task was prepared with is kept at least this long.
pub const IMAGE_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

impl RuntimeExecutor {
    /// An executor over the image store in `cfg.data_dir`, creating containers with the
    /// running binary (the `shoal` daemon, already re-executed from its immutable copy).
    pub fn new(cfg: RuntimeExecutorConfig) -> Result<RuntimeExecutor, ExecError> {
        let images =
            ImageStore::open(&cfg.data_dir).map_err(|e| ExecError::Runtime(e.to_string()))?;
        // Private (as `layers/`): the tasks' writable layers hold what their images hold.
        let containers = cfg.data_dir.join(CONTAINERS_DIR);
        shoal_runtime::dirs::private_dir(&containers)
            .map_err(|e| ExecError::Runtime(format!("create {}: {e}", containers.display())))?;
        // Through /proc: the running binary even when its file has been replaced or removed
        // since (a newer build replacing its protected copy).
        let shoal = PathBuf::from("/proc/self/exe");
        let records: crate::dns::SharedRecords = Arc::default();
        Ok(RuntimeExecutor {
            peers: Arc::default(),
            records: records.clone(),
            mesh: Arc::default(),
            dns: Resolvers {
                running: Arc::default(),
                records: records.clone(),
                upstream: Arc::new(cfg.dns_upstream.clone()),
                containers: cfg.data_dir.join(CONTAINERS_DIR),
            },
            attachments: Arc::default(),
            following: Default::default(),
            images: Arc::new(images),
            shoal,
            pulls: Arc::default(),
            prepared: Arc::default(),
            held: Default::default(),
            cfg,
        })
    }

    /// Removes the untagged images (service images are pulled by digest, untagged) that no
    /// container on this node uses and no task was prepared with in the last `grace`, then
    /// the blobs and layers only they held. Tagged images stay: they are the user's.
    pub async fn collect_images(
        &self,
        grace: std::time::Duration,
    ) -> Result<shoal_runtime::image::GcReport, ExecError> {
        let keep: Vec<String> = {
            let mut p = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
            p.retain(|_, at| at.elapsed() < grace);
            p.keys().cloned().collect()
        };
        // Gates of pulls nobody waits on any more.
        self.pulls
            .lock()
            .await
            .retain(|_, gate| Arc::strong_count(gate) > 1);
        let (images, data) = (self.images.clone(), self.cfg.data_dir.clone());
        blocking(move || {
            let used = shoal_runtime::frontdoor::FrontDoor::open(&data)
                .and_then(|f| f.images_in_use())
                .map_err(runtime_err)?;
            let mut ids = used.image_ids;
            ids.extend(keep);
            images.prune(&ids, &used.chain_ids).map_err(runtime_err)
        })
        .await
    }

    /// Collects images every [`IMAGE_GC_EVERY`] (see [`RuntimeExecutor::collect_images`]).
    pub fn spawn_image_gc(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IMAGE_GC_EVERY).await;
                let Some(me) = me.upgrade() else { return };
                match me.collect_images(IMAGE_GC_GRACE).await {
                    Ok(r) if r.images_removed + r.blobs_removed + r.layers_removed > 0 => {
                        tracing::info!(
                            images = r.images_removed,
                            blobs = r.blobs_removed,
                            layers = r.layers_removed,
                            bytes = r.blob_bytes_freed,
                            "collected unused images"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("collecting unused images: {e}"),
                }
            }
        })
    }

    fn prepared_with(&self, image_id: &str) {
        self.prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image_id.to_string(), std::time::Instant::now());
    }

    /// Create containers with this `shoal` binary instead of the running one (for programs
    /// that embed the agent but are not `shoal`, such as tests).
    pub fn with_shoal_binary(mut self, shoal: impl Into<PathBuf>) -> RuntimeExecutor {
        self.shoal = shoal.into();
        self
    }

    /// `shoal runtime create` for a task's container; its stderr is the error on failure.
    async fn create(&self, id: &str, dir: &Path, layers: &[PathBuf]) -> Result<(), ExecError> {
        let mut lower = OsString::new();
        for (i, l) in layers.iter().enumerate() {
            if i > 0 {
                lower.push(":");
            }
            lower.push(l.as_os_str());
        }
        let mut cmd = tokio::process::Command::new(&self.shoal);
        // `ps` shows `shoal runtime … create …` for the helper and the monitor forked from
        // it, not `/proc/self/exe …`.
        cmd.arg0("shoal");
        cmd.arg("runtime")
            .arg("--root")
            .arg(&self.cfg.state_root)
            .arg("create")
            .arg("--bundle")
            .arg(dir.join("bundle"))
            .arg("--log")
            .arg(dir.join(LOG_FILE))
            .arg("--log-max-bytes")
            .arg(LOG_MAX_BYTES.to_string())
            .arg("--log-max-files")
            .arg(LOG_MAX_FILES.to_string())
            .arg("--overlay-lower")
            .arg(lower)
            .arg("--overlay-upper")
            .arg(dir.join("upper"))
            .arg("--overlay-work")
            .arg(dir.join("work"))
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Not killed when a cancelled start drops this future: a create cut short would leave
        // a half-made container behind, one that finishes is removed like any other.
        let out = cmd.output().await.map_err(|e| {
            ExecError::Runtime(format!("run {} runtime create: {e}", self.shoal.display()))
        })?;
        if out.status.success() {
            return Ok(());
        }
        Err(ExecError::Runtime(create_error(&out.stderr, out.status)))
    }

    /// Starts the resolver of task `id` on `sock` (bound in its namespace).
    fn serve_dns(
        &self,
        id: &str,
        sock: std::net::UdpSocket,
        networks: Vec<String>,
    ) -> Result<(), ExecError> {
        self.dns.serve(id, sock, networks)
    }

    /// Makes the routing mesh's sandbox serve `ingress` (made, changed or removed in the
    /// background, in order: one change at a time under the lock).
    fn serve_mesh(&self, ingress: Option<shoal_proto::v1::Ingress>) {
        let (mesh, bridge, peers) = (
            self.mesh.clone(),
            self.cfg.bridge.clone(),
            self.peers.clone(),
        );
        let dir = self.cfg.data_dir.join(CONTAINERS_DIR).join(MESH_DIR);
        let id = mesh_id(&self.cfg.data_dir);
        tokio::task::spawn_blocking(move || {
            let mut held = mesh.lock().unwrap_or_else(|p| p.into_inner());
            if *held == ingress {
                return;
            }
            let peers = peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match mesh_sandbox(&bridge, &id, &dir, held.as_ref(), ingress.as_ref(), peers) {
                Ok(()) => *held = ingress,
                Err(e) => {
                    tracing::warn!("routing mesh: {e}");
                    *held = None;
                }
            }
        });
    }

    /// Programs task `id`'s virtual IPs from the current records (in the background).
    fn balance(&self, id: &str) {
        self.dns.balance(id);
    }

    fn stop_dns(&self, id: &str) {
        self.dns.stop(id);
    }

    /// Where task `id`'s secret and config files are kept (tmpfs).
    fn files_dir(&self, id: &str) -> PathBuf {
        super::files::agent_root(&self.cfg.data_dir).join(id)
    }

    /// Creates and starts the task's container (see [`Executor::start`]).
    async fn start_container(&self, task: &Task) -> Result<Started, ExecError> {
        let images = self.images.clone();
        let task = task.clone();
        let id = task_id(&task);
        let dir = self.task_dir(&id);
        let files = {
            let c = task
                .spec
                .as_ref()
                .and_then(|s| s.container.clone())
                .unwrap_or_default();
            super::files::wanted(&self.held.lock().unwrap_or_else(|p| p.into_inner()), &c)?
        };
        let files_dir = self.files_dir(&id);
        let volumes = Volumes::open(&self.cfg.data_dir).map_err(runtime_err)?;
        let layers = {
            let (id, dir, bridge) = (id.clone(), dir.clone(), self.cfg.bridge.clone());
            let files_dir = files_dir.clone();
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
            blocking(move || {
                let image = task
                    .spec
                    .as_ref()
                    .and_then(|s| s.container.as_ref())
                    .map_or(String::new(), |c| c.image.clone());
                let prepared = prepare_image(&images, &image)?;
                let req = net_request(&task, peers)?;
                let bundle = dir.join("bundle");
                shoal_runtime::dirs::private_dir(&dir)
                    .map_err(|e| ExecError::Runtime(format!("create {}: {e}", dir.display())))?;
                mkdir(&bundle.join("rootfs"))?;
                mkdir(&dir.join("upper"))?;
                mkdir(&dir.join("work"))?;
                let att = network::attach(&bridge, &id, &dir, &req).map_err(runtime_err)?;
                let clustered = !req.overlays.is_empty();
                let mut etc = EtcOptions {
                    hostname: hostname(&task, &id),
                    ..EtcOptions::default()
                };
                if clustered {
                    // The embedded resolver, bound before the process can ask it.
                    etc.dns = vec![crate::dns::RESOLVER_ADDR.ip()];
                    etc.dns_options = vec!["ndots:0".into()];
                }
                let dns_sock = if clustered {
                    match network::udp_socket_in_netns(
                        &network::netns_path(&id),
                        crate::dns::RESOLVER_ADDR,
                    ) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            let _ = network::detach(&id);
                            return Err(runtime_err(e));
                        }
                    }
                } else {
                    None
                };
                let spec = network::write_etc_files(&dir, &att, &etc)
                    .map_err(runtime_err)
                    .and_then(|()| build_spec(&task, &id, &prepared, &att, &dir))
                    .and_then(|mut spec| {
                        let mut mounts = super::files::write(&files_dir, &files)?;
                        // Volumes made on this node on first use; recorded in the task dir as
                        // used by the task until it is removed.
                        let attached = volumes
                            .attach(&dir, &mount_specs(&task))
                            .map_err(volume_err)?;
                        for m in shoal_runtime::volume::sorted(&attached.mounts) {
                            mounts.push(
                                serde_json::to_value(m.to_oci().map_err(runtime_err)?)
                                    .map_err(runtime_err)?,
                            );
                        }
                        if let Some(m) = spec["mounts"].as_array_mut() {
                            m.extend(mounts);
                        }
                        Ok(spec)
                    });
                let spec = match spec {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = network::detach(&id);
                        let _ = super::files::remove(&files_dir);
                        return Err(e);
                    }
                };
                // So that `shoal image rm/prune` on this node keep the task's image.
                shoal_runtime::frontdoor::record_image_use(
                    &dir,
                    &prepared.info.id,
                    &prepared.chain_ids,
                )
                .map_err(runtime_err)?;
                let text = serde_json::to_vec_pretty(&spec).map_err(runtime_err)?;
                std::fs::write(bundle.join("config.json"), text).map_err(runtime_err)?;
                let networks: Vec<String> =
                    req.overlays.iter().map(|o| o.network_id.clone()).collect();
                Ok((prepared.layer_dirs, dns_sock.map(|s| (s, networks))))
            })
            .await?
        };
        let (layers, dns) = layers;
        if let Some((sock, networks)) = dns {
            self.serve_dns(&id, sock, networks)?;
        }
        if let Err(e) = self.create(&id, &dir, &layers).await {
            self.stop_dns(&id);
            let id = id.clone();
            let _ = blocking(move || {
                let _ = super::files::remove(&files_dir);
                network::detach(&id).map_err(runtime_err)
            })
            .await;
            return Err(e);
        }
        let root = self.cfg.state_root.clone();
        blocking(move || {
            let Some(mut c) = load(&root, &id)? else {
                return Err(ExecError::Runtime(format!(
                    "container {id} is gone right after its creation"
                )));
            };
            c.start().map_err(runtime_err)?;
            Ok(Started {
                container_id: id,
                pid: c.pid(),
            })
        })
        .await
    }

    fn task_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join(CONTAINERS_DIR).join(id)
    }
}

/// The embedded DNS resolvers this agent runs, one per container on cluster networks (tasks
/// and standalone containers alike: both live in `<data>/containers/<id>` with a namespace at
/// `network::netns_path(id)`), and the virtual IPs programmed in those containers.
#[derive(Clone)]
struct Resolvers {
    running: Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>>,
    records: crate::dns::SharedRecords,
    upstream: Arc<Vec<std::net::SocketAddr>>,
    /// `<data>/containers`.
    containers: PathBuf,
}

/// How long a standalone container's attachment is looked for before it is given up (the
/// attachment is made before the container: `shoal run` creates it right after).
const ATTACHMENT_WAIT: Duration = Duration::from_secs(30);
/// Pause between two looks.
const ATTACHMENT_POLL: Duration = Duration::from_millis(50);

impl Resolvers {
    /// Starts the resolver of container `id` on `sock` (bound in its namespace).
    fn serve(
        &self,
        id: &str,
        sock: std::net::UdpSocket,
        networks: Vec<String>,
    ) -> Result<(), ExecError> {
        let sock = tokio::net::UdpSocket::from_std(sock).map_err(runtime_err)?;
        // Only internal networks (no node bridge): no way out, not even for names.
        let forward =
            Attachment::load(&self.containers.join(id)).is_none_or(|a| a.mode != Mode::None);
        let upstream = if forward {
            self.upstream.clone()
        } else {
            Arc::new(Vec::new())
        };
        let h = tokio::spawn(crate::dns::serve(
            sock,
            networks,
            self.records.clone(),
            upstream,
        ));
        if let Some(old) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), h)
        {
            old.abort();
        }
        self.balance(id);
        Ok(())
    }

    /// Programs container `id`'s virtual IPs from the current records (in the background).
    fn balance(&self, id: &str) {
        let (records, dir, id) = (
            self.records.clone(),
            self.containers.join(id),
            id.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            let Some(att) = Attachment::load(&dir) else {
                return;
            };
            let networks: Vec<String> = att.overlays.iter().map(|o| o.network_id.clone()).collect();
            let vips = {
                let r = records.read().unwrap_or_else(|p| p.into_inner());
                crate::dns::vips(&r, &networks)
            };
            let ns = network::netns_path(&id);
            if ns.exists() {
                if let Err(e) = network::program_vips(&ns, &vips) {
                    tracing::warn!(container = %id, "program the virtual IPs: {e}");
                }
            }
        });
    }

    fn stop(&self, id: &str) {
        if let Some(h) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            h.abort();
        }
    }

    /// Serves the standalone containers that `wanted` (the node's attachment tasks) name, and
    /// stops serving the ones it no longer names. A container is found by its attachment:
    /// the network and address the manager gave it. Looks again until every attachment's
    /// container is found or [`ATTACHMENT_WAIT`] has passed (it may not be made yet).
    async fn follow_attachments(self, wanted: Arc<std::sync::Mutex<Vec<Task>>>) {
        let start = std::time::Instant::now();
        loop {
            let want: Vec<(String, std::net::Ipv4Addr)> = wanted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .flat_map(|t| t.networks.iter())
                .filter_map(|a| {
                    let ip = a.address.split('/').next()?.parse().ok()?;
                    Some((a.network_id.clone(), ip))
                })
                .collect();
            let dir = self.containers.clone();
            let found = blocking(move || Ok(standalone_attachments(&dir))).await;
            let found = found.unwrap_or_default();
            let mut missing = 0;
            let mut serve: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (net, ip) in &want {
                match found.iter().find(|(_, a)| {
                    a.overlays
                        .iter()
                        .any(|o| o.network_id == *net && o.address == *ip)
                }) {
                    Some((id, a)) => {
                        serve.insert(
                            id.clone(),
                            a.overlays.iter().map(|o| o.network_id.clone()).collect(),
                        );
                    }
                    None => missing += 1,
                }
            }
            for (id, networks) in &serve {
                let serving = self
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(id);
                if serving {
                    continue;
                }
                let ns = network::netns_path(id);
                let addr = crate::dns::RESOLVER_ADDR;
                match blocking(move || network::udp_socket_in_netns(&ns, addr).map_err(runtime_err))
                    .await
                {
                    Ok(sock) => {
                        if let Err(e) = self.serve(id, sock, networks.clone()) {
                            tracing::warn!(container = %id, "embedded DNS: {e}");
                            missing += 1;
                        }
                    }
                    // Its namespace is still being made (or `run` is looking whether it is
                    // served yet): again at the next look.
                    Err(e) => {
                        tracing::debug!(container = %id, "embedded DNS: {e}");
                        missing += 1;
                    }
                }
            }
            // Standalone containers no attachment names any more: their resolvers stop.
            for (id, _) in found.iter().filter(|(id, _)| !serve.contains_key(id)) {
                self.stop(id);
            }
            if missing == 0 || start.elapsed() > ATTACHMENT_WAIT {
                return;
            }
            tokio::time::sleep(ATTACHMENT_POLL).await;
        }
    }
}

/// The standalone containers (not tasks) under `containers` on cluster networks, with their
/// attachments.
fn standalone_attachments(containers: &Path) -> Vec<(String, Attachment)> {
    let Ok(rd) = std::fs::read_dir(containers) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let id = e.file_name().to_string_lossy().into_owned();
            if id.starts_with('.')
                || !e
                    .path()
                    .join(shoal_runtime::frontdoor::RECORD_FILE)
                    .exists()
            {
                return None;
            }
            let a = Attachment::load(&e.path()).filter(|a| !a.overlays.is_empty())?;
            Some((id, a))
        })
        .collect()
}

/// The task's error for a failed `shoal runtime create`: its message without the program name,
/// or how it ended when it printed nothing.
fn create_error(stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let text = text.strip_prefix("shoal: ").unwrap_or(text);
    if text.is_empty() {
        return format!("shoal runtime create failed ({status})");
    }
    let mut msg: String = text.lines().collect::<Vec<_>>().join("; ");
    if msg.len() > MAX_CREATE_ERROR {
        let mut cut = MAX_CREATE_ERROR;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    msg
}

/// `30s`, `1.5s`, `500ms`: as docker prints a duration.
fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

fn runtime_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::Runtime(e.to_string())
}

fn task_id(t: &Task) -> String {
    t.meta.as_ref().map_or(String::new(), |m| m.id.clone())
}

/// The image store's reference for a task's image: its digest when pinned
/// (`name[:tag]@sha256:…`), else the name.
fn store_reference(image: &str) -> &str {
    match image.split_once('@') {
        Some((_, digest)) => digest,
        None => image,
    }
}

fn prepare_image(images: &ImageStore, image: &str) -> Result<PreparedImage, ExecError> {
    if image.is_empty() {
        return Err(ExecError::Invalid("the task names no image".into()));
    }
    match images.prepare(store_reference(image)) {
        Ok(p) => Ok(p),
        Err(ImageError::NotFound(_)) => Err(ExecError::ImageNotFound(image.to_string())),
        Err(ImageError::InvalidReference { .. }) => {
            Err(ExecError::ImageNotFound(image.to_string()))
        }
        Err(e) => Err(runtime_err(e)),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ExecError> + Send + 'static,
) -> Result<T, ExecError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExecError::Runtime(format!("runtime thread: {e}")))?
}

/// The process's argv, Docker's way: the task's command replaces the image's entrypoint
/// (and then its cmd too), the task's args replace the image's cmd.
fn argv(
    task_cmd: &[String],
    task_args: &[String],
    entry: &[String],
    cmd: &[String],
) -> Vec<String> {
    let (entry, cmd): (&[String], &[String]) = if task_cmd.is_empty() {
        (entry, if task_args.is_empty() { cmd } else { task_args })
    } else {
        (task_cmd, task_args)
    };
    entry.iter().chain(cmd.iter()).cloned().collect()
}

/// `KEY=VALUE` lists merged: later keys replace earlier ones in place.
fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut out: Vec<String> = base.to_vec();
    for kv in over {
        let key = kv.split('=').next().unwrap_or(kv);
        match out.iter().position(|e| e.split('=').next() == Some(key)) {
            Some(i) => out[i] = kv.clone(),
            None => out.push(kv.clone()),
        }
    }
    out
}

/// Resolves `user[:group]` (names or numbers) against the image's /etc/passwd and /etc/group
/// (topmost layer holding the file wins), read with the front door's reader: a symlink there
/// (which could name a host file) counts as no file.
fn resolve_user(user: &str, layers: &[PathBuf]) -> Result<(u32, u32), ExecError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let read = |name: &str| -> String {
        shoal_runtime::frontdoor::read_account_file(layers, name).unwrap_or_default()
    };
    let passwd = read("passwd");
    let entry = |file: &str, key: &str| -> Option<(u32, Option<u32>)> {
        file.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 3 && (f[0] == key || f[2] == key) {
                Some((f[2].parse().ok()?, f.get(3).and_then(|g| g.parse().ok())))
            } else {
                None
            }
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, entry(&passwd, u).and_then(|e| e.1).unwrap_or(0)),
        Err(_) => match entry(&passwd, u) {
            Some((uid, gid)) => (uid, gid.unwrap_or(0)),
            None => {
                return Err(ExecError::Invalid(format!(
                    "user {u:?} not found in the image's /etc/passwd"
                )))
            }
        },
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => match entry(&read("group"), g) {
                Some((gid, _)) => gid,
                None => {
                    return Err(ExecError::Invalid(format!(
                        "group {g:?} not found in the image's /etc/group"
                    )))
                }
            },
        },
    };
    Ok((uid, gid))
}

/// What a task asks of the node's network: `host` or `none` when those are its networks, else
/// the node bridge with its host-mode published ports and its cluster networks.
fn net_request(task: &Task, peers: Vec<std::net::Ipv4Addr>) -> Result<NetRequest, ExecError> {
    let spec = task.spec.clone().unwrap_or_default();
    let local: Vec<&String> = spec
        .networks
        .iter()
        .filter(|n| *n == "host" || *n == "none")
        .collect();
    let mode = match local.as_slice() {
        [] => Mode::Bridge,
        [one] if spec.networks.len() == 1 => {
            Mode::parse(one).map_err(|e| ExecError::Invalid(e.to_string()))?
        }
        _ => {
            return Err(ExecError::Invalid(
                "network host or none is the task's only network".into(),
            ))
        }
    };
    let mut overlays = Vec::new();
    for a in &task.networks {
        let (ip, prefix) = a
            .address
            .split_once('/')
            .and_then(|(ip, p)| Some((ip.parse().ok()?, p.parse().ok()?)))
            .ok_or_else(|| {
                ExecError::Invalid(format!(
                    "network {}: the task has no address on it",
                    a.network_name
                ))
            })?;
        overlays.push(OverlayAttach {
            network_id: a.network_id.clone(),
            vni: a.vni,
            address: ip,
            prefix,
            attachment: String::new(),
        });
    }
    let mut publish = Vec::new();
    for p in task.ports.iter().filter(|p| p.publish_mode == "host") {
        let protocol = match p.protocol.as_str() {
            "" | "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(ExecError::Invalid(format!(
                    "published port protocol {other} is not supported"
                )))
            }
        };
        let port = |v: u32| u16::try_from(v).ok().filter(|v| *v > 0);
        publish.push(PortSpec {
            host_ip: None,
            host_port: port(p.published_port),
            container_port: port(p.target_port)
                .ok_or_else(|| ExecError::Invalid(format!("invalid port {}", p.target_port)))?,
            protocol,
        });
    }
    if mode != Mode::Bridge && (!publish.is_empty() || !overlays.is_empty()) {
        return Err(ExecError::Invalid(format!(
            "ports and cluster networks need the node bridge, not network {}",
            mode.name()
        )));
    }
    // Only internal cluster networks: no node bridge, so no route out (docker: no gwbridge).
    let internal_only = !task.networks.is_empty() && task.networks.iter().all(|a| a.internal);
    let mode = if internal_only {
        if let Some(p) = publish.first() {
            return Err(ExecError::Invalid(format!(
                "port {} is published on the node, but every network of the task is internal",
                p.container_port
            )));
        }
        Mode::None
    } else {
        mode
    };
    Ok(NetRequest {
        mode,
        publish,
        overlays,
        peers,
    })
}

/// The routing mesh sandbox's dir, under the containers dir.
const MESH_DIR: &str = ".ingress";

/// The routing mesh sandbox's id: one per agent (its data dir), as test hosts share /run.
fn mesh_id(data_dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("ingress-{h:016x}")
}

/// Moves the mesh sandbox from serving `old` to serving `new`: (re)made when the node's
/// ingress address or the set of published ports changes, reprogrammed when only the tasks
/// behind them do, removed when nothing is published through the mesh.
fn mesh_sandbox(
    bridge: &BridgeConfig,
    id: &str,
    dir: &Path,
    old: Option<&shoal_proto::v1::Ingress>,
    new: Option<&shoal_proto::v1::Ingress>,
    peers: Vec<std::net::Ipv4Addr>,
) -> Result<(), String> {
    let shape = |i: &shoal_proto::v1::Ingress| {
        (
            i.node.clone(),
            i.ports
                .iter()
                .map(|p| (p.published_port, p.protocol.clone()))
                .collect::<Vec<_>>(),
        )
    };
    let Some(new) = new else {
        network::detach(id).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(dir);
        return Ok(());
    };
    let protocol = |p: &str| match p {
        "udp" => Protocol::Udp,
        _ => Protocol::Tcp,
    };
    if old.map(shape) != Some(shape(new)) || !network::netns_path(id).exists() {
        network::detach(id).map_err(|e| e.to_string())?;
        let node = new.node.clone().unwrap_or_default();
        let (ip, prefix) = node
            .address
            .split_once('/')
            .and_then(|(ip, p)| Some((ip.parse().ok()?, p.parse().ok()?)))
            .ok_or_else(|| format!("no ingress address for this node: {:?}", node.address))?;
        shoal_runtime::dirs::private_dir(dir)
            .map_err(|e| format!("create {}: {e}", dir.display()))?;
        let req = NetRequest {
            mode: Mode::Bridge,
            publish: new
                .ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.published_port).ok()?;
                    Some(PortSpec {
                        host_ip: None,
                        host_port: Some(port),
                        container_port: port,
                        protocol: protocol(&p.protocol),
                    })
                })
                .collect(),
            overlays: vec![OverlayAttach {
                network_id: node.network_id.clone(),
                vni: node.vni,
                address: ip,
                prefix,
                attachment: String::new(),
            }],
            peers,
        };
        network::attach(bridge, id, dir, &req).map_err(|e| e.to_string())?;
    }
    let ports: Vec<network::MeshPort> = new
        .ports
        .iter()
        .filter_map(|p| {
            Some(network::MeshPort {
                published: u16::try_from(p.published_port).ok()?,
                protocol: protocol(&p.protocol),
                target: u16::try_from(p.target_port).ok()?,
                tasks: p.targets.iter().filter_map(|t| t.parse().ok()).collect(),
            })
        })
        .collect();
    network::program_mesh(&network::netns_path(id), &ports).map_err(|e| e.to_string())
}

/// The container's hostname: the task's, else its short id.
fn hostname(task: &Task, id: &str) -> String {
    let c = task
        .spec
        .as_ref()
        .and_then(|s| s.container.as_ref())
        .map_or(String::new(), |c| c.hostname.clone());
    if c.is_empty() {
        id.chars().take(12).collect()
    } else {
        c
    }
}

/// The OCI config of a task's container, in the network `att` (its /etc files in `dir`).
fn build_spec(
    task: &Task,
    id: &str,
    image: &PreparedImage,
    att: &Attachment,
    dir: &Path,
) -> Result<Value, ExecError> {
    let spec = task.spec.clone().unwrap_or_default();
    let c = spec.container.clone().unwrap_or_default();
    let cfg = image.config.config().clone().unwrap_or_default();
    let none: Vec<String> = vec![];
    let args = argv(
        &c.command,
        &c.args,
        cfg.entrypoint().as_ref().unwrap_or(&none),
        cfg.cmd().as_ref().unwrap_or(&none),
    );
    if args.is_empty() {
        return Err(ExecError::Invalid(
            "no command: the task sets none and the image has no entrypoint or cmd".into(),
        ));
    }
    let env = merge_env(cfg.env().as_ref().unwrap_or(&none), &c.env);
    let mut oci = shoal_runtime::spec::docker_default(&args, &env, &hostname(task, id))
        .map_err(runtime_err)?;
    network::apply_to_spec(&mut oci, att, dir).map_err(runtime_err)?;
    let mut v = serde_json::to_value(&oci).map_err(runtime_err)?;
    let user = if c.user.is_empty() {
        cfg.user().clone().unwrap_or_default()
    } else {
        c.user.clone()
    };
    let (uid, gid) = resolve_user(&user, &image.layer_dirs)?;
    v["process"]["user"] = json!({"uid": uid, "gid": gid});
    let cwd = if !c.dir.is_empty() {
        c.dir.clone()
    } else {
        cfg.working_dir()
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    v["process"]["cwd"] = json!(cwd);
    v["root"]["readonly"] = json!(c.read_only);
    let limits = spec.resources.and_then(|r| r.limits).unwrap_or_default();
    let mut res = serde_json::Map::new();
    if limits.memory_bytes > 0 {
        res.insert("memory".into(), json!({"limit": limits.memory_bytes}));
    }
    if limits.nano_cpus > 0 {
        let quota = (limits.nano_cpus as u128 * CPU_PERIOD_US as u128 / 1_000_000_000) as i64;
        res.insert(
            "cpu".into(),
            json!({"quota": quota.max(1000), "period": CPU_PERIOD_US}),
        );
    }
    if c.pids_limit > 0 {
        res.insert("pids".into(), json!({"limit": c.pids_limit}));
    }
    if !res.is_empty() {
        let linux = v["linux"]
            .as_object_mut()
            .ok_or_else(|| runtime_err("spec has no linux section"))?;
        let r = linux.entry("resources").or_insert_with(|| json!({}));
        if let Some(r) = r.as_object_mut() {
            r.extend(res);
        }
    }
    Ok(v)
}

/// The task's `--mount`s as the runtime takes them (a bind source must exist on the node).
fn mount_specs(task: &Task) -> Vec<MountSpec> {
    let none = Vec::new();
    let mounts = task
        .spec
        .as_ref()
        .and_then(|s| s.container.as_ref())
        .map_or(&none, |c| &c.mounts);
    mounts
        .iter()
        .map(|m| MountSpec {
            kind: Some(if m.r#type == shoal_proto::v1::MountType::Volume as i32 {
                MountKind::Volume
            } else {
                MountKind::Bind
            }),
            source: m.source.clone(),
            target: m.target.clone(),
            read_only: m.read_only,
            nocopy: m.volume_nocopy,
            labels: m
                .volume_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            create_source: false,
        })
        .collect()
}

/// A mount the node cannot give the task: the task's fault (a missing bind source, a bad
/// name) or the node's (its disk).
fn volume_err(e: VolumeError) -> ExecError {
    match e {
        VolumeError::Io { .. } | VolumeError::Corrupt { .. } => runtime_err(e),
        e => ExecError::Invalid(e.to_string()),
    }
}

fn mkdir(p: &Path) -> Result<(), ExecError> {
    std::fs::create_dir_all(p)
        .map_err(|e| ExecError::Runtime(format!("create {}: {e}", p.display())))
}

fn load(root: &Path, id: &str) -> Result<Option<Container>, ExecError> {
    match Container::load(root, id) {
        Ok(c) => Ok(Some(c)),
        Err(ContainerError::NotFound(_)) => Ok(None),
        Err(e) => Err(runtime_err(e)),
    }
}

#[tonic::async_trait]
impl Executor for RuntimeExecutor {
    fn log_path(&self, task_id: &str) -> Option<std::path::PathBuf> {
        Some(self.task_dir(task_id).join(LOG_FILE))
    }

    fn stats(&self, task_id: &str) -> Option<shoal_runtime::cgroups::CgroupStats> {
        load(&self.cfg.state_root, task_id).ok()??.stats().ok()
    }

    async fn prepare(&self, task: &Task, note: &super::Note) -> Result<(), ExecError> {
        let images = self.images.clone();
        let image = task
            .spec
            .as_ref()
            .and_then(|s| s.container.as_ref())
            .map_or(String::new(), |c| c.image.clone());
        let (im, name) = (images.clone(), image.clone());
        match blocking(move || prepare_image(&im, &name)).await {
            Err(ExecError::ImageNotFound(_)) => {}
            Ok(p) => {
                self.prepared_with(&p.info.id);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        // Not on this node: from its registry, once per image however many tasks want it.
        let gate = self
            .pulls
            .lock()
            .await
            .entry(image.clone())
            .or_default()
            .clone();
        let _one = gate.lock().await;
        let (im, name) = (images.clone(), image.clone());
        if let Ok(p) = blocking(move || prepare_image(&im, &name)).await {
            self.prepared_with(&p.info.id);
            return Ok(());
        }
        // The credentials the service was given (`--with-registry-auth`), else this node's.
        let given = task
            .spec
            .as_ref()
            .and_then(|s| s.container.as_ref())
            .and_then(|c| c.registry_auth.as_ref())
            .map(|a| (a.username.clone(), a.password.clone()));
        note(&format!("pulling {image}"));
        // A pinned image may be on peers already (or about to be: then wait for it).
        let peers = match image.rsplit_once('@') {
            Some((_, digest)) => {
                match crate::peers::locate(
                    &self.cfg.data_dir,
                    digest,
                    crate::registry_server::CLAIM_TTL,
                )
                .await
                {
                    crate::peers::Located::Peers(p) => p,
                    crate::peers::Located::Origin => Vec::new(),
                }
            }
            None => Vec::new(),
        };
        let mut opts = crate::registry::PullOptions {
            insecure: self.cfg.insecure_registries.clone(),
            credentials: given,
            ..Default::default()
        }
        .with_node(&self.cfg.data_dir, &image);
        opts.peers = peers;
        tracing::info!(%image, peers = opts.peers.len(), "pulling");
        let pulled = crate::registry::pull(
            images.clone(),
            &self.cfg.data_dir,
            &image,
            &opts,
            &|_, _, _| {},
        )
        .await;
        crate::metrics::get().pulled(pulled.is_ok());
        pulled.map_err(|e| ExecError::Pull(e.to_string()))?;
        let p = blocking(move || prepare_image(&images, &image)).await?;
        self.prepared_with(&p.info.id);
        Ok(())
    }

    async fn start(&self, task: &Task) -> Result<Started, ExecError> {
        let began = std::time::Instant::now();
        let started = self.start_container(task).await;
        crate::metrics::get().started(started.is_ok(), began.elapsed().as_secs_f64());
        started
    }

    async fn wait(&self, task_id: &str) -> Result<Exit, ExecError> {
        let root = self.cfg.state_root.clone();
        let id = task_id.to_string();
        loop {
            let (root, id) = (root.clone(), id.clone());
            // Slices, so that a wait dropped by the controller (a stop) frees its thread soon.
            let r = blocking(move || {
                let Some(mut c) = load(&root, &id)? else {
                    return Err(ExecError::Runtime(format!("container {id} does not exist")));
                };
                c.wait_timeout(Some(WAIT_SLICE)).map_err(runtime_err)
            })
            .await?;
            if let Some(s) = r {
                return Ok(Exit {
                    code: s.shell_code(),
                });
            }
        }
    }

    async fn signal(&self, task_id: &str, signal: StopSignal) -> Result<(), ExecError> {
        let root = self.cfg.state_root.clone();
        let id = task_id.to_string();
        blocking(move || {
            let Some(c) = load(&root, &id)? else {
                return Ok(());
            };
            let sig = match signal {
                StopSignal::Term => libc::SIGTERM,
                StopSignal::Kill => libc::SIGKILL,
            };
            match c.kill(sig) {
                Ok(()) | Err(ContainerError::WrongState { .. }) => Ok(()),
                Err(e) => Err(runtime_err(e)),
            }
        })
        .await
    }

    async fn image_healthcheck(
        &self,
        task: &Task,
    ) -> Result<Option<shoal_proto::v1::HealthCheck>, ExecError> {
        let images = self.images.clone();
        let image = task
            .spec
            .as_ref()
            .and_then(|s| s.container.as_ref())
            .map_or(String::new(), |c| c.image.clone());
        let p = blocking(move || prepare_image(&images, &image)).await?;
        Ok(p.healthcheck.map(|h| {
            let ms = |ns: i64| (ns.max(0) / 1_000_000) as u64;
            shoal_proto::v1::HealthCheck {
                test: h.test,
                interval_ms: ms(h.interval),
                timeout_ms: ms(h.timeout),
                retries: h.retries.clamp(0, u32::MAX as i64) as u32,
                start_period_ms: ms(h.start_period),
            }
        }))
    }

    async fn check(
        &self,
        task_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<CheckResult, ExecError> {
        use tokio::io::AsyncReadExt;
        let mut cmd = tokio::process::Command::new(&self.shoal);
        cmd.arg0("shoal");
        cmd.arg("runtime")
            .arg("--root")
            .arg(&self.cfg.state_root)
            .arg("exec")
            .arg("--timeout")
            .arg(format!("{}ms", timeout.as_millis().max(1)))
            .arg(task_id)
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A check cut short (the task stops meanwhile) takes its exec along: the exec's
            // helper and process die with it (parent-death signal).
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            ExecError::Runtime(format!("run {} runtime exec: {e}", self.shoal.display()))
        })?;
        // Drained whole (a check that fills its pipe must not block), the first bytes kept.
        let drain = |r: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
            tokio::spawn(async move {
                let mut kept = Vec::new();
                let Some(mut r) = r else { return kept };
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let room = crate::health::MAX_OUTPUT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                kept
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let status = match tokio::time::timeout(timeout + CHECK_GRACE, child.wait()).await {
            Ok(s) => s.map_err(|e| ExecError::Runtime(format!("health check: {e}")))?,
            Err(_) => {
                let _ = child.kill().await;
                out.abort();
                err.abort();
                return Ok(CheckResult {
                    exit_code: -1,
                    output: format!("health check did not end {timeout:?} after its timeout"),
                });
            }
        };
        let collect = |h: tokio::task::JoinHandle<Vec<u8>>| async move {
            let abort = h.abort_handle();
            match tokio::time::timeout(CHECK_OUTPUT_WAIT, h).await {
                Ok(Ok(v)) => v,
                _ => {
                    abort.abort();
                    Vec::new()
                }
            }
        };
        let (stdout, stderr) = (collect(out).await, collect(err).await);
        let stderr = String::from_utf8_lossy(&stderr);
        let code = status.code().unwrap_or(-1);
        let timed_out = code == 124 && stderr.contains(shoal_runtime::container::EXEC_TIMED_OUT);
        let output = if timed_out {
            // Docker's words.
            format!("Health check exceeded timeout ({})", fmt_duration(timeout))
        } else {
            let mut text = String::from_utf8_lossy(&stdout).into_owned();
            text.push_str(stderr.strip_prefix("shoal: ").unwrap_or(&stderr));
            text
        };
        Ok(CheckResult {
            exit_code: if timed_out { -1 } else { code },
            output: crate::health::bounded(output),
        })
    }

    async fn remove(&self, task_id: &str) -> Result<(), ExecError> {
        self.stop_dns(task_id);
        let root = self.cfg.state_root.clone();
        let id = task_id.to_string();
        let dir = self.task_dir(task_id);
        let files_dir = self.files_dir(task_id);
        let volumes = Volumes::open(&self.cfg.data_dir).map_err(runtime_err)?;
        blocking(move || {
            // Half-made ones too (a create whose agent died): their cgroups go with them.
            match Container::remove(&root, &id) {
                Ok(()) | Err(ContainerError::NotFound(_)) => {}
                Err(e) => return Err(runtime_err(e)),
            }
            super::files::remove(&files_dir)?;
            network::detach(&id).map_err(runtime_err)?;
            let used = VolumeUse::load(&dir);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ExecError::Runtime(format!("remove {}: {e}", dir.display()))),
            }
            // A task's anonymous volumes go with it; its named ones stay on the node.
            volumes.remove_anonymous(&used).map_err(runtime_err)
        })
        .await
    }

    async fn held(&self) -> Result<Vec<String>, ExecError> {
        let (root, containers) = (
            self.cfg.state_root.clone(),
            self.cfg.data_dir.join(CONTAINERS_DIR),
        );
        blocking(move || {
            let mut ids: std::collections::BTreeSet<String> = Container::list(&root)
                .map_err(runtime_err)?
                .into_iter()
                .map(|s| s.id)
                .collect();
            // Task dirs whose container is gone (a removal cut short): a task's has its bundle;
            // a front-door container's (same dir) has its record instead.
            for e in std::fs::read_dir(&containers)
                .into_iter()
                .flatten()
                .flatten()
            {
                let id = e.file_name().to_string_lossy().into_owned();
                let p = e.path();
                if !id.starts_with('.')
                    && p.join("bundle").is_dir()
                    && !p.join(shoal_runtime::frontdoor::RECORD_FILE).exists()
                {
                    ids.insert(id);
                }
            }
            Ok(ids.into_iter().collect())
        })
        .await
    }

    fn set_dependencies(&self, deps: shoal_proto::v1::Dependencies) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(deps);
    }

    fn set_records(&self, records: shoal_proto::v1::ServiceRecords) {
        self.serve_mesh(records.ingress.clone());
        *self.records.write().unwrap_or_else(|p| p.into_inner()) = records;
        let ids: Vec<String> = self
            .dns
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.balance(&id);
        }
    }

    fn set_attachments(&self, attachments: Vec<Task>) {
        *self.attachments.lock().unwrap_or_else(|p| p.into_inner()) = attachments;
        let (dns, wanted) = (self.dns.clone(), self.attachments.clone());
        let follower = tokio::spawn(async move { dns.follow_attachments(wanted).await });
        if let Some(old) = self
            .following
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(follower)
        {
            old.abort();
        }
    }

    fn set_peers(&self, peers: Vec<std::net::Ipv4Addr>) {
        let mut held = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if *held == peers {
            return;
        }
        held.clone_from(&peers);
        drop(held);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = network::set_peers(&peers) {
                tracing::warn!("program the overlay peers: {e}");
            }
        });
    }

    async fn probe(&self, task_id: &str) -> Result<Probe, ExecError> {
        let root = self.cfg.state_root.clone();
        let id = task_id.to_string();
        let serving = self
            .dns
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(task_id);
        if !serving {
            // A container adopted from an earlier agent: its resolver died with that agent.
            let (dir, id) = (self.task_dir(task_id), id.clone());
            let bound = blocking(move || {
                let Some(att) = Attachment::load(&dir).filter(|a| !a.overlays.is_empty()) else {
                    return Ok(None);
                };
                let ns = network::netns_path(&id);
                if !ns.exists() {
                    return Ok(None);
                }
                let sock = network::udp_socket_in_netns(&ns, crate::dns::RESOLVER_ADDR)
                    .map_err(runtime_err)?;
                Ok(Some((
                    sock,
                    att.overlays.iter().map(|o| o.network_id.clone()).collect(),
                )))
            })
            .await;
            if let Ok(Some((sock, networks))) = bound {
                self.serve_dns(task_id, sock, networks)?;
            }
        }
        blocking(move || {
            let Some(c) = load(&root, &id)? else {
                // Half-made (its creator died, or is still at it): never started.
                return Ok(if root.join(&id).is_dir() {
                    Probe::Created
                } else {
                    Probe::Missing
                });
            };
            let st = c.state();
            Ok(match st.status {
                Status::Creating | Status::Created => Probe::Created,
                Status::Running | Status::Paused => Probe::Running { pid: st.pid },
                Status::Stopped => match c.exit_status() {
                    Some(s) => Probe::Exited(Exit {
                        code: s.shell_code(),
                    }),
                    None => Probe::Lost,
                },
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn argv_follows_docker() {
        let (entry, cmd) = (s(&["/entry"]), s(&["default"]));
        assert_eq!(argv(&[], &[], &entry, &cmd), s(&["/entry", "default"]));
        assert_eq!(argv(&[], &s(&["x"]), &entry, &cmd), s(&["/entry", "x"]));
        assert_eq!(argv(&s(&["sh"]), &[], &entry, &cmd), s(&["sh"]));
        assert_eq!(
            argv(&s(&["sh"]), &s(&["-c", "x"]), &entry, &cmd),
            s(&["sh", "-c", "x"])
        );
        assert_eq!(
            argv(&[], &s(&["sleep", "1"]), &[], &cmd),
            s(&["sleep", "1"])
        );
    }

    #[test]
    fn env_overrides_by_key() {
        assert_eq!(
            merge_env(&s(&["PATH=/bin", "A=1"]), &s(&["A=2", "B=3"])),
            s(&["PATH=/bin", "A=2", "B=3"])
        );
    }

    #[test]
    fn users_resolve_from_the_top_layer() {
        let d = tempfile::tempdir().unwrap();
        let (low, top) = (d.path().join("low"), d.path().join("top"));
        for l in [&low, &top] {
            std::fs::create_dir_all(l.join("etc")).unwrap();
        }
        std::fs::write(low.join("etc/passwd"), "app:x:5:5::/:/bin/sh\n").unwrap();
        std::fs::write(top.join("etc/passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        std::fs::write(top.join("etc/group"), "staff:x:50:\n").unwrap();
        let layers = vec![low, top];
        assert_eq!(resolve_user("", &layers), Ok((0, 0)));
        assert_eq!(resolve_user("app", &layers), Ok((1000, 1001)));
        assert_eq!(resolve_user("app:staff", &layers), Ok((1000, 50)));
        assert_eq!(resolve_user("77:78", &layers), Ok((77, 78)));
        assert!(resolve_user("nobody", &layers).is_err());
    }

    #[test]
    fn a_passwd_symlinked_to_a_host_file_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        // A host file with a uid no image holds, named by absolute path from the image.
        let host = d.path().join("host-passwd");
        std::fs::write(&host, "app:x:48213:48214::/:/bin/sh\n").unwrap();
        let group = d.path().join("host-group");
        std::fs::write(&group, "staff:x:48215:\n").unwrap();
        let l = d.path().join("layer");
        std::fs::create_dir_all(l.join("etc")).unwrap();
        std::os::unix::fs::symlink(&host, l.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink(&group, l.join("etc/group")).unwrap();
        let layers = vec![l.clone()];
        let e = resolve_user("app", &layers).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        assert!(!e.to_string().contains("48213"), "{e}");
        assert!(resolve_user("1:staff", &layers).is_err());
        // A symlinked etc/ directory is not followed either.
        let l2 = d.path().join("layer2");
        let hostetc = d.path().join("hostetc");
        std::fs::create_dir_all(&hostetc).unwrap();
        std::fs::write(hostetc.join("passwd"), "app:x:48213:48214::/:/bin/sh\n").unwrap();
        std::fs::create_dir_all(&l2).unwrap();
        std::os::unix::fs::symlink(&hostetc, l2.join("etc")).unwrap();
        assert!(resolve_user("app", &[l2]).is_err());
        // The same file in the image is read.
        std::fs::remove_file(l.join("etc/passwd")).unwrap();
        std::fs::copy(&host, l.join("etc/passwd")).unwrap();
        assert_eq!(resolve_user("app", &layers), Ok((48213, 48214)));
    }

    #[test]
    fn create_errors_read_as_one_line() {
        use std::os::unix::process::ExitStatusExt;
        let failed = std::process::ExitStatus::from_raw(1 << 8);
        assert_eq!(
            create_error(b"shoal: create container t1: no such image\n", failed),
            "create container t1: no such image"
        );
        assert_eq!(create_error(b"a\nb\n", failed), "a; b");
        assert_eq!(
            create_error(b"", failed),
            "shoal runtime create failed (exit status: 1)"
        );
        let long = "\u{e9}".repeat(MAX_CREATE_ERROR);
        let msg = create_error(long.as_bytes(), failed);
        assert!(msg.len() <= MAX_CREATE_ERROR && msg.chars().all(|c| c == '\u{e9}'));
    }

    #[test]
    fn pinned_images_are_looked_up_by_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(store_reference(&format!("busybox:1@{d}")), d);
        assert_eq!(store_reference("busybox:1"), "busybox:1");
    }
}
