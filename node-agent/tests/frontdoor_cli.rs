//! `shoal run|ps|stop|rm|logs|exec` as a user runs them (root, real containers): the built
//! binary, a temp `--data-dir` with a busybox image imported from a tar built here, exit codes,
//! one-line errors, and nothing left behind.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Node {
    dir: tempfile::TempDir,
    data: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let tar = dir.path().join("rootfs.tar");
        busybox_tar(&tar);
        let n = Node { dir, data };
        ok(&n.shoal(&["image", "import", tar.to_str().unwrap(), "busybox:latest"]));
        n
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
        c.args(args)
            .env("SHOAL_DATA_DIR", &self.data)
            .stdin(Stdio::null());
        c
    }

    fn shoal(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Container dirs and runtime state dirs present under the data dir.
    fn container_entries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in [
            self.data.join("containers"),
            self.data.join("containers/.runtime"),
        ] {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !n.starts_with('.') {
                        out.push(n);
                    }
                }
            }
        }
        out
    }

    fn mounts(&self) -> Vec<String> {
        let d = self.data.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&d))
            .map(String::from)
            .collect()
    }

    /// Nothing of any container is left: dirs, runtime state, cgroups of `ids`, mounts.
    fn assert_clean(&self, ids: &[&str]) {
        assert!(
            self.container_entries().is_empty(),
            "{:?}",
            self.container_entries()
        );
        for id in ids {
            assert!(cgroup_dirs(id).is_empty(), "cgroup of {id} left");
        }
        assert!(self.mounts().is_empty(), "{:?}", self.mounts());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let out = self.shoal(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = self.shoal(&["rm", "-f", id]);
        }
        let _ = &self.dir;
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Non-zero exit `code` and exactly one line on stderr, starting `shoal:` and containing `want`.
fn one_line_error(out: &Output, code: i32, want: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {} stderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("shoal: "), "{err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

fn busybox_tar(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "tmp", "root"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    b.append_data(&mut h, "etc/passwd", &passwd[..]).unwrap();
    std::fs::File::create(path)
        .unwrap()
        .write_all(&b.into_inner().unwrap())
        .unwrap();
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
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

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_streams_output_and_returns_the_exit_code() {
    let n = Node::new();
    let out = n.shoal(&[
        "run",
        "--name",
        "seven",
        "-e",
        "WHO=world",
        "--hostname",
        "boat",
        "busybox",
        "sh",
        "-c",
        "echo hello $WHO from $(hostname); exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello world from boat\n"
    );
    let ps = ok(&n.shoal(&["ps", "-a"]));
    let lines: Vec<&str> = ps.lines().collect();
    assert!(lines[0].starts_with("CONTAINER ID   IMAGE"), "{ps}");
    assert!(
        lines[1].contains("Exited (7)") && lines[1].ends_with("seven"),
        "{ps}"
    );
    assert_eq!(ok(&n.shoal(&["ps"])).lines().count(), 1, "only the header");
    assert_eq!(ok(&n.shoal(&["logs", "seven"])), "hello world from boat\n");
    let id = ok(&n.shoal(&["ps", "-aq"])).trim().to_string();
    assert_eq!(id.len(), 12);
    let full = std::fs::read_dir(n.data.join("containers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|f| f.starts_with(&id))
        .unwrap();
    assert_eq!(ok(&n.shoal(&["rm", &id[..6]])), format!("{}\n", &id[..6]));
    n.assert_clean(&[&full]);

    // --rm: gone once it returns.
    let out = n.shoal(&["run", "--rm", "busybox", "sh", "-c", "echo bye; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bye\n");
    assert_eq!(ok(&n.shoal(&["ps", "-aq"])), "");
    n.assert_clean(&[]);
}

#[test]
fn detached_ps_logs_exec_stop_rm() {
    let n = Node::new();
    let t = Instant::now();
    let id = ok(&n.shoal(&[
        "run",
        "-d",
        "--name",
        "stubborn",
        "busybox",
        "sh",
        "-c",
        "trap '' TERM; echo ready; while :; do sleep 0.05; done",
    ]))
    .trim()
    .to_string();
    assert_eq!(id.len(), 64, "{id}");
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_for("ready", || ok(&n.shoal(&["logs", "stubborn"])) == "ready\n");
    let ps = ok(&n.shoal(&["ps"]));
    assert!(ps.contains(&id[..12]) && ps.contains("Up "), "{ps}");

    let out = n.shoal(&["exec", "-e", "X=4", "stubborn", "sh", "-c", "exit $X"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = n.shoal(&["exec", "-w", "/tmp", &id[..8], "pwd"]);
    assert_eq!(ok(&out), "/tmp\n");

    // It ignores SIGTERM: stop -t 1 kills it after about a second.
    let t = Instant::now();
    assert_eq!(ok(&n.shoal(&["stop", "-t", "1", "stubborn"])), "stubborn\n");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let ps = ok(&n.shoal(&["ps", "-a"]));
    assert!(ps.contains("Exited (137)"), "{ps}");
    let out = n.shoal(&["exec", "stubborn", "true"]);
    one_line_error(&out, 125, "not running");

    // A trap that exits: stop returns at once with its code.
    ok(&n.shoal(&[
        "run",
        "-d",
        "--name",
        "polite",
        "busybox",
        "sh",
        "-c",
        "trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done",
    ]));
    wait_for("up", || ok(&n.shoal(&["logs", "polite"])) == "up\n");
    let t = Instant::now();
    ok(&n.shoal(&["stop", "polite"]));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(ok(&n.shoal(&["ps", "-a"])).contains("Exited (0)"));

    // logs -f follows until the container exits.
    ok(&n.shoal(&[
        "run",
        "-d",
        "--name",
        "counter",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo $i; sleep 0.2; done",
    ]));
    let out = n.shoal(&["logs", "-f", "counter"]);
    assert_eq!(ok(&out), "1\n2\n3\n");

    let out = n.shoal(&["rm", "stubborn", "polite", "counter"]);
    ok(&out);
    n.assert_clean(&[&id]);
}

#[test]
fn rm_force_and_detached_auto_remove() {
    let n = Node::new();
    let id = ok(&n.shoal(&["run", "-d", "busybox", "sleep", "30"]))
        .trim()
        .to_string();
    one_line_error(&n.shoal(&["rm", &id]), 1, "is running");
    ok(&n.shoal(&["rm", "-f", &id]));
    n.assert_clean(&[&id]);

    let id = ok(&n.shoal(&["run", "-d", "--rm", "busybox", "sleep", "0.3"]))
        .trim()
        .to_string();
    wait_for("auto-remove", || n.container_entries().is_empty());
    n.assert_clean(&[&id]);
}

#[test]
fn container_survives_its_caller() {
    let n = Node::new();
    let mut child = n
        .cmd(&[
            "run",
            "--name",
            "orphan",
            "busybox",
            "sh",
            "-c",
            "echo one; sleep 1; echo two",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("start", || {
        let out = n.shoal(&["logs", "orphan"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("one")
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ok(&n.shoal(&["ps"])).contains("orphan"));
    wait_for("exit", || {
        ok(&n.shoal(&["ps", "-a"])).contains("Exited (0)")
    });
    assert_eq!(ok(&n.shoal(&["logs", "orphan"])), "one\ntwo\n");
}

#[test]
fn images_in_use_are_kept() {
    let n = Node::new();
    ok(&n.shoal(&["run", "--name", "user", "busybox", "true"]));
    one_line_error(&n.shoal(&["image", "rm", "busybox"]), 1, "in use");
    let pruned = ok(&n.shoal(&["image", "prune"]));
    assert!(pruned.starts_with("Deleted 0 images"), "{pruned}");
    assert_eq!(std::fs::read_dir(n.data.join("layers")).unwrap().count(), 1);
    ok(&n.shoal(&["rm", "user"]));
    ok(&n.shoal(&["image", "rm", "busybox"]));
    assert_eq!(std::fs::read_dir(n.data.join("layers")).unwrap().count(), 0);
}

#[test]
fn bad_input_one_line_and_nothing_left() {
    let n = Node::new();
    one_line_error(&n.shoal(&["run", "--bogus", "busybox"]), 2, "--bogus");
    one_line_error(&n.shoal(&["run", "nothere", "true"]), 125, "no such image");
    one_line_error(
        &n.shoal(&["run", "--memory", "lots", "busybox", "true"]),
        125,
        "invalid --memory value",
    );
    one_line_error(
        &n.shoal(&["run", "--cpus", "0", "busybox", "true"]),
        125,
        "invalid --cpus value",
    );
    one_line_error(
        &n.shoal(&["run", "busybox", "/no/such/command"]),
        125,
        "/no/such/command",
    );
    n.assert_clean(&[]);

    let id = ok(&n.shoal(&["run", "-d", "--name", "dup", "busybox", "sleep", "30"]))
        .trim()
        .to_string();
    one_line_error(
        &n.shoal(&["run", "--name", "dup", "busybox", "true"]),
        125,
        "already in use",
    );
    one_line_error(&n.shoal(&["stop", "nosuch"]), 1, "no such container");
    one_line_error(&n.shoal(&["logs", "nosuch"]), 1, "no such container");
    one_line_error(
        &n.shoal(&["exec", "nosuch", "true"]),
        125,
        "no such container",
    );
    assert_eq!(n.container_entries().len(), 2, "only dup's dirs");

    // Not root: refused before anything is touched.
    let out = n
        .cmd(&["run", "busybox", "true"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    one_line_error(&out, 125, "must run as root");
    let out = n.cmd(&["ps"]).uid(65534).gid(65534).output().unwrap();
    one_line_error(&out, 1, "must run as root");

    ok(&n.shoal(&["rm", "-f", "dup"]));
    n.assert_clean(&[&id]);
}
