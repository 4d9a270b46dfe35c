//! The worker's side of the log broker: a `LogSubscription` from the session makes the agent
//! read its tasks' log files (`shoal_runtime::logfile`) and send the wanted lines to the
//! leader with `PublishLogs` (docs/design/logs.md).
//!
//! One blocking reader per subscription feeds a queue of [`LOG_PUBLISH_QUEUE`] batches; it
//! waits when the queue is full, so a slow subscriber slows the reading down and nothing grows
//! without bound. The subscription ends when the manager ends the call (its subscriber left,
//! or it is no longer the leader) or the call breaks.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::v1 as pb;
use shoal_proto::v1::dispatcher_client::DispatcherClient;
use shoal_runtime::logfile::{files_oldest_first, read_file, LogFollower, Record, Stream};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::agent::{lock, Shared};

/// Batches queued towards the manager before the reader waits.
pub const LOG_PUBLISH_QUEUE: usize = 16;
/// A batch is sent once it holds this many bytes of lines…
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// …or this many lines.
pub const MAX_BATCH_LINES: usize = 8192;
/// A line longer than this (pieces joined) is sent in parts.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// How often a followed log file is looked at for new lines.
pub const FOLLOW_POLL: Duration = Duration::from_millis(50);
/// Rotated files per task's log (the executor's).
const LOG_FILES: u32 = crate::executor::runtime::LOG_MAX_FILES;

/// Tasks added to a running subscription: (task id, its log path).
pub(crate) type MoreTasks = std::sync::mpsc::Sender<(String, Option<PathBuf>)>;

/// Starts serving `sub`, or adds its tasks to the running one of that id (a session reopened to the same leader).
pub(crate) fn start(
    shared: &Arc<Shared>,
    client: DispatcherClient<Channel>,
    session_id: String,
    sub: pb::LogSubscription,
) {
    let paths: Vec<(String, Option<PathBuf>)> = sub
        .task_ids
        .iter()
        .map(|t| (t.clone(), shared.executor().log_path(t)))
        .collect();
    let more = {
        let mut subs = lock(&shared.log_subs);
        if let Some(more) = subs.get(&sub.id) {
            // Running already: the leader adds tasks new to a followed service.
            for p in paths {
                let _ = more.send(p);
            }
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        subs.insert(sub.id.clone(), tx);
        rx
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel::<pb::PublishLogsMessage>(LOG_PUBLISH_QUEUE);
        let first = pb::PublishLogsMessage {
            session_id,
            subscription_id: sub.id.clone(),
            ..Default::default()
        };
        let _ = tx.try_send(first);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            let options = sub.options.clone().unwrap_or_default();
            tokio::task::spawn_blocking(move || read_logs(&paths, &options, &tx, &stop, &more))
        };
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut client = client;
        if let Err(e) = client.publish_logs(stream).await {
            tracing::debug!(subscription = %sub.id, "publishing logs ended: {}", e.message());
        }
        stop.store(true, Ordering::Relaxed);
        let _ = reader.await;
        lock(&shared.log_subs).remove(&sub.id);
    });
}

/// Which lines of one task pass: after its cursor, else at or after `since`.
struct Filter {
    since_ns: i64,
    cursor: Option<(i64, u32)>,
    seen_at_cursor: u32,
}

impl Filter {
    fn pass(&mut self, time_ns: i64) -> bool {
        match self.cursor {
            Some((t, count)) => {
                if time_ns < t {
                    false
                } else if time_ns == t && self.seen_at_cursor < count {
                    self.seen_at_cursor += 1;
                    false
                } else {
                    true
                }
            }
            None => time_ns >= self.since_ns,
        }
    }
}

/// Joins the pieces of long lines, per stream.
#[derive(Default)]
struct Assembler {
    pending: [Vec<u8>; 2],
}

