//! `shoal image pull` against a real registry: Debian's `docker-registry` (the distribution
//! project's registry) started here on a loopback port, filled with `skopeo copy` from OCI
//! layouts this test writes (a single-platform image and a two-platform index).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shoal_tests::registry::{
    busybox_layer as layer, digest, http, oci_arch, scripted_registry, Layout, Registry,
};

fn shoal(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_DATA_DIR", data)
        .env_remove("SHOAL_INSECURE_REGISTRIES")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Exit 1 and exactly one line on stderr starting with `shoal:` and containing `want`.
fn one_line_error(out: &Output, want: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("shoal: "), "{err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

/// An image for a scripted registry to serve: a layer whose /etc/motd is `motd` (the image
/// prints it), its config and its manifest.
fn served_image(motd: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let layer_bytes = layer(motd);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "config": {"Cmd": ["cat", "/etc/motd"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer_bytes)]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(&layer_bytes), "size": layer_bytes.len()}],
    }))
    .unwrap();
    (layer_bytes, config, manifest)
}

/// Nothing half-pulled is left under the data dir's download area.
fn no_downloads_left(data: &Path) {
    let left: Vec<PathBuf> = std::fs::read_dir(data.join("pulls"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn images_are_pulled_by_tag_digest_and_platform_and_bad_pulls_leave_nothing() {
    let reg = Registry::start("127.0.0.1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let cat = ["cat", "/etc/motd"];
    // A single-platform image.
    let one = Layout {
        dir: &work.path().join("one"),
    };
    let img = one.image(&layer("hello from the registry\n"), oci_arch(), &cat);
    one.finish(&img, false);
    reg.push(one.dir, "app:1.4").unwrap();
    // A two-platform index: this node's platform and another one.
    let multi = Layout {
        dir: &work.path().join("multi"),
    };
    let other_arch = if oci_arch() == "s390x" {
        "arm64"
    } else {
        "s390x"
    };
    let mine = multi.image(&layer("this platform\n"), oci_arch(), &cat);
    let other = multi.image(&layer("the other platform\n"), other_arch, &cat);
    let index = multi.index(&[(&other, other_arch), (&mine, oci_arch())]);
    multi.finish(&index, true);
    reg.push(multi.dir, "multi:latest").unwrap();

    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    // By tag: stored under the name given, and it runs.
    let name = format!("{}/app:1.4", reg.addr());
    let out = ok(&shoal(d, &["image", "pull", &name]));
    assert!(out.contains(&format!("Digest: {}", digest(&img))), "{out}");
    let ls = ok(&shoal(d, &["image", "ls"]));
    assert!(
        ls.contains(&format!("{}/app", reg.addr())) && ls.contains("1.4"),
        "{ls}"
    );
    let run = ok(&shoal(d, &["run", "--rm", "--network", "none", &name]));
    assert_eq!(run, "hello from the registry\n");
    // By digest: the same image, found without a tag.
    let by_digest = format!("{}/app@{}", reg.addr(), digest(&img));
    let id = ok(&shoal(d, &["image", "pull", "-q", &by_digest]));
    assert!(id.trim().starts_with("sha256:"), "{id}");
    // An index: this node's platform only.
    let multi_name = format!("{}/multi", reg.addr());
    let out = ok(&shoal(d, &["image", "pull", &multi_name]));
    assert!(out.contains(&digest(&mine)), "{out}");
    let run = ok(&shoal(
        d,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &format!("{multi_name}:latest"),
        ],
    ));
    assert_eq!(run, "this platform\n");
    no_downloads_left(d);

    // Bad pulls: one line each, nothing stored.
    let before = ok(&shoal(d, &["image", "ls", "-q"]));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("{}/app:1", closed.local_addr().unwrap());
    drop(closed);
    let wrong_digest = format!("{}/app@sha256:{}", reg.addr(), "0".repeat(64));
    for (reference, want) in [
        (format!("{}/app:nope", reg.addr()), "manifest unknown"),
        (format!("{}/nothing:1", reg.addr()), "unknown"),
        (wrong_digest, "manifest unknown"),
        (down, "error sending request"),
        ("Bad//Ref".to_string(), "invalid reference"),
    ] {
        one_line_error(&shoal(d, &["image", "pull", &reference]), want);
    }
    assert_eq!(ok(&shoal(d, &["image", "ls", "-q"])), before);
    no_downloads_left(d);

    // Push: an imported image, tagged with the registry's name, goes up and comes back
    // byte-identical (same manifest digest) into another node's store.
    let tar = work.path().join("rootfs.tar");
    std::fs::write(&tar, layer("pushed\n")).unwrap();
    ok(&shoal(
        d,
        &["image", "import", tar.to_str().unwrap(), "local:1"],
    ));
    let pushed = format!("{}/pushed:1", reg.addr());
    ok(&shoal(d, &["image", "tag", "local:1", &pushed]));
    let local: serde_json::Value =
        serde_json::from_str(&ok(&shoal(d, &["image", "inspect", &pushed]))).unwrap();
    let local_digest = local[0]["ManifestDigest"].as_str().unwrap().to_string();
    let out = ok(&shoal(d, &["image", "push", "-q", &pushed]));
    assert_eq!(out.trim(), local_digest);
    let other = tempfile::tempdir().unwrap();
    let out = ok(&shoal(other.path(), &["image", "pull", &pushed]));
    assert!(out.contains(&local_digest), "{out}");
    let run = ok(&shoal(
        other.path(),
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &pushed,
            "cat",
            "/etc/motd",
        ],
    ));
    assert_eq!(run, "pushed\n");
    // Pushing again sends no blob twice and keeps the digest.
    assert_eq!(
        ok(&shoal(d, &["image", "push", "-q", &pushed])).trim(),
        local_digest
    );
    one_line_error(
        &shoal(d, &["image", "tag", "nothere:1", "x:1"]),
        "no such image",
    );
    one_line_error(
        &shoal(d, &["image", "tag", "local:1", "Bad//Ref"]),
        "invalid reference",
    );
    one_line_error(
        &shoal(
            d,
            &["image", "push", &format!("{}/notstored:1", reg.addr())],
        ),
        "no such image",
    );

    // The registry's bytes: what it serves for the tag is what was pushed.
    let mut body = String::new();
    let mut s = std::net::TcpStream::connect(reg.addr()).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /v2/app/manifests/1.4 HTTP/1.0\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n",
    )
    .unwrap();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains(&digest(&img)), "{body}");
}

