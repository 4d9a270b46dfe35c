//! Published ports: `-p [IP:][HOSTPORT:]CONTAINERPORT[/tcp|udp]` parsed as Docker does, host
//! ports reserved under the bridge's state dir (`ports/<proto>-<port>`), and one nftables map
//! element each (`ports`, or `ports_ip` for a port published on one host address).

use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{cmd, io_err, owned_by, BridgeConfig, NetError, Result};

/// Where a random host port is taken from when the kernel's ephemeral range is unreadable.
const FALLBACK_PORT_RANGE: (u16, u16) = (32768, 60999);

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One `-p` as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The host address it is published on (all of them when `None`).
    pub host_ip: Option<Ipv4Addr>,
    /// The host port (a free one is chosen when `None`).
    pub host_port: Option<u16>,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// One port as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// `0.0.0.0` for every host address.
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}->{}/{}",
            self.host_ip, self.host_port, self.container_port, self.protocol
        )
    }
}

fn port(s: &str, value: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(NetError::Invalid {
            what: "port",
            value: value.to_string(),
            reason: format!("{s:?} is not a port (1-65535)"),
        }),
    }
}

/// `-p` in Docker's forms: `80`, `8080:80`, `127.0.0.1:8080:80`, `127.0.0.1::80`, each with
/// an optional `/tcp` or `/udp`.
pub fn parse_publish(s: &str) -> Result<PortSpec> {
    let bad = |reason: &str| NetError::Invalid {
        what: "--publish",
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let (rest, protocol) = match s.rsplit_once('/') {
        Some((r, "tcp")) => (r, Protocol::Tcp),
        Some((r, "udp")) => (r, Protocol::Udp),
        Some((_, p)) => return Err(bad(&format!("unknown protocol {p:?} (tcp or udp)"))),
        None => (s, Protocol::Tcp),
    };
    if rest.contains('-') {
        return Err(bad("port ranges are not supported"));
    }
    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, host, container) = match parts.as_slice() {
        [c] => (None, None, *c),
        [h, c] => (None, Some(*h), *c),
        [ip, h, c] => (Some(*ip), Some(*h).filter(|h| !h.is_empty()), *c),
        _ => return Err(bad("want [IP:][HOSTPORT:]CONTAINERPORT[/PROTOCOL]")),
    };
    let host_ip = match ip {
        None => None,
        Some(a) => {
            let a: Ipv4Addr = a
                .parse()
                .map_err(|_| bad(&format!("{a:?} is not an IPv4 address")))?;
            (!a.is_unspecified()).then_some(a)
        }
    };
    Ok(PortSpec {
        host_ip,
        host_port: host.map(|h| port(h, s)).transpose()?,
        container_port: port(container, s)?,
        protocol,
    })
}

fn port_file(state: &Path, protocol: Protocol, port: u16) -> std::path::PathBuf {
    state.join("ports").join(format!("{protocol}-{port}"))
}

/// Whether something on this host already listens on the port (a bind attempt).
fn bound_on_host(ip: Ipv4Addr, port: u16, protocol: Protocol) -> bool {
    let r = match protocol {
        Protocol::Tcp => std::net::TcpListener::bind((ip, port)).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind((ip, port)).map(drop),
    };
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or(FALLBACK_PORT_RANGE)
}

