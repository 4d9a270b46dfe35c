//! Cluster (overlay) networks on this node: per network a bridge `shb<VNI>` and a kernel VXLAN
//! device `shx<VNI>` enslaved to it, made by the first container that joins and removed with
//! the last; per container a veth from that bridge into its namespace (`eth1`, `eth2`, …) with
//! its cluster-allocated address. Forwarding to other nodes is one all-zero FDB entry per peer
//! node (broadcast and unknown unicast go to every peer; replies are learned), so the only
//! thing a node needs to know is the peer list its dispatcher session sends.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    cmd, io_err, lock_existing, lock_state, mac_for, owned_by, remove_if_empty, NetError, Result,
    IFNAME_MAX,
};

/// The VXLAN UDP port (IANA's).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN adds to every frame (outer IPv4, UDP, VXLAN and inner Ethernet headers).
const VXLAN_OVERHEAD: u32 = 50;
/// The underlay MTU assumed when the route to a peer does not tell.
const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// One cluster network a container joins, as its task's attachment says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayAttach {
    pub network_id: String,
    pub vni: u32,
    /// The container's address on it.
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// A standalone container's attachment (its id in the cluster, given back when the
    /// container is removed); empty for a task's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub attachment: String,
}

fn bridge_name(vni: u32) -> String {
    format!("shb{vni}")
}

fn vxlan_name(vni: u32) -> String {
    format!("shx{vni}")
}

/// The host end of container `id`'s veth on its `index`-th overlay.
fn veth_name(id: &str, index: usize) -> String {
    let short: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(IFNAME_MAX - 4)
        .collect();
    format!("so{}{short}", index % 10)
}

/// The state dir of overlay `vni` in this network namespace (members under `ip/`).
pub(super) fn state_dir(vni: u32) -> Result<PathBuf> {
    super::state_dir(&format!("ov{vni}"))
}

/// The MTU of the overlay: the underlay's less VXLAN's overhead.
fn overlay_mtu() -> u32 {
    let underlay = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|routes| {
            // The default route's device.
            routes.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
            })
        })
        .and_then(|dev| std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu")).ok())
        .and_then(|m| m.trim().parse::<u32>().ok())
        .unwrap_or(DEFAULT_UNDERLAY_MTU);
    underlay.saturating_sub(VXLAN_OVERHEAD).max(576)
}

/// The overlay's bridge and VXLAN device, made if missing, with flood entries for `peers`.
fn ensure(vni: u32, peers: &[Ipv4Addr]) -> Result<u32> {
    let mtu = overlay_mtu();
    let (br, vx) = (bridge_name(vni), vxlan_name(vni));
    if !cmd::link_exists(&vx) {
        cmd::ip_batch(
            "make the overlay's devices",
            &format!(
                "link add {br} type bridge\n\
                 link set {br} mtu {mtu}\n\
                 link add {vx} type vxlan id {vni} dstport {VXLAN_PORT}\n\
                 link set {vx} mtu {mtu} master {br}\n\
                 link set {vx} up\n\
                 link set {br} up\n"
            ),
        )?;
    }
    sync_peers(vni, peers)?;
    Ok(mtu)
}

/// Makes the flood entries of overlay `vni` exactly `peers` (loopback ones skipped: a node
/// never floods to itself).
fn sync_peers(vni: u32, peers: &[Ipv4Addr]) -> Result<()> {
    let vx = vxlan_name(vni);
    let shown = cmd::bridge_fdb_show(&vx)?;
    let have: Vec<Ipv4Addr> = shown
        .lines()
        .filter(|l| l.starts_with("00:00:00:00:00:00 "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|w| *w == "dst")
                .and_then(|i| f.get(i + 1))
                .and_then(|a| a.parse().ok())
        })
        .collect();
    let want: Vec<Ipv4Addr> = peers.iter().copied().filter(|p| !p.is_loopback()).collect();
    let mut batch = String::new();
    for p in want.iter().filter(|p| !have.contains(p)) {
        batch.push_str(&format!("fdb append 00:00:00:00:00:00 dev {vx} dst {p}\n"));
    }
    for p in have.iter().filter(|p| !want.contains(p)) {
        batch.push_str(&format!("fdb del 00:00:00:00:00:00 dev {vx} dst {p}\n"));
    }
    if batch.is_empty() {
        return Ok(());
    }
    cmd::bridge_batch("program the overlay's peers", &batch)
}

