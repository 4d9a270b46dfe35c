//! What runs in the forked children: the container's init (namespaces, rootfs, then the
//! process) and the process half of `exec`. Errors are plain strings sent back over a pipe.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;

use super::plan::{MountPlan, Plan, ProcessPlan};

/// An error in a child, as one line for the parent.
#[derive(Debug)]
pub struct Fail(pub String);

type R<T = ()> = Result<T, Fail>;

trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> R<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> R<T> {
        self.map_err(|e| Fail(format!("{}: {e}", what())))
    }
}

/// Symlinks followed while resolving one path inside the root, as the kernel's limit.
const MAX_SYMLINKS: usize = 40;

/// `path` resolved inside `root` with every symlink followed as if `root` were `/`, so a
/// crafted rootfs cannot point a mount outside itself.
pub fn resolve_in_root(root: &Path, path: &Path) -> R<PathBuf> {
    let mut cur = PathBuf::new();
    let mut queue: VecDeque<std::ffi::OsString> = VecDeque::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => queue.push_back(n.to_os_string()),
            Component::ParentDir => queue.push_back("..".into()),
            _ => {}
        }
    }
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        match std::fs::symlink_metadata(root.join(&next)) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Fail(format!(
                        "too many symlinks resolving {}",
                        path.display()
                    )));
                }
                let target = std::fs::read_link(root.join(&next))
                    .ctx(|| format!("readlink {}", next.display()))?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                let mut parts: Vec<std::ffi::OsString> = Vec::new();
                for tc in target.components() {
                    match tc {
                        Component::Normal(n) => parts.push(n.to_os_string()),
                        Component::ParentDir => parts.push("..".into()),
                        _ => {}
                    }
                }
                for p in parts.into_iter().rev() {
                    queue.push_front(p);
                }
            }
            _ => cur = next,
        }
    }
    Ok(root.join(cur))
}

fn mnt(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> R {
    mount(src, dst, fstype, flags, data).ctx(|| {
        format!(
            "mount {} on {} ({})",
            src.map(|s| s.display().to_string()).unwrap_or_default(),
            dst.display(),
            fstype.unwrap_or("bind")
        )
    })
}

/// Flags of the mount holding `p` that a read-only remount must keep (locked in a user ns).
fn locked_flags(p: &Path) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let Ok(s) = nix::sys::statvfs::statvfs(p) else {
        return MsFlags::empty();
    };
    let f = s.flags();
    let mut out = MsFlags::empty();
    for (a, b) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(a) {
            out |= b;
        }
    }
    out
}

fn remount_ro(p: &Path, extra: MsFlags) -> R {
    mnt(
        None,
        p,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked_flags(p) | extra,
        None,
    )
}

fn ensure_dir(p: &Path) -> R {
    std::fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))
}

fn ensure_file(p: &Path) -> R {
    if p.exists() {
        return Ok(());
    }
    if let Some(parent) = p.parent() {
        ensure_dir(parent)?;
    }
    std::fs::File::create(p)
        .map(drop)
        .ctx(|| format!("create {}", p.display()))
}

