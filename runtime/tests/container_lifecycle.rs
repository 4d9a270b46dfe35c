//! Real containers (root): lifecycle, exit codes, logs, survival of the caller, exec,
//! pause/resume, stats, cleanup after delete, bad bundles.

use crate::container_support;

use std::time::Duration;

use container_support::{alive, cgroup_dirs, id, mounts, Fixture};
use shoal_runtime::container::{Container, ContainerError, CreateOptions, ExecOptions, Status};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

#[test]
fn create_start_state_kill_delete() {
    let fx = Fixture::new(&["sleep", "30"]);
    let id = id("life");
    let before = mounts();
    let mut c = fx.create(&id, false);
    assert_eq!(c.status(), Status::Created);
    let init = c.pid();
    let monitor = c.monitor_pid();
    assert!(alive(init) && alive(monitor));
    assert!(!cgroup_dirs(&id).is_empty(), "cgroup made");
    let listed = Container::list(&fx.root).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, Status::Created);

    c.start().expect("start");
    let loaded = Container::load(&fx.root, &id).expect("load");
    assert_eq!(loaded.status(), Status::Running);
    let state = loaded.state();
    assert_eq!(state.pid, init);
    assert_eq!(state.id, id);
    let json = serde_json::to_value(&state).expect("json");
    assert_eq!(json["status"], "running");
    assert!(json["ociVersion"].is_string() && json["bundle"].is_string());

    loaded.kill(libc::SIGKILL).expect("kill");
    let status = c.wait_timeout(WAIT).expect("wait").expect("exited");
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert_eq!(status.shell_code(), 137);
    assert_eq!(c.status(), Status::Stopped);
    assert!(matches!(
        c.kill(libc::SIGTERM),
        Err(ContainerError::WrongState { .. })
    ));

    Container::load(&fx.root, &id)
        .expect("load")
        .delete(false)
        .expect("delete");
    assert!(!fx.root.join(&id).exists(), "state dir removed");
    assert!(
        cgroup_dirs(&id).is_empty(),
        "cgroup removed: {:?}",
        cgroup_dirs(&id)
    );
    assert_eq!(mounts(), before, "no mount left in the host");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!alive(init) && !alive(monitor), "no process left");
    assert!(matches!(
        Container::load(&fx.root, &id),
        Err(ContainerError::NotFound(_))
    ));
}

#[test]
fn exit_code_propagates() {
    let fx = Fixture::new(&["sh", "-c", "exit 42"]);
    let mut c = fx.create(&id("exit"), false);
    c.start().expect("start");
    let s = c.wait_timeout(WAIT).expect("wait").expect("exited");
    assert_eq!(s.code, Some(42));
    // Another process reads the recorded status from the state dir.
    let other = Container::load(&fx.root, c.id()).expect("load");
    assert_eq!(other.exit_status().map(|s| s.code), Some(Some(42)));
    c.delete(false).expect("delete");
}

#[test]
fn pid_one_hostname_no_host_processes_and_logs() {
    let script = "echo pid=$$; echo host=$(hostname); echo procs=$(ls /proc | grep -c '^[0-9][0-9]*$'); echo to-stderr >&2";
    let fx = Fixture::new(&["sh", "-c", script]);
    let mut c = fx.create(&id("inside"), true);
    c.start().expect("start");
    assert_eq!(
        c.wait_timeout(WAIT).expect("wait").expect("exited").code,
        Some(0)
    );
    let log = fx.log_text();
    assert!(log.contains("pid=1\n"), "pid 1 inside: {log}");
    assert!(log.contains("host=shoaltest\n"), "hostname: {log}");
    // sh, ls, grep and the $(...) subshell at most: nothing of the host's.
    let procs: usize = log
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.parse().ok())
        .expect("procs line");
    assert!(
        procs <= 4,
        "only the container's processes are visible: {log}"
    );
    assert!(log.contains("to-stderr\n"), "stderr captured: {log}");
    let err = fx.log_stream(shoal_runtime::logfile::Stream::Stderr);
    assert_eq!(err, "to-stderr\n", "stderr kept apart");
    let out = fx.log_stream(shoal_runtime::logfile::Stream::Stdout);
    assert!(!out.contains("to-stderr"), "stdout without stderr: {out}");
    c.delete(false).expect("delete");
}

