//! The node-local side of the CLI: the agent's Unix socket serves root only, whatever its
//! mode, and a command whose reader stops early ends quietly (no panic, no message).

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use shoal_tests::cluster::{ClusterBuilder, Member};
use support::{Agent, AgentKind, SHOAL};

const KIND: AgentKind = AgentKind {
    net: "127.0.4",
    host_prefix: "local",
    hollow: true,
    advertise: false,
};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A one-node cluster on its own agent.
fn one_node(root: &Path) -> Agent {
    let a = Agent::start(root, 1, KIND);
    ClusterBuilder::new()
        .wait_ready(Duration::from_secs(30))
        .form(&[&a.member() as &dyn Member])
        .unwrap();
    a
}

/// `shoal args…` (on `socket`, in `data`) with its stdout a pipe whose reader is already gone.
fn with_closed_stdout(socket: &Path, data: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(SHOAL)
        .args(args)
        .env("SHOAL_SOCKET", socket)
        .env("SHOAL_DATA_DIR", data)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_command_whose_reader_stops_early_ends_quietly() {
    let root = tempfile::tempdir().unwrap();
    let a = one_node(root.path());
    let runtime_root = root.path().join("runtime");
    let data = a.dir.join("data");
    let cases: &[&[&str]] = &[
        &["node", "ls"],
        &["service", "ls"],
        &["version"],
        &["info"],
        &["image", "ls"],
        &["ps", "-a"],
        &["runtime", "--root", runtime_root.to_str().unwrap(), "list"],
    ];
    for args in cases {
        let out = with_closed_stdout(&a.socket(), &data, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.is_empty(),
            "shoal {args:?} with a closed stdout said: {err}"
        );
        // Ended by SIGPIPE (as `cat` is), or done before writing anything.
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "shoal {args:?}: {:?}",
            out.status
        );
    }
}

#[test]
fn the_local_socket_serves_root_only_whatever_its_mode() {
    let root = tempfile::tempdir().unwrap();
    let a = one_node(root.path());
    let sock = a.socket();
    assert_eq!(mode(&sock), 0o600, "the socket as the agent bound it");
    // As a mode mistake would leave it: the way open to every local user.
    for d in [root.path(), a.dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [&["node", "ls"][..], &["info"][..]] {
        let out = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_SOCKET", &sock)
            .env("SHOAL_DATA_DIR", root.path().join("nobody"))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("Leader") && !text.contains("Role:           manager"),
            "uid 65534 was served: {text}"
        );
        if args[0] == "node" {
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains("serves root only, not uid 65534"), "{err}");
        }
    }
    // Root still is.
    assert!(a.ok(&["node", "ls"]).contains("Leader"));
}