#[test]
fn a_lying_registry_is_refused_on_one_line_and_nothing_is_stored() {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest(b"layer")]},
    }))
    .unwrap();
    let manifest = |layer: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer, "size": 100}],
        }))
        .unwrap()
    };
    let layer_digest = digest(&[7u8; 100]);
    let good = manifest(&layer_digest);
    let other = manifest(&digest(b"something else"));
    let (config_c, good_c, other_c, ld) = (
        config.clone(),
        good.clone(),
        other.clone(),
        layer_digest.clone(),
    );
    let addr = scripted_registry(move |path, _| {
        let json = |b: &[u8]| {
            http(
                "200 OK",
                &[
                    (
                        "Content-Type",
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    ),
                    ("Content-Length", b.len().to_string()),
                ],
                b,
            )
        };
        let blob = |b: &[u8]| http("200 OK", &[("Content-Length", b.len().to_string())], b);
        let repo = path.split('/').nth(2).unwrap_or("");
        if path == "/v2/" {
            return http("200 OK", &[("Content-Length", "0".into())], b"");
        }
        if path.contains("/manifests/") {
            return match repo {
                "huge" => json(&vec![b' '; 5 << 20]),
                // Asked by digest for one manifest, it serves another.
                "swapped" => json(&other_c),
                _ => json(&good_c),
            };
        }
        if path.ends_with(&digest(&config_c)) {
            return blob(&config_c);
        }
        if path.ends_with(&ld) {
            return match repo {
                // Other bytes than the digest says.
                "badblob" => blob(&[8u8; 100]),
                // Half of what it announces, then the connection closes.
                "truncated" => http("200 OK", &[("Content-Length", "100".into())], &[7u8; 50]),
                // A redirect to itself, forever.
                "loop" => http(
                    "307 Temporary Redirect",
                    &[
                        ("Location", path.to_string()),
                        ("Content-Length", "0".into()),
                    ],
                    b"",
                ),
                _ => blob(&[7u8; 100]),
            };
        }
        http("404 Not Found", &[("Content-Length", "0".into())], b"")
    });
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let before = ok(&shoal(d, &["image", "ls", "-q"]));
    for (reference, want) in [
        (format!("{addr}/badblob:1"), "digest"),
        (format!("{addr}/truncated:1"), "blob"),
        (format!("{addr}/huge:1"), "more than"),
        (format!("{addr}/loop:1"), "redirect"),
        (
            format!("{addr}/swapped@{}", digest(&good)),
            "Invalid digest",
        ),
    ] {
        let out = shoal(d, &["image", "pull", &reference]);
        one_line_error(&out, want);
        assert_eq!(ok(&shoal(d, &["image", "ls", "-q"])), before, "{reference}");
        no_downloads_left(d);
    }
}

