//! Bind sources as the init opens them for shoal's own mounts (volumes and `-v`/`--mount`
//! binds): the source path is walked from `/` one component at a time without following a
//! symlink, and the mount is made from the fd that walk ends on, so the init mounts exactly
//! the path that was checked on the host before, or nothing. And docker's copy of an image's
//! content into an empty volume, done with `*at` calls that never follow a symlink on either
//! side (the volume may be shared with a running container that plants one).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use super::init::Fail;

type R<T = ()> = Result<T, Fail>;

/// Directory levels a copy descends at most (each holds two fds while it is copied).
const MAX_COPY_DEPTH: usize = 256;

fn openat(dir: Option<RawFd>, name: &OsStr, flags: OFlag) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(dir, name, flags | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: a fresh fd from openat, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `path` (absolute) opened `O_PATH` by a walk from `/` that follows no symlink in any
/// component, the last one included. Returns the fd and what it is.
pub fn open_nofollow(path: &Path) -> R<(OwnedFd, FileStat)> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(Fail(format!("bind source {shown} is not absolute")));
    }
    let mut cur = openat(None, OsStr::new("/"), OFlag::O_PATH | OFlag::O_DIRECTORY)
        .map_err(|e| Fail(format!("open /: {e}")))?;
    let names: Vec<&OsStr> = path
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(Some(n)),
            Component::RootDir | Component::CurDir => Ok(None),
            _ => Err(Fail(format!("bind source {shown} holds '..'"))),
        })
        .collect::<R<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    for (i, n) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let mut flags = OFlag::O_PATH | OFlag::O_NOFOLLOW;
        if !last {
            flags |= OFlag::O_DIRECTORY;
        }
        cur = openat(Some(cur.as_raw_fd()), n, flags).map_err(|e| {
            let upto: std::path::PathBuf = names[..=i].iter().collect();
            match e {
                Errno::ENOTDIR | Errno::ELOOP => Fail(format!(
                    "bind source {shown}: /{} is now a symlink or not a directory; it is not followed",
                    upto.display()
                )),
                e => Fail(format!("bind source {shown}: open /{}: {e}", upto.display())),
            }
        })?;
    }
    let st = nix::sys::stat::fstat(cur.as_raw_fd())
        .map_err(|e| Fail(format!("bind source {shown}: stat: {e}")))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
        return Err(Fail(format!(
            "bind source {shown} is now a symlink; it is not followed"
        )));
    }
    Ok((cur, st))
}

/// The `/proc/self/fd/N` path of an fd, for mounting or reopening what it holds.
pub fn proc_fd(fd: RawFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Whether a stat is of a directory.
pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Names in directory `fd` (not `.` and `..`), read through a dup of it.
fn names(fd: RawFd) -> nix::Result<Vec<OsString>> {
    let dup = nix::unistd::dup(fd)?;
    let mut dir = nix::dir::Dir::from_fd(dup)?;
    let mut out = Vec::new();
    for e in dir.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(out)
}

/// Docker's copy of an image's files into an empty volume: when the directory open at
/// `volume` (an `O_PATH` fd of the volume's `_data`) is empty and `from` (the destination in
/// the container's rootfs, resolved inside it) is a directory, its content is copied in and
/// the volume's root takes `from`'s owner and mode. Under an flock on the volume, so that two
/// containers starting on one empty volume copy once.
pub fn copy_up(from: &Path, volume: RawFd) -> R {
    let fail =
        |what: &str, e: nix::Error| Fail(format!("copy image content into volume: {what}: {e}"));
    let dst = openat(
        None,
        proc_fd(volume).as_os_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
    )
    .map_err(|e| fail("open the volume", e))?;
    let dst = nix::fcntl::Flock::lock(dst, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| fail("lock the volume", e))?;
    if !names(dst.as_raw_fd())
        .map_err(|e| fail("read the volume", e))?
        .is_empty()
    {
        return Ok(());
    }
    let src = match openat(
        None,
        from.as_os_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
    ) {
        Ok(fd) => fd,
        // Nothing there in the image (or not a directory): nothing to copy.
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(()),
        Err(e) => return Err(fail(&format!("open {}", from.display()), e)),
    };
    copy_dir(src.as_raw_fd(), dst.as_raw_fd(), 0).map_err(|(p, e)| fail(&p, e))?;
    let st = nix::sys::stat::fstat(src.as_raw_fd()).map_err(|e| fail("stat", e))?;
    set_owner_mode_times(dst.as_raw_fd(), &st).map_err(|e| fail("the volume's root", e))
}

fn set_owner_mode_times(fd: RawFd, st: &FileStat) -> nix::Result<()> {
    nix::unistd::fchown(fd, Some(st.st_uid.into()), Some(st.st_gid.into()))?;
    // After the chown, which clears set-id bits.
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    nix::sys::stat::futimens(fd, &atime(st), &mtime(st))
}

fn atime(st: &FileStat) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(st.st_atime, st.st_atime_nsec)
}

fn mtime(st: &FileStat) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(st.st_mtime, st.st_mtime_nsec)
}

