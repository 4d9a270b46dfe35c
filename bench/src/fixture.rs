//! Test fixtures shared by the benchmarks: a busybox rootfs and an OCI bundle.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// A minimal busybox root filesystem in `dir` (static busybox and its applet links).
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox missing: apt-get install busybox-static");
    }
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).context("copying busybox")?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = dir.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

/// An OCI bundle in `dir`: `runc spec`'s default config.json (so both runtimes read the very same
/// file) with no terminal and `args` as the process.
pub fn bundle(dir: &Path, args: &[&str]) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    busybox_rootfs(&dir.join("rootfs"))?;
    let st = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .context("running `runc spec` (apt-get install runc)")?;
    if !st.success() {
        bail!("runc spec failed");
    }
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = serde_json::Value::Bool(false);
    spec["process"]["args"] = serde_json::json!(args);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}