#[test]
fn login_keeps_credentials_that_pulls_and_pushes_use_and_logout_forgets_them() {
    let reg = Registry::start_with_login("127.0.0.1", "alice", "s3cret").unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let tar = work.path().join("rootfs.tar");
    std::fs::write(&tar, layer("private\n")).unwrap();
    ok(&shoal(
        d,
        &["image", "import", tar.to_str().unwrap(), "local:1"],
    ));
    let name = format!("{}/private:1", reg.addr());
    ok(&shoal(d, &["image", "tag", "local:1", &name]));
    // Without credentials the registry refuses.
    one_line_error(
        &shoal(d, &["image", "push", &name]),
        &format!("unauthorized (shoal login {} first)", reg.addr()),
    );
    // A wrong password is refused and nothing is kept.
    one_line_error(
        &shoal(d, &["login", "-u", "alice", "-p", "wrong", reg.addr()]),
        "login refused: unauthorized",
    );
    assert!(!d.join("auth.json").exists());
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["login", "-u", "alice", "--password-stdin", reg.addr()])
        .env("SHOAL_DATA_DIR", d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(ok(&out), "Login Succeeded\n");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("auth.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("auth.json")).unwrap()).unwrap();
    assert!(kept["auths"][reg.addr()]["auth"].is_string(), "{kept}");
    // Logged in: push, then pull into another node's store once it logs in too.
    ok(&shoal(d, &["image", "push", "-q", &name]));
    let other = tempfile::tempdir().unwrap();
    one_line_error(
        &shoal(other.path(), &["image", "pull", &name]),
        "unauthorized (shoal login",
    );
    ok(&shoal(
        other.path(),
        &["login", "-u", "alice", "-p", "s3cret", reg.addr()],
    ));
    ok(&shoal(other.path(), &["image", "pull", &name]));
    let run = ok(&shoal(
        other.path(),
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &name,
            "cat",
            "/etc/motd",
        ],
    ));
    assert_eq!(run, "private\n");
    // Logged out: refused again.
    assert_eq!(
        ok(&shoal(other.path(), &["logout", reg.addr()])),
        format!("Removing login credentials for {}\n", reg.addr())
    );
    ok(&shoal(other.path(), &["image", "rm", &name]));
    one_line_error(
        &shoal(other.path(), &["image", "pull", &name]),
        "unauthorized (shoal login",
    );
}

/// A layer whose transfer breaks off halfway is resumed with a ranged request, and the image
/// it makes runs.
#[test]
fn a_broken_transfer_resumes_where_it_stopped() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (layer_bytes, config, manifest) = served_image("resumed\n");
    let ranged = Arc::new(AtomicUsize::new(0));
    let (counted, ld, cd) = (ranged.clone(), digest(&layer_bytes), digest(&config));
    let addr = scripted_registry(move |path, head| {
        let ok = |b: &[u8]| http("200 OK", &[("Content-Length", b.len().to_string())], b);
        if path == "/v2/" {
            return ok(b"");
        }
        if path.contains("/manifests/") {
            return http(
                "200 OK",
                &[
                    (
                        "Content-Type",
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    ),
                    ("Content-Length", manifest.len().to_string()),
                ],
                &manifest,
            );
        }
        if path.ends_with(&cd) {
            return ok(&config);
        }
        if path.ends_with(&ld) {
            let len = layer_bytes.len();
            let from = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                let v = v.trim().strip_prefix("bytes=")?;
                (k.eq_ignore_ascii_case("range"))
                    .then(|| v.trim_end_matches('-').parse::<usize>().ok())?
            });
            return match from {
                // The rest, as asked.
                Some(from) if from < len => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    http(
                        "206 Partial Content",
                        &[
                            ("Content-Length", (len - from).to_string()),
                            ("Content-Range", format!("bytes {from}-{}/{len}", len - 1)),
                        ],
                        &layer_bytes[from..],
                    )
                }
                // The whole blob announced, half of it sent, then the connection closes.
                _ => http(
                    "200 OK",
                    &[("Content-Length", len.to_string())],
                    &layer_bytes[..len / 2],
                ),
            };
        }
        http("404 Not Found", &[("Content-Length", "0".into())], b"")
    });
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let name = format!("{addr}/flaky:1");
    ok(&shoal(d, &["image", "pull", "-q", &name]));
    assert_eq!(ranged.load(Ordering::SeqCst), 1, "one ranged request");
    let run = ok(&shoal(d, &["run", "--rm", "--network", "none", &name]));
    assert_eq!(run, "resumed\n");
    no_downloads_left(d);
}