fn mount_one(root: &Path, m: &MountPlan, plan: &Plan) -> R {
    let dest = resolve_in_root(root, &m.dest)?;
    if m.fstype == "cgroup" {
        return mount_cgroup(&dest, m, plan);
    }
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    if m.is_bind() {
        let src = m
            .source
            .as_deref()
            .ok_or_else(|| Fail(format!("bind mount on {} has no source", m.dest.display())))?;
        // shoal's own binds: the source walked without following a symlink and mounted
        // through the fd the walk ends on (held until mounted).
        let (held, is_dir) = if m.source_nofollow || m.copy_up {
            let (fd, st) = if m.source_nofollow {
                super::mountsrc::open_nofollow(src)?
            } else {
                let fd = nix::fcntl::open(
                    src,
                    nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .ctx(|| format!("bind source {}", src.display()))?;
                // SAFETY: a fresh fd from open, owned from here on.
                let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
                let st = nix::sys::stat::fstat(fd.as_raw_fd())
                    .ctx(|| format!("bind source {}", src.display()))?;
                (fd, st)
            };
            let dir = super::mountsrc::is_dir(&st);
            if m.copy_up && dir {
                super::mountsrc::copy_up(&dest, fd.as_raw_fd())?;
            }
            (Some(fd), dir)
        } else {
            let md = std::fs::metadata(src).ctx(|| format!("bind source {}", src.display()))?;
            (None, md.is_dir())
        };
        if is_dir {
            ensure_dir(&dest)?;
        } else {
            ensure_file(&dest)?;
        }
        let via_fd = held
            .as_ref()
            .map(|fd| super::mountsrc::proc_fd(fd.as_raw_fd()));
        mount(
            Some(via_fd.as_deref().unwrap_or(src)),
            &dest,
            None::<&str>,
            m.flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
            None::<&str>,
        )
        .ctx(|| {
            // The path as the spec gives it, not the fd it was mounted through.
            let inside = m.dest.display();
            format!("mount {} on {inside} (bind)", src.display())
        })?;
        let rest = m.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !rest.is_empty() {
            mnt(
                None,
                &dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest | locked_flags(&dest),
                None,
            )?;
        }
    } else {
        ensure_dir(&dest)?;
        let src = m.source.as_deref().unwrap_or(Path::new("none"));
        mnt(Some(src), &dest, Some(&m.fstype), m.flags, data)?;
    }
    for p in &m.propagation {
        mnt(None, &dest, None, *p, None)?;
    }
    Ok(())
}

/// A `cgroup` mount: the container's own cgroup dirs bound in (the cgroup namespace makes
/// them its root), read-only when the mount asks.
fn mount_cgroup(dest: &Path, m: &MountPlan, plan: &Plan) -> R {
    ensure_dir(dest)?;
    let ro = m.flags.contains(MsFlags::MS_RDONLY);
    let base = m.flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    let single = plan.cgroup_binds.len() == 1 && plan.cgroup_binds[0].1.is_empty();
    if !single {
        mnt(
            Some(Path::new("tmpfs")),
            dest,
            Some("tmpfs"),
            base,
            Some("mode=755"),
        )?;
    }
    for (host, name) in &plan.cgroup_binds {
        if name.is_empty() && !single {
            continue;
        }
        let d = if name.is_empty() {
            dest.to_path_buf()
        } else {
            dest.join(name)
        };
        ensure_dir(&d)?;
        mnt(Some(host), &d, None, MsFlags::MS_BIND, None)?;
        let f = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | base | locked_flags(&d);
        mnt(
            None,
            &d,
            None,
            if ro { f | MsFlags::MS_RDONLY } else { f },
            None,
        )?;
    }
    if !single && ro {
        mnt(
            None,
            dest,
            None,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
            Some("mode=755"),
        )?;
    }
    Ok(())
}

fn make_devices(root: &Path, plan: &Plan) -> R {
    let dev = resolve_in_root(root, Path::new("/dev"))?;
    ensure_dir(&dev)?;
    for d in &plan.devices {
        let p = resolve_in_root(root, &d.path)?;
        if p.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = p.parent() {
            ensure_dir(parent)?;
        }
        if plan.new_user_ns {
            // mknod is refused in a user namespace: bind the host's node instead.
            ensure_file(&p)?;
            mnt(Some(&d.path), &p, None, MsFlags::MS_BIND, None)?;
        } else {
            let dev_t = nix::sys::stat::makedev(d.major, d.minor);
            nix::sys::stat::mknod(&p, d.kind, Mode::from_bits_truncate(d.mode), dev_t)
                .ctx(|| format!("mknod {}", d.path.display()))?;
            // mknod applies the umask; the spec's mode is what the container must see.
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(d.mode))
                .ctx(|| format!("chmod {}", d.path.display()))?;
            nix::unistd::chown(&p, Some(d.uid.into()), Some(d.gid.into()))
                .ctx(|| format!("chown {}", d.path.display()))?;
        }
    }
    let links = [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    for (target, name) in links {
        let p = dev.join(name);
        if p.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(target, &p).ctx(|| format!("symlink /dev/{name}"))?;
        }
    }
    let ptmx = dev.join("ptmx");
    if dev.join("pts/ptmx").exists() {
        if ptmx.symlink_metadata().is_ok() {
            let _ = std::fs::remove_file(&ptmx);
        }
        std::os::unix::fs::symlink("pts/ptmx", &ptmx).ctx(|| "symlink /dev/ptmx".into())?;
    }
    Ok(())
}

