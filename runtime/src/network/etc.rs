//! A container's /etc/hosts, /etc/hostname and /etc/resolv.conf: written in its directory and
//! bind-mounted over the image's, as Docker does.

use std::net::IpAddr;
use std::path::Path;

use oci_spec::runtime::{Mount, MountBuilder};

use super::{io_err, Attachment, Mode, NetError, Result};

/// The files and where they go.
pub(super) const ETC_FILES: [(&str, &str); 3] = [
    ("hosts", "/etc/hosts"),
    ("hostname", "/etc/hostname"),
    ("resolv.conf", "/etc/resolv.conf"),
];
/// Docker's fallback when the host has no nameserver a container can reach.
const DEFAULT_NAMESERVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];
/// Largest host resolv.conf read.
const MAX_RESOLV_BYTES: u64 = 64 * 1024;

/// What shapes those files (`--hostname`, `--dns*`, `--add-host`, `--network-alias`).
#[derive(Debug, Clone, Default)]
pub struct EtcOptions {
    pub hostname: String,
    /// `--dns`: replaces the host's nameservers.
    pub dns: Vec<IpAddr>,
    /// `--dns-search`: replaces the host's search domains.
    pub dns_search: Vec<String>,
    /// `--dns-option`: replaces the host's options.
    pub dns_options: Vec<String>,
    /// `--add-host NAME:IP`.
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// More names for the container's own address.
    pub aliases: Vec<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl EtcOptions {
    /// `--add-host` as Docker takes it: `NAME:IP` (or `NAME=IP`; an IPv6 address may follow
    /// the first `:`).
    pub fn parse_add_host(s: &str) -> Result<(String, IpAddr)> {
        let bad = |reason: &str| NetError::Invalid {
            what: "--add-host",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (name, ip) = s
            .split_once('=')
            .or_else(|| s.split_once(':'))
            .ok_or_else(|| bad("want NAME:IP"))?;
        if !valid_name(name) {
            return Err(bad("not a host name"));
        }
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
        Ok((name.to_string(), ip))
    }

    /// A `--dns-search` domain or `--network-alias`, checked.
    pub fn check_name(flag: &'static str, s: &str) -> Result<String> {
        if valid_name(s) {
            Ok(s.to_string())
        } else {
            Err(NetError::Invalid {
                what: flag,
                value: s.to_string(),
                reason: "use letters, digits, '-', '_' and '.'".into(),
            })
        }
    }
}

fn read_capped(p: &Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.take(MAX_RESOLV_BYTES).read_to_string(&mut s);
    }
    s
}

fn is_loopback_nameserver(line: &str) -> bool {
    line.split_whitespace()
        .nth(1)
        .and_then(|a| a.parse::<IpAddr>().ok())
        .is_some_and(|a| a.is_loopback())
}

/// The container's resolv.conf from the host's: for a container with a namespace of its own,
/// loopback nameservers (a local cache such as systemd-resolved's 127.0.0.53) are unreachable,
/// so they are dropped, systemd-resolved's upstream list is used when present, and Docker's
/// defaults when nothing is left.
fn resolv_conf(host: &str, upstream: &str, mode: Mode, o: &EtcOptions) -> String {
    let lines = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| l.split_whitespace().next() == Some(key))
            .map(String::from)
            .collect()
    };
    let mut servers = lines(host, "nameserver");
    if mode != Mode::Host {
        if servers.iter().all(|l| is_loopback_nameserver(l)) && !upstream.is_empty() {
            servers = lines(upstream, "nameserver");
        }
        servers.retain(|l| !is_loopback_nameserver(l));
        if servers.is_empty() {
            servers = DEFAULT_NAMESERVERS
                .iter()
                .map(|s| format!("nameserver {s}"))
                .collect();
        }
    }
    if !o.dns.is_empty() {
        servers = o.dns.iter().map(|a| format!("nameserver {a}")).collect();
    }
    let mut search = lines(host, "search");
    if !o.dns_search.is_empty() {
        search = vec![format!("search {}", o.dns_search.join(" "))];
    }
    let mut options = lines(host, "options");
    if !o.dns_options.is_empty() {
        options = vec![format!("options {}", o.dns_options.join(" "))];
    }
    let mut out = String::new();
    for l in servers.iter().chain(&search).chain(&options) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn hosts_file(att: &Attachment, o: &EtcOptions, host_hosts: &str) -> String {
    let mut out = String::new();
    if att.mode == Mode::Host {
        out.push_str(host_hosts);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
    } else {
        out.push_str(
            "127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             ff00::0\tip6-mcastprefix\n\
             ff02::1\tip6-allnodes\n\
             ff02::2\tip6-allrouters\n",
        );
    }
    for (name, ip) in &o.extra_hosts {
        out.push_str(&format!("{ip}\t{name}\n"));
    }
    // Without the node bridge (only internal cluster networks), the first cluster address.
    let own = att
        .address
        .or_else(|| att.overlays.first().map(|o| o.address));
    if let Some(a) = own {
        let mut names = vec![o.hostname.clone()];
        names.extend(o.aliases.iter().filter(|n| **n != o.hostname).cloned());
        out.push_str(&format!("{a}\t{}\n", names.join(" ")));
    }
    out
}

