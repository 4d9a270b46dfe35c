//! shoal-probe: run as a container's process, checks what the container sees and prints one
//! `ok <check>` / `FAIL <check>: <detail>` line per check; exits 1 when any check failed.
//!
//! Usage: `shoal-probe HOSTNAME` (the isolation checks), `shoal-probe hog` (allocates and touches
//! [`HOG_BYTES`], to be OOM-killed), `shoal-probe forks` (forks until fork fails; exits 0 only
//! when it failed with EAGAIN before [`MAX_FORKS`] children).

use std::ffi::CString;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::ExitCode;

/// Docker's default capability set (CapEff and CapBnd of a default `docker run`).
const DOCKER_DEFAULT_CAPS: u64 = 0x0000_0000_a804_25fb;
/// Fewest numeric /proc entries that would mean host processes are visible.
const MAX_PROC_ENTRIES: usize = 10;
/// Highest pid a fresh pid namespace with only the probe in it should show.
const MAX_VISIBLE_PID: u32 = 32;
/// Process names that only exist on a host (seeing one means the pid namespace leaks).
const HOST_DAEMONS: &[&str] = &[
    "systemd",
    "init",
    "sshd",
    "dockerd",
    "containerd",
    "cron",
    "kthreadd",
    "shoal",
];
/// How much memory `hog` allocates and touches.
const HOG_BYTES: usize = 256 << 20;
/// Most children `forks` may make before fork has to fail.
const MAX_FORKS: usize = 64;

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => println!("ok {name}"),
            Err(detail) => {
                self.failed += 1;
                println!("FAIL {name}: {detail}");
            }
        }
    }
}

fn errno() -> nix::errno::Errno {
    nix::errno::Errno::last()
}

/// Expects a call to have failed with one of `want`; `what` names the call in the detail.
fn refused(what: &str, rc: i64, want: &[nix::errno::Errno]) -> Result<(), String> {
    if rc >= 0 {
        return Err(format!("{what} succeeded (returned {rc})"));
    }
    let e = errno();
    if want.contains(&e) {
        Ok(())
    } else {
        Err(format!("{what} failed with {e}, want one of {want:?}"))
    }
}

fn status_field(name: &str) -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("no {name} in /proc/self/status"))
}

fn check_caps(field: &str) -> Result<(), String> {
    let v = status_field(field)?;
    let caps = u64::from_str_radix(&v, 16).map_err(|e| format!("{field} {v:?}: {e}"))?;
    if caps == DOCKER_DEFAULT_CAPS {
        Ok(())
    } else {
        Err(format!(
            "{field} is {caps:#018x}, want {DOCKER_DEFAULT_CAPS:#018x}"
        ))
    }
}

fn check_status_eq(field: &str, want: &str) -> Result<(), String> {
    let v = status_field(field)?;
    if v == want {
        Ok(())
    } else {
        Err(format!("{field} is {v}, want {want}"))
    }
}

fn check_pid1() -> Result<(), String> {
    let pid = std::process::id();
    if pid == 1 {
        Ok(())
    } else {
        Err(format!("getpid() is {pid}"))
    }
}

fn check_hostname(want: &str) -> Result<(), String> {
    let got = nix::unistd::gethostname().map_err(|e| format!("gethostname: {e}"))?;
    if got.to_str() == Some(want) {
        Ok(())
    } else {
        Err(format!("hostname is {got:?}, want {want:?}"))
    }
}

fn check_no_host_processes() -> Result<(), String> {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("read /proc: {e}"))? {
        let entry = entry.map_err(|e| format!("read /proc: {e}"))?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        seen.push((pid, comm.trim().to_string()));
    }
    let desc = || format!("{seen:?}");
    if seen.len() >= MAX_PROC_ENTRIES {
        return Err(format!("{} processes visible: {}", seen.len(), desc()));
    }
    if let Some((pid, _)) = seen.iter().find(|(pid, _)| *pid > MAX_VISIBLE_PID) {
        return Err(format!("pid {pid} > {MAX_VISIBLE_PID} visible: {}", desc()));
    }
    if let Some((_, comm)) = seen
        .iter()
        .find(|(_, comm)| HOST_DAEMONS.iter().any(|d| comm.starts_with(d)))
    {
        return Err(format!("host process {comm:?} visible: {}", desc()));
    }
    Ok(())
}

/// Docker's masked files (bind-mounted /dev/null); a kernel may lack some (e.g. no /proc/kcore).
const MASKED_FILES: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/timer_stats",
];
/// Docker's masked directories (an empty read-only tmpfs over them).
const MASKED_DIRS: &[&str] = &["/sys/firmware", "/proc/acpi", "/proc/scsi"];

