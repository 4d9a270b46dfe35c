//! Cluster networks: the spec check, subnet and VNI allocation. The store refuses overlapping
//! subnets, a VNI in use and a name taken at apply; this picks free ones so a create rarely
//! meets a refusal.

use shoal_proto::v1 as pb;

use crate::store::{overlaps, parse_cidr, MAX_VNI};

use super::validate::Invalid;

/// The pool subnets are taken from when a create gives none (swarm's default: 10.0.0.0/8).
pub const DEFAULT_POOL: &str = "10.0.0.0/8";
/// The size of an allocated subnet (swarm's default).
pub const DEFAULT_PREFIX: u8 = 24;
/// The ingress network's VNI unless `cluster init --vni-start` says otherwise; cluster networks
/// are given the ones above it (swarm's first one is 4097 too: lower ones are left to the
/// operator).
pub const DEFAULT_VNI_START: u32 = 4096;
/// Node-local subnets no cluster network is given by default (shoal's default node bridge).
const RESERVED: [&str; 2] = ["10.213.0.0/16", INGRESS_SUBNET];
/// The drivers a cluster network can have.
const DRIVERS: [&str; 1] = ["overlay"];
/// Longest network name (Docker's limit for names is looser; this keeps interface names and
/// DNS labels sane).
const MAX_NAME: usize = 63;

/// The routing mesh's network: made with the cluster, its id is its name.
pub const INGRESS: &str = crate::store::INGRESS_NETWORK;
/// Its subnet (its VXLAN id is the cluster's VNI start, never handed out).
const INGRESS_SUBNET: &str = "10.255.0.0/16";

/// The cluster's VNI start (`NetworkConfig.vni_start`, 0 meaning the default).
pub fn vni_start(spec: Option<&pb::ClusterSpec>) -> u32 {
    match spec
        .and_then(|s| s.network.as_ref())
        .map_or(0, |n| n.vni_start)
    {
        0 => DEFAULT_VNI_START,
        v => v,
    }
}

/// Checks a VNI start `cluster init` was given (0: the default): the ingress network's VNI and
/// room above it.
pub fn check_vni_start(v: u32) -> Result<(), Invalid> {
    if v != 0 && !(1..MAX_VNI).contains(&v) {
        return Err(invalid(format!(
            "invalid VNI start {v}: want 1-{} (the ingress network's; networks get the ones above)",
            MAX_VNI - 1
        )));
    }
    Ok(())
}

/// The ingress network as `cluster init` creates it, on VXLAN id `vni_start`.
pub fn ingress_network(vni_start: u32) -> pb::Network {
    pb::Network {
        meta: Some(pb::Meta {
            id: INGRESS.into(),
            ..Default::default()
        }),
        spec: Some(pb::NetworkSpec {
            name: INGRESS.into(),
            driver: "overlay".into(),
            ..Default::default()
        }),
        subnet: INGRESS_SUBNET.into(),
        gateway: "10.255.0.1".into(),
        vni: vni_start,
    }
}

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

fn ip(a: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(a)
}

