//! Bind mounts and volumes as a user gives them (`shoal run -v/--mount`, `shoal volume …`):
//! the built binary, a temp data dir with a busybox image (plus a few files owned by other
//! users, for the copy into an empty volume), real containers, docker's words for mistakes,
//! and nothing left behind: no volume a bad run would have made, no mount on the host.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::services::busybox_tar;

/// `/srv/seed` in the test image: a dir of 4321:4321 mode 0750 holding `greeting` (1234:99,
/// 0640) and a symlink to the host's passwd file (copied as a link, never followed).
const SEED: &str = "/srv/seed";
const GREETING: &str = "hello from the image\n";

struct Node {
    dir: tempfile::TempDir,
    data: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::Builder::new()
            .prefix("shoal-vol-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let data = dir.path().join("data");
        let tar = dir.path().join("rootfs.tar");
        image_tar(&dir.path().join("busybox.tar"), &tar);
        let n = Node { dir, data };
        ok(&n.shoal(&["image", "import", tar.to_str().unwrap(), "busybox:latest"]));
        n
    }

    fn shoal(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(args)
            .env("SHOAL_DATA_DIR", &self.data)
            .env_remove("SHOAL_SOCKET")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `shoal run --rm --network none busybox …` with `flags` before the image.
    fn run(&self, flags: &[&str], cmd: &str) -> Output {
        let mut args = vec!["run", "--rm", "--network", "none"];
        args.extend(flags);
        args.extend(["busybox", "sh", "-c", cmd]);
        self.shoal(&args)
    }

    fn volumes(&self) -> Vec<String> {
        ok(&self.shoal(&["volume", "ls", "-q"]))
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn volume_data(&self, name: &str) -> PathBuf {
        self.data.join("volumes").join(name).join("_data")
    }

    /// Mount points of this process's namespace under the test's dir.
    fn mounts(&self) -> Vec<String> {
        let d = self.dir.path().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&d))
            .map(String::from)
            .collect()
    }

    /// Container dirs under the data dir (dot entries aside).
    fn containers(&self) -> Vec<String> {
        std::fs::read_dir(self.data.join("containers"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let out = self.shoal(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = self.shoal(&["rm", "-f", "-v", id]);
        }
    }
}

/// The busybox tar of the service tests plus `/srv/seed` (see [`SEED`]).
fn image_tar(base: &Path, out: &Path) {
    busybox_tar(base);
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut a = tar::Archive::new(std::fs::File::open(base).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        b.append(&h, &mut e).unwrap();
    }
    let dir = |b: &mut tar::Builder<std::fs::File>, p: &str, id: u64, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_uid(id);
        h.set_gid(id);
        h.set_size(0);
        b.append_data(&mut h, p, &[][..]).unwrap();
    };
    dir(&mut b, "srv", 0, 0o755);
    dir(&mut b, "srv/seed", 4321, 0o750);
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_uid(1234);
    h.set_gid(99);
    h.set_size(GREETING.len() as u64);
    b.append_data(&mut h, "srv/seed/greeting", GREETING.as_bytes())
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, "srv/seed/passwd", "/etc/passwd")
        .unwrap();
    b.finish().unwrap();
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Exit `code` and one line on stderr, `shoal: …` holding `want`.
fn one_line_error(out: &Output, code: i32, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {} stderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("shoal: "), "{err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

#[test]
fn data_written_by_one_container_is_read_by_the_next() {
    let n = Node::new();
    ok(&n.run(&["-v", "data:/d"], "echo x > /d/f"));
    // Made on first use, under the data dir; the container is gone, the data stays.
    assert_eq!(n.volumes(), vec!["data"]);
    assert_eq!(
        std::fs::read_to_string(n.volume_data("data").join("f")).unwrap(),
        "x\n"
    );
    assert_eq!(ok(&n.run(&["-v", "data:/d"], "cat /d/f")), "x\n");
    // The same volume by --mount, at another path.
    let out = n.run(
        &["--mount", "type=volume,source=data,target=/other/place"],
        "cat /other/place/f; echo y >> /other/place/f",
    );
    assert_eq!(ok(&out), "x\n");
    assert_eq!(
        std::fs::read_to_string(n.volume_data("data").join("f")).unwrap(),
        "x\ny\n"
    );
    // Nothing mounted on the host, no container left; the volumes dir is root's alone.
    assert!(n.mounts().is_empty(), "{:?}", n.mounts());
    assert!(n.containers().is_empty(), "{:?}", n.containers());
    let mode = std::fs::metadata(n.data.join("volumes")).unwrap().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn read_only_mounts_refuse_writes() {
    let n = Node::new();
    ok(&n.run(&["-v", "data:/d"], "echo before > /d/f"));
    let host = n.dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    let bind_ro = format!("type=bind,source={},target=/h,readonly", host.display());
    for flags in [
        &["-v", "data:/d:ro"][..],
        &["--mount", "source=data,target=/d,readonly"][..],
    ] {
        let out = n.run(flags, "echo after > /d/f");
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
            "{out:?}"
        );
    }
    let out = n.run(&["--mount", &bind_ro], "touch /h/new");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!host.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(n.volume_data("data").join("f")).unwrap(),
        "before\n"
    );
    // Read-only, nosuid and nodev as the container's mount table says; a writable one is
    // nosuid and nodev too.
    let table = ok(&n.run(
        &["-v", "data:/d:ro", "-v", "rw-vol:/w"],
        "grep -E ' /(d|w) ' /proc/self/mountinfo",
    ));
    let opts = |target: &str| -> Vec<String> {
        let l = table
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(target))
            .unwrap_or_else(|| panic!("{target} not mounted: {table}"));
        l.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .map(str::to_string)
            .collect()
    };
    let d = opts("/d");
    for o in ["ro", "nosuid", "nodev"] {
        assert!(d.iter().any(|x| x == o), "/d lacks {o}: {d:?}");
    }
    let w = opts("/w");
    assert!(w.iter().any(|x| x == "rw"), "{w:?}");
    for o in ["nosuid", "nodev"] {
        assert!(w.iter().any(|x| x == o), "/w lacks {o}: {w:?}");
    }
    assert!(n.mounts().is_empty(), "{:?}", n.mounts());
}

