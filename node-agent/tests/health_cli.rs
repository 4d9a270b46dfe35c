//! Health checks end to end: `shoal agent` processes running real busybox containers, the
//! checks exec'd into them by the worker, driven through the CLI as a user would (service
//! create/update/ps/inspect).

use crate::services;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use services::*;
use sha2::Digest;

/// How long a test waits for health to play out (checks every 300 ms, a stop, a restart).
const HEALTH_WAIT: Duration = Duration::from_secs(40);

fn wait_for(what: &str, c: &Cluster, service: &str, mut f: impl FnMut(&[Value]) -> bool) {
    let deadline = Instant::now() + HEALTH_WAIT;
    loop {
        let tasks = c.tasks_json(service);
        if f(&tasks) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; tasks of {service}: {tasks:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn state(t: &Value) -> &str {
    t["Status"]["State"].as_str().unwrap_or("")
}

fn health(t: &Value) -> &str {
    t["Status"]["Health"]["Status"].as_str().unwrap_or("")
}

fn unhealthy_failure(t: &Value) -> bool {
    state(t) == "failed"
        && t["Status"]["Err"]
            .as_str()
            .is_some_and(|e| e.ends_with("unhealthy container"))
}

fn live(tasks: &[Value]) -> Vec<&Value> {
    tasks
        .iter()
        .filter(|t| t["DesiredState"] == "running")
        .collect()
}

/// `shoal …` that must fail: its stderr, which must be one line.
fn one_line_failure(n: &Node, args: &[&str]) -> String {
    let out = n.shoal(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("shoal: "), "{args:?}: {err}");
    err
}

/// A `docker save` archive of busybox as `hc:latest`, its config carrying a HEALTHCHECK
/// (`test`, interval in ms, retries) and `sleep 3600` as its command.
fn healthcheck_image(dir: &Path, test: &[&str], interval_ms: i64, retries: i64) -> PathBuf {
    let layer = dir.join("layer.tar");
    busybox_tar(&layer);
    let bytes = std::fs::read(&layer).unwrap();
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    let config = json!({
        "architecture": shoal_tests::registry::oci_arch(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {
            "Cmd": ["sleep", "3600"],
            "Healthcheck": {"Test": test, "Interval": interval_ms * 1_000_000, "Retries": retries},
        },
    });
    let manifest =
        json!([{"Config": "config.json", "RepoTags": ["hc:latest"], "Layers": ["layer.tar"]}]);
    let archive = dir.join("hc.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    for (name, data) in [
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("layer.tar", bytes),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.finish().unwrap();
    archive
}

/// Every process on the host whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(marker) {
            out.push((pid, cmd));
        }
    }
    out
}

#[test]
fn an_unhealthy_task_is_stopped_failed_and_replaced() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "sick",
        "--stop-grace-period",
        "1s",
        "--restart-delay",
        "100ms",
        "--health-cmd",
        "echo not well; exit 3",
        "--health-interval",
        "300ms",
        "--health-retries",
        "2",
        IMAGE,
        "sleep",
        "3600",
    ]);
    wait_for("an unhealthy task and its replacement", &c, "sick", |ts| {
        ts.iter().any(unhealthy_failure) && live(ts).iter().any(|t| state(t) == "running")
    });
    let tasks = c.tasks_json("sick");
    let failed = tasks.iter().find(|t| unhealthy_failure(t)).unwrap();
    let err = failed["Status"]["Err"].as_str().unwrap();
    // Docker's words: "task: non-zero exit (137): unhealthy container" (sleep as pid 1
    // ignores SIGTERM, so the stop ends with SIGKILL after the grace period).
    assert!(err.starts_with("task: non-zero exit (1"), "{err}");
    assert_eq!(health(failed), "unhealthy", "{failed:#}");
    assert_eq!(failed["Status"]["Health"]["FailingStreak"], 2, "{failed:#}");
    assert_eq!(
        failed["Status"]["Health"]["Output"]
            .as_str()
            .unwrap()
            .trim(),
        "not well"
    );
    assert_eq!(failed["DesiredState"], "shutdown", "{failed:#}");
    // The replacement is a new task of the same slot; the failed one's container is gone.
    let replacement = live(&tasks)
        .into_iter()
        .find(|t| state(t) == "running")
        .unwrap();
    assert_ne!(replacement["ID"], failed["ID"]);
    assert_eq!(replacement["Slot"], failed["Slot"]);
    assert!(m.container_pid(failed["ID"].as_str().unwrap()).is_none());
    let ps = m.ok(&["service", "ps", "--no-trunc", "sick"]);
    assert!(ps.contains("unhealthy container"), "{ps}");
}