#[test]
fn log_is_rotated_at_its_cap() {
    let fx = Fixture::new(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 3000 ]; do echo 0123456789abcdef0123456789abcdef; i=$((i+1)); done",
    ]);
    let log = shoal_runtime::container::LogConfig {
        path: fx.dir.path().join("r.log"),
        max_bytes: 32 * 1024,
        max_files: 2,
    };
    let opts = CreateOptions {
        log: Some(log.clone()),
        allow_unprotected_exe: true,
        ..Default::default()
    };
    let mut c = Container::create(&fx.root, &id("rotate"), &fx.bundle, &opts).expect("create");
    c.start().expect("start");
    c.wait_timeout(WAIT).expect("wait").expect("exited");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    // Rotated at a record boundary: full files up to one record short of the cap.
    let record = "2026-12-07T18:42:44.123456789Z stdout F 0123456789abcdef0123456789abcdef\n".len();
    assert!(size(&log.path) <= 32 * 1024);
    for f in ["r.log.1", "r.log.2"] {
        let s = size(&fx.dir.path().join(f));
        assert!(
            s <= 32 * 1024 && s > (32 * 1024 - record) as u64,
            "{f}: {s}"
        );
        let text = container_support::log_text(&fx.dir.path().join(f), None);
        assert!(
            text.lines()
                .all(|l| l == "0123456789abcdef0123456789abcdef"),
            "{f} holds whole records only"
        );
    }
    assert!(
        !fx.dir.path().join("r.log.3").exists(),
        "at most max_files rotated files"
    );
    c.delete(false).expect("delete");
}

#[test]
fn container_survives_its_caller() {
    let fx = Fixture::new(&["sh", "-c", "sleep 1; exit 5"]);
    let id = id("survive");
    let (r, w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only creates the container, reports and blocks until killed.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let opts = CreateOptions {
            allow_unprotected_exe: true,
            ..Default::default()
        };
        let ok = Container::create(&fx.root, &id, &fx.bundle, &opts)
            .and_then(|mut c| c.start())
            .is_ok();
        let _ = nix::unistd::write(&w, if ok { b"y" } else { b"n" });
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    drop(w);
    let mut b = [0u8; 1];
    nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&r), &mut b).expect("read");
    assert_eq!(&b, b"y", "child created and started the container");
    // SAFETY: killing and reaping our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    let mut c = Container::load(&fx.root, &id).expect("load");
    assert_eq!(
        c.status(),
        Status::Running,
        "still running after its caller died"
    );
    let s = c.wait_timeout(WAIT).expect("wait").expect("exited");
    assert_eq!(s.code, Some(5), "exit status recorded without the caller");
    c.delete(false).expect("delete");
}

#[test]
fn exec_pause_resume_stats() {
    let fx = Fixture::new(&["sleep", "30"]);
    let mut c = fx.create(&id("exec"), false);
    c.start().expect("start");
    let p = c
        .exec(&ExecOptions {
            args: vec![
                "sh".into(),
                "-c".into(),
                "test \"$FOO\" = bar && test \"$(pwd)\" = /tmp && test $$ -ne 1".into(),
            ],
            env: vec!["FOO=bar".into()],
            cwd: Some("/tmp".into()),
            detach: false,
            timeout: None,
        })
        .expect("exec");
    assert_eq!(
        p.wait().map(|s| s.code),
        Some(Some(0)),
        "env, cwd and pid namespace of the exec"
    );
    let bad = c.exec(&ExecOptions {
        args: vec!["no-such-command".into()],
        ..Default::default()
    });
    assert!(
        matches!(bad, Err(ContainerError::Exec(ref m)) if m.contains("not found")),
        "{:?}",
        bad.err()
    );

    let stats = c.stats().expect("stats");
    assert!(
        stats.memory_usage > 0 && stats.pids_current >= 1,
        "{stats:?}"
    );
    assert!(c.pids().expect("pids").contains(&c.pid()));

    c.pause().expect("pause");
    assert_eq!(c.status(), Status::Paused);
    assert!(c.delete_check_running());
    c.resume().expect("resume");
    assert_eq!(c.status(), Status::Running);
    let running = Container::load(&fx.root, c.id()).expect("load");
    assert!(matches!(
        running.delete(false),
        Err(ContainerError::WrongState { .. })
    ));
    let id = c.id().to_string();
    c.delete(true).expect("delete -f");
    assert!(cgroup_dirs(&id).is_empty());
}

