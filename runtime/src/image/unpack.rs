//! Safe unpacking of one untrusted layer tar into its own directory, in overlayfs form.
//!
//! Every file is created relative to a directory fd reached by walking real directories with
//! `O_NOFOLLOW`, so no symlink — in the layer or planted by an earlier entry — is ever followed.
//! Policy (kept deliberately narrow, see ARCHITECTURE.md):
//! - entry names: a leading `/` is dropped, `.` ignored, `..` refused; a parent that is a
//!   symlink or a non-directory is refused;
//! - symlinks are created with any target (never followed here);
//! - hardlinks must name a non-directory already unpacked in this layer, not through a
//!   symlink, and not a symlink that leads out of the layer;
//! - character and block devices are skipped (a runtime gives containers its own /dev, and a
//!   0/0 character device would otherwise forge a whiteout); FIFOs are created;
//! - whiteouts `.wh.NAME` become 0/0 character devices, `.wh..wh..opq` sets
//!   `trusted.overlay.opaque=y` on its directory, other `.wh..wh.*` aufs metadata is skipped;
//! - ownership, mode (setuid/setgid/sticky included) and mtime are kept; only the
//!   `security.capability` and `user.*` xattrs are applied (never `trusted.*`, which overlayfs
//!   interprets).

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use sha2::{Digest as _, Sha256};

use super::ImageError;

/// Most entries one layer may hold (bounds memory for deferred directory times too).
pub const MAX_LAYER_ENTRIES: u64 = 1 << 20;
/// A compressed layer may expand to this many bytes whatever its size...
pub const EXPANSION_FLOOR: u64 = 256 << 20;
/// ...and past that to this many times the compressed bytes read so far: a decompression
/// bomb (a few MiB of gzip that inflate to the whole disk) stops here. Real layers expand
/// 2–10 times.
pub const EXPANSION_RATIO: u64 = 100;
/// Reads from a layer's stream and writes of its files go through buffers this large.
const COPY_BUFFER: usize = 256 << 10;
/// A file at least this large has its writeback started as soon as it is written, so that the
/// one sync before the layer is committed finds little left to write.
pub const WRITEBACK_FROM: u64 = 1 << 20;
/// Longest entry path accepted (Linux PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;
/// Longest single path component (NAME_MAX).
const MAX_NAME_BYTES: usize = 255;
/// Deepest directory nesting accepted.
const MAX_DEPTH: usize = 256;
/// Most symlinks followed when checking whether a hardlinked symlink stays inside the layer.
const MAX_SYMLINK_HOPS: usize = 40;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Environment variable overriding [`UnpackBudget::layer_bytes`].
pub const LAYER_BUDGET_ENV: &str = "SHOAL_MAX_LAYER_BYTES";
/// Environment variable overriding [`UnpackBudget::image_bytes`].
pub const IMAGE_BUDGET_ENV: &str = "SHOAL_MAX_IMAGE_BYTES";

/// How many bytes of file contents unpacking may write: per layer, and for all the layers one
/// load, import, pull or run unpacks together (an image). A sparse file's holes are written
/// as zeros and count; so does whatever a small, highly compressed layer inflates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackBudget {
    /// Bytes one layer's files may hold.
    pub layer_bytes: u64,
    /// Bytes all the layers of one operation may hold together.
    pub image_bytes: u64,
}

impl Default for UnpackBudget {
    /// Generous: real layers are rarely over a few GiB.
    fn default() -> Self {
        UnpackBudget {
            layer_bytes: 32 << 30,
            image_bytes: 64 << 30,
        }
    }
}

impl UnpackBudget {
    /// The default, with [`LAYER_BUDGET_ENV`] and [`IMAGE_BUDGET_ENV`] (bytes) when set.
    pub fn from_env() -> Result<UnpackBudget, ImageError> {
        let mut b = UnpackBudget::default();
        for (var, field) in [
            (LAYER_BUDGET_ENV, &mut b.layer_bytes),
            (IMAGE_BUDGET_ENV, &mut b.image_bytes),
        ] {
            if let Some(v) = std::env::var_os(var) {
                *field = v
                    .to_str()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ImageError::Invalid(format!(
                            "{var}={}: expected a number of bytes",
                            v.to_string_lossy()
                        ))
                    })?;
            }
        }
        Ok(b)
    }
}

