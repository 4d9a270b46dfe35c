//! A real registry for tests and benchmarks: Debian's `docker-registry` (the distribution
//! project's registry) on an address the caller picks (loopback, or a test bed bridge address
//! that test hosts reach), filled with `skopeo copy` from OCI layouts written here.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::testbed::{describe, tail, TestbedError};

/// The registry binary (Debian's docker-registry).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// skopeo (Debian's).
pub const SKOPEO_BIN: &str = "/usr/bin/skopeo";
/// How long the registry may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// An uncompressed layer: /bin/busybox with `cat` and `sh`, and `/etc/motd` = `motd`.
pub fn busybox_layer(motd: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .expect("tar");
    for applet in ["cat", "sh", "sleep"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar");
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(motd.len() as u64);
    b.append_data(&mut h, "etc/motd", motd.as_bytes())
        .expect("tar");
    b.into_inner().expect("tar")
}

/// `sha256:<hex>` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// This machine's platform architecture, in OCI's words.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A running registry on `addr`, its storage in a temp dir; killed (by pid) when dropped.
pub struct Registry {
    child: Child,
    addr: String,
    /// `user:password` when it asks for a login.
    login: Option<String>,
    /// PEM of the CA its TLS certificate was issued by, when it serves HTTPS.
    ca_pem: Option<String>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry listening on `ip` (a free port) and waits until it accepts.
    pub fn start(ip: &str) -> Result<Registry, TestbedError> {
        Self::start_with(ip, None, false)
    }

    /// [`Registry::start`] over HTTPS only, with a certificate for `ip` issued by a CA made
    /// here ([`Registry::ca_pem`]).
    pub fn start_tls(ip: &str) -> Result<Registry, TestbedError> {
        Self::start_with(ip, None, true)
    }

    /// The CA's certificate (PEM) of a registry started with [`Registry::start_tls`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// [`Registry::start`] with basic auth: only `user`/`password` (an htpasswd file made with
    /// Debian's apache2-utils) may read or write.
    pub fn start_with_login(
        ip: &str,
        user: &str,
        password: &str,
    ) -> Result<Registry, TestbedError> {
        Self::start_with(ip, Some((user, password)), false)
    }

    fn start_with(
        ip: &str,
        login: Option<(&str, &str)>,
        tls: bool,
    ) -> Result<Registry, TestbedError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| TestbedError::Io { what, source }
        };
        let dir = tempfile::tempdir().map_err(io("a registry dir"))?;
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(io("a free port for the registry"))?
            .port();
        let addr = format!("{ip}:{port}");
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        // Under `http:`, before any other section.
        let ca_pem = if tls {
            let (ca, cert, key) = tls_material(ip).map_err(|e| TestbedError::Io {
                what: "the registry's TLS certificate".into(),
                source: std::io::Error::other(e),
            })?;
            let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
            fs::write(&cert_file, cert).map_err(io("the TLS certificate"))?;
            fs::write(&key_file, key).map_err(io("the TLS key"))?;
            text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert_file.display(),
                key_file.display()
            ));
            Some(ca)
        } else {
            None
        };
        if let Some((user, password)) = login {
            let mut cmd = Command::new("htpasswd");
            cmd.args(["-Bbn", user, password]).stdin(Stdio::null());
            let out = cmd.output().map_err(|source| TestbedError::Spawn {
                cmd: describe(&cmd),
                source,
            })?;
            let file = dir.path().join("htpasswd");
            fs::write(&file, &out.stdout).map_err(io("the htpasswd file"))?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                file.display()
            ));
        }
        fs::write(&config, text).map_err(io("the registry config"))?;
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(dir.path().join("registry.log"))
                    .map_err(io("the registry's log"))?,
            );
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            cmd: describe(&cmd),
            source,
        })?;
        let mut r = Registry {
            child,
            addr,
            login: login.map(|(u, p)| format!("{u}:{p}")),
            ca_pem,
            _dir: dir,
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while std::net::TcpStream::connect(&r.addr).is_err() {
            if Instant::now() >= deadline || !matches!(r.child.try_wait(), Ok(None)) {
                return Err(TestbedError::Timeout {
                    what: format!("docker-registry to listen on {}", r.addr),
                    secs: LISTEN_TIMEOUT.as_secs(),
                });
            }
            sleep(Duration::from_millis(50));
        }
        Ok(r)
    }

    /// Its `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many times it served the blob `digest` (GETs answered 200 or 206, from its log).
    pub fn blob_served(&self, digest: &str) -> usize {
        let log = fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default();
        let uri = format!("/blobs/{digest}");
        log.lines()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains("http.request.method=GET")
                    && l.contains(&uri)
                    && (l.contains("http.response.status=200")
                        || l.contains("http.response.status=206"))
            })
            .count()
    }

    /// `skopeo copy --all --preserve-digests` of an OCI layout's `latest` to `name` here.
    pub fn push(&self, layout: &Path, name: &str) -> Result<(), TestbedError> {
        let mut cmd = Command::new(SKOPEO_BIN);
        cmd.args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .stdin(Stdio::null());
        if let Some(creds) = &self.login {
            cmd.arg(format!("--dest-creds={creds}"));
        }
        cmd.arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{name}", self.addr));
        let out = cmd.output().map_err(|source| TestbedError::Spawn {
            cmd: describe(&cmd),
            source,
        })?;
        if !out.status.success() {
            return Err(TestbedError::Failed {
                cmd: describe(&cmd),
                status: out.status.to_string(),
                stderr: tail(&out.stderr),
            });
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds OCI layouts: blobs, single-platform images and indexes.
pub struct Layout<'a> {
    pub dir: &'a Path,
}

impl Layout<'_> {
    /// Stores `bytes` as a blob; its digest.
    pub fn blob(&self, bytes: &[u8]) -> String {
        let d = digest(bytes);
        let dir = self.dir.join("blobs/sha256");
        fs::create_dir_all(&dir).expect("layout dir");
        fs::write(dir.join(d.trim_start_matches("sha256:")), bytes).expect("blob");
        d
    }

    /// An image of one uncompressed layer (a tar) for linux/`arch` running `cmd`; its
    /// manifest's bytes.
    pub fn image(&self, layer: &[u8], arch: &str, cmd: &[&str]) -> Vec<u8> {
        let layer_digest = self.blob(layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))
        .expect("config");
        let config_digest = self.blob(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer.len()}],
        }))
        .expect("manifest");
        self.blob(&manifest);
        manifest
    }

    /// An index of `(manifest, arch)` entries; its bytes.
    pub fn index(&self, entries: &[(&[u8], &str)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(m, arch)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest(m), "size": m.len(),
                    "platform": {"os": "linux", "architecture": arch},
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("index");
        self.blob(&index);
        index
    }

    /// Names `top` (a manifest, or an index with `is_index`) `latest` in `index.json`.
    pub fn finish(&self, top: &[u8], is_index: bool) {
        let media_type = if is_index {
            "application/vnd.oci.image.index.v1+json"
        } else {
            "application/vnd.oci.image.manifest.v1+json"
        };
        fs::write(
            self.dir.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": media_type, "digest": digest(top), "size": top.len(),
                               "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
            }))
            .expect("index.json"),
        )
        .expect("index.json");
    }
}

/// A registry scripted by the test, on 127.0.0.1: each request answered by `route` (its path
/// and its whole head, headers included → raw HTTP response bytes), one connection at a time,
/// for at most 500 connections or until the test process ends. For registries that lie,
/// break off or stall, which a real one does not do on request.
pub fn scripted_registry(route: impl Fn(&str, &str) -> Vec<u8> + Send + 'static) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = l.local_addr().expect("local address").to_string();
    std::thread::spawn(move || {
        for mut c in l.incoming().take(500).flatten() {
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let _ = c.write_all(&route(&path, &head));
        }
    });
    addr
}

/// A raw HTTP/1.1 response that closes its connection.
pub fn http(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A CA and a server certificate (and key) for `ip` it issued, all PEM.
fn tls_material(ip: &str) -> Result<(String, String, String), rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress(
        ip.parse()
            .map_err(|_| rcgen::Error::InvalidIpAddressOctetLength(0))?,
    )];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}
