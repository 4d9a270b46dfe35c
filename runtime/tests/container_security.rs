//! The CVE classes the runtime must not reopen: CVE-2019-5736 (the runtime binary writable
//! through /proc/<pid>/exe from inside) and CVE-2024-21626 (a host fd leaked into the
//! container, reachable as cwd or through /proc/self/fd).

use crate::container_support;

use std::os::fd::AsRawFd;
use std::time::Duration;

use container_support::{id, Fixture};
use shoal_runtime::container::{Container, ContainerError, CreateOptions, ExecOptions};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));
/// Where the test parks a host directory fd without close-on-exec.
const LEAKED_FD: i32 = 200;

fn leak_host_dir_fd() {
    let f = std::fs::File::open("/").expect("open /");
    // dup2 clears close-on-exec on the new fd: a careless runtime would pass it on.
    nix::unistd::dup2(f.as_raw_fd(), LEAKED_FD).expect("dup2");
}

#[test]
fn no_host_fd_reaches_the_container() {
    leak_host_dir_fd();
    let fx = Fixture::new(&["sh", "-c", "ls /proc/self/fd; ls /proc/1/fd"]);
    let mut c = fx.create(&id("fds"), true);
    c.start().expect("start");
    assert_eq!(
        c.wait_timeout(WAIT).expect("wait").expect("exited").code,
        Some(0)
    );
    let log = fx.log_text();
    let fds: Vec<&str> = log.split_whitespace().collect();
    assert!(
        !fds.contains(&LEAKED_FD.to_string().as_str()),
        "leaked fd visible: {log}"
    );
    assert!(
        fds.iter().all(|f| f.parse::<i32>().is_ok_and(|n| n <= 3)),
        "only stdio (+ ls's own dir fd): {log}"
    );
    c.delete(false).expect("delete");
}

#[test]
fn cwd_through_a_leaked_fd_is_refused() {
    leak_host_dir_fd();
    let fx = Fixture::with_spec(&["sh", "-c", "ls"], |spec| {
        let mut p = spec.process().clone().expect("process");
        p.set_cwd(format!("/proc/self/fd/{LEAKED_FD}").into());
        spec.set_process(Some(p));
    });
    let mut c = fx.create(&id("cwd"), true);
    let err = c.start().expect_err("start must fail");
    assert!(
        matches!(err, ContainerError::Start(ref m) if m.contains("cwd")),
        "{err}"
    );
    assert!(fx.log_text().is_empty(), "the process never ran");
    c.delete(true).expect("delete");
}

#[test]
fn runtime_binary_not_writable_from_inside() {
    // The test binary embeds the runtime; run the real check from its protected copy, the way
    // `shoal` re-executes itself before creating containers.
    let copy = shoal_runtime::exe::protected_copy().expect("protected copy");
    let out = std::process::Command::new(&copy)
        .args([
            "--exact",
            "container_security::cve_2019_5736_inner",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SHOAL_CVE_INNER", "1")
        .output()
        .expect("run protected copy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("inner ok"), "{text}");
}

/// Runs only from `runtime_binary_not_writable_from_inside` (from the protected copy).
#[test]
#[ignore = "run by runtime_binary_not_writable_from_inside"]
fn cve_2019_5736_inner() {
    if std::env::var_os("SHOAL_CVE_INNER").is_none() {
        return;
    }
    assert!(
        shoal_runtime::exe::is_protected(),
        "running from the immutable copy"
    );
    let fx = Fixture::new(&["sleep", "30"]);
    let opts = CreateOptions::default();
    let mut c = Container::create(&fx.root, &id("cve5736"), &fx.bundle, &opts).expect("create");
    // Before start the init is a fork of the runtime: its exe is the runtime binary.
    let exe = std::fs::read_link(format!("/proc/{}/exe", c.pid())).expect("readlink");
    assert!(
        exe.starts_with(shoal_runtime::exe::PROTECTED_EXE_DIR),
        "{}",
        exe.display()
    );

    // From the host, as root: an O_PATH handle kept and reopened for writing later (the
    // original attack) fails, and so does a direct open.
    let path_fd = nix::fcntl::open(
        format!("/proc/{}/exe", c.pid()).as_str(),
        nix::fcntl::OFlag::O_PATH,
        nix::sys::stat::Mode::empty(),
    )
    .expect("O_PATH");
    let reopen = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{path_fd}"));
    assert_eq!(
        reopen.err().and_then(|e| e.raw_os_error()),
        Some(libc::EPERM)
    );
    assert!(std::fs::OpenOptions::new()
        .append(true)
        .open(format!("/proc/{}/exe", c.pid()))
        .is_err());

    // From inside the container: no visible process's exe can be opened for writing.
    let probe = "for p in /proc/[0-9]*; do if echo x >> $p/exe; then echo wrote $p; exit 1; fi; done 2>/dev/null; exit 0";
    let inside = c
        .exec(&ExecOptions {
            args: vec!["sh".into(), "-c".into(), probe.into()],
            ..Default::default()
        })
        .expect("exec");
    assert_eq!(
        inside.wait().and_then(|s| s.code),
        Some(0),
        "a process inside wrote an exe"
    );
    c.start().expect("start");
    c.kill(libc::SIGKILL).expect("kill");
    c.wait_timeout(WAIT).expect("wait");
    // Even after every process is gone, the kept handle cannot be reopened for writing.
    let reopen = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{path_fd}"));
    assert!(reopen.is_err());
    let _ = nix::unistd::close(path_fd);
    c.delete(true).expect("delete");
    println!("inner ok");
}
