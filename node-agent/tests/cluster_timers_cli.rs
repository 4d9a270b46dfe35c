//! `cluster update` of the Raft timers applies at once on every manager, without a restart:
//! three `shoal agent` managers; the election timeouts are raised through the CLI of
//! one (8–10 s), every manager's election driver says it follows them, and when the leader is killed
//! the others wait out the new lease before they elect (with the old 200–400 ms they elect in
//! well under 2 s). Bad timers are refused in one line and change nothing.

use crate::support;

use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use support::{Agent, AgentKind};

const KIND: AgentKind = AgentKind {
    net: "127.0.8",
    host_prefix: "tm",
    hollow: true,
    advertise: true,
};

/// The raised election timeout: no election before this after the last leader contact.
const LEASE: Duration = Duration::from_secs(10);
/// How long the managers may take to elect once the lease has passed (the jitter is 2 s).
const ELECT_WAIT: Duration = Duration::from_secs(40);

/// The Leader's hostname as `node ls` on `a` sees it, if `a` answers.
fn leader(a: &Agent) -> Option<String> {
    let out = a.shoal(&["node", "ls", "--format", "json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|n| n["ManagerStatus"]["Leader"] == true)
        .and_then(|n| n["Description"]["Hostname"].as_str().map(String::from))
}

#[test]
fn raised_election_timeouts_apply_at_once_on_every_manager() {
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = (1..=3)
        .map(|n| Agent::start(root.path(), n, KIND))
        .collect();
    let members: Vec<_> = agents.iter().map(Agent::member).collect();
    let members: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
    ClusterBuilder::new()
        .managers(3)
        .heartbeat("1s", 10)
        .form(&members)
        .unwrap();
    let old = agents[0].eventually(&["cluster", "inspect"]);

    // Bad timers: one line, nothing changed.
    for (args, want) in [
        (
            &["cluster", "update", "--election-timeout-min", "soon"][..],
            "invalid duration",
        ),
        (
            &[
                "cluster",
                "update",
                "--election-timeout-min",
                "9s",
                "--election-timeout-max",
                "8s",
            ][..],
            "election",
        ),
    ] {
        let err = agents[1].fails(args);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("shoal: ") && err.contains(want), "{err}");
    }
    let unchanged: serde_json::Value =
        serde_json::from_str(&agents[0].ok(&["cluster", "inspect"])).unwrap();
    let old: serde_json::Value = serde_json::from_str(&old).unwrap();
    assert_eq!(unchanged[0]["Spec"], old[0]["Spec"]);

    // Raised through one manager's CLI; every manager's driver takes them, no restart.
    let said = agents[1].ok(&[
        "cluster",
        "update",
        "--heartbeat-interval",
        "500ms",
        "--election-timeout-min",
        "8s",
        "--election-timeout-max",
        "10s",
    ]);
    assert!(
        said.contains("Elections follow the new timeouts at once"),
        "{said}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for a in &agents {
        while !a.log().contains("raft timers changed") {
            assert!(
                Instant::now() < deadline,
                "{} never took the new timers",
                a.host
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let inspect: serde_json::Value =
        serde_json::from_str(&agents[2].ok(&["cluster", "inspect"])).unwrap();
    assert_eq!(inspect[0]["Spec"]["Raft"]["ElectionTimeoutMax"], "10s");

    // The leader dies: the others hear nobody, and elect only once the new lease has passed.
    let old_leader = (0..50)
        .find_map(|_| {
            leader(&agents[0]).or_else(|| {
                std::thread::sleep(Duration::from_millis(200));
                None
            })
        })
        .expect("a leader");
    let dead = agents.iter().position(|a| a.host == old_leader).unwrap();
    agents[dead].kill();
    let killed = Instant::now();
    let alive: Vec<&Agent> = agents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead)
        .map(|(_, a)| a)
        .collect();
    let new_leader = loop {
        if let Some(l) = alive
            .iter()
            .find_map(|a| leader(a))
            .filter(|l| *l != old_leader)
        {
            break l;
        }
        assert!(
            killed.elapsed() < LEASE + ELECT_WAIT,
            "no new leader {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = killed.elapsed();
    eprintln!("{new_leader} elected {took:?} after the kill");
    // The followers' last contact was a heartbeat (500 ms) before the kill, or a few seconds
    // on a machine loaded enough to stall the leader: the lease alone holds them back 5 s.
    assert!(
        took >= LEASE / 2,
        "{new_leader} was elected {took:?} after the leader died: the old 400 ms lease held"
    );
}