#[test]
fn a_bind_mount_shows_the_host_path() {
    let n = Node::new();
    let host = n.dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("h"), "from the host\n").unwrap();
    let v = format!("{}:/h", host.display());
    assert_eq!(
        ok(&n.run(&["-v", &v], "cat /h/h; echo back > /h/c")),
        "from the host\n"
    );
    assert_eq!(std::fs::read_to_string(host.join("c")).unwrap(), "back\n");
    // Through a symlink: the resolved path is mounted. A single file binds too.
    let link = n.dir.path().join("link");
    std::os::unix::fs::symlink(&host, &link).unwrap();
    let m = format!("type=bind,src={},dst=/l", link.display());
    let f = format!("{}:/etc/greeting:ro", host.join("h").display());
    assert_eq!(
        ok(&n.run(&["--mount", &m, "-v", &f], "cat /l/c /etc/greeting")),
        "back\nfrom the host\n"
    );
    // `-v` makes a missing host dir (docker's habit); `--mount` refuses it.
    let made = n.dir.path().join("made/by/v");
    ok(&n.run(&["-v", &format!("{}:/m", made.display())], "touch /m/x"));
    assert!(made.join("x").exists());
    // No volume was involved in any of it.
    assert!(n.volumes().is_empty());
    assert!(n.mounts().is_empty(), "{:?}", n.mounts());
}

#[test]
fn an_empty_volume_gets_the_image_content_at_its_path() {
    let n = Node::new();
    let out = ok(&n.run(
        &["-v", &format!("seeded:{SEED}")],
        &format!("cat {SEED}/greeting; stat -c '%u:%g %a' {SEED} {SEED}/greeting; readlink {SEED}/passwd"),
    ));
    assert_eq!(
        out,
        format!("{GREETING}4321:4321 750\n1234:99 640\n/etc/passwd\n")
    );
    // On the host as in the image: owners, modes, the link a link.
    let data = n.volume_data("seeded");
    let md = std::fs::metadata(data.join("greeting")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (1234, 99, 0o640));
    let md = std::fs::metadata(&data).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (4321, 4321, 0o750)
    );
    assert!(std::fs::symlink_metadata(data.join("passwd"))
        .unwrap()
        .file_type()
        .is_symlink());
    // A volume with content keeps it: nothing is copied over what the user left.
    std::fs::remove_file(data.join("greeting")).unwrap();
    std::fs::write(data.join("mine"), "mine\n").unwrap();
    assert_eq!(
        ok(&n.run(&["-v", &format!("seeded:{SEED}")], &format!("ls {SEED}"))),
        "mine\npasswd\n"
    );
    // nocopy, an anonymous volume and a bind mount.
    assert_eq!(
        ok(&n.run(
            &["-v", &format!("bare:{SEED}:nocopy")],
            &format!("ls -A {SEED} | wc -l")
        ))
        .trim(),
        "0"
    );
    assert_eq!(
        ok(&n.run(&["-v", SEED], &format!("cat {SEED}/greeting"))),
        GREETING
    );
    let host = n.dir.path().join("empty-host-dir");
    std::fs::create_dir(&host).unwrap();
    ok(&n.run(&["-v", &format!("{}:{SEED}", host.display())], "true"));
    assert_eq!(std::fs::read_dir(&host).unwrap().count(), 0);
}

