//! Device access control on cgroup v2, which has no devices files: the rules are compiled
//! into a BPF_PROG_TYPE_CGROUP_DEVICE eBPF program and attached to the container's cgroup.
//!
//! Semantics follow the v1 devices controller: a rule for every device ("a", no numbers)
//! resets the default and drops the rules before it; after that the last matching rule wins.
//! An allow rule matches when it covers every access bit requested; a deny rule matches when
//! it covers any of them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceType, LinuxResources};

use super::CgroupError;

/// BPF_PROG_TYPE_CGROUP_DEVICE.
const PROG_TYPE_CGROUP_DEVICE: u32 = 15;
/// BPF_CGROUP_DEVICE attach type.
const ATTACH_CGROUP_DEVICE: u32 = 6;
/// bpf(2) commands.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
/// Bytes of verifier log kept for the error message when the kernel refuses the program.
const VERIFIER_LOG_BYTES: usize = 4096;
/// Most rules a container may carry (each costs at most 11 instructions; the kernel's limit
/// for unprivileged-style programs is 4096).
pub(super) const MAX_DEVICE_RULES: usize = 256;

// bpf_cgroup_dev_ctx: access_type = (access << 16) | type; major; minor.
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;

/// One normalized rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DevRule {
    allow: bool,
    /// None = any type.
    typ: Option<i32>,
    major: Option<u32>,
    minor: Option<u32>,
    access: i32,
}

/// The effective rule set: a default and the rules after the last reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DevPolicy {
    default_allow: bool,
    rules: Vec<DevRule>,
}

fn invalid(reason: String) -> CgroupError {
    CgroupError::Invalid {
        field: "devices",
        reason,
    }
}

/// Check and normalize the rules of `res`; `None` when there are none.
pub(super) fn policy(res: &LinuxResources) -> Result<Option<DevPolicy>, CgroupError> {
    let Some(list) = res.devices().as_ref().filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    if list.len() > MAX_DEVICE_RULES {
        return Err(invalid(format!(
            "{} rules, more than {MAX_DEVICE_RULES}",
            list.len()
        )));
    }
    // Without any reset rule v1 starts from "allow all" (a new cgroup inherits the root's).
    let mut p = DevPolicy {
        default_allow: true,
        rules: Vec::new(),
    };
    for r in list {
        let typ = match r.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            LinuxDeviceType::P => {
                return Err(invalid("fifo (\"p\") rules are not expressible".into()))
            }
        };
        let num = |v: Option<i64>, what: &str| -> Result<Option<u32>, CgroupError> {
            match v {
                None => Ok(None),
                Some(n) if n < 0 => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| invalid(format!("{what} {n} is out of range"))),
            }
        };
        let major = num(r.major(), "major")?;
        let minor = num(r.minor(), "minor")?;
        let access_str = r
            .access()
            .as_deref()
            .filter(|a| !a.is_empty())
            .unwrap_or("rwm");
        let mut access = 0;
        for c in access_str.chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                _ => {
                    return Err(CgroupError::Invalid {
                        field: "devices.access",
                        reason: format!("{access_str:?} is not a combination of r, w, m"),
                    })
                }
            };
        }
        let full = ACC_READ | ACC_WRITE | ACC_MKNOD;
        if typ.is_none() && major.is_none() && minor.is_none() && access == full {
            p.default_allow = r.allow();
            p.rules.clear();
        } else {
            p.rules.push(DevRule {
                allow: r.allow(),
                typ,
                major,
                minor,
                access,
            });
        }
    }
    if p.default_allow && p.rules.iter().all(|r| r.allow) {
        // Allows on top of allow-all change nothing.
        return Ok(None);
    }
    Ok(Some(p))
}

/// Refuse, before anything is created, a device rule list that cannot be compiled.
pub(super) fn check_v2_rules(res: &LinuxResources) -> Result<(), CgroupError> {
    policy(res).map(|_| ())
}

/// One eBPF instruction (struct bpf_insn).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

const LDX_MEM_W: u8 = 0x61;
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const ALU32_MOV_K: u8 = 0xb4;
const ALU32_MOV_X: u8 = 0xbc;
const JMP_JNE_K: u8 = 0x55;
const JMP_JEQ_K: u8 = 0x15;
const JMP_EXIT: u8 = 0x95;

