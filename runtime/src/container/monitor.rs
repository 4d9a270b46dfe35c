//! The per-container monitor: a fork of the creating process (never an exec, so it starts with
//! almost nothing of its own) that is reparented away from the caller, forks the container's
//! init as its only child, copies the init's stdout and stderr into a size-capped rotated log (one record per line with
//! its stream and time, `crate::logfile`), and records
//! the exit status durably in the state dir. `wait` waits on it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use super::init::{self, Fail};
use super::plan::Plan;
use super::state::{self, ExitStatus};
use super::sys;
use super::{LogConfig, Stdio};
use crate::logfile::{now_ns, LineFramer, Stream};

/// Bytes read from the log pipe per read (the monitor's largest buffer).
const LOG_CHUNK: usize = 16 * 1024;
/// How long the monitor keeps copying output after the init died (writers left in the
/// container die with its pid namespace, so this is rarely reached).
const LOG_DRAIN_TIMEOUT_MS: i32 = 1000;
/// Longest error line sent to the creator (a pipe write up to PIPE_BUF is atomic).
const MAX_MESSAGE: usize = 3000;

/// The fds and paths the children inherit from `Container::create`.
pub struct Launch<'a> {
    pub to_creator: RawFd,
    pub go: RawFd,
    pub listen: RawFd,
    pub state_dir: &'a Path,
    pub log: Option<&'a LogConfig>,
    pub stdio: Stdio,
}

/// Send one line to the creator; a gone creator is not an error (EPIPE is ignored).
pub fn send(fd: RawFd, line: &str) {
    let mut s: String = line.chars().take(MAX_MESSAGE).collect();
    s = s.replace('\n', " ");
    s.push('\n');
    let _ = sys::write_all(fd, s.as_bytes());
}

/// The intermediate child: leave the caller's session, fork the monitor, and exit so the
/// monitor is reparented (to init or the nearest subreaper) and the caller reaps nothing later.
pub fn intermediate(plan: &Plan, l: &Launch) -> ! {
    let _ = nix::unistd::setsid();
    // SAFETY: this process is a single-threaded fork.
    match unsafe { libc::fork() } {
        0 => monitor(plan, l),
        -1 => {
            send(
                l.to_creator,
                &format!("error fork monitor: {}", std::io::Error::last_os_error()),
            );
            // SAFETY: leaving a forked child without running the parent's destructors.
            unsafe { libc::_exit(1) }
        }
        // SAFETY: as above.
        _ => unsafe { libc::_exit(0) },
    }
}

fn monitor(plan: &Plan, l: &Launch) -> ! {
    match run_monitor(plan, l) {
        Ok(()) => {}
        Err(Fail(msg)) => send(l.to_creator, &format!("error {msg}")),
    }
    // SAFETY: leaving a forked child without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

fn dev_null() -> Result<File, Fail> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Fail(format!("open /dev/null: {e}")))
}

