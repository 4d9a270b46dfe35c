//! Node-local container networking, as Docker's default bridge gives it: every container but a
//! `host` one gets a network namespace of its own (made before the container, joined by path,
//! `lo` up); a `bridge` container also gets a veth pair to the node bridge (`shoal0`), an
//! address from the bridge's subnet, a default route, masquerade for egress and DNAT for its
//! published ports; every container gets its own /etc/hosts, /etc/hostname and
//! /etc/resolv.conf, bind-mounted from its directory.
//!
//! Kernel objects are made with iproute2 (`ip`) and nftables (`nft -f -`, one atomic
//! transaction each); shoal's rules live in a table of its own per bridge (`ip shoal_<bridge>`)
//! and never touch anyone else's. The state that ties them together is in files under
//! [`RUN_DIR`], shared by every shoal process of the machine (agents and `shoal run`), under one
//! `flock` per bridge:
//! - `/run/shoal/netns/<id>`: the container's network namespace (an nsfs bind mount) and
//!   `<id>.json`: who owns it (the container dir, the bridge state dir);
//! - `/run/shoal/net/<bridge>@<netns inode>/`: a bridge's state in one network namespace (test
//!   hosts share /run but not their network namespaces): `ip/<addr>` and `ports/<proto>-<port>`
//!   each name the container holding that address or host port.
//!
//! `detach` is idempotent and finds everything from those files, so a container removed after
//! a crash of whoever made it still gives back its address and ports; the bridge, its table and
//! its firewall exceptions go when the bridge's last address is released.

mod cmd;
mod etc;
mod overlay;
mod ports;

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use etc::{etc_mounts, write_etc_files, EtcOptions};
pub use overlay::{program_mesh, program_vips, set_peers, MeshPort, OverlayAttach, VXLAN_PORT};
pub use ports::{parse_publish, PortSpec, Protocol, Published};

/// Where shoal keeps the machine's network state (on tmpfs: gone with a reboot, as the
/// kernel objects it describes are).
pub const RUN_DIR: &str = "/run/shoal";
/// The default node bridge.
pub const DEFAULT_BRIDGE: &str = "shoal0";
/// The default node bridge's subnet (the bridge holds its first address).
pub const DEFAULT_BRIDGE_SUBNET: &str = "10.213.0.0/16";
/// A container's attachment record, in its directory.
pub const ATTACHMENT_FILE: &str = "network.json";
/// The interface a bridge container sees.
const CONTAINER_IFACE: &str = "eth0";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub(super) const IFNAME_MAX: usize = 15;
/// Smallest bridge subnet: a gateway and at least a few containers.
const MIN_PREFIX_ROOM: u8 = 3;

/// Errors of container networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("network {0} not found (this node has bridge, host and none)")]
    UnknownNetwork(String),
    #[error("no free address left in {bridge}'s subnet {subnet}")]
    SubnetFull { bridge: String, subnet: String },
    #[error("host port {0} is already allocated to container {1}")]
    PortAllocated(String, String),
    #[error("host port {0} is already in use on this host")]
    PortInUse(String),
    #[error("no free host port left for {0}")]
    NoFreePort(Protocol),
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = NetError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// How a container is networked (`--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// On the node bridge, with an address, egress and published ports.
    #[default]
    Bridge,
    /// The host's network namespace.
    Host,
    /// A namespace of its own with only `lo`.
    None,
}

