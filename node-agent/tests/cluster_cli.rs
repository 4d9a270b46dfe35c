//! `shoal agent` processes on 127.0.0.x, driven through the CLI as a user would.

use crate::support;

use shoal_tests::cluster::{ClusterBuilder, Member};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{manager_statuses, Agent, AgentKind, SHOAL};

const KIND: AgentKind = AgentKind {
    net: "127.0.0",
    host_prefix: "host",
    hollow: false,
    advertise: false,
};

#[test]
fn cli_reports_a_missing_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = Command::new(SHOAL)
        .args(["node", "ls"])
        .env("SHOAL_SOCKET", &sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        format!(
            "shoal: cannot reach the shoal daemon at {}: is `shoal agent` running?",
            sock.display()
        )
    );
}

#[test]
fn three_manager_processes_and_a_worker() {
    let root = tempfile::tempdir().unwrap();
    let mut m1 = Agent::start(root.path(), 1, KIND);
    let m2 = Agent::start(root.path(), 2, KIND);
    let m3 = Agent::start(root.path(), 3, KIND);
    let w4 = Agent::start(root.path(), 4, KIND);

    let init = m1.ok(&["cluster", "init", "--advertise-addr", &m1.addr.clone()]);
    assert!(
        init.contains("shoal cluster join --token SHOAL-1-"),
        "{init}"
    );
    assert!(init.contains(&m1.addr), "{init}");
    let manager_token = m1
        .ok(&["cluster", "join-token", "manager", "-q"])
        .trim()
        .to_string();
    let worker_token = m1
        .ok(&["cluster", "join-token", "worker", "-q"])
        .trim()
        .to_string();

    // A wrong token is refused and leaves nothing behind.
    let last = if worker_token.ends_with('x') {
        "y"
    } else {
        "x"
    };
    let bogus = format!("{}{last}", &worker_token[..worker_token.len() - 1]);
    let err = w4.fails(&["cluster", "join", "--token", &bogus, &m1.addr]);
    assert!(err.contains("token"), "{err}");
    assert!(!w4.dir.join("data/pki").exists());

    assert!(m2
        .ok(&["cluster", "join", "--token", &manager_token, &m1.addr])
        .contains("as a manager"));
    // Through a follower: the join is forwarded to the leader.
    assert!(m3
        .ok(&["cluster", "join", "--token", &manager_token, &m2.addr])
        .contains("as a manager"));
    assert!(w4
        .ok(&["cluster", "join", "--token", &worker_token, &m3.addr])
        .contains("as a worker"));

    let ls = m2.ok(&["node", "ls"]);
    let statuses = manager_statuses(&ls);
    assert_eq!(statuses.len(), 4, "{ls}");
    assert_eq!(
        statuses.iter().filter(|(_, s)| s == "Leader").count(),
        1,
        "{ls}"
    );
    assert_eq!(
        statuses.iter().filter(|(_, s)| s == "Reachable").count(),
        2,
        "{ls}"
    );
    assert!(
        statuses.contains(&("host4".to_string(), String::new())),
        "{ls}"
    );
    assert!(
        ls.lines().any(|l| l.contains(" *") && l.contains("host2")),
        "the local node is starred: {ls}"
    );
    assert_eq!(m3.ok(&["node", "ls", "-q"]).lines().count(), 4);
    let json: serde_json::Value =
        serde_json::from_str(&m3.ok(&["node", "ls", "--format", "json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);

    // A worker holds no cluster state.
    let err = w4.fails(&["service", "ls"]);
    assert!(err.contains("not a manager"), "{err}");

    // Writes through any manager; reads from any other.
    let id = m2.ok(&[
        "service",
        "create",
        "--no-resolve-image",
        "--detach",
        "--name",
        "web",
        "--replicas",
        "2",
        "busybox:1.36",
        "sleep",
        "60",
    ]);
    assert_eq!(id.trim().len(), 25);
    let err = m3.fails(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "web",
        "busybox",
    ]);
    assert!(err.contains("already in use"), "{err}");
    let err = m3.fails(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "bad name",
        "busybox",
    ]);
    assert!(err.contains("invalid service name"), "{err}");
    let err = m3.fails(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "c",
        "--constraint",
        "node.zone==x",
        "busybox",
    ]);
    assert!(err.contains("invalid constraint"), "{err}");
    let ls = m3.ok(&["service", "ls"]);
    assert!(ls.contains("web") && ls.contains("busybox:1.36"), "{ls}");
    let inspect: serde_json::Value =
        serde_json::from_str(&m1.ok(&["service", "inspect", "web"])).unwrap();
    assert_eq!(inspect[0]["Spec"]["Mode"]["Replicated"]["Replicas"], 2);
    assert_eq!(
        inspect[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Args"][0],
        "sleep"
    );

    // Kill the first manager (the leader) by pid: the others elect and writes resume.
    let leader_host = manager_statuses(&m2.ok(&["node", "ls"]))
        .into_iter()
        .find(|(_, s)| s == "Leader")
        .unwrap()
        .0;
    assert_eq!(leader_host, "host1");
    m1.kill();
    m2.eventually(&[
        "service",
        "create",
        "--no-resolve-image",
        "--detach",
        "--name",
        "after-kill",
        "busybox",
    ]);
    let ls = m3.eventually(&["node", "ls"]);
    let statuses = manager_statuses(&ls);
    assert!(
        statuses.contains(&("host1".to_string(), "Unreachable".to_string())),
        "{ls}"
    );
    assert_eq!(
        statuses.iter().filter(|(_, s)| s == "Leader").count(),
        1,
        "{ls}"
    );

    // Quorum guard: with host1 down, demoting another manager would lose quorum.
    let err = m2.fails(&["node", "demote", "host3"]);
    assert!(err.contains("quorum"), "{err}");

    // The killed manager comes back and catches up.
    m1.spawn();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ls = m1.shoal(&["service", "ls", "-q"]);
        if ls.status.success() && String::from_utf8_lossy(&ls.stdout).lines().count() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted manager did not catch up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let inspect: serde_json::Value = serde_json::from_str(&m1.ok(&["cluster", "inspect"])).unwrap();
    assert_eq!(inspect[0]["Spec"]["Raft"]["HeartbeatInterval"], "50ms");

    // Node updates and removal of the worker.
    m1.ok(&[
        "node",
        "update",
        "--availability",
        "drain",
        "--label-add",
        "zone=east",
        "host4",
    ]);
    let node: serde_json::Value =
        serde_json::from_str(&m1.ok(&["node", "inspect", "host4"])).unwrap();
    assert_eq!(node[0]["Spec"]["Availability"], "drain");
    assert_eq!(node[0]["Spec"]["Labels"]["zone"], "east");
    m1.ok(&["node", "rm", "--force", "host4"]);
    assert_eq!(m1.ok(&["node", "ls", "-q"]).lines().count(), 3);

    // Cluster settings and token rotation.
    assert!(m2
        .ok(&[
            "cluster",
            "update",
            "--snapshot-interval",
            "5000",
            "--dispatcher-heartbeat",
            "2s"
        ])
        .contains("Cluster updated"));
    let inspect: serde_json::Value = serde_json::from_str(&m3.ok(&["cluster", "inspect"])).unwrap();
    assert_eq!(inspect[0]["Spec"]["Raft"]["SnapshotInterval"], 5000);
    assert_eq!(inspect[0]["Spec"]["Dispatcher"]["HeartbeatPeriod"], "2s");
    let err = m2.fails(&["cluster", "update", "--heartbeat-interval", "0s"]);
    assert!(err.contains("greater than zero"), "{err}");
    let err = m2.fails(&["cluster", "update", "--cert-expiry", "30m"]);
    assert!(err.contains("at least 1 hour"), "{err}");
    let rotated = m2.ok(&["cluster", "join-token", "worker", "--rotate"]);
    assert!(
        rotated.contains("Successfully rotated worker join token"),
        "{rotated}"
    );
    assert_ne!(
        m1.ok(&["cluster", "join-token", "worker", "-q"]).trim(),
        worker_token
    );

    // Leaving: a manager must be demoted first (or forced); a worker just leaves.
    let err = m3.fails(&["cluster", "leave"]);
    assert!(err.contains("demote"), "{err}");
    assert!(m1.ok(&["node", "demote", "host3"]).contains("demoted"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The demoted daemon notices by itself and then runs as a worker.
        let out = m3.shoal(&["node", "ls"]);
        if String::from_utf8_lossy(&out.stderr).contains("not a manager") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host3 did not turn into a worker"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(m3
        .ok(&["cluster", "leave"])
        .contains("Node left the cluster"));
    assert!(!m3.dir.join("data/node.json").exists());

    m1.ok(&["service", "rm", "web"]);
    assert_eq!(m2.eventually(&["service", "ls", "-q"]).lines().count(), 1);
}

/// One line on stderr, starting `shoal:`, containing `want`.
fn one_line(err: &str, want: &str) {
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("shoal: ") && err.contains(want),
        "{err:?} lacks {want:?}"
    );
}

/// Cluster networks are Raft objects: made through a follower, seen by every manager, with
/// subnets from the pool that never overlap and clear refusals.
#[test]
fn networks_are_replicated_objects_with_their_own_subnets() {
    let root = tempfile::tempdir().unwrap();
    let m1 = Agent::start(root.path(), 5, KIND);
    let m2 = Agent::start(root.path(), 6, KIND);
    ClusterBuilder::new()
        .managers(2)
        .form(&[&m1.member() as &dyn Member, &m2.member()])
        .unwrap();

    // Created through the follower (forwarded to the leader), read on both.
    let id = m2
        .eventually(&["network", "create", "backend"])
        .trim()
        .to_string();
    assert_eq!(id.len(), 25, "{id}");
    m2.ok(&["network", "create", "--subnet", "10.50.0.0/16", "front"]);
    for m in [&m1, &m2] {
        let ls = m.ok(&["network", "ls"]);
        let lines: Vec<&str> = ls.lines().collect();
        assert!(lines[0].starts_with("NETWORK ID"), "{ls}");
        for want in ["bridge", "host", "none", "ingress", "backend", "front"] {
            assert!(ls.contains(want), "{want} missing: {ls}");
        }
        assert!(
            ls.contains(&format!("{}   backend   overlay   swarm", &id[..12])),
            "{ls}"
        );
    }
    let v: serde_json::Value =
        serde_json::from_str(&m1.ok(&["network", "inspect", "backend", "front"])).unwrap();
    assert_eq!(v[0]["ID"], id.as_str());
    assert_eq!(v[0]["IPAM"]["Config"][0]["Subnet"], "10.0.0.0/24");
    assert_eq!(v[0]["IPAM"]["Config"][0]["Gateway"], "10.0.0.1");
    assert_eq!(v[1]["IPAM"]["Config"][0]["Subnet"], "10.50.0.0/16");
    assert_eq!(v[1]["Attachable"], false);
    let vnis: Vec<&str> = (0..2)
        .map(|i| {
            v[i]["Options"]["com.docker.network.driver.overlay.vxlanid_list"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_ne!(vnis[0], vnis[1]);

    // Refusals: one line, exit 1, nothing made.
    for (args, want) in [
        (
            vec!["network", "create", "backend"],
            "already in use by network",
        ),
        (
            vec!["network", "create", "--subnet", "10.50.3.0/24", "x"],
            "overlaps network front's 10.50.0.0/16",
        ),
        (
            vec!["network", "create", "-d", "bridge", "x"],
            "driver bridge is not supported",
        ),
        (
            vec!["network", "create", "--opt", "encrypted=", "x"],
            "option encrypted is not supported",
        ),
        (vec!["network", "create", "host"], "reserved"),
        (
            vec!["network", "create", "--subnet", "10.9.0.0/30", "x"],
            "/8 to /29",
        ),
        (vec!["network", "rm", "nope"], "network nope not found"),
        (
            vec![
                "service",
                "create",
                "--no-resolve-image",
                "-d",
                "--network",
                "nope",
                "busybox:latest",
                "true",
            ],
            "network nope not found",
        ),
        (
            vec![
                "service",
                "create",
                "--no-resolve-image",
                "-d",
                "--network",
                "host",
                "--network",
                "backend",
                "busybox:latest",
                "true",
            ],
            "network host or none is the task's only network",
        ),
    ] {
        let out = m1.shoal(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        one_line(&String::from_utf8_lossy(&out.stderr), want);
    }
    // backend, front and the routing mesh's ingress.
    assert_eq!(m1.ok(&["network", "ls", "-q"]).lines().count(), 3);

    // In use by a service: kept by rm and prune.
    m1.ok(&[
        "service",
        "create",
        "--no-resolve-image",
        "-d",
        "--name",
        "user",
        "--network",
        "front",
        "busybox:latest",
        "true",
    ]);
    let out = m1.shoal(&["network", "rm", "front"]);
    assert_eq!(out.status.code(), Some(1));
    one_line(
        &String::from_utf8_lossy(&out.stderr),
        "in use by service user",
    );
    // Moved from network to network by `service update`: the spec names it, and the service
    // has a virtual IP on each network it is on and on no other.
    let net_id = |name: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&m1.ok(&["network", "inspect", name])).unwrap();
        v[0]["ID"].as_str().unwrap().to_string()
    };
    let (front_id, backend_id) = (net_id("front"), net_id("backend"));
    let on = |svc: &str| -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value =
            serde_json::from_str(&m1.ok(&["service", "inspect", svc])).unwrap();
        let strs = |a: &serde_json::Value, f: &str| -> Vec<String> {
            let mut out: Vec<String> = a
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x[f].as_str().unwrap().to_string())
                .collect();
            out.sort();
            out
        };
        (
            strs(&v[0]["Spec"]["TaskTemplate"]["Networks"], "Target"),
            strs(&v[0]["Endpoint"]["VirtualIPs"], "NetworkID"),
        )
    };
    m1.ok(&[
        "service",
        "update",
        "-d",
        "--network-add",
        "backend",
        "user",
    ]);
    let mut both = vec![front_id.clone(), backend_id.clone()];
    both.sort();
    assert_eq!(on("user"), (both.clone(), both));
    for (args, want) in [
        (
            vec![
                "service",
                "update",
                "-d",
                "--network-add",
                "backend",
                "user",
            ],
            "already attached to network",
        ),
        (
            vec!["service", "update", "-d", "--network-rm", "nope", "user"],
            "network nope not found",
        ),
        (
            vec!["service", "update", "-d", "--network-add", "host", "user"],
            "only cluster networks",
        ),
    ] {
        let out = m1.shoal(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        one_line(&String::from_utf8_lossy(&out.stderr), want);
    }
    m1.ok(&["service", "update", "-d", "--network-rm", "front", "user"]);
    let backend = vec![backend_id.clone()];
    assert_eq!(on("user"), (backend.clone(), backend));
    // Off front, the service no longer holds it.
    m1.ok(&["network", "rm", "front"]);
    m1.ok(&["network", "create", "--subnet", "10.50.0.0/16", "front"]);
    m1.ok(&[
        "service",
        "update",
        "-d",
        "--network-rm",
        "backend",
        "--network-add",
        "front",
        "user",
    ]);
    assert_eq!(m2.ok(&["network", "prune"]), "backend\n");
    m1.ok(&["service", "rm", "user"]);
    m1.ok(&["network", "rm", "front"]);
    assert_eq!(m2.ok(&["network", "ls", "-q"]), "ingress\n");
    let out = m1.shoal(&["network", "rm", "ingress"]);
    assert_eq!(out.status.code(), Some(1));
    one_line(&String::from_utf8_lossy(&out.stderr), "cannot be removed");
}

/// `cluster init --vni-start`: the ingress network takes that VXLAN id and cluster networks the
/// ones above it; a bad value is one line of refusal that leaves the node out of any cluster.
/// (2000: below the ranges test clusters lease, and no container joins these networks.)
#[test]
fn cluster_init_takes_the_networks_vni_start() {
    let root = tempfile::tempdir().unwrap();
    let m1 = Agent::start(root.path(), 7, KIND);
    for bad in ["-1", "x"] {
        let out = m1.shoal(&["cluster", "init", "--vni-start", bad]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--vni-start {bad}: a usage error"
        );
    }
    for (bad, want) in [
        ("0", "invalid --vni-start 0"),
        ("16777215", "invalid VNI start"),
    ] {
        let err = m1.fails(&["cluster", "init", "--vni-start", bad]);
        one_line(&err, want);
    }
    assert!(!m1.dir.join("data/pki").exists(), "nothing made");

    m1.ok(&[
        "cluster",
        "init",
        "--advertise-addr",
        &m1.addr.clone(),
        "--vni-start",
        "2000",
    ]);
    m1.eventually(&["network", "create", "backend"]);
    let v: serde_json::Value =
        serde_json::from_str(&m1.ok(&["network", "inspect", "ingress", "backend"])).unwrap();
    let vni = |i: usize| v[i]["Options"]["com.docker.network.driver.overlay.vxlanid_list"].clone();
    assert_eq!((vni(0), vni(1)), ("2000".into(), "2001".into()));
    let c: serde_json::Value = serde_json::from_str(&m1.ok(&["cluster", "inspect"])).unwrap();
    assert_eq!(c[0]["Spec"]["Network"]["VNIStart"], 2000);
    // Other settings change; the VNI start stays.
    m1.ok(&["cluster", "update", "--task-history-limit", "3"]);
    let c: serde_json::Value = serde_json::from_str(&m1.ok(&["cluster", "inspect"])).unwrap();
    assert_eq!(c[0]["Spec"]["Network"]["VNIStart"], 2000);
    assert_eq!(
        c[0]["Spec"]["Orchestration"]["TaskHistoryRetentionLimit"],
        3
    );
}