/// A registry whose certificate a CA of its own issued: reached over HTTPS once the node
/// keeps that CA in `certs.d/HOST:PORT/` (loopback or not), refused with another CA.
#[test]
fn a_registry_with_its_own_ca_is_trusted_through_certs_d() {
    let reg = Registry::start_tls("127.0.0.1").unwrap();
    let stranger = Registry::start_tls("127.0.0.1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let l = Layout {
        dir: &work.path().join("secure"),
    };
    let img = l.image(&layer("over tls\n"), oci_arch(), &["cat", "/etc/motd"]);
    l.finish(&img, false);
    reg.push(l.dir, "secure:1").unwrap();
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let name = format!("{}/secure:1", reg.addr());
    let certs = d.join("certs.d").join(reg.addr());
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), stranger.ca_pem().unwrap()).unwrap();
    one_line_error(&shoal(d, &["image", "pull", &name]), "certificate");
    no_downloads_left(d);
    std::fs::write(certs.join("ca.crt"), reg.ca_pem().unwrap()).unwrap();
    let out = ok(&shoal(d, &["image", "pull", &name]));
    assert!(out.contains(&digest(&img)), "{out}");
    let run = ok(&shoal(d, &["run", "--rm", "--network", "none", &name]));
    assert_eq!(run, "over tls\n");
}

/// A registry that hands out bearer tokens (Docker Hub's way): every request without the
/// token is answered 401 with a `WWW-Authenticate: Bearer realm=…` challenge, and the realm
/// gives the token only for the right basic credentials. `shoal login` then pulls work.
#[test]
fn bearer_token_challenges_are_answered_with_the_login() {
    use base64::Engine;
    let (layer_bytes, config, manifest) = served_image("behind a token\n");
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("carol:t0ken-pw")
    );
    let (ld, cd) = (digest(&layer_bytes), digest(&config));
    let addr = scripted_registry(move |path, head| {
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let ok = |ct: &str, b: &[u8]| {
            http(
                "200 OK",
                &[
                    ("Content-Type", ct.to_string()),
                    ("Content-Length", b.len().to_string()),
                ],
                b,
            )
        };
        if path.starts_with("/token") {
            return if header("authorization").as_deref() == Some(good.as_str()) {
                ok("application/json", br#"{"token":"tok-123"}"#)
            } else {
                http("401 Unauthorized", &[("Content-Length", "0".into())], b"")
            };
        }
        if header("authorization").as_deref() != Some("Bearer tok-123") {
            let host = header("host").unwrap_or_default();
            return http(
                "401 Unauthorized",
                &[
                    (
                        "WWW-Authenticate",
                        format!(
                            "Bearer realm=\"http://{host}/token\",service=\"scripted\",scope=\"repository:secret:pull\""
                        ),
                    ),
                    ("Content-Length", "0".into()),
                ],
                b"",
            );
        }
        if path == "/v2/" {
            return ok("application/json", b"{}");
        }
        if path.contains("/manifests/") {
            return ok("application/vnd.oci.image.manifest.v1+json", &manifest);
        }
        if path.ends_with(&cd) {
            return ok("application/octet-stream", &config);
        }
        if path.ends_with(&ld) {
            return ok("application/octet-stream", &layer_bytes);
        }
        http("404 Not Found", &[("Content-Length", "0".into())], b"")
    });
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let name = format!("{addr}/secret:1");
    one_line_error(
        &shoal(d, &["image", "pull", &name]),
        &format!("unauthorized (shoal login {addr} first)"),
    );
    ok(&shoal(
        d,
        &["login", "-u", "carol", "-p", "t0ken-pw", &addr],
    ));
    ok(&shoal(d, &["image", "pull", "-q", &name]));
    let run = ok(&shoal(d, &["run", "--rm", "--network", "none", &name]));
    assert_eq!(run, "behind a token\n");
}
