//! OCI `LinuxSeccomp` → one classic-BPF program, built from seccompiler filters.
//!
//! seccompiler gives each filter a single match action. A profile with several actions
//! (ALLOW, ERRNO(ENOSYS) for clone3, ...) is compiled as a chain of segments, one per
//! (layer, action): each segment is a seccompiler filter whose "no match" return is rewritten
//! into a jump to the next segment, and the chain ends in the profile's default action. A
//! syscall listed several times keeps its entries' order: its first entry's rules sit in
//! layer 0, the next entry with a different action in layer 1, and so on, so the first entry
//! that matches decides, as in the profile.

use std::collections::BTreeMap;

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::{table, Filter, SeccompError};

/// Largest program the kernel accepts (BPF_MAXINSNS).
pub(super) const BPF_MAX_INSNS: usize = 4096;

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_RET_K: u16 = 0x06;
/// Offsets into struct seccomp_data.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// x32 syscalls run as x86_64 with this bit set in the number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const ENOSYS: u32 = 38;
const EPERM: u32 = 1;
/// Instructions seccompiler puts before the syscall chains: load arch, compare, kill.
const ARCH_CHECK_LEN: usize = 3;

/// The "no rule matched in this segment" marker; no real profile returns it.
const SENTINEL: SeccompAction = SeccompAction::Trace(0xFFFF);

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn target() -> Result<(TargetArch, u32), SeccompError> {
    if cfg!(target_arch = "x86_64") {
        // AUDIT_ARCH_X86_64
        Ok((TargetArch::x86_64, 0xC000_003E))
    } else if cfg!(target_arch = "aarch64") {
        // AUDIT_ARCH_AARCH64
        Ok((TargetArch::aarch64, 0xC000_00B7))
    } else {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH.into()))
    }
}

/// OCI action (+ errno) → seccompiler action.
fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, SeccompError> {
    let ret = errno.unwrap_or(EPERM);
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(ret),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(ret),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction("SCMP_ACT_NOTIFY".into()))
        }
    })
}

fn condition(a: &oci_spec::runtime::LinuxSeccompArg) -> Result<SeccompCondition, SeccompError> {
    let index = u8::try_from(a.index())
        .ok()
        .filter(|i| *i <= 5)
        .ok_or(SeccompError::BadArgIndex(a.index()))?;
    let (op, value) = match a.op() {
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
        // libseccomp's form: value is the mask, valueTwo the datum.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(a.value()),
            a.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SeccompError::Compile(e.to_string()))
}

/// The rules of one entry: `None` matches any arguments. Args on distinct indexes are ANDed
/// in one rule; when an index repeats, each arg becomes its own rule (ORed), as runc does.
fn entry_rules(
    args: Option<&Vec<oci_spec::runtime::LinuxSeccompArg>>,
) -> Result<Option<Vec<SeccompRule>>, SeccompError> {
    let Some(args) = args.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let mut idx: Vec<usize> = args.iter().map(|a| a.index()).collect();
    idx.sort_unstable();
    idx.dedup();
    let conds = args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
    let rule = |c: Vec<SeccompCondition>| {
        SeccompRule::new(c).map_err(|e| SeccompError::Compile(e.to_string()))
    };
    if idx.len() == args.len() {
        Ok(Some(vec![rule(conds)?]))
    } else {
        Ok(Some(
            conds
                .into_iter()
                .map(|c| rule(vec![c]))
                .collect::<Result<Vec<_>, _>>()?,
        ))
    }
}

/// One entry of a syscall's ordered list: an action and its rules (`None` = unconditional).
struct Group {
    action: SeccompAction,
    rules: Option<Vec<SeccompRule>>,
}

