//! `config.json` for a container from an image: Docker's defaults (`spec::docker_default`), the
//! image config (Entrypoint, Cmd, Env, WorkingDir, User) and the `shoal run` flags.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxPidsBuilder,
    LinuxResourcesBuilder, Spec, UserBuilder,
};

use super::{FrontDoorError, Result, RunOptions};
use crate::spec;

/// CFS period for `--cpus` (Docker's).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest `--memory` Docker accepts.
pub const MIN_MEMORY: i64 = 6 * 1024 * 1024;
/// Largest `/etc/passwd` or `/etc/group` read from an image.
const MAX_ACCOUNT_FILE: u64 = 1 << 20;

/// Parse a Docker memory size: a number of bytes with an optional unit `b`, `k`, `m`, `g`
/// (binary multiples, case-insensitive, an optional trailing `b` as in `64mb`).
pub fn parse_memory(s: &str) -> Result<i64> {
    let bad = |reason: &str| FrontDoorError::InvalidOption {
        flag: "--memory",
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad("expected a number with an optional unit (b, k, m, g)"));
    }
    let mult: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad("unknown unit: use b, k, m or g")),
    };
    let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes >= i64::MAX as f64 {
        return Err(bad("too large"));
    }
    let bytes = bytes as i64;
    if bytes < MIN_MEMORY {
        return Err(bad("the minimum memory limit is 6MB"));
    }
    Ok(bytes)
}

/// Parse `--cpus`: a positive number of CPUs, at most the host's count.
pub fn parse_cpus(s: &str) -> Result<f64> {
    let bad = |reason: String| FrontDoorError::InvalidOption {
        flag: "--cpus",
        value: s.to_string(),
        reason,
    };
    let v: f64 = s.trim().parse().map_err(|_| bad("not a number".into()))?;
    let host = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if !v.is_finite() || v < 0.01 {
        return Err(bad("must be at least 0.01".into()));
    }
    if v > host {
        return Err(bad(format!("the host has {host} CPUs")));
    }
    Ok(v)
}

/// Parse `--pids-limit`: a positive number (Docker's `-1`/`0` for unlimited become `None`).
pub fn parse_pids_limit(s: &str) -> Result<Option<i64>> {
    let v: i64 = s
        .trim()
        .parse()
        .map_err(|_| FrontDoorError::InvalidOption {
            flag: "--pids-limit",
            value: s.to_string(),
            reason: "not an integer".into(),
        })?;
    Ok((v > 0).then_some(v))
}

/// What `config.json` needs from the image besides its config.
pub struct ImageView<'a> {
    /// The image's unpacked layers, lowest first.
    pub layer_dirs: &'a [PathBuf],
    pub config: &'a ImageConfiguration,
}

/// Uid, gid and supplementary groups for the container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// The user's home from `/etc/passwd`, when it has an entry.
    pub home: Option<String>,
}

/// The process's argv: the image's Entrypoint followed by `command`, or by the image's Cmd
/// when `command` is empty.
pub fn process_args(config: &ImageConfiguration, command: &[String]) -> Vec<String> {
    let c = config.config().as_ref();
    let mut args: Vec<String> = c.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    if command.is_empty() {
        args.extend(c.and_then(|c| c.cmd().clone()).unwrap_or_default());
    } else {
        args.extend(command.iter().cloned());
    }
    args
}

/// `base` with every `KEY=VALUE` of `over` replacing the same key (or appended); a bare `KEY`
/// takes the caller's value, or is dropped when the caller has none (as `docker run -e`).
pub fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut out: Vec<String> = base.to_vec();
    for kv in over {
        let kv = if kv.contains('=') {
            kv.clone()
        } else {
            match std::env::var(kv) {
                Ok(v) => format!("{kv}={v}"),
                Err(_) => continue,
            }
        };
        let key = kv.split('=').next().unwrap_or("").to_string();
        out.retain(|e| e.split('=').next() != Some(key.as_str()));
        out.push(kv);
    }
    out
}

