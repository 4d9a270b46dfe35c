//! A container's log on disk: one record per line, the CRI log format (as containerd writes
//! it for Kubernetes):
//!
//! ```text
//! 2026-12-07T18:42:44.123456789Z stdout F hello
//! 2026-12-07T18:42:44.123460000Z stderr P first 16 KiB of a longer line…
//! ```
//!
//! The time the monitor read the bytes (UTC, fixed width), the stream, `F` for a full line or
//! `P` for a piece of one (a line longer than [`MAX_RECORD_PAYLOAD`], or output that ended
//! without a newline), then the bytes without their newline. So each line keeps its stream and
//! time end to end, and a reader can start anywhere at a line boundary. A line that does not
//! parse (a log written before this format) reads as a full stdout line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::image::timefmt::{format_unix_nanos, parse_rfc3339_nanos};

/// Longest payload of one record: a longer line is split into `P` records (docker's 16 KiB).
pub const MAX_RECORD_PAYLOAD: usize = 16 * 1024;
/// Bytes read from a log file per read.
const CHUNK: usize = 64 * 1024;
/// Width of the timestamp field.
const TS_LEN: usize = "2026-12-07T18:42:44.123456789Z".len();
/// A partial record longer than this (no newline in sight: not our format) is dropped.
const MAX_PENDING: usize = MAX_RECORD_PAYLOAD + 64;

/// Which of the container's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One record of a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// When the monitor read it, nanoseconds since the epoch.
    pub time_ns: i64,
    pub stream: Stream,
    /// A piece of a line: the next record of the stream continues it.
    pub partial: bool,
    /// The bytes, without the newline.
    pub data: &'a [u8],
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Appends one record (with its newline) to `out`. `data` must hold no newline.
pub fn encode(out: &mut Vec<u8>, time_ns: i64, stream: Stream, partial: bool, data: &[u8]) {
    debug_assert!(!data.contains(&b'\n'));
    out.extend_from_slice(format_unix_nanos(time_ns).as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.name().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(data);
    out.push(b'\n');
}

/// Parses one line (without its newline).
pub fn parse(line: &[u8]) -> Record<'_> {
    parse_framed(line).unwrap_or(Record {
        time_ns: 0,
        stream: Stream::Stdout,
        partial: false,
        data: line,
    })
}

fn parse_framed(line: &[u8]) -> Option<Record<'_>> {
    let ts = std::str::from_utf8(line.get(..TS_LEN)?).ok()?;
    let time_ns = parse_rfc3339_nanos(ts)?;
    let rest = line.get(TS_LEN..)?.strip_prefix(b" ")?;
    let (stream, rest) = if let Some(r) = rest.strip_prefix(b"stdout ") {
        (Stream::Stdout, r)
    } else {
        (Stream::Stderr, rest.strip_prefix(b"stderr ")?)
    };
    let (partial, data) = match rest.get(..2)? {
        b"F " => (false, &rest[2..]),
        b"P " => (true, &rest[2..]),
        _ => return None,
    };
    Some(Record {
        time_ns,
        stream,
        partial,
        data,
    })
}

/// Turns a stream's raw output into records: whole lines as they complete, pieces of
/// [`MAX_RECORD_PAYLOAD`] bytes of a longer one.
#[derive(Default)]
pub struct LineFramer {
    pending: Vec<u8>,
}

impl LineFramer {
    /// Frames `data` read at `time_ns` into `out`.
    pub fn push(&mut self, out: &mut Vec<u8>, time_ns: i64, stream: Stream, mut data: &[u8]) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) if self.pending.len() + i <= MAX_RECORD_PAYLOAD => {
                    if self.pending.is_empty() {
                        encode(out, time_ns, stream, false, &data[..i]);
                    } else {
                        self.pending.extend_from_slice(&data[..i]);
                        encode(out, time_ns, stream, false, &self.pending);
                        self.pending.clear();
                    }
                    data = &data[i + 1..];
                }
                _ => {
                    let room = MAX_RECORD_PAYLOAD - self.pending.len();
                    let take = room.min(data.len());
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.pending.len() == MAX_RECORD_PAYLOAD {
                        encode(out, time_ns, stream, true, &self.pending);
                        self.pending.clear();
                    }
                }
            }
        }
    }

    /// Writes out what is left (output that ended without a newline) as a piece.
    pub fn finish(&mut self, out: &mut Vec<u8>, time_ns: i64, stream: Stream) {
        if !self.pending.is_empty() {
            encode(out, time_ns, stream, true, &self.pending);
            self.pending.clear();
        }
    }
}

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

