//! The multi-host test bed for real: network namespaces, veths, a bridge, nftables partitions
//! and `shoal agent` processes (root only, as in CI).

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use shoal_tests::registry::{oci_arch, Layout, Registry};
use shoal_tests::testbed::{
    busybox_rootfs_tar, pid_alive, pid_stopped, script_path, Host, Signal, Testbed, STATE_ROOT,
};

fn up(n: usize) -> Testbed {
    match Testbed::up(n) {
        Ok(tb) => tb,
        Err(e) => panic!("testbed up {n}: {e}"),
    }
}

fn pings(from: &Host, to: Ipv4Addr) -> bool {
    let out = from
        .exec(&["busybox", "ping", "-c", "1", "-W", "1", &to.to_string()])
        .expect("running ping");
    out.status.success()
}

fn root_pings(to: Ipv4Addr) -> bool {
    Command::new("busybox")
        .args(["ping", "-c", "1", "-W", "1", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running ping")
        .success()
}

fn netns_names() -> HashSet<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn link_names() -> HashSet<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn mounts_under(dir: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .expect("reading mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(dir))
        .map(str::to_string)
        .collect()
}

/// What a test bed leaves once down: nothing with its prefix or bridge.
fn assert_nothing_left(prefix: &str, bridge: &str, pids: &[u32]) {
    let is_ours = |n: &str| {
        n.strip_prefix(prefix)
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
    };
    let ns: Vec<_> = netns_names().into_iter().filter(|n| is_ours(n)).collect();
    assert!(ns.is_empty(), "namespaces left: {ns:?}");
    let links: Vec<_> = link_names()
        .into_iter()
        .filter(|n| is_ours(n) || n == bridge)
        .collect();
    assert!(links.is_empty(), "links left: {links:?}");
    let live: Vec<_> = pids.iter().filter(|&&p| pid_alive(p)).collect();
    assert!(live.is_empty(), "processes left: {live:?}");
    let host_dir = format!("{STATE_ROOT}/{prefix}");
    let m = mounts_under(&host_dir);
    assert!(m.is_empty(), "mounts left: {m:?}");
    let dirs: Vec<_> = fs::read_dir(STATE_ROOT)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_ours(n))
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "host dirs left: {dirs:?}");
    assert!(
        !Path::new(&format!("{STATE_ROOT}/{prefix}.state")).exists(),
        "state file left"
    );
}

fn default_route() -> String {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "default"])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_forward() -> String {
    fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("reading ip_forward")
}

/// A `sleep` left running in the host in its own session, as a crashed run leaves it.
fn leave_sleeper(h: &Host) -> Child {
    let child = h
        .command("setsid")
        .args(["sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning sleep");
    let pid = child.id();
    // nsenter and setsid exec, so the child is the sleep itself once it has started.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| !e.ends_with("sleep")) {
        assert!(Instant::now() < deadline, "sleep did not start");
        sleep(Duration::from_millis(20));
    }
    child
}

/// Reaps a child that `down` must have ended with SIGKILL.
fn assert_killed(mut child: Child) {
    let status = child.wait().expect("waiting for a left process");
    assert_eq!(status.signal(), Some(9), "{status}");
}

#[test]
fn three_hosts_reach_each_other_and_the_bridge() {
    let route_before = default_route();
    let forward_before = ip_forward();
    let tb = up(3);
    assert_eq!(tb.hosts().len(), 3);
    for h in tb.hosts() {
        assert_eq!(
            h.addr(),
            Ipv4Addr::new(10, 77, tb.slot() as u8, h.index() as u8)
        );
        assert!(
            pings(h, tb.bridge_addr()),
            "{} cannot ping the bridge",
            h.name()
        );
        for other in tb.hosts() {
            assert!(
                pings(h, other.addr()),
                "{} cannot ping {}",
                h.name(),
                other.name()
            );
        }
        assert!(root_pings(h.addr()), "root cannot ping {}", h.name());
        let routes = h.exec_ok(&["ip", "-4", "route"]).expect("ip route in host");
        assert!(
            routes.contains(&format!("default via {}", tb.bridge_addr())),
            "{routes}"
        );
    }
    // The script's own exec and addr agree with the helper.
    let h2 = tb.host(2).expect("host 2");
    let env = tb.script(&["exec", "2", "env"]).expect("testbed.sh exec");
    assert!(env.contains(&format!("SHOAL_DATA_DIR={}", h2.data_dir().display())));
    assert!(env.contains(&format!("SHOAL_SOCKET={}", h2.socket().display())));
    let addr = tb.script(&["addr", h2.name()]).expect("testbed.sh addr");
    assert_eq!(addr.trim(), h2.addr().to_string());
    // Nothing routed or forwarded outside: the root namespace's routing is as it was.
    assert_eq!(default_route(), route_before);
    assert_eq!(ip_forward(), forward_before);
    let (prefix, bridge) = (tb.prefix().to_string(), tb.bridge());
    tb.down().expect("down");
    assert_nothing_left(&prefix, &bridge, &[]);
    assert_eq!(default_route(), route_before);
}

#[test]
fn tcp_server_in_one_host_is_reachable_from_another() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    let listener = h1
        .in_netns(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5555)))
        .expect("entering h1")
        .expect("binding in h1");
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("accept");
        let mut got = String::new();
        conn.read_to_string(&mut got).expect("read");
        (peer, got)
    });
    let target = format!("{}", h1.addr());
    let mut client = h2
        .command("busybox")
        .args(["nc", &target, "5555"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning nc in h2");
    client
        .stdin
        .take()
        .expect("nc stdin")
        .write_all(b"hello from h2\n")
        .expect("writing to nc");
    assert!(client.wait().expect("nc").success());
    let (peer, got) = server.join().expect("server thread");
    assert_eq!(got, "hello from h2\n");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(h2.addr()));
    // Each host has its own loopback: h1's port is not on h2's 127.0.0.1.
    let local = h2
        .exec(&["busybox", "nc", "-w", "1", "127.0.0.1", "5555"])
        .expect("nc to loopback");
    assert!(!local.status.success(), "h2's loopback reached h1's server");
}

#[test]
fn up_and_down_are_idempotent() {
    let mut tb = up(3);
    let ino = |h: &Host| {
        fs::metadata(format!("/run/netns/{}", h.name()))
            .expect("netns file")
            .ino()
    };
    let first: Vec<u64> = tb.hosts().iter().map(ino).collect();
    let sleeper = leave_sleeper(tb.host(1).expect("h1"));
    let sleeper_pid = sleeper.id();
    tb.grow(3).expect("up 3 again");
    assert_eq!(tb.hosts().iter().map(ino).collect::<Vec<_>>(), first);
    tb.grow(5).expect("up 5 after up 3");
    assert_eq!(tb.hosts().len(), 5);
    assert_eq!(
        tb.hosts()[..3].iter().map(ino).collect::<Vec<_>>(),
        first,
        "up 5 remade the first three hosts"
    );
    assert!(pid_alive(sleeper_pid), "up 5 disturbed a process in h1");
    // A pid counts as a host's only while it lives in that host (pids are reused).
    assert!(tb.host(1).expect("h1").runs_here(sleeper_pid));
    assert!(!tb.host(2).expect("h2").runs_here(sleeper_pid));
    assert!(!tb.host(1).expect("h1").runs_here(std::process::id()));
    let (h1, h5) = (tb.host(1).expect("h1"), tb.host(5).expect("h5"));
    assert!(pings(h5, h1.addr()));
    assert!(pings(h1, h5.addr()));
    // An `up` that asks for fewer hosts keeps the ones there are.
    tb.grow(2).expect("up 2 after up 5");
    assert_eq!(tb.hosts().len(), 5);

    let (prefix, bridge) = (tb.prefix().to_string(), tb.bridge());
    tb.script(&["down"]).expect("down");
    assert_nothing_left(&prefix, &bridge, &[sleeper_pid]);
    assert_killed(sleeper);
    tb.script(&["down"]).expect("down twice");
    tb.down().expect("down a third time, through the helper");
    assert_nothing_left(&prefix, &bridge, &[]);
}

