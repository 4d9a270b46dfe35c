//! A validated spec turned into plain values the forked children act on without parsing:
//! clone flags, mount calls, capability sets, C strings for execve, a compiled seccomp filter.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Process, Spec};

use super::{ContainerError, Overlay};
use crate::seccomp::Filter;

/// One mount call (or a bind plus its remount) inside the new root.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub source: Option<PathBuf>,
    /// Absolute, as the container sees it.
    pub dest: PathBuf,
    pub fstype: String,
    pub flags: MsFlags,
    pub data: String,
    pub propagation: Vec<MsFlags>,
    /// A bind whose source is opened component by component without following a symlink,
    /// and mounted through that fd ([`crate::volume::OPT_SOURCE_NOFOLLOW`]).
    pub source_nofollow: bool,
    /// An empty bind source first gets the rootfs's content at the destination
    /// ([`crate::volume::OPT_COPY_UP`]).
    pub copy_up: bool,
}

impl MountPlan {
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// A device node to create under the new root's /dev.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub path: PathBuf,
    pub kind: nix::sys::stat::SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The five capability sets.
#[derive(Debug, Clone, Default)]
pub struct CapsPlan {
    pub bounding: HashSet<caps::Capability>,
    pub effective: HashSet<caps::Capability>,
    pub permitted: HashSet<caps::Capability>,
    pub inheritable: HashSet<caps::Capability>,
    pub ambient: HashSet<caps::Capability>,
}

/// What the process that finally execs needs.
pub struct ProcessPlan {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    /// PATH from `env`, for finding args[0].
    pub path: String,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub caps: Option<CapsPlan>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    pub no_new_privs: bool,
    pub oom_score_adj: Option<i32>,
    pub seccomp: Option<Filter>,
}

/// Everything the monitor and init do, decided in the parent.
pub struct Plan {
    /// Namespaces the init is cloned into (the cgroup one is unshared later, after the init is
    /// in its cgroup, so the namespace is rooted there).
    pub clone_flags: libc::c_int,
    pub new_cgroup_ns: bool,
    pub new_user_ns: bool,
    pub new_mount_ns: bool,
    /// Existing namespaces to join, user first, mount last.
    pub join: Vec<(nix::sched::CloneFlags, PathBuf)>,
    /// An existing pid namespace, joined by the monitor before it forks the init.
    pub join_pid: Option<PathBuf>,
    pub uid_map: String,
    pub gid_map: String,
    pub rootfs: PathBuf,
    pub readonly_root: bool,
    pub root_propagation: Option<MsFlags>,
    pub overlay: Option<Overlay>,
    pub mounts: Vec<MountPlan>,
    /// Host cgroup dirs bound under /sys/fs/cgroup for a `cgroup` mount: (host dir, name).
    pub cgroup_binds: Vec<(PathBuf, String)>,
    pub masked: Vec<PathBuf>,
    pub readonly: Vec<PathBuf>,
    pub devices: Vec<DevicePlan>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub sysctl: Vec<(String, String)>,
    pub process: ProcessPlan,
}

fn invalid(msg: impl Into<String>) -> ContainerError {
    ContainerError::Spec(crate::spec::SpecError::Invalid(msg.into()))
}

fn cstring(s: &str) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| invalid(format!("{s:?} contains a nul byte")))
}

fn caps_of(
    set: &Option<oci_spec::runtime::Capabilities>,
) -> Result<HashSet<caps::Capability>, ContainerError> {
    set.iter()
        .flatten()
        .map(|c| {
            let name = format!("CAP_{c}");
            caps::Capability::from_str(&name)
                .map_err(|_| invalid(format!("unknown capability {name}")))
        })
        .collect()
}

fn rlimit_resource(t: PosixRlimitType) -> Result<libc::__rlimit_resource_t, ContainerError> {
    use PosixRlimitType as R;
    Ok(match t {
        R::RlimitCpu => libc::RLIMIT_CPU,
        R::RlimitFsize => libc::RLIMIT_FSIZE,
        R::RlimitData => libc::RLIMIT_DATA,
        R::RlimitStack => libc::RLIMIT_STACK,
        R::RlimitCore => libc::RLIMIT_CORE,
        R::RlimitRss => libc::RLIMIT_RSS,
        R::RlimitNproc => libc::RLIMIT_NPROC,
        R::RlimitNofile => libc::RLIMIT_NOFILE,
        R::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        R::RlimitAs => libc::RLIMIT_AS,
        R::RlimitLocks => libc::RLIMIT_LOCKS,
        R::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        R::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        R::RlimitNice => libc::RLIMIT_NICE,
        R::RlimitRtprio => libc::RLIMIT_RTPRIO,
        R::RlimitRttime => libc::RLIMIT_RTTIME,
    })
}