/// Build the container's spec. `id` is the full container id (its short form is the default
/// hostname); `upper` is the container's overlay upper dir, where a missing working
/// directory is created.
pub fn build_spec(id: &str, opts: &RunOptions, image: &ImageView, upper: &Path) -> Result<Spec> {
    let args = process_args(image.config, &opts.command);
    if args.is_empty() || args[0].is_empty() {
        return Err(FrontDoorError::NoCommand(opts.image.clone()));
    }
    let icfg = image.config.config().as_ref();
    let user_spec = opts
        .user
        .clone()
        .or_else(|| icfg.and_then(|c| c.user().clone()))
        .filter(|u| !u.is_empty());
    let user = match &user_spec {
        Some(u) => resolve_user(u, image.layer_dirs)?,
        None => resolve_user("0", image.layer_dirs)?,
    };
    let cwd = opts
        .workdir
        .clone()
        .or_else(|| icfg.and_then(|c| c.working_dir().clone()))
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let cwd = clean_abs(&cwd).ok_or_else(|| FrontDoorError::InvalidOption {
        flag: "--workdir",
        value: cwd.clone(),
        reason: "must be an absolute path without '..'".into(),
    })?;
    ensure_workdir(&cwd, image.layer_dirs, upper, &user)?;

    let hostname = opts
        .hostname
        .clone()
        .unwrap_or_else(|| id[..id.len().min(12)].to_string());
    let image_env = icfg.and_then(|c| c.env().clone()).unwrap_or_default();
    let mut env = merge_env(&image_env, &opts.env);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = user.home.clone().unwrap_or_else(|| {
            if user.uid == 0 {
                "/root".into()
            } else {
                "/".into()
            }
        });
        env.push(format!("HOME={home}"));
    }
    let mut spec = spec::docker_default(&args, &env, &hostname)?;

    if let Some(mut process) = spec.process().clone() {
        let mut ub = UserBuilder::default().uid(user.uid).gid(user.gid);
        if !user.additional_gids.is_empty() {
            ub = ub.additional_gids(user.additional_gids.clone());
        }
        process.set_user(ub.build()?);
        process.set_cwd(cwd);
        spec.set_process(Some(process));
    }
    if let Some(mut root) = spec.root().clone() {
        root.set_readonly(Some(opts.read_only));
        spec.set_root(Some(root));
    }
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_resources(Some(resources(opts)?));
        spec.set_linux(Some(linux));
    }
    let mut ann = HashMap::new();
    ann.insert("org.shoal.container.name".to_string(), opts_name(opts));
    ann.insert(
        "org.opencontainers.image.ref.name".to_string(),
        opts.image.clone(),
    );
    spec.set_annotations(Some(ann));
    Ok(spec)
}

fn opts_name(opts: &RunOptions) -> String {
    opts.name.clone().unwrap_or_default()
}

/// Memory, cpu and pids limits from the flags, and Docker's device rules: deny everything, the
/// runtime then allows the default devices.
fn resources(opts: &RunOptions) -> Result<oci_spec::runtime::LinuxResources> {
    let mut b = LinuxResourcesBuilder::default().devices(vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?]);
    if let Some(m) = opts.memory {
        b = b.memory(LinuxMemoryBuilder::default().limit(m).build()?);
    }
    if let Some(c) = opts.cpus {
        let quota = (c * CPU_PERIOD_US as f64).round() as i64;
        b = b.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }
    if let Some(p) = opts.pids_limit {
        b = b.pids(LinuxPidsBuilder::default().limit(p).build()?);
    }
    Ok(b.build()?)
}

