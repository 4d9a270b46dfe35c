//! `shoal node promote` of a worker, with real `shoal agent` processes on 127.0.0.x: the
//! worker learns of it through its dispatcher session, renews into a manager certificate,
//! starts a manager and joins Raft; a restart resumes it as a manager.

use crate::support;

use shoal_tests::cluster::{ClusterBuilder, Member};
use std::time::{Duration, Instant};
use support::{manager_statuses, Agent, AgentKind};

/// How long a promoted worker may take to show as a reachable manager.
const PROMOTION_WAIT: Duration = Duration::from_secs(30);
/// Hollow agents (no containers), apart from cluster_cli's addresses so both run at once.
const KIND: AgentKind = AgentKind {
    net: "127.0.1",
    host_prefix: "phost",
    hollow: true,
    advertise: true,
};

fn status_of(ls: &str, host: &str) -> String {
    manager_statuses(ls)
        .into_iter()
        .find(|(h, _)| h == host)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

/// Polls `node ls` on `on` until `host` shows `want`.
fn wait_status(on: &Agent, host: &str, want: &str) -> String {
    let deadline = Instant::now() + PROMOTION_WAIT;
    loop {
        let out = on.shoal(&["node", "ls"]);
        let ls = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && status_of(&ls, host) == want {
            return ls;
        }
        assert!(
            Instant::now() < deadline,
            "{host} never showed as {want:?} on {}: {ls}{}",
            on.host,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_promoted_worker_becomes_a_voting_manager() {
    let root = tempfile::tempdir().unwrap();
    let m1 = Agent::start(root.path(), 1, KIND);
    let mut w2 = Agent::start(root.path(), 2, KIND);

    m1.ok(&["cluster", "init", "--advertise-addr", &m1.addr.clone()]);
    let worker_token = m1
        .ok(&["cluster", "join-token", "worker", "-q"])
        .trim()
        .to_string();
    assert!(w2
        .ok(&["cluster", "join", "--token", &worker_token, &m1.addr])
        .contains("as a worker"));
    wait_status(&m1, "phost2", "");
    assert_eq!(w2.recorded_role(), "worker");
    let err = w2.fails(&["node", "ls"]);
    assert!(err.contains("not a manager"), "{err}");

    // The only manager cannot go.
    let err = m1.fails(&["node", "demote", "phost1"]);
    assert!(err.contains("last manager"), "{err}");

    assert!(m1
        .ok(&["node", "promote", "phost2"])
        .contains("promoted to a manager"));
    let ls = wait_status(&m1, "phost2", "Reachable");
    assert_eq!(status_of(&ls, "phost1"), "Leader", "{ls}");
    assert_eq!(w2.recorded_role(), "manager");
    assert!(
        w2.dir.join("data/pki/ca.key").exists(),
        "a manager holds the CA key"
    );
    let node: serde_json::Value =
        serde_json::from_str(&m1.ok(&["node", "inspect", "phost2"])).unwrap();
    assert_eq!(node[0]["Spec"]["Role"], "manager", "{node}");

    // The promoted node serves the control API and its writes reach the leader.
    let ls = w2.ok(&["node", "ls"]);
    assert_eq!(status_of(&ls, "phost2"), "Reachable", "{ls}");
    w2.ok(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "via-promoted",
        "busybox",
    ]);
    assert!(m1.ok(&["service", "ls"]).contains("via-promoted"));

    // Quorum guard: with one of the two managers down, demoting it is refused.
    w2.kill();
    let err = m1.fails(&["node", "demote", "phost2"]);
    assert!(err.contains("quorum"), "{err}");

    // A restart resumes the promoted node as a manager.
    w2.spawn();
    wait_status(&m1, "phost2", "Reachable");
    assert_eq!(w2.recorded_role(), "manager");

    // The promoted node is a voter: it can outlive the first manager's demotion (a learner
    // would be refused as the last manager would go) and then leads alone.
    assert!(w2.ok(&["node", "demote", "phost1"]).contains("demoted"));
    let ls = wait_status(&w2, "phost2", "Leader");
    assert_eq!(status_of(&ls, "phost1"), "", "{ls}");
    w2.ok(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "after-demote",
        "busybox",
    ]);
    let deadline = Instant::now() + PROMOTION_WAIT;
    loop {
        // The demoted first manager notices by itself and runs on as a worker.
        let out = m1.shoal(&["node", "ls"]);
        if String::from_utf8_lossy(&out.stderr).contains("not a manager") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "phost1 did not turn into a worker"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It records the change once its manager has stopped.
    let deadline = Instant::now() + PROMOTION_WAIT;
    while m1.recorded_role() != "worker" {
        assert!(
            Instant::now() < deadline,
            "phost1 did not record its demotion"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !m1.dir.join("data/pki/ca.key").exists(),
        "a demoted manager drops the CA key"
    );
}

#[test]
fn a_worker_whose_join_manager_is_gone_is_promoted_through_the_others() {
    let root = tempfile::tempdir().unwrap();
    let m1 = Agent::start(root.path(), 11, KIND);
    let m2 = Agent::start(root.path(), 12, KIND);
    let w3 = Agent::start(root.path(), 13, KIND);
    ClusterBuilder::new()
        .managers(2)
        .form(&[&m1.member() as &dyn Member, &m2.member(), &w3.member()])
        .unwrap();
    wait_status(&m2, "phost13", "");

    // The manager the worker joined through stops being one (its port closes).
    m2.ok(&["node", "demote", "phost11"]);
    wait_status(&m2, "phost12", "Leader");
    let deadline = Instant::now() + PROMOTION_WAIT;
    while m1.recorded_role() != "worker" {
        assert!(
            Instant::now() < deadline,
            "phost11 did not turn into a worker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    m2.ok(&["node", "promote", "phost13"]);
    let ls = wait_status(&m2, "phost13", "Reachable");
    assert_eq!(status_of(&ls, "phost12"), "Leader", "{ls}");
    assert_eq!(w3.recorded_role(), "manager");
    w3.ok(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "via-w3",
        "busybox",
    ]);
    assert!(m2.ok(&["service", "ls"]).contains("via-w3"));
}