#[test]
fn a_passing_check_makes_the_task_healthy_and_shows_it() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    // Without --detach: create returns once the task is healthy (docker: RUNNING after the
    // first passing check).
    m.ok(&[
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "fine",
        "--health-cmd",
        "test -e /etc/passwd",
        "--health-interval",
        "300ms",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let tasks = c.tasks_json("fine");
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(health(&tasks[0]), "healthy", "{tasks:#?}");
    assert_eq!(tasks[0]["Status"]["Health"]["FailingStreak"], 0);
    let ps = m.ok(&["service", "ps", "fine"]);
    assert!(ps.contains("Running (healthy) "), "{ps}");
    let spec = c.inspect("fine");
    let hc = &spec["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"];
    assert_eq!(
        hc["Test"],
        json!(["CMD-SHELL", "test -e /etc/passwd"]),
        "{spec:#}"
    );
    assert_eq!(hc["Interval"], "300ms");
    let pretty = m.ok(&["service", "inspect", "--pretty", "fine"]);
    assert!(pretty.contains("CMD-SHELL test -e /etc/passwd"), "{pretty}");
    // It stays so: checks keep passing, nothing is replaced, and the ten or so checks meanwhile
    // leave no descriptor open in the agent (each opens a child's pipes).
    let agent = m.child.as_ref().unwrap().id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();
    std::thread::sleep(Duration::from_secs(3));
    let after = fds();
    assert!(
        after < before + 8,
        "the agent's descriptors grew from {before} to {after} over ten checks"
    );
    let tasks = c.tasks_json("fine");
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(health(&tasks[0]), "healthy");
    c.assert_real("fine");

    // A task whose first check is still to come is starting.
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "later",
        "--health-cmd",
        "true",
        "--health-interval",
        "1m",
        IMAGE,
        "sleep",
        "3600",
    ]);
    wait_for("a running task", &c, "later", |ts| {
        ts.iter().any(|t| state(t) == "running")
    });
    assert_eq!(health(&c.tasks_json("later")[0]), "starting");
    let ps = m.ok(&["service", "ps", "later"]);
    assert!(ps.contains("Running (health: starting) "), "{ps}");
}

