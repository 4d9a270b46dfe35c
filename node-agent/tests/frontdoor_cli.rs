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
    /// Extra environment for every command (a bridge of the test's own).
    env: Vec<(&'static str, String)>,
}

impl Node {
    fn new() -> Node {
        Node::in_dir(tempfile::tempdir().unwrap())
    }

    /// A node whose data dir is made by `shoal image import` in `dir`.
    fn in_dir(dir: tempfile::TempDir) -> Node {
        let data = dir.path().join("data");
        let tar = dir.path().join("rootfs.tar");
        busybox_tar(&tar);
        let n = Node {
            dir,
            data,
            env: Vec::new(),
        };
        ok(&n.shoal(&["image", "import", tar.to_str().unwrap(), "busybox:latest"]));
        n
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
        c.args(args)
            .env("SHOAL_DATA_DIR", &self.data)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Containers of this node go on a bridge of their own, so the test sees it come and go.
    fn with_bridge(mut self, name: &str, subnet: &str) -> Node {
        self.env.push(("SHOAL_BRIDGE", name.to_string()));
        self.env.push(("SHOAL_BRIDGE_SUBNET", subnet.to_string()));
        self
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
    let json: serde_json::Value =
        serde_json::from_str(&ok(&n.shoal(&["ps", "-a", "--format", "json"]))).unwrap();
    assert_eq!(json[0]["Names"], "seven", "{json}");
    assert!(
        json[0]["Status"]
            .as_str()
            .unwrap()
            .starts_with("Exited (7)"),
        "{json}"
    );
    assert_eq!(json[0]["ID"].as_str().unwrap().len(), 64, "{json}");
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
fn logs_keep_stdout_and_stderr_apart() {
    let n = Node::new();
    let script = "echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2";
    // Foreground: each stream to its own.
    let out = n.shoal(&["run", "--name", "both", "busybox", "sh", "-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out-1\nout-2\n",
        "{out:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "err-1\nerr-2\n",
        "{out:?}"
    );
    // `logs` afterwards, and `logs -f` of a detached one.
    let out = n.shoal(&["logs", "both"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out-1\nout-2\n",
        "{out:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "err-1\nerr-2\n",
        "{out:?}"
    );
    ok(&n.shoal(&[
        "run",
        "-d",
        "--name",
        "later",
        "busybox",
        "sh",
        "-c",
        "sleep 0.3; echo out-3; echo err-3 >&2",
    ]));
    let out = n.shoal(&["logs", "-f", "later"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-3\n", "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err-3\n", "{out:?}");
    ok(&n.shoal(&["rm", "both", "later"]));
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
fn the_data_dir_layers_and_containers_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // The data dir's parent is open to everyone, as /var/lib is: only the data dir's own
    // modes keep other local users out of the image files.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let n = Node::in_dir(dir);
    assert_eq!(mode(&n.data), 0o700, "the data dir `image import` made");
    assert_eq!(mode(&n.data.join("layers")), 0o700);
    let id = ok(&n.shoal(&["run", "-d", "busybox", "sleep", "1000"]))
        .trim()
        .to_string();
    assert_eq!(mode(&n.data.join("containers")), 0o700);
    assert_eq!(mode(&n.data.join("containers").join(&id)), 0o700);
    // The container's `/` (its writable layer's mode) stays open to its own users.
    ok(&n.shoal(&[
        "exec",
        &id,
        "sh",
        "-c",
        "echo secret > /tmp/f && chmod 4755 /tmp/f",
    ]));
    assert_eq!(
        ok(&n.shoal(&["exec", &id, "stat", "-c", "%a", "/"])).trim(),
        "755"
    );
    let layer = std::fs::read_dir(n.data.join("layers"))
        .unwrap()
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .expect("an unpacked layer")
        .path();
    let upper_file = n.data.join("containers").join(&id).join("upper/tmp/f");
    assert!(
        upper_file.is_file(),
        "the container's file is in its writable layer"
    );
    // Another local user reaches neither a layer's files nor a container's (a setuid file
    // there would be a root shell for them).
    for p in [layer.join("rootfs/bin/busybox"), upper_file] {
        let out = Command::new("/bin/busybox")
            .args(["cat", p.to_str().unwrap()])
            .uid(65534)
            .gid(65534)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "uid 65534 read {}", p.display());
    }
    // Dirs found wider (an older shoal made them) are narrowed by the next command.
    for d in ["", "layers", "containers"] {
        std::fs::set_permissions(n.data.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    ok(&n.shoal(&["image", "ls"]));
    ok(&n.shoal(&["ps"]));
    for d in ["", "layers", "containers"] {
        assert_eq!(mode(&n.data.join(d)), 0o700, "{d}");
    }
    ok(&n.shoal(&["rm", "-f", &id]));
    n.assert_clean(&[&id]);
}

#[test]
fn bad_input_one_line_and_nothing_left() {
    let n = Node::new();
    // A usage error: clap's whole message (what is wrong, the usage line), exit 2.
    let out = n.shoal(&["run", "--bogus", "busybox"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("shoal: unexpected argument '--bogus'") && err.contains("Usage: shoal run"),
        "{err}"
    );
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

/// A free TCP port on this host (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET /` at `addr`, if it answers.
fn http_get(addr: &str) -> Option<String> {
    use std::io::Read;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

fn links() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

fn nft_tables() -> String {
    String::from_utf8(
        Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

impl Node {
    /// The network namespaces this node's containers hold (by the owner file beside each;
    /// other tests' containers have namespaces there too).
    fn netns_files(&self) -> Vec<String> {
        let data = self.data.display().to_string();
        let mut v: Vec<String> = std::fs::read_dir("/run/shoal/netns")
            .map(|d| {
                d.flatten()
                    .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&data)))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

const WEB: &str = "echo hello-net > /tmp/index.html; exec httpd -f -p 80 -h /tmp";

#[test]
fn bridge_networking_publishes_ports_and_leaves_nothing() {
    let (bridge, table) = ("shtfd1", "shoal_shtfd1");
    let n = Node::new().with_bridge(bridge, "10.214.1.0/24");
    let port = free_port().to_string();
    let id = ok(&n.shoal(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &format!("{port}:80"),
        "busybox",
        "sh",
        "-c",
        WEB,
    ]))
    .trim()
    .to_string();
    // From this host, through the output chain and the bridge (hairpin via 127.0.0.1).
    let local = format!("127.0.0.1:{port}");
    wait_for("the published port", || {
        http_get(&local).as_deref() == Some("hello-net\n")
    });
    let ps = ok(&n.shoal(&["ps"]));
    assert!(ps.contains(&format!("0.0.0.0:{port}->80/tcp")), "{ps}");
    assert!(links().contains(bridge), "{}", links());

    // Inside: lo and eth0 up, an address from the subnet, a default route, /etc files.
    let addr = ok(&n.shoal(&["exec", "web", "ip", "-o", "-4", "addr", "show", "eth0"]));
    let ip = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap()
        .to_string();
    assert!(ip.starts_with("10.214.1."), "{addr}");
    assert!(ok(&n.shoal(&["exec", "web", "ip", "link", "show", "lo"])).contains("UP"));
    assert!(ok(&n.shoal(&["exec", "web", "ip", "route"])).contains("default via 10.214.1.1"));
    let hosts = ok(&n.shoal(&["exec", "web", "cat", "/etc/hosts"]));
    assert!(hosts.contains(&format!("{ip}\t{}", &id[..12])), "{hosts}");
    assert_eq!(
        ok(&n.shoal(&["exec", "web", "hostname"])),
        format!("{}\n", &id[..12])
    );
    let resolv = ok(&n.shoal(&["exec", "web", "cat", "/etc/resolv.conf"]));
    assert!(
        resolv.contains("nameserver ") && !resolv.contains("nameserver 127."),
        "{resolv}"
    );

    // Another container reaches it by address, and through the host's published port.
    for url in [
        format!("http://{ip}/"),
        format!("http://10.214.1.1:{port}/"),
    ] {
        // (busybox-static's wget -T crashes: the timeout applet bounds it instead.)
        let out = n.shoal(&[
            "run", "--rm", "busybox", "timeout", "5", "wget", "-q", "-O", "-", &url,
        ]);
        assert_eq!(ok(&out), "hello-net\n", "{url}");
    }
    // The flags that shape /etc.
    let out = ok(&n.shoal(&[
        "run",
        "--rm",
        "--add-host",
        "db:10.9.9.9",
        "--dns",
        "10.0.0.53",
        "--dns-search",
        "corp",
        "--hostname",
        "boat",
        "busybox",
        "cat",
        "/etc/hosts",
        "/etc/resolv.conf",
    ]));
    assert!(out.contains("10.9.9.9\tdb\n"), "{out}");
    assert!(out.contains("\tboat\n"), "{out}");
    assert!(out.contains("nameserver 10.0.0.53\nsearch corp\n"), "{out}");
    // none: only lo, and up; host: the host's interfaces and name.
    let out = ok(&n.shoal(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox",
        "ip",
        "-o",
        "link",
    ]));
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("lo:") && out.contains("UP"), "{out}");
    let out = ok(&n.shoal(&[
        "run",
        "--rm",
        "--network",
        "host",
        "busybox",
        "ip",
        "-o",
        "link",
    ]));
    assert!(out.contains(bridge), "{out}");
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let out = ok(&n.shoal(&["run", "--rm", "--network", "host", "busybox", "hostname"]));
    assert_eq!(out.trim(), host);

    // Bad input: one line, exit 125, and nothing made.
    let before = (n.container_entries().len(), n.netns_files());
    let busy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["-p", &format!("{port}:80")],
            "already allocated to container",
        ),
        (
            &["-p", &format!("{busy_port}:80")],
            "already in use on this host",
        ),
        (&["-p", "80/sctp"], "unknown protocol"),
        (&["-p", "8000-8001:80"], "port ranges are not supported"),
        (&["--network", "backend"], "network backend not found"),
        (
            &["--network", "host", "-p", "80"],
            "ports are published only from bridge",
        ),
        (&["--add-host", "db"], "want NAME:IP"),
        (&["--dns", "resolver"], "not an IP address"),
        (&["--network-alias", "w"], "needs a user-defined network"),
    ];
    for (flags, want) in cases {
        let mut args = vec!["run", "-d"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["busybox", "true"]);
        one_line_error(&n.shoal(&args), 125, want);
        assert_eq!(
            (n.container_entries().len(), n.netns_files()),
            before,
            "{flags:?} left something"
        );
    }
    drop(busy);

    // Removal takes the namespace, the veth, the port, and the bridge with its table (the
    // last container on it).
    ok(&n.shoal(&["rm", "-f", "web"]));
    assert!(http_get(&local).is_none(), "the port still answers");
    assert!(n.netns_files().is_empty(), "{:?}", n.netns_files());
    assert!(!std::path::Path::new("/run/shoal/netns").join(&id).exists());
    let l = links();
    assert!(
        !l.contains(bridge) && !l.contains(&format!("shv{}", &id[..12])),
        "{l}"
    );
    assert!(!nft_tables().contains(table), "{}", nft_tables());
    n.assert_clean(&[&id]);
}