/// Mount the root filesystem and everything in it, pivot into it, then mask and protect.
fn setup_rootfs(plan: &Plan) -> R {
    // Nothing mounted from here on may propagate back to the host.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let root = &plan.rootfs;
    match &plan.overlay {
        Some(o) => {
            let lower: Vec<String> = o
                .lower_dirs
                .iter()
                .rev()
                .map(|p| p.display().to_string())
                .collect();
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.join(":"),
                o.upper.display(),
                o.work.display()
            );
            ensure_dir(root)?;
            mnt(
                Some(Path::new("overlay")),
                root,
                Some("overlay"),
                MsFlags::empty(),
                Some(&data),
            )?;
        }
        None => mnt(
            Some(root),
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?,
    }
    for m in &plan.mounts {
        mount_one(root, m, plan)?;
    }
    make_devices(root, plan)?;

    std::env::set_current_dir(root).ctx(|| format!("chdir {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    // The old root is stacked under the new one; detach it so the host is out of sight.
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach the old root".into())?;
    std::env::set_current_dir("/").ctx(|| "chdir /".into())?;

    for p in &plan.masked {
        match std::fs::metadata(p) {
            Ok(md) if md.is_dir() => mnt(
                Some(Path::new("tmpfs")),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )?,
            Ok(_) => mnt(
                Some(Path::new("/dev/null")),
                p,
                None,
                MsFlags::MS_BIND,
                None,
            )?,
            Err(_) => {}
        }
    }
    for p in &plan.readonly {
        if p.exists() {
            mnt(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
            remount_ro(p, MsFlags::MS_REC)?;
        }
    }
    if plan.readonly_root {
        remount_ro(Path::new("/"), MsFlags::empty())?;
    }
    if let Some(p) = plan.root_propagation {
        mnt(None, Path::new("/"), None, p, None)?;
    }
    Ok(())
}

fn setns_path(path: &Path, flag: CloneFlags) -> R {
    let f = std::fs::File::open(path).ctx(|| format!("open namespace {}", path.display()))?;
    nix::sched::setns(f, flag).ctx(|| format!("join namespace {}", path.display()))
}

/// The init's work between clone and start: namespaces, rootfs, hostname, sysctl.
///
/// `go` blocks until the creator has put this process in its cgroup (and written the id maps
/// of a new user namespace). Without a new user namespace the rootfs is set up while the
/// creator does that, since a cgroup migration can cost an RCU grace period (~10 ms).
pub fn prepare(plan: &Plan, go: &mut dyn FnMut() -> R) -> R {
    let mut waited = false;
    if plan.new_user_ns {
        go()?;
        waited = true;
        // The parent has written the id maps by now; act as root of the new namespace.
        nix::unistd::setresgid(0.into(), 0.into(), 0.into())
            .ctx(|| "become gid 0 in the user namespace".into())?;
        nix::unistd::setresuid(0.into(), 0.into(), 0.into())
            .ctx(|| "become uid 0 in the user namespace".into())?;
    }
    for (flag, path) in &plan.join {
        setns_path(path, *flag)?;
    }
    if plan.new_mount_ns {
        setup_rootfs(plan)?;
    } else {
        std::env::set_current_dir("/").ctx(|| "chdir /".into())?;
    }
    if let Some(h) = &plan.hostname {
        nix::unistd::sethostname(h).ctx(|| "sethostname".into())?;
    }
    if let Some(d) = &plan.domainname {
        // SAFETY: pointer and length of a live string.
        if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } < 0 {
            return Err(Fail(format!(
                "setdomainname: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    for (k, v) in &plan.sysctl {
        let p = format!("/proc/sys/{}", k.replace('.', "/"));
        std::fs::write(&p, v).ctx(|| format!("sysctl {k}"))?;
    }
    if let Some(adj) = plan.process.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .ctx(|| "oom_score_adj".into())?;
    }
    if !waited {
        go()?;
    }
    // Rooted at the container's cgroup, so only after the creator moved us there.
    if plan.new_cgroup_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).ctx(|| "new cgroup namespace".into())?;
    }
    Ok(())
}

fn find_executable(p: &ProcessPlan) -> R<CString> {
    let arg0 = p.args[0].as_bytes();
    if arg0.contains(&b'/') {
        return Ok(p.args[0].clone());
    }
    let name = std::ffi::OsStr::from_bytes(arg0);
    for dir in p.path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(name);
        if let Ok(md) = std::fs::metadata(&cand) {
            if md.is_file() && md.mode() & 0o111 != 0 {
                return CString::new(cand.as_os_str().as_bytes()).ctx(|| "executable path".into());
            }
        }
    }
    Err(Fail(format!(
        "exec: {:?}: executable file not found in $PATH",
        name
    )))
}

fn set_caps(c: &super::plan::CapsPlan) -> R {
    use caps::CapSet;
    for cap in caps::all() {
        if !c.bounding.contains(&cap) {
            // Unknown to the running kernel is fine; anything else is a real failure.
            if let Err(e) = caps::drop(None, CapSet::Bounding, cap) {
                if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                    return Err(Fail(format!("drop {cap} from the bounding set: {e}")));
                }
            }
        }
    }
    Ok(())
}

fn set_caps_after_user(c: &super::plan::CapsPlan) -> R {
    use caps::CapSet;
    caps::set(None, CapSet::Effective, &c.effective).ctx(|| "set effective capabilities".into())?;
    caps::set(None, CapSet::Permitted, &c.permitted).ctx(|| "set permitted capabilities".into())?;
    caps::set(None, CapSet::Inheritable, &c.inheritable)
        .ctx(|| "set inheritable capabilities".into())?;
    caps::clear(None, CapSet::Ambient).ctx(|| "clear ambient capabilities".into())?;
    // The kernel only lets a capability be ambient when it is permitted and inheritable; runc
    // skips the others the same way (its default spec lists ambient caps with no inheritable).
    for cap in c
        .ambient
        .iter()
        .filter(|cap| c.permitted.contains(cap) && c.inheritable.contains(cap))
    {
        caps::raise(None, CapSet::Ambient, *cap).ctx(|| format!("raise ambient {cap}"))?;
    }
    Ok(())
}

/// Become the spec's process and exec it: rlimits, bounding set, ids, capabilities, umask,
/// cwd (verified inside the root), no_new_privs, every fd above 2 closed but `keep`
/// (close-on-exec), seccomp last. Returns only on failure.
pub fn exec_process(p: &ProcessPlan, keep: &[RawFd]) -> R {
    for &(res, soft, hard) in &p.rlimits {
        let rl = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: a valid rlimit struct.
        if unsafe { libc::setrlimit(res, &rl) } < 0 {
            return Err(Fail(format!(
                "setrlimit {res}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    // Nothing from the host may be reachable from the new process: only stdio and our own
    // close-on-exec channel stay open, so no cwd or path can go through a leaked fd.
    super::sys::close_fds_except(3, keep)
        .map_err(|e| Fail(format!("close inherited files: {e}")))?;
    if let Some(f) = &p.seccomp {
        if !p.no_new_privs {
            // Without no_new_privs the filter needs CAP_SYS_ADMIN, which is about to go.
            f.install().ctx(|| "install seccomp filter".into())?;
        }
    }
    if let Some(c) = &p.caps {
        set_caps(c)?;
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let gids: Vec<nix::unistd::Gid> = p.additional_gids.iter().map(|g| (*g).into()).collect();
    nix::unistd::setgroups(&gids).ctx(|| "setgroups".into())?;
    nix::unistd::setresgid(p.gid.into(), p.gid.into(), p.gid.into())
        .ctx(|| format!("setgid {}", p.gid))?;
    nix::unistd::setresuid(p.uid.into(), p.uid.into(), p.uid.into())
        .ctx(|| format!("setuid {}", p.uid))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if let Some(c) = &p.caps {
        set_caps_after_user(c)?;
    }
    if let Some(m) = p.umask {
        nix::sys::stat::umask(Mode::from_bits_truncate(m));
    }
    std::env::set_current_dir(&p.cwd).ctx(|| format!("chdir to cwd {}", p.cwd.display()))?;
    // A cwd outside the root reads back as "(unreachable)…" or fails (CVE-2024-21626).
    match nix::unistd::getcwd() {
        Ok(c) if c.is_absolute() => {}
        _ => {
            return Err(Fail(format!(
                "cwd {} is outside the container root",
                p.cwd.display()
            )))
        }
    }
    if p.no_new_privs {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(Fail(format!(
                "no_new_privs: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    let exe = find_executable(p)?;
    if let Some(f) = &p.seccomp {
        if p.no_new_privs {
            f.install().ctx(|| "install seccomp filter".into())?;
        }
    }
    let err = nix::unistd::execve(&exe, &p.args, &p.env).unwrap_err();
    Err(Fail(format!("exec {}: {err}", exe.to_string_lossy())))
}
