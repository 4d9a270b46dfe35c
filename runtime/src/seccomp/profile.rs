//! Docker's seccomp profile model (the `--security-opt seccomp=FILE` JSON format) and its
//! resolution, for a capability set, kernel and architecture, into an OCI `LinuxSeccomp`.

use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;

use super::SeccompError;

/// A profile whose strings have been checked: actions, operators, arches, flags are typed.
#[derive(Debug, Clone)]
pub(super) struct Profile {
    pub default_action: LinuxSeccompAction,
    pub default_errno_ret: Option<u32>,
    /// Native architecture → the sub-architectures also accepted with it.
    pub arch_map: Vec<(Arch, Vec<Arch>)>,
    /// Plain `architectures` (Docker allows this or `archMap`, not both).
    pub architectures: Vec<Arch>,
    pub flags: Vec<LinuxSeccompFilterFlag>,
    pub rules: Vec<Rule>,
}

/// One `syscalls[]` entry.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub names: Vec<String>,
    pub action: LinuxSeccompAction,
    pub errno_ret: Option<u32>,
    pub args: Vec<LinuxSeccompArg>,
    pub includes: Cond,
    pub excludes: Cond,
}

/// `includes` / `excludes` of an entry.
#[derive(Debug, Clone, Default)]
pub(super) struct Cond {
    /// Capability names, "CAP_" prefixed, upper case.
    pub caps: Vec<String>,
    /// Docker's arch names: amd64, arm64, x86, x32, arm, s390x, ...
    pub arches: Vec<String>,
    /// (major, minor).
    pub min_kernel: Option<(u32, u32)>,
}

/// What a profile is resolved against.
#[derive(Debug, Clone)]
pub(super) struct Host {
    pub caps: Vec<String>,
    /// Docker's name for the running architecture.
    pub arch: &'static str,
    /// OCI name for the running architecture.
    pub oci_arch: Arch,
    pub kernel: (u32, u32),
}

impl Host {
    /// The running host with capability set `caps`.
    pub fn current(caps: &[String]) -> Host {
        let (arch, oci_arch) = native_arch();
        Host {
            caps: caps.iter().map(|c| normalize_cap(c)).collect(),
            arch,
            oci_arch,
            kernel: kernel_version().unwrap_or((0, 0)),
        }
    }
}

/// Docker's and OCI's names for the architecture this binary runs on.
pub(super) fn native_arch() -> (&'static str, Arch) {
    if cfg!(target_arch = "aarch64") {
        ("arm64", Arch::ScmpArchAarch64)
    } else {
        ("amd64", Arch::ScmpArchX86_64)
    }
}

