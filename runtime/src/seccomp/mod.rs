//! Seccomp: Docker's default profile, Docker's JSON profile format, compilation to BPF
//! (pure Rust, via seccompiler) and installation between fork and exec.

mod compile;
mod default;
mod profile;
pub mod table;

use nix::errno::Errno;
use oci_spec::runtime::LinuxSeccomp;
use seccompiler::sock_filter;

/// Errors of the seccomp module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is not valid JSON of Docker's format.
    #[error("invalid seccomp profile: {0}")]
    Json(serde_json::Error),
    /// The profile is well-formed JSON but inconsistent.
    #[error("invalid seccomp profile: {0}")]
    Invalid(String),
    /// An action name that is not one of SCMP_ACT_*.
    #[error("unknown seccomp action {0:?}")]
    UnknownAction(String),
    /// An operator name that is not one of SCMP_CMP_*.
    #[error("unknown seccomp operator {0:?}")]
    UnknownOperator(String),
    /// An architecture name that is not one of SCMP_ARCH_*.
    #[error("unknown seccomp architecture {0:?}")]
    UnknownArch(String),
    /// A flag name that is not one of SECCOMP_FILTER_FLAG_*.
    #[error("unknown seccomp flag {0:?}")]
    UnknownFlag(String),
    /// A minKernel that is not "major.minor".
    #[error("invalid seccomp minKernel {0:?}: expected \"major.minor\"")]
    BadMinKernel(String),
    /// A valid action this runtime cannot carry out.
    #[error("seccomp action {0} is not supported")]
    UnsupportedAction(String),
    /// A valid profile feature this runtime does not implement.
    #[error("unsupported seccomp profile feature: {0}")]
    Unsupported(String),
    /// An argument index outside 0..=5.
    #[error("seccomp argument index {0} is out of range (0-5)")]
    BadArgIndex(usize),
    /// The runtime runs on an architecture without a syscall table.
    #[error("seccomp is not supported on architecture {0}")]
    UnsupportedArch(String),
    /// seccompiler refused the rules.
    #[error("cannot compile seccomp filter: {0}")]
    Compile(String),
    /// The program exceeds the kernel's instruction limit.
    #[error("seccomp filter has {0} instructions, more than the kernel's 4096")]
    TooLarge(usize),
    /// The seccomp(2) call failed.
    #[error("cannot install seccomp filter: {0}")]
    Install(Errno),
}

/// Docker's default profile, equal in effect (default errno EPERM, the allowlist, the argument
/// conditions on clone/personality/socket..., capability-dependent additions resolved for the
/// given capability set), as an OCI LinuxSeccomp that the spec generator writes into config.json.
pub fn default_profile(caps: &[String]) -> LinuxSeccomp {
    default::docker_default().resolve(&profile::Host::current(caps))
}

/// A profile in Docker's JSON format (the `--security-opt seccomp=FILE` format) → OCI form.
pub fn from_docker_json(json: &str, caps: &[String]) -> Result<LinuxSeccomp, SeccompError> {
    Ok(profile::parse_json(json)?.resolve(&profile::Host::current(caps)))
}

/// Compile the OCI form for the running architecture (x86_64, aarch64); unknown syscall names
/// are skipped as runc does, unsupported actions/operators are errors naming them.
pub fn compile(s: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    compile::compile(s)
}

/// A compiled seccomp program, ready to install.
#[derive(Debug, Clone)]
pub struct Filter {
    prog: Vec<sock_filter>,
    /// SECCOMP_FILTER_FLAG_* bits from the profile's flags.
    flags: u32,
}

impl Filter {
    /// Install in the calling thread (after no_new_privs or with CAP_SYS_ADMIN); async-signal-safe
    /// enough to call between fork and exec (no allocation).
    pub fn install(&self) -> Result<(), SeccompError> {
        let prog = libc::sock_fprog {
            len: self.prog.len() as u16,
            // seccompiler's sock_filter is #[repr(C)] with libc's exact layout.
            filter: self.prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `self.prog`, alive for the call; the kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(SeccompError::Install(Errno::last()))
        }
    }

    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.prog.len()
    }

    /// Whether the program is empty (never, for a compiled profile).
    pub fn is_empty(&self) -> bool {
        self.prog.is_empty()
    }

    /// Evaluate the program for syscall `nr` with `args` on the running architecture, as the
    /// kernel would: returns the SECCOMP_RET_* value. For tests and `shoal` diagnostics.
    pub fn evaluate(&self, nr: i64, args: [u64; 6]) -> u32 {
        bpf_eval::run(&self.prog, nr, args)
    }
}

mod bpf_eval;

#[cfg(test)]
mod tests;