#[test]
fn an_exec_past_its_timeout_is_killed_with_what_it_started() {
    let fx = Fixture::new(&["sleep", "30"]);
    let mut c = fx.create(&id("exectimeout"), false);
    c.start().expect("start");
    let quick = c
        .exec(&ExecOptions {
            args: vec!["sh".into(), "-c".into(), "exit 4".into()],
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        })
        .expect("exec");
    assert!(!quick.timed_out());
    assert_eq!(quick.wait().and_then(|s| s.code), Some(4));
    // sh forks sleep (the command is not its last): both go at the deadline.
    let began = std::time::Instant::now();
    let p = c
        .exec(&ExecOptions {
            args: vec!["sh".into(), "-c".into(), "sleep 100; echo never".into()],
            timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        })
        .expect("exec");
    let took = began.elapsed();
    assert!(p.timed_out());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(p.wait().and_then(|s| s.signal), Some(libc::SIGKILL));
    assert_eq!(
        c.pids().expect("pids"),
        vec![c.pid()],
        "only the init is left in the container"
    );
    c.delete(true).expect("delete -f");
}

trait DeleteCheck {
    fn delete_check_running(&self) -> bool;
}

impl DeleteCheck for Container {
    /// A paused container refuses a plain delete.
    fn delete_check_running(&self) -> bool {
        let again = Container::load(self.root(), self.id()).expect("load");
        matches!(
            again.delete(false),
            Err(ContainerError::WrongState {
                status: Status::Paused,
                ..
            })
        )
    }
}

#[test]
fn bad_bundles_fail_cleanly() {
    let fx = Fixture::new(&["true"]);
    let before = mounts();
    let cfg = fx.bundle.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg).expect("read")).expect("json");
    v["linux"]["intelRdt"] = serde_json::json!({"closID": "x"});
    std::fs::write(&cfg, v.to_string()).expect("write");
    let opts = CreateOptions {
        allow_unprotected_exe: true,
        ..Default::default()
    };
    let id1 = id("unsupported");
    let err = Container::create(&fx.root, &id1, &fx.bundle, &opts)
        .err()
        .expect("refused");
    assert_eq!(err.to_string(), "unsupported spec field: linux.intelRdt");
    assert!(!fx.root.join(&id1).exists() && cgroup_dirs(&id1).is_empty());

    std::fs::write(&cfg, "{\"ociVersion\": ").expect("write");
    let id2 = id("malformed");
    let err = Container::create(&fx.root, &id2, &fx.bundle, &opts)
        .err()
        .expect("refused");
    assert!(
        err.to_string().starts_with("malformed config.json"),
        "{err}"
    );
    assert!(!fx.root.join(&id2).exists() && cgroup_dirs(&id2).is_empty());

    // A failure inside the init (a bind mount of a missing source) undoes everything.
    v["linux"]
        .as_object_mut()
        .expect("linux")
        .remove("intelRdt");
    v["mounts"].as_array_mut().expect("mounts").push(serde_json::json!({
        "destination": "/data", "type": "bind", "source": "/nonexistent/shoal-test", "options": ["rbind"]
    }));
    std::fs::write(&cfg, v.to_string()).expect("write");
    let id3 = id("badmount");
    let err = Container::create(&fx.root, &id3, &fx.bundle, &opts)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("/nonexistent/shoal-test"), "{err}");
    assert!(!fx.root.join(&id3).exists() && cgroup_dirs(&id3).is_empty());
    assert_eq!(mounts(), before);

    assert!(matches!(
        Container::create(&fx.root, "../escape", &fx.bundle, &opts),
        Err(ContainerError::InvalidId(_))
    ));
    // The embedding binary must be protected unless the caller opts out.
    let strict = CreateOptions::default();
    assert!(matches!(
        Container::create(&fx.root, &id("strict"), &fx.bundle, &strict),
        Err(ContainerError::ExeNotProtected)
    ));
}