/// A network spec as `network create` sends it: a name, a known driver, a subnet and gateway
/// that make sense together, no option shoal does not implement.
pub fn network_spec(spec: &pb::NetworkSpec) -> Result<(), Invalid> {
    let name = &spec.name;
    let name_ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !name_ok {
        return Err(invalid(format!(
            "invalid network name {name:?}: 1-{MAX_NAME} letters, digits, '_', '-', '.', starting with a letter or digit"
        )));
    }
    if matches!(name.as_str(), "bridge" | "host" | "none" | "ingress") {
        return Err(invalid(format!(
            "network name {name} is reserved for a predefined network"
        )));
    }
    let driver = if spec.driver.is_empty() {
        "overlay"
    } else {
        &spec.driver
    };
    if !DRIVERS.contains(&driver) {
        return Err(invalid(format!(
            "network driver {driver} is not supported: a cluster network is an overlay"
        )));
    }
    if let Some(k) = spec.options.keys().next() {
        return Err(invalid(format!("network option {k} is not supported")));
    }
    if !spec.subnet.is_empty() {
        let (net, prefix) = parse_cidr(&spec.subnet)
            .ok_or_else(|| invalid(format!("invalid subnet {:?}: want A.B.C.D/N", spec.subnet)))?;
        if !(8..=29).contains(&prefix) {
            return Err(invalid(format!(
                "invalid subnet {}: the prefix must be /8 to /29",
                spec.subnet
            )));
        }
        if !spec.gateway.is_empty() {
            let gw: std::net::Ipv4Addr = spec
                .gateway
                .parse()
                .map_err(|_| invalid(format!("invalid gateway {:?}", spec.gateway)))?;
            let last = net | !(u32::MAX << (32 - prefix));
            let g = u32::from(gw);
            if g <= net || g >= last || !overlaps((g, 32), (net, prefix)) {
                return Err(invalid(format!(
                    "gateway {gw} is not a host address of subnet {}",
                    spec.subnet
                )));
            }
        }
    } else if !spec.gateway.is_empty() {
        return Err(invalid("a gateway needs a subnet"));
    }
    Ok(())
}

