//! Thin wrappers over the Linux calls nix 0.29 lacks (pidfds, close_range, clone with flags).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A pidfd for `pid` (Linux 5.3+): signals reach exactly that process, and it polls readable
/// when the process exits, for children and non-children alike.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned by us.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Send `sig` through a pidfd.
pub fn pidfd_send_signal(fd: RawFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with a null siginfo.
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// Wait until the pidfd polls readable (the process exited) or `timeout_ms` passes (-1: forever).
/// Returns whether it exited.
pub fn pidfd_wait(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// Close every fd from `first` up, except those in `keep` (sorted ascending, all >= first).
/// An error means some may still be open: the caller must not go on to run anything that
/// should not hold them (a container's process).
pub fn close_fds_except(first: u32, keep: &[RawFd]) -> io::Result<()> {
    let mut lo = first;
    for &k in keep {
        let k = k as u32;
        if k >= lo {
            if k > lo {
                close_range(lo, k - 1)?;
            }
            lo = k + 1;
        }
    }
    close_range(lo, u32::MAX)
}

/// Most fds closed one by one where `close_range` is missing.
const MAX_FDS_CLOSED_ONE_BY_ONE: u64 = 1 << 20;

/// `close_range(lo, hi)`; where the kernel lacks it (before 5.9) or a seccomp filter refuses
/// it, `close` on each fd up to the open-files limit. Never allocates (it runs after fork).
pub fn close_range(lo: u32, hi: u32) -> io::Result<()> {
    // SAFETY: closing fds we own by number; nothing else refers to them after fork.
    if unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
        return Err(e);
    }
    close_each(lo, hi)
}

/// `close` on each fd from `lo` to `hi` (or the open-files limit, if lower).
fn close_each(lo: u32, hi: u32) -> io::Result<()> {
    if lo > hi {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit struct to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = rl
        .rlim_cur
        .max(rl.rlim_max)
        .min(MAX_FDS_CLOSED_ONE_BY_ONE)
        .min(u64::from(hi) + 1);
    for fd in u64::from(lo)..end {
        // SAFETY: as above; EBADF for fds not open is expected.
        unsafe { libc::close(fd as libc::c_int) };
    }
    Ok(())
}

/// Fork with namespace flags (the raw clone syscall with no new stack behaves like fork).
/// Only call from a single-threaded process.
pub fn clone_fork(flags: libc::c_int) -> io::Result<i32> {
    // SAFETY: SIGCHLD | namespace flags with a null stack gives fork semantics; the caller is
    // single-threaded so the child's copy of the address space is consistent.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    Ok(check(r)? as i32)
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat): with the pid
/// it names one process for its whole life.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// True when `pid` is alive and is the process that started at `start`.
pub fn same_process(pid: i32, start: u64) -> bool {
    pid > 0 && start_time(pid) == Some(start)
}

/// Write all of `buf` to a raw fd (retrying on EINTR and short writes).
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Read from a raw fd into `buf`, retrying on EINTR.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid mutable slice.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n as usize);
    }
}

/// A pipe with both ends close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// An fd on /dev/null numbered at least `at` (far above what the test harness holds).
    fn open_fd(at: RawFd) -> RawFd {
        let f = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        // SAFETY: duplicating an fd we own; then closing the original.
        let d = unsafe { libc::fcntl(f, libc::F_DUPFD_CLOEXEC, at) };
        unsafe { libc::close(f) };
        assert!(d >= at);
        d
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the fd's flags.
        let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        r >= 0
    }

    #[test]
    fn close_range_closes_and_reports_its_errors() {
        for close in [close_range, close_each] {
            let a = open_fd(3000);
            let b = open_fd(a + 1);
            let (lo, hi) = (a, b);
            close(lo as u32, hi as u32).unwrap();
            assert!(!is_open(a) && !is_open(b));
            // A range the kernel refuses is an error, not silently nothing closed.
            let e = close(10, 5).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        }
    }
}