#[test]
fn down_cleans_up_after_a_crash() {
    let tb = up(3);
    let (prefix, bridge) = (tb.prefix().to_string(), tb.bridge());
    let h1 = tb.host(1).expect("h1");
    let h2 = tb.host(2).expect("h2");
    let h3 = tb.host(3).expect("h3");
    // A process tree left in h1, a stopped process in h2, a mount on h3's data dir.
    let tree = h1
        .command("setsid")
        .args(["sh", "-c", "sleep 1000 & sleep 1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning a tree in h1");
    let stopped_child = leave_sleeper(h2);
    let stopped = stopped_child.id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stopped as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stopping");
    tb.script(&["tmpfs", h3.name(), "4m"]).expect("tmpfs on h3");
    fs::write(h3.data_dir().join("junk"), b"x").expect("writing into the tmpfs");
    assert_eq!(mounts_under(&h3.dir().display().to_string()).len(), 1);
    let mut pids = h1.pids().expect("pids in h1");
    pids.extend(h2.pids().expect("pids in h2"));
    assert!(pids.len() >= 3, "expected the left processes, got {pids:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pid_stopped(stopped) {
        assert!(Instant::now() < deadline, "sleep did not stop");
        sleep(Duration::from_millis(20));
    }
    // The driver crashed half-way through writing its state: half a state file.
    let state = format!("{STATE_ROOT}/{prefix}.state");
    let text = fs::read(&state).expect("reading the state file");
    fs::write(&state, &text[..text.len() / 2]).expect("truncating the state file");
    // ...and another one never wrote it at all.
    let tb2 = up(2);
    let (prefix2, bridge2) = (tb2.prefix().to_string(), tb2.bridge());
    let left2 = leave_sleeper(tb2.host(2).expect("tb2 h2"));
    let pids2 = tb2.host(2).expect("tb2 h2").pids().expect("pids");
    fs::remove_file(format!("{STATE_ROOT}/{prefix2}.state")).expect("removing the state file");

    tb.script(&["down"]).expect("down after the crash");
    assert_nothing_left(&prefix, &bridge, &pids);
    tb2.script(&["down"]).expect("down without a state file");
    assert_nothing_left(&prefix2, &bridge2, &pids2);
    assert_killed(tree);
    assert_killed(stopped_child);
    assert_killed(left2);
}

#[test]
fn partition_blocks_traffic_between_groups_and_heal_restores_it() {
    let tb = up(3);
    let h = |i| tb.host(i).expect("host");
    tb.partition(&[&[1], &[2, 3]]).expect("partition");
    assert!(
        !pings(h(1), h(2).addr()),
        "h1 reaches h2 across the partition"
    );
    assert!(
        !pings(h(3), h(1).addr()),
        "h3 reaches h1 across the partition"
    );
    assert!(pings(h(2), h(3).addr()), "h2 and h3 are on the same side");
    // The root namespace is not filtered: tests keep their view of every host.
    assert!(root_pings(h(1).addr()));
    assert!(pings(h(1), tb.bridge_addr()));
    tb.heal().expect("heal");
    assert!(pings(h(1), h(2).addr()), "heal did not restore h1 -> h2");
    assert!(pings(h(3), h(1).addr()), "heal did not restore h3 -> h1");
    tb.heal().expect("heal twice");
}

#[test]
fn one_way_partition_is_one_way() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    let bind = |h: &Host| {
        let a = h.addr();
        h.in_netns(move || UdpSocket::bind(SocketAddrV4::new(a, 6000)))
            .expect("entering host")
            .expect("binding udp")
    };
    let (s1, s2) = (bind(h1), bind(h2));
    for s in [&s1, &s2] {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
    }
    let arrives = |from: &UdpSocket, to: &UdpSocket, to_host: &Host| {
        let msg = b"datagram";
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            from.send_to(msg, SocketAddrV4::new(to_host.addr(), 6000))
                .expect("send");
            if let Ok((n, _)) = to.recv_from(&mut buf) {
                return &buf[..n] == msg;
            }
        }
        false
    };
    assert!(arrives(&s1, &s2, h2) && arrives(&s2, &s1, h1));
    tb.partition_one_way(1, 2).expect("partition-one-way");
    assert!(!arrives(&s1, &s2, h2), "h1 -> h2 still flows");
    assert!(arrives(&s2, &s1, h1), "h2 -> h1 was cut too");
    tb.heal().expect("heal");
    assert!(arrives(&s1, &s2, h2), "heal did not restore h1 -> h2");
}

#[test]
fn agent_starts_in_a_host_and_answers_on_its_socket() {
    let tb = up(2);
    let h1 = tb.host(1).expect("h1");
    let pid = h1.spawn_agent(&[]).expect("spawn agent");
    assert_eq!(h1.agent_pid(), Some(pid));
    assert!(h1.socket().exists());
    assert!(
        h1.pids().expect("pids").contains(&pid),
        "agent not in h1's namespace"
    );
    // Before `cluster init` the daemon answers or refuses on one clear line.
    let out = h1.shoal(&["node", "ls"]).expect("shoal node ls");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("shoal: "), "{stderr}");
    }
    let out = h1.shoal(&["cluster", "init"]).expect("cluster init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = h1.shoal(&["node", "ls"]).expect("node ls");
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(text.contains(h1.name()), "{text}");
    let log = fs::read_to_string(h1.agent_log()).expect("agent log");
    assert!(log.contains(&h1.agent_addr().to_string()), "{log}");

    h1.kill(Signal::Stop).expect("SIGSTOP");
    assert!(pid_stopped(pid));
    h1.kill(Signal::Cont).expect("SIGCONT");
    assert!(!pid_stopped(pid));
    h1.kill(Signal::Kill).expect("SIGKILL");
    assert!(!pid_alive(pid));
    assert_eq!(h1.agent_pid(), None);
    assert!(
        h1.kill(Signal::Term).is_err(),
        "kill with no agent succeeded"
    );
    // Restart on the same data dir (what chaos does after a kill -9).
    let pid2 = h1.spawn_agent(&[]).expect("restart agent");
    let ls = h1.shoal(&["node", "ls"]).expect("node ls after restart");
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let (prefix, bridge) = (tb.prefix().to_string(), tb.bridge());
    tb.down().expect("down");
    assert_nothing_left(&prefix, &bridge, &[pid, pid2]);
}

#[test]
fn agents_on_two_hosts_form_a_cluster_over_the_bridge() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    h1.spawn_agent(&[]).expect("agent h1");
    h2.spawn_agent(&[]).expect("agent h2");
    let init = h1.shoal(&["cluster", "init"]).expect("init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let tok = h1
        .shoal(&["cluster", "join-token", "-q", "manager"])
        .expect("join-token");
    assert!(
        tok.status.success(),
        "{}",
        String::from_utf8_lossy(&tok.stderr)
    );
    let tok = String::from_utf8_lossy(&tok.stdout).trim().to_string();
    let join = h2
        .shoal(&[
            "cluster",
            "join",
            "--token",
            &tok,
            &h1.agent_addr().to_string(),
        ])
        .expect("join");
    assert!(
        join.status.success(),
        "{}",
        String::from_utf8_lossy(&join.stderr)
    );
    let ls = h2.shoal(&["node", "ls"]).expect("node ls on h2");
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(
        text.contains(h1.name()) && text.contains(h2.name()),
        "{text}"
    );
}

