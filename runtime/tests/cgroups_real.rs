//! Root integration tests of the cgroup managers on this host's real hierarchy (v1 here,
//! v2 on pure-v2 hosts): limits read back, real processes, freeze, OOM, pids, teardown.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::Duration;

use oci_spec::runtime::LinuxResources;
use shoal_runtime::cgroups::{self, CgroupManager, Hierarchy};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A cgroup path no other test (or run) uses, nested one level so parents are made too.
fn unique(name: &str) -> String {
    format!("shoal-test-{name}-{}/ctr", std::process::id())
}

fn res(json: &str) -> LinuxResources {
    serde_json::from_str(json).expect("test resources parse")
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
        .trim()
        .to_string()
}

/// Where `controller`'s file for `rel` lives on this host.
fn file(controller: &str, rel: &str, name: &str) -> PathBuf {
    match cgroups::hierarchy().unwrap() {
        Hierarchy::V1 { root } => root.join(controller).join(rel).join(name),
        Hierarchy::V2 { root } => root.join(rel).join(name),
    }
}

/// Every directory that could hold the container's cgroup.
fn all_dirs(rel: &str) -> Vec<PathBuf> {
    match cgroups::hierarchy().unwrap() {
        Hierarchy::V1 { root } => cgroups::V1_CONTROLLERS
            .iter()
            .map(|c| root.join(c).join(rel))
            .collect(),
        Hierarchy::V2 { root } => vec![root.join(rel)],
    }
}

/// Check the container's cgroup is gone everywhere, then remove the test's own parent.
fn assert_gone(rel: &str) {
    for d in all_dirs(rel) {
        assert!(!d.exists(), "{} left behind", d.display());
        if let Some(parent) = d.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Destroys the cgroup and kills the child even when an assertion fails midway.
struct Cleanup<'a> {
    cg: &'a dyn CgroupManager,
    pid: Option<i32>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.cg.destroy();
        for d in all_dirs(self.cg.rel_path()) {
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

fn busy_child() -> Child {
    Command::new("/bin/busybox")
        .args(["sh", "-c", "while :; do :; done"])
        .spawn()
        .expect("spawn busybox")
}

/// Fork a child that waits for a byte on a pipe (sent once it is in the cgroup), then runs
/// `body` and exits with its result. Only async-signal-safe calls happen in the child.
fn forked_in(cg: &dyn CgroupManager, body: fn() -> i32) -> i32 {
    let mut fds = [0; 2];
    // SAFETY: plain pipe/fork/read/_exit; the child touches no locks of the parent.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::close(fds[1]);
            let mut b = 0u8;
            if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                libc::_exit(100);
            }
            libc::_exit(body());
        }
        libc::close(fds[0]);
        let added = cg.add_task(pid);
        let go = 1u8;
        libc::write(fds[1], (&go as *const u8).cast(), 1);
        libc::close(fds[1]);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        added.expect("add_task");
        status
    }
}

