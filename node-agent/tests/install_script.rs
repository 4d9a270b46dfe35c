//! `deploy/install.sh` under `--root` (a tempdir stands in for /; systemd is left alone):
//! what it installs, with which modes, that a second run changes nothing, and `--uninstall`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/install.sh");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/shoal.service");

fn install(root: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg(SCRIPT)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn installs_idempotently_and_uninstalls_keeping_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = install(root, &["--binary", SHOAL]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root.join("usr/local/bin/shoal");
    let unit = root.join("etc/systemd/system/shoal.service");
    let defaults = root.join("etc/default/shoal");
    let data = root.join("var/lib/shoal");
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(SHOAL).unwrap());
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        std::fs::read_to_string(UNIT).unwrap()
    );
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(mode(&data), 0o700);
    assert!(std::fs::read_to_string(&defaults)
        .unwrap()
        .contains("SHOAL_AGENT_OPTS"));

    // A second run leaves everything as it is, including a host's own options.
    std::fs::write(
        &defaults,
        "SHOAL_AGENT_OPTS=\"--advertise-addr 10.0.0.11\"\n",
    )
    .unwrap();
    let out = install(root, &["--binary", SHOAL]);
    assert!(out.status.success());
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(!said.contains("installed"), "{said}");
    assert!(std::fs::read_to_string(&defaults)
        .unwrap()
        .contains("10.0.0.11"));

    // Bad input: one clear line, non-zero exit.
    let out = install(root, &["--binary", "/nonexistent/shoal"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("no shoal binary at /nonexistent/shoal"),
        "{err}"
    );
    let out = install(root, &["--bogus"]);
    assert_eq!(out.status.code(), Some(2));

    std::fs::write(data.join("node.json"), "{}").unwrap();
    let out = install(root, &["--uninstall"]);
    assert!(out.status.success());
    assert!(!bin.exists() && !unit.exists());
    assert!(data.join("node.json").exists(), "the node's data is kept");
    let out = install(root, &["--uninstall"]);
    assert!(out.status.success(), "uninstalling twice is fine");
}