/// The process part, shared by the init and by `exec` (which overrides args, env and cwd).
pub fn process_plan(spec: &Spec, p: &Process) -> Result<ProcessPlan, ContainerError> {
    let args = p
        .args()
        .iter()
        .flatten()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    if args.is_empty() {
        return Err(invalid("process.args is empty"));
    }
    let env_strs: Vec<String> = p.env().clone().unwrap_or_default();
    let path = env_strs
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::spec::DEFAULT_PATH)
        .to_string();
    let env = env_strs
        .iter()
        .map(|e| cstring(e))
        .collect::<Result<Vec<_>, _>>()?;
    let caps = match p.capabilities() {
        None => None,
        Some(c) => Some(CapsPlan {
            bounding: caps_of(c.bounding())?,
            effective: caps_of(c.effective())?,
            permitted: caps_of(c.permitted())?,
            inheritable: caps_of(c.inheritable())?,
            ambient: caps_of(c.ambient())?,
        }),
    };
    let rlimits = p
        .rlimits()
        .iter()
        .flatten()
        .map(|r| Ok((rlimit_resource(r.typ())?, r.soft(), r.hard())))
        .collect::<Result<Vec<_>, ContainerError>>()?;
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(s) => Some(crate::seccomp::compile(s)?),
        None => None,
    };
    let user = p.user();
    Ok(ProcessPlan {
        args,
        env,
        path,
        cwd: p.cwd().clone(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        caps,
        rlimits,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        oom_score_adj: p.oom_score_adj(),
        seccomp,
    })
}

/// Mount options → flags, propagation changes and the data string for the filesystem.
pub fn parse_mount_options(options: &[String]) -> (MsFlags, Vec<MsFlags>, String) {
    let mut flags = MsFlags::empty();
    let mut prop = Vec::new();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let mut f = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                if o.starts_with('r') {
                    f |= MsFlags::MS_REC;
                }
                prop.push(f);
                continue;
            }
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, prop, data.join(","))
}

fn propagation(p: &str) -> Option<MsFlags> {
    match p {
        "private" => Some(MsFlags::MS_PRIVATE),
        "rprivate" => Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "slave" => Some(MsFlags::MS_SLAVE),
        "rslave" => Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
        "shared" => Some(MsFlags::MS_SHARED),
        "rshared" => Some(MsFlags::MS_SHARED | MsFlags::MS_REC),
        _ => None,
    }
}

