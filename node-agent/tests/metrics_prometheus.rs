//! `shoal agent --metrics-addr`: the agents of a real cluster (two managers, a worker) running
//! a real service, scraped by a real Prometheus (Debian's) on loopback, checked through
//! Prometheus's query API; and the agent's refusal of a bad or taken address.

use crate::services;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use services::*;
use shoal_tests::cluster::free_port;
use shoal_tests::prometheus::{http_get, Prometheus};

const REPLICAS: usize = 4;
/// Prometheus's scrape interval.
const SCRAPE: Duration = Duration::from_millis(500);
/// How long the series may take to show what the cluster does.
const SETTLE: Duration = Duration::from_secs(60);

/// The `--metrics-addr` node `n` was started with.
fn metrics_addr(n: &Node) -> String {
    let i = n.args.iter().position(|a| a == "--metrics-addr").unwrap();
    n.args[i + 1].clone()
}

/// The value of a query that yields one sample (`None`: no sample yet).
fn scalar(p: &Prometheus, expr: &str) -> Option<f64> {
    match p.query(expr).unwrap().as_slice() {
        [one] => Some(one.value),
        _ => None,
    }
}

#[test]
fn a_cluster_scraped_by_prometheus_shows_its_raft_tasks_and_containers() {
    // Each agent serves its metrics on its own loopback address.
    let c = Cluster::with_node_args(3, 2, &|n: &Node| {
        let ip = n.addr.split(':').next().unwrap();
        vec![
            "--metrics-addr".into(),
            format!("{ip}:{}", free_port(ip).unwrap()),
        ]
    });
    let replicas = REPLICAS.to_string();
    c.nodes[0].ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        &replicas,
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    c.until("every replica running", || {
        c.running("web").len() == REPLICAS
    });
    c.assert_real("web");
    let targets: Vec<String> = c.nodes.iter().map(metrics_addr).collect();
    let (managers, worker) = (&targets[..2], &targets[2]);

    // The endpoint itself: only /metrics; a worker has no manager series.
    let (status, _) = http_get(worker, "/").unwrap();
    assert_eq!(status, 404);
    let (status, _) = http_get(worker, "/metrics/raft").unwrap();
    assert_eq!(status, 404);
    let (status, text) = http_get(worker, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE shoal_worker_tasks gauge"), "{text}");
    assert!(
        !text.contains("shoal_raft_"),
        "a worker has no raft: {text}"
    );
    let (_, text) = http_get(&managers[0], "/metrics").unwrap();
    assert!(text.contains("# TYPE shoal_raft_term gauge"), "{text}");

    let prom = Prometheus::start(&targets, SCRAPE).unwrap();
    let (pid, dir) = (prom.pid(), prom.dir().to_path_buf());
    let n = |x: usize| x as f64;
    // (PromQL, what it must come to)
    let checks: Vec<(&str, f64)> = vec![
        ("count(up == 1)", n(3)),
        // Only the managers have Raft series, each in a term.
        ("count(shoal_raft_term >= 1)", n(2)),
        ("count(shoal_raft_term)", n(2)),
        ("sum(shoal_raft_is_leader)", n(1)),
        ("min(shoal_raft_has_leader)", n(1)),
        ("count(shoal_raft_applied_index > 0)", n(2)),
        ("max(shoal_store_objects{kind=\"node\"})", n(3)),
        ("max(shoal_store_objects{kind=\"service\"})", n(1)),
        ("sum(shoal_dispatcher_sessions)", n(3)),
        ("sum(shoal_worker_tasks{state=\"running\"})", n(REPLICAS)),
        (
            "sum(shoal_worker_container_starts_total{result=\"ok\"}) >= bool 4",
            1.0,
        ),
        (
            "count(shoal_container_memory_usage_bytes{service=\"web\"} > 0)",
            n(REPLICAS),
        ),
        (
            "count(shoal_container_pids{service=\"web\"} >= 1)",
            n(REPLICAS),
        ),
        (
            "count(shoal_container_cpu_usage_seconds_total{service=\"web\"})",
            n(REPLICAS),
        ),
        ("count(process_resident_memory_bytes > 1e6)", n(3)),
        (
            "max(shoal_raft_proposal_duration_seconds_count) > bool 0",
            1.0,
        ),
        ("sum(shoal_scheduler_decisions_total) >= bool 4", 1.0),
    ];
    let deadline = Instant::now() + SETTLE;
    loop {
        let got: Vec<(&str, Option<f64>, f64)> = checks
            .iter()
            .map(|(q, want)| (*q, scalar(&prom, q), *want))
            .collect();
        let wrong: Vec<_> = got.iter().filter(|(_, v, w)| *v != Some(*w)).collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {SETTLE:?}, these queries are off (query, got, want): {wrong:#?}\n\
             prometheus log: {}",
            prom.log()
        );
        std::thread::sleep(SCRAPE);
    }
    // Each manager's series come from that manager.
    let mut terms: Vec<String> = prom
        .query("shoal_raft_term")
        .unwrap()
        .into_iter()
        .map(|s| s.labels["instance"].clone())
        .collect();
    terms.sort();
    let mut want = managers.to_vec();
    want.sort();
    assert_eq!(terms, want);
    // The guard kills Prometheus by pid and removes its dir.
    drop(prom);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
}

/// Runs `shoal agent` with `--metrics-addr addr` in a fresh dir; it must exit by itself.
fn agent_with_metrics_addr(addr: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1").unwrap());
    let mut child = Command::new(SHOAL)
        .args(["agent", "--listen-addr", &listen, "--metrics-addr", addr])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(dir.path().join("shoal.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shoal agent --metrics-addr {addr} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), dir)
}

#[test]
fn a_bad_or_taken_metrics_address_stops_the_agent_before_anything_starts() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let (out, dir) = agent_with_metrics_addr(&taken);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [format!(
            "shoal: --metrics-addr {taken}: cannot listen: Address already in use (os error 98)"
        )],
    );
    // Nothing was started: no data dir, no socket.
    assert!(!dir.path().join("data").exists());
    assert!(!dir.path().join("shoal.sock").exists());

    for bad in ["nope", "127.0.0.1", "127.0.0.1:99999"] {
        let (out, dir) = agent_with_metrics_addr(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.lines().next().unwrap_or("").starts_with(&format!(
                "shoal: invalid value '{bad}' for '--metrics-addr <ADDR>'"
            )),
            "{bad}: {err}"
        );
        assert!(!dir.path().join("data").exists());
    }
}