impl Mode {
    /// `bridge`, `host`, `none` (`default` is `bridge`); any other name is a network this
    /// node does not have.
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "bridge" | "default" | "" => Ok(Mode::Bridge),
            "host" => Ok(Mode::Host),
            "none" => Ok(Mode::None),
            other => Err(NetError::UnknownNetwork(other.to_string())),
        }
    }

    /// The name `--network` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge",
            Mode::Host => "host",
            Mode::None => "none",
        }
    }
}

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// `a.b.c.d/n`.
    pub fn parse(s: &str) -> Result<Ipv4Cidr> {
        let bad = |reason: &str| NetError::Invalid {
            what: "subnet",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| bad("want ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("not a prefix length"))?;
        if !(8..=32 - MIN_PREFIX_ROOM).contains(&prefix) {
            return Err(bad("the prefix must be /8 to /29"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The first host address: the bridge's, every container's gateway.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    /// Host addresses after the gateway, in order.
    fn hosts(self) -> impl Iterator<Item = Ipv4Addr> {
        let net = u32::from(self.network());
        let last = net | !self.mask();
        (net + 2..last).map(Ipv4Addr::from)
    }

    /// Whether `a` is inside this subnet.
    pub fn contains(self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.network())
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// The node bridge: its name and the subnet it is made with (an existing bridge keeps the
/// address it has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub subnet: Ipv4Cidr,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            name: DEFAULT_BRIDGE.to_string(),
            subnet: Ipv4Cidr::parse(DEFAULT_BRIDGE_SUBNET).expect("the default subnet parses"),
        }
    }
}

impl BridgeConfig {
    /// A bridge named `name` (checked: an interface name) on `subnet`.
    pub fn new(name: &str, subnet: &str) -> Result<BridgeConfig> {
        let ok = !name.is_empty()
            && name.len() <= IFNAME_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(NetError::Invalid {
                what: "bridge name",
                value: name.to_string(),
                reason: "use 1-15 letters, digits, '_' or '-'".into(),
            });
        }
        Ok(BridgeConfig {
            name: name.to_string(),
            subnet: Ipv4Cidr::parse(subnet)?,
        })
    }

    /// `SHOAL_BRIDGE` and `SHOAL_BRIDGE_SUBNET`, else the defaults.
    pub fn from_env() -> Result<BridgeConfig> {
        let name = std::env::var("SHOAL_BRIDGE").unwrap_or_else(|_| DEFAULT_BRIDGE.into());
        let subnet =
            std::env::var("SHOAL_BRIDGE_SUBNET").unwrap_or_else(|_| DEFAULT_BRIDGE_SUBNET.into());
        BridgeConfig::new(&name, &subnet)
    }

    /// shoal's nftables table for this bridge.
    fn table(&self) -> String {
        format!("shoal_{}", self.name.replace('-', "_"))
    }
}

/// What a container asks of the network.
#[derive(Debug, Clone, Default)]
pub struct NetRequest {
    pub mode: Mode,
    /// `-p` mappings (bridge only).
    pub publish: Vec<PortSpec>,
    /// Cluster networks to join besides the bridge (bridge mode only).
    pub overlays: Vec<OverlayAttach>,
    /// The other nodes' underlay addresses, for the overlays' forwarding entries.
    pub peers: Vec<Ipv4Addr>,
}

/// What a container got: kept in its directory as [`ATTACHMENT_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub mode: Mode,
    /// The namespace file the container joins (none for `host`).
    pub netns: Option<PathBuf>,
    pub bridge: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub prefix: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    /// The host end of the veth pair.
    pub veth: Option<String>,
    pub ports: Vec<Published>,
    /// The cluster networks it joined (`eth1`, `eth2`, … in that order).
    #[serde(default)]
    pub overlays: Vec<OverlayAttach>,
}

impl Attachment {
    /// Read a container's attachment from its directory (`None` if it has none).
    pub fn load(container_dir: &Path) -> Option<Attachment> {
        let text = std::fs::read(container_dir.join(ATTACHMENT_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Save it in the container's directory.
    pub fn save(&self, container_dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| NetError::Io {
            what: "encode the attachment".into(),
            source: io::Error::other(e),
        })?;
        let tmp = container_dir.join(format!("{ATTACHMENT_FILE}.tmp"));
        std::fs::write(&tmp, text).map_err(io_err(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, container_dir.join(ATTACHMENT_FILE))
            .map_err(io_err("save the attachment"))
    }

    /// `0.0.0.0:8080->80/tcp, …` as `docker ps` shows ports.
    pub fn ports_text(&self) -> String {
        self.ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Point a container's spec at its network: join the attachment's namespace (or stay in the
/// host's for `host`), and bind its /etc files from `dir` (see [`write_etc_files`]).
pub fn apply_to_spec(
    spec: &mut oci_spec::runtime::Spec,
    att: &Attachment,
    dir: &Path,
) -> Result<()> {
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
    if let Some(mut linux) = spec.linux().clone() {
        let mut nss: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        if let Some(ns) = &att.netns {
            let n = LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(ns.clone())
                .build()
                .map_err(|e| NetError::Invalid {
                    what: "network namespace",
                    value: ns.display().to_string(),
                    reason: e.to_string(),
                })?;
            nss.push(n);
        }
        linux.set_namespaces(Some(nss));
        spec.set_linux(Some(linux));
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|m| {
        !etc::ETC_FILES
            .iter()
            .any(|(_, d)| m.destination() == Path::new(d))
    });
    mounts.extend(etc_mounts(dir));
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// A UDP socket bound to `addr` inside the network namespace at `ns` (the process stays where
/// it is; the socket keeps belonging to that namespace), non-blocking, for an async runtime.
pub fn udp_socket_in_netns(ns: &Path, addr: std::net::SocketAddr) -> Result<std::net::UdpSocket> {
    let file = File::open(ns).map_err(io_err(format!("open {}", ns.display())))?;
    std::thread::spawn(move || -> io::Result<std::net::UdpSocket> {
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    .map_err(io_err(format!("bind {addr} in {}", ns.display())))
}

/// Who owns a network namespace file: written beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Owner {
    container_dir: PathBuf,
    /// The bridge state dir its address and ports are in, if any.
    state: Option<PathBuf>,
    bridge: Option<String>,
    /// The state dirs of the overlays it joined, in order.
    #[serde(default)]
    overlays: Vec<PathBuf>,
}

fn netns_dir() -> PathBuf {
    Path::new(RUN_DIR).join("netns")
}

/// The network namespace file of container `id`.
pub fn netns_path(id: &str) -> PathBuf {
    netns_dir().join(id)
}

fn owner_path(id: &str) -> PathBuf {
    netns_dir().join(format!("{id}.json"))
}

/// The state dir of `bridge` in this process's network namespace.
pub(super) fn state_dir(bridge: &str) -> Result<PathBuf> {
    Ok(Path::new(RUN_DIR)
        .join("net")
        .join(format!("{bridge}@{}", netns_ino()?)))
}

/// The inode of this thread's network namespace: what keys its state dirs.
pub(super) fn netns_ino() -> Result<u64> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(io_err("read this network namespace"))?
        .ino())
}

/// Attempts at locking a state dir that its last user is removing at the same moment.
const LOCK_ATTEMPTS: u32 = 100;

/// An exclusive lock on a bridge's state dir (made if missing).
pub(super) fn lock_state(state: &Path) -> Result<nix::fcntl::Flock<File>> {
    let p = state.join("lock");
    for _ in 0..LOCK_ATTEMPTS {
        std::fs::create_dir_all(state).map_err(io_err(format!("create {}", state.display())))?;
        let f = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
        {
            Ok(f) => f,
            // Removed between the two calls: again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(format!("open {}", p.display()))(e)),
        };
        let Some(lock) = lock_current(f, &p)? else {
            continue;
        };
        for d in ["ip", "ports"] {
            std::fs::create_dir_all(state.join(d))
                .map_err(io_err(format!("create {}", state.display())))?;
        }
        return Ok(lock);
    }
    Err(NetError::Io {
        what: format!("lock {}", p.display()),
        source: io::Error::other("the state dir kept being removed"),
    })
}

/// An exclusive lock on an existing state dir; `None` when there is none (nothing to
/// release there: a state dir is removed only once it holds no record).
pub(super) fn lock_existing(state: &Path) -> Result<Option<nix::fcntl::Flock<File>>> {
    let p = state.join("lock");
    let f = match std::fs::OpenOptions::new().write(true).open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("open {}", p.display()))(e)),
    };
    lock_current(f, &p)
}

/// Locks `f` (the state dir's lock file `p`, opened): `None` when, once locked, it is no longer
/// the file at `p` (its state dir was removed meanwhile).
fn lock_current(f: File, p: &Path) -> Result<Option<nix::fcntl::Flock<File>>> {
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err(format!("lock {}", p.display()))(e.into()))?;
    let held = lock
        .metadata()
        .map_err(io_err(format!("stat {}", p.display())))?;
    match std::fs::metadata(p) {
        Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => Ok(Some(lock)),
        _ => Ok(None),
    }
}

/// Removes a state dir that holds no record any more (its lock held by the caller): a state
/// dir lives only while something in its namespace holds an address, a port or an overlay
/// membership. Anyone waiting for the lock finds, once it has it, that the file is gone and
/// starts over; anyone arriving later makes a fresh dir.
pub(super) fn remove_if_empty(state: &Path) -> Result<()> {
    let empty = |d: &str| {
        std::fs::read_dir(state.join(d))
            .map(|mut e| e.next().is_none())
            .unwrap_or(true)
    };
    if !(empty("ip") && empty("ports")) {
        return Ok(());
    }
    for d in ["ip", "ports"] {
        match std::fs::remove_dir(state.join(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(format!("remove {}", state.join(d).display()))(e))
            }
            _ => {}
        }
    }
    let p = state.join("lock");
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err(format!("remove {}", p.display()))(e))
        }
        _ => {}
    }
    // Fails harmlessly when someone made a new lock in it meanwhile.
    let _ = std::fs::remove_dir(state);
    Ok(())
}

