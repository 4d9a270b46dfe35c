//! `shoal system df|prune` and `shoal completion` as a user runs them (root, real containers):
//! a temp data dir with busybox and two small images, a running and a stopped container.
//! df counts and sizes what is there; prune asks first (a "no" changes nothing), removes the
//! stopped container and the dangling image, and with -a every image no container uses —
//! never the running container's image or layers; the completion scripts are the shells'.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::services::busybox_tar;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
        c.args(args)
            .env("SHOAL_DATA_DIR", self.data())
            // No agent: the data dir is the one given.
            .env("SHOAL_SOCKET", self.dir.path().join("none.sock"))
            .stdin(Stdio::null());
        c
    }

    fn shoal(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `system df --format json` as (type → (total, active, size, reclaimable)).
    fn df(&self) -> std::collections::BTreeMap<String, (u64, u64, u64, u64)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["system", "df", "--format", "json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let n = |k: &str| r[k].as_u64().unwrap();
                (
                    r["Type"].as_str().unwrap().to_string(),
                    (n("TotalCount"), n("Active"), n("Size"), n("Reclaimable")),
                )
            })
            .collect()
    }

    fn images(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["image", "ls", "--format", "json"])).unwrap();
        let mut tags: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| match i["RepoTags"].as_array().and_then(|t| t.first()) {
                Some(t) => t.as_str().unwrap().to_string(),
                None => "<none>".to_string(),
            })
            .collect();
        tags.sort();
        tags
    }
}

/// A one-file root filesystem tar (a small image of its own id).
fn tiny_tar(path: &Path, content: &str) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, "hello", content.as_bytes()).unwrap();
    b.finish().unwrap();
}

#[test]
fn system_df_counts_and_prune_removes_only_what_nothing_uses() {
    let n = Node {
        dir: tempfile::tempdir().unwrap(),
    };
    let root = n.dir.path();
    busybox_tar(&root.join("busybox.tar"));
    for (name, content) in [("t1", "one"), ("t2", "two"), ("t3", "three")] {
        tiny_tar(&root.join(format!("{name}.tar")), content);
    }
    let import =
        |tar: &str, tag: &str| n.ok(&["image", "import", root.join(tar).to_str().unwrap(), tag]);
    import("busybox.tar", "busybox:latest");
    // tiny:1 moves to another image: the first is dangling; other:1 is tagged and unused.
    import("t1.tar", "tiny:1");
    import("t2.tar", "tiny:1");
    import("t3.tar", "other:1");
    assert_eq!(
        n.images(),
        ["<none>", "busybox:latest", "other:1", "tiny:1"]
    );

    let up = n.ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "up",
        "busybox",
        "sleep",
        "3600",
    ]);
    let out = n.shoal(&[
        "run",
        "--network",
        "none",
        "--name",
        "done",
        "busybox",
        "true",
    ]);
    assert!(out.status.success(), "{out:?}");

    let df = n.df();
    let (imgs, layers, ctrs) = (df["Images"], df["Layers"], df["Containers"]);
    assert_eq!((imgs.0, imgs.1), (4, 1), "{df:?}");
    assert!(
        imgs.2 > 1_000_000 && imgs.3 > 0 && imgs.3 < imgs.2,
        "{df:?}"
    );
    // busybox's layer is under the running container; the three small ones are not.
    assert_eq!((layers.0, layers.1), (4, 1), "{df:?}");
    assert!(layers.3 > 0 && layers.3 < layers.2, "{df:?}");
    assert_eq!((ctrs.0, ctrs.1), (2, 1), "{df:?}");
    let table = n.ok(&["system", "df"]);
    let head: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]);
    assert!(table.lines().any(|l| l.starts_with("Images ")), "{table}");
    assert!(table.contains('%'), "{table}");

    // Asked first: "n" (or no answer) changes nothing.
    let mut p = n
        .cmd(&["system", "prune"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(b"n\n").unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Are you sure"),
        "{out:?}"
    );
    assert_eq!(n.images().len(), 4);
    assert_eq!(n.df()["Containers"].0, 2);

    // Without -a: the stopped container and the dangling image go.
    let said = n.ok(&["system", "prune", "-f"]);
    assert!(said.contains("Deleted Containers:"), "{said}");
    assert!(said.contains("Total reclaimed space: "), "{said}");
    assert_eq!(n.images(), ["busybox:latest", "other:1", "tiny:1"]);
    let ps = n.ok(&["ps", "-a", "-q"]);
    assert_eq!(ps.lines().count(), 1, "{ps}");
    assert!(up.trim().starts_with(ps.trim()), "{up} {ps}");
    assert_eq!(n.df()["Layers"].0, 3);

    // -a: every image no container uses; the running container's image and layer stay.
    let said = n.ok(&["system", "prune", "-a", "-f"]);
    assert!(said.contains("Deleted Images:"), "{said}");
    assert_eq!(n.images(), ["busybox:latest"]);
    let df = n.df();
    assert_eq!(df["Images"], (1, 1, df["Images"].2, 0), "{df:?}");
    assert_eq!((df["Layers"].0, df["Layers"].1, df["Layers"].3), (1, 1, 0));
    assert_eq!((df["Containers"].0, df["Containers"].1), (1, 1));
    // The running container still runs.
    let ps = n.ok(&["ps", "-q"]);
    assert_eq!(ps.lines().count(), 1, "{ps}");
    n.ok(&["rm", "-f", "up"]);

    // Bad input: one line, non-zero.
    for args in [
        &["system", "prune", "--bogus"][..],
        &["system", "df", "--format", "xml"],
        &["completion", "tcsh"],
    ] {
        let out = n.shoal(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("shoal: "), "{args:?}: {err}");
    }
}

#[test]
fn completion_scripts_are_the_shells_own() {
    let n = Node {
        dir: tempfile::tempdir().unwrap(),
    };
    let bash = n.ok(&["completion", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("shoal"),
        "{bash}"
    );
    assert!(bash.contains("service") && bash.contains("node"));
    // The script is valid bash and registers the completion.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("shoal.bash");
    std::fs::write(&script, &bash).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p shoal", script.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("shoal"));
    let zsh = n.ok(&["completion", "zsh"]);
    assert!(zsh.starts_with("#compdef shoal"), "{}", &zsh[..80]);
    let fish = n.ok(&["completion", "fish"]);
    assert!(fish.contains("complete -c shoal"), "{}", &fish[..80]);
}