/// `p` as an absolute path with `.` and `..` refused, or `None`.
fn clean_abs(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Docker creates a missing working directory; shoal does it in the container's upper dir
/// (never in a layer), owned by the container's user.
fn ensure_workdir(cwd: &Path, layers: &[PathBuf], upper: &Path, user: &ResolvedUser) -> Result<()> {
    let rel = cwd.strip_prefix("/").unwrap_or(cwd);
    if rel.as_os_str().is_empty() {
        return Ok(());
    }
    // An existence check only: a symlink in a layer may point anywhere on the host, but
    // nothing is read or written through it.
    if layers
        .iter()
        .any(|l| l.join(rel).symlink_metadata().is_ok())
    {
        return Ok(());
    }
    let mut p = upper.to_path_buf();
    for c in rel.components() {
        p.push(c);
        match std::fs::create_dir(&p) {
            Ok(()) => {
                std::os::unix::fs::chown(&p, Some(user.uid), Some(user.gid)).map_err(|e| {
                    FrontDoorError::Io {
                        what: format!("chown {}", p.display()),
                        source: e,
                    }
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(FrontDoorError::Io {
                    what: format!("create working directory {}", p.display()),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Read `etc/<name>` (`passwd`, `group`) from the topmost layer that has it as a regular file,
/// at most 1 MiB: a symlink there (file or `etc/`) could point at the host's files and is
/// ignored, never followed out of the image.
pub fn read_account_file(layers: &[PathBuf], name: &str) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    for l in layers.iter().rev() {
        let etc = l.join("etc");
        match etc.symlink_metadata() {
            Ok(md) if md.is_dir() => {}
            _ => continue,
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(etc.join(name));
        let Ok(f) = f else { continue };
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let mut s = String::new();
        if f.take(MAX_ACCOUNT_FILE).read_to_string(&mut s).is_ok() {
            return Some(s);
        }
    }
    None
}

/// Resolve Docker's user forms (`user`, `uid`, `user:group`, `uid:gid`, ...) against the
/// image's `/etc/passwd` and `/etc/group`.
pub fn resolve_user(spec: &str, layers: &[PathBuf]) -> Result<ResolvedUser> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_account_file(layers, "passwd").unwrap_or_default();
    let group = read_account_file(layers, "group").unwrap_or_default();
    let entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let matches = f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u);
        if !matches {
            return None;
        }
        Some((
            f[0].to_string(),
            f[2].parse::<u32>().ok()?,
            f[3].parse::<u32>().ok()?,
            f[5].to_string(),
        ))
    });
    let (name, uid, mut gid, home) = match (entry, u.parse::<u32>()) {
        (Some((n, uid, gid, home)), _) => (Some(n), uid, gid, Some(home)),
        (None, Ok(uid)) => (None, uid, 0, None),
        (None, Err(_)) => {
            return Err(FrontDoorError::User(format!(
                "unable to find user {u}: no matching entries in passwd file"
            )))
        }
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g).then(|| f[2].parse::<u32>().ok())?
                })
                .ok_or_else(|| {
                    FrontDoorError::User(format!(
                        "unable to find group {g}: no matching entries in group file"
                    ))
                })?,
        };
    }
    let mut additional_gids = Vec::new();
    if let (Some(n), None) = (&name, g) {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m == n) {
                if let Ok(x) = f[2].parse::<u32>() {
                    if x != gid && !additional_gids.contains(&x) {
                        additional_gids.push(x);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_like_docker() {
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(parse_memory("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("10000000").unwrap(), 10_000_000);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        for bad in ["", "m", "64x", "abc", "-5m", "1k", "99999999999999t"] {
            let e = parse_memory(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid --memory value"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpus_and_pids_parse() {
        assert_eq!(parse_cpus("0.5").unwrap(), 0.5);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("lots").is_err());
        assert!(parse_cpus("100000").is_err());
        assert_eq!(parse_pids_limit("20").unwrap(), Some(20));
        assert_eq!(parse_pids_limit("-1").unwrap(), None);
        assert!(parse_pids_limit("x").is_err());
    }

    #[test]
    fn env_merges_by_key() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let out = merge_env(
            &base,
            &["A=2".into(), "B=3".into(), "SHOAL_SURELY_UNSET_VAR".into()],
        );
        assert_eq!(out, vec!["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn users_resolve_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let low = dir.path().join("l0");
        let top = dir.path().join("l1");
        std::fs::create_dir_all(low.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(low.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(
            top.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            top.join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app,root\nstaff:x:50:\n",
        )
        .unwrap();
        let layers = vec![low, top];
        let u = resolve_user("app", &layers).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![10]);
        assert_eq!(u.home.as_deref(), Some("/home/app"));
        let u = resolve_user("app:staff", &layers).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert!(u.additional_gids.is_empty());
        let u = resolve_user("4242:7", &layers).unwrap();
        assert_eq!((u.uid, u.gid, u.home), (4242, 7, None));
        let u = resolve_user("1000", &layers).unwrap();
        assert_eq!(u.gid, 1000);
        assert!(resolve_user("nobody", &layers).is_err());
        assert!(resolve_user("app:nogroup", &layers).is_err());
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let l = dir.path().join("l0");
        std::fs::create_dir_all(l.join("etc")).unwrap();
        let host = dir.path().join("hostpasswd");
        std::fs::write(&host, "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&host, l.join("etc/passwd")).unwrap();
        assert!(resolve_user("evil", &[l]).is_err());
    }

    #[test]
    fn entrypoint_cmd_env_and_workdir_from_the_image() {
        let cfg: ImageConfiguration = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {
                "Entrypoint": ["/entry", "-v"], "Cmd": ["serve"],
                "Env": ["PATH=/custom/bin", "MODE=prod"], "WorkingDir": "/app",
                "StopSignal": "SIGQUIT"
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap();
        assert_eq!(process_args(&cfg, &[]), vec!["/entry", "-v", "serve"]);
        assert_eq!(
            process_args(&cfg, &["debug".into()]),
            vec!["/entry", "-v", "debug"]
        );
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let opts = RunOptions {
            image: "img".into(),
            env: vec!["MODE=dev".into()],
            memory: Some(64 << 20),
            cpus: Some(1.5),
            pids_limit: Some(20),
            read_only: true,
            ..Default::default()
        };
        let id = "ab".repeat(32);
        let view = ImageView {
            layer_dirs: &[],
            config: &cfg,
        };
        let spec = build_spec(&id, &opts, &view, &upper).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.cwd(), Path::new("/app"));
        assert!(upper.join("app").is_dir());
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/custom/bin".to_string()), "{env:?}");
        assert!(env.contains(&"MODE=dev".to_string()), "{env:?}");
        assert!(!env.contains(&"MODE=prod".to_string()), "{env:?}");
        assert_eq!(spec.hostname().as_deref(), Some(&id[..12]));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let res = spec.linux().as_ref().unwrap().resources().clone().unwrap();
        assert_eq!(res.memory().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(150_000));
        assert_eq!(res.cpu().as_ref().unwrap().period(), Some(CPU_PERIOD_US));
        assert_eq!(res.pids().unwrap().limit(), 20);
        // The spec passes the runtime's own validation.
        crate::spec::parse(&serde_json::to_string(&spec).unwrap()).unwrap();

        let bare: ImageConfiguration = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap();
        let view = ImageView {
            layer_dirs: &[],
            config: &bare,
        };
        let e = build_spec(&id, &opts, &view, &upper).unwrap_err();
        assert!(matches!(e, FrontDoorError::NoCommand(_)), "{e}");
    }

    #[test]
    fn workdirs_must_be_absolute_and_clean() {
        assert_eq!(clean_abs("/a/./b/"), Some(PathBuf::from("/a/b")));
        assert_eq!(clean_abs("rel"), None);
        assert_eq!(clean_abs("/a/../../etc"), None);
    }
}