impl Assembler {
    /// The whole line `r` completes, if it does (`(stream, time, bytes)`).
    fn feed(&mut self, r: &Record<'_>) -> Option<(Stream, i64, Vec<u8>)> {
        let i = usize::from(r.stream == Stream::Stderr);
        let p = &mut self.pending[i];
        p.extend_from_slice(r.data);
        if r.partial && p.len() < MAX_LINE_BYTES {
            return None;
        }
        Some((r.stream, r.time_ns, std::mem::take(p)))
    }
}

/// Lines on their way to the queue.
struct Batch<'a> {
    tx: &'a mpsc::Sender<pb::PublishLogsMessage>,
    lines: Vec<pb::LogLine>,
    bytes: usize,
    gone: bool,
}

impl Batch<'_> {
    fn push(&mut self, l: pb::LogLine) {
        self.bytes += l.data.len() + 64;
        self.lines.push(l);
        if self.bytes >= MAX_BATCH_BYTES || self.lines.len() >= MAX_BATCH_LINES {
            self.flush(false, vec![]);
        }
    }

    fn flush(&mut self, done: bool, notices: Vec<String>) {
        if self.gone || (self.lines.is_empty() && !done && notices.is_empty()) {
            return;
        }
        self.bytes = 0;
        let m = pb::PublishLogsMessage {
            lines: std::mem::take(&mut self.lines),
            done,
            notices,
            ..Default::default()
        };
        // Waits while the queue is full: the manager (and its subscriber) set the pace.
        if self.tx.blocking_send(m).is_err() {
            self.gone = true;
        }
    }
}

fn line(task: &str, (stream, time_ns, data): (Stream, i64, Vec<u8>)) -> pb::LogLine {
    pb::LogLine {
        task_id: task.to_string(),
        stream: match stream {
            Stream::Stdout => pb::LogStream::Stdout as i32,
            Stream::Stderr => pb::LogStream::Stderr as i32,
        },
        time_ns,
        data,
    }
}

/// One task being followed.
struct Followed {
    task: String,
    follower: LogFollower,
    filter: Filter,
    asm: Assembler,
}