#[test]
fn a_volume_in_use_is_not_removed() {
    let n = Node::new();
    let id = ok(&n.shoal(&[
        "run",
        "-d",
        "--network",
        "none",
        "-v",
        "used:/d",
        "busybox",
        "sleep",
        "600",
    ]))
    .trim()
    .to_string();
    let out = n.shoal(&["volume", "rm", "used"]);
    one_line_error(&out, 1, &format!("remove used: volume is in use - [{id}]"));
    assert!(n.volume_data("used").is_dir());
    // Stopped, the container still holds it (docker's).
    ok(&n.shoal(&["stop", "-t", "1", &id]));
    one_line_error(&n.shoal(&["volume", "rm", "used"]), 1, "volume is in use");
    assert_eq!(
        ok(&n.shoal(&["volume", "prune", "-a", "-f"])),
        "Total reclaimed space: 0B\n"
    );
    assert!(n.volume_data("used").is_dir());
    ok(&n.shoal(&["rm", &id]));
    assert_eq!(ok(&n.shoal(&["volume", "rm", "used"])), "used\n");
    assert!(!n.data.join("volumes/used").exists());
    one_line_error(
        &n.shoal(&["volume", "inspect", "used"]),
        1,
        "no such volume: used",
    );
}

#[test]
fn bad_mounts_are_one_line_and_leave_nothing() {
    let n = Node::new();
    let layers = n.data.join("layers");
    let host = n.dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    let missing = n.dir.path().join("missing");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["-v".into(), "fresh:ctr".into()],
            "invalid volume specification: 'fresh:ctr': invalid mount config for type \"volume\": invalid mount path: 'ctr' mount path must be absolute".into(),
        ),
        (
            vec!["--mount".into(), format!("type=bind,source={},target=/x", missing.display())],
            format!("invalid mount config for type \"bind\": bind source path does not exist: {}", missing.display()),
        ),
        (
            vec!["-v".into(), "a/b:/x".into()],
            "create a/b: \"a/b\" includes invalid characters for a local volume name".into(),
        ),
        (
            vec!["-v".into(), "fresh:/d:rx".into()],
            "invalid mode: rx".into(),
        ),
        (
            vec!["-v".into(), "/d:ro".into()],
            "invalid volume specification: '/d:ro'".into(),
        ),
        (
            vec!["--mount".into(), "type=volume,src=fresh".into()],
            "invalid argument \"type=volume,src=fresh\" for \"--mount\" flag: target is required".into(),
        ),
        (
            vec!["--mount".into(), "type=volume,src=fresh,target=/d,size=1".into()],
            "unexpected key 'size' in 'size=1'".into(),
        ),
        (
            vec!["--mount".into(), "type=sshfs,target=/d".into()],
            "invalid mount config for type \"sshfs\": mount type unknown".into(),
        ),
        (
            vec!["-v".into(), "fresh:/d".into(), "-v".into(), "other:/d/".into()],
            "Duplicate mount point: /d".into(),
        ),
        (
            vec!["-v".into(), format!("{}:/l", layers.display())],
            "is inside shoal's data dir".into(),
        ),
        (
            vec!["-v".into(), format!("{}/new/dir:/l", layers.display())],
            "is inside shoal's data dir".into(),
        ),
        (
            vec!["-v".into(), "fresh:/".into()],
            "destination can't be '/'".into(),
        ),
        // Fails after the volume was made (the working dir is checked with the spec): the
        // volume made for it goes with the half-made container.
        (
            vec!["-v".into(), "fresh:/d".into(), "-w".into(), "rel".into()],
            "invalid --workdir value".into(),
        ),
        (
            vec!["-v".into(), format!("{}:/h", host.display()), "-v".into(), "fresh:/d".into(), "-w".into(), "rel".into()],
            "invalid --workdir value".into(),
        ),
    ];
    for (flags, want) in &cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let out = n.run(&flags, "true");
        one_line_error(&out, 125, want);
        assert!(n.volumes().is_empty(), "{flags:?} left {:?}", n.volumes());
        assert!(
            n.containers().is_empty(),
            "{flags:?} left {:?}",
            n.containers()
        );
        assert!(n.mounts().is_empty(), "{flags:?} left {:?}", n.mounts());
    }
    // Nothing made on the host for a refused source either.
    assert!(!missing.exists());
    assert!(!layers.join("new").exists());
    // A missing image is found before any volume is made.
    one_line_error(
        &n.shoal(&["run", "--rm", "-v", "fresh:/d", "nosuchimage", "true"]),
        125,
        "nosuchimage",
    );
    assert!(n.volumes().is_empty());
}

