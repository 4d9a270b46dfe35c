//! Fixtures for the front-door tests: a data dir in a tempdir holding a busybox image imported
//! from a rootfs tar built here from /bin/busybox, and checks that nothing is left behind.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_runtime::frontdoor::{FrontDoor, RunOptions};
use shoal_runtime::image::ImageStore;

/// The image every test runs.
pub const IMAGE: &str = "busybox:test";
/// What the image's `/etc/motd` says.
pub const MOTD: &str = "hello from the image\n";

/// A rootfs tar: static busybox with its applet links, passwd/group with an `app` user, motd.
pub fn busybox_tar(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty()).expect("dir");
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).expect("file");
    };
    for d in ["bin", "etc", "tmp", "root", "home", "home/app"] {
        dir(&mut b, d);
    }
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");
    file(&mut b, "bin/busybox", 0o755, &busybox);
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("link");
    }
    file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    );
    file(&mut b, "etc/group", 0o644, b"root:x:0:\napp:x:1000:\n");
    file(&mut b, "etc/motd", 0o644, MOTD.as_bytes());
    std::fs::File::create(path)
        .expect("create tar")
        .write_all(&b.into_inner().expect("tar"))
        .expect("write tar");
}

/// A data dir with the busybox image, and the front door over it.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub fd: FrontDoor,
}

impl Node {
    pub fn new() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let tar = dir.path().join("rootfs.tar");
        busybox_tar(&tar);
        ImageStore::open(&data)
            .expect("store")
            .import_rootfs_tar(&tar, IMAGE)
            .expect("import");
        let fd = FrontDoor::open(&data)
            .expect("front door")
            .allow_unprotected_exe();
        Node { dir, data, fd }
    }

    /// Run `cmd` in the image to its end: (exit code, output).
    pub fn run(&self, cmd: &[&str], f: impl FnOnce(&mut RunOptions)) -> (i32, String, String) {
        let mut opts = opts(cmd);
        f(&mut opts);
        let mut c = self.fd.run(&opts).expect("run");
        let status = c.container.wait().expect("wait");
        let log = self.log(&c.record.id);
        (status.shell_code(), log, c.record.id)
    }

    /// Start `cmd` detached; returns the id.
    pub fn start(&self, cmd: &[&str], f: impl FnOnce(&mut RunOptions)) -> String {
        let mut opts = opts(cmd);
        f(&mut opts);
        self.fd.run(&opts).expect("run").record.id
    }

    pub fn log(&self, id: &str) -> String {
        self.fd
            .log_files(id)
            .iter()
            .map(|p| {
                let mut out = Vec::new();
                let _ = shoal_runtime::logfile::read_file(p, &mut |r| {
                    out.extend_from_slice(r.data);
                    if !r.partial {
                        out.push(b'\n');
                    }
                });
                String::from_utf8_lossy(&out).into_owned()
            })
            .collect()
    }

    /// Wait until the log of `id` contains `what`.
    pub fn wait_log(&self, id: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log(id).contains(what) {
            assert!(
                Instant::now() < deadline,
                "log of {id} never said {what:?}: {:?}",
                self.log(id)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything a container leaves on the host, by id: its dirs, runtime state, cgroups,
    /// mounts naming its dir.
    pub fn traces(&self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let cdir = self.fd.container_dir(id);
        if cdir.exists() {
            out.push(cdir.display().to_string());
        }
        let rdir = self.fd.runtime_root().join(id);
        if rdir.exists() {
            out.push(rdir.display().to_string());
        }
        out.extend(cgroup_dirs(id).iter().map(|p| p.display().to_string()));
        out.extend(mounts_under(&self.data));
        out
    }

    /// Container dirs and runtime state dirs present.
    pub fn container_entries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in [
            self.data.join("containers"),
            self.fd.runtime_root().to_path_buf(),
        ] {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !n.starts_with('.') {
                        out.push(e.path().display().to_string());
                    }
                }
            }
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(list) = self.fd.list(true) {
            for c in list {
                let _ = self.fd.remove(&c.record.id, true);
            }
        }
    }
}

/// Options running `cmd` in the test image.
pub fn opts(cmd: &[&str]) -> RunOptions {
    RunOptions {
        image: IMAGE.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Mount points (as this process sees them) under `dir`, or overlays naming it.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(&d))
        .map(String::from)
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

/// True when `pid` exists and is not a zombie.
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
