//! Two clusters of loopback agents at once, as tests running beside each other make them. Their
//! agents share the machine's network namespace, where an overlay's devices (`shb<vni>`,
//! `shx<vni>`) and records (`ov<vni>@<netns>`) are named by its VXLAN id: each test cluster
//! takes a range of its own (`cluster init --vni-start`), so removing one cluster's overlay
//! leaves the other's devices and traffic alone.

use crate::services;

use services::*;

/// A service of two tasks on a new overlay network of cluster `c`: the network's VNI and the
/// tasks' ids with their addresses on it.
fn overlay_service(c: &Cluster) -> (String, Vec<(String, String)>) {
    let m = &c.nodes[0];
    m.ok(&["network", "create", "backend"]);
    m.ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "pair",
        "--network",
        "backend",
        "--replicas",
        "2",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    c.until("both tasks running", || c.running("pair").len() == 2);
    let net: serde_json::Value =
        serde_json::from_str(&m.ok(&["network", "inspect", "backend"])).unwrap();
    let vni = net[0]["Options"]["com.docker.network.driver.overlay.vxlanid_list"]
        .as_str()
        .unwrap()
        .to_string();
    let running = c.running("pair");
    let tasks = c
        .tasks_json("pair")
        .into_iter()
        .filter_map(|t| {
            let id = t["ID"].as_str()?.to_string();
            let addr = t["NetworksAttachments"][0]["Addresses"][0].as_str()?;
            let ip = addr.split('/').next()?.to_string();
            running.contains_key(&id).then_some((id, ip))
        })
        .collect::<Vec<_>>();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    (vni, tasks)
}

/// The overlay devices of VNI `vni` in this network namespace.
fn devices(vni: &str) -> Vec<String> {
    let want = [format!("shb{vni}"), format!("shx{vni}")];
    link_names()
        .into_iter()
        .filter(|l| want.contains(l))
        .collect()
}

/// Each task of `tasks` reaches the other over the overlay (ping from inside its container).
fn reach_each_other(c: &Cluster, tasks: &[(String, String)]) {
    for (from, to) in [(&tasks[0], &tasks[1]), (&tasks[1], &tasks[0])] {
        c.until(
            &format!("{} reaching {} on the overlay", from.0, to.1),
            || {
                c.nodes[0]
                    .runtime(&[
                        "exec",
                        "--timeout",
                        "10s",
                        &from.0,
                        "--",
                        "ping",
                        "-c",
                        "1",
                        "-W",
                        "2",
                        &to.1,
                    ])
                    .status
                    .success()
            },
        );
    }
}

#[test]
fn two_loopback_clusters_keep_their_overlays_apart() {
    let c1 = Cluster::new(1, 1);
    let c2 = Cluster::new(1, 1);
    let (vni1, tasks1) = overlay_service(&c1);
    let (vni2, tasks2) = overlay_service(&c2);
    for (c, vni, tasks) in [(&c1, &vni1, &tasks1), (&c2, &vni2, &tasks2)] {
        assert_eq!(
            devices(vni).len(),
            2,
            "the overlay's bridge and VXLAN device"
        );
        reach_each_other(c, tasks);
    }

    // The second cluster's overlay goes with its last task and its network.
    let m2 = &c2.nodes[0];
    m2.ok(&["service", "rm", "pair"]);
    c2.until("the second cluster's tasks gone", || {
        m2.containers().is_empty()
    });
    m2.ok(&["network", "rm", "backend"]);
    c2.until("the second cluster's overlay devices removed", || {
        devices(&vni2).is_empty()
    });

    // The first cluster's overlay is whole and still carries its traffic.
    assert_eq!(
        devices(&vni1).len(),
        2,
        "the first cluster's overlay devices survive the second's removal"
    );
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/net").unwrap());
    let members = std::path::Path::new(shoal_runtime::network::RUN_DIR)
        .join("net")
        .join(format!("ov{vni1}@{ino}"))
        .join("ip");
    let held: Vec<String> = std::fs::read_dir(&members)
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    for (id, _) in &tasks1 {
        assert!(
            held.iter().any(|h| h.trim() == id),
            "the first cluster's task {id} is still a member: {held:?}"
        );
    }
    reach_each_other(&c1, &tasks1);
    assert_ne!(vni1, vni2, "each cluster has VXLAN ids of its own");
}