/// The host end of container `id`'s veth pair.
fn veth_name(id: &str) -> String {
    let short: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(IFNAME_MAX - 3)
        .collect();
    format!("shv{short}")
}

/// A MAC address from the IPv4 address (Docker's scheme: 02:42 then the address), so a reused
/// address never meets a neighbour's stale ARP entry for another MAC.
pub(super) fn mac_for(a: Ipv4Addr) -> String {
    let o = a.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Give container `id` (its directory `container_dir`) the network it asks for. On failure
/// nothing is left behind.
pub fn attach(
    cfg: &BridgeConfig,
    id: &str,
    container_dir: &Path,
    req: &NetRequest,
) -> Result<Attachment> {
    if req.mode == Mode::Host && !req.overlays.is_empty() {
        return Err(NetError::Invalid {
            what: "cluster networks with --network",
            value: req.mode.name().into(),
            reason: "cluster networks are joined from the container's own namespace".into(),
        });
    }
    if req.mode != Mode::Bridge && !req.publish.is_empty() {
        return Err(NetError::Invalid {
            what: "--publish with --network",
            value: req.mode.name().into(),
            reason: "ports are published only from bridge networking".into(),
        });
    }
    let mut att = Attachment {
        mode: req.mode,
        ..Attachment::default()
    };
    if req.mode == Mode::Host {
        return Ok(att);
    }
    let r = (|| {
        let state = if req.mode == Mode::Bridge {
            Some(state_dir(&cfg.name)?)
        } else {
            None
        };
        let mut owner = Owner {
            container_dir: container_dir.to_path_buf(),
            state: state.clone(),
            bridge: (req.mode == Mode::Bridge).then(|| cfg.name.clone()),
            overlays: req
                .overlays
                .iter()
                .map(|o| overlay::state_dir(o.vni))
                .collect::<Result<_>>()?,
        };
        let ns = netns_path(id);
        write_owner(id, &owner)?;
        cmd::create_netns(&ns)?;
        att.netns = Some(ns.clone());
        match state {
            None => cmd::in_netns(&ns, "bring lo up", "link set lo up\n")?,
            Some(state) => attach_bridge(cfg, id, &state, &ns, req, &mut att)?,
        }
        if !req.overlays.is_empty() {
            owner.overlays = overlay::join(id, &ns, &req.overlays, &req.peers)?;
            write_owner(id, &owner)?;
            att.overlays = req.overlays.clone();
        }
        att.save(container_dir)?;
        Ok(att.clone())
    })();
    if r.is_err() {
        let _ = detach(id);
    }
    r
}

fn write_owner(id: &str, owner: &Owner) -> Result<()> {
    std::fs::create_dir_all(netns_dir()).map_err(io_err("create the netns dir"))?;
    let text = serde_json::to_vec(owner).map_err(|e| NetError::Io {
        what: "encode the namespace owner".into(),
        source: io::Error::other(e),
    })?;
    std::fs::write(owner_path(id), text).map_err(io_err("write the namespace owner"))
}

fn attach_bridge(
    cfg: &BridgeConfig,
    id: &str,
    state: &Path,
    ns: &Path,
    req: &NetRequest,
    att: &mut Attachment,
) -> Result<()> {
    let _lock = lock_state(state)?;
    let (subnet, made) = cmd::ensure_bridge(cfg)?;
    if made {
        // No container of this namespace can be on a bridge that did not exist: what the
        // state dir still lists is left from a namespace that had this inode before.
        purge(state)?;
    }
    let address = allocate_address(cfg, state, subnet, id)?;
    let veth = veth_name(id);
    att.bridge = Some(cfg.name.clone());
    att.address = Some(address);
    att.prefix = Some(subnet.prefix);
    att.gateway = Some(subnet.gateway());
    att.veth = Some(veth.clone());
    cmd::ip_batch(
        "make the container's veth pair",
        &format!(
            "link add {veth} type veth peer name {CONTAINER_IFACE} address {mac} netns {ns}\n\
             link set {veth} master {bridge}\n\
             link set {veth} up\n",
            mac = mac_for(address),
            ns = ns.display(),
            bridge = cfg.name,
        ),
    )?;
    cmd::in_netns(
        ns,
        "configure the container's interfaces",
        &format!(
            "link set lo up\n\
             addr add {address}/{prefix} dev {CONTAINER_IFACE}\n\
             link set {CONTAINER_IFACE} up\n\
             route add default via {gw}\n",
            prefix = subnet.prefix,
            gw = subnet.gateway(),
        ),
    )?;
    att.ports = ports::publish(cfg, state, id, address, &req.publish)?;
    Ok(())
}

/// The first free host address of the subnet, recorded as `ip/<addr>` naming `id`.
fn allocate_address(
    cfg: &BridgeConfig,
    state: &Path,
    subnet: Ipv4Cidr,
    id: &str,
) -> Result<Ipv4Addr> {
    let dir = state.join("ip");
    for a in subnet.hosts() {
        let p = dir.join(a.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(id.as_bytes())
                    .map_err(io_err(format!("write {}", p.display())))?;
                return Ok(a);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("create {}", p.display()))(e)),
        }
    }
    Err(NetError::SubnetFull {
        bridge: cfg.name.clone(),
        subnet: subnet.to_string(),
    })
}