#[test]
fn script_refuses_bad_input_on_one_line() {
    let script = script_path();
    let cases: &[&[&str]] = &[
        &["up", "0"],
        &["up", "abc"],
        &["up", "2", "--subnet", "10.300.0"],
        &["up", "2", "--prefix", "BAD"],
        &["frobnicate"],
        &["kill", "sh199-h1", "-HUP"],
        &["exec", "nosuchhost9", "true"],
    ];
    for args in cases {
        let out = Command::new("bash")
            .arg(&script)
            .args(*args)
            .output()
            .expect("running testbed.sh");
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("testbed.sh: "), "{args:?}: {stderr}");
    }
    // Down with nothing up is fine.
    let out = Command::new("bash")
        .arg(&script)
        .args(["down", "--prefix", "shnone-h"])
        .output()
        .expect("running testbed.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace standing in for a root namespace with a firewall; on drop, the test
/// bed made in it comes down and it is deleted.
struct OuterNs(String, String);

impl Drop for OuterNs {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.0))
            .args(["--", "bash"])
            .arg(script_path())
            .args(["--prefix", &self.1, "down"])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn bridge_is_let_through_a_drop_forward_policy_and_only_while_up() {
    if Command::new("iptables").arg("--version").output().is_err() {
        panic!("iptables is missing (CI installs it): the firewall path cannot be tested");
    }
    let pid = std::process::id();
    let prefix = format!("fw{pid}-h");
    let outer = OuterNs(format!("shfw{pid}"), prefix.clone());
    let ok = |c: &mut Command| {
        let out = c.output().expect("running");
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(Command::new("ip").args(["netns", "add", &outer.0]));
    let in_outer = |prog: &str| {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", outer.0))
            .arg("--")
            .arg(prog);
        c
    };
    ok(in_outer("iptables").args(["-P", "FORWARD", "DROP"]));
    ok(in_outer("iptables").args(["-P", "INPUT", "DROP"]));
    let before = ok(in_outer("iptables").arg("-S"));
    // Inside `outer` the bridge and the root side of the veths live there, as they would in a
    // root namespace with that firewall; its own routing table makes any subnet free.
    let script = script_path();
    let testbed = |args: &[&str]| {
        let mut c = in_outer("bash");
        c.arg(&script).arg("--prefix").arg(&prefix).args(args);
        ok(&mut c)
    };
    testbed(&["up", "2", "--subnet", "10.77.0"]);
    let ping = |host: &str, to: &str| {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{host}"))
            .args(["--", "busybox", "ping", "-c", "1", "-W", "1", to])
            .output()
            .expect("ping")
            .status
            .success()
    };
    let (h1, h2) = (format!("{prefix}1"), format!("{prefix}2"));
    assert!(ping(&h1, "10.77.0.2"), "FORWARD DROP cut the hosts apart");
    assert!(ping(&h2, "10.77.0.254"), "INPUT DROP cut the bridge off");
    let during = ok(in_outer("iptables").arg("-S"));
    assert!(during.contains("shoal-testbed"), "{during}");
    // Without the rule the policy wins: the rule is what lets the bridge through.
    let bridge = format!("fw{pid}-br0");
    ok(in_outer("iptables").args([
        "-D",
        "FORWARD",
        "-i",
        &bridge,
        "-o",
        &bridge,
        "-m",
        "comment",
        "--comment",
        &format!("shoal-testbed {bridge}"),
        "-j",
        "ACCEPT",
    ]));
    assert!(
        !ping(&h1, "10.77.0.2"),
        "the DROP policy does not apply here"
    );
    testbed(&["up", "2"]);
    assert!(ping(&h1, "10.77.0.2"), "up again did not put the rule back");
    testbed(&["down"]);
    assert_eq!(ok(in_outer("iptables").arg("-S")), before);
    assert_nothing_left(&prefix, &bridge, &[]);
}

#[test]
fn down_ends_a_hosts_containers_and_removes_their_cgroups() {
    down_ends_a_container(false);
}

/// A disk-fault host's data dir is a file system of its own: `down` unmounts it, and the
/// container records with it, so it must know the containers' cgroups before.
#[test]
fn down_removes_the_cgroups_of_containers_on_a_mounted_data_dir() {
    down_ends_a_container(true);
}

/// One container running in a host (its data dir on a tmpfs of its own if `mounted`), then
/// `down`: its processes, cgroups and the rest of the host are gone.
fn down_ends_a_container(mounted: bool) {
    let tb = up(1);
    let h1 = tb.host(1).expect("h1");
    if mounted {
        tb.script(&["tmpfs", h1.name(), "64m"])
            .expect("tmpfs on h1");
    }
    h1.import_busybox("busybox:latest").expect("import");
    let run = h1
        .shoal(&["run", "-d", "busybox:latest", "sleep", "1000"])
        .expect("shoal run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let id = String::from_utf8_lossy(&run.stdout).trim().to_string();
    assert!(
        h1.data_dir().join("containers").join(&id).is_dir(),
        "no container dir for {id}"
    );
    let cgroups: Vec<_> = [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/memory",
    ]
    .iter()
    .map(|root| Path::new(root).join("shoal").join(&id))
    .filter(|p| p.is_dir())
    .collect();
    assert!(!cgroups.is_empty(), "no cgroup shoal/{id}");
    let procs: Vec<u32> = cgroups
        .iter()
        .flat_map(|cg| {
            fs::read_to_string(cg.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    assert!(
        procs.iter().any(|&p| pid_alive(p)),
        "the container's sleep is not running"
    );
    // The container has its own network namespace: only down's other searches find it.
    let mut pids = h1.pids().expect("pids");
    pids.extend(&procs);
    let (prefix, bridge) = (tb.prefix().to_string(), tb.bridge());
    tb.down().expect("down");
    assert_nothing_left(&prefix, &bridge, &pids);
    let left: Vec<_> = cgroups.iter().filter(|c| c.exists()).collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

/// `GET /` of `url` from `from` (bounded), its body if it answered.
fn fetch(from: &Host, url: &str) -> Option<String> {
    let out = from
        .exec(&["timeout", "5", "busybox", "wget", "-q", "-O", "-", url])
        .expect("running wget");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fetch_eventually(from: &Host, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(body) = fetch(from, url) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered {}",
            from.name()
        );
        sleep(Duration::from_millis(200));
    }
}

fn ok_out(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a service task is: `WEB` serves its own hostname (the task's short id).
const WEB: &str =
    "mkdir -p /www; echo hello-from-$(hostname) > /www/index.html; exec httpd -f -p 80 -h /www";

/// Waits (bounded) until none of the links, namespaces' devices or nftables tables shoal makes
/// for containers, cluster networks and the mesh is left in `hosts`.
fn assert_no_shoal_network(hosts: &[&Host]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for h in hosts {
        loop {
            let links = ok_out(h.exec(&["ip", "-o", "link"]).expect("ip link"));
            let tables = ok_out(h.exec(&["nft", "list", "tables"]).expect("nft"));
            let left = ["shoal0", "shv", "shx", "shb", ": so"]
                .iter()
                .any(|l| links.contains(l))
                || tables.contains("shoal_");
            if !left {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left in {}: {links}{tables}",
                h.name()
            );
            sleep(Duration::from_millis(300));
        }
    }
}

/// Runs `args` in task container `task` on whichever of `hosts` holds it; its stdout if it
/// exited 0.
fn task_exec(hosts: &[&Host], task: &str, args: &[&str]) -> Option<String> {
    for h in hosts {
        let root = h.data_dir().join("containers/.tasks");
        let mut argv = vec!["runtime", "--root", root.to_str().unwrap(), "exec", task];
        argv.extend_from_slice(args);
        let out = h.shoal(&argv).expect("runtime exec");
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not found") || err.contains("does not exist") {
            continue;
        }
        return out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned());
    }
    None
}

/// The running tasks of `svc` (desired and observed), as (id, node id, first cluster address).
fn running_tasks(h: &Host, svc: &str) -> Vec<(String, String, String)> {
    let out = ok_out(
        h.shoal(&["service", "ps", "--format", "json", svc])
            .expect("ps"),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|t| t["Status"]["State"] == "running" && t["DesiredState"] == "running")
        .map(|t| {
            let field = |f: &serde_json::Value| f.as_str().unwrap_or("").to_string();
            let addr = field(&t["NetworksAttachments"][0]["Addresses"][0]);
            (
                field(&t["ID"]),
                field(&t["NodeID"]),
                addr.split('/').next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A container's published port and a service task's host-mode port answer another host
/// through the first host's address (DNAT in the host's own namespace), and both go away with
/// what published them.
#[test]
fn published_ports_answer_other_hosts() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    h1.import_busybox("busybox:latest").expect("import");
    let web = "mkdir -p /www; echo hello-$0 > /www/index.html; exec httpd -f -p 80 -h /www";
    let id = ok_out(
        h1.shoal(&[
            "run", "-d", "--name", "web", "-p", "8080:80", "busybox", "sh", "-c", web, "run",
        ])
        .expect("run"),
    );
    let url = format!("http://{}:8080/", h1.addr());
    assert_eq!(fetch_eventually(h2, &url), "hello-run\n");

    h1.spawn_agent(&[]).expect("agent h1");
    ok_out(h1.shoal(&["cluster", "init"]).expect("init"));
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "svc",
            "--stop-grace-period",
            "1s",
            "--publish",
            "published=8081,target=80,mode=host",
            "busybox:latest",
            "sh",
            "-c",
            web,
            "task",
        ])
        .expect("service create"),
    );
    let svc = format!("http://{}:8081/", h1.addr());
    assert_eq!(fetch_eventually(h2, &svc), "hello-task\n");

    ok_out(h1.shoal(&["rm", "-f", id.trim()]).expect("rm"));
    ok_out(h1.shoal(&["service", "rm", "svc"]).expect("service rm"));
    assert_no_shoal_network(&[h1]);
    assert!(fetch(h2, &url).is_none() && fetch(h2, &svc).is_none());
}

/// A cluster of two test hosts: h1 its manager, h2 a worker, busybox imported on both. Names
/// the cluster does not know resolve nowhere (no DNS traffic off the test hosts).
fn two_node_cluster(h1: &Host, h2: &Host) {
    for h in [h1, h2] {
        h.import_busybox("busybox:latest").expect("import");
        h.spawn_agent(&["--dns-upstream", "none"]).expect("agent");
    }
    ClusterBuilder::new()
        .form(&[h1 as &dyn Member, h2])
        .expect("cluster");
}

/// The tasks of a service on a cluster network: one per host, each with its own address from
/// the network's subnet; a task on one host fetches the other host's task by that address over
/// the VXLAN overlay, and a task on another network cannot reach it.
#[test]
fn tasks_on_an_overlay_reach_each_other_across_hosts() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    two_node_cluster(h1, h2);
    ok_out(
        h1.shoal(&["network", "create", "backend"])
            .expect("network"),
    );
    ok_out(h1.shoal(&["network", "create", "other"]).expect("network"));
    let web = WEB;
    for (name, net) in [("web", "name=backend,alias=www"), ("lonely", "other")] {
        ok_out(
            h1.shoal(&[
                "service",
                "create",
                "--name",
                name,
                "--replicas",
                if name == "web" { "2" } else { "1" },
                "--replicas-max-per-node",
                "1",
                "--stop-grace-period",
                "1s",
                "--network",
                net,
                "busybox:latest",
                "sh",
                "-c",
                web,
            ])
            .expect("service create"),
        );
    }
    let tasks = |svc: &str| running_tasks(h1, svc);
    let deadline = Instant::now() + Duration::from_secs(30);
    let web_tasks = loop {
        let t = tasks("web");
        if t.len() == 2 && tasks("lonely").len() == 1 {
            break t;
        }
        assert!(Instant::now() < deadline, "tasks not running: {t:?}");
        sleep(Duration::from_millis(300));
    };
    assert_ne!(
        web_tasks[0].1, web_tasks[1].1,
        "one task per node: {web_tasks:?}"
    );
    for (_, _, ip) in &web_tasks {
        assert!(ip.starts_with("10.0.0."), "{web_tasks:?}");
    }
    // From each task, the other one, through its host's runtime.
    let task_exec = |task: &str, args: &[&str]| task_exec(&[h1, h2], task, args);
    for (from, to) in [(0, 1), (1, 0)] {
        let url = format!("http://{}/", web_tasks[to].2);
        let deadline = Instant::now() + Duration::from_secs(15);
        let body = loop {
            if let Some(b) = task_exec(
                &web_tasks[from].0,
                &["timeout", "5", "wget", "-q", "-O", "-", &url],
            ) {
                break b;
            }
            assert!(
                Instant::now() < deadline,
                "{url} never answered task {}",
                web_tasks[from].0
            );
            sleep(Duration::from_millis(300));
        };
        assert!(body.starts_with("hello-from-"), "{body}");
    }
    // By name, through each task's embedded resolver: the service and its tasks.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = task_exec(
            &web_tasks[1].0,
            &["timeout", "5", "wget", "-q", "-O", "-", "http://web/"],
        );
        if body
            .as_deref()
            .is_some_and(|b| b.starts_with("hello-from-"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "http://web/ never answered by name: {body:?}"
        );
        sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = task_exec(&web_tasks[0].0, &["nslookup", "tasks.web"]).unwrap_or_default();
        if web_tasks.iter().all(|t| out.contains(&t.2)) {
            break;
        }
        assert!(Instant::now() < deadline, "tasks.web lacks a task: {out}");
        sleep(Duration::from_millis(300));
    }
    // A network alias answers as the service does (its VIP), and each task answers to its
    // task name, SERVICE.SLOT.ID.
    let ps: serde_json::Value = serde_json::from_str(&ok_out(
        h1.shoal(&["service", "ps", "--format", "json", "web"])
            .expect("ps"),
    ))
    .expect("json");
    let vip_of = |name: &str| {
        let out = task_exec(&web_tasks[0].0, &["nslookup", name]).unwrap_or_default();
        out.lines()
            .skip_while(|l| !l.starts_with("Name:"))
            .find_map(|l| l.strip_prefix("Address:").map(|a| a.trim().to_string()))
    };
    let vip = vip_of("web").expect("web resolves");
    assert_eq!(vip_of("www").as_deref(), Some(vip.as_str()));
    for (id, _, addr) in &web_tasks {
        let slot = ps
            .as_array()
            .expect("array")
            .iter()
            .find(|t| t["ID"] == id.as_str())
            .map(|t| t["Slot"].clone())
            .expect("task in ps");
        let name = format!("web.{slot}.{id}");
        let out = task_exec(&web_tasks[1].0, &["nslookup", &name]).unwrap_or_default();
        assert!(out.contains(addr.as_str()), "{name}: {out}");
    }
    // Three replicas behind the service's virtual IP: the name resolves to the VIP, and 30
    // connections to it reach all three tasks.
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "pool",
            "--replicas",
            "3",
            "--stop-grace-period",
            "1s",
            "--network",
            "backend",
            "busybox:latest",
            "sh",
            "-c",
            web,
        ])
        .expect("service create pool"),
    );
    let pool: Vec<String> = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = tasks("pool");
            if t.len() == 3 {
                break t.into_iter().map(|t| t.2).collect();
            }
            assert!(Instant::now() < deadline, "pool not running: {t:?}");
            sleep(Duration::from_millis(300));
        }
    };
    let lookup = task_exec(&web_tasks[0].0, &["nslookup", "pool"]).unwrap_or_default();
    assert!(
        !pool.iter().any(|ip| lookup.contains(ip.as_str())) && lookup.contains("10.0.0."),
        "pool should resolve to its VIP, not a task: {lookup}"
    );
    // `n` connections through the VIP, until they reach `want` distinct tasks.
    let reaches = |n: usize, want: usize| {
        let script = format!("for i in $(seq {n}); do wget -q -O - http://pool/; done");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = task_exec(&web_tasks[0].0, &["timeout", "60", "sh", "-c", &script])
                .unwrap_or_default();
            let seen: std::collections::HashSet<&str> = out
                .lines()
                .filter(|l| l.starts_with("hello-from-"))
                .collect();
            if seen.len() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} connections reached {} tasks, not {want}: {out}",
                seen.len()
            );
            sleep(Duration::from_millis(500));
        }
    };
    reaches(30, 3);
    // Scaled up, the new task gets connections too.
    ok_out(
        h1.shoal(&["service", "scale", "pool=4"])
            .expect("scale pool"),
    );
    reaches(40, 4);
    ok_out(h1.shoal(&["service", "rm", "pool"]).expect("rm pool"));

    // Another network is another segment, and its names are not ours.
    let lonely = &tasks("lonely")[0];
    assert!(task_exec(&lonely.0, &["nslookup", "web"])
        .is_none_or(|out| !web_tasks.iter().any(|t| out.contains(&t.2))));
    assert!(task_exec(&lonely.0, &["nslookup", "www"]).is_none_or(|out| !out.contains(&vip)));
    assert!(lonely.2.starts_with("10.0.1."), "{lonely:?}");
    let url = format!("http://{}/", web_tasks[0].2);
    assert!(task_exec(&lonely.0, &["timeout", "3", "wget", "-q", "-O", "-", &url]).is_none());

    // Removing the services takes the overlay devices with the last task.
    ok_out(h1.shoal(&["service", "rm", "web", "lonely"]).expect("rm"));
    assert_no_shoal_network(&[h1, h2]);
    ok_out(
        h1.shoal(&["network", "rm", "backend", "other"])
            .expect("network rm"),
    );
}

