//! The node-local commands (`image`, `run`, `ps`, `logs`, `exec`, …) as a newcomer uses them
//! beside a running agent: with only the agent's socket given they work on that agent's data
//! dir, and a service task's container is a container like any other. Real agents on
//! 127.0.0.x, real busybox containers (the services harness).

use crate::services;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use services::*;

/// The CLI with only the agent's socket to go by: no `--data-dir`, no `SHOAL_DATA_DIR`.
fn only_socket(socket: &Path, args: &[&str]) -> Output {
    Command::new(SHOAL)
        .args(args)
        .env("SHOAL_SOCKET", socket)
        .env_remove("SHOAL_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Removes a front-door container of a node's data dir when the test ends, however it ends.
struct Removed<'a> {
    data: &'a Path,
    name: &'a str,
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(SHOAL)
            .args(["rm", "-f", "--data-dir"])
            .arg(self.data)
            .arg(self.name)
            .output();
    }
}

/// One place for a node's state: with only SHOAL_SOCKET set (or only `--socket` given), the
/// node-local commands use the data dir of the agent answering there — its images, its
/// containers — not the default one.
#[test]
fn the_socket_alone_points_node_commands_at_the_agent_s_store() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    // A name only this agent's store holds.
    c.import(0, "newcomer/only-here:1");
    let sock = m.socket();

    let ls = ok(only_socket(&sock, &["image", "ls"]), "image ls");
    assert!(ls.contains("newcomer/only-here"), "{ls}");

    let out = ok(
        only_socket(
            &sock,
            &[
                "run",
                "--rm",
                "newcomer/only-here:1",
                "echo",
                "from-its-store",
            ],
        ),
        "run",
    );
    assert_eq!(out, "from-its-store\n");

    let _parked = Removed {
        data: &m.data(),
        name: "parked",
    };
    let id = ok(
        only_socket(
            &sock,
            &[
                "run",
                "-d",
                "--name",
                "parked",
                "newcomer/only-here:1",
                "sleep",
                "120",
            ],
        ),
        "run -d",
    );
    let id = id.trim();
    assert!(
        m.data().join("containers").join(id).is_dir(),
        "container {id} is not in the agent's data dir"
    );
    let ps = ok(only_socket(&sock, &["ps"]), "ps");
    assert!(ps.contains("parked"), "{ps}");

    // `--socket` on the command line is the agent asked, as SHOAL_SOCKET is.
    let out = Command::new(SHOAL)
        .args(["ps", "--socket"])
        .arg(&sock)
        .env_remove("SHOAL_SOCKET")
        .env_remove("SHOAL_DATA_DIR")
        .output()
        .unwrap();
    let ps = ok(out, "ps --socket");
    assert!(ps.contains("parked"), "{ps}");
    ok(only_socket(&sock, &["rm", "-f", "parked"]), "rm -f");
    assert!(!m.data().join("containers").join(id).exists());
}

/// A service task's container is a container for `logs` and `exec`, as with docker: named
/// SERVICE.SLOT.TASKID or by a prefix of its id, its output in its own streams, `--tail`,
/// `-f` until it exits, and `exec` into it with the exit code of the command.
#[test]
fn logs_and_exec_reach_a_service_task_s_container() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "job",
        "--restart-condition",
        "none",
        IMAGE,
        "sh",
        "-c",
        "echo one; echo two >&2; echo three; \
         while [ ! -e /tmp/stop ]; do sleep 0.1; done; echo bye",
    ]);
    c.until("the task running", || c.running("job").len() == 1);
    let id = c.running("job").into_keys().next().unwrap();
    let name = format!("job.1.{id}");
    let ps = m.ok(&["ps"]);
    assert!(ps.contains(&name), "{ps}");
    // Its three lines written.
    c.until("the task's output", || {
        m.shoal(&["logs", &name]).stdout == b"one\nthree\n"
    });

    // By name: stdout and stderr apart.
    let out = m.shoal(&["logs", &name]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\nthree\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "two\n");
    // By a prefix of the task id, the last two lines only, with their times.
    let out = m.shoal(&["logs", "--tail", "2", "-t", &id[..8]]);
    assert!(out.status.success(), "{out:?}");
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(
        stdout.starts_with("20") && stdout.ends_with("Z three\n") && stdout.lines().count() == 1,
        "{stdout}"
    );
    assert!(
        stderr.starts_with("20") && stderr.ends_with("Z two\n"),
        "{stderr}"
    );
    assert!(m
        .fails(&["logs", "job.1.nosuchtask"])
        .contains("no such container"));

    // exec by name and by id prefix, in the task's namespaces, with the command's exit code.
    let init = m.ok(&["exec", &name, "sh", "-c", "tr '\\0' ' ' </proc/1/cmdline"]);
    assert!(init.contains("/tmp/stop"), "{init}");
    let out = m.shoal(&["exec", &id[..8], "sh", "-c", "echo in-task; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in-task\n");

    // -f follows the task until it exits: `exec` tells it to finish.
    let mut follower = Command::new(SHOAL)
        .args(["logs", "-f", &name])
        .env("SHOAL_SOCKET", m.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    m.ok(&["exec", &name, "touch", "/tmp/stop"]);
    let deadline = Instant::now() + CONVERGE;
    let status = loop {
        if let Some(s) = follower.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = follower.kill();
            let _ = follower.wait();
            panic!("logs -f kept following a task that exited");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "logs -f: {status:?}");
    assert_eq!(reader.join().unwrap(), "one\nthree\nbye\n");
}