fn id_map(maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>) -> String {
    maps.iter()
        .flatten()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

fn default_devices() -> Vec<DevicePlan> {
    [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ]
    .into_iter()
    .map(|(n, major, minor)| DevicePlan {
        path: PathBuf::from("/dev").join(n),
        kind: nix::sys::stat::SFlag::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

/// Cgroup dirs of `rel` on this host, one per mounted hierarchy that has it: (dir, name under
/// /sys/fs/cgroup, empty for a pure-v2 host where the hierarchy is /sys/fs/cgroup itself).
fn cgroup_dirs(rel: &str) -> Vec<(PathBuf, String)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let base = Path::new(crate::cgroups::DEFAULT_ROOT);
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = post.split(' ').next().unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let Some(mp) = pre.split(' ').nth(4) else {
            continue;
        };
        let mp = Path::new(mp);
        let Ok(name) = mp.strip_prefix(base) else {
            continue;
        };
        let dir = mp.join(rel);
        if dir.is_dir() {
            out.push((dir, name.to_string_lossy().into_owned()));
        }
    }
    out
}

/// Build the plan for creating a container from a validated spec.
pub fn build(
    spec: &Spec,
    bundle: &Path,
    cgroup_rel: &str,
    overlay: Option<Overlay>,
) -> Result<Plan, ContainerError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process is missing"))?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid("root is missing"))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    if overlay.is_none() && !rootfs.is_dir() {
        return Err(invalid(format!(
            "rootfs {} is not a directory",
            rootfs.display()
        )));
    }
    let linux = spec.linux().clone().unwrap_or_default();
    let mut clone_flags = 0;
    let mut join = Vec::new();
    let mut join_pid = None;
    let (mut new_cgroup_ns, mut new_user_ns, mut new_mount_ns, mut new_uts_ns) =
        (false, false, false, false);
    let mut user_join = None;
    let mut mnt_join = None;
    for ns in linux.namespaces().iter().flatten() {
        let flag = nix::sched::CloneFlags::from_bits_truncate(ns.typ() as libc::c_int);
        match ns.path() {
            Some(p) => match ns.typ() {
                LinuxNamespaceType::Pid => join_pid = Some(p.clone()),
                LinuxNamespaceType::User => user_join = Some((flag, p.clone())),
                LinuxNamespaceType::Mount => mnt_join = Some((flag, p.clone())),
                _ => join.push((flag, p.clone())),
            },
            None => match ns.typ() {
                LinuxNamespaceType::Cgroup => new_cgroup_ns = true,
                t => {
                    clone_flags |= t as libc::c_int;
                    new_user_ns |= t == LinuxNamespaceType::User;
                    new_mount_ns |= t == LinuxNamespaceType::Mount;
                    new_uts_ns |= t == LinuxNamespaceType::Uts;
                }
            },
        }
    }
    if let Some(u) = user_join {
        join.insert(0, u);
    }
    if let Some(m) = mnt_join {
        join.push(m);
    }
    if !new_mount_ns
        && (overlay.is_some() || spec.mounts().as_ref().is_some_and(|m| !m.is_empty()))
        && join
            .iter()
            .all(|(f, _)| !f.contains(nix::sched::CloneFlags::CLONE_NEWNS))
    {
        return Err(invalid("mounts need a mount namespace"));
    }
    if spec.hostname().as_ref().is_some_and(|h| !h.is_empty()) && !new_uts_ns {
        return Err(invalid("hostname needs a new uts namespace"));
    }
    let mut mounts = Vec::new();
    let mut cgroup_binds = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let mut options = m.options().clone().unwrap_or_default();
        let mut shoal_option = |name: &str| {
            let had = options.iter().any(|o| o == name);
            options.retain(|o| o != name);
            had
        };
        let source_nofollow = shoal_option(crate::volume::OPT_SOURCE_NOFOLLOW);
        let copy_up = shoal_option(crate::volume::OPT_COPY_UP);
        let (flags, prop, data) = parse_mount_options(&options);
        let fstype = m.typ().clone().unwrap_or_default();
        let mut flags = flags;
        if fstype == "bind" {
            flags |= MsFlags::MS_BIND;
        }
        let source = m.source().as_ref().map(|s| {
            if flags.contains(MsFlags::MS_BIND) && s.is_relative() {
                bundle.join(s)
            } else {
                s.clone()
            }
        });
        if fstype == "cgroup" {
            cgroup_binds = cgroup_dirs(cgroup_rel);
        }
        if (source_nofollow || copy_up) && !flags.contains(MsFlags::MS_BIND) {
            return Err(invalid(format!(
                "mount on {}: shoal's source options are for bind mounts",
                m.destination().display()
            )));
        }
        if source_nofollow && !source.as_ref().is_some_and(|s| s.is_absolute()) {
            return Err(invalid(format!(
                "mount on {}: {} needs an absolute source",
                m.destination().display(),
                crate::volume::OPT_SOURCE_NOFOLLOW
            )));
        }
        mounts.push(MountPlan {
            source,
            dest: m.destination().clone(),
            fstype,
            flags,
            data,
            propagation: prop,
            source_nofollow,
            copy_up,
        });
    }
    let mut devices = default_devices();
    for d in linux.devices().iter().flatten() {
        use oci_spec::runtime::LinuxDeviceType as T;
        let kind = match d.typ() {
            T::C | T::U => nix::sys::stat::SFlag::S_IFCHR,
            T::B => nix::sys::stat::SFlag::S_IFBLK,
            T::P => nix::sys::stat::SFlag::S_IFIFO,
            T::A => return Err(invalid("device type a is only for cgroup rules")),
        };
        if !d.path().starts_with("/dev/") {
            return Err(invalid(format!(
                "device {} is not under /dev",
                d.path().display()
            )));
        }
        devices.retain(|x| x.path != *d.path());
        devices.push(DevicePlan {
            path: d.path().clone(),
            kind,
            major: d.major() as u64,
            minor: d.minor() as u64,
            mode: d.file_mode().unwrap_or(0o666),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    let root_propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") => None,
        Some(p) => Some(propagation(p).ok_or_else(|| invalid(format!("rootfsPropagation {p}")))?),
    };
    let mut sysctl: Vec<(String, String)> = linux
        .sysctl()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctl.sort();
    for (k, _) in &sysctl {
        if k.contains('/') || k.contains("..") {
            return Err(invalid(format!("sysctl {k}")));
        }
    }
    Ok(Plan {
        clone_flags,
        new_cgroup_ns,
        new_user_ns,
        new_mount_ns,
        join,
        join_pid,
        uid_map: id_map(linux.uid_mappings()),
        gid_map: id_map(linux.gid_mappings()),
        rootfs,
        readonly_root: root.readonly().unwrap_or(false),
        root_propagation,
        overlay,
        mounts,
        cgroup_binds,
        masked: linux
            .masked_paths()
            .iter()
            .flatten()
            .map(PathBuf::from)
            .collect(),
        readonly: linux
            .readonly_paths()
            .iter()
            .flatten()
            .map(PathBuf::from)
            .collect(),
        devices,
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        domainname: spec.domainname().clone().filter(|h| !h.is_empty()),
        sysctl,
        process: process_plan(spec, process)?,
    })
}
