//! The hollow-node path end to end, small: 3 real `shoal agent` managers (drained), 50 hollow
//! nodes in 2 `shoal-bench hollow-nodes` processes (each node its own key, certificate and
//! dispatcher session), a service of 2,000 replicas, until all run. Keeps `shoal-bench scale`
//! working; the full-size run is by hand (BENCHMARKS.md).

use std::path::PathBuf;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_shoal-bench");

/// The `shoal` binary the workspace build put beside this package's binary.
fn shoal() -> PathBuf {
    let p = PathBuf::from(BENCH).with_file_name("shoal");
    assert!(
        p.exists(),
        "{} not built: run the workspace's tests (cargo nextest run --workspace) or build -p shoal",
        p.display()
    );
    p
}

#[test]
fn scale_smoke_50_hollow_nodes_2000_replicas() {
    let work = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(BENCH)
        .args([
            "scale",
            "--nodes",
            "50",
            "--replicas",
            "2000",
            "--hosts-procs",
            "2",
            // Fail with what it reached, well before the test runner's own timeout.
            "--deadline",
            "100",
        ])
        .arg("--shoal")
        .arg(shoal())
        .arg("--workdir")
        .arg(work.path())
        .output()
        .expect("running shoal-bench scale");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // Keep the managers' and hosts' logs for the post-mortem.
        let kept = work.keep();
        panic!(
            "scale failed (logs kept in {}):\n{stdout}\n{stderr}",
            kept.display()
        );
    }
    assert!(
        stdout.contains("join: all 50 Ready") && stdout.contains("all 2000 RUNNING"),
        "unexpected report:\n{stdout}"
    );
    let json = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("the JSON summary line");
    let v: serde_json::Value = serde_json::from_str(json).expect("JSON summary");
    assert_eq!(v["nodes"], 50);
    assert_eq!(v["replicas"], 2000);
    assert!(v["running_s"].as_f64().is_some_and(|s| s > 0.0));
    // Its directory is removed and no process it started (all name it in their arguments)
    // is left.
    let left: Vec<_> = std::fs::read_dir(work.path())
        .expect("reading the work directory")
        .flatten()
        .collect();
    assert!(left.is_empty(), "the run left {left:?} behind");
    let needle = work.path().to_string_lossy().into_owned();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .expect("reading /proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(
        survivors.is_empty(),
        "processes left running: {survivors:?}"
    );
}