#[test]
fn cgroups_real_create_applies_limits_and_destroy_removes() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let rel = unique("limits");
    let swap_ok = match cgroups::hierarchy().unwrap() {
        Hierarchy::V1 { root } => root.join("memory/memory.memsw.limit_in_bytes").exists(),
        Hierarchy::V2 { .. } => true,
    };
    let swap = if swap_ok { r#", "swap": 67108864"# } else { "" };
    let json = format!(
        r#"{{"memory": {{"limit": 67108864{swap}, "reservation": 33554432}},
            "cpu": {{"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"}},
            "pids": {{"limit": 32}}}}"#
    );
    let cg = cgroups::create(&rel, Some(&res(&json))).unwrap();
    let _cleanup = Cleanup {
        cg: cg.as_ref(),
        pid: None,
    };
    match cgroups::hierarchy().unwrap() {
        Hierarchy::V1 { .. } => {
            assert_eq!(
                read(file("memory", &rel, "memory.limit_in_bytes")),
                "67108864"
            );
            if swap_ok {
                assert_eq!(
                    read(file("memory", &rel, "memory.memsw.limit_in_bytes")),
                    "67108864"
                );
            }
            assert_eq!(
                read(file("memory", &rel, "memory.soft_limit_in_bytes")),
                "33554432"
            );
            assert_eq!(read(file("cpu", &rel, "cpu.shares")), "512");
            assert_eq!(read(file("cpu", &rel, "cpu.cfs_quota_us")), "50000");
            assert_eq!(read(file("cpu", &rel, "cpu.cfs_period_us")), "100000");
            assert_eq!(read(file("cpuset", &rel, "cpuset.cpus")), "0");
        }
        Hierarchy::V2 { .. } => {
            assert_eq!(read(file("memory", &rel, "memory.max")), "67108864");
            assert_eq!(read(file("memory", &rel, "memory.swap.max")), "0");
            assert_eq!(read(file("cpu", &rel, "cpu.weight")), "20");
            assert_eq!(read(file("cpu", &rel, "cpu.max")), "50000 100000");
        }
    }
    assert_eq!(read(file("pids", &rel, "pids.max")), "32");
    let s = cg.stats().unwrap();
    assert_eq!(s.memory_limit, Some(67_108_864));
    assert_eq!(s.pids_limit, Some(32));

    // Update in place.
    if swap_ok {
        let err = cg
            .apply(&res(r#"{"memory": {"limit": 134217728}}"#))
            .unwrap_err();
        assert!(err.to_string().contains("memory+swap"), "{err}");
    }
    let raise = if swap_ok {
        r#"{"pids": {"limit": 0}, "memory": {"limit": 134217728, "swap": 134217728}}"#
    } else {
        r#"{"pids": {"limit": 0}, "memory": {"limit": 134217728}}"#
    };
    cg.apply(&res(raise)).unwrap();
    assert_eq!(read(file("pids", &rel, "pids.max")), "max");
    assert_eq!(cg.stats().unwrap().memory_limit, Some(134_217_728));

    // Another process opens it by path.
    let again = cgroups::open(&rel).unwrap();
    assert_eq!(again.rel_path(), rel);
    cg.destroy().unwrap();
    assert_gone(&rel);
    assert!(cgroups::open(&rel).is_err());
}

#[test]
fn cgroups_real_task_stats_freeze_thaw_and_destroy_kill() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let rel = unique("freeze");
    let cg = cgroups::create(&rel, None).unwrap();
    let _cleanup = Cleanup {
        cg: cg.as_ref(),
        pid: None,
    };
    let mut child = busy_child();
    let pid = child.id() as i32;
    let _kill = Cleanup {
        cg: cg.as_ref(),
        pid: Some(pid),
    };
    cg.add_task(pid).unwrap();
    assert_eq!(cg.pids().unwrap(), vec![pid]);
    sleep(Duration::from_millis(200));
    let s = cg.stats().unwrap();
    assert!(s.cpu_usage_ns > 10_000_000, "{s:?}");
    assert_eq!(s.pids_current, 1);

    cg.freeze().unwrap();
    assert!(cg.is_frozen().unwrap());
    let a = cg.stats().unwrap().cpu_usage_ns;
    sleep(Duration::from_millis(300));
    let b = cg.stats().unwrap().cpu_usage_ns;
    assert_eq!(a, b, "a frozen child made progress");

    cg.thaw().unwrap();
    assert!(!cg.is_frozen().unwrap());
    sleep(Duration::from_millis(300));
    let c = cg.stats().unwrap().cpu_usage_ns;
    assert!(
        c > b + 10_000_000,
        "a thawed child made no progress: {b} → {c}"
    );

    // Destroy a frozen cgroup: it must thaw, kill and remove.
    cg.freeze().unwrap();
    cg.destroy().unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    assert_gone(&rel);
}

