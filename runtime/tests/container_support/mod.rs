//! Fixtures for the container tests: a busybox rootfs bundle in a tempdir, unique ids, and
//! what a test must check is gone after delete.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use shoal_runtime::container::{Container, CreateOptions, LogConfig};

/// A bundle (config.json from `spec::docker_default` + busybox rootfs) and a state root.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub bundle: PathBuf,
    pub root: PathBuf,
}

/// Make `dir` a minimal root filesystem: static busybox and its applet links.
pub fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("copy /bin/busybox (install busybox-static)");
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").expect("group");
}

impl Fixture {
    /// A bundle running `args` with Docker's defaults and hostname `shoaltest`.
    pub fn new(args: &[&str]) -> Fixture {
        Fixture::with_spec(args, |_| {})
    }

    /// Like `new`, with the spec adjusted by `f` before it is written.
    pub fn with_spec(args: &[&str], f: impl FnOnce(&mut oci_spec::runtime::Spec)) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle");
        busybox_rootfs(&bundle.join("rootfs"));
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut spec = shoal_runtime::spec::docker_default(&args, &[], "shoaltest").expect("spec");
        f(&mut spec);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("json"),
        )
        .expect("write config");
        let root = dir.path().join("state");
        Fixture { dir, bundle, root }
    }

    /// The path of a log file in the fixture dir.
    pub fn log(&self) -> LogConfig {
        LogConfig {
            path: self.dir.path().join("ctr.log"),
            max_bytes: 1 << 20,
            max_files: 2,
        }
    }

    /// Create container `id` (the test binary embeds the runtime, so it is not the protected copy).
    pub fn create(&self, id: &str, log: bool) -> Container {
        let opts = CreateOptions {
            log: log.then(|| self.log()),
            allow_unprotected_exe: true,
            ..Default::default()
        };
        Container::create(&self.root, id, &self.bundle, &opts).expect("create")
    }

    pub fn log_text(&self) -> String {
        log_text(&self.dir.path().join("ctr.log"), None)
    }

    /// The lines one stream wrote.
    pub fn log_stream(&self, stream: shoal_runtime::logfile::Stream) -> String {
        log_text(&self.dir.path().join("ctr.log"), Some(stream))
    }
}

/// A container id unique to this test process.
pub fn id(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

/// Mount points currently visible to this process.
pub fn mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .map(|l| l.split(' ').nth(4).unwrap_or("").to_string())
        .collect()
}

/// Cgroup dirs named `shoal/<id>` in any mounted hierarchy.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let p = e.path().join("shoal").join(id);
            if p.exists() {
                out.push(p);
            }
        }
    }
    let v2 = Path::new("/sys/fs/cgroup/shoal").join(id);
    if v2.exists() {
        out.push(v2);
    }
    out
}

/// True when `pid` still exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The payload of a framed log file (every stream, or one), each full line with its newline.
pub fn log_text(path: &std::path::Path, only: Option<shoal_runtime::logfile::Stream>) -> String {
    let mut out = Vec::new();
    let _ = shoal_runtime::logfile::read_file(path, &mut |r| {
        if only.is_none_or(|s| s == r.stream) {
            out.extend_from_slice(r.data);
            if !r.partial {
                out.push(b'\n');
            }
        }
    });
    String::from_utf8_lossy(&out).into_owned()
}