/// Joins the container of `id` (namespace `ns`) to each overlay in `overlays`, as `eth1`,
/// `eth2`, …; returns the state dirs it became a member of (for [`leave`]).
pub(super) fn join(
    id: &str,
    ns: &Path,
    overlays: &[OverlayAttach],
    peers: &[Ipv4Addr],
) -> Result<Vec<PathBuf>> {
    let mut joined = Vec::new();
    for (i, o) in overlays.iter().enumerate() {
        let state = state_dir(o.vni)?;
        let _lock = lock_state(&state)?;
        if !cmd::link_exists(&vxlan_name(o.vni)) {
            // Members listed for an overlay this namespace does not have are left from a
            // namespace that had this inode before.
            super::purge(&state)?;
        }
        let mtu = ensure(o.vni, peers)?;
        let member = state.join("ip").join(o.address.to_string());
        std::fs::write(&member, id).map_err(io_err(format!("write {}", member.display())))?;
        joined.push(state.clone());
        let veth = veth_name(id, i);
        let iface = format!("eth{}", i + 1);
        cmd::ip_batch(
            "make the container's overlay veth",
            &format!(
                "link add {veth} mtu {mtu} type veth peer name {iface} mtu {mtu} address {mac} netns {ns}\n\
                 link set {veth} master {br}\n\
                 link set {veth} up\n",
                mac = mac_for(o.address),
                ns = ns.display(),
                br = bridge_name(o.vni),
            ),
        )?;
        cmd::in_netns(
            ns,
            "configure the container's overlay interface",
            &format!(
                "addr add {}/{} dev {iface}\nlink set {iface} up\n",
                o.address, o.prefix
            ),
        )?;
    }
    Ok(joined)
}

/// Takes container `id` off the overlays whose state dirs are `states` (its veths, its
/// membership), and removes an overlay's devices with its last member. Only touches kernel
/// objects when called from the namespace they were made in.
pub(super) fn leave(id: &str, states: &[PathBuf]) -> Result<()> {
    for (i, state) in states.iter().enumerate() {
        let vni: Option<u32> = state
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("ov"))
            .and_then(|n| n.split('@').next())
            .and_then(|n| n.parse().ok());
        let here = vni.is_some_and(|v| state_dir(v).is_ok_and(|s| s == *state));
        let Some(_lock) = lock_existing(state)? else {
            continue;
        };
        let veth = veth_name(id, i);
        if here && cmd::link_exists(&veth) {
            cmd::ip_batch("remove the overlay veth", &format!("link del {veth}\n"))?;
        }
        for (p, _) in owned_by(&state.join("ip"), id) {
            std::fs::remove_file(&p).map_err(io_err(format!("remove {}", p.display())))?;
        }
        let empty = std::fs::read_dir(state.join("ip"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if let (true, true, Some(vni)) = (here, empty, vni) {
            for dev in [vxlan_name(vni), bridge_name(vni)] {
                if cmd::link_exists(&dev) {
                    cmd::ip_batch("remove the overlay", &format!("link del {dev}\n"))?;
                }
            }
        }
        remove_if_empty(state)?;
    }
    Ok(())
}

/// Programs `peers` on every overlay this node's namespace has (the dispatcher's list changed).
pub fn set_peers(peers: &[Ipv4Addr]) -> Result<()> {
    let dir = Path::new(super::RUN_DIR).join("net");
    let ino_suffix = format!("@{}", super::netns_ino()?);
    let mut first_err = None;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vni) = name
            .strip_suffix(&ino_suffix)
            .and_then(|n| n.strip_prefix("ov"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(_lock) = lock_existing(&e.path())? else {
            continue;
        };
        if cmd::link_exists(&vxlan_name(vni)) {
            if let Err(err) = sync_peers(vni, peers) {
                first_err.get_or_insert(err);
            }
        }
    }
    first_err.map_or(Ok(()), Err::<(), NetError>)
}

/// The nftables table of the routing mesh's sandbox.
const INGRESS_TABLE: &str = "shoal_ingress";

/// One port the routing mesh forwards: published port and protocol → the service's tasks on
/// the ingress network, at the target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPort {
    pub published: u16,
    pub protocol: super::Protocol,
    pub target: u16,
    pub tasks: Vec<Ipv4Addr>,
}