/// An `--internal` network: its tasks reach each other across hosts, by address and by name,
/// but nothing outside (no node bridge, no default route), while a task on an ordinary network
/// reaches the same outside server; a host-mode port on it is refused.
#[test]
fn an_internal_network_has_no_way_out() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    // The outside's DNS: a resolver in host 2's namespace that answers every A question with
    // 10.9.8.7; the agents forward the names that are not the cluster's to it.
    let dns = h2
        .in_netns(|| UdpSocket::bind((h2.addr(), 0)))
        .expect("netns")
        .expect("bind udp");
    let upstream = dns.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..200 {
            let Ok((n, from)) = dns.recv_from(&mut buf) else {
                return;
            };
            let q = &buf[..n];
            // The question: labels up to the empty one, then type and class.
            let mut end = 12;
            while end < q.len() && q[end] != 0 {
                end += 1 + q[end] as usize;
            }
            let end = (end + 5).min(q.len());
            let mut r = q[..2].to_vec();
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..end]);
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 8, 7]);
            let _ = dns.send_to(&r, from);
        }
    });
    for h in [h1, h2] {
        h.import_busybox("busybox:latest").expect("import");
        h.spawn_agent(&["--dns-upstream", &upstream])
            .expect("agent");
    }
    ClusterBuilder::new()
        .form(&[h1 as &dyn Member, h2])
        .expect("cluster");
    // The outside: a one-line HTTP server in host 2's namespace, on its test bed address.
    let listener = h2
        .in_netns(|| TcpListener::bind((h2.addr(), 0)))
        .expect("netns")
        .expect("bind");
    let outside = format!("http://{}/", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut c in listener.incoming().take(50).flatten() {
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\noutside\n");
        }
    });
    ok_out(
        h1.shoal(&["network", "create", "--internal", "vault"])
            .expect("network"),
    );
    let inspect = ok_out(
        h1.shoal(&["network", "inspect", "--format", "json", "vault"])
            .expect("inspect"),
    );
    assert!(inspect.contains("\"Internal\": true"), "{inspect}");
    ok_out(h1.shoal(&["network", "create", "open"]).expect("network"));
    let err = h1
        .shoal(&[
            "service",
            "create",
            "--name",
            "leaky",
            "--network",
            "vault",
            "--publish",
            "published=8089,target=80,mode=host",
            "busybox:latest",
            "sleep",
            "60",
        ])
        .expect("service create");
    assert!(!err.status.success());
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(msg.contains("internal"), "{msg}");
    for (name, net, replicas) in [("closed", "vault", "2"), ("free", "open", "1")] {
        ok_out(
            h1.shoal(&[
                "service",
                "create",
                "--name",
                name,
                "--replicas",
                replicas,
                "--replicas-max-per-node",
                "1",
                "--stop-grace-period",
                "1s",
                "--network",
                net,
                "busybox:latest",
                "sh",
                "-c",
                WEB,
            ])
            .expect("service create"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (closed, free) = loop {
        let (c, f) = (running_tasks(h1, "closed"), running_tasks(h1, "free"));
        if c.len() == 2 && f.len() == 1 {
            break (c, f);
        }
        assert!(Instant::now() < deadline, "tasks not running: {c:?} {f:?}");
        sleep(Duration::from_millis(300));
    };
    let exec = |task: &str, args: &[&str]| task_exec(&[h1, h2], task, args);
    let wget = |url: &str| ["timeout", "5", "wget", "-q", "-O", "-", url].map(String::from);
    let run = |task: &str, url: &str| {
        let argv = wget(url);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        exec(task, &argv)
    };
    // The ordinary network's task gets out.
    let deadline = Instant::now() + Duration::from_secs(15);
    while run(&free[0].0, &outside).as_deref() != Some("outside\n") {
        assert!(Instant::now() < deadline, "{outside} never answered free");
        sleep(Duration::from_millis(300));
    }
    // The internal tasks reach each other, across hosts, by address and by name.
    let peer = format!("http://{}/", closed[1].2);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !run(&closed[0].0, &peer).is_some_and(|b| b.starts_with("hello-from-")) {
        assert!(Instant::now() < deadline, "{peer} never answered");
        sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !run(&closed[1].0, "http://closed/").is_some_and(|b| b.starts_with("hello-from-")) {
        assert!(Instant::now() < deadline, "http://closed/ never answered");
        sleep(Duration::from_millis(300));
    }
    // ... and nothing outside: no default route, no node bridge interface.
    for (task, _, _) in &closed {
        assert_eq!(run(task, &outside), None, "an internal task got out");
        let routes = exec(task, &["cat", "/proc/net/route"]).expect("routes");
        assert!(
            !routes
                .lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(1) == Some("00000000")),
            "{routes}"
        );
        let links = exec(task, &["ip", "-o", "link"]).expect("links");
        assert!(!links.contains("eth0"), "{links}");
        // Not even names: the embedded DNS forwards nothing for an internal-only task.
        let out = exec(task, &["nslookup", "outside.test"]).unwrap_or_default();
        assert!(!out.contains("10.9.8.7"), "{out}");
    }
    // While a task with a way out gets the outside's names.
    let out = exec(&free[0].0, &["nslookup", "outside.test"]).unwrap_or_default();
    assert!(out.contains("10.9.8.7"), "{out}");
    ok_out(h1.shoal(&["service", "rm", "closed", "free"]).expect("rm"));
    assert_no_shoal_network(&[h1, h2]);
    ok_out(
        h1.shoal(&["network", "rm", "vault", "open"])
            .expect("network rm"),
    );
}

/// `shoal run --network NAME` on an attachable overlay: the standalone container gets an
/// address from the cluster, reaches the services on the network by name, is found by its own
/// name and aliases, and gives its address back when removed; networks that are not attachable,
/// unknown or the mesh's are refused.
#[test]
fn a_standalone_container_joins_an_attachable_network() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    two_node_cluster(h1, h2);
    ok_out(
        h1.shoal(&["network", "create", "--attachable", "app"])
            .expect("network"),
    );
    ok_out(h1.shoal(&["network", "create", "plain"]).expect("network"));
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--replicas-max-per-node",
            "1",
            "--stop-grace-period",
            "1s",
            "--network",
            "app",
            "busybox:latest",
            "sh",
            "-c",
            WEB,
        ])
        .expect("service create"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let web = loop {
        let t = running_tasks(h1, "web");
        if t.len() == 2 {
            break t;
        }
        assert!(Instant::now() < deadline, "web not running: {t:?}");
        sleep(Duration::from_millis(300));
    };
    // Refusals, each on one line, nothing made (`ps` lists the node's task containers too).
    let listed = || ok_out(h2.shoal(&["ps", "-a", "-q"]).expect("ps"));
    let before = listed();
    for (net, extra, want) in [
        ("plain", &[][..], "not attachable"),
        ("nope", &[], "network nope not found"),
        ("ingress", &[], "routing mesh"),
        ("app", &["-p", "8080:80"], "publish from a service"),
    ] {
        let mut argv = vec!["run", "-d", "--network", net];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["busybox:latest", "true"]);
        let out = h2.shoal(&argv).expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{argv:?}");
        assert!(
            err.contains(want) && err.trim().lines().count() == 1,
            "{argv:?}: {err}"
        );
    }
    assert_eq!(listed(), before);
    // A container on host 2 in the network: the services by name, across hosts.
    ok_out(
        h2.shoal(&[
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "app",
            "--network-alias",
            "cli",
            "busybox:latest",
            "sleep",
            "300",
        ])
        .expect("run"),
    );
    let exec = |args: &[&str]| {
        let mut argv = vec!["exec", "client"];
        argv.extend_from_slice(args);
        let out = h2.shoal(&argv).expect("exec");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let resolv = exec(&["cat", "/etc/resolv.conf"]).expect("resolv.conf");
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "http://web/ did not reach both tasks: {seen:?}"
        );
        if let Some(b) = exec(&["timeout", "5", "wget", "-q", "-O", "-", "http://web/"]) {
            seen.insert(b);
        }
    }
    let tasks = exec(&["nslookup", "tasks.web"]).expect("nslookup tasks.web");
    assert!(web.iter().all(|t| tasks.contains(&t.2)), "{tasks}");
    // The container is found by its name and its alias, from a task on the other host.
    let addr_of = |out: &str| {
        out.lines()
            .skip_while(|l| !l.starts_with("Name:"))
            .find_map(|l| l.strip_prefix("Address:").map(|a| a.trim().to_string()))
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let by_name = loop {
        let out = task_exec(&[h1, h2], &web[0].0, &["nslookup", "client"]).unwrap_or_default();
        if let Some(a) = addr_of(&out) {
            break a;
        }
        assert!(Instant::now() < deadline, "client never resolved: {out}");
        sleep(Duration::from_millis(300));
    };
    assert!(by_name.starts_with("10.0.0."), "{by_name}");
    let by_alias = task_exec(&[h1, h2], &web[0].0, &["nslookup", "cli"]).unwrap_or_default();
    assert_eq!(addr_of(&by_alias).as_deref(), Some(by_name.as_str()));
    // In use: the network stays.
    let out = h1.shoal(&["network", "rm", "app"]).expect("network rm");
    assert!(!out.status.success());
    // A foreground run with --rm gives its address back when it ends.
    let out = ok_out(
        h2.shoal(&[
            "run",
            "--rm",
            "--network",
            "app",
            "busybox:latest",
            "nslookup",
            "web",
        ])
        .expect("run --rm"),
    );
    assert!(out.contains("Address"), "{out}");
    ok_out(h2.shoal(&["rm", "-f", "client"]).expect("rm"));
    ok_out(h1.shoal(&["service", "rm", "web"]).expect("service rm"));
    assert_no_shoal_network(&[h1, h2]);
    // Nothing holds the network any more: no attachment was left behind.
    ok_out(
        h1.shoal(&["network", "rm", "app", "plain"])
            .expect("network rm"),
    );
}

