//! `shoal service logs`: a service's or a task's lines from every node, as docker prints them
//! (`NAME.SLOT.TASKID@NODE    | line`, stderr lines on stderr). A stream that breaks (the
//! leader went away) is resumed with a cursor per task: the time of the last line printed and
//! how many lines with that time were printed, so nothing is printed twice or skipped.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_runtime::image::timefmt::{format_unix_nanos, parse_rfc3339_nanos};
use tonic::{Code, Status};

use super::super::output::{parse_duration_ms, parse_tail, SocketArg};

/// How long a broken stream is retried before giving up.
const RESUME_WINDOW: Duration = Duration::from_secs(30);
/// Pause between attempts to resume.
const RESUME_PAUSE: Duration = Duration::from_millis(250);
/// Largest message accepted from the manager (a batch of lines).
const MAX_LOG_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Task ids are cut to this length unless `--no-trunc` (docker's).
const SHORT_ID: usize = 12;

#[derive(Args)]
pub struct LogsArgs {
    /// Follow new lines
    #[arg(short, long)]
    follow: bool,
    /// Lines to show from the end of each task's log, or "all"
    #[arg(short = 'n', long, default_value = "all")]
    tail: String,
    /// Lines since a time: RFC 3339 (2026-12-07T18:00:00Z), Unix seconds, or a duration
    /// before now (10m, 1h30m)
    #[arg(long)]
    since: Option<String>,
    /// Show each line's time
    #[arg(short, long)]
    timestamps: bool,
    /// The lines alone, without the task prefix
    #[arg(long)]
    raw: bool,
    /// Leave the task id out of the prefix
    #[arg(long)]
    no_task_ids: bool,
    /// Full task ids
    #[arg(long)]
    no_trunc: bool,
    /// Service (name or id) or task id
    target: String,
}

/// `--since` as nanoseconds since the epoch.
pub fn parse_since(s: &str, now_ns: i64) -> Result<i64> {
    if let Some(t) = parse_rfc3339_nanos(s) {
        return Ok(t);
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && (0.0..1e11).contains(&secs) {
            return Ok((secs * 1e9) as i64);
        }
    }
    match parse_duration_ms(s) {
        Ok(ms) => Ok(now_ns.saturating_sub(
            i64::try_from(ms)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000),
        )),
        Err(_) => bail!(
            "invalid --since {s:?}: expected an RFC 3339 time, Unix seconds or a duration (10m, 1h)"
        ),
    }
}

/// Where printing stands, per task.
#[derive(Default)]
struct Cursor {
    time_ns: i64,
    count: u32,
}

/// `shoal service logs`.
pub async fn run(socket: &SocketArg, a: LogsArgs) -> Result<()> {
    let now = shoal_runtime::logfile::now_ns();
    let since_ns = a
        .since
        .as_deref()
        .map(|s| parse_since(s, now))
        .transpose()?;
    let tail = parse_tail(&a.tail)?;
    let mut tasks: HashMap<String, pb::LogTask> = HashMap::new();
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    let mut width = 0;
    let mut first = true;
    let mut failing_since: Option<Instant> = None;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    loop {
        let options = pb::LogOptions {
            follow: a.follow,
            since_ns: since_ns.unwrap_or(0),
            has_tail: tail.is_some(),
            tail: tail.unwrap_or(0),
            cursors: cursors
                .iter()
                .map(|(t, c)| pb::LogCursor {
                    task_id: t.clone(),
                    time_ns: c.time_ns,
                    count: c.count,
                })
                .collect(),
        };
        let opened = async {
            let mut c = ControlClient::new(socket.channel().await?)
                .max_decoding_message_size(MAX_LOG_MESSAGE_BYTES);
            Ok::<_, anyhow::Error>(
                c.subscribe_logs(pb::SubscribeLogsRequest {
                    target: a.target.clone(),
                    options: Some(options),
                })
                .await,
            )
        }
        .await;
        let broke = match opened {
            Ok(Ok(resp)) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            failing_since = None;
                            // Answered: the request was good; a break from now on is resumed.
                            first = false;
                            for t in m.tasks {
                                width = width.max(context(&t, &a).len());
                                tasks.insert(t.task_id.clone(), t);
                            }
                            for n in m.notices {
                                eprintln!("shoal: {n}");
                            }
                            let mut out = stdout.lock();
                            let mut err = stderr.lock();
                            for l in m.lines {
                                let c = cursors.entry(l.task_id.clone()).or_default();
                                if c.time_ns == l.time_ns {
                                    c.count += 1;
                                } else {
                                    *c = Cursor {
                                        time_ns: l.time_ns,
                                        count: 1,
                                    };
                                }
                                let w: &mut dyn Write = if l.stream == pb::LogStream::Stderr as i32
                                {
                                    &mut err
                                } else {
                                    &mut out
                                };
                                if print(w, &l, tasks.get(&l.task_id), width, &a).is_err() {
                                    // A closed stdout ends the command quietly, as with `cat`.
                                    return Ok(());
                                }
                            }
                            let _ = out.flush();
                        }
                        Ok(None) if !a.follow => return Ok(()),
                        Ok(None) => break Status::unavailable("the log stream ended"),
                        Err(e) => break e,
                    }
                }
            }
            Ok(Err(e)) => e,
            Err(e) if first => return Err(e),
            Err(e) => tonic::Status::unavailable(e.to_string()),
        };
        // The first answer decides a bad request (an unknown service); later, a broken stream
        // is resumed from the cursors while managers elect a leader.
        let retry = matches!(
            broke.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal | Code::Aborted
        );
        if !retry || (first && broke.code() != Code::Unavailable) {
            bail!("{}", broke.message());
        }
        first = false;
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RESUME_WINDOW {
            bail!("log stream lost: {}", broke.message());
        }
        tokio::time::sleep(RESUME_PAUSE).await;
    }
}

/// `NAME.SLOT.TASKID@NODE` (global services: the node id for the slot, as docker's task names).
fn context(t: &pb::LogTask, a: &LogsArgs) -> String {
    let id = if a.no_trunc {
        t.task_id.as_str()
    } else {
        &t.task_id[..t.task_id.len().min(SHORT_ID)]
    };
    let slot = if t.slot == 0 {
        t.node_id.clone()
    } else {
        t.slot.to_string()
    };
    if a.no_task_ids {
        format!("{}.{slot}@{}", t.service_name, t.node_name)
    } else {
        format!("{}.{slot}.{id}@{}", t.service_name, t.node_name)
    }
}

fn print(
    w: &mut dyn Write,
    l: &pb::LogLine,
    task: Option<&pb::LogTask>,
    width: usize,
    a: &LogsArgs,
) -> std::io::Result<()> {
    if !a.raw {
        let ctx = match task {
            Some(t) => context(t, a),
            None => l.task_id.clone(),
        };
        write!(w, "{ctx:<width$}    | ")?;
    }
    if a.timestamps {
        write!(w, "{} ", format_unix_nanos(l.time_ns))?;
    }
    w.write_all(&l.data)?;
    w.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_seconds_and_durations() {
        let now = 1_700_000_000_000_000_000;
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000_000_000
        );
        assert_eq!(parse_since("1700000000", now).unwrap(), now);
        assert_eq!(parse_since("10m", now).unwrap(), now - 600_000_000_000);
        assert_eq!(parse_since("1h30m", now).unwrap(), now - 5_400_000_000_000);
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_tail("x").is_err());
        assert_eq!(parse_tail("all").unwrap(), None);
        assert_eq!(parse_tail("3").unwrap(), Some(3));
    }
}
