//! Reading a container's log: the rotated files oldest first, then following the live file
//! across rotations.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes copied per read.
const CHUNK: usize = 64 * 1024;

/// `path.N` … `path.1` that exist (oldest first), then `path`.
pub fn files_oldest_first(path: &Path, max_files: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for n in (1..=max_files).rev() {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{n}"));
        let p = PathBuf::from(s);
        if p.exists() {
            out.push(p);
        }
    }
    out.push(path.to_path_buf());
    out
}

/// Copies what is appended to a log file, reopening it when the writer rotates it.
pub struct LogFollower {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    pos: u64,
}

impl LogFollower {
    /// Follow `path` from its start (`from_end`: from its current end).
    pub fn new(path: &Path, from_end: bool) -> LogFollower {
        let mut f = LogFollower {
            path: path.to_path_buf(),
            file: None,
            ino: 0,
            pos: 0,
        };
        f.open();
        if from_end {
            if let Some(file) = &mut f.file {
                f.pos = file.seek(SeekFrom::End(0)).unwrap_or(0);
            }
        }
        f
    }

    fn open(&mut self) {
        if let Ok(file) = File::open(&self.path) {
            self.ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
            self.file = Some(file);
            self.pos = 0;
        }
    }

    fn drain(&mut self, out: &mut dyn Write) -> std::io::Result<u64> {
        let Some(file) = &mut self.file else {
            return Ok(0);
        };
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            self.pos += n as u64;
            total += n as u64;
        }
        Ok(total)
    }

    /// Copy everything new to `out`; returns the bytes copied.
    pub fn poll(&mut self, out: &mut dyn Write) -> std::io::Result<u64> {
        let mut total = self.drain(out)?;
        match std::fs::metadata(&self.path) {
            Ok(md) if self.file.is_none() || md.ino() != self.ino => {
                // Rotated (the old file was fully read above) or created since.
                self.open();
                total += self.drain(out)?;
            }
            Ok(md) if md.len() < self.pos => {
                // Truncated in place.
                if let Some(f) = &mut self.file {
                    f.seek(SeekFrom::Start(0))?;
                }
                self.pos = 0;
                total += self.drain(out)?;
            }
            _ => {}
        }
        out.flush()?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_appends_and_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let mut f = LogFollower::new(&p, false);
        let mut out = Vec::new();
        assert_eq!(f.poll(&mut out).unwrap(), 0);
        std::fs::write(&p, "one\n").unwrap();
        f.poll(&mut out).unwrap();
        let mut w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        w.write_all(b"two\n").unwrap();
        f.poll(&mut out).unwrap();
        w.write_all(b"three\n").unwrap();
        std::fs::rename(&p, dir.path().join("c.log.1")).unwrap();
        std::fs::write(&p, "four\n").unwrap();
        f.poll(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\nthree\nfour\n");
        let files = files_oldest_first(&p, 3);
        assert_eq!(files, vec![dir.path().join("c.log.1"), p.clone()]);
    }
}
