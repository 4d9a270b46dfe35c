//! Hollow agents (sim executor) end to end against the real dispatcher over mTLS.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use shoal_manager::ca::Role;
use shoal_manager::dispatcher::Leadership;
use shoal_manager::store::{Kind, Mutation, Object};
use shoal_proto::v1 as pb;
use shoal_proto::v1::TaskState;
use shoal_worker::{Agent, AgentConfig, SimExecutor};
use support::*;

fn config(
    c: &Cluster,
    node: &str,
    managers: Vec<String>,
    sim: Arc<SimExecutor>,
    data: Option<&std::path::Path>,
) -> AgentConfig {
    AgentConfig {
        tls: node_tls(&c.ca, node, Role::Worker),
        managers,
        data_dir: data.map(|d| d.to_path_buf()),
        description: pb::NodeDescription {
            hostname: format!("host-{node}"),
            resources: Some(shoal_worker::host_resources()),
            hollow: true,
            ..Default::default()
        },
        executor: sim,
        on_desired_role: None,
    }
}

#[tokio::test]
async fn hollow_agents_run_stop_fail_and_forget_tasks() {
    let c = Cluster::start(200, &["w1", "w2"]).await;
    let (s1, s2) = (Arc::new(SimExecutor::new()), Arc::new(SimExecutor::new()));
    let a1 = Agent::start(config(
        &c,
        "w1",
        vec![c.leader.addr.clone()],
        s1.clone(),
        None,
    ))
    .await
    .unwrap();
    let a2 = Agent::start(config(
        &c,
        "w2",
        vec![c.leader.addr.clone()],
        s2.clone(),
        None,
    ))
    .await
    .unwrap();
    let mut m = vec![];
    for i in 0..3 {
        m.push(Mutation::Create(Object::Task(task(
            &format!("a{i}"),
            "w1",
            "img",
            &[],
        ))));
    }
    for i in 0..2 {
        m.push(Mutation::Create(Object::Task(task(
            &format!("b{i}"),
            "w2",
            "img",
            &[],
        ))));
    }
    c.backend.write(m);
    for id in ["a0", "a1", "a2", "b0", "b1"] {
        c.wait_task(id, TaskState::Running, 5).await;
    }
    let n = c.backend.store.get_node("w1").unwrap().unwrap();
    assert_eq!(n.status.unwrap().state, pb::NodeState::Ready as i32);
    let d = n.description.unwrap();
    assert!(d.hollow);
    assert_eq!(d.hostname, "host-w1");
    assert!(d.resources.unwrap().nano_cpus >= 1_000_000_000);

    // Desired shutdown stops it.
    c.backend
        .update_task("a0", |t| t.desired_state = TaskState::Shutdown as i32);
    c.wait_task("a0", TaskState::Shutdown, 5).await;
    // A process failing is reported with its exit code.
    assert!(s1.exit("a1", 3));
    let s = c.wait_task("a1", TaskState::Failed, 5).await;
    assert_eq!(s.exit_code, 3);
    // A deleted task is stopped and forgotten by its agent.
    c.backend.write(vec![Mutation::Delete {
        kind: Kind::Task,
        id: "b0".into(),
        expect_version: None,
    }]);
    eventually("b0 forgotten", 5, || !a2.statuses().contains_key("b0")).await;
    assert!(a2.statuses().contains_key("b1"));
    a1.shutdown().await;
    a2.shutdown().await;
}

#[tokio::test]
async fn an_agent_pointed_at_a_follower_is_redirected_to_the_leader() {
    let c = Cluster::start(200, &["w1"]).await;
    let mut follower_backend = c.backend.clone();
    follower_backend.leadership = Arc::new(std::sync::Mutex::new(Leadership::Follower {
        leader_addr: Some(c.leader.addr.clone()),
    }));
    let follower = serve(&c.ca, "manager-1", follower_backend).await;
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t1",
        "w1",
        "img",
        &[],
    )))]);
    let a = Agent::start(config(
        &c,
        "w1",
        vec![follower.addr.clone()],
        Arc::new(SimExecutor::new()),
        None,
    ))
    .await
    .unwrap();
    c.wait_task("t1", TaskState::Running, 5).await;
    assert_eq!(
        c.leader.dispatcher.connected_nodes(),
        vec!["w1".to_string()]
    );
    assert!(follower.dispatcher.connected_nodes().is_empty());
    a.shutdown().await;
}

#[tokio::test]
async fn a_stopped_agent_goes_down_and_a_restarted_one_reports_what_happened_meanwhile() {
    let c = Cluster::start(100, &["w1"]).await;
    let data = tempfile::tempdir().unwrap();
    let sim = Arc::new(SimExecutor::new());
    let managers = vec![c.leader.addr.clone()];
    let a = Agent::start(config(
        &c,
        "w1",
        managers.clone(),
        sim.clone(),
        Some(data.path()),
    ))
    .await
    .unwrap();
    c.backend.write(vec![
        Mutation::Create(Object::Task(task("t1", "w1", "img", &[]))),
        Mutation::Create(Object::Task(task("t2", "w1", "img", &[]))),
    ]);
    c.wait_task("t1", TaskState::Running, 5).await;
    c.wait_task("t2", TaskState::Running, 5).await;
    a.shutdown().await;

    // Silent for 3 heartbeat periods: down.
    eventually("node down", 5, || {
        c.node_state("w1") == pb::NodeState::Down as i32
    })
    .await;
    // t2's process exits while no agent watches it.
    assert!(sim.exit("t2", 4));

    let a = Agent::start(config(&c, "w1", managers, sim.clone(), Some(data.path())))
        .await
        .unwrap();
    eventually("node ready", 5, || {
        c.node_state("w1") == pb::NodeState::Ready as i32
    })
    .await;
    let s = c.wait_task("t2", TaskState::Failed, 5).await;
    assert_eq!(s.exit_code, 4, "its real exit code");
    // t1 was adopted, not restarted: still running, same state in the store.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.task_status("t1").state, TaskState::Running as i32);
    assert_eq!(
        a.statuses().get("t1").map(|s| s.state),
        Some(TaskState::Running as i32)
    );
    a.shutdown().await;
}

#[tokio::test]
async fn stored_tasks_without_a_container_wait_for_the_full_set() {
    let c = Cluster::start(200, &["w1"]).await;
    let data = tempfile::tempdir().unwrap();
    {
        let db = shoal_worker::db::TaskDb::open(data.path()).unwrap();
        for id in ["ghost", "t1"] {
            let mut t = task(id, "w1", "img", &[]);
            t.status.as_mut().unwrap().state = TaskState::Accepted as i32;
            db.put(&t).unwrap();
        }
        db.flush().unwrap();
    }
    // Only t1 is still assigned; "ghost" was removed while the agent was down.
    c.backend.write(vec![Mutation::Create(Object::Task(task(
        "t1",
        "w1",
        "img",
        &[],
    )))]);
    let sim = Arc::new(SimExecutor::new());
    let a = Agent::start(config(
        &c,
        "w1",
        vec![c.leader.addr.clone()],
        sim,
        Some(data.path()),
    ))
    .await
    .unwrap();
    c.wait_task("t1", TaskState::Running, 5).await;
    eventually("ghost forgotten", 5, || !a.statuses().contains_key("ghost")).await;
    a.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let db = shoal_worker::db::TaskDb::open(data.path()).unwrap();
    let ids: Vec<String> = db
        .list()
        .unwrap()
        .into_iter()
        .map(|t| t.meta.unwrap().id)
        .collect();
    assert_eq!(ids, vec!["t1".to_string()]);
}