/// Forgets every address and port reservation of a state dir (its lock held).
pub(super) fn purge(state: &Path) -> Result<()> {
    for d in ["ip", "ports"] {
        for e in std::fs::read_dir(state.join(d))
            .into_iter()
            .flatten()
            .flatten()
        {
            std::fs::remove_file(e.path())
                .map_err(io_err(format!("remove {}", e.path().display())))?;
        }
    }
    Ok(())
}

/// Files in `dir` whose content names `id` first.
pub(super) fn owned_by(dir: &Path, id: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path()) {
            if text.split_whitespace().next() == Some(id) {
                out.push((e.path(), text));
            }
        }
    }
    out
}

/// Undo everything [`attach`] made for container `id`: its published ports, its address, its
/// veth pair and its namespace; the bridge too when no container is left on it. Safe to call
/// again, and for a container that never had a network.
pub fn detach(id: &str) -> Result<()> {
    let owner: Option<Owner> = std::fs::read(owner_path(id))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    let mut first_err = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    };
    if let Some(o) = &owner {
        note(overlay::leave(id, &o.overlays));
    }
    if let Some(Owner {
        state: Some(state),
        bridge: Some(bridge),
        ..
    }) = &owner
    {
        note(detach_bridge(id, state, bridge));
    }
    note(cmd::remove_netns(&netns_path(id)));
    match std::fs::remove_file(owner_path(id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            note(Err(io_err("remove the namespace owner")(e)))
        }
        _ => {}
    }
    first_err.map_or(Ok(()), Err)
}