fn run_monitor(plan: &Plan, l: &Launch) -> Result<(), Fail> {
    // Drop every fd the caller had open, keeping only our channels and stdio (still needed
    // for an init that inherits it).
    let mut keep = vec![l.to_creator, l.go, l.listen];
    keep.sort_unstable();
    sys::close_fds_except(3, &keep).map_err(|e| Fail(format!("close inherited files: {e}")))?;
    // SAFETY: setting a signal disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Held by fd, so a status written late can never land in a newer container's dir that
    // reuses the name after a delete.
    let state_dir = File::open(l.state_dir)
        .map_err(|e| Fail(format!("open {}: {e}", l.state_dir.display())))?;
    if let Some(p) = &plan.join_pid {
        let f = File::open(p).map_err(|e| Fail(format!("open namespace {}: {e}", p.display())))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(|e| Fail(format!("join pid namespace {}: {e}", p.display())))?;
    }
    // One pipe per stream, so every line keeps where it came from.
    let log_pipes = match l.log {
        Some(_) => Some((
            sys::pipe().map_err(|e| Fail(format!("log pipe: {e}")))?,
            sys::pipe().map_err(|e| Fail(format!("log pipe: {e}")))?,
        )),
        None => None,
    };
    let pid = sys::clone_fork(plan.clone_flags)
        .map_err(|e| Fail(format!("clone container init: {e}")))?;
    if pid == 0 {
        let out = log_pipes
            .as_ref()
            .map(|((_, o), (_, e))| (o.as_raw_fd(), e.as_raw_fd()));
        let r = init_main(plan, l, out);
        if let Err(Fail(msg)) = r {
            send(l.to_creator, &format!("error {msg}"));
        }
        // SAFETY: leaving the forked init after a failure.
        unsafe { libc::_exit(127) }
    }
    send(l.to_creator, &format!("pid {} {}", std::process::id(), pid));
    // SAFETY: closing our copies of fds the init owns now.
    unsafe {
        libc::close(l.go);
        libc::close(l.listen);
    }
    let log_rd = log_pipes.map(|((o, ow), (e, ew))| {
        drop((ow, ew));
        (o, e)
    });
    // Hold nothing of the caller's: no terminal, no pipes, no cwd on a mount.
    if let Ok(null) = dev_null() {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    let _ = std::env::set_current_dir("/");
    // SAFETY: releasing free heap pages back to the kernel.
    unsafe { libc::malloc_trim(0) };
    let pidfd = sys::pidfd_open(pid).map_err(|e| Fail(format!("pidfd of init: {e}")))?;
    shed_inherited_pages();
    if let (Some((out, err)), Some(cfg)) = (&log_rd, l.log) {
        copy_log(out.as_raw_fd(), err.as_raw_fd(), pidfd.as_raw_fd(), cfg);
    }
    let status = reap(pid);
    // Announce first (a foreground `run` deletes the container next and needs no disk), then
    // record durably: temp file, fsync, rename, fsync of the dir.
    let line = format!(
        "exit {} {}",
        status.code.unwrap_or(-1),
        status.signal.unwrap_or(0)
    );
    send(l.to_creator, &line);
    let data = serde_json::to_vec(&status).map_err(|e| Fail(e.to_string()))?;
    record_exit(&state_dir, &data).map_err(|e| Fail(format!("record exit status: {e}")))?;
    send(l.to_creator, "recorded");
    Ok(())
}

fn record_exit(dir: &File, data: &[u8]) -> std::io::Result<()> {
    use nix::fcntl::{openat, renameat, OFlag};
    use nix::sys::stat::Mode;
    let tmp = format!(".{}.tmp", state::EXIT_FILE);
    let fd = openat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    // SAFETY: openat just returned this fd and nothing else owns it.
    let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    renameat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(dir.as_raw_fd()),
        state::EXIT_FILE,
    )?;
    dir.sync_all()
}

