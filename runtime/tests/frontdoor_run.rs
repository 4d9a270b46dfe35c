//! Containers from images through the front door (root, real containers): output and exit
//! codes, env and hostname, the overlay (image files visible, writes only in the upper dir,
//! layers shared), read-only root, user and workdir, Docker's security defaults.

use crate::frontdoor_support;

use frontdoor_support::{Node, MOTD};

#[test]
fn output_and_exit_code() {
    let n = Node::new();
    let (code, log, id) = n.run(&["sh", "-c", "echo out; echo err >&2; exit 7"], |_| {});
    assert_eq!(code, 7);
    assert!(log.contains("out\n") && log.contains("err\n"), "{log:?}");
    assert_eq!(id.len(), 64);
    let r = n.fd.resolve(&id[..12]).expect("short id resolves");
    assert_eq!(
        r.command,
        vec!["sh", "-c", "echo out; echo err >&2; exit 7"]
    );
    assert!(r.name.contains('_'), "generated name {}", r.name);
}

#[test]
fn env_hostname_and_home() {
    let n = Node::new();
    let (code, log, id) = n.run(
        &["sh", "-c", "echo \"$FOO|$(hostname)|$HOME|$PATH\""],
        |o| {
            o.env = vec!["FOO=bar baz".into()];
            o.hostname = Some("fdhost".into());
        },
    );
    assert_eq!(code, 0);
    assert!(
        log.starts_with("bar baz|fdhost|/root|/usr/local/sbin:"),
        "{log:?}"
    );
    // Without --hostname, the short id, as Docker.
    let (_, log, id2) = n.run(&["hostname"], |_| {});
    assert_eq!(log.trim(), &id2[..12]);
    assert_ne!(id, id2);
}

#[test]
fn image_files_visible_and_writes_only_in_upper() {
    let n = Node::new();
    let prepared = shoal_runtime::image::ImageStore::open(&n.data)
        .unwrap()
        .prepare(frontdoor_support::IMAGE)
        .unwrap();
    let layer = prepared.layer_dirs[0].clone();
    let (code, log, id) = n.run(
        &[
            "sh",
            "-c",
            "cat /etc/motd && echo changed > /etc/motd && echo new > /newfile && rm /bin/yes && cat /etc/motd",
        ],
        |_| {},
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(log, format!("{MOTD}changed\n"));
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/motd")).unwrap(),
        MOTD
    );
    assert!(!layer.join("newfile").exists());
    assert!(layer.join("bin/yes").symlink_metadata().is_ok());
    let upper = n.fd.container_dir(&id).join("upper");
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/motd")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("newfile")).unwrap(),
        "new\n"
    );
}

#[test]
fn two_containers_share_the_layer_dir() {
    let n = Node::new();
    let show = [
        "sh",
        "-c",
        "grep ' / ' /proc/self/mountinfo | grep -o 'lowerdir=[^,]*'",
    ];
    let (c1, a, _) = n.run(&show, |_| {});
    let (c2, b, _) = n.run(&show, |_| {});
    assert_eq!((c1, c2), (0, 0), "{a} {b}");
    assert!(a.starts_with("lowerdir="), "{a}");
    assert_eq!(a, b);
    assert!(
        a.contains(&n.data.join("layers").display().to_string()),
        "{a}"
    );
    assert_eq!(std::fs::read_dir(n.data.join("layers")).unwrap().count(), 1);
}

#[test]
fn read_only_root() {
    let n = Node::new();
    let (code, log, _) = n.run(
        &[
            "sh",
            "-c",
            "touch /x && echo wrote; echo tmp > /tmp/y && echo wrote2",
        ],
        |o| o.read_only = true,
    );
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(!log.contains("wrote"), "{log}");
    let (code, _, _) = n.run(&["sh", "-c", "touch /x"], |_| {});
    assert_eq!(code, 0);
}

#[test]
fn user_and_workdir() {
    let n = Node::new();
    let (code, log, id) = n.run(&["sh", "-c", "pwd; id -u; id -g; echo $HOME"], |o| {
        o.user = Some("app".into());
        o.workdir = Some("/srv/data".into());
    });
    assert_eq!(code, 0, "{log}");
    assert_eq!(log, "/srv/data\n1000\n1000\n/home/app\n");
    // The missing workdir was made in the container's upper dir, owned by the user.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(n.fd.container_dir(&id).join("upper/srv/data")).unwrap();
    assert_eq!(md.uid(), 1000);
    let (code, log, _) = n.run(&["id", "-u"], |o| o.user = Some("4321:99".into()));
    assert_eq!((code, log.as_str()), (0, "4321\n"));
}

#[test]
fn docker_security_defaults() {
    let n = Node::new();
    let (code, log, _) = n.run(
        &[
            "sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
        ],
        |_| {},
    );
    assert_eq!(code, 0, "{log}");
    // Docker's 14 default capabilities.
    assert!(log.contains("CapEff:\t00000000a80425fb"), "{log}");
    assert!(log.contains("CapBnd:\t00000000a80425fb"), "{log}");
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    assert!(log.contains("Seccomp:\t2"), "{log}");
}