fn detach_bridge(id: &str, state: &Path, bridge: &str) -> Result<()> {
    // Kernel objects only in the namespace they were made in: another one may have a bridge
    // of the same name (test hosts). Elsewhere only the records are released.
    let here = state_dir(bridge)? == state;
    let Some(_lock) = lock_existing(state)? else {
        return Ok(());
    };
    let cfg = BridgeConfig {
        name: bridge.to_string(),
        subnet: BridgeConfig::default().subnet,
    };
    ports::unpublish(&cfg, state, id, here)?;
    // The veth goes with the namespace, but the namespace may live on in a mount namespace
    // that copied its file: delete the host end so the address is free for real.
    let veth = veth_name(id);
    if here && cmd::link_exists(&veth) {
        cmd::ip_batch("remove the container's veth", &format!("link del {veth}\n"))?;
    }
    for (p, _) in owned_by(&state.join("ip"), id) {
        std::fs::remove_file(&p).map_err(io_err(format!("remove {}", p.display())))?;
    }
    let empty = std::fs::read_dir(state.join("ip"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if here && empty {
        cmd::remove_bridge(&cfg)?;
    }
    remove_if_empty(state)
}

/// Removes the state dirs (`<name>@<inode>` under `/run/shoal/net`) of network namespaces that
/// no longer exist: a test bed host removed without its containers' networks released, say.
/// A namespace is alive while a process or thread is in it, a file descriptor holds it or a
/// mount (in any mount namespace) pins it. Returns how many were removed.
pub fn sweep_stale_state() -> usize {
    let net = Path::new(RUN_DIR).join("net");
    let stale = |live: &std::collections::HashSet<u64>| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&net)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.rsplit_once('@'))
                    .and_then(|(_, ino)| ino.parse::<u64>().ok())
                    .is_some_and(|ino| !live.contains(&ino))
            })
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    let candidates = stale(&live_netns());
    if candidates.is_empty() {
        return 0;
    }
    // Locked, then looked at again: an inode freed by a dead namespace may belong to a new
    // one by now, whose first container is using the dir.
    let mut locks = Vec::new();
    for c in candidates {
        match lock_existing(&c) {
            Ok(Some(l)) => locks.push((c, l)),
            Ok(None) => {}
            Err(e) => tracing::warn!("sweep {}: {e}", c.display()),
        }
    }
    let still = stale(&live_netns());
    let mut n = 0;
    for (c, _lock) in locks.iter().filter(|(c, _)| still.contains(c)) {
        match purge(c).and_then(|()| remove_if_empty(c)) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!("sweep {}: {e}", c.display()),
        }
    }
    n
}

