//! Fixtures for the image store tests: tar archives built header by header (so hostile names
//! and links the `tar` builder would refuse can be written), docker-save archives, OCI layouts.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One tar member.
pub enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Owned(&'a str, &'a [u8], u32, u64, u64),
}

fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    // Write the raw name: `set_path` would refuse `..` and absolute names.
    let bytes = name.as_bytes();
    assert!(bytes.len() < 100, "fixture names stay short");
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn with_link(mut h: tar::Header, target: &str) -> tar::Header {
    let bytes = target.as_bytes();
    assert!(bytes.len() < 100);
    h.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
    h
}

/// A tar stream of `entries`, in order.
pub fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (mut h, data): (tar::Header, &[u8]) = match e {
            E::File(n, d, m) => (header(n, tar::EntryType::Regular, d.len() as u64, *m), d),
            E::Owned(n, d, m, uid, gid) => {
                let mut h = header(n, tar::EntryType::Regular, d.len() as u64, *m);
                h.set_uid(*uid);
                h.set_gid(*gid);
                (h, d)
            }
            E::Dir(n) => (header(n, tar::EntryType::Directory, 0, 0o755), &[]),
            E::Symlink(n, t) => (
                with_link(header(n, tar::EntryType::Symlink, 0, 0o777), t),
                &[],
            ),
            E::Hardlink(n, t) => (with_link(header(n, tar::EntryType::Link, 0, 0o644), t), &[]),
            E::Char(n, maj, min) => {
                let mut h = header(n, tar::EntryType::Char, 0, 0o666);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                (h, &[])
            }
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// gzip `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// zstd `data` (level 3).
pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn hexof(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// An image config for layers whose uncompressed tars are `uncompressed`.
pub fn config_json(uncompressed: &[&[u8]], cmd: &[&str]) -> Vec<u8> {
    let diff_ids: Vec<String> = uncompressed.iter().map(|l| sha(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2024-05-06T07:08:09Z",
        "config": { "Env": ["PATH=/bin", "HELLO=world"], "Cmd": cmd, "WorkingDir": "/w" },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap()
}

/// A legacy `docker save` archive: manifest.json, `<id>.json`, `<n>/layer.tar`.
/// `layers` are (uncompressed tar, stored bytes) pairs; the stored bytes may be gzip.
pub fn docker_save(layers: &[(Vec<u8>, Vec<u8>)], tags: &[&str]) -> Vec<u8> {
    let uncompressed: Vec<&[u8]> = layers.iter().map(|(u, _)| u.as_slice()).collect();
    docker_save_with_config(layers, tags, &config_json(&uncompressed, &["/bin/sh"]))
}

pub fn docker_save_with_config(
    layers: &[(Vec<u8>, Vec<u8>)],
    tags: &[&str],
    config: &[u8],
) -> Vec<u8> {
    let config_name = format!("{}.json", hexof(config));
    let layer_names: Vec<String> = (0..layers.len())
        .map(|i| format!("layer{i}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": tags, "Layers": layer_names,
    }]))
    .unwrap();
    let mut files: Vec<(String, Vec<u8>)> = vec![(config_name, config.to_vec())];
    for (i, (_, stored)) in layers.iter().enumerate() {
        files.push((layer_names[i].clone(), stored.clone()));
    }
    files.push(("manifest.json".into(), manifest));
    let entries: Vec<E<'_>> = files.iter().map(|(n, d)| E::File(n, d, 0o644)).collect();
    tar(&entries)
}

/// An OCI layout in `dir` with one image of `layers` (stored bytes, uncompressed) tagged `tag`.
/// `tamper` may change the blob map before it is written (name = hex).
pub fn oci_layout(
    dir: &Path,
    layers: &[(Vec<u8>, Vec<u8>)],
    tag: &str,
    tamper: impl FnOnce(&mut BTreeMap<String, Vec<u8>>, &[String]),
) -> PathBuf {
    let uncompressed: Vec<&[u8]> = layers.iter().map(|(u, _)| u.as_slice()).collect();
    let config = config_json(&uncompressed, &["/bin/sh"]);
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut layer_descs = Vec::new();
    let mut layer_hexes = Vec::new();
    for (u, stored) in layers {
        let mt = if stored == u {
            "application/vnd.oci.image.layer.v1.tar"
        } else if stored.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        } else {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        };
        layer_descs.push(
            serde_json::json!({"mediaType": mt, "digest": sha(stored), "size": stored.len()}),
        );
        layer_hexes.push(hexof(stored));
        blobs.insert(hexof(stored), stored.clone());
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))
    .unwrap();
    blobs.insert(hexof(&config), config);
    blobs.insert(hexof(&manifest), manifest);
    tamper(&mut blobs, &layer_hexes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    for (h, d) in &blobs {
        std::fs::write(dir.join("blobs/sha256").join(h), d).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dir.join("index.json"), index).unwrap();
    dir.to_path_buf()
}

/// A tar of the directory tree at `dir` (for OCI layout archives).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

/// A busybox rootfs tar like /work/shared/peers/busybox-rootfs.sh makes.
pub fn busybox_rootfs_tar() -> Vec<u8> {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static) is installed");
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .unwrap();
    for applet in ["sh", "ls", "cat", "echo", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    for (name, content) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, name, content.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// Every path under `root` with its size and (for files) content hash, for "unchanged" checks.
/// Lock files are left out: opening the store makes them.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if p.extension().is_some_and(|x| x == "lock") {
                continue;
            }
            let desc = if meta.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if meta.is_file() {
                sha(&std::fs::read(&p).unwrap())
            } else {
                format!("{:?}", meta.file_type())
            };
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), desc);
        }
    }
    out
}
