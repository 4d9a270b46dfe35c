//! The kernel side: network namespace files, `ip -batch` and `nft -f` transactions, the bridge
//! with its nftables table.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use super::{io_err, BridgeConfig, Ipv4Cidr, NetError, Result};

/// Longest error text kept from a failed command.
const MAX_COMMAND_ERROR: usize = 512;
/// The comment that tags shoal's iptables exceptions (removed with the bridge).
const IPTABLES_TAG: &str = "shoal bridge";

/// Runs `program args…` with `input` on stdin; its stderr is the error on failure.
fn run(what: &str, program: &str, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Command {
            what: what.to_string(),
            detail: format!("run {program}: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that exits early closes its stdin: its status tells what went wrong.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Command {
        what: what.to_string(),
        detail: format!("wait for {program}: {e}"),
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let mut detail: String = err
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if detail.is_empty() {
        detail = format!("{program} failed ({})", out.status);
    }
    if detail.len() > MAX_COMMAND_ERROR {
        let mut cut = MAX_COMMAND_ERROR;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    Err(NetError::Command {
        what: what.to_string(),
        detail,
    })
}

/// `ip -batch -`: every line one `ip` command, stopping at the first that fails.
pub(super) fn ip_batch(what: &str, batch: &str) -> Result<()> {
    run(what, "ip", &["-batch", "-"], batch).map(drop)
}

/// `bridge -force -batch -`: FDB changes, every line tried (one already there or gone is no
/// reason to skip the rest); fails if any failed.
pub(super) fn bridge_batch(what: &str, batch: &str) -> Result<()> {
    run(what, "bridge", &["-force", "-batch", "-"], batch).map(drop)
}

/// `bridge fdb show dev DEV`.
pub(super) fn bridge_fdb_show(dev: &str) -> Result<String> {
    run(
        "read the overlay's forwarding entries",
        "bridge",
        &["fdb", "show", "dev", dev],
        "",
    )
}

/// `nft -f -`: the whole script is one transaction.
pub(super) fn nft(what: &str, script: &str) -> Result<()> {
    run(what, "nft", &["-f", "-"], script).map(drop)
}

/// Runs `ip -batch -` inside the network namespace at `ns` (from a thread that joins it, so
/// this process stays where it is).
pub(super) fn in_netns(ns: &Path, what: &str, batch: &str) -> Result<()> {
    in_netns_run(ns, what, "ip", &["-batch", "-"], batch)
}

/// Runs `program args…` with `input` inside the network namespace at `ns`.
pub(super) fn in_netns_run(
    ns: &Path,
    what: &str,
    program: &'static str,
    args: &'static [&'static str],
    input: &str,
) -> Result<()> {
    let file = std::fs::File::open(ns).map_err(io_err(format!("open {}", ns.display())))?;
    let (what_t, input) = (what.to_string(), input.to_string());
    std::thread::spawn(move || {
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| io_err(format!("{what_t}: join the namespace"))(e.into()))?;
        run(&what_t, program, args, &input).map(drop)
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetError::Command {
            what: what.to_string(),
            detail: "the namespace thread panicked".into(),
        })
    })
}

/// Sets a network sysctl inside the namespace at `ns` (/proc/sys/net belongs to the namespace
/// of the thread that opens it).
pub(super) fn in_netns_sysctl(ns: &Path, key: &str, value: &str) -> Result<()> {
    let file = std::fs::File::open(ns).map_err(io_err(format!("open {}", ns.display())))?;
    let (p, v) = (
        format!("/proc/sys/{}", key.replace('.', "/")),
        value.to_string(),
    );
    std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET)?;
        std::fs::write(p, v)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    .map_err(io_err(format!("set {key} in {}", ns.display())))
}

