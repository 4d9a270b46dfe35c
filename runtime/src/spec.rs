//! OCI runtime bundles: load and validate `config.json`, and build Docker-like default specs.
//!
//! Validation walks the raw JSON against the set of fields shoal implements, so a field shoal
//! does not support is refused by its dotted name (`unsupported spec field: linux.intelRdt`)
//! instead of being dropped by the deserializer.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use serde_json::Value;

/// Errors from reading or validating a bundle's `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed config.json: {0}")]
    Malformed(String),
    #[error("unsupported spec field: {0}")]
    Unsupported(String),
    #[error("invalid spec: {0}")]
    Invalid(String),
    #[error("build spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// Docker's 14 default capabilities.
pub const DOCKER_DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Docker's masked paths.
pub const DOCKER_MASKED_PATHS: [&str; 12] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
pub const DOCKER_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// PATH given to a process whose spec has none, as Docker does.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Load `<bundle>/config.json`, refuse what shoal does not implement, and check the rest.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&text)
}

/// Parse and validate the text of a `config.json`.
pub fn parse(text: &str) -> Result<Spec, SpecError> {
    let raw: Value = serde_json::from_str(text).map_err(|e| SpecError::Malformed(e.to_string()))?;
    check_fields(&raw, "", &SUPPORTED)?;
    let spec: Spec =
        serde_json::from_value(raw).map_err(|e| SpecError::Malformed(e.to_string()))?;
    validate(&spec)?;
    Ok(spec)
}

/// A node of the tree of supported fields.
enum Field {
    /// Any value (the subtree is checked by the module that consumes it).
    Any,
    /// An object with these keys.
    Obj(&'static [(&'static str, Field)]),
    /// An array whose items match.
    Arr(&'static Field),
}

use Field::{Any, Arr, Obj};

const ID_MAP: Field = Obj(&[("containerID", Any), ("hostID", Any), ("size", Any)]);
const CAP_SETS: Field = Obj(&[
    ("bounding", Any),
    ("effective", Any),
    ("inheritable", Any),
    ("permitted", Any),
    ("ambient", Any),
]);

const SUPPORTED: Field = Obj(&[
    ("ociVersion", Any),
    ("root", Obj(&[("path", Any), ("readonly", Any)])),
    (
        "mounts",
        Arr(&Obj(&[
            ("destination", Any),
            ("type", Any),
            ("source", Any),
            ("options", Any),
        ])),
    ),
    (
        "process",
        Obj(&[
            ("terminal", Any),
            (
                "user",
                Obj(&[
                    ("uid", Any),
                    ("gid", Any),
                    ("umask", Any),
                    ("additionalGids", Any),
                ]),
            ),
            ("args", Any),
            ("env", Any),
            ("cwd", Any),
            ("capabilities", CAP_SETS),
            ("rlimits", Any),
            ("noNewPrivileges", Any),
            ("oomScoreAdj", Any),
        ]),
    ),
    ("hostname", Any),
    ("domainname", Any),
    ("annotations", Any),
    (
        "linux",
        Obj(&[
            ("uidMappings", Arr(&ID_MAP)),
            ("gidMappings", Arr(&ID_MAP)),
            ("sysctl", Any),
            ("resources", Any),
            ("cgroupsPath", Any),
            ("namespaces", Arr(&Obj(&[("type", Any), ("path", Any)]))),
            ("devices", Any),
            ("seccomp", Any),
            ("rootfsPropagation", Any),
            ("maskedPaths", Any),
            ("readonlyPaths", Any),
        ]),
    ),
]);

/// A value that says nothing: absent in effect (`null`, `""`, `[]`, `{}`, `false`).
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) => false,
    }
}

fn check_fields(v: &Value, at: &str, field: &Field) -> Result<(), SpecError> {
    match (field, v) {
        (Any, _) => Ok(()),
        (Obj(keys), Value::Object(map)) => {
            for (k, sub) in map {
                let name = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match keys.iter().find(|(key, _)| key == k) {
                    Some((_, f)) => check_fields(sub, &name, f)?,
                    None if is_empty(sub) => {}
                    None => return Err(SpecError::Unsupported(name)),
                }
            }
            Ok(())
        }
        (Arr(item), Value::Array(items)) => {
            for (i, sub) in items.iter().enumerate() {
                check_fields(sub, &format!("{at}[{i}]"), item)?;
            }
            Ok(())
        }
        // Type mismatches are the deserializer's to report.
        _ => Ok(()),
    }
}