/// The subnet, gateway and VNI of a new network beside `existing`: the given subnet, or the
/// first free /24 of the default pool that holds none of `node_ips`; the given gateway, or the subnet's first host; the
/// lowest free VNI above the cluster's `vni_start`.
pub fn allocate(
    spec: &pb::NetworkSpec,
    existing: &[pb::Network],
    node_ips: &[std::net::Ipv4Addr],
    vni_start: u32,
) -> Result<(String, String, u32), Invalid> {
    // Never a subnet holding a node's own address: its traffic would go into the overlay.
    let taken: Vec<(u32, u8)> = existing
        .iter()
        .filter_map(|n| parse_cidr(&n.subnet))
        .chain(node_ips.iter().map(|ip| (u32::from(*ip), 32)))
        .collect();
    let (net, prefix) = if spec.subnet.is_empty() {
        let (pool, pool_prefix) = parse_cidr(DEFAULT_POOL).ok_or_else(|| invalid("bad pool"))?;
        let reserved: Vec<(u32, u8)> = RESERVED.iter().filter_map(|r| parse_cidr(r)).collect();
        let count = 1u32 << (DEFAULT_PREFIX - pool_prefix);
        let step = 1u32 << (32 - DEFAULT_PREFIX);
        (0..count)
            .map(|i| (pool + i * step, DEFAULT_PREFIX))
            .find(|c| !taken.iter().chain(&reserved).any(|t| overlaps(*c, *t)))
            .ok_or_else(|| invalid(format!("no free /{DEFAULT_PREFIX} left in {DEFAULT_POOL}")))?
    } else {
        let mine = parse_cidr(&spec.subnet)
            .ok_or_else(|| invalid(format!("invalid subnet {:?}", spec.subnet)))?;
        if let Some(n) = existing
            .iter()
            .find(|n| parse_cidr(&n.subnet).is_some_and(|o| overlaps(mine, o)))
        {
            let name = n.spec.as_ref().map_or("", |s| s.name.as_str());
            return Err(invalid(format!(
                "subnet {} overlaps network {name}'s {}",
                spec.subnet, n.subnet
            )));
        }
        mine
    };
    let gateway = if spec.gateway.is_empty() {
        ip(net + 1).to_string()
    } else {
        spec.gateway.clone()
    };
    let vni = (vni_start.saturating_add(1)..=MAX_VNI)
        .find(|v| existing.iter().all(|n| n.vni != *v))
        .ok_or_else(|| invalid("no free VNI left"))?;
    Ok((format!("{}/{prefix}", ip(net)), gateway, vni))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, subnet: &str, gateway: &str) -> pb::NetworkSpec {
        pb::NetworkSpec {
            name: name.into(),
            subnet: subnet.into(),
            gateway: gateway.into(),
            ..Default::default()
        }
    }

    fn net(name: &str, subnet: &str, vni: u32) -> pb::Network {
        pb::Network {
            spec: Some(spec(name, subnet, "")),
            subnet: subnet.into(),
            vni,
            ..Default::default()
        }
    }

    #[test]
    fn specs_are_checked() {
        assert!(network_spec(&spec("backend", "", "")).is_ok());
        assert!(network_spec(&spec("b", "10.9.0.0/16", "10.9.0.254")).is_ok());
        for (s, want) in [
            (spec("", "", ""), "invalid network name"),
            (spec("-x", "", ""), "invalid network name"),
            (spec("a b", "", ""), "invalid network name"),
            (spec("host", "", ""), "reserved"),
            (spec("n", "10.9.0.0", ""), "invalid subnet"),
            (spec("n", "10.9.0.0/30", ""), "the prefix must be"),
            (spec("n", "10.9.0.0/16", "10.10.0.1"), "not a host address"),
            (spec("n", "10.9.0.0/16", "10.9.0.0"), "not a host address"),
            (spec("n", "", "10.9.0.1"), "needs a subnet"),
        ] {
            let e = network_spec(&s).unwrap_err().0;
            assert!(e.contains(want), "{s:?}: {e}");
        }
        let mut s = spec("n", "", "");
        s.driver = "bridge".into();
        assert!(network_spec(&s).unwrap_err().0.contains("not supported"));
        let mut s = spec("n", "", "");
        s.attachable = true;
        assert!(network_spec(&s).is_ok());
        let mut s = spec("n", "", "");
        s.internal = true;
        assert!(network_spec(&s).is_ok());
        let mut s = spec("n", "", "");
        s.options.insert("encrypted".into(), "".into());
        assert!(network_spec(&s).unwrap_err().0.contains("encrypted"));
    }

    #[test]
    fn allocation_takes_the_first_free_subnet_and_vni() {
        let existing = vec![net("a", "10.0.0.0/24", 4097), net("b", "10.0.2.0/23", 4099)];
        let d = DEFAULT_VNI_START;
        let (subnet, gw, vni) = allocate(&spec("c", "", ""), &existing, &[], d).unwrap();
        assert_eq!(
            (subnet.as_str(), gw.as_str(), vni),
            ("10.0.1.0/24", "10.0.1.1", 4098)
        );
        // A cluster given a VNI start of its own: the ones above it.
        let (_, _, vni) = allocate(&spec("c", "", ""), &[], &[], 81_920).unwrap();
        assert_eq!(vni, 81_921);
        // Given subnets are kept (host bits cleared) and refused when they overlap.
        let (subnet, gw, _) =
            allocate(&spec("d", "192.168.7.9/24", ""), &existing, &[], d).unwrap();
        assert_eq!(
            (subnet.as_str(), gw.as_str()),
            ("192.168.7.0/24", "192.168.7.1")
        );
        let e = allocate(&spec("e", "10.0.3.128/25", ""), &existing, &[], d).unwrap_err();
        assert!(e.0.contains("overlaps network b's 10.0.2.0/23"), "{}", e.0);
        // The node bridge's default subnet is never handed out.
        let full: Vec<pb::Network> = [
            "10.0.0.0/9",
            "10.128.0.0/10",
            "10.192.0.0/12",
            "10.208.0.0/14",
            "10.212.0.0/16",
        ]
        .iter()
        .zip(DEFAULT_VNI_START + 1..)
        .map(|(s, v)| net("x", s, v))
        .collect();
        let (subnet, _, _) = allocate(&spec("f", "", ""), &full, &[], d).unwrap();
        assert_eq!(subnet, "10.214.0.0/24");
        // The nodes' own subnets are skipped.
        let nodes = ["10.0.1.7".parse().unwrap(), "10.0.3.1".parse().unwrap()];
        let (subnet, _, _) = allocate(&spec("g", "", ""), &existing[..1], &nodes, d).unwrap();
        assert_eq!(subnet, "10.0.2.0/24");
        assert!(check_vni_start(0).is_ok() && check_vni_start(8192).is_ok());
        for bad in [MAX_VNI, MAX_VNI + 1] {
            assert!(check_vni_start(bad).unwrap_err().0.contains("VNI start"));
        }
    }
}
