//! The run's report: JSON for machines, a summary for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use shoal_chaos::history::{Call, Kind, Outcome};

use crate::faults::{DiskFullReport, FaultRecord};
use crate::observe::Observations;

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub summary: String,
    /// What it found wrong (bounded), as readable lines.
    pub findings: Vec<String>,
}

/// Counts of the recorded calls.
#[derive(Debug, Default, Serialize)]
pub struct OpStats {
    pub total: usize,
    pub by_kind: BTreeMap<String, BTreeMap<String, usize>>,
    pub services: usize,
}

pub fn op_stats(calls: &[Call]) -> OpStats {
    let mut s = OpStats {
        total: calls.len(),
        ..Default::default()
    };
    let mut names = std::collections::HashSet::new();
    for c in calls {
        names.insert(c.service.as_str());
        let kind = match c.kind {
            Kind::Create => "create",
            Kind::Update => "update",
            Kind::Scale => "scale",
            Kind::Remove => "remove",
            Kind::Read => "read",
        };
        let outcome = match c.outcome {
            Outcome::Ok | Outcome::Read(_) => "ok",
            Outcome::Exists | Outcome::Missing => "refused-state",
            Outcome::Refused(_) => "refused",
            Outcome::Unknown(_) => "unknown",
        };
        *s.by_kind
            .entry(kind.into())
            .or_default()
            .entry(outcome.into())
            .or_default() += 1;
    }
    s.services = names.len();
    s
}

/// How one kind of fault recovered over a run: time from its heal until the cluster was first
/// well, and until it was well and stayed well (its recovery), median and max; the slowest.
#[derive(Debug, Clone, Serialize)]
pub struct KindStats {
    pub kind: String,
    pub count: usize,
    pub not_recovered: usize,
    pub relapses: u32,
    pub first_well_median_s: Option<f64>,
    pub first_well_max_s: Option<f64>,
    pub recovery_median_s: Option<f64>,
    pub recovery_max_s: Option<f64>,
    /// The slowest one (not recovered counts as slowest): when it started (ms into the run)
    /// and what it did.
    pub slowest_at_ms: u64,
    pub slowest_detail: String,
}

fn median_max(mut v: Vec<f64>) -> (Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (Some(median), v.last().copied())
}