/// Compile the policy: r2 = type, r3 = access, r4 = major, r5 = minor, rules newest first.
pub(super) fn program(p: &DevPolicy) -> Vec<Insn> {
    let mut prog = vec![
        insn(LDX_MEM_W, 2, 1, CTX_ACCESS_TYPE, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, CTX_ACCESS_TYPE, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, CTX_MAJOR, 0),
        insn(LDX_MEM_W, 5, 1, CTX_MINOR, 0),
    ];
    for r in p.rules.iter().rev() {
        // Each check is a "jump to the end of this block" when the rule does not apply;
        // offsets are filled in once the block's length is known.
        let mut block: Vec<Insn> = Vec::new();
        let mut exits: Vec<usize> = Vec::new();
        if let Some(t) = r.typ {
            exits.push(block.len());
            block.push(insn(JMP_JNE_K, 2, 0, 0, t));
        }
        if let Some(m) = r.major {
            exits.push(block.len());
            block.push(insn(JMP_JNE_K, 4, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            exits.push(block.len());
            block.push(insn(JMP_JNE_K, 5, 0, 0, m as i32));
        }
        block.push(insn(ALU32_MOV_X, 6, 3, 0, 0));
        if r.allow {
            // Requested bits outside the rule's: not covered.
            block.push(insn(ALU32_AND_K, 6, 0, 0, !r.access));
            exits.push(block.len());
            block.push(insn(JMP_JNE_K, 6, 0, 0, 0));
        } else {
            block.push(insn(ALU32_AND_K, 6, 0, 0, r.access));
            exits.push(block.len());
            block.push(insn(JMP_JEQ_K, 6, 0, 0, 0));
        }
        block.push(insn(ALU32_MOV_K, 0, 0, 0, i32::from(r.allow)));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let len = block.len();
        for i in exits {
            block[i].off = (len - i - 1) as i16;
        }
        prog.extend(block);
    }
    prog.push(insn(ALU32_MOV_K, 0, 0, 0, i32::from(p.default_allow)));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

/// The PROG_LOAD part of union bpf_attr (fields up to expected_attach_type).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The PROG_ATTACH part of union bpf_attr.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Load the program into the kernel (root only); the verifier's complaint becomes the error.
pub(super) fn load(prog: &[Insn]) -> Result<OwnedFd, CgroupError> {
    let mut log = vec![0u8; VERIFIER_LOG_BYTES];
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"shoal_devcg");
    let attr = ProgLoadAttr {
        prog_type: PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: c"Apache-2.0".as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: ATTACH_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: attr points at live buffers (prog, license, log) for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(CgroupError::DeviceFilter(format!(
            "load: {err}{}{last}",
            if last.is_empty() { "" } else { ": " }
        )));
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Compile the rules of `res` and attach them to the v2 cgroup at `dir` (replacing the one
/// shoal attached before). No rules, or only allows on top of allow-all: nothing attached.
pub(super) fn apply_v2(dir: &Path, res: &LinuxResources) -> Result<(), CgroupError> {
    let Some(p) = policy(res)? else {
        return Ok(());
    };
    let prog_fd = load(&program(&p))?;
    let cg = std::fs::File::open(dir).map_err(|source| CgroupError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let attr = ProgAttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: ATTACH_CGROUP_DEVICE,
        // No flags: one program per cgroup, a new attach replaces shoal's previous one.
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    // SAFETY: attr holds two fds that stay open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if rc != 0 {
        return Err(CgroupError::DeviceFilter(format!(
            "attach to {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn reset_rules_set_the_default_and_drop_earlier_ones() {
        let p = policy(&res(
            r#"{"devices":[{"allow":true,"type":"c","major":9,"access":"r"},
                {"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},
                {"allow":true,"type":"b","access":"m"}]}"#,
        ))
        .unwrap()
        .unwrap();
        assert!(!p.default_allow);
        assert_eq!(p.rules.len(), 2);
        assert_eq!(
            p.rules[0],
            DevRule {
                allow: true,
                typ: Some(DEV_CHAR),
                major: Some(1),
                minor: Some(3),
                access: ACC_READ | ACC_WRITE | ACC_MKNOD
            }
        );
        assert_eq!(p.rules[1].major, None);
        // Allow-all (or nothing) needs no program.
        assert_eq!(policy(&res(r#"{"devices":[]}"#)).unwrap(), None);
        assert_eq!(
            policy(&res(r#"{"devices":[{"allow":true,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3}]}"#))
                .unwrap(),
            None
        );
        assert!(policy(&res(r#"{"devices":[{"allow":true,"type":"p"}]}"#)).is_err());
        assert!(policy(&res(
            r#"{"devices":[{"allow":true,"type":"c","access":"rx"}]}"#
        ))
        .is_err());
    }

    #[test]
    fn program_shape() {
        let p = policy(&res(
            r#"{"devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rw"}]}"#,
        ))
        .unwrap()
        .unwrap();
        let prog = program(&p);
        // 6 loads, one 8-instruction block, default return.
        assert_eq!(prog.len(), 6 + 8 + 2);
        // The type check skips the rest of its block.
        assert_eq!(prog[6], insn(JMP_JNE_K, 2, 0, 7, DEV_CHAR));
        assert_eq!(prog[prog.len() - 2], insn(ALU32_MOV_K, 0, 0, 0, 0));
        assert_eq!(prog[prog.len() - 1].code, JMP_EXIT);
    }
}
