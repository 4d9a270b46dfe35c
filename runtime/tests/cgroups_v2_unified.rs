//! The v2 manager on a real cgroup2 filesystem: the hybrid host's /sys/fs/cgroup/unified
//! (no controllers bound there except what v1 left free), or /sys/fs/cgroup on pure v2.
//! Core v2 features work on either: cgroup.procs, cgroup.freeze, cgroup.events,
//! cgroup.kill, cpu.stat; controller enabling is exercised with whatever the root offers.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use oci_spec::runtime::LinuxResources;
use shoal_runtime::cgroups::{self, CgroupError, Hierarchy};

fn v2_root() -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(Path::new)
        .find(|p| matches!(cgroups::detect(p), Ok(Hierarchy::V2 { .. })))
        .map(Path::to_path_buf)
}

fn res(json: &str) -> LinuxResources {
    serde_json::from_str(json).expect("test resources parse")
}

fn controllers(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Stats once the cgroup has used more than `ns` of CPU, or the last ones after a bound.
fn wait_cpu(cg: &dyn cgroups::CgroupManager, ns: u64) -> cgroups::CgroupStats {
    const TRIES: usize = 100;
    let mut s = cg.stats().unwrap();
    for _ in 0..TRIES {
        if s.cpu_usage_ns > ns {
            break;
        }
        sleep(Duration::from_millis(50));
        s = cg.stats().unwrap();
    }
    s
}

#[test]
fn cgroups_v2_real_task_freeze_stats_kill() {
    let Some(root) = v2_root() else {
        eprintln!("skipped: needs root and a cgroup2 mount");
        return;
    };
    let h = Hierarchy::V2 { root: root.clone() };
    let rel = format!("shoal-test-v2-freeze-{}/ctr", std::process::id());
    let cg = cgroups::create_in(&h, &rel, None).unwrap();
    let mut child = Command::new("/bin/busybox")
        .args(["sh", "-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Kill the spinner even if an assertion below fails.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let _kill = KillOnDrop(pid);
    cg.add_task(pid).unwrap();
    assert_eq!(cg.pids().unwrap(), vec![pid]);
    // A loaded machine may give the spinner little CPU: wait (bounded) for it to use some.
    let s = wait_cpu(&*cg, 10_000_000);
    assert!(s.cpu_usage_ns > 10_000_000, "{s:?}");

    cg.freeze().unwrap();
    assert!(cg.is_frozen().unwrap());
    let a = cg.stats().unwrap().cpu_usage_ns;
    sleep(Duration::from_millis(300));
    let b = cg.stats().unwrap().cpu_usage_ns;
    assert_eq!(a, b, "frozen child made progress");
    cg.thaw().unwrap();
    // cgroup.events lags the write by a moment.
    sleep(Duration::from_millis(300));
    assert!(!cg.is_frozen().unwrap());
    let c = wait_cpu(&*cg, b + 10_000_000).cpu_usage_ns;
    assert!(
        c > b + 10_000_000,
        "thawed child made no progress: {b} → {c}"
    );

    cg.freeze().unwrap();
    cg.destroy().unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(!root.join(&rel).exists());
    let _ = std::fs::remove_dir(root.join(&rel).parent().unwrap());
}

#[test]
fn cgroups_v2_real_missing_controller_and_enabling() {
    let Some(root) = v2_root() else {
        eprintln!("skipped: needs root and a cgroup2 mount");
        return;
    };
    let h = Hierarchy::V2 { root: root.clone() };
    let have = controllers(&root);
    let rel = format!("shoal-test-v2-ctl-{}/ctr", std::process::id());
    if !have.iter().any(|c| c == "memory") {
        let err = cgroups::create_in(&h, &rel, Some(&res(r#"{"memory": {"limit": 1048576}}"#)))
            .err()
            .unwrap();
        assert!(matches!(err, CgroupError::ControllerMissing(ref c) if c == "memory"));
        assert_eq!(
            err.to_string(),
            "cgroup controller \"memory\" not available"
        );
        assert!(!root.join(&rel).exists());
        assert!(!root.join(&rel).parent().unwrap().exists());
    }
    // Enable a controller the root offers through every ancestor, then set a limit with it.
    let hugetlb = have.iter().any(|c| c == "hugetlb")
        && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
    if !hugetlb {
        eprintln!(
            "hugetlb not offered on {}: enabling not exercised",
            root.display()
        );
        return;
    }
    let root_ctl = root.join("cgroup.subtree_control");
    let before = std::fs::read_to_string(&root_ctl).unwrap();
    let cg = cgroups::create_in(
        &h,
        &rel,
        Some(&res(
            r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}]}"#,
        )),
    )
    .unwrap();
    let parent = root.join(&rel).parent().unwrap().to_path_buf();
    assert!(std::fs::read_to_string(&root_ctl)
        .unwrap()
        .contains("hugetlb"));
    assert!(
        std::fs::read_to_string(parent.join("cgroup.subtree_control"))
            .unwrap()
            .contains("hugetlb")
    );
    assert_eq!(
        std::fs::read_to_string(root.join(&rel).join("hugetlb.2MB.max"))
            .unwrap()
            .trim(),
        "4194304"
    );
    cg.destroy().unwrap();
    assert!(!root.join(&rel).exists());
    // Leave the shared parents as we found them where no other test uses them.
    let _ = std::fs::write(parent.join("cgroup.subtree_control"), "-hugetlb");
    let _ = std::fs::remove_dir(&parent);
    if !before.contains("hugetlb") {
        let _ = std::fs::write(&root_ctl, "-hugetlb");
    }
}

/// open(2) of `path` with `flags` from a forked child placed in `cg`: 0 or the errno.
fn open_in_cgroup(cg: &dyn cgroups::CgroupManager, path: &std::ffi::CStr, flags: i32) -> i32 {
    let mut fds = [0; 2];
    // SAFETY: pipe/fork/read/open/_exit only; the child uses memory prepared before fork.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            libc::close(fds[1]);
            let mut b = 0u8;
            if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                libc::_exit(200);
            }
            let fd = libc::open(path.as_ptr(), flags);
            if fd >= 0 {
                libc::_exit(0);
            }
            libc::_exit(*libc::__errno_location());
        }
        libc::close(fds[0]);
        let added = cg.add_task(pid);
        libc::write(fds[1], [1u8].as_ptr().cast(), 1);
        libc::close(fds[1]);
        let mut st = 0;
        assert_eq!(libc::waitpid(pid, &mut st, 0), pid);
        added.unwrap();
        assert!(libc::WIFEXITED(st));
        libc::WEXITSTATUS(st)
    }
}

