//! Reading usage counters out of v1 and v2 control files.

use std::path::Path;

use super::fs::{keyed_value, parse_u64_or_max, read_opt, read_u64_or_zero};
use super::{CgroupError, CgroupStats};

/// v1 reports "no limit" as a page-rounded i64::MAX; anything this large means unlimited.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

/// Stats from the v1 cpuacct, memory and pids directories (each optional).
pub(super) fn v1(
    cpuacct: Option<&Path>,
    memory: Option<&Path>,
    pids: Option<&Path>,
) -> Result<CgroupStats, CgroupError> {
    let mut s = CgroupStats::default();
    if let Some(d) = cpuacct {
        s.cpu_usage_ns = read_u64_or_zero(&d.join("cpuacct.usage"))?;
    }
    if let Some(d) = memory {
        s.memory_usage = read_u64_or_zero(&d.join("memory.usage_in_bytes"))?;
        s.memory_peak = read_u64_or_zero(&d.join("memory.max_usage_in_bytes"))?;
        let limit_path = d.join("memory.limit_in_bytes");
        s.memory_limit = match read_opt(&limit_path)? {
            Some(v) => parse_u64_or_max(&limit_path, &v)?.filter(|l| *l < V1_UNLIMITED_FROM),
            None => None,
        };
        let oom_path = d.join("memory.oom_control");
        if let Some(c) = read_opt(&oom_path)? {
            s.oom_kills = keyed_value(&oom_path, &c, "oom_kill")?.unwrap_or(0);
        }
    }
    if let Some(d) = pids {
        read_pids(d, &mut s)?;
    }
    Ok(s)
}

/// Stats from a v2 cgroup directory.
pub(super) fn v2(dir: &Path) -> Result<CgroupStats, CgroupError> {
    let mut s = CgroupStats::default();
    let cpu_path = dir.join("cpu.stat");
    if let Some(c) = read_opt(&cpu_path)? {
        s.cpu_usage_ns = keyed_value(&cpu_path, &c, "usage_usec")?
            .unwrap_or(0)
            .saturating_mul(1000);
    }
    s.memory_usage = read_u64_or_zero(&dir.join("memory.current"))?;
    s.memory_peak = read_u64_or_zero(&dir.join("memory.peak"))?;
    let max_path = dir.join("memory.max");
    if let Some(v) = read_opt(&max_path)? {
        s.memory_limit = parse_u64_or_max(&max_path, &v)?;
    }
    let ev_path = dir.join("memory.events");
    if let Some(c) = read_opt(&ev_path)? {
        s.oom_kills = keyed_value(&ev_path, &c, "oom_kill")?.unwrap_or(0);
    }
    read_pids(dir, &mut s)?;
    Ok(s)
}

fn read_pids(dir: &Path, s: &mut CgroupStats) -> Result<(), CgroupError> {
    s.pids_current = read_u64_or_zero(&dir.join("pids.current"))?;
    let max_path = dir.join("pids.max");
    if let Some(v) = read_opt(&max_path)? {
        s.pids_limit = parse_u64_or_max(&max_path, &v)?;
    }
    Ok(())
}
