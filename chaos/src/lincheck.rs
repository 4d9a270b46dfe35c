//! A Wing–Gong linearizability checker with Lowe's memoisation (the "WGL" search), over any
//! deterministic sequential [`Model`], and the per-service register model the chaos workload
//! is checked against.
//!
//! The history is a list of operations with a call time and, when the client saw an answer,
//! a return time. An operation without one (a timeout, a dropped connection: the outcome is
//! unknown) may have taken effect at any moment after its call, or never; it is placed at
//! +∞ and the search may leave it out. The search walks the history's call/return events in
//! time order, linearizing a called operation whenever the model accepts it, and backtracks
//! when it meets the return of an operation it has not linearized yet; (linearized set,
//! state) pairs already explored are cached, so each is explored once.

use std::collections::HashSet;
use std::hash::Hash;

/// Search steps after which a check gives up (reported as inconclusive, never as a pass).
pub const MAX_SEARCH_STEPS: u64 = 20_000_000;

/// A sequential specification: the state an operation leads to, or `None` when the
/// operation (with the outcome the client saw) is impossible in that state.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Op;
    fn init(&self) -> Self::State;
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
}

/// One operation of a history: called at `call`, answered at `ret` (`None`: never answered).
#[derive(Debug, Clone)]
pub struct Entry<O> {
    pub call: u64,
    pub ret: Option<u64>,
    pub op: O,
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists; its order (indices into the history).
    Linearizable(Vec<usize>),
    /// None exists. `stuck` is an operation that could not be placed before its return by
    /// the deepest partial linearization found, `prefix` that partial linearization.
    NotLinearizable { stuck: usize, prefix: Vec<usize> },
    /// The search was cut off after [`MAX_SEARCH_STEPS`].
    Inconclusive,
}

const NIL: usize = usize::MAX;

/// Event list node: a call or a return of operation `op`.
#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_call: bool,
    /// For a call: its return node.
    other: usize,
    prev: usize,
    next: usize,
}

/// Checks `history` against `model` (at most `max_steps` search steps).
pub fn check<M: Model>(model: &M, history: &[Entry<M::Op>], max_steps: u64) -> Verdict {
    let n = history.len();
    // Events: calls sort before returns at the same instant (treated as overlapping, the
    // lenient reading of equal timestamps); unanswered returns go last, at +∞.
    let mut events: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(2 * n);
    for (i, e) in history.iter().enumerate() {
        events.push((e.call, 0, i, true));
        events.push((e.ret.unwrap_or(u64::MAX), 1, i, false));
    }
    events.sort();
    // Node 0 is the head sentinel; event k is node k + 1.
    let mut nodes = vec![
        Node {
            op: NIL,
            is_call: false,
            other: NIL,
            prev: NIL,
            next: NIL,
        };
        2 * n + 1
    ];
    let mut ret_node = vec![NIL; n];
    for (k, &(_, _, op, is_call)) in events.iter().enumerate() {
        let id = k + 1;
        nodes[id].op = op;
        nodes[id].is_call = is_call;
        nodes[id].prev = k;
        nodes[id].next = if k + 2 <= 2 * n { k + 2 } else { NIL };
        if !is_call {
            ret_node[op] = id;
        }
    }
    nodes[0].next = if n > 0 { 1 } else { NIL };
    for id in 1..=2 * n {
        if nodes[id].is_call {
            nodes[id].other = ret_node[nodes[id].op];
        }
    }

    fn unlink(nodes: &mut [Node], id: usize) {
        let (p, nx) = (nodes[id].prev, nodes[id].next);
        nodes[p].next = nx;
        if nx != NIL {
            nodes[nx].prev = p;
        }
    }
    fn relink(nodes: &mut [Node], id: usize) {
        let (p, nx) = (nodes[id].prev, nodes[id].next);
        nodes[p].next = id;
        if nx != NIL {
            nodes[nx].prev = id;
        }
    }

    let mut state = model.init();
    let mut linearized = vec![0u64; n.div_ceil(64).max(1)];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut best: (usize, usize, Vec<usize>) = (0, NIL, Vec::new());
    let mut entry = nodes[0].next;
    let mut steps = 0u64;
    while nodes[0].next != NIL {
        steps += 1;
        if steps > max_steps {
            return Verdict::Inconclusive;
        }
        let node = nodes[entry];
        if node.is_call {
            if let Some(next_state) = model.step(&state, &history[node.op].op) {
                let mut lin = linearized.clone();
                lin[node.op / 64] |= 1 << (node.op % 64);
                if cache.insert((lin.clone(), next_state.clone())) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = lin;
                    unlink(&mut nodes, entry);
                    unlink(&mut nodes, node.other);
                    entry = nodes[0].next;
                    continue;
                }
            }
            entry = node.next;
        } else {
            if history[node.op].ret.is_none() {
                // Only unanswered operations are left: they never took effect.
                break;
            }
            if best.1 == NIL || stack.len() > best.0 {
                best = (
                    stack.len(),
                    node.op,
                    stack.iter().map(|(e, _)| nodes[*e].op).collect(),
                );
            }
            let Some((call, prev_state)) = stack.pop() else {
                return Verdict::NotLinearizable {
                    stuck: best.1,
                    prefix: best.2,
                };
            };
            state = prev_state;
            let op = nodes[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            let ret = nodes[call].other;
            relink(&mut nodes, ret);
            relink(&mut nodes, call);
            entry = nodes[call].next;
        }
    }
    Verdict::Linearizable(stack.iter().map(|(e, _)| nodes[*e].op).collect())
}

