//! Disaster recovery with real parts: `shoal agent` processes in test bed hosts, real
//! containers, Raft over mTLS, sled. A 3-manager cluster loses two managers for good
//! (SIGKILL, never restarted) and is rebuilt from the survivor with `cluster init
//! --force-new-cluster`; a backup taken on a follower is restored on a fresh host
//! (docs/design/backup.md).

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use shoal_tests::testbed::{Host, Signal, Testbed};

/// Every CLI call is bounded (a call to a manager without quorum waits for its timeouts).
const CALL_SECS: u32 = 60;
/// How long services may take to run again (tasks rescheduled off down nodes, containers
/// started on a loaded machine).
const CONVERGE: Duration = Duration::from_secs(180);
/// How long the managers may take to elect and answer after a fault.
const ELECT: Duration = Duration::from_secs(60);

fn up(n: usize) -> Testbed {
    match Testbed::up(n) {
        Ok(tb) => tb,
        Err(e) => panic!("testbed up {n}: {e}"),
    }
}

fn shoal(h: &Host, args: &[&str]) -> Result<String, String> {
    h.shoal_within(CALL_SECS, args)
}

fn ok(h: &Host, args: &[&str]) -> String {
    shoal(h, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts an agent in each of `hosts` with a busybox image (no DNS traffic off the hosts).
fn start(hosts: &[&Host]) {
    for h in hosts {
        h.import_busybox("busybox:latest").expect("import");
        h.spawn_agent(&["--dns-upstream", "none"]).expect("agent");
    }
}

/// Creates a replicated service of sleeping busybox tasks and waits until it converged.
fn service(via: &Host, name: &str, replicas: u32, extra: &[&str]) {
    let replicas = replicas.to_string();
    let mut args = vec![
        "service",
        "create",
        "-q",
        "--name",
        name,
        "--replicas",
        &replicas,
        "--stop-grace-period",
        "1s",
    ];
    args.extend_from_slice(extra);
    args.extend(["busybox:latest", "sleep", "100000"]);
    ok(via, &args);
}

/// The running tasks of `svc` (desired and observed) as task id → node id.
fn running(h: &Host, svc: &str) -> Option<BTreeMap<String, String>> {
    let out = shoal(h, &["service", "ps", "--format", "json", svc]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|t| t["Status"]["State"] == "running" && t["DesiredState"] == "running")
            .map(|t| {
                (
                    t["ID"].as_str().unwrap_or("").to_string(),
                    t["NodeID"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

/// Waits until each of `services` (name, replicas) has that many running tasks, on nodes
/// `on` holds (if given); returns their tasks.
fn converged(
    via: &Host,
    services: &[(&str, usize)],
    on: Option<&[&str]>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let mut all = BTreeMap::new();
        let mut done = true;
        for (svc, n) in services {
            let tasks = running(via, svc).unwrap_or_default();
            let placed =
                on.is_none_or(|ids| tasks.values().all(|node| ids.contains(&node.as_str())));
            done &= tasks.len() == *n && placed;
            all.insert(svc.to_string(), tasks);
        }
        if done {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "services never converged on {}: {all:?}",
            via.name()
        );
        sleep(Duration::from_secs(1));
    }
}

/// `node ls --format json` on `h`: hostname → (node id, state, manager status: "" for a
/// worker, "leader" or "reachable"/"unreachable").
fn nodes(h: &Host) -> Option<BTreeMap<String, (String, String, String)>> {
    let out = shoal(h, &["node", "ls", "--format", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    Some(
        v.as_array()?
            .iter()
            .map(|n| {
                let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
                let manager = if n["ManagerStatus"]["Leader"].as_bool() == Some(true) {
                    "leader".to_string()
                } else {
                    s(&n["ManagerStatus"]["Reachability"])
                };
                (
                    s(&n["Description"]["Hostname"]),
                    (
                        s(&n["ID"]),
                        s(&n["Status"]["State"]).to_lowercase(),
                        manager,
                    ),
                )
            })
            .collect(),
    )
}

/// Polls `node ls` on `h` until `f` holds.
fn nodes_until(
    h: &Host,
    what: &str,
    f: impl Fn(&BTreeMap<String, (String, String, String)>) -> bool,
) -> BTreeMap<String, (String, String, String)> {
    let deadline = Instant::now() + ELECT;
    let mut last = None;
    loop {
        if let Some(n) = nodes(h) {
            if f(&n) {
                return n;
            }
            last = Some(n);
        }
        assert!(Instant::now() < deadline, "{what}: last {last:?}");
        sleep(Duration::from_millis(500));
    }
}

/// Runs `args` in task container `task` on `h`; its stdout if it exited 0.
fn task_exec(h: &Host, task: &str, args: &[&str]) -> Option<String> {
    let root = h.data_dir().join("containers/.tasks");
    let mut argv = vec!["runtime", "--root", root.to_str().unwrap(), "exec", task];
    argv.extend_from_slice(args);
    let out = h.shoal(&argv).expect("runtime exec");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Three managers with services running; two of them SIGKILLed for good; the survivor is
/// rebuilt into a one-manager cluster (`--force-new-cluster`) whose services all run again;
/// two new managers join; the three take writes, and still do after the first one is killed
/// (so the new group has three voters).
#[test]
fn force_new_cluster_recovers_a_cluster_that_lost_two_of_three_managers() {
    let tb = up(5);
    let h: Vec<&Host> = (1..=5).map(|i| tb.host(i).expect("host")).collect();
    start(&h[..3]);
    ClusterBuilder::new()
        .managers(3)
        .wait_ready(ELECT)
        .form(&[h[0] as &dyn Member, h[1], h[2]])
        .expect("cluster");
    let services = [("web", 3), ("db", 2)];
    for (name, n) in services {
        service(h[0], name, n as u32, &[]);
    }
    converged(h[0], &services, None);
    let before = nodes(h[0]).expect("node ls");
    let id_of = |host: &Host| before[host.name()].0.clone();

    h[1].kill(Signal::Kill).expect("kill h2");
    h[2].kill(Signal::Kill).expect("kill h3");
    // Lost: no write goes through.
    assert!(
        h[0].shoal_within(20, &["service", "scale", "-d", "web=4"])
            .is_err(),
        "a write went through without a quorum"
    );

    let out = ok(h[0], &["cluster", "init", "--force-new-cluster"]);
    assert!(
        out.contains("rebuilt from this manager's state at raft index"),
        "{out}"
    );
    for lost in [h[1], h[2]] {
        assert!(out.contains(&id_of(lost)), "{out}");
    }
    // Every service is there and runs again, on the survivor alone.
    let ls = ok(h[0], &["service", "ls"]);
    for (name, _) in services {
        assert!(ls.contains(name), "{ls}");
    }
    let survivor = id_of(h[0]);
    converged(h[0], &services, Some(&[survivor.as_str()]));
    let n = nodes(h[0]).expect("node ls");
    assert_eq!(n[h[0].name()].2, "leader", "{n:?}");
    for lost in [h[1], h[2]] {
        assert_eq!(n[lost.name()].1, "down", "{n:?}");
        assert_eq!(n[lost.name()].2, "", "{lost:?} still a manager: {n:?}");
    }

    // Two new managers on new hosts.
    start(&h[3..]);
    for new in [h[3], h[4]] {
        ClusterBuilder::new()
            .join_attempts(3)
            .join(h[0], new, true, &|m| eprintln!("{m}"))
            .expect("join a new manager");
    }
    let joined = nodes_until(h[0], "three managers, all reachable", |n| {
        n[h[0].name()].2 == "leader"
            && [h[3], h[4]].iter().all(|x| {
                n.get(x.name())
                    .is_some_and(|r| r.2 == "reachable" && r.1 == "ready")
            })
    });
    // A write through a new manager (forwarded to the leader).
    service(h[3], "api", 2, &[]);
    converged(h[4], &[("api", 2), ("web", 3), ("db", 2)], None);

    // The old survivor goes too: the two new managers are a quorum of three.
    h[0].kill(Signal::Kill).expect("kill h1");
    let deadline = Instant::now() + ELECT;
    loop {
        if h[3]
            .shoal_within(20, &["service", "scale", "-d", "api=3"])
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new managers took no write after the first one was killed"
        );
        sleep(Duration::from_secs(1));
    }
    let alive: Vec<&str> = [h[3], h[4]]
        .iter()
        .map(|x| joined[x.name()].0.as_str())
        .collect();
    converged(h[4], &[("api", 3)], Some(&alive));
}

/// A backup taken on a follower holds the store at one applied index (what came after it is
/// not in it), the CA and the secrets key; restored on a fresh host it makes a one-manager
/// cluster whose services run there, with their secret.
#[test]
fn a_backup_from_a_follower_restores_on_a_fresh_host() {
    let tb = up(3);
    let (h1, h2, h3) = (
        tb.host(1).expect("h1"),
        tb.host(2).expect("h2"),
        tb.host(3).expect("h3"),
    );
    start(&[h1, h2]);
    ClusterBuilder::new()
        .managers(2)
        .wait_ready(ELECT)
        .form(&[h1 as &dyn Member, h2])
        .expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret\n").expect("write secret");
    ok(h1, &["secret", "create", "pw", secret.to_str().unwrap()]);
    ok(h1, &["config", "create", "conf", secret.to_str().unwrap()]);
    service(
        h1,
        "web",
        2,
        &["--secret", "pw", "--config", "source=conf,target=/conf"],
    );
    service(h1, "db", 1, &[]);
    converged(h1, &[("web", 2), ("db", 1)], None);

    let n = nodes(h1).expect("node ls");
    let follower = [h1, h2]
        .into_iter()
        .find(|h| n[h.name()].2 != "leader")
        .expect("a follower");
    let file = dir.path().join("cluster.shoal");
    let out = ok(follower, &["cluster", "backup", file.to_str().unwrap()]);
    assert!(out.contains("(a follower)"), "{out}");
    let index: u64 = out
        .split("raft index ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no raft index in {out}"));
    assert!(index > 0, "{out}");
    let mode = std::fs::metadata(&file).expect("backup file").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Made after the backup: not in it.
    service(h1, "later", 1, &[]);

    start(&[h3]);
    let t = Instant::now();
    let out = ok(h3, &["cluster", "restore", file.to_str().unwrap()]);
    eprintln!("restore took {:?}: {out}", t.elapsed());
    assert!(out.contains(&format!("raft index {index}")), "{out}");
    let ls = ok(h3, &["service", "ls"]);
    assert!(ls.contains("web") && ls.contains("db"), "{ls}");
    assert!(!ls.contains("later"), "{ls}");
    let n = nodes(h3).expect("node ls");
    assert_eq!(n[h3.name()].2, "leader", "{n:?}");
    for old in [h1, h2] {
        assert_eq!(n[old.name()].2, "", "{n:?}");
    }
    let me = n[h3.name()].0.clone();
    let tasks = converged(h3, &[("web", 2), ("db", 1)], Some(&[me.as_str()]));
    // The secret opens with the restored key: the task holds its plaintext.
    let web = tasks["web"].keys().next().expect("a web task").clone();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = task_exec(h3, &web, &["cat", "/run/secrets/pw"]);
        if got.as_deref() == Some("top secret\n") {
            break;
        }
        assert!(Instant::now() < deadline, "secret in {web}: {got:?}");
        sleep(Duration::from_secs(1));
    }
    assert_eq!(
        task_exec(h3, &web, &["cat", "/conf"]).as_deref(),
        Some("top secret\n")
    );
    // The restored cluster takes writes.
    service(h3, "new", 1, &[]);
    converged(h3, &[("new", 1)], None);
}
