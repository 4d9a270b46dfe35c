//! The cluster registry end to end: `shoal agent` managers serving the OCI distribution API
//! from their image stores (`--registry-port`), `shoal image push` into it, a service whose
//! image only that registry has running on a worker, and Debian's `skopeo` copying into it and
//! out of it with a node's certificate (mutual TLS) — and refused without one, or pushing with
//! a worker's.

use crate::services;

use std::path::Path;
use std::process::{Command, Output};

use services::*;
use shoal_tests::registry::{busybox_layer, digest, oci_arch, Layout, SKOPEO_BIN};

/// A docker-style certificate directory for skopeo from a node's PKI: the cluster CA, and the
/// node's certificate and key as the client identity (unless `anonymous`).
fn cert_dir(node: &Node, dir: &Path, anonymous: bool) {
    let pki = node.data().join("pki");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(pki.join("ca.crt"), dir.join("ca.crt")).unwrap();
    if !anonymous {
        std::fs::copy(pki.join("node.crt"), dir.join("client.cert")).unwrap();
        std::fs::copy(pki.join("node.key"), dir.join("client.key")).unwrap();
    }
}

fn skopeo(args: &[&str]) -> Output {
    Command::new(SKOPEO_BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The manifest digest of an OCI layout's only image.
fn layout_digest(dir: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn managers_serve_their_stores_to_members_and_take_pushes_from_managers_only() {
    let port = shoal_tests::cluster::free_port("127.0.0.1").unwrap();
    let port_s = port.to_string();
    let c = Cluster::with_agent_args(3, 2, &["--registry-port", &port_s]);
    let (m1, m2, w) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let work = tempfile::tempdir().unwrap();
    let reg1 = format!("127.0.0.1:{port}");
    let reg2 = format!("127.0.0.2:{port}");

    // An image only the first manager holds, pushed into its own registry by its CLI.
    let l = Layout {
        dir: &work.path().join("app"),
    };
    let img = l.image(
        &busybox_layer("from the cluster registry\n"),
        oci_arch(),
        &["sh", "-c", "cat /etc/motd; exec sleep 3600"],
    );
    l.finish(&img, false);
    m1.ok(&["image", "load", l.dir.to_str().unwrap()]);
    let name = format!("{reg1}/team/app:1");
    m1.ok(&["image", "tag", "latest:latest", &name]);
    let pushed = m1.ok(&["image", "push", "-q", &name]);
    assert_eq!(pushed.trim(), digest(&img));

    // A service of it, on the worker, which pulls it from there.
    m1.ok(&[
        "service",
        "create",
        "--name",
        "app",
        "--constraint",
        &format!("node.hostname=={}", w.host),
        &name,
    ]);
    assert_eq!(c.running("app").len(), 1);
    let spec = c.inspect("app")["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].clone();
    assert_eq!(spec, format!("{name}@{}", digest(&img)));
    assert!(w
        .shoal(&["image", "inspect", &digest(&img)])
        .status
        .success());

    // skopeo in and out of the second manager's registry with a manager's certificate.
    let m_certs = work.path().join("m-certs");
    cert_dir(m1, &m_certs, false);
    let m_certs_s = m_certs.to_str().unwrap();
    let into = format!("docker://{reg2}/skopeo/app:2");
    let out = skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-cert-dir",
        m_certs_s,
        &format!("oci:{}:latest", l.dir.display()),
        &into,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(m2.ok(&["image", "ls"]).contains("skopeo/app"));
    let back = work.path().join("back");
    let out = skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-cert-dir",
        m_certs_s,
        &into,
        &format!("oci:{}:x", back.display()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        layout_digest(&back),
        digest(&img),
        "byte-identical round trip"
    );

    // No certificate: refused. A worker's: it may pull, not push.
    let anon = work.path().join("anon");
    cert_dir(m1, &anon, true);
    let out = skopeo(&["inspect", "--cert-dir", anon.to_str().unwrap(), &into]);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("unauthorized"),
        "{}",
        text(&out)
    );
    let w_certs = work.path().join("w-certs");
    cert_dir(w, &w_certs, false);
    let w_certs_s = w_certs.to_str().unwrap();
    let out = skopeo(&["inspect", "--cert-dir", w_certs_s, &into]);
    assert!(out.status.success(), "{}", text(&out));
    let out = skopeo(&[
        "copy",
        "--dest-cert-dir",
        w_certs_s,
        &format!("oci:{}:latest", l.dir.display()),
        &format!("docker://{reg2}/skopeo/app:3"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("only a manager"), "{}", text(&out));
    // Nothing half-pushed is stored.
    assert!(!m2.ok(&["image", "ls"]).contains("app   3"));
}
