//! The runtime executor on its own (no dispatcher): a task's container is made by a
//! `shoal runtime create` subprocess, so its monitor is a fork of that small process and not of
//! the (multi-threaded, large) agent. Real busybox containers; needs root.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_runtime::container::Container;
use shoal_runtime::image::ImageStore;
use shoal_worker::executor::{ExecError, Exit, Probe, StopSignal};
use shoal_worker::{Executor, RuntimeExecutor, RuntimeExecutorConfig};
use support::{shoal_binary, task};

const IMAGE: &str = "busybox:executor-test";
/// The monitor's own (anonymous) memory must stay under this: a monitor forked from the agent
/// would carry the agent's heap here.
const MONITOR_ANON_LIMIT_KIB: u64 = 1024;
/// Its whole resident set must stay under this in an optimized build (the design's target is
/// 1 MiB per monitor).
const MONITOR_RSS_LIMIT_KIB: u64 = 2048;
/// Memory this test process holds (touched) while the container is created: a monitor forked
/// from this process would carry it.
const BALLAST_BYTES: usize = 32 << 20;
/// How long the monitor gets to give back the pages it inherited after the create returned.
const SETTLE: Duration = Duration::from_secs(5);

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A rootfs tar of /bin/busybox with `sleep`.
fn busybox_tar(path: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, "bin/sleep", "busybox").unwrap();
    b.finish().unwrap();
}

/// A data dir with the busybox image and an executor over it; deletes what a test left.
struct Node {
    exec: RuntimeExecutor,
    state_root: PathBuf,
    data: tempfile::TempDir,
}