#[test]
fn a_check_that_never_returns_is_killed_at_its_timeout_and_leaves_nothing() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let marker = format!("hc-stuck-{}", std::process::id());
    let cmd = format!("sleep 1000; echo {marker}");
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "stuck",
        "--restart-condition",
        "none",
        "--stop-grace-period",
        "1s",
        "--health-cmd",
        &cmd,
        "--health-interval",
        "2s",
        "--health-timeout",
        "1s",
        "--health-retries",
        "3",
        IMAGE,
        "sleep",
        "3600",
    ]);
    wait_for("a running task", &c, "stuck", |ts| {
        ts.iter().any(|t| state(t) == "running")
    });
    let id = c.tasks_json("stuck")[0]["ID"].as_str().unwrap().to_string();
    // The container's processes: the init alone, then a check (its exec helper, sh, sleep),
    // killed at its 1 s timeout: the init alone again.
    let pids = || -> Option<usize> {
        let out = m.runtime(&["ps", "--format", "json", &id]);
        out.status.success().then(|| {
            serde_json::from_slice::<Vec<i32>>(&out.stdout)
                .unwrap()
                .len()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut busy_since: Option<Instant> = None;
    let longest = loop {
        assert!(Instant::now() < deadline, "no check came and went");
        match (pids(), busy_since) {
            (Some(n), None) if n > 1 => busy_since = Some(Instant::now()),
            (Some(1), Some(t)) => break t.elapsed(),
            (None, _) => panic!("the container went away before a check ended"),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        longest < Duration::from_secs(4),
        "a check with a 1 s timeout ran {longest:?}"
    );
    wait_for("the task failed as unhealthy", &c, "stuck", |ts| {
        ts.iter().any(unhealthy_failure)
    });
    let t = c.tasks_json("stuck").remove(0);
    assert_eq!(health(&t), "unhealthy");
    assert_eq!(
        t["Status"]["Health"]["Output"], "Health check exceeded timeout (1s)",
        "{t:#}"
    );
    assert_eq!(t["Status"]["Health"]["FailingStreak"], 3);
    // Nothing of any check is left on the host.
    let left = processes_with(&marker);
    assert!(left.is_empty(), "stray check processes: {left:?}");
}

#[test]
fn an_update_whose_tasks_never_get_healthy_pauses_or_rolls_back() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    for (name, action) in [("paused", "pause"), ("back", "rollback")] {
        m.ok(&[
            "service",
            "create",
            "--no-resolve-image",
            "--name",
            name,
            "--replicas",
            "3",
            "--stop-grace-period",
            "1s",
            "--restart-delay",
            "30s",
            "--update-monitor",
            "10s",
            "--update-failure-action",
            action,
            IMAGE,
            "sleep",
            "3600",
        ]);
    }
    let bad = [
        "--health-cmd",
        "exit 1",
        "--health-interval",
        "300ms",
        "--health-retries",
        "2",
    ];
    let mut args = vec!["service", "update"];
    args.extend_from_slice(&bad);
    args.push("paused");
    let err = one_line_failure(m, &args);
    assert!(
        err.contains("update paused due to failure or early termination of task"),
        "{err}"
    );
    assert_eq!(c.inspect("paused")["UpdateStatus"]["State"], "paused");
    let tasks = c.tasks_json("paused");
    assert!(tasks.iter().any(unhealthy_failure), "{tasks:#?}");
    // Parallelism 1: the first slot only; the others still run their old task, unchecked.
    let old_running = live(&tasks)
        .into_iter()
        .filter(|t| state(t) == "running" && t["Status"]["Health"].is_null())
        .count();
    assert_eq!(old_running, 2, "{tasks:#?}");

    let mut args = vec!["service", "update"];
    args.extend_from_slice(&bad);
    args.push("back");
    let err = one_line_failure(m, &args);
    assert!(err.contains("service rolled back"), "{err}");
    assert_eq!(
        c.inspect("back")["UpdateStatus"]["State"],
        "rollback_completed"
    );
    let tasks = c.tasks_json("back");
    assert!(tasks.iter().any(unhealthy_failure), "{tasks:#?}");
    let wanted = live(&tasks);
    assert_eq!(wanted.len(), 3, "{tasks:#?}");
    assert!(
        wanted
            .iter()
            .all(|t| state(t) == "running" && t["Status"]["Health"].is_null()),
        "{tasks:#?}"
    );
    assert!(c.inspect("back")["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"].is_null());
}

#[test]
fn the_image_healthcheck_applies_and_no_healthcheck_disables_it() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let archive = healthcheck_image(dir.path(), &["CMD-SHELL", "exit 1"], 300, 1);
    let c = Cluster::with_loaded_images(1, 1, &[&archive]);
    let m = &c.nodes[0];
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "service",
            "create",
            "--no-resolve-image",
            "--name",
            name,
            "--stop-grace-period",
            "1s",
            "--restart-delay",
            "100ms",
        ];
        args.extend_from_slice(extra);
        args.push("hc:latest");
        m.ok(&args);
    };
    // The image's check, as it is: failing, so the task is replaced.
    create("imagecheck", &["--detach"]);
    // Disabled: the task runs unchecked.
    create("nocheck", &["--no-healthcheck"]);
    // The spec's command over the image's, with the image's 300 ms interval.
    create("override", &["--health-cmd", "true"]);
    wait_for("the image's check failing a task", &c, "imagecheck", |ts| {
        ts.iter().any(unhealthy_failure)
    });
    let o = c.tasks_json("override");
    assert_eq!(o.len(), 1, "{o:#?}");
    assert_eq!(health(&o[0]), "healthy");
    // Several of the image's intervals later the unchecked task still runs, with no health.
    std::thread::sleep(Duration::from_secs(2));
    let n = c.tasks_json("nocheck");
    assert_eq!(n.len(), 1, "{n:#?}");
    assert_eq!(state(&n[0]), "running");
    assert!(n[0]["Status"]["Health"].is_null(), "{n:#?}");
    let ps = m.ok(&["service", "ps", "nocheck"]);
    assert!(!ps.contains("(health"), "{ps}");
    let spec = c.inspect("nocheck");
    assert_eq!(
        spec["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"],
        json!(["NONE"])
    );
}