fn mesh_script(ports: &[MeshPort]) -> String {
    let rules: String = ports
        .iter()
        .filter(|p| !p.tasks.is_empty())
        .map(|p| {
            let map: Vec<String> = p
                .tasks
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i} : {t} . {}", p.target))
                .collect();
            format!(
                "    {} dport {} dnat ip to numgen random mod {} map {{ {} }}\n",
                p.protocol,
                p.published,
                p.tasks.len(),
                map.join(", ")
            )
        })
        .collect();
    format!(
        "table ip {INGRESS_TABLE}\ndelete table ip {INGRESS_TABLE}\n\
         table ip {INGRESS_TABLE} {{\n\
           chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n\
           chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"eth1\" masquerade\n  }}\n}}\n"
    )
}

/// Programs the routing mesh's sandbox (namespace `ns`, `eth0` on the node bridge where the
/// host's published ports arrive, `eth1` on the ingress network): each published port is
/// forwarded to one of its service's running tasks, the source rewritten to the sandbox's
/// ingress address so replies come back the same way.
pub fn program_mesh(ns: &Path, ports: &[MeshPort]) -> Result<()> {
    cmd::in_netns_sysctl(ns, "net.ipv4.ip_forward", "1")?;
    cmd::in_netns_run(
        ns,
        "program the routing mesh",
        "nft",
        &["-f", "-"],
        &mesh_script(ports),
    )
}

/// The nftables table balancing a container's connections to virtual IPs.
const LB_TABLE: &str = "shoal_lb";

/// The script that makes a container's balancing table exactly `vips` (virtual IP → the
/// running tasks' addresses; one without tasks gets no rule).
fn vip_script(vips: &[(Ipv4Addr, Vec<Ipv4Addr>)]) -> String {
    let mut s = format!("table ip {LB_TABLE}\ndelete table ip {LB_TABLE}\n");
    let rules: Vec<String> = vips
        .iter()
        .filter(|(_, tasks)| !tasks.is_empty())
        .map(|(vip, tasks)| {
            let map: Vec<String> = tasks
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i} : {t}"))
                .collect();
            format!(
                "    ip daddr {vip} dnat to numgen random mod {} map {{ {} }}\n",
                tasks.len(),
                map.join(", ")
            )
        })
        .collect();
    if !rules.is_empty() {
        s.push_str(&format!(
            "table ip {LB_TABLE} {{\n  chain output {{ type nat hook output priority -100; policy accept;\n{}  }}\n}}\n",
            rules.concat()
        ));
    }
    s
}

/// Balances connections made in the container with namespace `ns` to each virtual IP over its
/// service's running tasks (conntrack keeps a connection on the task it was given).
pub fn program_vips(ns: &Path, vips: &[(Ipv4Addr, Vec<Ipv4Addr>)]) -> Result<()> {
    cmd::in_netns_run(
        ns,
        "program the container's virtual IPs",
        "nft",
        &["-f", "-"],
        &vip_script(vips),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel() {
        let id = "y0hq1fb4binga30p52rowajgw";
        for i in 0..12 {
            assert!(veth_name(id, i).len() <= IFNAME_MAX);
        }
        assert_ne!(veth_name(id, 0), veth_name(id, 1));
        assert!(vxlan_name(16_777_215).len() <= IFNAME_MAX);
        assert!(overlay_mtu() >= 576);
    }

    #[test]
    fn the_mesh_forwards_each_port_to_its_tasks() {
        let s = mesh_script(&[
            MeshPort {
                published: 8080,
                protocol: super::super::Protocol::Tcp,
                target: 80,
                tasks: vec!["10.255.0.5".parse().unwrap(), "10.255.0.6".parse().unwrap()],
            },
            MeshPort {
                published: 53,
                protocol: super::super::Protocol::Udp,
                target: 53,
                tasks: vec![],
            },
        ]);
        assert!(s.contains(
            "tcp dport 8080 dnat ip to numgen random mod 2 map { 0 : 10.255.0.5 . 80, 1 : 10.255.0.6 . 80 }"
        ), "{s}");
        assert!(!s.contains("dport 53"));
        assert!(s.contains("oifname \"eth1\" masquerade"));
    }

    #[test]
    fn virtual_ips_balance_over_running_tasks_only() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let s = vip_script(&[
            (ip("10.0.0.2"), vec![ip("10.0.0.5"), ip("10.0.0.6")]),
            (ip("10.0.0.3"), vec![]),
        ]);
        assert!(
            s.starts_with("table ip shoal_lb\ndelete table ip shoal_lb\n"),
            "{s}"
        );
        assert!(s.contains(
            "ip daddr 10.0.0.2 dnat to numgen random mod 2 map { 0 : 10.0.0.5, 1 : 10.0.0.6 }"
        ));
        assert!(!s.contains("10.0.0.3"));
        assert!(!vip_script(&[]).contains("chain"));
    }
}