/// A service whose image only a registry has: every node pulls it while preparing the task
/// (the registry listens on the test bed bridge, in the root namespace, over plain HTTP as an
/// `--insecure-registry`); a tag the registry lacks rejects the tasks with its reason.
#[test]
fn a_service_runs_an_image_only_a_registry_has() {
    let tb = up(3);
    let hosts = [
        tb.host(1).expect("h1"),
        tb.host(2).expect("h2"),
        tb.host(3).expect("h3"),
    ];
    let h1 = hosts[0];
    let reg = Registry::start(&tb.bridge_addr().to_string()).expect("registry");
    let work = tempfile::tempdir().expect("tempdir");
    let tar = work.path().join("rootfs.tar");
    busybox_rootfs_tar(&tar).expect("rootfs");
    let layout = Layout {
        dir: &work.path().join("layout"),
    };
    let manifest = layout.image(&fs::read(&tar).expect("tar"), oci_arch(), &["sh"]);
    layout.finish(&manifest, false);
    reg.push(layout.dir, "web:1").expect("push");
    for h in hosts {
        h.spawn_agent(&["--dns-upstream", "none", "--insecure-registry", reg.addr()])
            .expect("agent");
    }
    ClusterBuilder::new()
        .form(&[hosts[0] as &dyn Member, hosts[1], hosts[2]])
        .expect("cluster");
    let image = format!("{}/web:1", reg.addr());
    for h in hosts {
        let ls = ok_out(h.shoal(&["image", "ls", "-q"]).expect("image ls"));
        assert!(
            ls.trim().is_empty(),
            "{} has images already: {ls}",
            h.name()
        );
    }
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--stop-grace-period",
            "1s",
            &image,
            "sh",
            "-c",
            WEB,
        ])
        .expect("service create"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while running_tasks(h1, "web").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "web did not run on all three nodes"
        );
        sleep(Duration::from_millis(300));
    }
    // The manager pinned the tag to the registry's digest; every node pulled those bytes.
    let pinned = format!("{image}@{}", shoal_tests::registry::digest(&manifest));
    let inspect = ok_out(h1.shoal(&["service", "inspect", "web"]).expect("inspect"));
    assert!(inspect.contains(&pinned), "{inspect}");
    for h in hosts {
        ok_out(
            h.shoal(&[
                "image",
                "inspect",
                &shoal_tests::registry::digest(&manifest),
            ])
            .expect("image inspect"),
        );
    }
    // A tag the registry does not have: rejected, with the registry's word for it.
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "-d",
            "--name",
            "ghost",
            "--restart-condition",
            "none",
            &format!("{}/web:nope", reg.addr()),
        ])
        .expect("service create ghost"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ok_out(
            h1.shoal(&["service", "ps", "--format", "json", "ghost"])
                .expect("ps"),
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let rejected = v.as_array().expect("array").iter().find(|t| {
            t["Status"]["State"] == "rejected"
                && t["Status"]["Err"]
                    .as_str()
                    .is_some_and(|e| e.contains("manifest unknown"))
        });
        if rejected.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "ghost was not rejected: {out}");
        sleep(Duration::from_millis(300));
    }
    ok_out(h1.shoal(&["service", "rm", "web", "ghost"]).expect("rm"));
    assert_no_shoal_network(&hosts);
}

