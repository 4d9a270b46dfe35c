//! Secrets and configs end to end: `shoal agent` processes on 127.0.0.x over real busybox
//! containers, driven through the CLI. A secret's plaintext must reach only the nodes whose
//! tasks use it, as a tmpfs file, and never any disk: the nodes' directories (data dirs,
//! sled stores, Raft logs, logs) are searched for its bytes.

use crate::services;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use services::*;

/// Every file under `dir` (symlinks not followed) whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            out.extend(files_holding(&p, needle));
        } else if ft.is_file() {
            if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle) {
                    out.push(p.display().to_string());
                }
            }
        }
    }
    out
}

/// `shoal …` on `node` with `input` on stdin.
fn with_stdin(node: &Node, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(SHOAL)
        .args(args)
        .env("SHOAL_SOCKET", node.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refused size may close stdin early: a broken pipe is the CLI's answer, not ours.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// A value no file holds by chance.
fn unique(tag: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{tag}-{n:032x}")
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The output of the task of `service` running on `node` (its container log).
fn task_log(c: &Cluster, service: &str) -> (String, String) {
    let (task, host) = c
        .running(service)
        .into_iter()
        .next()
        .expect("a running task");
    let node = c.node(&host);
    let log = node
        .data()
        .join("containers")
        .join(&task)
        .join("container.log");
    (task, std::fs::read_to_string(log).unwrap_or_default())
}

/// The tmpfs directory an agent keeps its tasks' files in.
fn files_root(n: &Node) -> std::path::PathBuf {
    shoal_worker::executor::files::agent_root(&n.data())
}

/// An agent's log so far.
fn agent_log(n: &Node) -> String {
    std::fs::read_to_string(n.dir.join("agent.log")).unwrap_or_default()
}

fn one_line_failure(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("shoal: "), "{err}");
    err
}

#[test]
fn secrets_reach_only_their_tasks_as_tmpfs_files_and_never_a_disk() {
    let mut c = Cluster::new(3, 1);
    let _cleanup = FilesCleanup(c.nodes.iter().map(files_root).collect());
    let m = &c.nodes[0];
    let secret = unique("shoal-secret-value");
    let out = with_stdin(
        m,
        &["secret", "create", "--label", "env=test", "db", "-"],
        secret.as_bytes(),
    );
    assert!(out.status.success(), "{out:?}");
    let secret_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(secret_id.len(), 25, "{secret_id}");
    let conf_text = unique("listen=8080 config");
    let conf_file = c.nodes[0].dir.join("app.conf");
    std::fs::write(&conf_file, &conf_text).unwrap();
    m.ok(&["config", "create", "app", conf_file.to_str().unwrap()]);

    // Listing and inspecting never show the secret's value; a config's data shows.
    let ls = m.ok(&["secret", "ls"]);
    assert!(ls.starts_with("ID ") && ls.contains(" db "), "{ls}");
    assert_eq!(m.ok(&["secret", "ls", "-q"]).trim(), secret_id);
    for args in [
        &["secret", "inspect", "db"][..],
        &["secret", "inspect", "--pretty", "db"][..],
        &["secret", "ls", "--format", "json"][..],
    ] {
        let out = m.ok(args);
        assert!(!out.contains(&secret), "{args:?}: {out}");
        assert!(out.contains("db"), "{args:?}: {out}");
    }
    let inspect: serde_json::Value =
        serde_json::from_str(&m.ok(&["secret", "inspect", "db"])).unwrap();
    assert_eq!(inspect[0]["ID"], secret_id.as_str());
    assert_eq!(inspect[0]["Spec"]["Labels"]["env"], "test");
    assert!(inspect[0]["Spec"].get("Data").is_none(), "{inspect}");
    assert!(m
        .ok(&["config", "inspect", "--pretty", "app"])
        .contains(&conf_text));

    // Only host2 runs the task.
    m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--no-resolve-image",
        "--constraint",
        "node.hostname==host2",
        "--secret",
        "db",
        "--config",
        "source=app,target=/etc/app.conf,uid=1000,gid=1001,mode=0440",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sh",
        "-c",
        "sha256sum /run/secrets/db; stat -f -c 'fs=%T' /run/secrets/db; \
         stat -c 'own=%u:%g:%a' /run/secrets/db /etc/app.conf; sha256sum /etc/app.conf; \
         sleep 3600",
    ]);
    c.until("the task reports its files", || {
        task_log(&c, "web").1.contains("own=")
    });
    let (_, log) = task_log(&c, "web");
    assert!(log.contains(&sha256_hex(secret.as_bytes())), "{log}");
    assert!(log.contains(&sha256_hex(conf_text.as_bytes())), "{log}");
    assert!(log.contains("fs=tmpfs"), "{log}");
    assert!(log.contains("own=0:0:444"), "{log}");
    assert!(log.contains("own=1000:1001:440"), "{log}");
    let inspect = m.ok(&["service", "inspect", "web"]);
    assert!(inspect.contains("/run/secrets/db"), "{inspect}");
    assert!(!inspect.contains(&secret), "{inspect}");

    // Only host2's agent was sent the secret; the others never held it, nor wrote files for
    // it, even host3 on a fresh session (whose full set is computed anew).
    const HELD: &str = "secrets and configs held";
    let sets = agent_log(&c.nodes[2]).matches(HELD).count();
    c.nodes[2].kill_agent();
    c.nodes[2].spawn();
    c.until("host3's new session got its full set", || {
        agent_log(&c.nodes[2]).matches(HELD).count() > sets
    });
    let (m, w) = (&c.nodes[0], &c.nodes[1]);
    assert!(agent_log(w).contains(&secret_id), "host2 holds the secret");
    for n in [m, &c.nodes[2]] {
        assert!(
            !agent_log(n).contains(&secret_id),
            "{} runs no task that uses the secret, yet its agent was sent it",
            n.host
        );
        assert!(
            files_holding(&files_root(n), secret.as_bytes()).is_empty(),
            "{} wrote the secret",
            n.host
        );
    }
    assert_eq!(
        files_holding(&files_root(w), secret.as_bytes()).len(),
        1,
        "host2's tmpfs holds the task's copy"
    );

    // No disk holds the plaintext: not the nodes' data dirs (task database, stores, Raft
    // log, containers) nor their logs. The store is on disk: its name is found there.
    c.until("the secret's object is on the manager's disk", || {
        !files_holding(&m.data(), secret_id.as_bytes()).is_empty()
    });
    for n in &c.nodes {
        let found = files_holding(&n.dir, secret.as_bytes());
        assert!(found.is_empty(), "plaintext on disk: {found:?}");
    }

    // In use: not removable (the service is named), for secrets and configs alike.
    let err = one_line_failure(&m.shoal(&["secret", "rm", "db"]));
    assert!(err.contains("in use by service web"), "{err}");
    let err = one_line_failure(&m.shoal(&["config", "rm", "app"]));
    assert!(err.contains("in use by service web"), "{err}");

    // Rotation: a new secret at the same target, by a service update.
    let rotated = unique("shoal-secret-rotated");
    let out = with_stdin(m, &["secret", "create", "db2", "-"], rotated.as_bytes());
    assert!(out.status.success(), "{out:?}");
    m.ok(&[
        "service",
        "update",
        "--secret-rm",
        "db",
        "--secret-add",
        "source=db2,target=/run/secrets/db",
        "web",
    ]);
    c.until("the updated task reads the new secret", || {
        task_log(&c, "web")
            .1
            .contains(&sha256_hex(rotated.as_bytes()))
    });
    // The old secret is free now, and leaves the node with its task.
    m.ok(&["secret", "rm", "db"]);
    c.until("host2 no longer holds the old secret", || {
        files_holding(&files_root(w), secret.as_bytes()).is_empty()
    });
    let ls = m.ok(&["secret", "ls"]);
    assert!(!ls.contains(" db ") && ls.contains(" db2 "), "{ls}");

    m.ok(&["service", "rm", "web"]);
    c.until("containers removed", || {
        c.nodes.iter().all(|n| n.containers().is_empty())
    });
    c.until("task files removed", || {
        files_holding(&files_root(w), rotated.as_bytes()).is_empty()
    });
    m.ok(&["secret", "rm", "db2"]);
    m.ok(&["config", "rm", "app"]);
}

