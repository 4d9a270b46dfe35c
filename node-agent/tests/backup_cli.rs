//! `shoal cluster backup`, `cluster restore` and `cluster init --force-new-cluster` with real
//! `shoal agent` processes on 127.0.6.x (hollow: no containers; the test bed test
//! tests/tests/recovery.rs runs the same with containers): bad input is refused in one line
//! and changes nothing, and the managers of a group started over without them step down to
//! workers when they come back, instead of leading their old group again.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use support::{manager_statuses, Agent, AgentKind};

const KIND: AgentKind = AgentKind {
    net: "127.0.6",
    host_prefix: "bk",
    hollow: true,
    advertise: true,
};

/// How long the cluster may take to settle after a fault or a recovery.
const SETTLE: Duration = Duration::from_secs(40);

/// Every path under `dir`, relative, for before/after comparisons.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out
}

/// Asserts a failed command's stderr is one `shoal: ...` line holding `want`.
fn one_line(err: &str, want: &str) {
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("shoal: "), "{err:?}");
    assert!(lines[0].contains(want), "{err:?} lacks {want:?}");
}

/// Runs `f` until it holds, for [`SETTLE`] at most.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The Raft term `cluster inspect` shows on `a`, if it answers.
fn raft_term(a: &Agent) -> Option<u64> {
    let out = a.shoal(&["cluster", "inspect", "--format", "table"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("Raft term"))
        .and_then(|v| v.trim().parse().ok())
}

/// A one-manager cluster on `m` with a service and a backup of it written to `file`.
fn cluster_with_backup(m: &Agent, file: &Path) {
    ClusterBuilder::new()
        .form(&[&m.member() as &dyn Member])
        .expect("cluster");
    m.ok(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        "web",
        "--replicas",
        "2",
        "busybox:latest",
        "sleep",
        "1000",
    ]);
    let out = m.ok(&["cluster", "backup", file.to_str().unwrap()]);
    assert!(out.contains("as applied on manager"), "{out}");
}