/// A new network namespace kept alive by a bind mount on the file `ns`.
pub(super) fn create_netns(ns: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(ns)
        .map_err(io_err(format!("create {}", ns.display())))?;
    let target = ns.to_path_buf();
    std::thread::spawn(move || -> std::io::Result<()> {
        // Only this thread moves: a new network namespace for it, then pinned by the mount.
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    .map_err(io_err(format!(
        "make the network namespace {}",
        ns.display()
    )))
}

/// Unmount and remove a namespace file (missing or unmounted is fine).
pub(super) fn remove_netns(ns: &Path) -> Result<()> {
    match nix::mount::umount2(ns, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io_err(format!("unmount {}", ns.display()))(e.into())),
    }
    match std::fs::remove_file(ns) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_err(format!("remove {}", ns.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Whether `program args…` exits 0 (its output discarded).
fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this network namespace has a link named `name` (asked of the kernel: /sys may
/// belong to another network namespace than this process's).
pub(super) fn link_exists(name: &str) -> bool {
    succeeds("ip", &["link", "show", "dev", name])
}

/// Whether shoal's table `table` exists in this network namespace.
pub(super) fn table_exists(table: &str) -> bool {
    succeeds("nft", &["list", "table", "ip", table])
}

/// The first IPv4 address of link `name`, with its prefix: `None` when there is no such
/// link, `Some(None)` when it has no address.
fn link_address(name: &str) -> Result<Option<Option<Ipv4Cidr>>> {
    let out = match run(
        "read the bridge's address",
        "ip",
        &["-j", "-4", "addr", "show", "dev", name],
        "",
    ) {
        Ok(out) => out,
        Err(NetError::Command { detail, .. }) if detail.contains("does not exist") => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let info = v
        .get(0)
        .and_then(|l| l.get("addr_info"))
        .and_then(|a| a.get(0));
    let Some(info) = info else {
        return Ok(Some(None));
    };
    let addr = info.get("local").and_then(|a| a.as_str());
    let prefix = info.get("prefixlen").and_then(|p| p.as_u64());
    Ok(Some(
        match (addr.and_then(|a| a.parse::<Ipv4Addr>().ok()), prefix) {
            (Some(addr), Some(prefix)) => Some(Ipv4Cidr {
                addr,
                prefix: prefix as u8,
            }),
            _ => None,
        },
    ))
}

fn sysctl(key: &str, value: &str) -> Result<()> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&p, value).map_err(io_err(format!("set {key}")))
}

/// The bridge and its table, made if missing; returns the subnet it serves (an existing
/// bridge keeps its own address) and whether it was made now.
pub(super) fn ensure_bridge(cfg: &BridgeConfig) -> Result<(Ipv4Cidr, bool)> {
    let found = link_address(&cfg.name)?;
    let existed = found.is_some();
    let subnet = match found.flatten() {
        Some(s) => s,
        None => {
            let gw = Ipv4Cidr {
                addr: cfg.subnet.gateway(),
                prefix: cfg.subnet.prefix,
            };
            let add = if existed {
                String::new()
            } else {
                format!("link add {} type bridge\n", cfg.name)
            };
            ip_batch(
                "make the bridge",
                &format!(
                    "{add}addr add {}/{} dev {name}\nlink set {name} up\n",
                    gw.addr,
                    gw.prefix,
                    name = cfg.name
                ),
            )?;
            gw
        }
    };
    let subnet = Ipv4Cidr {
        addr: subnet.network(),
        prefix: subnet.prefix,
    };
    if !existed {
        // Containers reach other hosts only through forwarding; connections from this host to
        // a published port on 127.0.0.1 need loopback sources routed onto the bridge.
        sysctl("net.ipv4.ip_forward", "1")?;
        sysctl(&format!("net.ipv4.conf.{}.route_localnet", cfg.name), "1")?;
        allow_in_iptables_forward(&cfg.name);
    }
    if !existed || !table_exists(&cfg.table()) {
        nft("program the bridge's table", &table_script(cfg, subnet))?;
    }
    Ok((subnet, !existed))
}

/// shoal's table for a bridge: DNAT of published ports (from other hosts and from this one),
/// masquerade for egress and for connections this host or a container makes to a published
/// port. Replaces a stale table of the same name.
fn table_script(cfg: &BridgeConfig, subnet: Ipv4Cidr) -> String {
    let (t, br) = (cfg.table(), &cfg.name);
    format!(
        "table ip {t}\ndelete table ip {t}\n\
         table ip {t} {{\n\
           map ports {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}\n\
           map ports_ip {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}\n\
           chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n\
             fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @ports_ip\n\
             fib daddr type local dnat ip to meta l4proto . th dport map @ports\n\
           }}\n\
           chain output {{ type nat hook output priority -100; policy accept;\n\
             fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @ports_ip\n\
             fib daddr type local dnat ip to meta l4proto . th dport map @ports\n\
           }}\n\
           chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"{br}\" fib saddr type local masquerade\n\
             oifname \"{br}\" ip saddr {subnet} ct status dnat masquerade\n\
             oifname != \"{br}\" ip saddr {subnet} masquerade\n\
           }}\n\
         }}\n"
    )
}

/// iptables' FORWARD rules letting the bridge's traffic through when the chain's policy drops
/// (Docker sets DROP): an nftables accept of ours cannot override another table's drop.
fn allow_in_iptables_forward(bridge: &str) {
    let policy = Command::new("iptables")
        .args(["-w", "-S", "FORWARD"])
        .stderr(Stdio::null())
        .output();
    let drops =
        policy.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("-P FORWARD DROP"));
    if !drops {
        return;
    }
    for dir in ["-i", "-o"] {
        forward_exception(dir, bridge, "-I");
    }
}

/// `iptables -w OP FORWARD DIR BRIDGE … -j ACCEPT` of shoal's tagged exception; whether it
/// succeeded (for `-C`: whether the rule is there).
fn forward_exception(dir: &str, bridge: &str, op: &str) -> bool {
    let tag = format!("{IPTABLES_TAG} {bridge}");
    succeeds(
        "iptables",
        &[
            "-w",
            op,
            "FORWARD",
            dir,
            bridge,
            "-m",
            "comment",
            "--comment",
            &tag,
            "-j",
            "ACCEPT",
        ],
    )
}

fn remove_iptables_exceptions(bridge: &str) {
    for dir in ["-i", "-o"] {
        if forward_exception(dir, bridge, "-C") {
            forward_exception(dir, bridge, "-D");
        }
    }
}

/// Remove the bridge, its table and its iptables exceptions (whatever of them exists).
pub(super) fn remove_bridge(cfg: &BridgeConfig) -> Result<()> {
    if table_exists(&cfg.table()) {
        nft(
            "remove the bridge's table",
            &format!("delete table ip {}\n", cfg.table()),
        )?;
    }
    if link_exists(&cfg.name) {
        ip_batch("remove the bridge", &format!("link del {}\n", cfg.name))?;
        remove_iptables_exceptions(&cfg.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_script_names_only_its_bridge_and_subnet() {
        let cfg = BridgeConfig::new("shoal9", "10.99.0.0/16").unwrap();
        let s = table_script(&cfg, Ipv4Cidr::parse("10.99.0.0/16").unwrap());
        assert!(s.starts_with("table ip shoal_shoal9\ndelete table ip shoal_shoal9\n"));
        assert!(s.contains("oifname != \"shoal9\" ip saddr 10.99.0.0/16 masquerade"));
        assert!(!s.contains("flush ruleset"));
    }
}