#[test]
fn cgroups_v2_real_device_rules_are_enforced_by_ebpf() {
    let Some(root) = v2_root() else {
        eprintln!("skipped: needs root and a cgroup2 mount");
        return;
    };
    let h = Hierarchy::V2 { root: root.clone() };
    let rel = format!("shoal-test-v2-dev-{}/ctr", std::process::id());
    // Deny everything, then /dev/null rw, /dev/zero read-only.
    let cg = cgroups::create_in(
        &h,
        &rel,
        Some(&res(r#"{"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "r"}
            ]}"#)),
    )
    .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(open_in_cgroup(cg.as_ref(), c"/dev/null", libc::O_RDWR), 0);
        assert_eq!(open_in_cgroup(cg.as_ref(), c"/dev/zero", libc::O_RDONLY), 0);
        assert_eq!(
            open_in_cgroup(cg.as_ref(), c"/dev/zero", libc::O_WRONLY),
            libc::EPERM
        );
        assert_eq!(
            open_in_cgroup(cg.as_ref(), c"/dev/full", libc::O_RDONLY),
            libc::EPERM
        );
        // Updating replaces the program: now /dev/full is readable too.
        cg.apply(&res(r#"{"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "access": "r"}
            ]}"#))
            .unwrap();
        assert_eq!(open_in_cgroup(cg.as_ref(), c"/dev/full", libc::O_RDONLY), 0);
        assert_eq!(
            open_in_cgroup(cg.as_ref(), c"/dev/null", libc::O_WRONLY),
            libc::EPERM
        );
    }));
    cg.destroy().unwrap();
    let _ = std::fs::remove_dir(root.join(&rel).parent().unwrap());
    assert!(!root.join(&rel).exists());
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}