/// Give back the pages the monitor inherited but will not touch while it waits: file-backed
/// mappings that were never written (code, read-only data of the runtime and libc; re-read
/// from the page cache if ever needed) and the unused depth of the caller's stack. Mappings
/// holding private copies (relocated data, heap) stay.
fn shed_inherited_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let here = 0u8;
    let sp = &here as *const u8 as usize;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // (start, end, no private page seen so far, read-only file mapping)
    let mut cur: Option<(usize, usize, bool, bool)> = None;
    let mut ranges = Vec::new();
    let mut mixed = Vec::new();
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                match cur.take() {
                    Some((s0, e0, true, true)) => ranges.push((s0, e0)),
                    Some((s0, e0, false, true)) => mixed.push((s0, e0)),
                    _ => {}
                }
                let perms = f.next().unwrap_or("");
                let path = f.nth(3).unwrap_or("");
                let file_ro =
                    path.starts_with('/') && perms.starts_with('r') && !perms.contains('w');
                cur = Some((start, end, true, file_ro));
                if path == "[stack]" && sp > start && sp < end {
                    // Everything two pages below the current frame is dead stack.
                    let top = sp.saturating_sub(2 * page) & !(page - 1);
                    if top > start {
                        ranges.push((start, top));
                    }
                }
                continue;
            }
        }
        // A private copy (a relocated page) would be lost by dropping: keep such mappings.
        if first == "Anonymous:" && f.next() != Some("0") {
            // (a mapping with private pages is handled page by page below)
            if let Some(c) = cur.as_mut() {
                c.2 = false;
            }
        }
    }
    match cur {
        Some((s0, e0, true, true)) => ranges.push((s0, e0)),
        Some((s0, e0, false, true)) => mixed.push((s0, e0)),
        _ => {}
    }
    // In a mapping holding a few private pages (relocated read-only data), drop only the
    // pages /proc/self/pagemap reports as present file pages.
    if let Ok(pm) = File::open("/proc/self/pagemap") {
        use std::os::unix::fs::FileExt;
        for (start, end) in mixed {
            let n = (end - start) / page;
            let mut buf = vec![0u8; n * 8];
            if pm
                .read_exact_at(&mut buf, (start / page * 8) as u64)
                .is_err()
            {
                continue;
            }
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                let (present, file) = (v & (1 << 63) != 0, v & (1 << 61) != 0);
                if present && file {
                    ranges.push((start + i * page, start + (i + 1) * page));
                }
            }
        }
    }
    for (start, end) in ranges {
        // SAFETY: read-only file mappings with no private pages (re-faulted from the file)
        // and stack pages below the live frames.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

fn reap(pid: i32) -> ExitStatus {
    let mut st = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return ExitStatus {
                code: None,
                signal: None,
            };
        }
    }
    if libc::WIFEXITED(st) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(st)),
            signal: None,
        }
    } else {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(st)),
        }
    }
}