/// Compile for the running architecture.
pub(super) fn compile(s: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    let (arch, audit_arch) = target()?;
    let default = action(s.default_action(), s.default_errno_ret())?;
    let sentinel_code = u32::from(SENTINEL);

    // Per syscall number, its entries in profile order, same-action neighbours merged.
    let mut per_nr: BTreeMap<i64, Vec<Group>> = BTreeMap::new();
    // Actions in order of first appearance, so segment order is stable.
    let mut actions: Vec<SeccompAction> = Vec::new();
    for sc in s.syscalls().as_deref().unwrap_or(&[]) {
        let act = action(sc.action(), sc.errno_ret())?;
        if u32::from(act.clone()) == sentinel_code {
            return Err(SeccompError::Unsupported(
                "SCMP_ACT_TRACE with value 65535 (reserved by shoal)".into(),
            ));
        }
        let rules = entry_rules(sc.args().as_ref())?;
        for name in sc.names() {
            // Unknown names are skipped, as runc does: profiles list other arches' calls.
            let Some(nr) = table::number(name) else {
                continue;
            };
            let groups = per_nr.entry(nr).or_default();
            match groups.last_mut() {
                // After an unconditional entry nothing later can match.
                Some(last) if last.rules.is_none() => {}
                Some(last) if last.action == act => match (&mut last.rules, &rules) {
                    (Some(have), Some(more)) => have.extend(more.iter().cloned()),
                    (slot, None) => *slot = None,
                    (None, Some(_)) => {}
                },
                _ => groups.push(Group {
                    action: act.clone(),
                    rules: rules.clone(),
                }),
            }
            if !actions.contains(&act) {
                actions.push(act.clone());
            }
        }
    }

    let layers = per_nr.values().map(Vec::len).max().unwrap_or(0);
    let mut prog: BpfProgram = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        jump(BPF_JMP_JEQ_K, audit_arch, 1, 0),
        // Another ABI (i386 or arm32 compat) has its own numbers, which this filter does not
        // describe: kill rather than misjudge them.
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, DATA_NR),
    ];
    if arch == TargetArch::x86_64 {
        prog.push(jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        prog.push(stmt(BPF_RET_K, u32::from(SeccompAction::Errno(ENOSYS))));
    }
    if !matches!(default, SeccompAction::Allow | SeccompAction::Log) {
        // A syscall newer than the table gets ENOSYS, so libc falls back to an older one
        // instead of failing on EPERM.
        let max = u32::try_from(table::max_number()).unwrap_or(u32::MAX);
        prog.push(jump(BPF_JMP_JGT_K, max, 0, 1));
        prog.push(stmt(BPF_RET_K, u32::from(SeccompAction::Errno(ENOSYS))));
    }

    for layer in 0..layers {
        for act in &actions {
            let rules: BTreeMap<i64, Vec<SeccompRule>> = per_nr
                .iter()
                .filter_map(|(nr, groups)| {
                    let g = groups.get(layer)?;
                    (g.action == *act).then(|| (*nr, g.rules.clone().unwrap_or_default()))
                })
                .collect();
            if rules.is_empty() {
                continue;
            }
            let f = SeccompFilter::new(rules, SENTINEL, act.clone(), arch)
                .map_err(|e| SeccompError::Compile(e.to_string()))?;
            let seg: BpfProgram = f
                .try_into()
                .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))?;
            append_segment(&mut prog, seg, sentinel_code)?;
        }
    }
    prog.push(stmt(BPF_RET_K, u32::from(default)));
    if prog.len() > BPF_MAX_INSNS {
        return Err(SeccompError::TooLarge(prog.len()));
    }

    let mut flags = 0u32;
    for f in s.flags().as_deref().unwrap_or(&[]) {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
        } as u32;
    }
    Ok(Filter { prog, flags })
}

/// Drop the segment's own arch check and turn its "no match" returns into jumps past its end.
fn append_segment(
    prog: &mut BpfProgram,
    seg: BpfProgram,
    sentinel: u32,
) -> Result<(), SeccompError> {
    let looks_like_arch_check = seg.len() > ARCH_CHECK_LEN
        && seg[0] == stmt(BPF_LD_W_ABS, DATA_ARCH)
        && seg[1].code == BPF_JMP_JEQ_K
        && seg[2].code == BPF_RET_K;
    if !looks_like_arch_check {
        return Err(SeccompError::Compile(
            "unexpected seccompiler output (no leading arch check)".into(),
        ));
    }
    let body = &seg[ARCH_CHECK_LEN..];
    let n = body.len();
    for (i, ins) in body.iter().enumerate() {
        if ins.code == BPF_RET_K && ins.k == sentinel {
            // Jump to the instruction after the segment: the next one's syscall load.
            let skip = u32::try_from(n - i - 1).map_err(|_| SeccompError::TooLarge(n))?;
            prog.push(stmt(BPF_JMP_JA, skip));
        } else {
            prog.push(ins.clone());
        }
    }
    Ok(())
}