/// "cap_sys_admin", "SYS_ADMIN" → "CAP_SYS_ADMIN".
pub(super) fn normalize_cap(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// The running kernel's (major, minor) from uname.
fn kernel_version() -> Option<(u32, u32)> {
    let u = nix::sys::utsname::uname().ok()?;
    parse_kernel(u.release().to_str()?)
}

/// "6.18.44-fc" → (6, 18).
pub(super) fn parse_kernel(s: &str) -> Option<(u32, u32)> {
    let mut it = s.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

impl Rule {
    fn applies(&self, host: &Host) -> bool {
        let inc = &self.includes;
        if !inc.arches.is_empty() && !inc.arches.iter().any(|a| a == host.arch) {
            return false;
        }
        if !inc.caps.iter().all(|c| host.caps.contains(c)) {
            return false;
        }
        if inc.min_kernel.is_some_and(|k| host.kernel < k) {
            return false;
        }
        let exc = &self.excludes;
        if exc.arches.iter().any(|a| a == host.arch) {
            return false;
        }
        if exc.caps.iter().any(|c| host.caps.contains(c)) {
            return false;
        }
        if exc.min_kernel.is_some_and(|k| host.kernel >= k) {
            return false;
        }
        true
    }
}

impl Profile {
    /// Keep the entries that apply to `host`, in order, as an OCI profile.
    pub fn resolve(&self, host: &Host) -> LinuxSeccomp {
        let mut architectures = self.architectures.clone();
        for (arch, subs) in &self.arch_map {
            if *arch == host.oci_arch {
                architectures.push(*arch);
                architectures.extend(subs.iter().copied());
            }
        }
        let syscalls: Vec<LinuxSyscall> = self
            .rules
            .iter()
            .filter(|r| r.applies(host))
            .map(|r| {
                let mut s = LinuxSyscall::default();
                s.set_names(r.names.clone());
                s.set_action(r.action);
                s.set_errno_ret(r.errno_ret);
                if !r.args.is_empty() {
                    s.set_args(Some(r.args.clone()));
                }
                s
            })
            .collect();
        let mut out = LinuxSeccomp::default();
        out.set_default_action(self.default_action);
        out.set_default_errno_ret(self.default_errno_ret);
        if !architectures.is_empty() {
            out.set_architectures(Some(architectures));
        }
        if !self.flags.is_empty() {
            out.set_flags(Some(self.flags.clone()));
        }
        out.set_syscalls(Some(syscalls));
        out
    }
}

// ---- Docker's JSON format ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonProfile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    arch_map: Vec<JsonArchMap>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    listener_path: Option<String>,
    #[serde(default)]
    syscalls: Vec<JsonSyscall>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonSyscall {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<JsonArg>,
    #[serde(default)]
    includes: JsonCond,
    #[serde(default)]
    excludes: JsonCond,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonArg {
    index: usize,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct JsonCond {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// An OCI seccomp argument condition.
pub(super) fn make_arg(
    index: usize,
    value: u64,
    value_two: Option<u64>,
    op: LinuxSeccompOperator,
) -> LinuxSeccompArg {
    let mut b = LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op);
    if let Some(v) = value_two {
        b = b.value_two(v);
    }
    // Every field of the builder has a default, so build cannot fail.
    b.build()
        .expect("LinuxSeccompArg builder has defaults for every field")
}

/// SCMP_ACT_* → typed action.
pub(super) fn parse_action(s: &str) -> Result<LinuxSeccompAction, SeccompError> {
    LinuxSeccompAction::from_str(s).map_err(|_| SeccompError::UnknownAction(s.to_string()))
}

fn parse_op(s: &str) -> Result<LinuxSeccompOperator, SeccompError> {
    LinuxSeccompOperator::from_str(s).map_err(|_| SeccompError::UnknownOperator(s.to_string()))
}

fn parse_arch(s: &str) -> Result<Arch, SeccompError> {
    Arch::from_str(s).map_err(|_| SeccompError::UnknownArch(s.to_string()))
}

fn parse_cond(c: JsonCond) -> Result<Cond, SeccompError> {
    let min_kernel = match c.min_kernel {
        Some(k) => Some(
            parse_kernel(&k)
                .filter(|_| k.contains('.'))
                .ok_or(SeccompError::BadMinKernel(k))?,
        ),
        None => None,
    };
    Ok(Cond {
        caps: c.caps.iter().map(|c| normalize_cap(c)).collect(),
        arches: c.arches,
        min_kernel,
    })
}

/// Parse and check a Docker-format profile.
pub(super) fn parse_json(json: &str) -> Result<Profile, SeccompError> {
    let p: JsonProfile = serde_json::from_str(json).map_err(SeccompError::Json)?;
    if !p.architectures.is_empty() && !p.arch_map.is_empty() {
        return Err(SeccompError::Invalid(
            "\"architectures\" and \"archMap\" are both set; use one".into(),
        ));
    }
    if p.listener_path.as_deref().is_some_and(|l| !l.is_empty()) {
        return Err(SeccompError::Unsupported(
            "listenerPath (SCMP_ACT_NOTIFY agents)".into(),
        ));
    }
    let default_action = parse_action(&p.default_action)?;
    let architectures = p
        .architectures
        .iter()
        .map(|a| parse_arch(a))
        .collect::<Result<Vec<_>, _>>()?;
    let arch_map = p
        .arch_map
        .iter()
        .map(|m| {
            Ok((
                parse_arch(&m.architecture)?,
                m.sub_architectures
                    .iter()
                    .map(|a| parse_arch(a))
                    .collect::<Result<Vec<_>, _>>()?,
            ))
        })
        .collect::<Result<Vec<_>, SeccompError>>()?;
    let flags = p
        .flags
        .iter()
        .map(|f| {
            LinuxSeccompFilterFlag::from_str(f).map_err(|_| SeccompError::UnknownFlag(f.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = Vec::with_capacity(p.syscalls.len());
    for s in p.syscalls {
        let names = match (s.name, s.names.is_empty()) {
            (Some(_), false) => {
                return Err(SeccompError::Invalid(
                    "an entry sets both \"name\" and \"names\"; use one".into(),
                ))
            }
            (Some(n), true) => vec![n],
            (None, _) => s.names,
        };
        let args = s
            .args
            .into_iter()
            .map(|a| {
                let two = (a.value_two != 0).then_some(a.value_two);
                Ok(make_arg(a.index, a.value, two, parse_op(&a.op)?))
            })
            .collect::<Result<Vec<_>, SeccompError>>()?;
        rules.push(Rule {
            names,
            action: parse_action(&s.action)?,
            errno_ret: s.errno_ret,
            args,
            includes: parse_cond(s.includes)?,
            excludes: parse_cond(s.excludes)?,
        });
    }
    Ok(Profile {
        default_action,
        default_errno_ret: p.default_errno_ret,
        arch_map,
        architectures,
        flags,
        rules,
    })
}