#[test]
fn bad_health_flags_fail_on_one_line_and_change_nothing() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "kept",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let before = c.inspect("kept")["Spec"].clone();
    let bad: [(&[&str], &str); 6] = [
        (&["--health-interval", "-5s"], "must not be negative"),
        (&["--health-timeout", "soon"], "--health-timeout"),
        (&["--health-start-period", "-1s"], "must not be negative"),
        (&["--health-retries", "-1"], "must not be negative"),
        (&["--health-retries", "many"], "many"),
        (
            &["--health-cmd", "true", "--no-healthcheck"],
            "--no-healthcheck conflicts with --health-* options",
        ),
    ];
    for (flags, says) in bad {
        let mut args = vec!["service", "create", "--detach", "--name", "nope"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, "sleep", "1"]);
        let err = one_line_failure(m, &args);
        assert!(err.contains(says), "{flags:?}: {err}");
        let mut args = vec!["service", "update", "--detach"];
        args.extend_from_slice(flags);
        args.push("kept");
        let err = one_line_failure(m, &args);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    let ls = m.ok(&["service", "ls"]);
    assert!(!ls.contains("nope"), "{ls}");
    assert_eq!(c.inspect("kept")["Spec"], before);
}

/// The row of `shoal ps` (table) whose NAMES starts with `prefix`, if any.
fn ps_row(n: &Node, args: &[&str], prefix: &str) -> Option<String> {
    let mut argv = vec!["ps"];
    argv.extend_from_slice(args);
    let out = n.ok(&argv);
    let mut lines = out.lines();
    let names = lines.next()?.find("NAMES")?;
    lines
        .find(|l| l.get(names..).is_some_and(|n| n.starts_with(prefix)))
        .map(str::to_string)
}

