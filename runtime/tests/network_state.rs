//! The machine's network records (`/run/shoal/net/<name>@<netns inode>`) live no longer than
//! what they describe: a state dir goes with the last container of its namespace, and the
//! state dirs of a namespace that is gone are swept. Real namespaces, bridges and VXLAN
//! devices (root); each test works in network namespaces of its own.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use shoal_runtime::network::{self, BridgeConfig, Mode, NetRequest, OverlayAttach, RUN_DIR};

/// Runs `f` on a thread of its own in a new network namespace, which dies with the thread
/// unless something else holds it.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce(u64) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the netns");
        let ino = std::fs::metadata("/proc/thread-self/ns/net")
            .expect("this namespace")
            .ino();
        f(ino)
    })
    .join()
    .expect("the namespace thread")
}

/// A container on a bridge of its own and on an overlay: the state dirs that makes.
fn attach(id: &str, dir: &Path, ino: u64) -> Vec<PathBuf> {
    let cfg = BridgeConfig::new("shtst0", "10.251.0.0/24").expect("bridge config");
    let req = NetRequest {
        mode: Mode::Bridge,
        overlays: vec![OverlayAttach {
            network_id: "net1".into(),
            vni: 4097,
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            attachment: String::new(),
        }],
        ..Default::default()
    };
    network::attach(&cfg, id, dir, &req).expect("attach");
    let states: Vec<PathBuf> = ["shtst0", "ov4097"]
        .iter()
        .map(|n| Path::new(RUN_DIR).join("net").join(format!("{n}@{ino}")))
        .collect();
    for s in &states {
        assert!(s.join("ip").is_dir(), "{} made", s.display());
    }
    states
}

#[test]
fn a_namespace_s_state_dirs_go_with_its_last_container() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = format!("nsl{}", std::process::id());
    let d = dir.path().to_path_buf();
    let states = in_new_netns(move |ino| {
        let states = attach(&id, &d, ino);
        network::detach(&id).expect("detach");
        states
    });
    let left: Vec<_> = states.iter().filter(|s| s.exists()).collect();
    assert!(left.is_empty(), "state dirs left: {left:?}");
}

#[test]
fn the_state_dirs_of_a_vanished_namespace_are_swept() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An inode freed by the dead namespace may be taken by a new one (of another test) before
    // the sweep looks: then it is in use and kept, so the case is made again.
    for attempt in 0..5 {
        let id = format!("nsv{}-{attempt}", std::process::id());
        let (d, i) = (dir.path().to_path_buf(), id.clone());
        let (states, ino) = in_new_netns(move |ino| (attach(&i, &d, ino), ino));
        // As a test bed host's removal does: the namespace and its containers' namespace files
        // go, the records stay.
        let ns = network::netns_path(&id);
        nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH).expect("unmount");
        std::fs::remove_file(&ns).expect("remove the namespace file");
        std::fs::remove_file(ns.with_file_name(format!("{id}.json"))).expect("owner");
        assert!(states.iter().all(|s| s.exists()), "records kept");
        assert!(
            !network::live_netns().contains(&ino),
            "the namespace is gone"
        );

        network::sweep_stale_state();
        let left: Vec<_> = states.iter().filter(|s| s.exists()).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            network::live_netns().contains(&ino),
            "state dirs of a vanished namespace left: {left:?}"
        );
    }
    panic!("the namespace's inode was taken again before every sweep");
}

#[test]
fn live_namespaces_are_seen_and_their_state_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = format!("nsk{}", std::process::id());
    let d = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let i = id.clone();
    let t = std::thread::spawn(move || {
        in_new_netns(move |ino| {
            let states = attach(&i, &d, ino);
            tx.send((states, ino)).expect("send");
            // Alive (this thread is in it) until the test is done looking.
            let _ = done_rx.recv();
            network::detach(&i).expect("detach");
        })
    });
    let (states, ino) = rx.recv().expect("states");
    assert!(network::live_netns().contains(&ino));
    network::sweep_stale_state();
    assert!(states.iter().all(|s| s.join("ip").is_dir()), "kept");
    done_tx.send(()).expect("done");
    t.join().expect("thread");
    assert!(states.iter().all(|s| !s.exists()));
}
