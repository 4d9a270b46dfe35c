//! Front-door lifecycle (root, real containers): detached run, list, logs, stop within and
//! after the grace period, exec, auto-remove, rm leaving nothing, limits, bad input.

use crate::frontdoor_support;

use std::time::{Duration, Instant};

use frontdoor_support::{alive, cgroup_dirs, mounts_under, Node};
use shoal_runtime::container::ExecOptions;
use shoal_runtime::frontdoor::{FrontDoorError, RunState};

#[test]
fn detached_list_logs_and_stop_within_grace() {
    let n = Node::new();
    let id = n.start(
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 3' TERM; echo started; while :; do sleep 0.05; done",
        ],
        |o| o.name = Some("web".into()),
    );
    n.wait_log(&id, "started\n");
    let list = n.fd.list(false).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].record.name, "web");
    assert!(matches!(list[0].state, RunState::Running { .. }));

    let t = Instant::now();
    let status = n.fd.stop("web_is_not_an_id_but", Duration::from_secs(10));
    assert!(status.is_err(), "stop of an unknown container must fail");
    let r = n.fd.resolve("web").unwrap();
    let status = n.fd.stop(&r.id, Duration::from_secs(10)).unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(status.shell_code(), 3);
    assert_eq!(n.log(&id), "started\ngot TERM\n");
    assert!(n.fd.list(false).unwrap().is_empty());
    let all = n.fd.list(true).unwrap();
    assert!(matches!(all[0].state, RunState::Exited { code: 3, .. }));
    // Stopping a stopped container is fine and says how it ended.
    let again = n.fd.stop(&id, Duration::from_secs(1)).unwrap().unwrap();
    assert_eq!(again.shell_code(), 3);
}

#[test]
fn stop_kills_after_the_grace_period() {
    let n = Node::new();
    let id = n.start(
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        |_| {},
    );
    n.wait_log(&id, "ready\n");
    let pids = n.fd.container(&id).unwrap().unwrap().pids().unwrap();
    assert!(!pids.is_empty());
    let t = Instant::now();
    let status = n.fd.stop(&id, Duration::from_secs(1)).unwrap().unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(status.shell_code(), 137);
    for p in pids {
        assert!(!alive(p), "pid {p} survived stop");
    }
}

#[test]
fn exec_runs_in_the_container() {
    let n = Node::new();
    let id = n.start(&["sleep", "30"], |o| o.env = vec!["A=1".into()]);
    let p =
        n.fd.exec(
            &id,
            &ExecOptions {
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    "[ \"$A$B\" = 12 ] && [ \"$(pwd)\" = /tmp ] && exit 5".into(),
                ],
                env: vec!["B=2".into()],
                cwd: Some("/tmp".into()),
                detach: false,
                timeout: None,
            },
        )
        .unwrap();
    assert_eq!(p.wait().unwrap().shell_code(), 5);
    n.fd.remove(&id, true).unwrap();
    assert!(n.traces(&id).is_empty(), "{:?}", n.traces(&id));
    let e = n.fd.exec(
        &id,
        &ExecOptions {
            args: vec!["true".into()],
            ..Default::default()
        },
    );
    assert!(matches!(e, Err(FrontDoorError::NoSuchContainer(_))));
}

#[test]
fn rm_removes_everything() {
    let n = Node::new();
    let id = n.start(&["sh", "-c", "echo hi > /file; sleep 30"], |_| {});
    let c = n.fd.container(&id).unwrap().unwrap();
    let pid = c.pid();
    assert!(alive(pid));
    assert!(!cgroup_dirs(&id).is_empty());
    // The overlay lives in the container's mount namespace only.
    assert!(
        mounts_under(&n.data).is_empty(),
        "{:?}",
        mounts_under(&n.data)
    );
    let e = n.fd.remove(&id, false).unwrap_err();
    assert!(matches!(e, FrontDoorError::Running(_)), "{e}");
    assert!(n.fd.container_dir(&id).exists());
    n.fd.remove(&id, true).unwrap();
    assert!(!alive(pid));
    assert!(n.traces(&id).is_empty(), "{:?}", n.traces(&id));
    assert!(
        n.container_entries().is_empty(),
        "{:?}",
        n.container_entries()
    );
    // A stopped one too, and removing twice is fine.
    let (_, _, id2) = n.run(&["true"], |_| {});
    n.fd.remove(&id2, false).unwrap();
    n.fd.remove(&id2, false).unwrap();
    assert!(n.traces(&id2).is_empty(), "{:?}", n.traces(&id2));
}

