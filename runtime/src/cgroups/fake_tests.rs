//! Unit tests of both managers against a fake cgroupfs (plain directories in a tempdir).

use std::fs;
use std::path::Path;

use oci_spec::runtime::LinuxResources;

use super::*;

fn res(json: &str) -> LinuxResources {
    serde_json::from_str(json).expect("test resources parse")
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
        .trim()
        .to_string()
}

/// A v1 tree like this host's: one directory per controller, no hugetlb.
fn fake_v1() -> (tempfile::TempDir, Hierarchy) {
    let t = tempfile::tempdir().unwrap();
    for c in [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "devices", "blkio",
    ] {
        fs::create_dir(t.path().join(c)).unwrap();
    }
    fs::write(t.path().join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
    fs::write(t.path().join("cpuset/cpuset.mems"), "0\n").unwrap();
    fs::write(
        t.path().join("memory/memory.memsw.limit_in_bytes"),
        "9223372036854771712\n",
    )
    .unwrap();
    let h = Hierarchy::V1 {
        root: t.path().to_path_buf(),
    };
    (t, h)
}

fn fake_v2(controllers: &str) -> (tempfile::TempDir, Hierarchy) {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("cgroup.controllers"), controllers).unwrap();
    let h = Hierarchy::V2 {
        root: t.path().to_path_buf(),
    };
    (t, h)
}

const LIMITS: &str = r#"{
    "memory": {"limit": 67108864, "swap": 100663296, "reservation": 33554432},
    "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
    "pids": {"limit": 64}
}"#;

#[test]
fn v1_create_writes_limits_and_copies_cpuset_down() {
    let (t, h) = fake_v1();
    let m = create_in(&h, "/shoal/c1", Some(&res(LIMITS))).unwrap();
    assert_eq!(m.rel_path(), "shoal/c1");
    let r = t.path();
    assert_eq!(
        read(r.join("memory/shoal/c1/memory.limit_in_bytes")),
        "67108864"
    );
    assert_eq!(
        read(r.join("memory/shoal/c1/memory.memsw.limit_in_bytes")),
        "100663296"
    );
    assert_eq!(
        read(r.join("memory/shoal/c1/memory.soft_limit_in_bytes")),
        "33554432"
    );
    assert_eq!(read(r.join("cpu/shoal/c1/cpu.shares")), "512");
    assert_eq!(read(r.join("cpu/shoal/c1/cpu.cfs_quota_us")), "50000");
    assert_eq!(read(r.join("cpu/shoal/c1/cpu.cfs_period_us")), "100000");
    assert_eq!(read(r.join("cpuset/shoal/cpuset.cpus")), "0-1");
    assert_eq!(read(r.join("cpuset/shoal/cpuset.mems")), "0");
    assert_eq!(read(r.join("cpuset/shoal/c1/cpuset.cpus")), "0");
    assert_eq!(read(r.join("pids/shoal/c1/pids.max")), "64");
    for c in ["freezer", "devices", "blkio", "cpuacct"] {
        assert!(r.join(c).join("shoal/c1").is_dir(), "{c}");
    }
    m.add_task(4242).unwrap();
    assert_eq!(read(r.join("freezer/shoal/c1/cgroup.procs")), "4242");
    assert_eq!(m.pids().unwrap(), vec![4242]);
}

#[test]
fn v1_device_rules_are_written_in_kernel_syntax() {
    let (t, h) = fake_v1();
    let m = create_in(
        &h,
        "shoal/dev",
        Some(&res(
            r#"{"devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rw"}]}"#,
        )),
    )
    .unwrap();
    // A plain file keeps only the last write of each kind.
    assert_eq!(
        read(t.path().join("devices/shoal/dev/devices.deny")),
        "a *:* rwm"
    );
    assert_eq!(
        read(t.path().join("devices/shoal/dev/devices.allow")),
        "c 1:3 rw"
    );
    m.destroy().unwrap();
    let bad = create_in(
        &h,
        "shoal/dev2",
        Some(&res(
            r#"{"devices":[{"allow":true,"type":"c","access":"rwx"}]}"#,
        )),
    );
    assert!(bad.err().unwrap().to_string().contains("devices.access"));
    assert!(!t.path().join("devices/shoal/dev2").exists());
}

#[test]
fn v1_missing_controller_is_named_and_nothing_is_left() {
    let (t, h) = fake_v1();
    let err = create_in(
        &h,
        "shoal/c2",
        Some(&res(
            r#"{"hugepageLimits":[{"pageSize":"2MB","limit":1048576}]}"#,
        )),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "cgroup controller \"hugetlb\" not available"
    );
    assert!(!t.path().join("memory/shoal").exists());
}

