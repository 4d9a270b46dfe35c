//! Unit tests of the profile, the JSON parser and the compiler (evaluated, not installed).

use std::time::Instant;

use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompOperator};

use super::*;

const ALLOW: u32 = 0x7fff_0000;
const EPERM: u32 = 0x0005_0001;
const ENOSYS: u32 = 0x0005_0026;
const CLONE_NEWNS: u64 = 0x0002_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const SIGCHLD: u64 = 17;

/// Docker's default capability set.
fn docker_caps() -> Vec<String> {
    [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn nr(name: &str) -> i64 {
    table::number(name).unwrap_or_else(|| panic!("{name} not in table"))
}

fn eval(f: &Filter, name: &str, args: [u64; 6]) -> u32 {
    f.evaluate(nr(name), args)
}

fn names_of(p: &LinuxSeccomp) -> Vec<String> {
    p.syscalls()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .flat_map(|s| s.names().clone())
        .collect()
}

#[test]
fn default_profile_shape() {
    let p = default_profile(&docker_caps());
    assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
    assert_eq!(p.default_errno_ret(), Some(1));
    let names = names_of(&p);
    assert!(names.len() > 330, "{}", names.len());
    for blocked in [
        "mount",
        "umount2",
        "unshare",
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "reboot",
        "kexec_load",
        "init_module",
        "pivot_root",
        "setns",
        "open_by_handle_at",
        "io_uring_setup",
        "userfaultfd",
        "swapon",
    ] {
        assert!(!names.iter().any(|n| n == blocked), "{blocked} allowed");
    }
    assert!(
        names.iter().any(|n| n == "chroot"),
        "CAP_SYS_CHROOT is a default cap"
    );
    let clone3 = p
        .syscalls()
        .as_deref()
        .unwrap()
        .iter()
        .find(|s| s.names().iter().any(|n| n == "clone3"))
        .unwrap();
    assert_eq!(clone3.action(), LinuxSeccompAction::ScmpActErrno);
    assert_eq!(clone3.errno_ret(), Some(38));
    let arches = p.architectures().clone().unwrap();
    assert_eq!(arches.len(), 3, "{arches:?}");

    let admin = default_profile(&["sys_admin".to_string()]);
    let names = names_of(&admin);
    for n in ["mount", "unshare", "setns", "bpf", "clone3"] {
        assert!(
            names.iter().any(|x| x == n),
            "{n} missing with CAP_SYS_ADMIN"
        );
    }
    // With CAP_SYS_ADMIN clone3 is plainly allowed, not ENOSYS.
    assert!(admin
        .syscalls()
        .as_deref()
        .unwrap()
        .iter()
        .all(|s| s.action() == LinuxSeccompAction::ScmpActAllow));
}

#[test]
fn default_filter_decisions() {
    let f = compile(&default_profile(&docker_caps())).unwrap();
    let z = [0u64; 6];
    for ok in [
        "getpid",
        "write",
        "read",
        "openat",
        "execve",
        "exit_group",
        "futex",
        "chroot",
    ] {
        assert_eq!(eval(&f, ok, z), ALLOW, "{ok}");
    }
    for denied in [
        "mount", "umount2", "unshare", "keyctl", "add_key", "bpf", "reboot", "setns",
    ] {
        assert_eq!(eval(&f, denied, z), EPERM, "{denied}");
    }
    assert_eq!(eval(&f, "clone", [SIGCHLD, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(
        eval(&f, "clone", [SIGCHLD | CLONE_NEWNS, 0, 0, 0, 0, 0]),
        EPERM
    );
    assert_eq!(eval(&f, "clone", [CLONE_NEWUSER, 0, 0, 0, 0, 0]), EPERM);
    assert_eq!(eval(&f, "clone3", z), ENOSYS);
    assert_eq!(eval(&f, "socket", [2, 1, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "socket", [40, 1, 0, 0, 0, 0]), EPERM);
    assert_eq!(eval(&f, "personality", [8, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "personality", [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
    // Newer than the table, or x32: ENOSYS so libc can fall back.
    assert_eq!(f.evaluate(table::max_number() + 1, z), ENOSYS);
    if cfg!(target_arch = "x86_64") {
        assert_eq!(f.evaluate(0x4000_0000 | nr("mount"), z), ENOSYS);
        assert_eq!(eval(&f, "arch_prctl", z), ALLOW);
    }

    let admin = compile(&default_profile(&["CAP_SYS_ADMIN".to_string()])).unwrap();
    assert_eq!(eval(&admin, "mount", z), ALLOW);
    assert_eq!(eval(&admin, "clone", [CLONE_NEWNS, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&admin, "clone3", z), ALLOW);
    assert_eq!(eval(&admin, "keyctl", z), EPERM);
}

#[test]
fn default_compile_time_is_measured() {
    let caps = docker_caps();
    // Warm the syscall table (built once per process).
    let _ = compile(&default_profile(&caps)).unwrap();
    const RUNS: u32 = 50;
    let t = Instant::now();
    for _ in 0..RUNS {
        let p = default_profile(&caps);
        let f = compile(&p).unwrap();
        assert!(f.len() > 300);
    }
    let per = t.elapsed() / RUNS;
    eprintln!("default profile: build + compile = {per:?} per run");
    let t = Instant::now();
    let f = compile(&default_profile(&caps)).unwrap();
    eprintln!("single run: {:?}, {} instructions", t.elapsed(), f.len());
    assert!(f.len() < compile::BPF_MAX_INSNS);
}

const DOCKER_JSON: &str = r#"{
  "defaultAction": "SCMP_ACT_ERRNO",
  "defaultErrnoRet": 1,
  "archMap": [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
  ],
  "syscalls": [
    {"names": ["read", "write", "getpid", "not_a_syscall"], "action": "SCMP_ACT_ALLOW"},
    {"name": "getcwd", "action": "SCMP_ACT_ERRNO", "errnoRet": 13, "comment": "denied"},
    {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    {"names": ["unshare"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
    {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
    {"names": ["kcmp"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "3.10"}},
    {"names": ["sync"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
    {"names": ["syncfs"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["amd64", "arm64"]}},
    {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_NE"}, {"index": 0, "value": 1, "op": "SCMP_CMP_GT"}]},
    {"names": ["fcntl"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 1, "value": 1, "op": "SCMP_CMP_EQ"}, {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]},
    {"names": ["mmap"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 2, "value": 4, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
  ]
}"#;

#[test]
fn docker_json_resolves_caps_kernel_arches() {
    let p = from_docker_json(DOCKER_JSON, &[]).unwrap();
    let names = names_of(&p);
    for n in ["read", "getcwd", "unshare", "kcmp", "kill", "fcntl", "mmap"] {
        assert!(names.iter().any(|x| x == n), "{n} missing");
    }
    for n in ["mount", "ptrace", "sync", "syncfs"] {
        assert!(!names.iter().any(|x| x == n), "{n} present");
    }
    assert_eq!(p.architectures().as_ref().unwrap().len(), 3);
    let admin = from_docker_json(DOCKER_JSON, &["CAP_SYS_ADMIN".into()]).unwrap();
    let names = names_of(&admin);
    assert!(names.iter().any(|x| x == "mount"));
    assert!(!names.iter().any(|x| x == "unshare"));

    let f = compile(&p).unwrap();
    let z = [0u64; 6];
    assert_eq!(eval(&f, "getpid", z), ALLOW);
    assert_eq!(eval(&f, "getcwd", z), 0x0005_000d);
    assert_eq!(eval(&f, "mount", z), EPERM);
    // kill: pid > 1 AND sig != 9.
    assert_eq!(eval(&f, "kill", [5, 15, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "kill", [5, 9, 0, 0, 0, 0]), EPERM);
    assert_eq!(eval(&f, "kill", [1, 15, 0, 0, 0, 0]), EPERM);
    // fcntl: the same index twice means either value.
    assert_eq!(eval(&f, "fcntl", [0, 1, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "fcntl", [0, 2, 0, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "fcntl", [0, 3, 0, 0, 0, 0]), EPERM);
    // mmap: (prot & PROT_EXEC) == 0.
    assert_eq!(eval(&f, "mmap", [0, 0, 3, 0, 0, 0]), ALLOW);
    assert_eq!(eval(&f, "mmap", [0, 0, 7, 0, 0, 0]), EPERM);
    // 64-bit comparisons look at the high half too.
    assert_eq!(eval(&f, "mmap", [0, 0, 4 << 32, 0, 0, 0]), ALLOW);
}

#[test]
fn docker_json_bad_input_is_named() {
    let cases: &[(&str, &str)] = &[
        ("{", "invalid seccomp profile"),
        (r#"{"syscalls": []}"#, "defaultAction"),
        (r#"{"defaultAction": "SCMP_ACT_NOPE"}"#, "SCMP_ACT_NOPE"),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOWW"}]}"#,
            "SCMP_ACT_ALLOWW",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]}"#,
            "SCMP_CMP_ABOUT",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"name": "read", "names": ["write"], "action": "SCMP_ACT_ALLOW"}]}"#,
            "both \"name\" and \"names\"",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"], "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}"#,
            "archMap",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_VAX"]}"#,
            "SCMP_ARCH_VAX",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "flags": ["SECCOMP_FILTER_FLAG_FAST"]}"#,
            "SECCOMP_FILTER_FLAG_FAST",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "four"}}]}"#,
            "minKernel",
        ),
        (
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "listenerPath": "/run/agent.sock"}"#,
            "listenerPath",
        ),
    ];
    for (json, word) in cases {
        let err = from_docker_json(json, &[]).unwrap_err().to_string();
        assert!(err.contains(word), "{json}: {err}");
    }
}

fn profile(json: &str) -> LinuxSeccomp {
    serde_json::from_str(json).expect("test OCI profile parses")
}

#[test]
fn compiler_handles_every_action_and_repeats() {
    let p = profile(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
          {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 5, "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
          {"names": ["getcwd"], "action": "SCMP_ACT_KILL_PROCESS"},
          {"names": ["getcwd"], "action": "SCMP_ACT_ALLOW"},
          {"names": ["uname"], "action": "SCMP_ACT_TRAP"},
          {"names": ["uname"], "action": "SCMP_ACT_ERRNO"},
          {"names": ["sysinfo"], "action": "SCMP_ACT_LOG"},
          {"names": ["times"], "action": "SCMP_ACT_KILL"},
          {"names": ["getppid"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
          {"names": ["getpgrp"], "action": "SCMP_ACT_KILL_THREAD"},
          {"names": ["gettid"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LT"}]},
          {"names": ["gettid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 2, "args": [{"index": 0, "value": 5, "op": "SCMP_CMP_GE"}]},
          {"names": ["gettid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3, "args": [{"index": 0, "value": 3, "op": "SCMP_CMP_LE"}]},
          {"names": ["gettid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 4, "args": [{"index": 0, "value": 3, "op": "SCMP_CMP_GT"}]},
          {"names": ["made_up_call"], "action": "SCMP_ACT_KILL"}
        ]}"#,
    );
    let f = compile(&p).unwrap();
    let a = |v: u64| [v, 0, 0, 0, 0, 0];
    // First matching entry decides: conditional ERRNO(5), then the unconditional kill.
    assert_eq!(eval(&f, "getcwd", a(1)), 0x0005_0005);
    assert_eq!(eval(&f, "getcwd", a(2)), libc::SECCOMP_RET_KILL_PROCESS);
    assert_eq!(eval(&f, "uname", a(0)), libc::SECCOMP_RET_TRAP);
    assert_eq!(eval(&f, "sysinfo", a(0)), libc::SECCOMP_RET_LOG);
    assert_eq!(eval(&f, "times", a(0)), libc::SECCOMP_RET_KILL_THREAD);
    assert_eq!(eval(&f, "getpgrp", a(0)), libc::SECCOMP_RET_KILL_THREAD);
    assert_eq!(eval(&f, "getppid", a(0)), libc::SECCOMP_RET_TRACE | 7);
    assert_eq!(eval(&f, "gettid", a(0)), EPERM);
    assert_eq!(eval(&f, "gettid", a(6)), 0x0005_0002);
    assert_eq!(eval(&f, "gettid", a(2)), 0x0005_0003);
    assert_eq!(eval(&f, "gettid", a(4)), 0x0005_0004);
    assert_eq!(eval(&f, "getpid", a(0)), ALLOW);
    // Allow-default: an unknown new syscall is allowed, not ENOSYS.
    assert_eq!(f.evaluate(table::max_number() + 1, a(0)), ALLOW);
}

#[test]
fn compiler_refuses_what_it_cannot_do() {
    let notify = profile(
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}"#,
    );
    assert_eq!(
        compile(&notify).unwrap_err().to_string(),
        "seccomp action SCMP_ACT_NOTIFY is not supported"
    );
    let bad_index = profile(
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#,
    );
    assert!(compile(&bad_index)
        .unwrap_err()
        .to_string()
        .contains("index 6"));
    let sentinel = profile(
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_TRACE", "errnoRet": 65535}]}"#,
    );
    assert!(compile(&sentinel).is_err());
    // Only unknown names: nothing but the default action remains, still a valid program.
    let empty = profile(
        r#"{"defaultAction": "SCMP_ACT_KILL_PROCESS", "syscalls": [{"names": ["nope"], "action": "SCMP_ACT_ALLOW"}]}"#,
    );
    let f = compile(&empty).unwrap();
    assert_eq!(
        f.evaluate(nr("getpid"), [0; 6]),
        libc::SECCOMP_RET_KILL_PROCESS
    );
    // An operator enum value round-trips through OCI JSON.
    assert_eq!(
        serde_json::to_string(&LinuxSeccompOperator::ScmpCmpMaskedEq).unwrap(),
        "\"SCMP_CMP_MASKED_EQ\""
    );
}

#[test]
fn oversized_programs_are_refused() {
    // 700 conditional entries on one syscall cannot fit in 4096 instructions.
    let entries: Vec<String> = (0..700)
        .map(|i| {
            format!(
                r#"{{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{{"index": 0, "value": {i}, "op": "SCMP_CMP_EQ"}}, {{"index": 1, "value": {i}, "op": "SCMP_CMP_EQ"}}]}}"#
            )
        })
        .collect();
    let json = format!(
        r#"{{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{}]}}"#,
        entries.join(",")
    );
    let err = compile(&profile(&json)).unwrap_err();
    assert!(
        matches!(err, SeccompError::TooLarge(_) | SeccompError::Compile(_)),
        "{err}"
    );
}
