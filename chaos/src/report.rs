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

#[derive(Debug, Serialize)]
pub struct Report {
    pub run_id: String,
    pub mode: String,
    pub seed: u64,
    pub hosts: String,
    pub started_unix: u64,
    pub runtime_s: f64,
    pub workload_s: f64,
    pub faults: Vec<FaultRecord>,
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
                "  {:<40} {:<55} recovered {}{}",
                f.name,
                f.detail,
                f.recovery_s
                    .map(|x| format!("in {x:.1} s"))
                    .unwrap_or_else(|| "NO".into()),
                if f.errors.is_empty() {
                    String::new()
                } else {
                    format!("  errors: {}", f.errors.join("; "))
                }
            );
        }
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