/// Write the container's /etc files into `dir`.
pub fn write_etc_files(dir: &Path, att: &Attachment, o: &EtcOptions) -> Result<()> {
    let host_resolv = read_capped(Path::new("/etc/resolv.conf"));
    let upstream = read_capped(Path::new("/run/systemd/resolve/resolv.conf"));
    let hostname = if att.mode == Mode::Host && o.hostname.is_empty() {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        o.hostname.clone()
    };
    let files = [
        (
            "hosts",
            hosts_file(att, o, &read_capped(Path::new("/etc/hosts"))),
        ),
        ("hostname", format!("{hostname}\n")),
        (
            "resolv.conf",
            resolv_conf(&host_resolv, &upstream, att.mode, o),
        ),
    ];
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io_err(format!("write {}", p.display())))?;
    }
    Ok(())
}

/// The bind mounts of those files, for the container's spec.
pub fn etc_mounts(dir: &Path) -> Vec<Mount> {
    ETC_FILES
        .iter()
        .filter_map(|(name, dest)| {
            MountBuilder::default()
                .destination(dest)
                .typ("bind")
                .source(dir.join(name))
                .options(vec!["rbind".to_string(), "rprivate".to_string()])
                .build()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_drops_loopback_servers_for_own_namespaces() {
        let host = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n";
        let up = "nameserver 192.0.2.1\nnameserver 192.0.2.2\n";
        let o = EtcOptions::default();
        let r = resolv_conf(host, up, Mode::Bridge, &o);
        assert_eq!(
            r,
            "nameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch lan\noptions edns0 trust-ad\n"
        );
        let r = resolv_conf(host, "", Mode::Bridge, &o);
        assert!(
            r.starts_with("nameserver 8.8.8.8\nnameserver 8.8.4.4\n"),
            "{r}"
        );
        // The host's own namespace reaches its cache.
        let r = resolv_conf(host, up, Mode::Host, &o);
        assert!(r.starts_with("nameserver 127.0.0.53\n"), "{r}");
        let o = EtcOptions {
            dns: vec!["10.0.0.53".parse().unwrap()],
            dns_search: vec!["corp".into()],
            dns_options: vec!["ndots:2".into()],
            ..EtcOptions::default()
        };
        assert_eq!(
            resolv_conf(host, up, Mode::Bridge, &o),
            "nameserver 10.0.0.53\nsearch corp\noptions ndots:2\n"
        );
    }

    #[test]
    fn hosts_name_the_container_and_the_extra_hosts() {
        let att = Attachment {
            mode: Mode::Bridge,
            address: Some("10.213.0.5".parse().unwrap()),
            ..Attachment::default()
        };
        let o = EtcOptions {
            hostname: "web1".into(),
            extra_hosts: vec![EtcOptions::parse_add_host("db:10.1.2.3").unwrap()],
            aliases: vec!["web".into()],
            ..EtcOptions::default()
        };
        let h = hosts_file(&att, &o, "");
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("10.1.2.3\tdb\n"));
        assert!(h.ends_with("10.213.0.5\tweb1 web\n"), "{h}");
        let (n, ip) = EtcOptions::parse_add_host("v6=[::1]").unwrap();
        assert_eq!((n.as_str(), ip.to_string().as_str()), ("v6", "::1"));
        for bad in ["db", "db:notanip", ":1.2.3.4", "a b:1.2.3.4"] {
            assert!(EtcOptions::parse_add_host(bad).is_err(), "{bad}");
        }
    }
}
