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

/// shoal's own binds (`-v`, `--mount`, volumes) are made from the path checked on the host:
/// the init walks it without following a symlink, so a component swapped for a symlink after
/// the check (here: one there from the start) is refused rather than followed; a plain OCI
/// bind mount follows it as runc does.
#[test]
fn a_checked_bind_source_is_not_followed_through_a_symlink() {
    let host = tempfile::tempdir().expect("tempdir");
    let real = host.path().join("real");
    std::fs::create_dir_all(real.join("sub")).expect("mkdir");
    std::fs::write(real.join("sub/f"), "host file\n").expect("write");
    std::os::unix::fs::symlink(&real, host.path().join("link")).expect("symlink");
    let source = host.path().join("link/sub");
    let bind = |nofollow: bool| {
        let mut options = vec!["bind".to_string(), "nosuid".into(), "nodev".into()];
        if nofollow {
            options.push(shoal_runtime::volume::OPT_SOURCE_NOFOLLOW.into());
        }
        let source = source.clone();
        move |spec: &mut oci_spec::runtime::Spec| {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination("/x")
                    .typ("bind")
                    .source(source)
                    .options(options)
                    .build()
                    .expect("mount"),
            );
            spec.set_mounts(Some(mounts));
        }
    };
    let before = container_support::mounts();
    let fx = Fixture::with_spec(&["cat", "/x/f"], bind(true));
    let opts = CreateOptions {
        allow_unprotected_exe: true,
        ..Default::default()
    };
    let strict = id("nofollow");
    let err = match Container::create(&fx.root, &strict, &fx.bundle, &opts) {
        Ok(c) => {
            // Removed before failing: nothing of the test outlives it.
            let _ = c.delete(true);
            panic!("a bind source through a symlink was followed");
        }
        Err(e) => e,
    };
    assert!(
        err.to_string()
            .contains("is now a symlink or not a directory; it is not followed"),
        "{err}"
    );
    assert!(!fx.root.join(&strict).exists());
    assert!(container_support::cgroup_dirs(&strict).is_empty());
    assert_eq!(container_support::mounts(), before);

    // The same mount without the option follows the link (runc's behaviour).
    let fx = Fixture::with_spec(&["cat", "/x/f"], bind(false));
    let plain = id("follow");
    let mut c = fx.create(&plain, true);
    c.start().expect("start");
    let status = c.wait_timeout(WAIT).expect("wait").expect("exited");
    assert_eq!(status.shell_code(), 0);
    assert_eq!(fx.log_text(), "host file\n");
    c.delete(true).expect("delete");
    assert_eq!(container_support::mounts(), before);
}
