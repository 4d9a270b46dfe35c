//! A service's `--mount`s end to end: `shoal agent` processes on 127.0.0.x over real busybox
//! containers, driven through the CLI. A task's volume is the node's own, made there on first
//! use, and outlives the task: its replacement (after the container is killed) sees what the
//! first one wrote. A bind source the node lacks fails the task with docker's words.

use crate::services;

use std::time::{Duration, Instant};

use services::*;

/// The running task of `service` and its node's index, once there is exactly one.
fn running_task(c: &Cluster, service: &str) -> (String, String) {
    let mut found = None;
    c.until("one running task", || {
        let r = c.running(service);
        found = (r.len() == 1).then(|| r.into_iter().next().unwrap());
        found.is_some()
    });
    found.unwrap()
}

fn one_line_failure(out: &std::process::Output, want: &str) {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("shoal: "), "{err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

#[test]
fn a_service_volume_keeps_its_data_across_a_task_restart() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let volume = m.data().join("volumes/dbdata/_data");

    // Mistakes are one line, before anything is made.
    for (flags, want) in [
        (
            "type=volume,source=a/b,target=/data",
            "includes invalid characters for a local volume name",
        ),
        (
            "type=volume,source=dbdata,target=data",
            "invalid mount config for type \"volume\": invalid mount path: 'data' mount path must be absolute",
        ),
        ("type=volume,source=dbdata", "target is required"),
        ("type=tmpfs,target=/t", "not supported"),
    ] {
        one_line_failure(
            &m.shoal(&["service", "create", "--detach", "--mount", flags, IMAGE, "true"]),
            want,
        );
    }
    assert_eq!(m.ok(&["service", "ls", "-q"]), "");
    assert!(!m.data().join("volumes").exists());

    // Each task prints what the volume holds, then adds a line of its own.
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "db",
        "--restart-delay",
        "500ms",
        "--mount",
        "type=volume,source=dbdata,target=/data,volume-label=app=db",
        IMAGE,
        "sh",
        "-c",
        "cat /data/seen 2>/dev/null; cat /proc/sys/kernel/random/uuid >> /data/seen; exec sleep 600",
    ]);
    let (first, host) = running_task(&c, "db");
    assert_eq!(host, m.host);
    c.until("the first task's line in the volume", || {
        std::fs::read_to_string(volume.join("seen")).is_ok_and(|s| s.lines().count() == 1)
    });
    let line1 = std::fs::read_to_string(volume.join("seen")).unwrap();
    let inspect = c.inspect("db");
    let mounts = &inspect["Spec"]["TaskTemplate"]["ContainerSpec"]["Mounts"];
    assert_eq!(mounts[0]["Type"], "volume", "{inspect}");
    assert_eq!(mounts[0]["Source"], "dbdata");
    assert_eq!(mounts[0]["Target"], "/data");
    assert_eq!(mounts[0]["VolumeOptions"]["Labels"]["app"], "db");
    // The node's volume, as `volume` shows it: labelled, in use by the task.
    let v: serde_json::Value =
        serde_json::from_str(&m.ok(&["volume", "inspect", "dbdata"])).unwrap();
    assert_eq!(v[0]["Labels"]["app"], "db", "{v}");
    let err = m.fails(&["volume", "rm", "dbdata"]);
    assert!(
        err.contains("volume is in use") && err.contains(&first),
        "{err}"
    );

    // The container dies; the replacement task finds the first one's data.
    let pid = m.container_pid(&first).expect("the task's container runs");
    // SAFETY: kill(2) of the test's own task container, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut second = String::new();
    c.until("a replacement task running", || {
        let r = c.running("db");
        match r.into_iter().next() {
            Some((id, _)) if id != first => {
                second = id;
                true
            }
            _ => false,
        }
    });
    c.until("the second task's line", || {
        std::fs::read_to_string(volume.join("seen")).is_ok_and(|s| s.lines().count() == 2)
    });
    let seen = std::fs::read_to_string(volume.join("seen")).unwrap();
    assert!(seen.starts_with(&line1), "{seen}");
    let log = m
        .data()
        .join("containers")
        .join(&second)
        .join("container.log");
    let deadline = Instant::now() + CONVERGE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(line1.trim()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second task did not read the first one's line {line1:?}: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Mounted in the task's own namespace only.
    assert!(
        mounts_under(&m.data()).is_empty(),
        "{:?}",
        mounts_under(&m.data())
    );

    // Once the service and its tasks are gone, the volume (and its data) stays on the node,
    // no longer in use.
    m.ok(&["service", "rm", "db"]);
    c.until("the volume free", || {
        m.shoal(&["volume", "rm", "dbdata"]).status.success()
    });
    assert!(!volume.exists());
}