/// Reads every task's log as `options` asks, then follows them if asked (blocking); tasks
/// sent on `more` (new to a followed service) are added as they come.
fn read_logs(
    paths: &[(String, Option<PathBuf>)],
    options: &pb::LogOptions,
    tx: &mpsc::Sender<pb::PublishLogsMessage>,
    stop: &AtomicBool,
    more: &std::sync::mpsc::Receiver<(String, Option<PathBuf>)>,
) {
    let mut batch = Batch {
        tx,
        lines: Vec::new(),
        bytes: 0,
        gone: false,
    };
    let mut notices = Vec::new();
    let mut followed = Vec::new();
    for (task, path) in paths {
        if let Some(f) = backlog(task, path.as_deref(), options, &mut batch, &mut notices) {
            followed.push(f);
        }
        if batch.gone {
            return;
        }
    }
    if !options.follow {
        batch.flush(true, notices);
        return;
    }
    batch.flush(false, notices);
    while !stop.load(Ordering::Relaxed) && !batch.gone {
        let mut notices = Vec::new();
        while let Ok((task, path)) = more.try_recv() {
            if followed.iter().any(|f: &Followed| f.task == task) {
                continue;
            }
            if let Some(f) = backlog(&task, path.as_deref(), options, &mut batch, &mut notices) {
                followed.push(f);
            }
        }
        for f in &mut followed {
            let Followed {
                task,
                follower,
                filter,
                asm,
            } = f;
            let _ = follower.poll_records(&mut |r| {
                if let Some(l) = asm.feed(&r) {
                    if filter.pass(l.1) {
                        batch.push(line(task, l));
                    }
                }
            });
        }
        batch.flush(false, notices);
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Sends what one task's log holds as `options` asks; the task to follow on, if following.
fn backlog(
    task: &str,
    path: Option<&std::path::Path>,
    options: &pb::LogOptions,
    batch: &mut Batch<'_>,
    notices: &mut Vec<String>,
) -> Option<Followed> {
    let Some(path) = path else {
        notices.push(format!("task {task}: this node keeps no logs"));
        return None;
    };
    let cursor = options
        .cursors
        .iter()
        .find(|c| c.task_id == task)
        .map(|c| (c.time_ns, c.count));
    let mut filter = Filter {
        since_ns: options.since_ns,
        cursor,
        seen_at_cursor: 0,
    };
    // The last `tail` lines: kept here until the backlog is read (at most the task's bounded
    // log files).
    let mut tail: Option<VecDeque<pb::LogLine>> =
        (options.has_tail && cursor.is_none()).then(VecDeque::new);
    let keep = usize::try_from(options.tail).unwrap_or(usize::MAX);
    let mut asm = Assembler::default();
    let mut take = |r: Record<'_>, batch: &mut Batch<'_>| {
        let Some(l) = asm.feed(&r) else { return };
        if !filter.pass(l.1) {
            return;
        }
        let l = line(task, l);
        match &mut tail {
            Some(t) => {
                if keep > 0 {
                    if t.len() == keep {
                        t.pop_front();
                    }
                    t.push_back(l);
                }
            }
            None => batch.push(l),
        }
    };
    let files = files_oldest_first(path, LOG_FILES);
    let (live, rotated) = files.split_last()?;
    for f in rotated {
        if let Err(e) = read_file(f, &mut |r| take(r, batch)) {
            notices.push(format!("task {task}: reading {}: {e}", f.display()));
        }
    }
    let mut follower = LogFollower::new(live, false);
    if let Err(e) = follower.poll_records(&mut |r| take(r, batch)) {
        notices.push(format!("task {task}: reading {}: {e}", live.display()));
    }
    for l in tail.into_iter().flatten() {
        batch.push(l);
    }
    options.follow.then(|| Followed {
        task: task.to_string(),
        follower,
        filter,
        asm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_skips_the_lines_already_seen_at_its_time() {
        let mut f = Filter {
            since_ns: 0,
            cursor: Some((10, 2)),
            seen_at_cursor: 0,
        };
        let passed: Vec<bool> = [9, 10, 10, 10, 11].iter().map(|&t| f.pass(t)).collect();
        assert_eq!(passed, vec![false, false, false, true, true]);
        let mut f = Filter {
            since_ns: 10,
            cursor: None,
            seen_at_cursor: 0,
        };
        assert!(!f.pass(9) && f.pass(10) && f.pass(11));
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use shoal_runtime::logfile::{encode, Stream};

    fn lines_of(options: pb::LogOptions, path: &std::path::Path) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(64);
        let stop = AtomicBool::new(false);
        let (_more_tx, more) = std::sync::mpsc::channel();
        read_logs(
            &[("t1".to_string(), Some(path.to_path_buf()))],
            &options,
            &tx,
            &stop,
            &more,
        );
        drop(tx);
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            for l in m.lines {
                out.push(String::from_utf8(l.data).unwrap());
            }
        }
        out
    }

    #[test]
    fn tail_since_and_cursors_pick_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("container.log");
        let mut buf = Vec::new();
        for (i, t) in [(0, 10), (1, 20), (2, 20), (3, 30)] {
            encode(
                &mut buf,
                t,
                Stream::Stdout,
                false,
                format!("l{i}").as_bytes(),
            );
        }
        std::fs::write(&p, &buf).unwrap();
        let all = lines_of(pb::LogOptions::default(), &p);
        assert_eq!(all, ["l0", "l1", "l2", "l3"]);
        let tail = lines_of(
            pb::LogOptions {
                has_tail: true,
                tail: 2,
                ..Default::default()
            },
            &p,
        );
        assert_eq!(tail, ["l2", "l3"]);
        let since = lines_of(
            pb::LogOptions {
                since_ns: 20,
                ..Default::default()
            },
            &p,
        );
        assert_eq!(since, ["l1", "l2", "l3"]);
        let resumed = lines_of(
            pb::LogOptions {
                has_tail: true,
                tail: 0,
                cursors: vec![pb::LogCursor {
                    task_id: "t1".into(),
                    time_ns: 20,
                    count: 1,
                }],
                ..Default::default()
            },
            &p,
        );
        assert_eq!(resumed, ["l2", "l3"]);
    }
}