/// Calls `f` for every record of a whole (rotated, so complete) file; a missing file has none.
pub fn read_file(path: &Path, f: &mut dyn FnMut(Record<'_>)) -> std::io::Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::with_capacity(CHUNK, file);
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        f(parse(&line));
    }
}

/// Writes a record's payload to `out` or `err` by its stream (a full line gets its newline).
pub fn write_record(
    r: &Record<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    let w: &mut dyn Write = match r.stream {
        Stream::Stdout => out,
        Stream::Stderr => err,
    };
    w.write_all(r.data)?;
    if !r.partial {
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Reads the records appended to a live log file, reopening it when the writer rotates it.
pub struct LogFollower {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    pos: u64,
    /// Bytes after the last newline read: the start of a record still being written.
    pending: Vec<u8>,
}

impl LogFollower {
    /// Follow `path` from its start (`from_end`: from its current end).
    pub fn new(path: &Path, from_end: bool) -> LogFollower {
        let mut f = LogFollower {
            path: path.to_path_buf(),
            file: None,
            ino: 0,
            pos: 0,
            pending: Vec::new(),
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
            self.pending.clear();
        }
    }

    fn drain(&mut self, f: &mut dyn FnMut(Record<'_>)) -> std::io::Result<u64> {
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
            self.pos += n as u64;
            total += n as u64;
            let mut chunk = &buf[..n];
            while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                if self.pending.is_empty() {
                    f(parse(&chunk[..i]));
                } else {
                    self.pending.extend_from_slice(&chunk[..i]);
                    f(parse(&self.pending));
                    self.pending.clear();
                }
                chunk = &chunk[i + 1..];
            }
            self.pending.extend_from_slice(chunk);
            if self.pending.len() > MAX_PENDING {
                self.pending.clear();
            }
        }
        Ok(total)
    }

    /// Calls `f` for every record completed since the last poll; returns the bytes read.
    pub fn poll_records(&mut self, f: &mut dyn FnMut(Record<'_>)) -> std::io::Result<u64> {
        let mut total = self.drain(f)?;
        match std::fs::metadata(&self.path) {
            Ok(md) if self.file.is_none() || md.ino() != self.ino => {
                // Rotated (the old file was fully read above) or created since.
                self.open();
                total += self.drain(f)?;
            }
            Ok(md) if md.len() < self.pos => {
                // Truncated in place.
                if let Some(file) = &mut self.file {
                    file.seek(SeekFrom::Start(0))?;
                }
                self.pos = 0;
                self.pending.clear();
                total += self.drain(f)?;
            }
            _ => {}
        }
        Ok(total)
    }

    /// Copies every record completed since the last poll to `out` (stdout) or `err` (stderr).
    pub fn poll(&mut self, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<u64> {
        let mut failed = None;
        let n = self.poll_records(&mut |r| {
            if failed.is_none() {
                if let Err(e) = write_record(&r, out, err) {
                    failed = Some(e);
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        out.flush()?;
        err.flush()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(bytes: &[u8]) -> Vec<(Stream, bool, Vec<u8>)> {
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let r = parse(l);
                (r.stream, r.partial, r.data.to_vec())
            })
            .collect()
    }

    #[test]
    fn frames_lines_pieces_and_streams() {
        let mut out = Vec::new();
        let (mut o, mut e) = (LineFramer::default(), LineFramer::default());
        o.push(&mut out, 5, Stream::Stdout, b"one\ntw");
        e.push(&mut out, 6, Stream::Stderr, b"err\n");
        o.push(&mut out, 7, Stream::Stdout, b"o\n");
        let long = vec![b'x'; MAX_RECORD_PAYLOAD + 3];
        o.push(&mut out, 8, Stream::Stdout, &long);
        o.finish(&mut out, 9, Stream::Stdout);
        let got = records(&out);
        assert_eq!(
            got,
            vec![
                (Stream::Stdout, false, b"one".to_vec()),
                (Stream::Stderr, false, b"err".to_vec()),
                (Stream::Stdout, false, b"two".to_vec()),
                (Stream::Stdout, true, vec![b'x'; MAX_RECORD_PAYLOAD]),
                (Stream::Stdout, true, b"xxx".to_vec()),
            ]
        );
        let first = out.split(|&b| b == b'\n').next().unwrap();
        assert_eq!(parse(first).time_ns, 5);
    }

    /// Cases per run of the framing property (`PROPTEST_CASES` overrides).
    const FRAMING_CASES: u32 = 64;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(FRAMING_CASES)
        ))]
        /// Whatever a container writes, in whatever chunks on either stream, reads back per
        /// stream byte for byte, every record parses as framed, and no record is longer than
        /// the cap.
        #[test]
        fn any_output_reads_back_per_stream(
            chunks in proptest::collection::vec(
                (
                    proptest::bool::ANY,
                    // Runs of one byte, each maybe ended by a newline: lines short and long.
                    proptest::collection::vec(
                        (0usize..20_000, proptest::bool::ANY, proptest::num::u8::ANY),
                        0..6,
                    ),
                ),
                0..8,
            )
        ) {
            let chunks: Vec<(bool, Vec<u8>)> = chunks
                .into_iter()
                .map(|(err, runs)| {
                    let mut data = Vec::new();
                    for (len, nl, b) in runs {
                        data.resize(data.len() + len, if b == b'\n' { b'x' } else { b });
                        if nl {
                            data.push(b'\n');
                        }
                    }
                    (err, data)
                })
                .collect();
            let mut file = Vec::new();
            let mut framers = [LineFramer::default(), LineFramer::default()];
            let mut want = [Vec::new(), Vec::new()];
            for (i, (err, data)) in chunks.iter().enumerate() {
                let s = usize::from(*err);
                let stream = if *err { Stream::Stderr } else { Stream::Stdout };
                framers[s].push(&mut file, i as i64, stream, data);
                want[s].extend_from_slice(data);
            }
            framers[0].finish(&mut file, 99, Stream::Stdout);
            framers[1].finish(&mut file, 99, Stream::Stderr);
            let mut got = [Vec::new(), Vec::new()];
            for line in file.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let r = parse_framed(line).expect("framed");
                proptest::prop_assert!(r.data.len() <= MAX_RECORD_PAYLOAD);
                let s = usize::from(r.stream == Stream::Stderr);
                got[s].extend_from_slice(r.data);
                if !r.partial {
                    got[s].push(b'\n');
                }
            }
            proptest::prop_assert_eq!(&got, &want);
        }
    }

    #[test]
    fn an_unframed_line_reads_as_stdout() {
        let r = parse(b"plain old output");
        assert_eq!(r.stream, Stream::Stdout);
        assert_eq!(r.data, b"plain old output");
    }

    #[test]
    fn follows_appends_and_rotations_by_stream() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let mut f = LogFollower::new(&p, false);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(f.poll(&mut out, &mut err).unwrap(), 0);
        let rec = |s, d: &[u8]| {
            let mut v = Vec::new();
            encode(&mut v, 1, s, false, d);
            v
        };
        std::fs::write(&p, rec(Stream::Stdout, b"one")).unwrap();
        f.poll(&mut out, &mut err).unwrap();
        let mut w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let two = rec(Stream::Stderr, b"two");
        // Half a record, then the rest: nothing is read before its newline.
        w.write_all(&two[..10]).unwrap();
        f.poll(&mut out, &mut err).unwrap();
        w.write_all(&two[10..]).unwrap();
        f.poll(&mut out, &mut err).unwrap();
        w.write_all(&rec(Stream::Stdout, b"three")).unwrap();
        std::fs::rename(&p, dir.path().join("c.log.1")).unwrap();
        std::fs::write(&p, rec(Stream::Stdout, b"four")).unwrap();
        f.poll(&mut out, &mut err).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "one\nthree\nfour\n");
        assert_eq!(String::from_utf8(err).unwrap(), "two\n");
        let files = files_oldest_first(&p, 3);
        assert_eq!(files, vec![dir.path().join("c.log.1"), p.clone()]);
    }
}