#[test]
fn a_missing_bind_source_fails_the_task_and_a_present_one_is_seen() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let host = m.dir.join("shared");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("motd"), "from the node\n").unwrap();
    let missing = m.dir.join("no-such-dir");
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "lost",
        "--restart-condition",
        "none",
        "--mount",
        &format!("type=bind,source={},target=/x", missing.display()),
        IMAGE,
        "true",
    ]);
    c.until("the task failed", || {
        c.ps("lost").iter().any(|t| t.current == "Failed")
    });
    let t = c.ps("lost").remove(0);
    assert!(
        t.error.contains(&format!(
            "invalid mount config for type \"bind\": bind source path does not exist: {}",
            missing.display()
        )),
        "{t:?}"
    );
    assert!(!missing.exists());

    // A bind, read-only, added by update; then removed again by target.
    m.ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "reader",
        IMAGE,
        "sh",
        "-c",
        "cat /etc/motd 2>&1; touch /etc/motd 2>&1; exec sleep 600",
    ]);
    running_task(&c, "reader");
    m.ok(&[
        "service",
        "update",
        "--detach",
        "--mount-add",
        &format!(
            "type=bind,source={},target=/etc/motd,readonly",
            host.join("motd").display()
        ),
        "reader",
    ]);
    let mut updated = String::new();
    c.until("the updated task running with the mount", || {
        let inspect = c.inspect("reader");
        let has = inspect["Spec"]["TaskTemplate"]["ContainerSpec"]["Mounts"][0]["ReadOnly"] == true;
        let r = c.running("reader");
        match (has, r.into_iter().next()) {
            (true, Some((id, _))) => {
                let log = m.data().join("containers").join(&id).join("container.log");
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if text.contains("from the node") {
                    updated = text;
                    return true;
                }
                false
            }
            _ => false,
        }
    });
    assert!(updated.contains("Read-only file system"), "{updated}");
    one_line_failure(
        &m.shoal(&[
            "service",
            "update",
            "--detach",
            "--mount-rm",
            "/nowhere",
            "reader",
        ]),
        "service has no mount at /nowhere",
    );
    m.ok(&[
        "service",
        "update",
        "--detach",
        "--mount-rm",
        "/etc/motd",
        "reader",
    ]);
    let inspect = c.inspect("reader");
    assert_eq!(
        inspect["Spec"]["TaskTemplate"]["ContainerSpec"]["Mounts"],
        serde_json::json!([]),
        "{inspect}"
    );
}

#[test]
fn a_stack_mounts_its_volumes_and_binds() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let dir = c._root.path();
    std::fs::create_dir(dir.join("conf")).unwrap();
    std::fs::write(dir.join("conf/app.ini"), "mode=stack\n").unwrap();
    let file = dir.join("stack.yml");
    std::fs::write(
        &file,
        format!(
            r#"services:
  db:
    image: {IMAGE}
    command: ["sh", "-c", "cat /conf/app.ini > /data/copied; touch /conf/x 2>&1; exec sleep 600"]
    volumes:
      - data:/data
      - type: bind
        source: ./conf
        target: /conf
        read_only: true
volumes:
  data:
    labels: [purpose=test]
"#
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    m.ok(&["stack", "deploy", "-c", f, "--resolve-image", "never", "st"]);
    let (task, _) = running_task(&c, "st_db");
    // The node's volume st_data, labelled with the stack, holds what the task wrote there.
    let data = m.data().join("volumes/st_data/_data/copied");
    c.until("the task's file in the volume", || {
        std::fs::read_to_string(&data).is_ok_and(|s| s == "mode=stack\n")
    });
    let v: serde_json::Value =
        serde_json::from_str(&m.ok(&["volume", "inspect", "st_data"])).unwrap();
    assert_eq!(v[0]["Labels"]["purpose"], "test", "{v}");
    assert_eq!(v[0]["Labels"]["com.docker.stack.namespace"], "st", "{v}");
    let log = m
        .data()
        .join("containers")
        .join(&task)
        .join("container.log");
    c.until("the refused write in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Read-only file system"))
    });
    assert!(!dir.join("conf/x").exists());

    // A volume the file does not declare is refused by name and line.
    std::fs::write(
        &file,
        format!("services:\n  db:\n    image: {IMAGE}\n    volumes: [other:/o]\n"),
    )
    .unwrap();
    one_line_failure(
        &m.shoal(&["stack", "deploy", "-c", f, "--resolve-image", "never", "st"]),
        "stack.yml:4: services.db.volumes: volume other is not declared under the top-level volumes:",
    );
}
