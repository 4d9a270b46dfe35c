//! Seccomp filters installed for real in forked children: Docker's default profile refuses
//! mount/unshare/keyctl with EPERM while ordinary work goes on; Docker-format profiles apply.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use shoal_runtime::seccomp::{self, Filter};

/// Docker's default capability set.
fn docker_caps() -> Vec<String> {
    [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Fork; the child runs `body` (async-signal-safe work only) and exits with its code.
/// Returns the raw wait status.
fn in_child(body: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes raw syscalls on memory prepared before the fork.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::_exit(body());
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        status
    }
}

fn exit_code(status: i32) -> i32 {
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn errno() -> i32 {
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Whether /proc/self/status has a "Seccomp:\t2" line, read into a stack buffer.
fn seccomp_mode_is_filter() -> bool {
    let mut buf = [0u8; 8192];
    // SAFETY: open/read/close on a literal path into a stack buffer.
    let n = unsafe {
        let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return false;
    }
    let text = &buf[..n as usize];
    let needle = b"\nSeccomp:\t2\n";
    text.windows(needle.len()).any(|w| w == needle)
}

fn set_no_new_privs() -> bool {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 }
}

#[test]
fn seccomp_default_filter_refuses_mount_unshare_keyctl_and_allows_work() {
    let filter: Filter = seccomp::compile(&seccomp::default_profile(&docker_caps())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = CString::new(dir.path().join("data").as_os_str().as_bytes()).unwrap();
    let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
    let root = nix::unistd::geteuid().is_root();

    let status = in_child(|| {
        // SAFETY: raw syscalls on CStrings built before the fork.
        unsafe {
            // As root, a mount that slipped through must not reach the host's namespace.
            if root
                && (libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0)
            {
                return 40;
            }
            if !set_no_new_privs() {
                return 41;
            }
            if filter.install().is_err() {
                return 42;
            }
            if !seccomp_mode_is_filter() {
                return 43;
            }
            let r = libc::mount(
                c"none".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            );
            if r != -1 || errno() != libc::EPERM {
                return 44;
            }
            if libc::unshare(libc::CLONE_NEWNS) != -1 || errno() != libc::EPERM {
                return 45;
            }
            // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)
            let r = libc::syscall(libc::SYS_keyctl, 0, -3, 0);
            if r != -1 || errno() != libc::EPERM {
                return 46;
            }
            if libc::getpid() <= 0 {
                return 47;
            }
            let fd = libc::open(file.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600);
            if fd < 0 {
                return 48;
            }
            if libc::write(fd, b"hello".as_ptr().cast(), 5) != 5 {
                return 49;
            }
            let mut back = [0u8; 5];
            if libc::pread(fd, back.as_mut_ptr().cast(), 5, 0) != 5 || &back != b"hello" {
                return 50;
            }
            libc::close(fd);
            // fork still works (clone without namespace flags).
            let p = libc::fork();
            if p == 0 {
                libc::_exit(7);
            }
            let mut st = 0;
            if p < 0 || libc::waitpid(p, &mut st, 0) != p || libc::WEXITSTATUS(st) != 7 {
                return 51;
            }
        }
        0
    });
    assert_eq!(exit_code(status), 0);
    assert_eq!(std::fs::read(dir.path().join("data")).unwrap(), b"hello");
}

#[test]
fn seccomp_docker_json_profile_denies_getcwd() {
    let json = r#"{
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}
        ]
    }"#;
    let filter = seccomp::compile(&seccomp::from_docker_json(json, &[]).unwrap()).unwrap();
    let status = in_child(|| {
        let mut buf = [0u8; 256];
        // SAFETY: getcwd into a stack buffer.
        unsafe {
            if libc::getcwd(buf.as_mut_ptr().cast(), buf.len()).is_null() {
                return 60;
            }
            if !set_no_new_privs() || filter.install().is_err() {
                return 61;
            }
            if !libc::getcwd(buf.as_mut_ptr().cast(), buf.len()).is_null()
                || errno() != libc::EACCES
            {
                return 62;
            }
            if libc::getpid() <= 0 {
                return 63;
            }
        }
        0
    });
    assert_eq!(exit_code(status), 0);

    // The KILL_PROCESS entry kills with SIGSYS.
    let status = in_child(|| {
        if !set_no_new_privs() || filter.install().is_err() {
            return 70;
        }
        // SAFETY: getppid has no arguments.
        unsafe { libc::getppid() };
        71
    });
    assert!(libc::WIFSIGNALED(status), "status {status:#x}");
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
}

#[test]
fn seccomp_install_without_no_new_privs_needs_cap_sys_admin() {
    let filter = seccomp::compile(&seccomp::default_profile(&docker_caps())).unwrap();
    let root = nix::unistd::geteuid().is_root();
    let status = in_child(|| match filter.install() {
        Ok(()) if seccomp_mode_is_filter() => 0,
        Ok(()) => 80,
        Err(_) => 81,
    });
    // Root holds CAP_SYS_ADMIN, so the kernel takes the filter without no_new_privs;
    // anyone else gets EACCES.
    assert_eq!(exit_code(status), if root { 0 } else { 81 });
}