fn check_file_masked(path: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("stat {path}: {e}"))?;
    if meta.file_type().is_char_device() {
        let null = std::fs::metadata("/dev/null").map_err(|e| format!("stat /dev/null: {e}"))?;
        if meta.rdev() != null.rdev() {
            return Err(format!("{path} is char device {:#x}", meta.rdev()));
        }
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let mut buf = [0u8; 64];
    let n = f.read(&mut buf).map_err(|e| format!("read {path}: {e}"))?;
    if n == 0 {
        Ok(())
    } else {
        Err(format!("read {n} bytes from {path}"))
    }
}

fn check_dir_masked(path: &str) -> Result<(), String> {
    let entries: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| format!("read {path}: {e}"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    if entries.is_empty() {
        Ok(())
    } else {
        Err(format!("{path} shows {entries:?}"))
    }
}

/// Each of Docker's masked paths that exists in this kernel reads as empty; the absent ones
/// (nothing to leak) are listed on an `info` line so a reader sees what was not checked.
fn check_masked_paths() -> Result<(), String> {
    let mut absent = Vec::new();
    let mut failures = Vec::new();
    for (paths, check) in [
        (
            MASKED_FILES,
            check_file_masked as fn(&str) -> Result<(), String>,
        ),
        (MASKED_DIRS, check_dir_masked),
    ] {
        for p in paths {
            if std::fs::symlink_metadata(p).is_err() {
                absent.push(*p);
            } else if let Err(e) = check(p) {
                failures.push(e);
            }
        }
    }
    println!("info masked-paths absent in this kernel: {absent:?}");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn cstr(s: &str) -> CString {
    // Only called with literals of this file, which hold no NUL.
    CString::new(s).unwrap_or_default()
}

fn check_mkdir_refused(path: &str) -> Result<(), String> {
    let p = cstr(path);
    // SAFETY: p is a valid NUL-terminated path.
    let rc = unsafe { libc::mkdir(p.as_ptr(), 0o755) };
    if rc == 0 {
        // SAFETY: as above; undo what the check made.
        unsafe { libc::rmdir(p.as_ptr()) };
    }
    refused(
        &format!("mkdir {path}"),
        rc.into(),
        &[nix::errno::Errno::EROFS, nix::errno::Errno::EPERM],
    )
}

fn check_write_refused(path: &str) -> Result<(), String> {
    let p = cstr(path);
    // SAFETY: p is a valid NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: fd was just opened by us.
        unsafe { libc::close(fd) };
    }
    refused(
        &format!("open {path} for writing"),
        fd.into(),
        &[nix::errno::Errno::EROFS, nix::errno::Errno::EPERM],
    )
}

fn check_remount_refused(target: &str) -> Result<(), String> {
    let t = cstr(target);
    // SAFETY: t is a valid path; the other pointers may be null for a remount.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND,
            std::ptr::null(),
        )
    };
    refused(
        &format!("remount {target} read-write"),
        rc.into(),
        &[nix::errno::Errno::EROFS, nix::errno::Errno::EPERM],
    )
}

fn check_mount_refused() -> Result<(), String> {
    let (src, target, fs) = (cstr("tmpfs"), cstr("/tmp"), cstr("tmpfs"));
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        // SAFETY: as above; undo the mount this check made.
        unsafe { libc::umount(target.as_ptr()) };
    }
    refused("mount tmpfs", rc.into(), &[nix::errno::Errno::EPERM])
}

fn check_unshare_refused(flag: libc::c_int, name: &str) -> Result<(), String> {
    // SAFETY: unshare takes only flags; on success the probe keeps running in the new namespace,
    // which the check then reports as a failure.
    let rc = unsafe { libc::unshare(flag) };
    refused(
        &format!("unshare({name})"),
        rc.into(),
        &[nix::errno::Errno::EPERM],
    )
}

fn check_add_key_refused() -> Result<(), String> {
    let (ty, desc) = (cstr("user"), cstr("shoal-probe"));
    let payload = b"x";
    // SAFETY: add_key(type, description, payload, plen, keyring) with valid pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            desc.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            libc::KEY_SPEC_PROCESS_KEYRING,
        )
    };
    refused("add_key", rc, &[nix::errno::Errno::EPERM])
}

fn check_keyctl_refused() -> Result<(), String> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl(JOIN_SESSION_KEYRING, NULL) joins a new anonymous keyring; no pointers read.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    refused(
        "keyctl(JOIN_SESSION_KEYRING)",
        rc,
        &[nix::errno::Errno::EPERM],
    )
}

