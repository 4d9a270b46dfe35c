//! The workload's recorded history (every control call with its start, end and outcome) and
//! the checks made on it: linearizability of each service's spec and acknowledged writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lincheck::{self, Entry, RegOp, Register, SpecValue, Verdict};

/// What a call tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Kind {
    Create,
    Update,
    Scale,
    Remove,
    Read,
}

/// How a call ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A write was acknowledged.
    Ok,
    /// A read answered (`None`: no such service).
    Read(Option<SpecValue>),
    /// Create refused: the name is taken.
    Exists,
    /// Update or remove refused: no such service.
    Missing,
    /// Refused without effect (version conflict, invalid, never sent).
    Refused(String),
    /// No answer or an answer that does not say whether it took effect.
    Unknown(String),
}

/// One recorded call. Times are microseconds since the run started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    pub id: u64,
    pub client: usize,
    pub service: String,
    pub kind: Kind,
    /// The host whose socket the call went to.
    pub via: String,
    pub start_us: u64,
    pub end_us: u64,
    /// For create, update and scale: the value written.
    pub value: Option<SpecValue>,
    /// For update and scale: the value read just before (whose version the update named).
    pub old: Option<SpecValue>,
    pub outcome: Outcome,
}

impl Call {
    fn mutates(&self) -> bool {
        self.kind != Kind::Read
    }

    /// The call as a register operation, or `None` if it tells nothing about the register
    /// (a read without answer, a refusal that had no effect).
    pub fn to_entry(&self) -> Option<Entry<RegOp>> {
        let done = |op| {
            Some(Entry {
                call: self.start_us,
                ret: Some(self.end_us),
                op,
            })
        };
        let open = |op| {
            Some(Entry {
                call: self.start_us,
                ret: None,
                op,
            })
        };
        let write_op = || match (self.kind, self.value, self.old) {
            (Kind::Create, Some(v), _) => Some(RegOp::Create(v)),
            (Kind::Update | Kind::Scale, Some(new), Some(old)) => Some(RegOp::Cas { old, new }),
            (Kind::Remove, _, _) => Some(RegOp::Remove),
            _ => None,
        };
        match &self.outcome {
            Outcome::Ok => done(write_op()?),
            Outcome::Unknown(_) if self.mutates() => open(write_op()?),
            Outcome::Read(r) => done(RegOp::Read(*r)),
            Outcome::Exists => done(RegOp::CreateExists),
            Outcome::Missing => done(RegOp::Missing),
            Outcome::Unknown(_) | Outcome::Refused(_) => None,
        }
    }
}

/// Calls grouped by service (names are unique per run, so each is one register).
pub fn by_service(calls: &[Call]) -> BTreeMap<String, Vec<&Call>> {
    let mut m: BTreeMap<String, Vec<&Call>> = BTreeMap::new();
    for c in calls {
        m.entry(c.service.clone()).or_default().push(c);
    }
    m
}

/// One service's history that has no linearization (or whose search was cut off).
#[derive(Debug, Clone, Serialize)]
pub struct LinAnomaly {
    pub service: String,
    pub verdict: String,
    /// The call that could not be placed, and the deepest partial order found (call ids).
    pub stuck_call: Option<u64>,
    pub prefix_calls: Vec<u64>,
    pub operations: usize,
}

/// Checks every service's history; returns (services checked, register operations, anomalies).
pub fn check_linearizable(calls: &[Call]) -> (usize, usize, Vec<LinAnomaly>) {
    let mut anomalies = Vec::new();
    let mut ops = 0;
    let groups = by_service(calls);
    for (service, cs) in &groups {
        let (kept, entries): (Vec<&Call>, Vec<Entry<RegOp>>) = cs
            .iter()
            .filter_map(|c| c.to_entry().map(|e| (*c, e)))
            .unzip();
        ops += entries.len();
        let v = lincheck::check(&Register, &entries, lincheck::MAX_SEARCH_STEPS);
        match v {
            Verdict::Linearizable(_) => {}
            Verdict::NotLinearizable { stuck, prefix } => anomalies.push(LinAnomaly {
                service: service.clone(),
                verdict: "not linearizable".into(),
                stuck_call: kept.get(stuck).map(|c| c.id),
                prefix_calls: prefix
                    .iter()
                    .filter_map(|&i| kept.get(i).map(|c| c.id))
                    .collect(),
                operations: entries.len(),
            }),
            Verdict::Inconclusive => anomalies.push(LinAnomaly {
                service: service.clone(),
                verdict: format!(
                    "inconclusive (search cut off after {} steps)",
                    lincheck::MAX_SEARCH_STEPS
                ),
                stuck_call: None,
                prefix_calls: Vec::new(),
                operations: entries.len(),
            }),
        }
    }
    (groups.len(), ops, anomalies)
}

