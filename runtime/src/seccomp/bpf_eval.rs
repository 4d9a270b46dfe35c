//! A classic-BPF interpreter for seccomp programs, so the compiler's output can be checked
//! syscall by syscall without installing it.

use seccompiler::sock_filter;

const AUDIT_ARCH: u32 = if cfg!(target_arch = "aarch64") {
    0xC000_00B7
} else {
    0xC000_003E
};

/// struct seccomp_data as bytes: nr, arch, instruction pointer, six 64-bit args.
fn seccomp_data(nr: i64, args: [u64; 6]) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
    d[4..8].copy_from_slice(&AUDIT_ARCH.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    d
}

/// Run `prog`; an instruction it does not know, or falling off the end, reads as KILL.
pub(super) fn run(prog: &[sock_filter], nr: i64, args: [u64; 6]) -> u32 {
    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    let data = seccomp_data(nr, args);
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    // cBPF jumps only forward, so this visits each instruction at most once.
    while let Some(ins) = prog.get(pc) {
        let k = ins.k;
        pc += 1;
        match ins.code {
            // BPF_LD | BPF_W | BPF_ABS
            0x20 => {
                let off = k as usize;
                let Some(b) = data.get(off..off + 4) else {
                    return KILL;
                };
                acc = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            // BPF_ALU | BPF_AND | BPF_K
            0x54 => acc &= k,
            // BPF_JMP | BPF_JA
            0x05 => pc += k as usize,
            // BPF_JMP | BPF_JEQ/JGT/JGE | BPF_K
            0x15 | 0x25 | 0x35 => {
                let taken = match ins.code {
                    0x15 => acc == k,
                    0x25 => acc > k,
                    _ => acc >= k,
                };
                pc += usize::from(if taken { ins.jt } else { ins.jf });
            }
            // BPF_RET | BPF_K
            0x06 => return k,
            _ => return KILL,
        }
    }
    KILL
}