/// One operation's bytes written so far against its [`UnpackBudget`], shared by the layers
/// it unpacks (in parallel).
#[derive(Debug)]
pub struct Allowance {
    budget: UnpackBudget,
    used: std::sync::atomic::AtomicU64,
}

impl Allowance {
    /// A fresh count against `budget`.
    pub fn new(budget: UnpackBudget) -> std::sync::Arc<Allowance> {
        std::sync::Arc::new(Allowance {
            budget,
            used: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

/// What unpacking a layer produced.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream (the layer's diff id).
    pub diff_id: String,
    /// Bytes of the uncompressed tar stream.
    pub size: u64,
    /// Device nodes skipped by policy.
    pub skipped_devices: u64,
}

/// Longest error detail quoted from a parser (the tar crate quotes raw header bytes).
const MAX_DETAIL_CHARS: usize = 120;

/// An error's message cut to MAX_DETAIL_CHARS, so garbage input cannot flood the one line.
pub fn short(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    match s.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Wraps a reader, hashing and counting everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Start hashing `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// Read the rest of the stream, then return (`sha256:<hex>`, bytes read).
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Bytes a [`TailReader`] waits for before it returns a read (unless the blob ends first).
const MIN_TAIL_READ: u64 = 4096;

/// What a blob being written has so far, for a reader that follows it ([`TailReader`]).
#[derive(Default)]
pub struct Tail {
    state: std::sync::Mutex<TailState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct TailState {
    /// Bytes in the file so far.
    written: u64,
    /// The writer is done: `written` is the whole blob.
    done: bool,
    /// The writer gave up (or started over): readers fail.
    stopped: bool,
}

impl Tail {
    fn update(&self, f: impl FnOnce(&mut TailState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        self.changed.notify_all();
    }
    /// The file now holds `total` bytes.
    pub fn wrote(&self, total: u64) {
        self.update(|st| st.written = total);
    }
    /// The blob is whole.
    pub fn done(&self) {
        self.update(|st| st.done = true);
    }
    /// The blob will not be finished: readers get an error.
    pub fn stop(&self) {
        self.update(|st| st.stopped = true);
    }
    /// As [`Tail::stop`], unless the blob is whole already.
    pub fn stop_unless_done(&self) {
        self.update(|st| st.stopped |= !st.done);
    }
}

/// Reads a file while it is being written: waits for bytes the writer has not yet announced
/// through the [`Tail`], ends where the writer ended, fails once the writer gave up.
pub struct TailReader {
    file: File,
    pos: u64,
    tail: std::sync::Arc<Tail>,
}

impl TailReader {
    /// Follow `file` (opened for reading, at its start) as `tail` announces its bytes.
    pub fn new(file: File, tail: std::sync::Arc<Tail>) -> TailReader {
        TailReader { file, pos: 0, tail }
    }
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let ready = {
            let mut st = self.tail.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.stopped {
                    return Err(io::Error::other("the blob's transfer stopped"));
                }
                // Whole reads (the first one must show the compression's magic bytes), or
                // what is left.
                let ready = st.written - self.pos;
                if ready >= (buf.len() as u64).min(MIN_TAIL_READ) || (st.done && ready > 0) {
                    break ready;
                }
                if st.done {
                    return Ok(0);
                }
                st = self
                    .tail
                    .changed
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let want = buf.len().min(usize::try_from(ready).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::other("the blob file is shorter than written"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Compression of a layer stream, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

/// Peek at the first bytes of `r` to tell its compression.
pub fn detect_compression<R: BufRead>(r: &mut R) -> io::Result<Compression> {
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Counts the bytes read through it into a shared cell.
struct Counted<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counted<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.count.set(self.count.get() + n as u64);
        self.inner.consume(n);
    }
}

/// A decompressed stream that fails once it has given more than
/// `max(EXPANSION_FLOOR, EXPANSION_RATIO × compressed bytes read)`.
struct Expansion<R> {
    inner: R,
    compressed: std::rc::Rc<std::cell::Cell<u64>>,
    out: u64,
}

impl<R: Read> Read for Expansion<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let allowed = EXPANSION_FLOOR.max(self.compressed.get().saturating_mul(EXPANSION_RATIO));
        if self.out > allowed {
            return Err(io::Error::other(format!(
                "it expands to more than {allowed} bytes from {} compressed ones (a decompression bomb?)",
                self.compressed.get()
            )));
        }
        Ok(n)
    }
}

/// A zstd stream's decoder over `r`.
pub fn zstd_reader<R: BufRead>(r: R) -> io::Result<zstd::stream::read::Decoder<'static, R>> {
    zstd::stream::read::Decoder::with_buffer(r)
}

/// Unpack `blob` (plain, gzip or zstd tar) into `dest`, an existing empty directory, writing at
/// most what `allowance` leaves. `layer` names the layer in errors. On error `dest` holds a
/// partial tree that the caller removes.
pub fn unpack_layer(
    blob: impl Read,
    dest: &Path,
    layer: &str,
    allowance: &Allowance,
) -> Result<Unpacked, ImageError> {
    let compressed = std::rc::Rc::new(std::cell::Cell::new(0));
    let mut buffered = Counted {
        inner: BufReader::with_capacity(COPY_BUFFER, blob),
        count: compressed.clone(),
    };
    let io_err = |e: io::Error| ImageError::CorruptLayer {
        layer: layer.to_string(),
        reason: e.to_string(),
    };
    let bounded = |r: Box<dyn Read>| -> Box<dyn Read> {
        Box::new(Expansion {
            inner: r,
            compressed: compressed.clone(),
            out: 0,
        })
    };
    let decompressed: Box<dyn Read> = match detect_compression(&mut buffered).map_err(io_err)? {
        Compression::None => Box::new(buffered),
        Compression::Gzip => bounded(Box::new(flate2::bufread::GzDecoder::new(buffered))),
        Compression::Zstd => bounded(Box::new(zstd_reader(buffered).map_err(io_err)?)),
    };
    let mut archive = tar::Archive::new(HashingReader::new(decompressed));
    let root =
        open_dir_path(dest).map_err(|e| ImageError::io(format!("open {}", dest.display()), e))?;
    let mut u = Unpacker {
        root,
        root_path: dest.to_path_buf(),
        layer,
        dir_times: Vec::new(),
        skipped_devices: 0,
        buf: vec![0; COPY_BUFFER],
        allowance,
        written: 0,
    };
    let mut count = 0u64;
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        count += 1;
        if count > MAX_LAYER_ENTRIES {
            return Err(ImageError::TooLarge {
                what: format!("layer {layer} entry count"),
                limit: MAX_LAYER_ENTRIES,
            });
        }
        u.entry(&mut entry)?;
    }
    u.apply_dir_times();
    let (diff_id, size) = archive.into_inner().finish().map_err(io_err)?;
    Ok(Unpacked {
        diff_id,
        size,
        skipped_devices: u.skipped_devices,
    })
}

struct Unpacker<'a> {
    root: OwnedFd,
    root_path: PathBuf,
    layer: &'a str,
    dir_times: Vec<(Vec<OsString>, u64)>,
    skipped_devices: u64,
    /// Where file contents pass from the tar stream to their files.
    buf: Vec<u8>,
    allowance: &'a Allowance,
    /// Bytes of file contents this layer wrote.
    written: u64,
}

/// Split an entry name into safe components: leading `/` and `.` dropped, `..` refused.
fn components(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.len() > MAX_PATH_BYTES {
        return Err("path too long");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("path contains a '..' component"),
            _ if c.len() > MAX_NAME_BYTES => return Err("path component too long"),
            _ => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err("path nested too deeply");
    }
    Ok(out)
}

fn open_dir_path(p: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        p,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn lstat_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<libc::stat> {
    nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn file_type(st: &libc::stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

fn fsetxattr(fd: &OwnedFd, name: &str, value: &[u8]) -> io::Result<()> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid fd, NUL-terminated name, value pointer and length from one slice.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Unpacker<'_> {
    /// `entry`'s contents into `file` in large reads and writes, within the budget; the bytes
    /// copied.
    fn copy(
        &mut self,
        raw: &[u8],
        entry: &mut impl Read,
        file: &mut File,
    ) -> Result<u64, ImageError> {
        use std::sync::atomic::Ordering;
        let mut total = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.fail(raw, "read", e)),
            };
            let budget = self.allowance.budget;
            self.written += n as u64;
            if self.written > budget.layer_bytes {
                return Err(ImageError::UnpackBudget {
                    what: format!("layer {}", self.layer),
                    limit: budget.layer_bytes,
                    var: LAYER_BUDGET_ENV,
                });
            }
            let used = self.allowance.used.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if used > budget.image_bytes {
                return Err(ImageError::UnpackBudget {
                    what: "the image".into(),
                    limit: budget.image_bytes,
                    var: IMAGE_BUDGET_ENV,
                });
            }
            io::Write::write_all(file, &self.buf[..n]).map_err(|e| self.fail(raw, "write", e))?;
            total += n as u64;
        }
    }

    fn refuse(&self, entry: &[u8], reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn fail(&self, entry: &[u8], what: &str, e: impl std::fmt::Display) -> ImageError {
        ImageError::CorruptLayer {
            layer: self.layer.to_string(),
            reason: format!(
                "entry {:?}: {what}: {}",
                String::from_utf8_lossy(entry),
                short(&e)
            ),
        }
    }

    /// Walk `dirs` from the layer root through real directories only, creating missing ones.
    fn walk(&self, entry: &[u8], dirs: &[OsString], create: bool) -> Result<OwnedFd, ImageError> {
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| self.fail(entry, "dup", e))?;
        for (i, name) in dirs.iter().enumerate() {
            let next = match open_dir_at(&cur, name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match nix::sys::stat::mkdirat(
                        Some(cur.as_raw_fd()),
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.fail(entry, "mkdir", e)),
                    }
                    open_dir_at(&cur, name).map_err(|e| self.fail(entry, "open directory", e))?
                }
                Err(e) => {
                    let shown = PathBuf::from_iter(&dirs[..=i]);
                    return Err(match lstat_at(&cur, name) {
                        Ok(st) if file_type(&st) == libc::S_IFLNK => self.refuse(
                            entry,
                            format!("path goes through symlink {}", shown.display()),
                        ),
                        Ok(_) => self.refuse(
                            entry,
                            format!("parent {} is not a directory", shown.display()),
                        ),
                        Err(_) => self.fail(entry, &format!("open {}", shown.display()), e),
                    });
                }
            };
            cur = next;
        }
        Ok(cur)
    }

    /// Remove whatever is at `name` unless it is a directory and `keep_dir`.
    fn clear(
        &self,
        entry: &[u8],
        parent: &OwnedFd,
        rel: &[OsString],
        keep_dir: bool,
    ) -> Result<bool, ImageError> {
        let name = rel.last().map(OsString::as_os_str).unwrap_or_default();
        match lstat_at(parent, name) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(self.fail(entry, "stat", e)),
            Ok(st) if file_type(&st) == libc::S_IFDIR => {
                if keep_dir {
                    return Ok(true);
                }
                // Every parent of `rel` was just walked as a real directory, and std's
                // remove_dir_all never follows symlinks inside the tree it removes.
                let path = self.root_path.join(PathBuf::from_iter(rel));
                std::fs::remove_dir_all(&path)
                    .map_err(|e| self.fail(entry, "remove directory", e))?;
                Ok(false)
            }
            Ok(_) => {
                nix::unistd::unlinkat(
                    Some(parent.as_raw_fd()),
                    name,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|e| self.fail(entry, "unlink", e))?;
                Ok(false)
            }
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let header = entry.header().clone();
        let kind = header.entry_type();
        let rel = components(&raw).map_err(|r| self.refuse(&raw, r))?;
        let Some(name) = rel.last().cloned() else {
            // The layer root itself ("./"): its metadata belongs to the overlay mount, not us.
            return Ok(());
        };
        let parent_dirs = &rel[..rel.len() - 1];
        let old = header.as_old();
        let mode = numeric(header.mode().map(u64::from), &old.mode)
            .map_err(|e| self.fail(&raw, "mode", e))? as u32
            & 0o7777;
        let uid = numeric(header.uid(), &old.uid).map_err(|e| self.fail(&raw, "uid", e))?;
        let gid = numeric(header.gid(), &old.gid).map_err(|e| self.fail(&raw, "gid", e))?;
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = self.xattrs(&raw, entry)?;

        let name_bytes = name.as_bytes();
        if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&raw, parent_dirs, &name);
        }

        let parent = self.walk(&raw, parent_dirs, true)?;
        let pfd = Some(parent.as_raw_fd());
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear(&raw, &parent, &rel, false)?;
                let fd = nix::fcntl::openat(
                    pfd,
                    name.as_os_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| self.fail(&raw, "create", e))?;
                // SAFETY: `openat` just returned this fd and nothing else owns it.
                let mut file = unsafe { File::from_raw_fd(fd) };
                let written = self.copy(&raw, entry, &mut file)?;
                if written >= WRITEBACK_FROM {
                    start_writeback(&file);
                }
                let fd = OwnedFd::from(file);
                self.set_meta_fd(&raw, &fd, uid, gid, mode, &xattrs)?;
                set_times_at(&parent, &name, mtime);
            }
            tar::EntryType::Directory => {
                let existed = self.clear(&raw, &parent, &rel, true)?;
                if !existed {
                    nix::sys::stat::mkdirat(pfd, name.as_os_str(), Mode::from_bits_truncate(0o700))
                        .map_err(|e| self.fail(&raw, "mkdir", e))?;
                }
                let fd = open_dir_at(&parent, &name)
                    .map_err(|e| self.fail(&raw, "open directory", e))?;
                self.set_meta_fd(&raw, &fd, uid, gid, mode, &xattrs)?;
                // Later entries inside would bump the time; apply it at the end.
                self.dir_times.push((rel.clone(), mtime));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err(self.refuse(&raw, "symlink with an empty or invalid target"));
                }
                self.clear(&raw, &parent, &rel, false)?;
                nix::unistd::symlinkat(OsStr::from_bytes(&target), pfd, name.as_os_str())
                    .map_err(|e| self.fail(&raw, "symlink", e))?;
                self.chown_at(&raw, &parent, &name, uid, gid)?;
                set_times_at(&parent, &name, mtime);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                self.hardlink(&raw, &parent, &rel, &target)?;
            }
            tar::EntryType::Fifo => {
                self.clear(&raw, &parent, &rel, false)?;
                nix::sys::stat::mknodat(
                    pfd,
                    name.as_os_str(),
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(0o600),
                    0,
                )
                .map_err(|e| self.fail(&raw, "mkfifo", e))?;
                self.chown_at(&raw, &parent, &name, uid, gid)?;
                nix::sys::stat::fchmodat(
                    pfd,
                    name.as_os_str(),
                    Mode::from_bits_truncate(mode),
                    nix::sys::stat::FchmodatFlags::NoFollowSymlink,
                )
                .or_else(|e| {
                    if e == Errno::EOPNOTSUPP {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| self.fail(&raw, "chmod", e))?;
                set_times_at(&parent, &name, mtime);
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                tracing::warn!(layer = self.layer, entry = %String::from_utf8_lossy(&raw), "device node skipped");
                self.skipped_devices += 1;
            }
            tar::EntryType::XGlobalHeader => {}
            other => return Err(self.refuse(&raw, format!("unsupported entry type {other:?}"))),
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        raw: &[u8],
        parent_dirs: &[OsString],
        name: &OsStr,
    ) -> Result<(), ImageError> {
        let parent = self.walk(raw, parent_dirs, true)?;
        let name = name.as_bytes();
        if name == OPAQUE_MARKER.as_bytes() {
            return fsetxattr(&parent, OVERLAY_OPAQUE_XATTR, b"y")
                .map_err(|e| self.fail(raw, "set opaque xattr", e));
        }
        if name.starts_with(b".wh..wh.") {
            // aufs bookkeeping (hardlink dirs and the like): meaningless for overlayfs.
            return Ok(());
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(self.refuse(raw, "whiteout of an invalid name"));
        }
        let hidden = OsStr::from_bytes(hidden).to_os_string();
        let mut rel = parent_dirs.to_vec();
        rel.push(hidden.clone());
        self.clear(raw, &parent, &rel, false)?;
        nix::sys::stat::mknodat(
            Some(parent.as_raw_fd()),
            hidden.as_os_str(),
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(|e| self.fail(raw, "create whiteout", e))
    }

    fn hardlink(
        &self,
        raw: &[u8],
        parent: &OwnedFd,
        rel: &[OsString],
        target: &[u8],
    ) -> Result<(), ImageError> {
        let trel =
            components(target).map_err(|r| self.refuse(raw, format!("hardlink target: {r}")))?;
        let Some(tname) = trel.last() else {
            return Err(self.refuse(raw, "hardlink to the layer root"));
        };
        let tparent = self
            .walk(raw, &trel[..trel.len() - 1], false)
            .map_err(|e| match e {
                ImageError::UnsafeEntry { .. } => e,
                _ => self.refuse(raw, "hardlink target is not in this layer"),
            })?;
        let st = match lstat_at(&tparent, tname) {
            Ok(st) => st,
            Err(_) => return Err(self.refuse(raw, "hardlink target is not in this layer")),
        };
        match file_type(&st) {
            libc::S_IFDIR => return Err(self.refuse(raw, "hardlink to a directory")),
            libc::S_IFLNK => {
                let link = nix::fcntl::readlinkat(Some(tparent.as_raw_fd()), tname.as_os_str())
                    .map_err(|e| self.fail(raw, "readlink", e))?;
                if !self.symlink_stays_inside(&trel[..trel.len() - 1], link.as_bytes()) {
                    return Err(
                        self.refuse(raw, "hardlink to a symlink that leads outside the layer")
                    );
                }
            }
            _ => {}
        }
        let name = rel.last().map(OsString::as_os_str).unwrap_or_default();
        if trel == rel {
            return Ok(());
        }
        self.clear(raw, parent, rel, false)?;
        nix::unistd::linkat(
            Some(tparent.as_raw_fd()),
            tname.as_os_str(),
            Some(parent.as_raw_fd()),
            name,
            AtFlags::empty(),
        )
        .map_err(|e| self.fail(raw, "link", e))
    }

    /// Resolve `target` (a symlink in directory `dir`) lexically inside the layer, following
    /// further symlinks it meets; false when it is absolute or climbs above the layer root.
    fn symlink_stays_inside(&self, dir: &[OsString], target: &[u8]) -> bool {
        let mut stack: Vec<OsString> = dir.to_vec();
        let mut pending: Vec<Vec<u8>> = vec![target.to_vec()];
        let mut hops = 0;
        while let Some(t) = pending.pop() {
            if t.starts_with(b"/") {
                return false;
            }
            let parts: Vec<&[u8]> = t.split(|&b| b == b'/').collect();
            for (i, part) in parts.iter().enumerate() {
                match *part {
                    b"" | b"." => {}
                    b".." => {
                        if stack.pop().is_none() {
                            return false;
                        }
                    }
                    p => {
                        stack.push(OsStr::from_bytes(p).to_os_string());
                        if let Some(next) = self.readlink_rel(&stack) {
                            hops += 1;
                            if hops > MAX_SYMLINK_HOPS {
                                return false;
                            }
                            stack.pop();
                            let mut rest = next;
                            for p in &parts[i + 1..] {
                                rest.push(b'/');
                                rest.extend_from_slice(p);
                            }
                            pending.push(rest);
                            break;
                        }
                    }
                }
            }
        }
        true
    }

    fn readlink_rel(&self, rel: &[OsString]) -> Option<Vec<u8>> {
        let (name, dirs) = rel.split_last()?;
        let parent = self.walk(b"", dirs, false).ok()?;
        let st = lstat_at(&parent, name).ok()?;
        if file_type(&st) != libc::S_IFLNK {
            return None;
        }
        nix::fcntl::readlinkat(Some(parent.as_raw_fd()), name.as_os_str())
            .ok()
            .map(|s| s.into_vec())
    }

    fn xattrs<R: Read>(
        &self,
        raw: &[u8],
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
        let mut out = Vec::new();
        let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| self.fail(raw, "pax headers", e))?
        else {
            return Ok(out);
        };
        for ext in exts {
            let ext = ext.map_err(|e| self.fail(raw, "pax header", e))?;
            let Ok(key) = ext.key() else { continue };
            if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                if attr == "security.capability" || attr.starts_with("user.") {
                    out.push((attr.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        Ok(out)
    }

    fn set_meta_fd(
        &self,
        raw: &[u8],
        fd: &OwnedFd,
        uid: u64,
        gid: u64,
        mode: u32,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), ImageError> {
        if nix::unistd::geteuid().is_root() {
            let (u, g) = ids(uid, gid).ok_or_else(|| self.refuse(raw, "owner id out of range"))?;
            nix::unistd::fchown(fd.as_raw_fd(), Some(u), Some(g))
                .map_err(|e| self.fail(raw, "chown", e))?;
        }
        // After chown, which clears setuid/setgid.
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| self.fail(raw, "chmod", e))?;
        for (k, v) in xattrs {
            fsetxattr(fd, k, v).map_err(|e| self.fail(raw, &format!("set xattr {k}"), e))?;
        }
        Ok(())
    }

    fn chown_at(
        &self,
        raw: &[u8],
        parent: &OwnedFd,
        name: &OsStr,
        uid: u64,
        gid: u64,
    ) -> Result<(), ImageError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let (u, g) = ids(uid, gid).ok_or_else(|| self.refuse(raw, "owner id out of range"))?;
        nix::unistd::fchownat(
            Some(parent.as_raw_fd()),
            name,
            Some(u),
            Some(g),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.fail(raw, "chown", e))
    }

    fn apply_dir_times(&mut self) {
        // Deepest first is not needed: setting a directory's time does not touch its parent's.
        for (rel, mtime) in std::mem::take(&mut self.dir_times) {
            let Some((name, dirs)) = rel.split_last() else {
                continue;
            };
            if let Ok(parent) = self.walk(b"", dirs, false) {
                set_times_at(&parent, name, mtime);
            }
        }
    }
}

/// A numeric header field; an empty (all NUL or space) one reads as 0, as Go's archive/tar
/// (and so Docker) reads it.
fn numeric(parsed: io::Result<u64>, field: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if field.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        r => r,
    }
}

fn ids(uid: u64, gid: u64) -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
    let u = u32::try_from(uid).ok()?;
    let g = u32::try_from(gid).ok()?;
    Some((nix::unistd::Uid::from_raw(u), nix::unistd::Gid::from_raw(g)))
}

/// Starts writing `file`'s dirty pages to disk without waiting for them (the durability that
/// counts comes from the syncfs before a commit; this only gets the disk busy earlier).
pub fn start_writeback(file: &File) {
    // SAFETY: a valid fd; offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Best effort: a wrong mtime never makes a layer unsafe.
fn set_times_at(parent: &OwnedFd, name: &OsStr, mtime: u64) {
    let t = nix::sys::time::TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
    let _ = nix::sys::stat::utimensat(
        Some(parent.as_raw_fd()),
        name,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_normalise_and_refuse() {
        assert_eq!(
            components(b"/a//./b/").unwrap(),
            vec![OsString::from("a"), OsString::from("b")]
        );
        assert!(components(b"./").unwrap().is_empty());
        assert!(components(b"a/../b").is_err());
        assert!(components(b"../x").is_err());
    }
}
