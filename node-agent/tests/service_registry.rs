//! Services whose image only a registry has: `shoal agent` processes on loopback, Debian's
//! `docker-registry` on a loopback port (filled with `skopeo copy`), real containers. The
//! manager pins a tag to the registry's digest once; the nodes pull that digest while their
//! tasks prepare, with the credentials the service was given (`--with-registry-auth`), which no
//! read of the cluster returns.

use crate::services;

use std::path::Path;
use std::process::Output;

use services::*;
use shoal_tests::registry::{busybox_layer, digest, oci_arch, Layout, Registry};

/// Writes an image whose /etc/motd is `motd` (its command prints it, then sleeps) and pushes
/// it to `reg` as `name`; its manifest.
fn push(reg: &Registry, work: &Path, name: &str, motd: &str) -> Vec<u8> {
    let dir = work.join(name.replace([':', '/'], "_") + motd.trim());
    let l = Layout { dir: &dir };
    let img = l.image(
        &busybox_layer(motd),
        oci_arch(),
        &["sh", "-c", "cat /etc/motd; exec sleep 3600"],
    );
    l.finish(&img, false);
    reg.push(&dir, name).unwrap();
    img
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeded(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

/// The image a service's spec names.
fn spec_image(c: &Cluster, service: &str) -> String {
    c.inspect(service)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The images the service's tasks desired RUNNING name.
fn task_images(c: &Cluster, service: &str) -> Vec<String> {
    c.tasks_json(service)
        .iter()
        .filter(|t| t["DesiredState"] == "running")
        .map(|t| t["Image"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_tag_is_pinned_to_the_registry_digest_once_and_moves_only_when_asked() {
    let reg = Registry::start("127.0.0.1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let v1 = push(&reg, work.path(), "app:1", "one\n");
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    let name = format!("{}/app:1", reg.addr());

    // Pinned when created: both nodes run exactly those bytes.
    let out = m.shoal(&[
        "service",
        "create",
        "--name",
        "app",
        "--replicas",
        "2",
        "--replicas-max-per-node",
        "1",
        &name,
    ]);
    succeeded(&out, "service create");
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let pinned_v1 = format!("{name}@{}", digest(&v1));
    assert_eq!(spec_image(&c, "app"), pinned_v1);
    c.until("2 tasks running", || c.running("app").len() == 2);
    assert_eq!(task_images(&c, "app"), vec![pinned_v1.clone(); 2]);
    // Lists show the tag; --no-trunc the digest too.
    let ps = m.ok(&["service", "ps", "app"]);
    assert!(ps.contains(&name) && !ps.contains("@sha256"), "{ps}");
    assert!(m
        .ok(&["service", "ps", "--no-trunc", "app"])
        .contains(&pinned_v1));
    let ls = m.ok(&["service", "ls"]);
    assert!(ls.contains(&name) && !ls.contains("@sha256"), "{ls}");
    for n in &c.nodes {
        // Each node found the pinned digest in its store after pulling it.
        succeeded(
            &n.shoal(&["image", "inspect", &digest(&v1)]),
            "image inspect",
        );
    }

    // A new push under the same tag changes nothing until an update names the image.
    let v2 = push(&reg, work.path(), "app:1", "two\n");
    m.ok(&["service", "update", "--env-add", "A=1", "app"]);
    assert_eq!(spec_image(&c, "app"), pinned_v1);
    m.ok(&["service", "scale", "app=1"]);
    assert_eq!(spec_image(&c, "app"), pinned_v1);
    m.ok(&["service", "update", "--image", &name, "app"]);
    let pinned_v2 = format!("{name}@{}", digest(&v2));
    assert_eq!(spec_image(&c, "app"), pinned_v2);
    c.until("the new digest running", || {
        task_images(&c, "app") == vec![pinned_v2.clone()] && c.running("app").len() == 1
    });

    // --no-resolve-image keeps the tag; an imported image is never looked up.
    m.ok(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        "raw",
        &name,
    ]);
    assert_eq!(spec_image(&c, "raw"), name);
    let out = m.shoal(&["service", "create", "-d", "--name", "local", IMAGE]);
    succeeded(&out, "service create local");
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(spec_image(&c, "local"), IMAGE);

    // A registry that is down: created with a warning, the tag kept; its task is rejected
    // with the registry's reason where it prepares.
    let gone = "127.0.0.1:9/app:1";
    let out = m.shoal(&["service", "create", "-d", "--name", "gone", gone]);
    succeeded(&out, "service create gone");
    let warned = stderr(&out);
    assert_eq!(warned.lines().count(), 1, "{warned}");
    assert!(
        warned.starts_with("warning: image 127.0.0.1:9/app:1 could not be accessed on a registry"),
        "{warned}"
    );
    assert_eq!(spec_image(&c, "gone"), gone);
    c.until("the unpullable task rejected", || {
        c.ps("gone")
            .iter()
            .any(|t| t.current == "Rejected" && t.error.contains("pull"))
    });
}

#[test]
fn registry_credentials_reach_the_nodes_that_run_the_service_and_no_reader() {
    let reg = Registry::start_with_login("127.0.0.1", "alice", "s3cret").unwrap();
    let work = tempfile::tempdir().unwrap();
    push(&reg, work.path(), "private:1", "private\n");
    // Three managers (two would lose their quorum to any stall of a loaded machine) and a
    // worker.
    let c = Cluster::new(4, 3);
    let (m, other, w) = (&c.nodes[0], &c.nodes[1], &c.nodes[3]);
    let name = format!("{}/private:1", reg.addr());
    // Only the first manager's node is logged in.
    m.ok(&["login", "-u", "alice", "-p", "s3cret", reg.addr()]);
    let on_worker = format!("node.hostname=={}", w.host);

    // Without --with-registry-auth the worker has no credentials: rejected, and said so.
    m.ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "bare",
        "--constraint",
        &on_worker,
        &name,
    ]);
    c.until("the task rejected for want of a login", || {
        c.ps("bare")
            .iter()
            .any(|t| t.current == "Rejected" && t.error.contains("unauthorized"))
    });
    m.ok(&["service", "rm", "bare"]);

    // With it, the worker pulls with the manager node's login.
    m.ok(&[
        "service",
        "create",
        "--with-registry-auth",
        "--name",
        "authed",
        "--constraint",
        &on_worker,
        &name,
    ]);
    assert_eq!(c.running("authed").len(), 1);
    // An update that sends none keeps them: a new push of the tag, pulled by the worker.
    let v2 = push(&reg, work.path(), "private:1", "private two\n");
    m.ok(&["service", "update", "--image", &name, "authed"]);
    let pinned = format!("{name}@{}", digest(&v2));
    c.until("the new image running on the worker", || {
        task_images(&c, "authed") == vec![pinned.clone()] && c.running("authed").len() == 1
    });
    // No read returns them.
    for out in [
        m.ok(&["service", "inspect", "authed"]),
        m.ok(&["service", "ps", "--format", "json", "authed"]),
        other.ok(&["service", "inspect", "authed"]),
        other.ok(&["service", "ps", "--format", "json", "authed"]),
    ] {
        assert!(!out.contains("s3cret") && !out.contains("alice"), "{out}");
    }
    // The worker holds the image (by the digest it was pinned to) but no login of its own.
    succeeded(
        &w.shoal(&["image", "inspect", &digest(&v2)]),
        "image inspect",
    );
    assert!(!w.data().join("auth.json").exists());
}