#[test]
fn v1_failure_after_mkdir_removes_what_create_made() {
    let (t, h) = fake_v1();
    fs::create_dir(t.path().join("memory/shoal")).unwrap();
    let err = create_in(
        &h,
        "shoal/c3",
        Some(&res(r#"{"memory":{"limit":134217728,"swap":67108864}}"#)),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("below the memory limit"), "{err}");
    assert!(!t.path().join("memory/shoal/c3").exists());
    // The pre-existing parent stays; the parents create made in other hierarchies go.
    assert!(t.path().join("memory/shoal").is_dir());
    assert!(!t.path().join("cpu/shoal").exists());
}

#[test]
fn v1_existing_cgroup_is_refused_and_kept() {
    let (t, h) = fake_v1();
    fs::create_dir_all(t.path().join("pids/shoal/taken")).unwrap();
    let err = create_in(&h, "shoal/taken", None).err().unwrap();
    assert!(matches!(err, CgroupError::AlreadyExists(_)), "{err}");
    assert!(t.path().join("pids/shoal/taken").is_dir());
    assert!(!t.path().join("memory/shoal/taken").exists());
}

#[test]
fn v1_refuses_fields_it_does_not_implement() {
    let (_t, h) = fake_v1();
    for (json, word) in [
        (r#"{"memory":{"kernel":1048576}}"#, "memory.kernel"),
        (r#"{"blockIO":{"weight":10}}"#, "blockIO"),
        (r#"{"unified":{"memory.high":"1"}}"#, "unified"),
        (r#"{"network":{"classID":1}}"#, "net_cls"),
    ] {
        let err = create_in(&h, "shoal/x", Some(&res(json))).err().unwrap();
        assert!(err.to_string().contains(word), "{json}: {err}");
    }
}

#[test]
fn v1_freeze_stats_destroy_open() {
    let (t, h) = fake_v1();
    let m = create_in(&h, "shoal/c4", None).unwrap();
    m.freeze().unwrap();
    assert!(m.is_frozen().unwrap());
    m.thaw().unwrap();
    assert!(!m.is_frozen().unwrap());

    let mem = t.path().join("memory/shoal/c4");
    fs::write(
        t.path().join("cpuacct/shoal/c4/cpuacct.usage"),
        "123456789\n",
    )
    .unwrap();
    fs::write(mem.join("memory.usage_in_bytes"), "1000\n").unwrap();
    fs::write(mem.join("memory.max_usage_in_bytes"), "2000\n").unwrap();
    fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
    fs::write(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .unwrap();
    fs::write(t.path().join("pids/shoal/c4/pids.current"), "5\n").unwrap();
    fs::write(t.path().join("pids/shoal/c4/pids.max"), "max\n").unwrap();
    let s = open_in(&h, "shoal/c4").unwrap().stats().unwrap();
    assert_eq!(
        s,
        CgroupStats {
            cpu_usage_ns: 123_456_789,
            memory_usage: 1000,
            memory_peak: 2000,
            memory_limit: None,
            oom_kills: 3,
            pids_current: 5,
            pids_limit: None,
        }
    );
    fs::write(mem.join("memory.limit_in_bytes"), "4096\n").unwrap();
    assert_eq!(m.stats().unwrap().memory_limit, Some(4096));

    m.destroy().unwrap();
    for c in ["cpu", "memory", "pids", "freezer", "cpuset"] {
        assert!(!t.path().join(c).join("shoal/c4").exists(), "{c}");
    }
    assert!(matches!(
        open_in(&h, "shoal/c4").err().unwrap(),
        CgroupError::NotFound(_)
    ));
    // A second destroy of a removed cgroup is not an error.
    m.destroy().unwrap();
}

#[test]
fn v2_create_enables_controllers_and_converts_values() {
    let (t, h) = fake_v2("cpuset cpu io memory hugetlb pids rdma misc\n");
    let m = create_in(&h, "shoal/c1", Some(&res(LIMITS))).unwrap();
    let r = t.path();
    for d in [r.to_path_buf(), r.join("shoal")] {
        assert_eq!(
            read(d.join("cgroup.subtree_control")),
            "+cpu +memory +pids +cpuset"
        );
    }
    assert!(!r.join("shoal/c1/cgroup.subtree_control").exists());
    let d = r.join("shoal/c1");
    assert_eq!(read(d.join("memory.max")), "67108864");
    assert_eq!(read(d.join("memory.swap.max")), "33554432");
    assert_eq!(read(d.join("memory.low")), "33554432");
    assert_eq!(read(d.join("cpu.weight")), "20");
    assert_eq!(read(d.join("cpu.max")), "50000 100000");
    assert_eq!(read(d.join("cpuset.cpus")), "0");
    assert_eq!(read(d.join("pids.max")), "64");
    m.add_task(77).unwrap();
    assert_eq!(m.pids().unwrap(), vec![77]);

    m.apply(&res(r#"{"cpu":{"quota":-1},"memory":{"limit":-1}}"#))
        .unwrap();
    assert_eq!(read(d.join("cpu.max")), "max 100000");
    assert_eq!(read(d.join("memory.max")), "max");
    m.apply(&res(r#"{"cpu":{"quota":20000}}"#)).unwrap();
    m.apply(&res(r#"{"cpu":{"period":50000}}"#)).unwrap();
    assert_eq!(read(d.join("cpu.max")), "20000 50000");
    m.apply(&res(r#"{"unified":{"memory.high":"1048576"}}"#))
        .unwrap();
    assert_eq!(read(d.join("memory.high")), "1048576");
    assert!(m.apply(&res(r#"{"unified":{"../escape":"1"}}"#)).is_err());
    fs::write(d.join("cgroup.procs"), "").unwrap();
    m.destroy().unwrap();
    assert!(!d.exists());
    assert!(r.join("shoal").is_dir());
}

#[test]
fn v2_missing_controller_is_named_and_nothing_is_left() {
    let (t, h) = fake_v2("cpu pids\n");
    let err = create_in(
        &h,
        "shoal/c2",
        Some(&res(r#"{"memory":{"limit":1048576}}"#)),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "cgroup controller \"memory\" not available"
    );
    assert!(!t.path().join("shoal").exists());
    let err = create_in(&h, "shoal/c2", Some(&res(r#"{"network":{"classID":7}}"#)))
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "cgroup controller \"net_cls\" not available"
    );
    // Only the always-wanted controllers the host has are delegated.
    let m = create_in(&h, "shoal/c3", None).unwrap();
    assert_eq!(read(t.path().join("cgroup.subtree_control")), "+cpu +pids");
    m.destroy().unwrap();
}

#[test]
fn v2_device_rules_need_a_real_cgroup_and_v1_only_fields_are_refused() {
    let (t, h) = fake_v2("cpu memory pids\n");
    let err = create_in(
        &h,
        "shoal/d",
        Some(&res(
            r#"{"devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"}]}"#,
        )),
    )
    .err()
    .unwrap();
    // A plain directory cannot take the eBPF device filter (and non-root cannot load one):
    // the error names the filter and the half-made cgroup is gone.
    assert!(matches!(err, CgroupError::DeviceFilter(_)), "{err}");
    assert!(!t.path().join("shoal").exists());
    let err = create_in(
        &h,
        "shoal/d",
        Some(&res(r#"{"devices":[{"allow":false,"type":"p"}]}"#)),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("fifo"), "{err}");
    let err = create_in(&h, "shoal/d", Some(&res(r#"{"memory":{"swappiness":10}}"#)))
        .err()
        .unwrap();
    assert!(err.to_string().contains("swappiness"), "{err}");
    assert!(!t.path().join("shoal").exists());
    // Allow-all lists change nothing and are accepted.
    let m = create_in(
        &h,
        "shoal/d",
        Some(&res(r#"{"devices":[{"allow":true,"access":"rwm"}]}"#)),
    )
    .unwrap();
    m.destroy().unwrap();
}

#[test]
fn v2_swap_conversion_follows_runc() {
    use super::v2::swap_max;
    assert_eq!(swap_max(-1, Some(100)).unwrap().as_deref(), Some("max"));
    assert_eq!(swap_max(0, Some(-1)).unwrap().as_deref(), Some("max"));
    assert_eq!(swap_max(0, Some(100)).unwrap(), None);
    assert_eq!(swap_max(300, Some(100)).unwrap().as_deref(), Some("200"));
    assert_eq!(swap_max(100, Some(100)).unwrap().as_deref(), Some("0"));
    assert!(swap_max(50, Some(100)).is_err());
    assert!(swap_max(50, None).is_err());
}

#[test]
fn v2_freeze_waits_for_events_and_times_out() {
    let (t, h) = fake_v2("cpu memory pids\n");
    let m = create_in(&h, "shoal/f", None).unwrap();
    let d = t.path().join("shoal/f");
    fs::write(d.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    m.freeze().unwrap();
    assert_eq!(read(d.join("cgroup.freeze")), "1");
    assert!(m.is_frozen().unwrap());
    m.thaw().unwrap();
    assert_eq!(read(d.join("cgroup.freeze")), "0");

    fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    let err = m.freeze().unwrap_err();
    assert!(matches!(err, CgroupError::FreezeTimeout(_)), "{err}");
    // A freeze that never completed is undone.
    assert_eq!(read(d.join("cgroup.freeze")), "0");
    m.destroy().unwrap();
}

#[test]
fn v2_stats_parse_kernel_files() {
    let (t, h) = fake_v2("cpu memory pids\n");
    let m = create_in(&h, "shoal/s", None).unwrap();
    let d = t.path().join("shoal/s");
    fs::write(
        d.join("cpu.stat"),
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
    )
    .unwrap();
    fs::write(d.join("memory.current"), "4096\n").unwrap();
    fs::write(d.join("memory.peak"), "8192\n").unwrap();
    fs::write(d.join("memory.max"), "1048576\n").unwrap();
    fs::write(
        d.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
    )
    .unwrap();
    fs::write(d.join("pids.current"), "3\n").unwrap();
    fs::write(d.join("pids.max"), "10\n").unwrap();
    assert_eq!(
        m.stats().unwrap(),
        CgroupStats {
            cpu_usage_ns: 1_500_000,
            memory_usage: 4096,
            memory_peak: 8192,
            memory_limit: Some(1_048_576),
            oom_kills: 2,
            pids_current: 3,
            pids_limit: Some(10),
        }
    );
    fs::write(d.join("memory.events"), "oom_kill x\n").unwrap();
    assert!(matches!(m.stats(), Err(CgroupError::Parse { .. })));
    m.destroy().unwrap();
}
