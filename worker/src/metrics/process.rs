//! The process series every Prometheus client exposes (`process_*`, unprefixed by the
//! convention of the client libraries, so dashboards find them), read from `/proc/self` at
//! scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// What `/proc/self/stat` tells, in base units.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stat {
    pub cpu_seconds: f64,
    pub threads: u64,
    /// Seconds after boot the process started.
    pub start_after_boot: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

/// Parses a `/proc/PID/stat` line; `ticks`: clock ticks per second, `page`: page size.
pub fn parse_stat(line: &str, ticks: f64, page: u64) -> Option<Stat> {
    // The command name is in parentheses and may hold spaces and parentheses: fields start
    // after the last ')'. Field 3 (state) is the first after it.
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_after_boot: field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page),
    })
}

/// The boot time (`btime` of `/proc/stat`), seconds since the epoch.
pub fn parse_btime(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The process's own series, read at each scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf reads a system constant.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v as u64)
}

fn put<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: V,
    ty: MetricType,
) -> std::fmt::Result
where
    ConstCounter<V>: EncodeMetric,
    ConstGauge<V>: EncodeMetric,
{
    let m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    match ty {
        MetricType::Counter => ConstCounter::new(value).encode(m),
        _ => ConstGauge::new(value).encode(m),
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let ticks = sysconf(libc::_SC_CLK_TCK).unwrap_or(100) as f64;
        let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|l| parse_stat(&l, ticks, page));
        if let Some(s) = &stat {
            put(
                &mut enc,
                "process_cpu",
                "User and system CPU time the agent used.",
                Some(Unit::Seconds),
                s.cpu_seconds,
                MetricType::Counter,
            )?;
            put(
                &mut enc,
                "process_resident_memory",
                "The agent's resident memory.",
                Some(Unit::Bytes),
                s.resident_bytes,
                MetricType::Gauge,
            )?;
            put(
                &mut enc,
                "process_virtual_memory",
                "The agent's virtual memory.",
                Some(Unit::Bytes),
                s.virtual_bytes,
                MetricType::Gauge,
            )?;
            put(
                &mut enc,
                "process_threads",
                "The agent's threads.",
                None,
                s.threads,
                MetricType::Gauge,
            )?;
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|p| parse_btime(&p));
            if let Some(boot) = boot {
                put(
                    &mut enc,
                    "process_start_time",
                    "When the agent started, since the Unix epoch.",
                    Some(Unit::Seconds),
                    boot as f64 + s.start_after_boot,
                    MetricType::Gauge,
                )?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor is among them.
            let open = fds.count().saturating_sub(1);
            put(
                &mut enc,
                "process_open_fds",
                "The agent's open file descriptors.",
                None,
                open as u64,
                MetricType::Gauge,
            )?;
        }
        if let Ok((soft, _)) = nofile_limit() {
            put(
                &mut enc,
                "process_max_fds",
                "The agent's limit of open file descriptors.",
                None,
                soft,
                MetricType::Gauge,
            )?;
        }
        Ok(())
    }
}

fn nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn a_stat_line_is_read_after_the_command_name() {
        // A command name with a space and a parenthesis, as a process may name itself.
        let line = "4242 (shoal a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 \
                    12 0 7000 123456789 2048 18446744073709551615";
        let s = parse_stat(line, 100.0, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 4.0);
        assert_eq!(s.threads, 12);
        assert_eq!(s.start_after_boot, 70.0);
        assert_eq!(s.virtual_bytes, 123456789);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1700000000\nprocesses 9\n"),
            Some(1700000000)
        );
        assert_eq!(parse_stat("garbage", 100.0, 4096), None);
    }

    #[test]
    fn this_process_reports_itself() {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &reg).unwrap();
        let value = |n: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{n} ")))
                .unwrap_or_else(|| panic!("no {n} in\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
    }
}