/// The inodes of every network namespace in use on this machine (as far as this process can
/// see: it must run in the machine's pid namespace).
pub fn live_netns() -> std::collections::HashSet<u64> {
    let mut live = std::collections::HashSet::new();
    let mut mount_nss = std::collections::HashSet::new();
    let ns_ino =
        |link: &str| -> Option<u64> { link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok() };
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = p.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = p.path();
        for t in std::fs::read_dir(dir.join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(m) = std::fs::metadata(t.path().join("ns/net")) {
                live.insert(m.ino());
            }
        }
        for fd in std::fs::read_dir(dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(ino) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| ns_ino(&l.to_string_lossy()))
            {
                live.insert(ino);
            }
        }
        // Namespace files bind-mounted somewhere (`ip netns`, shoal's own): once per mount
        // namespace.
        let Ok(mnt) = std::fs::metadata(dir.join("ns/mnt")) else {
            continue;
        };
        if !mount_nss.insert(mnt.ino()) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(dir.join("mountinfo")) else {
            continue;
        };
        for l in info.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            let fstype = f.iter().position(|w| *w == "-").and_then(|i| f.get(i + 1));
            if fstype == Some(&"nsfs") {
                if let Some(ino) = f.get(3).and_then(|root| ns_ino(root)) {
                    live.insert(ino);
                }
            }
        }
    }
    live
}

/// Detach every container of `containers_dir` whose network this machine still holds although
/// its directory is gone (whoever removed it crashed first, say). Returns how many. Other
/// data dirs' containers are their agents' to sweep.
pub fn sweep(containers_dir: &Path) -> usize {
    release(containers_dir, true)
}

/// Detach every container of `containers_dir` that has a network, gone or not (a node torn
/// down: its agent killed, its containers deleted). Returns how many.
pub fn release_all(containers_dir: &Path) -> usize {
    release(containers_dir, false)
}

fn release(containers_dir: &Path, only_gone: bool) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(netns_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let Some(owner) = std::fs::read(e.path())
            .ok()
            .and_then(|t| serde_json::from_slice::<Owner>(&t).ok())
        else {
            continue;
        };
        if owner.container_dir.parent() == Some(containers_dir)
            && !(only_gone && owner.container_dir.exists())
        {
            match detach(id) {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(%id, "release a dead container's network: {e}"),
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_count() {
        let s = Ipv4Cidr::parse("10.213.7.9/16").unwrap();
        assert_eq!(s.network(), Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.to_string(), "10.213.0.0/16");
        assert!(s.contains(Ipv4Addr::new(10, 213, 255, 1)));
        assert!(!s.contains(Ipv4Addr::new(10, 214, 0, 1)));
        let small = Ipv4Cidr::parse("192.168.9.0/29").unwrap();
        let hosts: Vec<_> = small.hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(192, 168, 9, 2)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(192, 168, 9, 6)));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/30",
            "10.0.0.0/4",
            "x/16",
            "10.0.0.0/x",
        ] {
            assert!(Ipv4Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_modes() {
        assert!(BridgeConfig::new("shoal0", "10.1.0.0/16").is_ok());
        assert!(BridgeConfig::new("a-very-long-bridge", "10.1.0.0/16").is_err());
        assert!(BridgeConfig::new("fifteen-chars-0", "10.1.0.0/16").is_ok());
        assert!(BridgeConfig::new("br;rm", "10.1.0.0/16").is_err());
        assert_eq!(BridgeConfig::default().table(), "shoal_shoal0");
        assert_eq!(Mode::parse("bridge").unwrap(), Mode::Bridge);
        assert_eq!(Mode::parse("none").unwrap(), Mode::None);
        assert!(matches!(
            Mode::parse("backend"),
            Err(NetError::UnknownNetwork(_))
        ));
        let v = veth_name(&"ab".repeat(32));
        assert!(v.len() <= IFNAME_MAX, "{v}");
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 213, 0, 2)),
            "02:42:0a:d5:00:02".to_string()
        );
    }
}