#[test]
fn cgroups_real_memory_hog_is_oom_killed() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let rel = unique("oom");
    // Where the host has swap (and accounts it), memory+swap is capped too, so the hog
    // cannot escape into swap.
    let json = if swap_accounted() {
        r#"{"memory": {"limit": 33554432, "swap": 33554432}}"#
    } else {
        r#"{"memory": {"limit": 33554432}}"#
    };
    let cg = cgroups::create(&rel, Some(&res(json))).unwrap();
    let _cleanup = Cleanup {
        cg: cg.as_ref(),
        pid: None,
    };
    fn hog() -> i32 {
        const SIZE: usize = 256 << 20;
        // SAFETY: anonymous private mapping, touched page by page.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return 2;
            }
            let b = p.cast::<u8>();
            let mut off = 0;
            while off < SIZE {
                std::ptr::write_volatile(b.add(off), 1);
                off += 4096;
            }
        }
        0
    }
    let status = forked_in(cg.as_ref(), hog);
    assert!(
        libc::WIFSIGNALED(status),
        "hog survived: status {status:#x}"
    );
    assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
    let s = cg.stats().unwrap();
    assert!(s.oom_kills >= 1, "{s:?}");
    assert!(s.memory_peak > 30 << 20, "{s:?}");
    cg.destroy().unwrap();
    assert_gone(&rel);
}

fn swap_accounted() -> bool {
    match cgroups::hierarchy().unwrap() {
        Hierarchy::V1 { root } => root.join("memory/memory.memsw.limit_in_bytes").exists(),
        Hierarchy::V2 { .. } => std::fs::read_to_string("/proc/swaps")
            .map(|s| s.lines().count() > 1)
            .unwrap_or(false),
    }
}

#[test]
fn cgroups_real_pids_limit_stops_a_fork_loop() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let rel = unique("pids");
    let cg = cgroups::create(&rel, Some(&res(r#"{"pids": {"limit": 8}}"#))).unwrap();
    let _cleanup = Cleanup {
        cg: cg.as_ref(),
        pid: None,
    };
    fn fork_loop() -> i32 {
        const ATTEMPTS: i32 = 50;
        for made in 0..ATTEMPTS {
            // SAFETY: fork in a single-threaded child; grandchildren only pause.
            let p = unsafe { libc::fork() };
            if p == 0 {
                unsafe {
                    libc::pause();
                    libc::_exit(0);
                }
            }
            if p < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                return if e == Some(libc::EAGAIN) { made } else { 99 };
            }
        }
        ATTEMPTS
    }
    let status = forked_in(cg.as_ref(), fork_loop);
    assert!(libc::WIFEXITED(status), "{status:#x}");
    // The child itself is one of the 8.
    assert_eq!(libc::WEXITSTATUS(status), 7);
    // The paused grandchildren are still in the cgroup until destroy kills them.
    assert_eq!(cg.pids().unwrap().len(), 7);
    cg.destroy().unwrap();
    assert_gone(&rel);
}

#[test]
fn cgroups_real_missing_controller_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let rel = unique("missing");
    let missing = match cgroups::hierarchy().unwrap() {
        Hierarchy::V1 { root } if !root.join("hugetlb").exists() => Some((
            r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 2097152}]}"#,
            "hugetlb",
        )),
        Hierarchy::V1 { root } if !root.join("net_cls").exists() => {
            Some((r#"{"network": {"classID": 1}}"#, "net_cls"))
        }
        Hierarchy::V2 { .. } => Some((r#"{"network": {"classID": 1}}"#, "net_cls")),
        _ => None,
    };
    let Some((json, name)) = missing else {
        eprintln!("skipped: every controller is present");
        return;
    };
    let err = cgroups::create(&rel, Some(&res(json))).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!("cgroup controller \"{name}\" not available")
    );
    assert_gone(&rel);
}

#[test]
fn cgroups_real_hierarchy_matches_mounts() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let v2 = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup") && l.contains(" cgroup2 "));
    let h = cgroups::hierarchy().unwrap();
    assert_eq!(matches!(h, Hierarchy::V2 { .. }), v2, "{h:?}");
}
