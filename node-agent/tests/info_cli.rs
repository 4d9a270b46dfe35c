//! `shoal info` through the real CLI: a node of a one-node cluster (its agent on the socket),
//! and a data dir with no agent at all.

use crate::services;

use std::process::Command;

use services::*;

#[test]
fn info_tells_the_node_its_cluster_and_its_store() {
    let c = Cluster::new(1, 1);
    let n = &c.nodes[0];
    let text = n.ok(&["info"]);
    assert!(text.contains(" Role:           manager"), "{text}");
    assert!(text.contains(" Images:         1 ("), "{text}");
    assert!(text.contains(" Cgroups:        v"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&n.ok(&["info", "--format", "json"])).unwrap();
    assert_eq!(v["Agent"]["Role"], "manager", "{v}");
    assert_eq!(v["Agent"]["NodeID"].as_str().unwrap().len(), 25, "{v}");
    assert_eq!(v["DataDir"], n.data().display().to_string(), "{v}");
    assert_eq!(v["Images"], 1, "{v}");
    n.ok(&["service", "create", "--name", "one", IMAGE, "sleep", "3600"]);
    let v: serde_json::Value = serde_json::from_str(&n.ok(&["info", "--format", "json"])).unwrap();
    assert_eq!(v["Tasks"], 1, "{v}");

    // No agent: the data dir's facts, and it says so.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(SHOAL)
        .arg("info")
        .env("SHOAL_SOCKET", empty.path().join("none.sock"))
        .env("SHOAL_DATA_DIR", empty.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No agent answers on"), "{text}");
    assert!(text.contains(" Images:         0 (0B)"), "{text}");
}