#[test]
fn a_bad_backup_file_is_refused_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let m = Agent::start(root.path(), 1, KIND);
    let fresh = Agent::start(root.path(), 2, KIND);
    let good = root.path().join("good.shoal");
    cluster_with_backup(&m, &good);
    let bytes = std::fs::read(&good).unwrap();

    let bad = |name: &str, b: &[u8]| {
        let p = root.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let mut flipped = bytes.clone();
    flipped[100] ^= 0x40;
    let mut magic = bytes.clone();
    magic[..8].copy_from_slice(b"TARBALL!");
    let mut version = bytes.clone();
    version[11] = 9;
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            bad("truncated.shoal", &bytes[..bytes.len() - 40]),
            "the backup file is truncated",
        ),
        (bad("magic.shoal", &magic), "not a shoal backup file"),
        (
            bad("checksum.shoal", &flipped),
            "the backup file is corrupt: its checksum does not match its contents",
        ),
        (
            bad("version.shoal", &version),
            "backup format version 9 is not supported",
        ),
        (
            bad("foreign.txt", b"just some text, not a backup\n"),
            "not a shoal backup file",
        ),
        (bad("empty.shoal", b""), "not a shoal backup file"),
        (root.path().join("missing.shoal"), "No such file"),
    ];
    let data = fresh.dir.join("data");
    let before = tree(&data);
    for (path, want) in &cases {
        let out = fresh.shoal(&["cluster", "restore", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{path:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        one_line(&err, want);
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert_eq!(tree(&data), before, "{path:?} changed the data dir");
    }
    let info = fresh.ok(&["info"]);
    assert!(info.contains("inactive"), "{info}");

    // The node could restore all along: the good file works.
    let out = fresh.ok(&["cluster", "restore", good.to_str().unwrap()]);
    assert!(out.contains("is its only manager"), "{out}");
    let ls = fresh.ok(&["service", "ls"]);
    assert!(ls.contains("web"), "{ls}");
}

#[test]
fn restore_force_new_cluster_and_backup_refuse_the_wrong_node() {
    let root = tempfile::tempdir().unwrap();
    let m = Agent::start(root.path(), 3, KIND);
    let w = Agent::start(root.path(), 4, KIND);
    let idle = Agent::start(root.path(), 5, KIND);
    let good = root.path().join("good.shoal");
    cluster_with_backup(&m, &good);
    ClusterBuilder::new()
        .join(&m.member(), &w.member(), false, &|_| {})
        .expect("join worker");

    let node_json = |a: &Agent| std::fs::read(a.dir.join("data/node.json")).ok();
    let state = |a: &Agent| (node_json(a), tree(&a.dir.join("data/pki")));
    let ls_before = m.ok(&["node", "ls", "-q"]);
    let inspect_before = m.ok(&["cluster", "inspect"]);
    let (m0, w0, i0) = (state(&m), state(&w), tree(&idle.dir.join("data")));

    // Restore onto a node that has a cluster: a manager, a worker.
    for a in [&m, &w] {
        let err = a.fails(&["cluster", "restore", good.to_str().unwrap()]);
        one_line(&err, "this node is already part of a cluster");
    }
    // --force-new-cluster on nodes that are not managers.
    let err = idle.fails(&["cluster", "init", "--force-new-cluster"]);
    one_line(&err, "this node is not part of a cluster");
    let err = w.fails(&["cluster", "init", "--force-new-cluster"]);
    one_line(&err, "this node is a worker");
    // Backups are a manager's.
    let err = w.fails(&[
        "cluster",
        "backup",
        root.path().join("w.shoal").to_str().unwrap(),
    ]);
    one_line(&err, "this node is a worker");
    let err = idle.fails(&[
        "cluster",
        "backup",
        root.path().join("i.shoal").to_str().unwrap(),
    ]);
    one_line(&err, "not part of a cluster");
    // A backup into a directory that does not exist leaves nothing behind.
    let nowhere = root.path().join("no/such/dir/b.shoal");
    let err = m.fails(&["cluster", "backup", nowhere.to_str().unwrap()]);
    one_line(&err, "writing");
    assert!(!root.path().join("no").exists());
    assert!(!root.path().join("w.shoal").exists() && !root.path().join("i.shoal").exists());

    assert_eq!(state(&m), m0);
    assert_eq!(state(&w), w0);
    assert_eq!(tree(&idle.dir.join("data")), i0);
    assert_eq!(m.ok(&["node", "ls", "-q"]), ls_before);
    assert_eq!(m.ok(&["cluster", "inspect"]), inspect_before);
    let ls = m.ok(&["node", "ls"]);
    let statuses = manager_statuses(&ls);
    assert_eq!(
        statuses
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(h, s)| (h.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        vec![(m.host.as_str(), "Leader")],
        "{ls}"
    );
}

/// The managers of the old group, back after `--force-new-cluster` rebuilt the cluster
/// without them, find their group replaced (epoch), step down to workers of the new cluster
/// and never lead again; without the epoch check the two of them are a quorum of their old
/// group and would elect, and their leader's appends would depose the new one.
#[test]
fn old_managers_that_come_back_step_down_to_workers() {
    let root = tempfile::tempdir().unwrap();
    let m1 = Agent::start(root.path(), 6, KIND);
    let mut m2 = Agent::start(root.path(), 7, KIND);
    let mut m3 = Agent::start(root.path(), 8, KIND);
    let members = [m1.member(), m2.member(), m3.member()];
    let refs: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
    ClusterBuilder::new()
        .managers(3)
        .wait_ready(SETTLE)
        .form(&refs)
        .expect("cluster");
    m1.ok(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        "web",
        "--replicas",
        "3",
        "busybox:latest",
        "sleep",
        "1000",
    ]);
    m2.kill();
    m3.kill();
    let out = m1.ok(&["cluster", "init", "--force-new-cluster"]);
    assert!(out.contains("rebuilt from this manager's state"), "{out}");
    assert!(out.contains("now workers marked down"), "{out}");
    let term = raft_term(&m1).expect("m1's raft term");
    let log_from = m1.log().len();

    m2.spawn();
    m3.spawn();
    // Both back as workers of the new cluster; m1 the one manager, its leader throughout, at
    // the term the rebuild gave it (an old manager's request at a higher term would have made
    // it step down).
    let mut seen = Vec::new();
    until("the old managers Ready as workers", || {
        if let Some(t) = raft_term(&m1) {
            seen.push(t);
        }
        let out = m1.shoal(&["node", "ls"]);
        if !out.status.success() {
            return false;
        }
        let ls = String::from_utf8_lossy(&out.stdout).to_string();
        let rows = manager_statuses(&ls);
        m2.recorded_role() == "worker"
            && m3.recorded_role() == "worker"
            && rows.len() == 3
            && rows.iter().all(|(h, s)| {
                if *h == m1.host {
                    s == "Leader"
                } else {
                    s.is_empty()
                }
            })
            && ls.lines().filter(|l| l.contains(" Ready ")).count() == 3
    });
    assert!(
        seen.iter().all(|&t| t == term),
        "m1's term moved: {term} then {seen:?}"
    );
    let after = m1.log()[log_from..].to_string();
    for bad in ["no longer leading", "Panicked", "starting the agent afresh"] {
        assert!(!after.contains(bad), "m1 after the rebuild: {bad}: {after}");
    }
    for a in [&m2, &m3] {
        assert!(
            a.log()
                .contains("raft group was started over without this manager")
                || a.log().contains("this node was demoted"),
            "{}",
            a.log()
        );
        let info = a.ok(&["info"]);
        assert!(info.contains("worker"), "{info}");
    }
    // The new cluster takes writes and kept its service.
    m1.ok(&["service", "scale", "-d", "web=4"]);
    let ls = m1.ok(&["service", "ls"]);
    assert!(ls.contains("web"), "{ls}");
}

/// Backup and restore of a store of many services (hollow nodes), timed: run by hand with
/// `--ignored` (`SHOAL_BACKUP_SERVICES`, default 1,000), it prints what it measured.
#[test]
#[ignore]
fn measure_backup_and_restore() {
    let n: usize = std::env::var("SHOAL_BACKUP_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let root = tempfile::tempdir().unwrap();
    let m = Agent::start(root.path(), 9, KIND);
    let fresh = Agent::start(root.path(), 10, KIND);
    ClusterBuilder::new()
        .form(&[&m.member() as &dyn Member])
        .expect("cluster");
    let t = Instant::now();
    for i in 0..n {
        let name = format!("s{i}");
        let label = format!("purpose=measure-{i}");
        m.ok(&[
            "service",
            "create",
            "-d",
            "-q",
            "--no-resolve-image",
            "--name",
            &name,
            "--label",
            &label,
            "busybox:latest",
            "sleep",
            "1000",
        ]);
    }
    eprintln!("created {n} services in {:?}", t.elapsed());
    let backup = root.path().join("b.shoal");
    let t = Instant::now();
    let out = m.ok(&["cluster", "backup", backup.to_str().unwrap()]);
    let took = t.elapsed();
    let size = std::fs::metadata(&backup).unwrap().len();
    eprintln!("backup: {took:?}, {size} bytes: {out}");
    let t = Instant::now();
    let out = fresh.ok(&["cluster", "restore", backup.to_str().unwrap()]);
    eprintln!("restore: {:?}: {out}", t.elapsed());
    let ls = fresh.ok(&["service", "ls", "-q"]);
    assert_eq!(ls.lines().count(), n);
}