/// Waits until `shoal ps` on `n` shows a row named `prefix…` whose line holds `text`.
fn wait_for_ps(n: &Node, prefix: &str, text: &str) -> String {
    let deadline = Instant::now() + HEALTH_WAIT;
    loop {
        let row = ps_row(n, &[], prefix);
        if let Some(r) = row.as_deref().filter(|r| r.contains(text)) {
            return r.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {text:?} in shoal ps; row {prefix}: {row:?}\n{}",
            n.ok(&["ps", "-a"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a front-door container of a data dir when the test ends, however it ends.
struct FrontDoorContainer(PathBuf, &'static str);

impl Drop for FrontDoorContainer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(SHOAL)
            .args(["rm", "-f", "--data-dir"])
            .arg(&self.0)
            .arg(self.1)
            .output();
    }
}

/// `shoal ps` on the node running a service's task lists the task's container as docker does
/// on a swarm node (SERVICE.SLOT.TASKID) beside the node's own containers, with the health in
/// STATUS: starting until a check passes, then healthy, then unhealthy once checks fail. Other
/// nodes do not list it, and with no agent `ps` lists the node's own containers alone.
#[test]
fn shoal_ps_lists_the_node_s_task_containers_with_their_health() {
    let mut c = Cluster::new(2, 1);
    let (m, w) = (&c.nodes[0], &c.nodes[1]);
    let plain = w.ok(&["run", "-d", "--name", "plain", IMAGE, "sleep", "3600"]);
    let _plain = FrontDoorContainer(w.data(), "plain");
    // The check passes once /tmp/ok exists; failures before that do not count (start period).
    // `sleep` as pid 1 ignores SIGTERM: stopped as unhealthy, it runs out its grace period.
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "fine",
        "--constraint",
        "node.hostname==host2",
        "--stop-grace-period",
        "20s",
        "--health-cmd",
        "test -f /tmp/ok",
        "--health-interval",
        "300ms",
        "--health-retries",
        "2",
        "--health-start-period",
        "10m",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let row = wait_for_ps(w, "fine.1.", "(health: starting)");
    assert!(row.contains(" Up "), "{row}");
    assert!(row.contains("busybox:latest"), "{row}");
    assert!(row.contains("\"sleep 3600\""), "{row}");
    let id = row.split_whitespace().last().unwrap()["fine.1.".len()..].to_string();
    let tasks = c.tasks_json("fine");
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(tasks[0]["ID"], id.as_str(), "{tasks:#?}");
    assert!(row.starts_with(&id[..12]), "{row}");
    // Only the node running it lists it.
    assert!(
        ps_row(m, &["-a"], "fine.").is_none(),
        "{}",
        m.ok(&["ps", "-a"])
    );

    let touch = w.runtime(&["exec", &id, "touch", "/tmp/ok"]);
    assert!(touch.status.success(), "{touch:?}");
    let row = wait_for_ps(w, "fine.1.", "(healthy)");
    assert!(row.contains(&format!("fine.1.{id}")), "{row}");
    // -q and --format json carry it, beside the node's own container.
    let quiet = w.ok(&["ps", "-q"]);
    let ids: Vec<&str> = quiet.lines().collect();
    assert!(ids.contains(&&id[..12]), "{quiet}");
    assert!(ids.contains(&&plain.trim()[..12]), "{quiet}");
    assert_eq!(ids.len(), 2, "{quiet}");
    let json: Vec<Value> = serde_json::from_str(&w.ok(&["ps", "--format", "json"])).unwrap();
    let task = json
        .iter()
        .find(|r| r["ID"] == id.as_str())
        .unwrap_or_else(|| panic!("{json:#?}"));
    assert_eq!(task["Names"], format!("fine.1.{id}"), "{task:#}");
    assert_eq!(task["Health"], "healthy", "{task:#}");
    assert_eq!(task["State"], "running", "{task:#}");
    assert!(
        task["Status"].as_str().unwrap().ends_with(" (healthy)"),
        "{task:#}"
    );
    assert!(
        task["Labels"]
            .as_str()
            .unwrap()
            .contains("com.docker.swarm.service.name=fine"),
        "{task:#}"
    );
    let own = json.iter().find(|r| r["Names"] == "plain").unwrap();
    assert_eq!(own["Health"], "", "{own:#}");

    // Failing checks: unhealthy while the container still runs out its stop grace period.
    let rm = w.runtime(&["exec", &id, "rm", "/tmp/ok"]);
    assert!(rm.status.success(), "{rm:?}");
    let row = wait_for_ps(w, &format!("fine.1.{id}"), "(unhealthy)");
    assert!(row.contains(" Up "), "{row}");
    let json: Vec<Value> = serde_json::from_str(&w.ok(&["ps", "--format", "json"])).unwrap();
    assert!(
        json.iter()
            .any(|r| r["ID"] == id.as_str() && r["Health"] == "unhealthy"),
        "{json:#?}"
    );

    // No agent answers: the node's own containers alone, and no complaint.
    let data = c.nodes[1].data();
    c.nodes[1].kill_agent();
    let out = c.nodes[1].shoal(&["ps", "-a", "--data-dir", data.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("plain"), "{table}");
    assert!(!table.contains("fine."), "{table}");
}