/// Removes the agents' tmpfs file dirs however the test ends (a killed agent leaves its
/// tasks' files behind, as it leaves their containers).
struct FilesCleanup(Vec<std::path::PathBuf>);

impl Drop for FilesCleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
        // The shared root too, once no agent of another test uses it.
        let _ = std::fs::remove_dir(shoal_worker::executor::files::FILES_ROOT);
    }
}

#[test]
fn bad_secrets_and_references_are_refused_in_one_line_and_create_nothing() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    // Over 500 KiB, from stdin and from a file.
    let big = vec![b'x'; 500 * 1024 + 1];
    let err = one_line_failure(&with_stdin(m, &["secret", "create", "big", "-"], &big));
    assert!(err.contains("500 KiB"), "{err}");
    let file = m.dir.join("big");
    std::fs::write(&file, &big).unwrap();
    let err = one_line_failure(&m.shoal(&["config", "create", "big", file.to_str().unwrap()]));
    assert!(err.contains("500 KiB"), "{err}");
    // Exactly 500 KiB is fine.
    let out = with_stdin(m, &["secret", "create", "edge", "-"], &big[1..]);
    assert!(out.status.success(), "{out:?}");
    // Bad names, as docker's.
    for name in ["trailing.", "a b", "x/y"] {
        let err = one_line_failure(&with_stdin(m, &["secret", "create", name, "-"], b"v"));
        assert!(err.contains("invalid secret name"), "{err}");
    }
    let err = one_line_failure(&with_stdin(m, &["secret", "create", "edge", "-"], b"v"));
    assert!(err.contains("already in use"), "{err}");

    let create = |extra: &[&str]| {
        let mut args = vec![
            "service",
            "create",
            "--name",
            "bad",
            "--no-resolve-image",
            "--detach",
        ];
        args.extend_from_slice(extra);
        args.extend([IMAGE, "sleep", "60"]);
        m.shoal(&args)
    };
    for (extra, want) in [
        (&["--secret", "nosuch"][..], "secret nosuch not found"),
        (&["--config", "nosuch"][..], "config nosuch not found"),
        (
            &["--secret", "source=edge,target=/run/../etc/shadow"][..],
            "must not hold '..'",
        ),
        (
            &[
                "--secret",
                "source=edge,target=/a",
                "--secret",
                "source=edge,target=/a",
            ][..],
            "already the target of a secret",
        ),
        (&["--secret", "source=edge,mode=9z"][..], "is not a number"),
        (&["--secret", "target=/x"][..], "no source"),
    ] {
        let err = one_line_failure(&create(extra));
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let ls = m.ok(&["service", "ls", "-q"]);
    assert!(ls.trim().is_empty(), "a refused service was created: {ls}");
    let ls = m.ok(&["secret", "ls"]);
    assert_eq!(ls.lines().count(), 2, "only `edge`: {ls}");
    let ls = m.ok(&["config", "ls", "-q"]);
    assert!(ls.trim().is_empty(), "{ls}");
    // An unknown secret in an update is refused the same way, and changes nothing.
    m.ok(&[
        "service",
        "create",
        "--name",
        "ok",
        "--no-resolve-image",
        "--detach",
        IMAGE,
        "sleep",
        "60",
    ]);
    let before = m.ok(&["service", "inspect", "ok"]);
    let err = one_line_failure(&m.shoal(&["service", "update", "--secret-add", "nosuch", "ok"]));
    assert!(err.contains("secret nosuch not found"), "{err}");
    let err = one_line_failure(&m.shoal(&["service", "update", "--secret-rm", "edge", "ok"]));
    assert!(err.contains("has no secret edge"), "{err}");
    assert_eq!(m.ok(&["service", "inspect", "ok"]), before);
    m.ok(&["service", "rm", "ok"]);

    // The largest secret reaches a task whose root filesystem is read-only.
    let _cleanup = FilesCleanup(vec![files_root(m)]);
    m.ok(&[
        "service",
        "create",
        "--name",
        "ro",
        "--no-resolve-image",
        "--read-only",
        "--secret",
        "edge",
        IMAGE,
        "sh",
        "-c",
        "echo size=$(wc -c < /run/secrets/edge); sleep 3600",
    ]);
    c.until("the task read the secret", || {
        task_log(&c, "ro").1.contains("size=512000")
    });
    m.ok(&["service", "rm", "ro"]);
    c.until("containers removed", || m.containers().is_empty());
}