/// Reserve and program `specs` for container `id` at `address`; on failure what this call
/// reserved is released again (the caller detaches the rest).
pub(super) fn publish(
    cfg: &BridgeConfig,
    state: &Path,
    id: &str,
    address: Ipv4Addr,
    specs: &[PortSpec],
) -> Result<Vec<Published>> {
    let mut out: Vec<Published> = Vec::new();
    for s in specs {
        let host_ip = s.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let taken = |p: u16| {
            port_file(state, s.protocol, p).exists()
                || out
                    .iter()
                    .any(|o| o.host_port == p && o.protocol == s.protocol)
        };
        let host_port = match s.host_port {
            Some(p) => {
                let f = port_file(state, s.protocol, p);
                if let Ok(text) = std::fs::read_to_string(&f) {
                    let owner = text.split_whitespace().next().unwrap_or("?");
                    return Err(NetError::PortAllocated(
                        format!("{p}/{}", s.protocol),
                        owner.chars().take(12).collect(),
                    ));
                }
                if taken(p) {
                    return Err(NetError::Invalid {
                        what: "--publish",
                        value: format!("{p}/{}", s.protocol),
                        reason: "published twice".into(),
                    });
                }
                if bound_on_host(host_ip, p, s.protocol) {
                    return Err(NetError::PortInUse(format!("{host_ip}:{p}/{}", s.protocol)));
                }
                p
            }
            None => {
                let (lo, hi) = ephemeral_range();
                (lo..=hi)
                    .find(|&p| !taken(p) && !bound_on_host(host_ip, p, s.protocol))
                    .ok_or(NetError::NoFreePort(s.protocol))?
            }
        };
        let f = port_file(state, s.protocol, host_port);
        let line = format!("{id} {host_ip} {address} {}\n", s.container_port);
        std::fs::write(&f, line).map_err(io_err(format!("write {}", f.display())))?;
        out.push(Published {
            host_ip,
            host_port,
            container_port: s.container_port,
            protocol: s.protocol,
        });
    }
    if out.is_empty() {
        return Ok(out);
    }
    let script: String = out
        .iter()
        .map(|p| format!("add element ip {} {}\n", cfg.table(), element(p, address)))
        .collect();
    cmd::nft("publish the container's ports", &script)?;
    Ok(out)
}

/// The nftables map element of a published port: `map { key : address . port }`.
fn element(p: &Published, address: Ipv4Addr) -> String {
    if p.host_ip.is_unspecified() {
        format!(
            "ports {{ {} . {} : {address} . {} }}",
            p.protocol, p.host_port, p.container_port
        )
    } else {
        format!(
            "ports_ip {{ {} . {} . {} : {address} . {} }}",
            p.host_ip, p.protocol, p.host_port, p.container_port
        )
    }
}

/// Remove container `id`'s published ports (map elements only when `here`, in the namespace
/// they were made in; reservations always).
pub(super) fn unpublish(cfg: &BridgeConfig, state: &Path, id: &str, here: bool) -> Result<()> {
    for (f, text) in owned_by(&state.join("ports"), id) {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fields: Vec<&str> = text.split_whitespace().collect();
        let parsed = (|| {
            let (proto, port) = name.split_once('-')?;
            let protocol = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            Some((
                Published {
                    host_ip: fields.get(1)?.parse().ok()?,
                    host_port: port.parse().ok()?,
                    container_port: fields.get(3)?.parse().ok()?,
                    protocol,
                },
                fields.get(2)?.parse::<Ipv4Addr>().ok()?,
            ))
        })();
        if let (true, Some((p, address))) = (here, parsed) {
            // Already gone (a table removed with its bridge) is fine.
            if cmd::table_exists(&cfg.table()) {
                let _ = cmd::nft(
                    "unpublish a port",
                    &format!(
                        "delete element ip {} {}\n",
                        cfg.table(),
                        element(&p, address)
                    ),
                );
            }
        }
        std::fs::remove_file(&f).map_err(io_err(format!("remove {}", f.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_parse_as_docker_does() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            p,
            PortSpec {
                host_ip: None,
                host_port: Some(8080),
                container_port: 80,
                protocol: Protocol::Tcp
            }
        );
        let p = parse_publish("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(parse_publish("80").unwrap().host_port, None);
        assert_eq!(parse_publish("127.0.0.1::80").unwrap().host_port, None);
        assert_eq!(parse_publish("0.0.0.0:81:80").unwrap().host_ip, None);
        for bad in [
            "",
            "0",
            "70000",
            "80/sctp",
            "a:80",
            "1.2.3:80:80",
            "8080-8081:80",
            "1:2:3:4",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn published_ports_print_as_docker_ps_does() {
        let p = Published {
            host_ip: Ipv4Addr::UNSPECIFIED,
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(p.to_string(), "0.0.0.0:8080->80/tcp");
        assert_eq!(
            element(&p, Ipv4Addr::new(10, 213, 0, 2)),
            "ports { tcp . 8080 : 10.213.0.2 . 80 }"
        );
    }
}