#[test]
fn volume_commands_follow_docker() {
    let n = Node::new();
    assert_eq!(
        ok(&n.shoal(&["volume", "create", "--label", "tier=db", "pgdata"])),
        "pgdata\n"
    );
    // Again: kept as it is.
    assert_eq!(ok(&n.shoal(&["volume", "create", "pgdata"])), "pgdata\n");
    let anon = ok(&n.shoal(&["volume", "create"])).trim().to_string();
    assert_eq!(anon.len(), 64, "{anon}");
    let ls = ok(&n.shoal(&["volume", "ls"]));
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["DRIVER", "VOLUME", "NAME"]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("local") && l.ends_with(" pgdata")),
        "{ls}"
    );
    let mut q = n.volumes();
    q.sort();
    let mut want = vec![anon.clone(), "pgdata".to_string()];
    want.sort();
    assert_eq!(q, want);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&n.shoal(&["volume", "inspect", "pgdata"]))).unwrap();
    let v = &v[0];
    assert_eq!(v["Name"], "pgdata");
    assert_eq!(v["Driver"], "local");
    assert_eq!(v["Scope"], "local");
    assert_eq!(v["Labels"]["tier"], "db");
    let mp = PathBuf::from(v["Mountpoint"].as_str().unwrap());
    assert_eq!(mp, n.volume_data("pgdata"));
    assert!(mp.is_dir());
    let created = v["CreatedAt"].as_str().unwrap();
    assert!(
        created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&n.shoal(&["volume", "ls", "--format", "json"]))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");

    one_line_error(
        &n.shoal(&["volume", "create", "no/slash"]),
        1,
        "includes invalid characters for a local volume name",
    );
    one_line_error(
        &n.shoal(&["volume", "inspect", "nope"]),
        1,
        "no such volume: nope",
    );
    one_line_error(
        &n.shoal(&["volume", "rm", "nope"]),
        1,
        "no such volume: nope",
    );
    assert_eq!(ok(&n.shoal(&["volume", "rm", "-f", "nope"])), "");
    one_line_error(
        &n.shoal(&["volume", "create", "-d", "nfs", "x1"]),
        1,
        "only \"local\"",
    );

    // Prune asks first; -f removes the anonymous ones, -a the named ones too.
    let out = ok(&n.shoal(&["volume", "prune"]));
    assert!(
        out.starts_with("WARNING! This will remove anonymous local volumes"),
        "{out}"
    );
    assert_eq!(n.volumes().len(), 2);
    let out = ok(&n.shoal(&["volume", "prune", "-f"]));
    assert_eq!(
        out,
        format!("Deleted Volumes:\n{anon}\n\nTotal reclaimed space: 0B\n")
    );
    std::fs::write(mp.join("f"), "1234").unwrap();
    let out = ok(&n.shoal(&["volume", "prune", "-a", "-f"]));
    assert_eq!(
        out,
        "Deleted Volumes:\npgdata\n\nTotal reclaimed space: 4B\n"
    );
    assert!(n.volumes().is_empty());
    assert_eq!(
        ok(&n.shoal(&["volume", "prune", "-a", "-f"])),
        "Total reclaimed space: 0B\n"
    );
}

#[test]
fn anonymous_volumes_go_with_their_container() {
    let n = Node::new();
    // --rm: the container's anonymous volume goes with it; its named one stays.
    ok(&n.run(&["-v", "/scratch", "-v", "keep:/k"], "echo t > /scratch/t"));
    assert_eq!(n.volumes(), vec!["keep"]);
    // rm without -v keeps it (prune takes it later); rm -v removes it.
    let run_d = |n: &Node| {
        ok(&n.shoal(&[
            "run",
            "-d",
            "--network",
            "none",
            "-v",
            "/scratch",
            "busybox",
            "sleep",
            "600",
        ]))
        .trim()
        .to_string()
    };
    let id = run_d(&n);
    assert_eq!(n.volumes().len(), 2);
    ok(&n.shoal(&["rm", "-f", &id]));
    assert_eq!(n.volumes().len(), 2);
    ok(&n.shoal(&["volume", "prune", "-f"]));
    assert_eq!(n.volumes(), vec!["keep"]);
    let id = run_d(&n);
    ok(&n.shoal(&["rm", "-f", "-v", &id]));
    assert_eq!(n.volumes(), vec!["keep"]);
    assert!(n.mounts().is_empty(), "{:?}", n.mounts());
}
