//! The one place where Raft's storage becomes durable: sled's flush followed by real
//! `fdatasync`s.
//!
//! sled 0.34's `flush` writes its I/O buffers with `pwrite` and waits with
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` (`pagecache/iobuf.rs`): that survives a
//! process crash, but neither flushes the device's write cache nor the file's metadata (its
//! size when a segment was appended), so a power loss can take acknowledged writes with it.
//! Values too large for a log segment (over `segment_size / 4` = 128 KiB by default: big task
//! batches, the snapshot) go to one file each under `blobs/` (`pagecache/blob_io.rs`), written
//! with `write_all` and never synced at all. [`Durable::sync`] closes both gaps:
//!
//! 1. every blob file that appeared or grew since the last sync gets `fdatasync`, then the
//!    `blobs/` directory gets `fsync` (so the new names survive), before
//! 2. sled's flush, and then `fdatasync` of sled's single log file `db`.
//!
//! Blobs go first so that a log record never reaches stable storage ahead of the blob it
//! points to. A failure of any step is an error for the caller (openraft then stops the node):
//! nothing is acknowledged on a sync that did not happen.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// sled's log file inside its directory.
const SLED_LOG_FILE: &str = "db";
/// sled's configuration file inside its directory.
const SLED_CONF_FILE: &str = "conf";
/// sled's directory of large values, one file each.
const SLED_BLOBS_DIR: &str = "blobs";

/// Makes everything written to a sled database so far durable (see the module doc).
/// Clones share the same files and counters.
#[derive(Clone, Debug)]
pub struct Durable {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    /// sled's log file, opened by us only to `fdatasync` it (fsync acts on the inode).
    log_file: File,
    blobs_dir: PathBuf,
    /// Blob files already synced, with the length they had when synced. sled writes a blob
    /// once, sequentially (`create_new` + `write_all`), so an unchanged length means nothing
    /// was written since.
    synced_blobs: Mutex<HashMap<OsString, u64>>,
    syncs: AtomicU64,
    blob_syncs: AtomicU64,
}

/// Every database a [`Durable`] took over in this process, for [`storage_answers`].
static OPEN: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

/// Whether the Raft storage of this process still works: every open database is flushed
/// (`sled::Db::flush`, on the blocking pool), within `wait`; `Err` names the first that
/// failed. sled keeps the first I/O error it meets — a write it could not make on a full
/// disk, even one of its own background flushes — and refuses every write after it, while
/// reads of what it holds go on. A leader whose Raft had nothing to append then looked well
/// for good: its core answered, its heartbeats and beacons went on, and every write was
/// refused by the store before it reached Raft (issue 18, seen in the disk-fault test).
pub async fn storage_answers(wait: Duration) -> Result<(), String> {
    let open: Vec<Arc<Inner>> = {
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|w| w.strong_count() > 0);
        open.iter().filter_map(Weak::upgrade).collect()
    };
    if open.is_empty() {
        return Ok(());
    }
    let flushed = tokio::task::spawn_blocking(move || {
        for inner in &open {
            inner
                .db
                .flush()
                .map_err(|e| format!("{}: {e}", inner.blobs_dir.display()))?;
        }
        Ok::<(), String>(())
    });
    match tokio::time::timeout(wait, flushed).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("the storage check failed: {e}")),
        Err(_) => Err(format!(
            "flushing the database did not finish in {} s",
            wait.as_secs()
        )),
    }
}

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(e, "fsync directory", dir))
}

impl Durable {
    /// Takes over durability for `db`, opened from `dir`. Syncs sled's configuration file,
    /// the directory entries sled created at open (`db`, `conf`, `blobs`) and any blob
    /// already there, so that a freshly created database survives as a whole.
    pub fn open(db: &sled::Db, dir: &Path) -> io::Result<Durable> {
        let log_path = dir.join(SLED_LOG_FILE);
        let log_file = File::options()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|e| with_path(e, "open", &log_path))?;
        let conf_path = dir.join(SLED_CONF_FILE);
        if conf_path.exists() {
            File::open(&conf_path)
                .and_then(|f| f.sync_all())
                .map_err(|e| with_path(e, "fsync", &conf_path))?;
        }
        let durable = Durable {
            inner: Arc::new(Inner {
                db: db.clone(),
                log_file,
                blobs_dir: dir.join(SLED_BLOBS_DIR),
                synced_blobs: Mutex::new(HashMap::new()),
                syncs: AtomicU64::new(0),
                blob_syncs: AtomicU64::new(0),
            }),
        };
        durable.sync_blocking()?;
        OPEN.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&durable.inner));
        fsync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        Ok(durable)
    }

    /// Makes every write to the database that returned before this call durable: blob files,
    /// then sled's flush and an `fdatasync` of its log file. Runs on tokio's blocking pool.
    pub async fn sync(&self) -> io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync_blocking())
            .await
            .map_err(io::Error::other)?
    }

    /// [`Durable::sync`] on the calling thread.
    pub fn sync_blocking(&self) -> io::Result<()> {
        let res = self.sync_blobs().and_then(|()| {
            self.inner.db.flush().map_err(sled_io)?;
            self.inner.log_file.sync_data()
        });
        match &res {
            Ok(()) => {
                self.inner.syncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "raft storage: sync to disk failed"),
        }
        res
    }

    /// Completed syncs of the log file since open (for tests and metrics).
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Blob files synced since open (for tests and metrics).
    pub fn blob_syncs(&self) -> u64 {
        self.inner.blob_syncs.load(Ordering::Relaxed)
    }

    fn sync_blobs(&self) -> io::Result<()> {
        let dir = &self.inner.blobs_dir;
        let mut synced = self
            .inner
            .synced_blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut seen = HashMap::with_capacity(synced.len());
        let mut new_names = false;
        let entries = std::fs::read_dir(dir).map_err(|e| with_path(e, "read", dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| with_path(e, "read", dir))?;
            let name = entry.file_name();
            let path = entry.path();
            // The length before the sync: the sync covers at least that much.
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                // sled removed it (garbage collection) since we listed the directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_path(e, "stat", &path)),
            };
            match synced.get(&name) {
                Some(&l) if l == len => {}
                old => {
                    new_names |= old.is_none();
                    match File::open(&path) {
                        Ok(f) => f
                            .sync_data()
                            .map_err(|e| with_path(e, "fdatasync", &path))?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(with_path(e, "open", &path)),
                    }
                    self.inner.blob_syncs.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen.insert(name, len);
        }
        if new_names {
            fsync_dir(dir)?;
        }
        *synced = seen;
        Ok(())
    }
}