/// Peer-to-peer layers: three nodes start one service image that only the origin registry
/// has; one node pulls it from there, the others from that node (the managers say who holds
/// it), so the origin serves each blob once — and every node holds the pinned bytes.
#[test]
fn the_origin_serves_each_layer_once_and_peers_the_rest() {
    let tb = up(3);
    let hosts = [
        tb.host(1).expect("h1"),
        tb.host(2).expect("h2"),
        tb.host(3).expect("h3"),
    ];
    let h1 = hosts[0];
    let reg = Registry::start(&tb.bridge_addr().to_string()).expect("registry");
    let work = tempfile::tempdir().expect("tempdir");
    let tar = work.path().join("rootfs.tar");
    busybox_rootfs_tar(&tar).expect("rootfs");
    let layer = fs::read(&tar).expect("tar");
    let layout = Layout {
        dir: &work.path().join("layout"),
    };
    let manifest = layout.image(&layer, oci_arch(), &["sh"]);
    layout.finish(&manifest, false);
    reg.push(layout.dir, "peered:1").expect("push");
    for h in hosts {
        h.spawn_agent(&[
            "--dns-upstream",
            "none",
            "--insecure-registry",
            reg.addr(),
            "--registry-port",
            "5000",
        ])
        .expect("agent");
    }
    ClusterBuilder::new()
        .form(&[hosts[0] as &dyn Member, hosts[1], hosts[2]])
        .expect("cluster");
    let image = format!("{}/peered:1", reg.addr());
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "peered",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--stop-grace-period",
            "1s",
            &image,
            "sh",
            "-c",
            WEB,
        ])
        .expect("service create"),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while running_tasks(h1, "peered").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "peered did not run on all three nodes"
        );
        sleep(Duration::from_millis(300));
    }
    let layer_digest = shoal_tests::registry::digest(&layer);
    for h in hosts {
        ok_out(
            h.shoal(&[
                "image",
                "inspect",
                &shoal_tests::registry::digest(&manifest),
            ])
            .expect("image inspect"),
        );
    }
    assert_eq!(
        reg.blob_served(&layer_digest),
        1,
        "the origin served the layer more than once"
    );
    ok_out(h1.shoal(&["service", "rm", "peered"]).expect("rm"));
    assert_no_shoal_network(&hosts);
}