impl Node {
    fn new(state_root: Option<PathBuf>) -> Node {
        let data = tempfile::tempdir().unwrap();
        let tar = data.path().join("rootfs.tar");
        busybox_tar(&tar);
        ImageStore::open(data.path())
            .unwrap()
            .import_rootfs_tar(&tar, IMAGE)
            .unwrap();
        let state_root = state_root.unwrap_or_else(|| data.path().join("run"));
        let exec = RuntimeExecutor::new(RuntimeExecutorConfig {
            data_dir: data.path().to_path_buf(),
            state_root: state_root.clone(),
            allow_unprotected_exe: false,
            bridge: shoal_runtime::network::BridgeConfig::default(),
            dns_upstream: Vec::new(),
            insecure_registries: Vec::new(),
        })
        .unwrap()
        .with_shoal_binary(shoal_binary());
        Node {
            exec,
            state_root,
            data,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for s in Container::list(&self.state_root).unwrap_or_default() {
            // Half-made ones too.
            let _ = Container::remove(&self.state_root, &s.id);
            // And the network the executor gave it (the agent is gone by now).
            let _ = shoal_runtime::network::detach(&s.id);
        }
    }
}

/// `Key:   value kB` of /proc/<pid>/status.
fn status_kib(pid: i32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn ppid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_container_has_a_small_monitor_forked_from_the_shoal_binary() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let node = Node::new(None);
    let id = format!("small{}", std::process::id());
    let t = task(&id, "w1", IMAGE, &["sleep", "1000"]);
    node.exec.prepare(&t, &|_| {}).await.unwrap();
    let ballast = std::hint::black_box(vec![1u8; BALLAST_BYTES]);
    let started = node.exec.start(&t).await.unwrap();
    assert_eq!(started.container_id, id);
    // The task's writable layer is reachable by root only (it holds what the image holds).
    for d in [
        node.data.path().join("containers"),
        node.data.path().join("containers").join(&id),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    assert_eq!(
        node.exec.probe(&id).await.unwrap(),
        Probe::Running { pid: started.pid }
    );

    // The monitor pid as the runtime records it in the container's state.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node.state_root.join(&id).join("state.json")).unwrap(),
    )
    .unwrap();
    let monitor = state["monitorPid"].as_i64().expect("monitorPid in state") as i32;
    assert_eq!(
        ppid(started.pid),
        monitor,
        "the init is the monitor's child"
    );
    assert_ne!(ppid(monitor), std::process::id() as i32);
    // A fork of the `shoal runtime create` subprocess: it runs the immutable copy of shoal, not
    // this test binary.
    let exe = std::fs::read_link(format!("/proc/{monitor}/exe")).unwrap();
    assert!(
        exe.starts_with(shoal_runtime::exe::PROTECTED_EXE_DIR),
        "monitor runs {}",
        exe.display()
    );
    // And `ps` names it so a sysadmin knows it: `shoal runtime …`.
    let cmdline = std::fs::read(format!("/proc/{monitor}/cmdline")).unwrap();
    let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    assert_eq!(
        (argv[0], argv.get(1).copied()),
        (&b"shoal"[..], Some(&b"runtime"[..])),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    // In a debug build the resident set is mostly the unoptimized binary's code pages:
    // file-backed, shared with every process that runs the binary, faulted in as whole
    // folios whose size depends on the page cache (3.4 MiB here, 4.0 MiB in one CI run), so
    // there only the monitor's own anonymous memory is held to a limit; the whole RSS is
    // held to the target in an optimized build (`shoal-bench monitor-memory` measures it).
    let rss_limit = if cfg!(debug_assertions) {
        u64::MAX
    } else {
        MONITOR_RSS_LIMIT_KIB
    };
    let small = || {
        status_kib(monitor, "RssAnon:") < MONITOR_ANON_LIMIT_KIB
            && status_kib(monitor, "VmRSS:") < rss_limit
    };
    let deadline = Instant::now() + SETTLE;
    while !small() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let me = std::process::id() as i32;
    eprintln!(
        "monitor: RSS {} KiB, anonymous {} KiB; this test process: RSS {} KiB, anonymous {} KiB",
        status_kib(monitor, "VmRSS:"),
        status_kib(monitor, "RssAnon:"),
        status_kib(me, "VmRSS:"),
        status_kib(me, "RssAnon:"),
    );
    assert!(
        small(),
        "monitor: RSS {} KiB, anonymous {} KiB (limits {rss_limit}, {MONITOR_ANON_LIMIT_KIB}); \
         this test process: RSS {} KiB, anonymous {} KiB",
        status_kib(monitor, "VmRSS:"),
        status_kib(monitor, "RssAnon:"),
        status_kib(me, "VmRSS:"),
        status_kib(me, "RssAnon:"),
    );

    drop(ballast);
    node.exec.signal(&id, StopSignal::Kill).await.unwrap();
    assert_eq!(node.exec.wait(&id).await.unwrap(), Exit { code: 137 });
    node.exec.remove(&id).await.unwrap();
    assert_eq!(node.exec.probe(&id).await.unwrap(), Probe::Missing);
    assert!(!node.data.path().join("containers").join(&id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_reports_the_runtime_error() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // A state root that is a file: the create subprocess cannot make its state dir there.
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let node = Node::new(Some(blocker.path().to_path_buf()));
    let id = format!("fail{}", std::process::id());
    let t = task(&id, "w1", IMAGE, &["sleep", "1000"]);
    let err = node.exec.start(&t).await.unwrap_err();
    let ExecError::Runtime(msg) = err else {
        panic!("not a runtime error: {err:?}");
    };
    assert!(
        msg.starts_with(&format!("create container {id}: ")) && msg.contains("File exists"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    assert!(blocker.path().is_file(), "the create made nothing there");
    // Nor is the network it was given kept.
    let ns = shoal_runtime::network::netns_path(&id);
    assert!(!ns.exists(), "{} left behind", ns.display());
    assert!(
        !ns.with_extension("json").exists(),
        "the namespace's owner file left behind"
    );
}

/// An image of busybox plus `/etc/which` = `which`, imported and then left untagged (as a
/// service's image pulled by digest is); its id.
fn dangling_image(store: &ImageStore, dir: &Path, which: &str) -> String {
    let tar = dir.join(format!("{which}.tar"));
    busybox_tar(&tar);
    let mut bytes = std::fs::read(&tar).unwrap();
    // A second archive after the first one's end-of-archive blocks would be ignored:
    // rebuild with the extra file instead.
    let mut b = tar::Builder::new(Vec::new());
    let mut a = tar::Archive::new(bytes.as_slice());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let path = e.path().unwrap().into_owned();
        if h.entry_type() == tar::EntryType::Symlink {
            let target = e.link_name().unwrap().unwrap().into_owned();
            b.append_link(&mut h, &path, &target).unwrap();
        } else {
            b.append_data(&mut h, &path, &mut e).unwrap();
        }
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(which.len() as u64);
    b.append_data(&mut h, "etc/which", which.as_bytes())
        .unwrap();
    bytes = b.into_inner().unwrap();
    std::fs::write(&tar, bytes).unwrap();
    let id = store.import_rootfs_tar(&tar, "gc-test:moving").unwrap().id;
    // Another image takes the tag: this one is dangling now.
    store.tag(IMAGE, "gc-test:moving").unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_collection_keeps_what_tasks_use_and_recent_preparations() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let node = Node::new(None);
    let store = ImageStore::open(node.data.path()).unwrap();
    let used = dangling_image(&store, node.data.path(), "used");
    let prepared = dangling_image(&store, node.data.path(), "prepared");
    let idle = dangling_image(&store, node.data.path(), "idle");
    let id = format!("gc{}", std::process::id());
    let t = task(&id, "w1", &used, &["sleep", "1000"]);
    node.exec.prepare(&t, &|_| {}).await.unwrap();
    node.exec.start(&t).await.unwrap();
    let p = task("gc-prepared", "w1", &prepared, &["true"]);
    node.exec.prepare(&p, &|_| {}).await.unwrap();
    let held = |id: &str| store.inspect(id).is_ok();

    // Within the grace period: only the image nothing touched goes.
    let r = node
        .exec
        .collect_images(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(r.images_removed, 1, "{r:?}");
    assert!(!held(&idle) && held(&prepared) && held(&used) && held(IMAGE));
    assert!(r.blobs_removed > 0 && r.layers_removed > 0, "{r:?}");
    // After it: the prepared image goes too; the running task's stays, and the tagged one.
    let r = node.exec.collect_images(Duration::ZERO).await.unwrap();
    assert_eq!(r.images_removed, 1, "{r:?}");
    assert!(!held(&prepared) && held(&used) && held(IMAGE));
    // Its container gone, the task's image goes as well.
    node.exec.signal(&id, StopSignal::Kill).await.unwrap();
    node.exec.remove(&id).await.unwrap();
    let r = node.exec.collect_images(Duration::ZERO).await.unwrap();
    assert_eq!(r.images_removed, 1, "{r:?}");
    assert!(!held(&used) && held(IMAGE));
    // What is left still runs.
    let again = task("gc-again", "w1", IMAGE, &["true"]);
    node.exec.prepare(&again, &|_| {}).await.unwrap();
}