/// What a service's spec holds, as far as the register model is concerned: the write token
/// (a label every create and update sets to a unique number) and the replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SpecValue {
    pub token: u64,
    pub replicas: u64,
}

/// A register operation with the outcome the client saw, as the model reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RegOp {
    /// Created with this value (answered OK, or unanswered).
    Create(SpecValue),
    /// Create refused: the name was taken.
    CreateExists,
    /// Update that named the version it had read (value `old`) and wrote `new`.
    Cas { old: SpecValue, new: SpecValue },
    /// Update or remove refused: no such service.
    Missing,
    /// Removed (answered OK, or unanswered).
    Remove,
    /// Read this (`None`: not found).
    Read(Option<SpecValue>),
}

/// The register: a service's spec value, or `None` while it does not exist.
pub struct Register;

impl Model for Register {
    type State = Option<SpecValue>;
    type Op = RegOp;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, s: &Self::State, op: &RegOp) -> Option<Self::State> {
        match (op, s) {
            (RegOp::Create(v), None) => Some(Some(*v)),
            (RegOp::CreateExists, Some(_)) => Some(*s),
            (RegOp::Cas { old, new }, Some(cur)) if cur == old => Some(Some(*new)),
            (RegOp::Missing, None) => Some(None),
            (RegOp::Remove, Some(_)) => Some(None),
            (RegOp::Read(r), _) if r == s => Some(*s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(token: u64) -> SpecValue {
        SpecValue { token, replicas: 1 }
    }

    fn e(call: u64, ret: Option<u64>, op: RegOp) -> Entry<RegOp> {
        Entry { call, ret, op }
    }

    fn verdict(h: &[Entry<RegOp>]) -> Verdict {
        check(&Register, h, MAX_SEARCH_STEPS)
    }

    #[test]
    fn sequential_history_is_linearizable_in_its_order() {
        let h = [
            e(0, Some(1), RegOp::Read(None)),
            e(2, Some(3), RegOp::Create(v(1))),
            e(4, Some(5), RegOp::Read(Some(v(1)))),
            e(
                6,
                Some(7),
                RegOp::Cas {
                    old: v(1),
                    new: v(2),
                },
            ),
            e(8, Some(9), RegOp::Read(Some(v(2)))),
            e(10, Some(11), RegOp::Remove),
            e(12, Some(13), RegOp::Missing),
        ];
        assert_eq!(
            verdict(&h),
            Verdict::Linearizable(vec![0, 1, 2, 3, 4, 5, 6])
        );
    }

    #[test]
    fn overlapping_operations_may_take_effect_in_either_order() {
        // The read overlaps the update and sees the new value before the update returns.
        let h = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(
                2,
                Some(10),
                RegOp::Cas {
                    old: v(1),
                    new: v(2),
                },
            ),
            e(3, Some(4), RegOp::Read(Some(v(2)))),
            e(5, Some(6), RegOp::Read(Some(v(2)))),
        ];
        assert!(matches!(verdict(&h), Verdict::Linearizable(_)));
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_rejected() {
        let h = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(
                2,
                Some(3),
                RegOp::Cas {
                    old: v(1),
                    new: v(2),
                },
            ),
            e(4, Some(5), RegOp::Read(Some(v(1)))),
        ];
        match verdict(&h) {
            Verdict::NotLinearizable { stuck, .. } => assert_eq!(stuck, 2),
            other => panic!("accepted a stale read: {other:?}"),
        }
    }

    #[test]
    fn a_lost_acknowledged_create_is_rejected() {
        let h = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(2, Some(3), RegOp::Read(None)),
        ];
        assert!(matches!(verdict(&h), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn two_successful_creates_of_one_name_are_rejected() {
        let h = [
            e(0, Some(5), RegOp::Create(v(1))),
            e(1, Some(6), RegOp::Create(v(2))),
        ];
        assert!(matches!(verdict(&h), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn reads_that_flip_between_values_are_rejected() {
        // Both writes overlap both reads, but once v2 was read, v1 cannot come back (each
        // value is written once).
        let h = [
            e(0, Some(1), RegOp::Create(v(0))),
            e(
                2,
                Some(20),
                RegOp::Cas {
                    old: v(0),
                    new: v(1),
                },
            ),
            e(
                3,
                Some(20),
                RegOp::Cas {
                    old: v(1),
                    new: v(2),
                },
            ),
            e(4, Some(5), RegOp::Read(Some(v(2)))),
            e(6, Some(7), RegOp::Read(Some(v(1)))),
        ];
        assert!(matches!(verdict(&h), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn an_unanswered_write_may_take_effect_late_or_never() {
        let late = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(
                2,
                None,
                RegOp::Cas {
                    old: v(1),
                    new: v(2),
                },
            ),
            e(3, Some(4), RegOp::Read(Some(v(1)))),
            e(50, Some(51), RegOp::Read(Some(v(2)))),
        ];
        assert!(matches!(verdict(&late), Verdict::Linearizable(_)));
        let never = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(2, None, RegOp::Remove),
            e(50, Some(51), RegOp::Read(Some(v(1)))),
        ];
        assert!(matches!(verdict(&never), Verdict::Linearizable(_)));
        // But not before it was called.
        let early = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(2, Some(3), RegOp::Read(Some(v(2)))),
            e(
                4,
                None,
                RegOp::Cas {
                    old: v(1),
                    new: v(2),
                },
            ),
        ];
        assert!(matches!(verdict(&early), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn refusals_constrain_the_state_too() {
        // "Already exists" before anything was created cannot be.
        let h = [
            e(0, Some(1), RegOp::CreateExists),
            e(2, Some(3), RegOp::Create(v(1))),
        ];
        assert!(matches!(verdict(&h), Verdict::NotLinearizable { .. }));
        // "No such service" after an acknowledged create, with no remove, cannot be.
        let h = [
            e(0, Some(1), RegOp::Create(v(1))),
            e(2, Some(3), RegOp::Missing),
        ];
        assert!(matches!(verdict(&h), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn many_concurrent_clients_stay_tractable() {
        // 8 overlapping writers and readers, repeated: the cache keeps this quick.
        let mut h = vec![e(0, Some(1), RegOp::Create(v(0)))];
        let mut t = 10;
        for round in 0..30u64 {
            let base = round * 8;
            for i in 0..8u64 {
                let old = if i == 0 { base } else { base + i };
                h.push(e(
                    t + i,
                    Some(t + 100),
                    RegOp::Cas {
                        old: v(old),
                        new: v(base + i + 1),
                    },
                ));
                h.push(e(t + i, Some(t + 100), RegOp::Read(Some(v(base + 4)))));
            }
            // Make each round's writes a chain: old of write i+1 is new of write i.
            t += 200;
        }
        match verdict(&h) {
            Verdict::Linearizable(order) => assert_eq!(order.len(), h.len()),
            other => panic!("{other:?}"),
        }
    }

    /// Whether some order of the answered operations and a subset of the unanswered ones
    /// respects real time and the model: every permutation, tried.
    fn brute_force(h: &[Entry<RegOp>]) -> bool {
        fn go(h: &[Entry<RegOp>], used: &mut Vec<bool>, state: Option<SpecValue>) -> bool {
            if h.iter()
                .zip(used.iter())
                .all(|(e, u)| *u || e.ret.is_none())
            {
                return true;
            }
            for i in 0..h.len() {
                if used[i] {
                    continue;
                }
                // i may go next only if no other pending operation returned before i's call.
                let blocked = (0..h.len())
                    .any(|j| j != i && !used[j] && h[j].ret.is_some_and(|r| r < h[i].call));
                if blocked {
                    continue;
                }
                if let Some(next) = Register.step(&state, &h[i].op) {
                    used[i] = true;
                    if go(h, used, next) {
                        return true;
                    }
                    used[i] = false;
                }
            }
            false
        }
        go(h, &mut vec![false; h.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3000 {
            let n = rng.gen_range(1..=6);
            let h: Vec<Entry<RegOp>> = (0..n)
                .map(|_| {
                    let call = rng.gen_range(0..20);
                    let ret = (rng.gen_range(0..6) > 0).then(|| call + rng.gen_range(0..8));
                    let val = |rng: &mut rand::rngs::StdRng| v(rng.gen_range(1..4));
                    let op = match rng.gen_range(0..6) {
                        0 => RegOp::Create(val(&mut rng)),
                        1 => RegOp::CreateExists,
                        2 => RegOp::Cas {
                            old: val(&mut rng),
                            new: val(&mut rng),
                        },
                        3 => RegOp::Missing,
                        4 => RegOp::Remove,
                        _ => RegOp::Read(rng.gen_bool(0.7).then(|| val(&mut rng))),
                    };
                    e(call, ret, op)
                })
                .collect();
            let expected = brute_force(&h);
            let got = verdict(&h);
            assert_eq!(
                matches!(got, Verdict::Linearizable(_)),
                expected,
                "{h:?}: {got:?}"
            );
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        // Both verdicts were exercised.
        assert!(yes > 300 && no > 300, "{yes} linearizable, {no} not");
    }

    #[test]
    fn the_step_limit_gives_inconclusive_not_a_pass() {
        let h = [
            e(0, Some(10), RegOp::Create(v(1))),
            e(1, Some(10), RegOp::Read(Some(v(2)))),
        ];
        assert_eq!(check(&Register, &h, 2), Verdict::Inconclusive);
    }
}