/// The routing mesh: a port published in ingress mode answers on every node — also on one
/// that runs no task of the service — and the mesh goes away with the service.
#[test]
fn an_ingress_port_answers_on_every_node() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    two_node_cluster(h1, h2);
    let web = WEB;
    let only_h1 = format!("node.hostname=={}", h1.name());
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "web",
            "--publish",
            "8080:80",
            "--constraint",
            &only_h1,
            "--stop-grace-period",
            "1s",
            "busybox:latest",
            "sh",
            "-c",
            web,
        ])
        .expect("service create"),
    );
    // From h1 to h2's address (h2 runs no task) and from h2 to h1's.
    for (from, to) in [(h1, h2), (h2, h1), (h2, h2)] {
        let url = format!("http://{}:8080/", to.addr());
        assert!(
            fetch_eventually(from, &url).starts_with("hello-from-"),
            "{url}"
        );
    }
    // A second service cannot take the port the mesh gave the first.
    let out = h1
        .shoal(&[
            "service",
            "create",
            "-d",
            "--name",
            "web2",
            "-p",
            "8080:80",
            "busybox:latest",
            "true",
        ])
        .expect("service create web2");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already published by service web"));
    // A port published without a published port gets one from 30000-32767, kept by updates,
    // and answers there on every node too.
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "auto",
            "--publish",
            "target=80",
            "--stop-grace-period",
            "1s",
            "busybox:latest",
            "sh",
            "-c",
            web,
        ])
        .expect("service create auto"),
    );
    let published = || {
        let v: serde_json::Value = serde_json::from_str(&ok_out(
            h1.shoal(&["service", "inspect", "auto"]).expect("inspect"),
        ))
        .expect("json");
        v[0]["Spec"]["EndpointSpec"]["Ports"][0]["PublishedPort"]
            .as_u64()
            .expect("a published port")
    };
    let port = published();
    assert!((30000..=32767).contains(&port), "{port}");
    ok_out(
        h1.shoal(&["service", "update", "-d", "--label-add", "x=1", "auto"])
            .expect("update"),
    );
    assert_eq!(published(), port);
    for to in [h1, h2] {
        let url = format!("http://{}:{port}/", to.addr());
        assert!(
            fetch_eventually(h2, &url).starts_with("hello-from-"),
            "{url}"
        );
    }

    ok_out(h1.shoal(&["service", "rm", "web", "auto"]).expect("rm"));
    assert_no_shoal_network(&[h1, h2]);
    assert!(fetch(h2, &format!("http://{}:8080/", h1.addr())).is_none());
}

/// A node cut off from the cluster: once it is seen down, connections to the service's VIP
/// go only to the tasks on the nodes that are left (a task whose node is lost is no endpoint).
#[test]
fn a_lost_node_s_tasks_leave_the_virtual_ip() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    two_node_cluster(h1, h2);
    ok_out(
        h1.shoal(&["network", "create", "backend"])
            .expect("network"),
    );
    let web = WEB;
    let on_h1 = format!("node.hostname=={}", h1.name());
    for (name, replicas, extra) in [
        ("pool", "2", vec!["--replicas-max-per-node", "1"]),
        ("client", "1", vec!["--constraint", on_h1.as_str()]),
    ] {
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "--network",
            "backend",
            "--stop-grace-period",
            "1s",
        ];
        args.extend(extra);
        args.extend(["busybox:latest", "sh", "-c", web]);
        ok_out(h1.shoal(&args).expect("service create"));
    }
    let running = |svc: &str| running_tasks(h1, svc);
    let deadline = Instant::now() + Duration::from_secs(30);
    while running("pool").len() < 2 || running("client").is_empty() {
        assert!(Instant::now() < deadline, "services did not start");
        sleep(Duration::from_millis(300));
    }
    let client = running("client")[0].0.clone();
    let client_node = running("client")[0].1.clone();
    let local: Vec<String> = running("pool")
        .into_iter()
        .filter(|(_, n, _)| *n == client_node)
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(local.len(), 1, "one pool task on the client's node");
    let hello_local = format!("hello-from-{}", &local[0][..12]);
    let root = h1.data_dir().join("containers/.tasks");
    let ten = |expect_only: Option<&str>| -> bool {
        let out = h1
            .shoal(&[
                "runtime",
                "--root",
                root.to_str().unwrap(),
                "exec",
                &client,
                "timeout",
                "30",
                "sh",
                "-c",
                "for i in $(seq 10); do timeout 2 wget -q -O - http://pool/ || echo failed; done",
            ])
            .expect("exec");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines.len() == 10
            && lines
                .iter()
                .all(|l| expect_only.map_or(l.starts_with("hello-from-"), |e| l.trim() == e))
    };
    assert!(ten(None), "the pool does not answer before the cut");
    // h2 is cut off: its agent and its task are unreachable from h1.
    tb.partition(&[&[1], &[2]]).expect("partition");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ten(Some(&hello_local)) {
        assert!(
            Instant::now() < deadline,
            "connections still go to the lost node's task"
        );
        sleep(Duration::from_millis(500));
    }
    tb.heal().expect("heal");
}