fn validate(spec: &Spec) -> Result<(), SpecError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("process is missing".into()))?;
    if process.terminal() == Some(true) {
        return Err(SpecError::Unsupported("process.terminal".into()));
    }
    match process.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => return Err(SpecError::Invalid("process.args is empty".into())),
    }
    if !process.cwd().is_absolute() {
        return Err(SpecError::Invalid(format!(
            "process.cwd {} is not absolute",
            process.cwd().display()
        )));
    }
    if spec.root().is_none() {
        return Err(SpecError::Invalid("root is missing".into()));
    }
    if let Some(caps) = process.capabilities() {
        let empty = Default::default();
        let permitted = caps.permitted().as_ref().unwrap_or(&empty);
        if let Some(eff) = caps.effective() {
            if let Some(c) = eff.iter().find(|c| !permitted.contains(c)) {
                return Err(SpecError::Invalid(format!(
                    "capability CAP_{c} is effective but not permitted"
                )));
            }
        }
    }
    if let Some(linux) = spec.linux() {
        let mut seen = Vec::new();
        for ns in linux.namespaces().iter().flatten() {
            if seen.contains(&ns.typ()) {
                return Err(SpecError::Invalid(format!(
                    "namespace {} given twice",
                    ns.typ()
                )));
            }
            seen.push(ns.typ());
            if ns.typ() == LinuxNamespaceType::Time {
                return Err(SpecError::Unsupported("linux.namespaces[time]".into()));
            }
            if let Some(p) = ns.path() {
                if !p.is_absolute() {
                    return Err(SpecError::Invalid(format!(
                        "namespace path {} is not absolute",
                        p.display()
                    )));
                }
            }
        }
        let has_user = seen.contains(&LinuxNamespaceType::User);
        let maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty());
        if maps && !has_user {
            return Err(SpecError::Invalid(
                "uid/gid mappings given without a user namespace".into(),
            ));
        }
        if let Some(p) = linux.rootfs_propagation() {
            if !matches!(
                p.as_str(),
                "" | "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared"
            ) {
                return Err(SpecError::Invalid(format!("rootfsPropagation {p}")));
            }
        }
    }
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(SpecError::Invalid(format!(
                "mount destination {} is not absolute",
                m.destination().display()
            )));
        }
    }
    Ok(())
}

fn caps_set(names: &[String]) -> Result<std::collections::HashSet<Capability>, SpecError> {
    names
        .iter()
        .map(|n| {
            n.trim_start_matches("CAP_")
                .parse::<Capability>()
                .map_err(|_| SpecError::Invalid(format!("unknown capability {n}")))
        })
        .collect()
}

fn mount(
    dest: &str,
    typ: &str,
    source: &str,
    options: &[&str],
) -> Result<oci_spec::runtime::Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// A spec like the one Docker gives `docker run`: Docker's default capabilities, masked and
/// read-only paths, default mounts, no_new_privs, the default seccomp profile, every namespace
/// but the user one; root is `rootfs` in the bundle, cwd `/`, uid 0. Adjust the rest (user,
/// cwd, readonly root, resources, cgroupsPath) with oci-spec's setters.
pub fn docker_default(args: &[String], env: &[String], hostname: &str) -> Result<Spec, SpecError> {
    let caps: Vec<String> = DOCKER_DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    let set = caps_set(&caps)?;
    let mut env: Vec<String> = env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !hostname.is_empty() && !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={hostname}"));
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(args.to_vec())
        .env(env)
        .cwd("/")
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(set.clone())
                .effective(set.clone())
                .permitted(set.clone())
                .inheritable(std::collections::HashSet::<Capability>::new())
                .ambient(std::collections::HashSet::<Capability>::new())
                .build()?,
        )
        .rlimits(Vec::new())
        .no_new_privileges(true)
        .build()?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
    .collect::<Result<Vec<_>, _>>()?;
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(
            DOCKER_MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            DOCKER_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .seccomp(crate::seccomp::default_profile(&caps))
        .build()?;
    let mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["ro", "nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=67108864"],
        )?,
    ];
    let mut b = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()?,
        )
        .process(process)
        .mounts(mounts)
        .linux(linux);
    if !hostname.is_empty() {
        b = b.hostname(hostname);
    }
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["/bin/true"], "cwd": "/"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        })
    }

    #[test]
    fn accepts_a_minimal_spec() {
        parse(&base().to_string()).expect("minimal spec");
    }

    #[test]
    fn refuses_unsupported_fields_by_name() {
        let mut v = base();
        v["linux"]["intelRdt"] = serde_json::json!({"closID": "x"});
        let err = parse(&v.to_string()).unwrap_err().to_string();
        assert_eq!(err, "unsupported spec field: linux.intelRdt");

        let mut v = base();
        v["process"]["apparmorProfile"] = "docker-default".into();
        let err = parse(&v.to_string()).unwrap_err().to_string();
        assert_eq!(err, "unsupported spec field: process.apparmorProfile");

        let mut v = base();
        v["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/true"}]});
        assert_eq!(
            parse(&v.to_string()).unwrap_err().to_string(),
            "unsupported spec field: hooks"
        );

        let mut v = base();
        v["process"]["terminal"] = true.into();
        assert_eq!(
            parse(&v.to_string()).unwrap_err().to_string(),
            "unsupported spec field: process.terminal"
        );
    }

    #[test]
    fn empty_unsupported_fields_are_absent() {
        let mut v = base();
        v["process"]["apparmorProfile"] = "".into();
        v["linux"]["mountLabel"] = "".into();
        parse(&v.to_string()).expect("empty fields are fine");
    }

    #[test]
    fn malformed_and_invalid_specs_fail() {
        assert!(matches!(parse("{not json"), Err(SpecError::Malformed(_))));
        let mut v = base();
        v["process"]["args"] = serde_json::json!([]);
        assert!(matches!(parse(&v.to_string()), Err(SpecError::Invalid(_))));
        let mut v = base();
        v["linux"]["uidMappings"] =
            serde_json::json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
        assert!(matches!(parse(&v.to_string()), Err(SpecError::Invalid(_))));
    }

    #[test]
    fn docker_default_round_trips_through_validation() {
        let spec = docker_default(&["/bin/sh".into()], &[], "web").expect("spec");
        let text = serde_json::to_string(&spec).expect("json");
        let back = parse(&text).expect("docker_default passes validation");
        let caps = back
            .process()
            .as_ref()
            .and_then(|p| p.capabilities().clone())
            .expect("caps");
        assert_eq!(caps.bounding().as_ref().map(|b| b.len()), Some(14));
        assert_eq!(back.hostname().as_deref(), Some("web"));
    }
}