#[test]
fn user_namespace_maps_and_joined_namespaces() {
    use oci_spec::runtime::{LinuxIdMappingBuilder, LinuxNamespaceBuilder, LinuxNamespaceType};
    let map = |host: u32| {
        LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(host)
            .size(65536u32)
            .build()
            .expect("map")
    };
    let fx = Fixture::with_spec(
        &[
            "sh",
            "-c",
            "echo uid=$(id -u); cat /proc/self/uid_map; sleep 30",
        ],
        |spec| {
            let mut linux = spec.linux().clone().expect("linux");
            let mut nss = linux.namespaces().clone().unwrap_or_default();
            nss.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::User)
                    .build()
                    .expect("ns"),
            );
            linux.set_namespaces(Some(nss));
            linux.set_uid_mappings(Some(vec![map(200_000)]));
            linux.set_gid_mappings(Some(vec![map(200_000)]));
            spec.set_linux(Some(linux));
        },
    );
    let mut c = fx.create(&id("userns"), true);
    c.start().expect("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fx.log_text().contains("200000") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = fx.log_text();
    assert!(log.contains("uid=0\n"), "root inside: {log}");
    assert!(
        log.split_whitespace()
            .collect::<Vec<_>>()
            .starts_with(&["uid=0", "0", "200000", "65536"]),
        "{log}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid())).expect("status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert!(
        uid_line.contains("200000"),
        "host sees the mapped uid: {uid_line}"
    );

    // A second container joins the first one's network namespace by path.
    let net = format!("/proc/{}/ns/net", c.pid());
    let fx2 = Fixture::with_spec(&["true"], |spec| {
        let mut linux = spec.linux().clone().expect("linux");
        let mut nss = linux.namespaces().clone().unwrap_or_default();
        nss.retain(|n| n.typ() != LinuxNamespaceType::Network);
        nss.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(net.clone())
                .build()
                .expect("ns"),
        );
        linux.set_namespaces(Some(nss));
        spec.set_linux(Some(linux));
    });
    let mut c2 = fx2.create(&id("joinnet"), false);
    let a = std::fs::read_link(format!("/proc/{}/ns/net", c.pid())).expect("ns");
    let b = std::fs::read_link(format!("/proc/{}/ns/net", c2.pid())).expect("ns");
    assert_eq!(a, b, "joined the namespace");
    c2.start().expect("start");
    assert_eq!(
        c2.wait_timeout(WAIT).expect("wait").expect("exited").code,
        Some(0)
    );
    c2.delete(false).expect("delete");
    c.delete(true).expect("delete");
}

/// A creator killed half-way (`shoal runtime create` of an agent SIGKILLed mid-create) leaves a
/// state dir without `state.json` and a cgroup, maybe with the init in it: `list` shows it
/// creating, and `remove` takes all of it, cgroup included.
#[test]
fn a_container_whose_creator_died_half_way_is_removed_whole() {
    let fx = Fixture::new(&["sleep", "1000"]);
    for attempt in 0..20 {
        let id = id(&format!("half{attempt}"));
        let opts = CreateOptions {
            allow_unprotected_exe: true,
            ..Default::default()
        };
        // SAFETY: the child only creates the container (fork-safe allocation in glibc) and
        // leaves with _exit; this test's other thread holds no lock it needs.
        let creator = unsafe { libc::fork() };
        assert!(creator >= 0, "fork");
        if creator == 0 {
            let _ = Container::create(&fx.root, &id, &fx.bundle, &opts);
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(0) }
        }
        // Killed as soon as the cgroup exists: the init is being set up then.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while cgroup_dirs(&id).is_empty() && std::time::Instant::now() < deadline {
            let mut st = 0;
            // SAFETY: polling our own child.
            if unsafe { libc::waitpid(creator, &mut st, libc::WNOHANG) } == creator {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // SAFETY: killing and reaping our own child (gone already is fine).
        unsafe {
            libc::kill(creator, libc::SIGKILL);
            libc::waitpid(creator, std::ptr::null_mut(), 0);
        }
        let dir = fx.root.join(&id);
        let half_made = dir.is_dir() && !dir.join("state.json").exists();
        if !half_made || cgroup_dirs(&id).is_empty() {
            // Killed before the cgroup, or too late: again.
            let _ = Container::remove(&fx.root, &id);
            assert!(cgroup_dirs(&id).is_empty() && !dir.exists());
            continue;
        }
        let procs: Vec<i32> = cgroup_dirs(&id)
            .iter()
            .flat_map(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        let listed = Container::list(&fx.root).expect("list");
        assert!(
            listed
                .iter()
                .any(|s| s.id == id && s.status == Status::Creating),
            "listed as creating: {listed:?}"
        );
        assert!(matches!(
            Container::load(&fx.root, &id),
            Err(ContainerError::NotFound(_))
        ));
        Container::remove(&fx.root, &id).expect("remove the half-made container");
        assert!(
            cgroup_dirs(&id).is_empty(),
            "cgroups left: {:?}",
            cgroup_dirs(&id)
        );
        assert!(!dir.exists(), "state dir left");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            procs.iter().all(|p| !alive(*p)),
            "processes left: {procs:?}"
        );
        assert!(matches!(
            Container::remove(&fx.root, &id),
            Err(ContainerError::NotFound(_))
        ));
        return;
    }
    panic!("no create was caught half-way in 20 attempts");
}