/// Per fault kind (`a` or `a+b`), in the order of first appearance.
pub fn by_kind(faults: &[FaultRecord]) -> Vec<KindStats> {
    let mut kinds: Vec<&str> = Vec::new();
    for f in faults {
        if !kinds.contains(&f.name.as_str()) {
            kinds.push(&f.name);
        }
    }
    kinds
        .into_iter()
        .map(|k| {
            let of: Vec<&FaultRecord> = faults.iter().filter(|f| f.name == k).collect();
            let (fm, fx) = median_max(of.iter().filter_map(|f| f.first_well_s).collect());
            let (rm, rx) = median_max(of.iter().filter_map(|f| f.recovery_s).collect());
            let slowest = of
                .iter()
                .max_by(|a, b| {
                    let key = |f: &FaultRecord| f.recovery_s.unwrap_or(f64::INFINITY);
                    key(a).total_cmp(&key(b))
                })
                .copied();
            KindStats {
                kind: k.to_string(),
                count: of.len(),
                not_recovered: of.iter().filter(|f| f.recovery_s.is_none()).count(),
                relapses: of.iter().map(|f| f.relapses).sum(),
                first_well_median_s: fm,
                first_well_max_s: fx,
                recovery_median_s: rm,
                recovery_max_s: rx,
                slowest_at_ms: slowest.map_or(0, |f| f.start_ms),
                slowest_detail: slowest.map(|f| f.detail.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub run_id: String,
    pub mode: String,
    pub seed: u64,
    pub managers: usize,
    /// The command that replays this run (same seed, same shape).
    pub replay: String,
    pub hosts: String,
    pub started_unix: u64,
    pub runtime_s: f64,
    pub workload_s: f64,
    pub faults: Vec<FaultRecord>,
    pub recovery_by_kind: Vec<KindStats>,
    pub disk_full: Vec<DiskFullReport>,
    pub operations: OpStats,
    pub observations: Observations,
    pub mesh: crate::mesh::MeshStats,
    pub checks: Vec<Check>,
    pub passed: bool,
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "shoal-chaos {} run {} (seed {}): {} in {:.0} s ({:.0} s of workload under faults)",
            self.mode,
            self.run_id,
            self.seed,
            if self.passed { "PASSED" } else { "FAILED" },
            self.runtime_s,
            self.workload_s
        );
        let _ = writeln!(s, "hosts: {}", self.hosts);
        let _ = writeln!(s, "\nfaults injected: {}", self.faults.len());
        for f in &self.faults {
            let _ = writeln!(
                s,
                "  {:<40} {:<55} well after {}, recovered {}{}{}",
                f.name,
                f.detail,
                f.first_well_s
                    .map(|x| format!("{x:.1} s"))
                    .unwrap_or_else(|| "—".into()),
                f.recovery_s
                    .map(|x| format!("in {x:.1} s"))
                    .unwrap_or_else(|| "NO".into()),
                if f.relapses > 0 {
                    format!(" ({} relapses)", f.relapses)
                } else {
                    String::new()
                },
                if f.errors.is_empty() {
                    String::new()
                } else {
                    format!("  errors: {}", f.errors.join("; "))
                }
            );
        }
        let opt = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.1}"));
        let _ = writeln!(
            s,
            "\nrecovery by fault kind (seconds from the heal: first well / well and still well {} s later):",
            crate::faults::STABLE_FOR.as_secs()
        );
        let _ = writeln!(
            s,
            "  {:<58} {:>3} {:>15} {:>15}  slowest",
            "kind", "n", "first med/max", "recov med/max"
        );
        for k in &self.recovery_by_kind {
            let _ = writeln!(
                s,
                "  {:<58} {:>3} {:>7}/{:<7} {:>7}/{:<7}  at {:.0} s: {}{}{}",
                k.kind,
                k.count,
                opt(k.first_well_median_s),
                opt(k.first_well_max_s),
                opt(k.recovery_median_s),
                opt(k.recovery_max_s),
                k.slowest_at_ms as f64 / 1000.0,
                k.slowest_detail,
                if k.not_recovered > 0 {
                    format!(", {} NOT recovered", k.not_recovered)
                } else {
                    String::new()
                },
                if k.relapses > 0 {
                    format!(", {} relapses", k.relapses)
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(s, "replay: {}", self.replay);
        let o = &self.operations;
        let _ = writeln!(s, "\noperations: {} on {} services", o.total, o.services);
        for (k, m) in &o.by_kind {
            let parts: Vec<String> = m.iter().map(|(o, n)| format!("{o} {n}")).collect();
            let _ = writeln!(s, "  {k:<7} {}", parts.join(", "));
        }
        let ob = &self.observations;
        let _ = writeln!(
            s,
            "task samples: {} ({} failed), {} tasks seen",
            ob.samples, ob.failed_samples, ob.tasks_seen
        );
        let _ = writeln!(s, "\nchecks:");
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  [{}] {}: {}",
                if c.passed { "pass" } else { "FAIL" },
                c.name,
                c.summary
            );
            for f in c.findings.iter().take(10) {
                let _ = writeln!(s, "         - {f}");
            }
            if c.findings.len() > 10 {
                let _ = writeln!(s, "         ... {} more", c.findings.len() - 10);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::Fault;

    fn rec(name: &str, first: Option<f64>, rec: Option<f64>, start_ms: u64) -> FaultRecord {
        FaultRecord {
            fault: Fault::KillLeader,
            overlap: None,
            name: name.into(),
            detail: format!("at {start_ms}"),
            start_ms,
            healed_ms: start_ms + 1,
            first_well_s: first,
            recovery_s: rec,
            relapses: u32::from(first != rec),
            errors: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn recovery_is_summed_up_per_kind_with_the_slowest_named() {
        let faults = [
            rec("a", Some(1.0), Some(1.0), 10),
            rec("b", Some(0.5), Some(0.5), 20),
            rec("a", Some(0.2), Some(4.0), 30),
            rec("a", Some(2.0), Some(2.0), 40),
            rec("b", Some(0.1), None, 50),
        ];
        let k = by_kind(&faults);
        assert_eq!(k.len(), 2);
        assert_eq!((k[0].kind.as_str(), k[0].count), ("a", 3));
        assert_eq!(k[0].first_well_median_s, Some(1.0));
        assert_eq!(k[0].recovery_median_s, Some(2.0));
        assert_eq!(k[0].recovery_max_s, Some(4.0));
        assert_eq!(k[0].slowest_at_ms, 30);
        assert_eq!(k[0].relapses, 1);
        // One not recovered: it is the slowest, and the median is of the recovered ones.
        assert_eq!(k[1].not_recovered, 1);
        assert_eq!(k[1].slowest_at_ms, 50);
        assert_eq!(k[1].recovery_median_s, Some(0.5));
        assert_eq!(median_max(vec![3.0, 1.0]), (Some(2.0), Some(3.0)));
        assert_eq!(median_max(vec![]), (None, None));
    }
}
