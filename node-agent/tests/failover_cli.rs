//! Finding 11 of CHAOS.md as a regression test: `shoal agent` processes (3 managers, 2 hollow
//! workers) whose managers are SIGKILLed and restarted — the leader, then a follower — round
//! after round. After each fault every agent must hold a dispatcher session with the leader
//! again (its log says so: a manager's own node shows Ready by Raft reachability alone), every
//! node must be Ready in the store, and no worker may have been marked DOWN: a worker reaches a
//! new leader within the dispatcher's grace (3 heartbeats of 1 s, the default). Before the fix
//! a worker backed off up to 5 s per attempt (0.6–8 s to reconnect in chaos runs) and this test
//! failed once in two runs; the heartbeat period is set explicitly so the grace stays 3 s.

use crate::support;

use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use support::{Agent, AgentKind};

const KIND: AgentKind = AgentKind {
    net: "127.0.2",
    host_prefix: "fo",
    hollow: true,
    advertise: false,
};

/// Fault rounds (each: the leader killed and restarted, then a follower).
const ROUNDS: usize = 3;
/// How long the cluster may take to be whole again after a fault.
const WELL_WAIT: Duration = Duration::from_secs(40);

/// One row of `node ls --format json`.
#[derive(Debug, Clone)]
struct NodeRow {
    id: String,
    host: String,
    state: String,
    leader: bool,
}

fn nodes(on: &Agent) -> Option<Vec<NodeRow>> {
    let out = on.shoal(&["node", "ls", "--format", "json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .map(|n| NodeRow {
                id: n["ID"].as_str().unwrap_or("").to_string(),
                host: n["Description"]["Hostname"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                state: n["Status"]["State"].as_str().unwrap_or("").to_string(),
                leader: n["ManagerStatus"]["Leader"].as_bool().unwrap_or(false),
            })
            .collect(),
    )
}

/// Polls the running managers until `f` holds for what one of them answers.
fn until(managers: &[&Agent], what: &str, mut f: impl FnMut(&[NodeRow]) -> bool) -> Vec<NodeRow> {
    let deadline = Instant::now() + WELL_WAIT;
    let mut last = None;
    loop {
        for m in managers {
            if let Some(rows) = nodes(m) {
                if f(&rows) {
                    return rows;
                }
                last = Some(rows);
            }
        }
        assert!(Instant::now() < deadline, "{what}: last seen {last:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Lines of the agent's log that say a dispatcher session started.
fn sessions(a: &Agent) -> usize {
    a.log().matches("session started").count()
}

/// Waits until `a`'s log has more than `before` session starts, the last one with `leader`.
fn wait_session(a: &Agent, before: usize, leader: &str) {
    let deadline = Instant::now() + WELL_WAIT;
    loop {
        let log = a.log();
        let started: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("session started"))
            .collect();
        if started.len() > before
            && started
                .last()
                .is_some_and(|l| l.contains(&format!("addr={leader}")))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never opened a session with the leader {leader}: {}",
            a.host,
            log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The position of host `fo<n>` among the agents.
fn index(host: &str) -> usize {
    host.trim_start_matches(KIND.host_prefix)
        .parse::<usize>()
        .unwrap()
        - 1
}

fn leader_host(rows: &[NodeRow]) -> Option<String> {
    rows.iter().find(|r| r.leader).map(|r| r.host.clone())
}

/// The manager agents (the first three).
fn mgrs(agents: &[Agent]) -> Vec<&Agent> {
    agents[..3].iter().collect()
}

#[test]
fn every_node_is_back_after_managers_are_killed_and_restarted() {
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = (1..=5)
        .map(|n| Agent::start(root.path(), n, KIND))
        .collect();
    let members: Vec<_> = agents.iter().map(Agent::member).collect();
    let members: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
    ClusterBuilder::new()
        .managers(3)
        .heartbeat("1s", 3)
        .form(&members)
        .unwrap();
    let all_ready = |rows: &[NodeRow]| {
        rows.len() == 5 && rows.iter().all(|r| r.state == "ready") && leader_host(rows).is_some()
    };
    let rows = until(&[&agents[0]], "every node Ready", all_ready);
    let worker_ids: Vec<String> = rows
        .iter()
        .filter(|r| r.host == "fo4" || r.host == "fo5")
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(worker_ids.len(), 2, "{rows:?}");

    for round in 0..ROUNDS {
        // The leader dies; a new one is elected and every survivor's agent finds it.
        let old = leader_host(&until(&mgrs(&agents), "a leader", |r| {
            leader_host(r).is_some()
        }))
        .unwrap();
        let dead = index(&old);
        let before: Vec<usize> = agents.iter().map(sessions).collect();
        agents[dead].kill();
        let alive: Vec<&Agent> = agents[..3].iter().filter(|a| a.host != old).collect();
        let rows = until(&alive, "a new leader", |r| {
            leader_host(r).is_some_and(|l| l != old)
        });
        let new = agents[index(&leader_host(&rows).unwrap())].addr.clone();
        for (i, a) in agents.iter().enumerate() {
            if i != dead {
                wait_session(a, before[i], &new);
            }
        }
        // It comes back, and its own agent opens a session with the new leader.
        let before = sessions(&agents[dead]);
        agents[dead].spawn();
        wait_session(&agents[dead], before, &new);
        until(
            &mgrs(&agents),
            &format!("round {round}: every node Ready after the leader's restart"),
            all_ready,
        );

        // A follower dies and comes back (finding 11): its agent must reach the leader again.
        let leader = leader_host(&until(&mgrs(&agents), "a leader", |r| {
            leader_host(r).is_some()
        }))
        .unwrap();
        let follower = (0..3).find(|&i| agents[i].host != leader).unwrap();
        let fhost = agents[follower].host.clone();
        let before = sessions(&agents[follower]);
        agents[follower].kill();
        let alive: Vec<&Agent> = agents[..3].iter().filter(|a| a.host != fhost).collect();
        until(&alive, "the follower seen down", |r| {
            r.iter().any(|n| n.host == fhost && n.state != "ready")
        });
        agents[follower].spawn();
        let leader = leader_host(&until(
            &mgrs(&agents),
            "a leader after the follower's restart",
            |r| leader_host(r).is_some(),
        ))
        .unwrap();
        wait_session(
            &agents[follower],
            before,
            &agents[index(&leader)].addr.clone(),
        );
        until(
            &mgrs(&agents),
            &format!("round {round}: every node Ready after the follower's restart"),
            all_ready,
        );
    }

    // No worker was marked DOWN: each reached every new leader within its 3 s grace.
    let managers_log: String = agents[..3].iter().map(Agent::log).collect();
    for id in &worker_ids {
        let marked = managers_log
            .lines()
            .filter(|l| l.contains("marking it down") && l.contains(id.as_str()))
            .collect::<Vec<_>>();
        assert!(
            marked.is_empty(),
            "worker {id} was marked down during the failovers: {marked:?}"
        );
    }
    for a in &mut agents {
        a.kill();
    }
}
