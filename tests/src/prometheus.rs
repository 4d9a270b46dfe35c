//! A real Prometheus for tests and benchmarks: Debian's `prometheus` on loopback with a config
//! and storage of its own (a temp dir), scraping the targets the caller names; read through its
//! HTTP API. Killed by pid and its dir removed when dropped, whatever the test did.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cluster::free_port;
use crate::testbed::{describe, tail, TestbedError};

/// The Prometheus binary (Debian's `prometheus`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// How long Prometheus may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one HTTP call to it may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One sample of an instant vector: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A running Prometheus on 127.0.0.1.
pub struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`, job `shoal`) every
    /// `interval`, and waits until it is ready.
    pub fn start(targets: &[String], interval: Duration) -> Result<Prometheus, TestbedError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| TestbedError::Io { what, source }
        };
        if !std::path::Path::new(PROMETHEUS_BIN).exists() {
            return Err(TestbedError::Io {
                what: format!("{PROMETHEUS_BIN} (Debian's prometheus package)"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("shoal-prometheus-")
            .tempdir()
            .map_err(io("a Prometheus dir"))?;
        let ms = interval.as_millis().max(100);
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {ms}ms\n  evaluation_interval: {ms}ms\nscrape_configs:\n  - job_name: shoal\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .map_err(io("the Prometheus config"))?;
        let addr = format!("127.0.0.1:{}", free_port("127.0.0.1")?);
        let log = fs::File::create(dir.path().join("prometheus.log"))
            .map_err(io("the Prometheus log"))?;
        let mut cmd = Command::new(PROMETHEUS_BIN);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            cmd: describe(&cmd),
            source,
        })?;
        let mut p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if matches!(p.get("/-/ready"), Ok((200, _))) {
                return Ok(p);
            }
            if !matches!(p.child.try_wait(), Ok(None)) {
                return Err(TestbedError::Failed {
                    cmd: describe(&cmd),
                    status: "exited".into(),
                    stderr: p.log(),
                });
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!("Prometheus ready on {}; log: {}", p.addr, p.log()),
                    secs: READY_TIMEOUT.as_secs(),
                });
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Its `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The pid of its process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its dir (config, storage, log).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The end of its log.
    pub fn log(&self) -> String {
        tail(&fs::read(self.dir.path().join("prometheus.log")).unwrap_or_default())
    }

    /// `GET path` on its HTTP port: the status and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String), TestbedError> {
        http_get(&self.addr, path)
    }

    /// The instant vector PromQL `expr` evaluates to now.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, TestbedError> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let bad = |output: String| TestbedError::BadOutput {
            cmd: format!("Prometheus query {expr}"),
            output,
        };
        let (status, body) = self.get(&path)?;
        if status != 200 {
            return Err(bad(format!("HTTP {status}: {body}")));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| bad(format!("{e}: {body}")))?;
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| bad(body.clone()))?;
        result
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .ok_or_else(|| bad(body.clone()))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // By pid (SIGKILL), then reaped; the temp dir goes after it (a field, dropped next).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.0 from `addr` (`host:port`): the status and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), TestbedError> {
    let io = |what: String| move |source| TestbedError::Io { what, source };
    let what = format!("GET http://{addr}{path}");
    let mut s = std::net::TcpStream::connect(addr).map_err(io(what.clone()))?;
    s.set_read_timeout(Some(CALL_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(CALL_TIMEOUT)))
        .map_err(io(what.clone()))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io(what.clone()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io(what.clone()))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| TestbedError::BadOutput {
            cmd: what,
            output: head.to_string(),
        })?;
    Ok((status, body.to_string()))
}

/// `s` with every byte but the unreserved ones percent-encoded (a URL query value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("sum(x{a=\"b c\"}) >= 1"),
            "sum%28x%7Ba%3D%22b%20c%22%7D%29%20%3E%3D%201"
        );
    }
}