/// The init's side: stdio, then namespaces and rootfs, then wait for `start`, then exec.
fn init_main(plan: &Plan, l: &Launch, log_out: Option<(RawFd, RawFd)>) -> Result<(), Fail> {
    // SAFETY: signal and prctl calls with plain arguments. Rust ignores SIGPIPE and an ignored
    // signal survives exec, so the container gets the default back.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Until exec, this process is the runtime's image: keep /proc/1/exe and ptrace closed
        // to anything in the container (exec resets this for the real process).
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // A monitor that dies during setup takes the half-made container with it.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    match (log_out, l.stdio) {
        (Some((out, err)), _) => {
            let null = dev_null()?;
            dup_to(null.as_raw_fd(), 0)?;
            dup_to(out, 1)?;
            dup_to(err, 2)?;
        }
        (None, Stdio::Null) => {
            let null = dev_null()?;
            for fd in 0..3 {
                dup_to(null.as_raw_fd(), fd)?;
            }
        }
        (None, Stdio::Inherit) => {}
    }
    let mut keep = vec![l.to_creator, l.go, l.listen];
    keep.sort_unstable();
    sys::close_fds_except(3, &keep).map_err(|e| Fail(format!("close inherited files: {e}")))?;

    let go_fd = l.go;
    let mut go = || -> Result<(), Fail> {
        let mut b = [0u8; 1];
        match sys::read(go_fd, &mut b) {
            Ok(1) => {}
            _ => {
                return Err(Fail(
                    "creator went away before the container was set up".into(),
                ))
            }
        }
        // SAFETY: closing a fd we own.
        unsafe { libc::close(go_fd) };
        Ok(())
    };
    init::prepare(plan, &mut go)?;
    send(l.to_creator, "ready");
    // SAFETY: as above.
    unsafe { libc::close(l.to_creator) };

    // SAFETY: accept on our listening socket; the connection is close-on-exec so its EOF
    // tells `start` the exec happened.
    let conn = unsafe {
        libc::accept4(
            l.listen,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        return Err(Fail(format!(
            "wait for start: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: closing a fd we own; clearing the parent-death signal so the container's process
    // is not tied to the monitor's life once it runs.
    unsafe {
        libc::close(l.listen);
        libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0);
    }
    if let Err(Fail(msg)) = init::exec_process(&plan.process, &[conn]) {
        send(conn, &format!("error {msg}"));
    }
    // SAFETY: leaving after a failed exec.
    unsafe { libc::_exit(127) }
}

fn dup_to(from: RawFd, to: RawFd) -> Result<(), Fail> {
    nix::unistd::dup2(from, to)
        .map(drop)
        .map_err(|e| Fail(format!("dup2 to fd {to}: {e}")))
}

/// Copy the init's stdout and stderr into the log, one record per line (see
/// [`crate::logfile`]), until the init exits and its output is drained.
fn copy_log(out: RawFd, err: RawFd, pidfd: RawFd, cfg: &LogConfig) {
    let mut log = RotatingLog::open(cfg);
    let mut buf = vec![0u8; LOG_CHUNK];
    let mut framed = Vec::with_capacity(2 * LOG_CHUNK);
    let mut framers = [LineFramer::default(), LineFramer::default()];
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut open = [true, true];
    let mut exited = false;
    while open[0] || open[1] {
        let fd_of = |i: usize| if open[i] { [out, err][i] } else { -1 };
        let mut fds = [
            libc::pollfd {
                fd: fd_of(0),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fd_of(1),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if exited { -1 } else { pidfd },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if exited { LOG_DRAIN_TIMEOUT_MS } else { -1 };
        // SAFETY: three valid pollfds (a negative fd is ignored by poll).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if r == 0 {
            break; // drain timed out
        }
        for i in 0..2 {
            if fds[i].revents == 0 {
                continue;
            }
            match sys::read(fds[i].fd, &mut buf) {
                Ok(0) | Err(_) => open[i] = false,
                Ok(k) => {
                    framed.clear();
                    framers[i].push(&mut framed, now_ns(), streams[i], &buf[..k]);
                    if let Some(l) = log.as_mut() {
                        l.write(&framed);
                    }
                }
            }
        }
        if fds[2].revents != 0 {
            exited = true;
        }
    }
    // Output that ended without a newline is kept as a piece of a line.
    for i in 0..2 {
        framed.clear();
        framers[i].finish(&mut framed, now_ns(), streams[i]);
        if let Some(l) = log.as_mut() {
            l.write(&framed);
        }
    }
}

/// The log file and its rotated predecessors `path.1` … `path.N`.
struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
}

impl RotatingLog {
    fn open(cfg: &LogConfig) -> Option<RotatingLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .ok()?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Some(RotatingLog {
            path: cfg.path.clone(),
            max_bytes: cfg.max_bytes.max(1),
            max_files: cfg.max_files,
            file,
            size,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) {
        if self.max_files == 0 {
            let _ = self.file.set_len(0);
        } else {
            let _ = std::fs::remove_file(self.rotated(self.max_files));
            for n in (1..self.max_files).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            let _ = std::fs::rename(&self.path, self.rotated(1));
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => self.file = f,
                Err(_) => return,
            }
        }
        self.size = 0;
    }

    /// Writes whole records (`data` ends with a newline), rotating at a record boundary so
    /// that no record is split between two files: a file holds at most `max_bytes`, or one
    /// record when a single record is larger.
    fn write(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let room = self.max_bytes.saturating_sub(self.size) as usize;
            // The records that fit whole, at least one in an empty file.
            let mut n = 0;
            for (i, b) in rest.iter().enumerate() {
                if *b == b'\n' {
                    if i < room || (n == 0 && self.size == 0) {
                        n = i + 1;
                    } else {
                        break;
                    }
                }
            }
            if n == 0 {
                if self.size == 0 {
                    n = rest.len();
                } else {
                    self.rotate();
                    if self.size != 0 {
                        return; // could not rotate: drop rather than grow past the cap
                    }
                    continue;
                }
            }
            if self.file.write_all(&rest[..n]).is_err() {
                return;
            }
            self.size += n as u64;
            rest = &rest[n..];
        }
    }
}