#[test]
fn auto_remove_after_exit() {
    let n = Node::new();
    let id = n.start(&["sh", "-c", "sleep 0.3"], |o| o.auto_remove = true);
    n.fd.spawn_auto_remove(&id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !n.traces(&id).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", n.traces(&id));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Without a remover, `list` sweeps exited auto-remove containers.
    let (_, _, id2) = n.run(&["true"], |o| o.auto_remove = true);
    assert!(n.fd.list(true).unwrap().is_empty());
    assert!(n.traces(&id2).is_empty(), "{:?}", n.traces(&id2));
}

#[test]
fn memory_hog_is_oom_killed() {
    let n = Node::new();
    let (code, log, id) = n.run(
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
        ],
        |o| o.memory = Some(16 << 20),
    );
    assert!(!log.contains("survived"), "{log}");
    assert_eq!(code, 137, "{log}");
    // The cgroup stays until rm: it counted the OOM kill at its limit.
    let stats = n.fd.container(&id).unwrap().unwrap().stats().unwrap();
    assert!(stats.oom_kills >= 1, "{stats:?}");
    assert_eq!(stats.memory_limit, Some(16 << 20));
    // Within the limit it runs.
    let (code, log, _) = n.run(
        &[
            "sh",
            "-c",
            "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ok ${#x}",
        ],
        |o| o.memory = Some(16 << 20),
    );
    assert_eq!((code, log.as_str()), (0, "ok 1000000\n"));
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    let n = Node::new();
    let id = n.start(
        &[
            "sh",
            "-c",
            // The subshell forks until the limit makes it fail and exit.
            "(i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; echo unlimited); echo looped; exec sleep 30",
        ],
        |o| o.pids_limit = Some(8),
    );
    n.wait_log(&id, "looped");
    let pids = n.fd.container(&id).unwrap().unwrap().pids().unwrap();
    assert!(pids.len() <= 8, "{} processes", pids.len());
    assert!(pids.len() >= 2, "{} processes", pids.len());
    let log = n.log(&id);
    assert!(log.contains("can't fork"), "{log}");
    assert!(!log.contains("unlimited"), "{log}");
    n.fd.remove(&id, true).unwrap();
    assert!(n.traces(&id).is_empty(), "{:?}", n.traces(&id));
}

#[test]
fn bad_input_leaves_nothing() {
    let n = Node::new();
    let before = mounts_under(&n.data);
    let mut o = frontdoor_support::opts(&["true"]);
    o.image = "nothere:1".into();
    let e = n.fd.run(&o).err().unwrap();
    assert!(e.to_string().contains("no such image"), "{e}");

    let id = n.start(&["sleep", "30"], |o| o.name = Some("taken".into()));
    let mut o = frontdoor_support::opts(&["true"]);
    o.name = Some("taken".into());
    let e = n.fd.run(&o).err().unwrap();
    assert!(matches!(e, FrontDoorError::NameInUse { .. }), "{e}");
    o.name = Some("bad name".into());
    assert!(matches!(
        n.fd.run(&o).err().unwrap(),
        FrontDoorError::InvalidName(_)
    ));
    // A command that is not in the image fails at start and is removed.
    let o = frontdoor_support::opts(&["/no/such/binary"]);
    let mut c = n.fd.create(&o).unwrap();
    let bad_id = c.record.id.clone();
    assert!(!cgroup_dirs(&bad_id).is_empty());
    let e = n.fd.start(&mut c).err().unwrap();
    assert!(e.to_string().contains("/no/such/binary"), "{e}");
    assert!(n.traces(&bad_id).is_empty(), "{:?}", n.traces(&bad_id));
    let o = frontdoor_support::opts(&["true"]);
    let mut o2 = o.clone();
    o2.user = Some("nobody_here".into());
    let e = n.fd.run(&o2).err().unwrap();
    assert!(e.to_string().contains("unable to find user"), "{e}");

    n.fd.remove(&id, true).unwrap();
    assert!(
        n.container_entries().is_empty(),
        "{:?}",
        n.container_entries()
    );
    assert_eq!(mounts_under(&n.data), before);
}

#[test]
fn cpus_set_a_cfs_quota() {
    let n = Node::new();
    let id = n.start(&["sleep", "30"], |o| o.cpus = Some(0.5));
    let v1 = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("shoal").join(&id).join("cpu.cfs_quota_us"))
        .find(|p| p.exists());
    match v1 {
        Some(p) => {
            assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "50000");
            let period = p.with_file_name("cpu.cfs_period_us");
            assert_eq!(std::fs::read_to_string(period).unwrap().trim(), "100000");
        }
        None => {
            let p = std::path::Path::new("/sys/fs/cgroup/shoal")
                .join(&id)
                .join("cpu.max");
            assert_eq!(std::fs::read_to_string(p).unwrap().trim(), "50000 100000");
        }
    }
}

#[test]
fn devices_are_denied_beyond_the_defaults() {
    let n = Node::new();
    // CAP_MKNOD is in Docker's set, but the device cgroup refuses opening a disk.
    let (code, log, _) = n.run(
        &["sh", "-c", "mknod /tmp/disk b 8 0 && head -c 1 /tmp/disk; echo rc=$?; echo x > /dev/null && echo null ok"],
        |_| {},
    );
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("Operation not permitted") && log.contains("rc=1"),
        "{log}"
    );
    assert!(log.contains("null ok"), "{log}");
}
