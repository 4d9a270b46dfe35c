//! The in-container probe (issue 2): `shoal-probe` runs as the process of a real container started
//! with `shoal run` and Docker's defaults, and asserts what it sees from inside; then the memory
//! and pids limits, with the probe's `hog` and `forks` modes. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shoal_tests::testbed::shoal_bin;

/// Every check the probe's isolation mode reports; each must come back `ok`.
const PROBE_CHECKS: &[&str] = &[
    "pid1",
    "hostname",
    "no-host-processes",
    "cap-eff",
    "cap-bnd",
    "no-new-privs",
    "seccomp",
    "masked-paths",
    "sys-ro-mkdir",
    "sys-ro-remount",
    "proc-sys-ro",
    "mount-refused",
    "unshare-newns-refused",
    "unshare-newuser-refused",
    "add-key-refused",
    "keyctl-refused",
    "exe-is-probe",
];
/// Top-level host directories that merged-/usr systems make symlinks (replicated in the rootfs).
const MERGED_USR_LINKS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Exit status of a container killed by SIGKILL (the OOM killer), as Docker reports it.
const OOM_EXIT: i32 = 137;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?} -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The libraries `ldd` lists for `bin`, the dynamic loader included.
fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("ldd").arg(bin));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !text.contains("not a dynamic executable") {
        panic!("ldd {} failed", bin.display());
    }
    text.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// Copies `src` into `root` at the same absolute path.
fn copy_into(root: &Path, src: &Path) {
    let rel = src.strip_prefix("/").expect("absolute path");
    let dst = root.join(rel);
    std::fs::create_dir_all(dst.parent().expect("has a parent")).expect("mkdir");
    std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// A rootfs tar with the probe at /probe, its libraries and busybox; returns the tar's path.
fn build_image_tar(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["usr", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for name in MERGED_USR_LINKS {
        let host = Path::new("/").join(name);
        if let Ok(target) = std::fs::read_link(&host) {
            if target.is_relative() {
                std::fs::create_dir_all(root.join(&target)).expect("mkdir link target");
            }
            std::os::unix::fs::symlink(&target, root.join(name)).expect("symlink");
        }
    }
    let probe = Path::new(env!("CARGO_BIN_EXE_shoal-probe"));
    std::fs::copy(probe, root.join("probe")).expect("copy probe");
    for lib in shared_libraries(probe) {
        copy_into(&root, &lib);
    }
    std::fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("symlink sh");
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");

    let tar_path = dir.join("probe.tar");
    let file = std::fs::File::create(&tar_path).expect("create tar");
    let mut b = tar::Builder::new(file);
    b.follow_symlinks(false);
    b.append_dir_all(".", &root).expect("tar rootfs");
    b.finish().expect("finish tar");
    tar_path
}

/// A data dir with the probe image imported as `reference`.
struct Fixture {
    dir: tempfile::TempDir,
    shoal: PathBuf,
}

impl Fixture {
    fn new(reference: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let shoal = shoal_bin().expect("shoal binary");
        let tar = build_image_tar(dir.path());
        let out = run(self_cmd(&shoal, dir.path())
            .args(["image", "import"])
            .arg(&tar)
            .arg(reference));
        assert!(out.status.success(), "image import failed");
        Fixture { dir, shoal }
    }

    fn shoal(&self) -> Command {
        self_cmd(&self.shoal, self.dir.path())
    }

    /// `shoal run ARGS` against this data dir.
    fn run_container(&self, args: &[&str]) -> Output {
        run(self.shoal().arg("run").args(args))
    }

    /// Asserts nothing of the run is left: no container, no cgroup named after one.
    fn assert_clean(&self, ids: &[String]) {
        let out = run(self.shoal().args(["ps", "-a", "-q"]));
        assert!(out.status.success(), "ps failed");
        let left = String::from_utf8_lossy(&out.stdout);
        assert!(left.trim().is_empty(), "containers left: {left}");
        for cg in shoal_cgroup_dirs() {
            if let Some(name) = cg.file_name().and_then(|n| n.to_str()) {
                assert!(
                    !ids.iter().any(|id| name == id),
                    "cgroup left: {}",
                    cg.display()
                );
            }
        }
        for id in ids {
            let dir = self.dir.path().join("data/containers").join(id);
            assert!(!dir.exists(), "container dir left: {}", dir.display());
        }
    }
}

fn self_cmd(shoal: &Path, dir: &Path) -> Command {
    let mut c = Command::new(shoal);
    c.env("SHOAL_DATA_DIR", dir.join("data"));
    c
}

/// Every `shoal/<id>` cgroup directory on this host, in v1 controllers and the v2 hierarchy.
fn shoal_cgroup_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    for r in roots {
        if let Ok(rd) = std::fs::read_dir(r.join("shoal")) {
            dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    dirs
}

/// The run's container id, from the probe's `info root-mount` line (the overlay upperdir is
/// `<data>/containers/<id>/upper`).
fn container_id(stdout: &str) -> String {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("info root-mount "))
        .flat_map(|l| l.split(','))
        .filter_map(|opt| opt.strip_prefix("upperdir="))
        .filter_map(|up| up.strip_suffix("/upper"))
        .filter_map(|dir| {
            dir.rsplit_once("/containers/")
                .map(|(_, id)| id.to_string())
        })
        .find(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no container id in the probe's output:\n{stdout}"))
}

#[test]
fn probe_sees_docker_default_isolation() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Fixture::new("probe-iso:1");
    let out = f.run_container(&[
        "--rm",
        "--hostname",
        "probe-host",
        "probe-iso:1",
        "/probe",
        "probe-host",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&&str> = PROBE_CHECKS
        .iter()
        .filter(|c| !stdout.lines().any(|l| l == format!("ok {c}")))
        .collect();
    assert!(
        missing.is_empty() && out.status.code() == Some(0),
        "probe failed ({}), checks not ok: {missing:?}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    f.assert_clean(&[container_id(&stdout)]);
}

#[test]
fn probe_is_held_to_memory_and_pids_limits() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Fixture::new("probe-limits:1");
    let mut ids = Vec::new();
    let out = f.run_container(&["--rm", "--memory", "32m", "probe-limits:1", "/probe", "hog"]);
    assert_eq!(
        out.status.code(),
        Some(OOM_EXIT),
        "hog under --memory 32m should be OOM-killed\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ids.push(container_id(&String::from_utf8_lossy(&out.stdout)));

    let out = f.run_container(&[
        "--rm",
        "--pids-limit",
        "16",
        "probe-limits:1",
        "/probe",
        "forks",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "forks under --pids-limit 16 should hit EAGAIN\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ids.push(container_id(&String::from_utf8_lossy(&out.stdout)));
    f.assert_clean(&ids);
}