/// An acknowledged write that the final state does not show, though nothing could have
/// overwritten it.
#[derive(Debug, Clone, Serialize)]
pub struct LostWrite {
    pub service: String,
    pub call: u64,
    pub kind: Kind,
    pub expected: Option<SpecValue>,
    pub found: Option<SpecValue>,
}

/// Every acknowledged create, update, scale or remove that no other call on its service
/// could have superseded (none acknowledged or unanswered that ended after it started) must
/// be what the final read shows. `finals`: each service's value read after healing.
/// Returns (acknowledged writes, of them last-of-their-service, lost ones).
pub fn check_acknowledged(
    calls: &[Call],
    finals: &BTreeMap<String, Option<SpecValue>>,
) -> (usize, usize, Vec<LostWrite>) {
    let mut acked = 0;
    let mut checked = 0;
    let mut lost = Vec::new();
    for (service, cs) in by_service(calls) {
        let Some(found) = finals.get(&service) else {
            continue;
        };
        for w in cs
            .iter()
            .filter(|c| c.mutates() && c.outcome == Outcome::Ok)
        {
            acked += 1;
            let superseded = cs.iter().any(|m| {
                m.id != w.id
                    && m.mutates()
                    && match m.outcome {
                        Outcome::Ok => m.end_us >= w.start_us,
                        // Unanswered: it may still take effect at any later moment.
                        Outcome::Unknown(_) => true,
                        _ => false,
                    }
            });
            if superseded {
                continue;
            }
            checked += 1;
            let expected = if w.kind == Kind::Remove {
                None
            } else {
                w.value
            };
            if *found != expected {
                lost.push(LostWrite {
                    service: service.clone(),
                    call: w.id,
                    kind: w.kind,
                    expected,
                    found: *found,
                });
            }
        }
    }
    (acked, checked, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(token: u64, replicas: u64) -> SpecValue {
        SpecValue { token, replicas }
    }

    fn call(
        id: u64,
        kind: Kind,
        t: (u64, u64),
        value: Option<SpecValue>,
        outcome: Outcome,
    ) -> Call {
        Call {
            id,
            client: 0,
            service: "s".into(),
            kind,
            via: "h1".into(),
            start_us: t.0,
            end_us: t.1,
            value,
            old: None,
            outcome,
        }
    }

    #[test]
    fn refusals_and_unanswered_reads_say_nothing() {
        let c = call(
            1,
            Kind::Read,
            (0, 1),
            None,
            Outcome::Unknown("timeout".into()),
        );
        assert!(c.to_entry().is_none());
        let c = call(
            2,
            Kind::Update,
            (0, 1),
            Some(v(1, 1)),
            Outcome::Refused("version".into()),
        );
        assert!(c.to_entry().is_none());
        let c = call(
            3,
            Kind::Create,
            (0, 1),
            Some(v(1, 1)),
            Outcome::Unknown("timeout".into()),
        );
        assert_eq!(c.to_entry().map(|e| e.ret), Some(None));
    }

    #[test]
    fn a_lost_update_is_found_and_a_superseded_one_is_not() {
        let mut up = call(2, Kind::Update, (10, 20), Some(v(2, 1)), Outcome::Ok);
        up.old = Some(v(1, 1));
        let calls = vec![
            call(1, Kind::Create, (0, 5), Some(v(1, 1)), Outcome::Ok),
            up.clone(),
        ];
        let finals = BTreeMap::from([("s".to_string(), Some(v(1, 1)))]);
        let (acked, checked, lost) = check_acknowledged(&calls, &finals);
        assert_eq!((acked, checked), (2, 1));
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].call, 2);
        // The same, but an unanswered remove could have come later.
        let mut calls = calls;
        calls.push(call(
            3,
            Kind::Remove,
            (30, 40),
            None,
            Outcome::Unknown("timeout".into()),
        ));
        let finals = BTreeMap::from([("s".to_string(), None)]);
        let (_, checked, lost) = check_acknowledged(&calls, &finals);
        assert_eq!(checked, 0);
        assert!(lost.is_empty());
    }

    #[test]
    fn a_history_with_a_lost_write_is_not_linearizable() {
        let mut up = call(2, Kind::Update, (10, 20), Some(v(2, 1)), Outcome::Ok);
        up.old = Some(v(1, 1));
        let calls = vec![
            call(1, Kind::Create, (0, 5), Some(v(1, 1)), Outcome::Ok),
            up,
            call(3, Kind::Read, (30, 31), None, Outcome::Read(Some(v(1, 1)))),
        ];
        let (services, ops, anomalies) = check_linearizable(&calls);
        assert_eq!((services, ops), (1, 3));
        assert_eq!(anomalies.len(), 1);
        assert_eq!(anomalies[0].stuck_call, Some(3));
    }
}