/// The health of each task of `svc` by id (`service ps --format json`: starting, healthy,
/// unhealthy).
fn task_healths(h: &Host, svc: &str) -> std::collections::HashMap<String, String> {
    let out = ok_out(
        h.shoal(&["service", "ps", "--format", "json", svc])
            .expect("ps"),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| {
            (
                t["ID"].as_str().unwrap_or("").to_string(),
                t["Status"]["Health"]["Status"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

/// Whether task `task`'s container runs on one of `hosts`.
fn task_container_runs(hosts: &[&Host], task: &str) -> bool {
    hosts.iter().any(|h| {
        let root = h.data_dir().join("containers/.tasks");
        let out = h
            .shoal(&["runtime", "--root", root.to_str().unwrap(), "state", task])
            .expect("runtime state");
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["status"] == "running")
    })
}

/// Service discovery and the virtual IP answer only a service's healthy tasks: of three
/// replicas on an overlay across two hosts, none while every check still fails (in its start
/// period), then those made healthy (their check's file created in them), all three once the
/// last is too, and no longer one whose check then fails — at once, while its container still
/// runs out its stop grace period. A client task asks `tasks.hc` of its embedded resolver and
/// connects through the VIP, whose answers never come from a task that is not healthy.
#[test]
fn the_virtual_ip_and_dns_answer_only_healthy_tasks() {
    let tb = up(2);
    let (h1, h2) = (tb.host(1).expect("h1"), tb.host(2).expect("h2"));
    let hosts = [h1, h2];
    two_node_cluster(h1, h2);
    ok_out(
        h1.shoal(&["network", "create", "backend"])
            .expect("network"),
    );
    // A served task answers with its hostname (its short id). It ignores SIGTERM, so once
    // unhealthy it runs out its 30 s grace period before it is killed.
    let web = format!("trap '' TERM; {WEB}");
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--detach",
            "--name",
            "hc",
            "--replicas",
            "3",
            "--network",
            "backend",
            "--stop-grace-period",
            "30s",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "300ms",
            "--health-retries",
            "2",
            "--health-start-period",
            "10m",
            "busybox:latest",
            "sh",
            "-c",
            &web,
        ])
        .expect("service create hc"),
    );
    ok_out(
        h1.shoal(&[
            "service",
            "create",
            "--name",
            "client",
            "--network",
            "backend",
            "--stop-grace-period",
            "1s",
            "busybox:latest",
            "sleep",
            "3600",
        ])
        .expect("service create client"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (hc, client) = loop {
        let (hc, client) = (running_tasks(h1, "hc"), running_tasks(h1, "client"));
        if hc.len() == 3 && client.len() == 1 {
            break (hc, client.into_iter().next().expect("client"));
        }
        assert!(
            Instant::now() < deadline,
            "tasks not running: {hc:?} {client:?}"
        );
        sleep(Duration::from_millis(300));
    };
    let healths = task_healths(h1, "hc");
    assert!(
        hc.iter().all(|t| healths[&t.0] == "starting"),
        "{healths:?}"
    );
    let exec = |task: &str, args: &[&str]| task_exec(&hosts, task, args);
    // The addresses a name resolves to from the client.
    let lookup = |name: &str| -> std::collections::BTreeSet<String> {
        exec(&client.0, &["nslookup", name])
            .unwrap_or_default()
            .lines()
            .skip_while(|l| !l.starts_with("Name:"))
            .filter_map(|l| l.strip_prefix("Address:").map(|a| a.trim().to_string()))
            .collect()
    };
    // The client's resolver answers (its own task), before its silence on hc counts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lookup("tasks.client").contains(&client.2) {
        assert!(
            Instant::now() < deadline,
            "the client's resolver never answered tasks.client"
        );
        sleep(Duration::from_millis(300));
    }
    let none_healthy = lookup("tasks.hc");
    assert!(
        hc.iter().all(|t| !none_healthy.contains(&t.2)),
        "tasks.hc answers tasks still starting: {none_healthy:?} of {hc:?}"
    );
    // `n` connections through the VIP: the tasks (short ids) that answered, and how many
    // failed. An answer from a task outside `healthy` fails the test at once.
    let hello = |t: &(String, String, String)| format!("hello-from-{}", &t.0[..12]);
    let through_vip = |n: usize, healthy: &[&(String, String, String)]| {
        // Not wget -T: busybox 1.35's crashes with it.
        let script = format!(
            "for i in $(seq {n}); do timeout 3 wget -q -O - http://hc/ || echo failed; done"
        );
        let out = exec(&client.0, &["timeout", "120", "sh", "-c", &script]).unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        let mut failed = 0;
        for l in out.lines() {
            if l == "failed" {
                failed += 1;
                continue;
            }
            assert!(
                healthy.iter().any(|t| hello(t) == l),
                "the VIP reached a task that is not healthy: {l} (healthy: {healthy:?}, all: {hc:?})"
            );
            seen.insert(l.to_string());
        }
        (seen, failed)
    };
    let (seen, _) = through_vip(3, &[]);
    assert!(seen.is_empty(), "{seen:?}");

    // `healthy` become the only answers of tasks.hc, and of the VIP.
    let serve_only = |healthy: &[&(String, String, String)]| {
        let want: std::collections::BTreeSet<String> =
            healthy.iter().map(|t| t.2.clone()).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = lookup("tasks.hc");
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tasks.hc answers {got:?}, not the healthy {want:?}; healths {:?}",
                task_healths(h1, "hc")
            );
            sleep(Duration::from_millis(300));
        }
        let want: std::collections::BTreeSet<String> = healthy.iter().map(|t| hello(t)).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (seen, failed) = through_vip(10 * healthy.len(), healthy);
            if seen == want && failed == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the VIP reached {seen:?} ({failed} failed), not every one of {want:?}"
            );
            sleep(Duration::from_millis(300));
        }
    };
    let wait_health = |task: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h = task_healths(h1, "hc");
            if h.get(task).map(String::as_str) == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {task} never got {want}: {h:?}"
            );
            sleep(Duration::from_millis(200));
        }
    };
    for t in &hc[..2] {
        exec(&t.0, &["touch", "/tmp/ok"]).expect("touch /tmp/ok");
        wait_health(&t.0, "healthy");
    }
    serve_only(&[&hc[0], &hc[1]]);
    exec(&hc[2].0, &["touch", "/tmp/ok"]).expect("touch /tmp/ok");
    wait_health(&hc[2].0, "healthy");
    serve_only(&[&hc[0], &hc[1], &hc[2]]);

    // The first one's check fails from now on: out of both at once, though it still runs.
    exec(&hc[0].0, &["rm", "/tmp/ok"]).expect("rm /tmp/ok");
    let deadline = Instant::now() + Duration::from_secs(30);
    while lookup("tasks.hc").contains(&hc[0].2) {
        assert!(
            Instant::now() < deadline,
            "tasks.hc still answers the failing task"
        );
        sleep(Duration::from_millis(200));
    }
    assert!(
        task_container_runs(&hosts, &hc[0].0),
        "the failing task left discovery only once it stopped"
    );
    serve_only(&[&hc[1], &hc[2]]);
    assert_eq!(task_healths(h1, "hc")[&hc[0].0], "unhealthy");
}