fn check_exe_is_probe(argv0: &str) -> Result<(), String> {
    let exe =
        std::fs::read_link("/proc/1/exe").map_err(|e| format!("readlink /proc/1/exe: {e}"))?;
    let me = std::fs::canonicalize(argv0).map_err(|e| format!("canonicalize {argv0}: {e}"))?;
    if exe != me {
        return Err(format!(
            "/proc/1/exe is {}, want {}",
            exe.display(),
            me.display()
        ));
    }
    let a = std::fs::metadata("/proc/1/exe").map_err(|e| format!("stat /proc/1/exe: {e}"))?;
    let b = std::fs::metadata(&me).map_err(|e| format!("stat {}: {e}", me.display()))?;
    if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
        Ok(())
    } else {
        Err(format!("/proc/1/exe is not the file {}", me.display()))
    }
}

fn isolation(argv0: &str, hostname: &str) -> ExitCode {
    let mut r = Report { failed: 0 };
    r.check("pid1", check_pid1());
    r.check("hostname", check_hostname(hostname));
    r.check("no-host-processes", check_no_host_processes());
    r.check("cap-eff", check_caps("CapEff"));
    r.check("cap-bnd", check_caps("CapBnd"));
    r.check("no-new-privs", check_status_eq("NoNewPrivs", "1"));
    r.check("seccomp", check_status_eq("Seccomp", "2"));
    r.check("masked-paths", check_masked_paths());
    // These try mounts, remounts and writes that succeed outside a container: never try them
    // when the probe is not pid 1 (started by hand on a host), report them as not run instead.
    let guarded = std::process::id() == 1;
    let mut guard = |name: &str, f: &dyn Fn() -> Result<(), String>| {
        let result = if guarded {
            f()
        } else {
            Err("not run: the probe is not pid 1, so maybe not in a container".to_string())
        };
        r.check(name, result);
    };
    guard("sys-ro-mkdir", &|| {
        check_mkdir_refused("/sys/fs/shoal-probe")
    });
    guard("sys-ro-remount", &|| check_remount_refused("/sys"));
    guard("proc-sys-ro", &|| {
        check_write_refused("/proc/sys/kernel/domainname")
    });
    guard("mount-refused", &check_mount_refused);
    guard("unshare-newns-refused", &|| {
        check_unshare_refused(libc::CLONE_NEWNS, "CLONE_NEWNS")
    });
    guard("unshare-newuser-refused", &|| {
        check_unshare_refused(libc::CLONE_NEWUSER, "CLONE_NEWUSER")
    });
    guard("add-key-refused", &check_add_key_refused);
    guard("keyctl-refused", &check_keyctl_refused);
    r.check("exe-is-probe", check_exe_is_probe(argv0));
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn hog() -> ExitCode {
    let page = 4096;
    let mut v = vec![0u8; HOG_BYTES];
    // Touch every page so the memory is really charged to the cgroup.
    for i in (0..HOG_BYTES).step_by(page) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
    println!("hog: touched {} MiB and was not killed", HOG_BYTES >> 20);
    ExitCode::SUCCESS
}

fn forks() -> ExitCode {
    let mut children = Vec::new();
    let outcome = loop {
        if children.len() >= MAX_FORKS {
            break Err(format!("{MAX_FORKS} forks succeeded"));
        }
        // SAFETY: the probe is single-threaded; the child only calls pause and _exit.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => loop {
                // SAFETY: async-signal-safe; the child waits to be killed.
                unsafe { libc::pause() };
            },
            Ok(nix::unistd::ForkResult::Parent { child }) => children.push(child),
            Err(nix::errno::Errno::EAGAIN) => break Ok(children.len()),
            Err(e) => break Err(format!("fork failed with {e} after {}", children.len())),
        }
    };
    for c in &children {
        let _ = nix::sys::signal::kill(*c, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(*c, None);
    }
    match outcome {
        Ok(n) => {
            println!("ok forks: fork failed with EAGAIN after {n} children");
            ExitCode::SUCCESS
        }
        Err(detail) => {
            println!("FAIL forks: {detail}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `info hostname`, `info cgroup` and `info root-mount` lines, so the test can find the
/// container's id (the root mount names `<data>/containers/<id>`) and check it is gone afterwards.
fn print_identity() {
    if let Ok(h) = nix::unistd::gethostname() {
        println!("info hostname {}", h.to_string_lossy());
    }
    for l in std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
    {
        println!("info cgroup {l}");
    }
    // The root mount's options name the container's directory on the host (overlay upperdir).
    for l in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some("/"))
    {
        println!("info root-mount {l}");
    }
}

fn main() -> ExitCode {
    print_identity();
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().map(String::as_str).unwrap_or("/probe");
    match args.get(1).map(String::as_str) {
        Some("hog") => hog(),
        Some("forks") => forks(),
        Some(hostname) => isolation(argv0, hostname),
        None => {
            eprintln!("usage: shoal-probe HOSTNAME | hog | forks");
            ExitCode::from(2)
        }
    }
}