/// Copies what directory `src` holds into directory `dst`: directories, regular files (by
/// content: hard links become copies), symlinks (as links, never followed) and fifos, with
/// owners, modes and times; device nodes and sockets are left out. Errors name the entry.
fn copy_dir(src: RawFd, dst: RawFd, depth: usize) -> Result<(), (String, nix::Error)> {
    if depth >= MAX_COPY_DEPTH {
        return Err(("directories nested too deep".into(), Errno::ELOOP));
    }
    fn ctx(n: &OsStr) -> impl FnOnce(nix::Error) -> (String, nix::Error) + '_ {
        move |e| (Path::new(n).display().to_string(), e)
    }
    for name in names(src).map_err(|e| ("read directory".to_string(), e))? {
        let name = name.as_os_str();
        let st = nix::sys::stat::fstatat(Some(src), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(ctx(name))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            nix::sys::stat::mkdirat(Some(dst), name, Mode::from_bits_truncate(0o700))
                .map_err(ctx(name))?;
            let s = openat(
                Some(src),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            )
            .map_err(ctx(name))?;
            let d = openat(
                Some(dst),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            )
            .map_err(ctx(name))?;
            copy_dir(s.as_raw_fd(), d.as_raw_fd(), depth + 1)
                .map_err(|(p, e)| (format!("{}/{p}", Path::new(name).display()), e))?;
            set_owner_mode_times(d.as_raw_fd(), &st).map_err(ctx(name))?;
        } else if kind == SFlag::S_IFREG {
            let s =
                openat(Some(src), name, OFlag::O_RDONLY | OFlag::O_NOFOLLOW).map_err(ctx(name))?;
            let fd = nix::fcntl::openat(
                Some(dst),
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(ctx(name))?;
            // SAFETY: a fresh fd from openat, owned by the File.
            let mut out = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut input = std::fs::File::from(s);
            copy_bytes(&mut input, &mut out).map_err(ctx(name))?;
            set_owner_mode_times(out.as_raw_fd(), &st).map_err(ctx(name))?;
        } else if kind == SFlag::S_IFLNK {
            let target = nix::fcntl::readlinkat(Some(src), name).map_err(ctx(name))?;
            nix::unistd::symlinkat(target.as_os_str(), Some(dst), name).map_err(ctx(name))?;
            nix::unistd::fchownat(
                Some(dst),
                name,
                Some(st.st_uid.into()),
                Some(st.st_gid.into()),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(ctx(name))?;
            nix::sys::stat::utimensat(
                Some(dst),
                name,
                &atime(&st),
                &mtime(&st),
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(ctx(name))?;
        } else if kind == SFlag::S_IFIFO {
            nix::unistd::mkfifoat(Some(dst), name, Mode::from_bits_truncate(0o600))
                .map_err(ctx(name))?;
            let f =
                openat(Some(dst), name, OFlag::O_PATH | OFlag::O_NOFOLLOW).map_err(ctx(name))?;
            let at = proc_fd(f.as_raw_fd());
            nix::unistd::chown(&at, Some(st.st_uid.into()), Some(st.st_gid.into()))
                .map_err(ctx(name))?;
            nix::sys::stat::fchmodat(
                None,
                &at,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(ctx(name))?;
        }
    }
    Ok(())
}

fn copy_bytes(input: &mut std::fs::File, out: &mut std::fs::File) -> nix::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
        };
        std::io::Write::write_all(out, &buf[..n])
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_symlink_anywhere_in_the_source_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        std::os::unix::fs::symlink(real.join("sub"), real.join("sublink")).unwrap();
        let (_, st) = open_nofollow(&real.join("sub")).unwrap();
        assert!(is_dir(&st));
        for p in [d.path().join("link/sub"), real.join("sublink")] {
            let e = open_nofollow(&p).expect_err("refused").0;
            assert!(e.contains("not followed"), "{e}");
        }
        assert!(open_nofollow(Path::new("rel")).is_err());
        assert!(open_nofollow(&real.join("missing")).is_err());
    }

    #[test]
    fn copy_up_fills_only_an_empty_volume_and_follows_no_link() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        std::fs::create_dir_all(img.join("sub")).unwrap();
        std::fs::write(img.join("sub/f"), b"content").unwrap();
        std::fs::set_permissions(img.join("sub/f"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", img.join("link")).unwrap();
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o1777)).unwrap();
        nix::unistd::chown(&img.join("sub/f"), Some(1234.into()), Some(99.into())).unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let (fd, _) = open_nofollow(&vol).unwrap();
        copy_up(&img, fd.as_raw_fd()).unwrap();
        assert_eq!(std::fs::read(vol.join("sub/f")).unwrap(), b"content");
        let md = std::fs::metadata(vol.join("sub/f")).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (1234, 99, 0o640));
        assert_eq!(
            std::fs::read_link(vol.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(std::fs::metadata(&vol).unwrap().mode() & 0o7777, 0o1777);
        // Not empty any more: a second copy changes nothing.
        std::fs::remove_file(vol.join("sub/f")).unwrap();
        copy_up(&img, fd.as_raw_fd()).unwrap();
        assert!(!vol.join("sub/f").exists());
        // Nothing at the path in the image: nothing copied, no error.
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let (fd, _) = open_nofollow(&empty).unwrap();
        copy_up(&d.path().join("nothing"), fd.as_raw_fd()).unwrap();
        assert!(std::fs::read_dir(&empty).unwrap().next().is_none());
    }
}
