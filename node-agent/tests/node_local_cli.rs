//! The node-local commands (`image`, `run`, `ps`, `logs`, `exec`, …) as a newcomer uses them
//! beside a running agent: with only the agent's socket given they work on that agent's data
//! dir, and a service task's container is a container like any other. Real agents on
//! 127.0.0.x, real busybox containers (the services harness).

use crate::services;

use std::path::Path;
use std::process::{Command, Output, Stdio};

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
