//! Property tests ("fuzz targets" on stable Rust) for everything the image store reads from
//! outside: layer tars (plain and gzip; hostile names, links, whiteouts, huge headers,
//! truncated streams), OCI manifests/indexes/configs and `docker save` manifests (valid
//! documents mutated), and whole archives with random byte damage.
//!
//! The property, for every input: `load` (or `import_rootfs_tar`) either succeeds or returns an
//! `ImageError` — it never panics; nothing outside the data dir changes; a refused load leaves
//! the store's files and listing exactly as they were; no half-unpacked layer is left behind.
//!
//! Cases per target: [`CASES`], or `PROPTEST_CASES` for a longer local run
//! (`PROPTEST_CASES=5000 cargo nextest run -p shoal-runtime -E 'test(/^image_fuzz::/)'`).

use crate::image_support;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use image_support::{gzip, sha, snapshot};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use shoal_runtime::image::ImageStore;

/// Cases per target in CI; each case unpacks into a real store (syncfs included), so this
/// keeps every target well under the CI budget.
const CASES: u32 = 48;
/// Most tar members one generated layer has.
const MAX_ENTRIES: usize = 12;
/// Largest file body a generated member carries.
const MAX_BODY: usize = 600;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        // Shrinking replays whole loads; a few hundred steps find a small case in seconds.
        max_shrink_iters: 256,
        failure_persistence: None,
        ..Config::default()
    })
}

// ---------------------------------------------------------------- generated tar members

/// One tar member as a hostile layer might hold it.
#[derive(Debug, Clone)]
enum Member {
    File {
        name: String,
        body: Vec<u8>,
        mode: u32,
    },
    Dir {
        name: String,
    },
    Symlink {
        name: String,
        target: String,
    },
    Hardlink {
        name: String,
        target: String,
    },
    Char {
        name: String,
        major: u32,
        minor: u32,
    },
    Fifo {
        name: String,
    },
    /// A header whose size claims far more than follows (the stream ends early).
    Huge {
        name: String,
        claimed: u64,
    },
    /// Odd numeric fields: huge uid/gid/mtime, setuid/sticky modes.
    Odd {
        name: String,
        uid: u64,
        gid: u64,
        mtime: u64,
        mode: u32,
    },
    /// A pax extended header (path override, xattrs) before a file.
    Pax {
        name: String,
        key: String,
        value: Vec<u8>,
    },
    /// 512 arbitrary bytes where a header should be.
    Raw(Vec<u8>),
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "dir", "bin", "etc", "f.txt"]).prop_map(String::from),
        2 => prop::sample::select(vec![
            "..", ".", "", ".wh.a", ".wh.dir", ".wh..wh..opq", ".wh.", ".wh..", "\\", "ü", " ",
            "sentinel", "proc", "dev",
        ]).prop_map(String::from),
        1 => Just("x".repeat(255)),
        1 => Just("y".repeat(256)),
        1 => "[\\x01-\\x7f]{1,8}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["", "", "", "/", "./", "../", "//"]),
        prop::collection::vec(component(), 1..5),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(lead, parts, slash)| {
            let mut p = format!("{lead}{}", parts.join("/"));
            if slash {
                p.push('/');
            }
            p
        })
}

fn link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => path(),
        2 => prop::sample::select(vec![
            "../../../../sentinel/secret", "../../../../sentinel", "/etc/passwd", "/",
            "..", "../..", "a/../../..", "/proc/self/root", "ok/file", "a",
        ]).prop_map(String::from),
    ]
}

fn member() -> impl Strategy<Value = Member> {
    prop_oneof![
        4 => (path(), prop::collection::vec(any::<u8>(), 0..MAX_BODY), prop::sample::select(vec![0o644u32, 0o755, 0o4755, 0o7777, 0, 0o1000]))
            .prop_map(|(name, body, mode)| Member::File { name, body, mode }),
        2 => path().prop_map(|name| Member::Dir { name }),
        2 => (path(), link_target()).prop_map(|(name, target)| Member::Symlink { name, target }),
        2 => (path(), link_target()).prop_map(|(name, target)| Member::Hardlink { name, target }),
        1 => (path(), 0u32..300, 0u32..300).prop_map(|(name, major, minor)| Member::Char { name, major, minor }),
        1 => path().prop_map(|name| Member::Fifo { name }),
        1 => (path(), prop::sample::select(vec![1u64 << 20, 1 << 33, u64::MAX >> 2, 513]))
            .prop_map(|(name, claimed)| Member::Huge { name, claimed }),
        1 => (path(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(name, uid, gid, mtime, mode)| Member::Odd { name, uid, gid, mtime, mode }),
        1 => (path(), prop::sample::select(vec![
                "path", "linkpath", "size", "uid", "SCHILY.xattr.trusted.overlay.opaque",
                "SCHILY.xattr.user.x", "SCHILY.xattr.security.capability", "GNU.sparse.map", "mtime",
            ]).prop_map(String::from), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(name, key, value)| Member::Pax { name, key, value }),
        1 => prop::collection::vec(any::<u8>(), 512).prop_map(Member::Raw),
    ]
}

/// A header with `name` (GNU long-name member first if it does not fit) and `link`.
fn push_header(out: &mut Vec<u8>, name: &str, link: Option<&str>, mut h: tar::Header) {
    for (value, kind, field) in [
        (Some(name), tar::EntryType::GNULongName, 0),
        (link, tar::EntryType::GNULongLink, 1),
    ] {
        let Some(value) = value else { continue };
        let bytes = value.as_bytes();
        let cap = h.as_old().name.len();
        let slot = if field == 0 {
            &mut h.as_old_mut().name
        } else {
            &mut h.as_old_mut().linkname
        };
        if bytes.len() < cap {
            slot[..bytes.len()].copy_from_slice(bytes);
        } else {
            let mut long = tar::Header::new_gnu();
            long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
            long.set_entry_type(kind);
            long.set_size(bytes.len() as u64 + 1);
            long.set_mode(0o644);
            long.set_cksum();
            out.extend_from_slice(long.as_bytes());
            let mut body = bytes.to_vec();
            body.push(0);
            push_body(out, &body);
            slot.copy_from_slice(&bytes[..cap]);
        }
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
}

fn push_body(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(body);
    let pad = (512 - body.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn base_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// The raw tar stream of `members`; `end` false leaves off the two zero blocks.
fn layer_tar(members: &[Member], end: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        match m {
            Member::File { name, body, mode } => {
                let h = base_header(tar::EntryType::Regular, body.len() as u64, *mode);
                push_header(&mut out, name, None, h);
                push_body(&mut out, body);
            }
            Member::Dir { name } => push_header(
                &mut out,
                name,
                None,
                base_header(tar::EntryType::Directory, 0, 0o755),
            ),
            Member::Symlink { name, target } => push_header(
                &mut out,
                name,
                Some(target),
                base_header(tar::EntryType::Symlink, 0, 0o777),
            ),
            Member::Hardlink { name, target } => push_header(
                &mut out,
                name,
                Some(target),
                base_header(tar::EntryType::Link, 0, 0o644),
            ),
            Member::Char { name, major, minor } => {
                let mut h = base_header(tar::EntryType::Char, 0, 0o666);
                let _ = h.set_device_major(*major);
                let _ = h.set_device_minor(*minor);
                push_header(&mut out, name, None, h);
            }
            Member::Fifo { name } => push_header(
                &mut out,
                name,
                None,
                base_header(tar::EntryType::Fifo, 0, 0o644),
            ),
            Member::Huge { name, claimed } => {
                push_header(
                    &mut out,
                    name,
                    None,
                    base_header(tar::EntryType::Regular, *claimed, 0o644),
                );
                out.extend_from_slice(&[b'z'; 100]);
            }
            Member::Odd {
                name,
                uid,
                gid,
                mtime,
                mode,
            } => {
                let mut h = base_header(tar::EntryType::Regular, 3, *mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_mtime(*mtime);
                push_header(&mut out, name, None, h);
                push_body(&mut out, b"odd");
            }
            Member::Pax { name, key, value } => {
                let mut rec = Vec::new();
                let tail = [b" ".as_slice(), key.as_bytes(), b"=", value, b"\n"].concat();
                // A pax record starts with its own decimal length, which counts itself.
                let mut len = tail.len() + 1;
                while format!("{len}").len() + tail.len() != len {
                    len = format!("{len}").len() + tail.len();
                }
                rec.extend_from_slice(format!("{len}").as_bytes());
                rec.extend_from_slice(&tail);
                let h = base_header(tar::EntryType::XHeader, rec.len() as u64, 0o644);
                push_header(&mut out, "pax", None, h);
                push_body(&mut out, &rec);
                let h = base_header(tar::EntryType::Regular, 2, 0o644);
                push_header(&mut out, name, None, h);
                push_body(&mut out, b"px");
            }
            Member::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }
    if end {
        out.extend_from_slice(&[0u8; 1024]);
    }
    out
}

/// A generated layer: its members, whether the stream is gzipped, ended, cut short.
#[derive(Debug, Clone)]
struct LayerCase {
    members: Vec<Member>,
    gz: bool,
    end: bool,
    /// Keep only this fraction (per mille) of the stored bytes.
    cut: Option<u16>,
}

impl LayerCase {
    /// (uncompressed tar, stored bytes).
    fn build(&self) -> (Vec<u8>, Vec<u8>) {
        let mut members = vec![
            Member::Dir { name: "ok/".into() },
            Member::File {
                name: "ok/file".into(),
                body: b"fine".to_vec(),
                mode: 0o644,
            },
        ];
        members.extend(self.members.iter().cloned());
        let raw = layer_tar(&members, self.end);
        let mut stored = if self.gz { gzip(&raw) } else { raw.clone() };
        if let Some(cut) = self.cut {
            stored.truncate(stored.len() * usize::from(cut) / 1000);
        }
        (raw, stored)
    }
}

/// A name a legitimate layer might hold: no `..`, no absolute path, odd but valid.
fn tame_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "b",
            "dir",
            "etc",
            ".wh.a",
            ".wh.b",
            ".wh..wh..opq",
            "ü",
            "sp ace",
            ".hidden",
        ]),
        1..4,
    )
    .prop_map(|parts| parts.join("/"))
}

/// Members of a legitimate-looking layer: whiteouts, links that stay inside, odd modes.
fn tame_member() -> impl Strategy<Value = Member> {
    prop_oneof![
        4 => (tame_path(), prop::collection::vec(any::<u8>(), 0..MAX_BODY), prop::sample::select(vec![0o644u32, 0o755, 0o4755, 0o600, 0o1777]))
            .prop_map(|(name, body, mode)| Member::File { name, body, mode }),
        3 => tame_path().prop_map(|name| Member::Dir { name }),
        2 => (tame_path(), prop::sample::select(vec!["a", "b", "../a", "dir/b", "/etc/passwd", "ü"]))
            .prop_map(|(name, t)| Member::Symlink { name, target: t.to_string() }),
        2 => (tame_path(), tame_path()).prop_map(|(name, target)| Member::Hardlink { name, target }),
        1 => tame_path().prop_map(|name| Member::Fifo { name }),
        1 => (tame_path(), prop::sample::select(vec!["SCHILY.xattr.user.x", "mtime", "uid"]).prop_map(String::from), prop::collection::vec(b'0'..=b'9', 1..6))
            .prop_map(|(name, key, value)| Member::Pax { name, key, value }),
    ]
}

fn layer_case() -> impl Strategy<Value = LayerCase> {
    (
        prop_oneof![
            prop::collection::vec(member(), 0..MAX_ENTRIES),
            prop::collection::vec(tame_member(), 0..MAX_ENTRIES),
        ],
        any::<bool>(),
        prop::bool::weighted(0.9),
        prop::option::weighted(0.15, 0u16..1000),
    )
        .prop_map(|(members, gz, end, cut)| LayerCase {
            members,
            gz,
            end,
            cut,
        })
}

// ---------------------------------------------------------------- JSON mutation

/// A JSON value an attacker might put anywhere.
fn odd_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![
            json!(u64::MAX),
            json!(i64::MIN),
            json!(-1),
            json!(0),
            json!(1e308),
            json!(-0.5),
            json!(4294967296u64),
            json!(127),
            json!(128),
        ]),
        prop::sample::select(vec![
            "",
            "sha256:",
            "sha256:../../../../sentinel",
            "sha256:zz",
            "../../etc/passwd",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "linux",
            "amd64",
            "/abs",
            "a\u{0}b",
            "\u{202e}rtl",
            "busybox:latest",
            "UPPER:tag",
            "x:y:z@sha256:00",
        ])
        .prop_map(|s| Value::String(s.to_string())),
        "\\PC{0,20}".prop_map(Value::String),
        Just(Value::String("a".repeat(70_000))),
        Just(json!(format!("sha256:{}", "0".repeat(64)))),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z.]{0,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One edit at a path chosen by `selectors` (each picks a child by index modulo its length).
#[derive(Debug, Clone)]
enum Edit {
    Replace(Vec<u32>, Value),
    Remove(Vec<u32>),
    Insert(Vec<u32>, String, Value),
    /// Wrap the chosen value `depth` times in arrays (recursion limits).
    Nest(Vec<u32>, u16),
}

fn edit() -> impl Strategy<Value = Edit> {
    let sel = || prop::collection::vec(any::<u32>(), 0..5);
    prop_oneof![
        4 => (sel(), odd_json()).prop_map(|(s, v)| Edit::Replace(s, v)),
        2 => sel().prop_map(Edit::Remove),
        2 => (sel(), prop::sample::select(vec![
                "mediaType", "digest", "size", "manifests", "layers", "config", "rootfs",
                "diff_ids", "platform", "annotations", "Layers", "Config", "RepoTags", "urls",
            ]).prop_map(String::from), odd_json())
            .prop_map(|(s, k, v)| Edit::Insert(s, k, v)),
        1 => (sel(), 100u16..300).prop_map(|(s, d)| Edit::Nest(s, d)),
    ]
}

fn pick<'a>(v: &'a mut Value, sel: &[u32]) -> &'a mut Value {
    let Some((first, rest)) = sel.split_first() else {
        return v;
    };
    let len = match v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if len == 0 {
        return v;
    }
    let i = *first as usize % len;
    // Re-borrow per arm so the early returns above do not hold `v`.
    match v {
        Value::Array(a) => pick(&mut a[i], rest),
        Value::Object(o) => match o.values_mut().nth(i) {
            Some(child) => pick(child, rest),
            None => unreachable!("index is below the length"),
        },
        _ => unreachable!("only containers have children"),
    }
}

fn apply(doc: &mut Value, e: &Edit) {
    match e {
        Edit::Replace(sel, v) => *pick(doc, sel) = v.clone(),
        Edit::Remove(sel) => {
            let (last, parent) = match sel.split_last() {
                Some((l, p)) => (*l, p),
                None => return,
            };
            match pick(doc, parent) {
                Value::Array(a) if !a.is_empty() => {
                    let i = last as usize % a.len();
                    a.remove(i);
                }
                Value::Object(o) if !o.is_empty() => {
                    let key = o.keys().nth(last as usize % o.len()).cloned();
                    if let Some(k) = key {
                        o.remove(&k);
                    }
                }
                _ => {}
            }
        }
        Edit::Insert(sel, k, v) => {
            if let Value::Object(o) = pick(doc, sel) {
                o.insert(k.clone(), v.clone());
            }
        }
        Edit::Nest(sel, depth) => {
            let slot = pick(doc, sel);
            let mut v = slot.take();
            for _ in 0..*depth {
                v = Value::Array(vec![v]);
            }
            *slot = v;
        }
    }
}

/// Edits for each document of an image: index (or docker `manifest.json`), manifest, config.
#[derive(Debug, Clone, Default)]
struct DocEdits {
    index: Vec<Edit>,
    manifest: Vec<Edit>,
    config: Vec<Edit>,
}

fn doc_edits() -> impl Strategy<Value = DocEdits> {
    let few = || prop::collection::vec(edit(), 0..3);
    (few(), few(), few()).prop_map(|(index, manifest, config)| DocEdits {
        index,
        manifest,
        config,
    })
}

fn hexof(d: &[u8]) -> String {
    sha(d).trim_start_matches("sha256:").to_string()
}

fn config_doc(uncompressed: &[Vec<u8>]) -> Value {
    let diff_ids: Vec<String> = uncompressed.iter().map(|l| sha(l)).collect();
    json!({
        "architecture": "amd64", "os": "linux", "created": "2024-05-06T07:08:09Z",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/w", "User": "0:0" },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created_by": "fuzz" }],
    })
}

fn to_bytes(v: &Value) -> Vec<u8> {
    // Deeply nested values are fine to serialise; only parsing has a recursion limit.
    serde_json::to_vec(v).unwrap_or_else(|_| b"{".to_vec())
}

/// A plain tar (no hostile names) of `files`, as the outer archive.
fn outer_tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, body) in files {
        let h = base_header(tar::EntryType::Regular, body.len() as u64, 0o644);
        push_header(&mut out, name, None, h);
        push_body(&mut out, body);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A `docker save` archive of `layers` with the documents edited; digests follow the edits.
fn docker_save(layers: &[(Vec<u8>, Vec<u8>)], tag: &str, edits: &DocEdits) -> Vec<u8> {
    let raw: Vec<Vec<u8>> = layers.iter().map(|(u, _)| u.clone()).collect();
    let mut config = config_doc(&raw);
    edits.config.iter().for_each(|e| apply(&mut config, e));
    let config = to_bytes(&config);
    let config_name = format!("{}.json", hexof(&config));
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let mut manifest = json!([{ "Config": config_name, "RepoTags": [tag], "Layers": names }]);
    edits.index.iter().for_each(|e| apply(&mut manifest, e));
    let mut files = vec![(config_name, config)];
    for (i, (_, stored)) in layers.iter().enumerate() {
        files.push((names[i].clone(), stored.clone()));
    }
    files.push(("manifest.json".into(), to_bytes(&manifest)));
    outer_tar(&files)
}

/// An OCI layout archive of `layers` with the documents edited; digests follow the edits.
fn oci_archive(
    layers: &[(Vec<u8>, Vec<u8>)],
    tag: &str,
    edits: &DocEdits,
    nested: bool,
) -> Vec<u8> {
    let raw: Vec<Vec<u8>> = layers.iter().map(|(u, _)| u.clone()).collect();
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut config = config_doc(&raw);
    edits.config.iter().for_each(|e| apply(&mut config, e));
    let config = to_bytes(&config);
    let mut descs = Vec::new();
    for (u, stored) in layers {
        let mt = if stored.starts_with(&[0x1f, 0x8b]) || u != stored && stored.len() < u.len() / 2 {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        descs.push(json!({"mediaType": mt, "digest": sha(stored), "size": stored.len()}));
        blobs.insert(hexof(stored), stored.clone());
    }
    let mut manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": descs,
    });
    edits.manifest.iter().for_each(|e| apply(&mut manifest, e));
    let manifest = to_bytes(&manifest);
    blobs.insert(hexof(&config), config);
    let mut top = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(&manifest), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    });
    blobs.insert(hexof(&manifest), manifest);
    if nested {
        let mut platform = top.clone();
        platform["platform"] = json!({"architecture": "amd64", "os": "linux"});
        let inner = to_bytes(&json!({"schemaVersion": 2, "manifests": [platform]}));
        top = json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": sha(&inner), "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        });
        blobs.insert(hexof(&inner), inner);
    }
    let mut index = json!({"schemaVersion": 2, "manifests": [top]});
    edits.index.iter().for_each(|e| apply(&mut index, e));
    let mut files = vec![
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".to_string(), to_bytes(&index)),
    ];
    for (h, d) in blobs {
        files.push((format!("blobs/sha256/{h}"), d));
    }
    outer_tar(&files)
}

// ---------------------------------------------------------------- the world and the property

struct World {
    _base: tempfile::TempDir,
    base: PathBuf,
    data: PathBuf,
    sentinel: PathBuf,
    store: ImageStore,
    n: std::cell::Cell<u32>,
    /// Inputs accepted, for the summary a run prints (a target that never accepts anything
    /// only tests the first check that fails).
    accepted: std::cell::Cell<u32>,
}

fn world() -> World {
    let base_dir = tempfile::tempdir().expect("tempdir");
    let base = base_dir.path().to_path_buf();
    let data = base.join("data");
    let sentinel = base.join("sentinel");
    std::fs::create_dir_all(&sentinel).expect("sentinel dir");
    std::fs::write(sentinel.join("secret"), b"do not touch").expect("sentinel file");
    let store = ImageStore::open(&data).expect("open store");
    let good = layer_tar(
        &[
            Member::Dir { name: "ok/".into() },
            Member::File {
                name: "ok/file".into(),
                body: b"fine".to_vec(),
                mode: 0o644,
            },
        ],
        true,
    );
    let archive = base.join("good.tar");
    std::fs::write(
        &archive,
        docker_save(&[(good.clone(), good)], "good:1", &DocEdits::default()),
    )
    .expect("write good archive");
    store.load(&archive).expect("load good image");
    World {
        _base: base_dir,
        base,
        data,
        sentinel,
        store,
        n: std::cell::Cell::new(0),
        accepted: std::cell::Cell::new(0),
    }
}

impl Drop for World {
    fn drop(&mut self) {
        eprintln!("{} inputs, {} accepted", self.n.get(), self.accepted.get());
    }
}

/// Everything under the base dir except the store and the input archives.
fn outside(w: &World) -> BTreeMap<PathBuf, String> {
    snapshot(&w.base)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("data") && !p.to_string_lossy().starts_with("in-"))
        .collect()
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

/// No temp dirs, every layer dir complete.
fn no_partial_layers(w: &World) -> Result<(), TestCaseError> {
    for e in std::fs::read_dir(w.data.join("layers")).expect("read layers") {
        let e = e.expect("layers entry");
        let name = e.file_name().to_string_lossy().into_owned();
        ensure(!name.starts_with(".tmp-"), || {
            format!("temp layer dir left: {name}")
        })?;
        ensure(e.path().join("complete").is_file(), || {
            format!("layer {name} has no complete marker")
        })?;
    }
    let tmp = w.data.join("images/.shoal/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("read tmp").collect();
    ensure(left.is_empty(), || {
        format!("staging left in {}: {left:?}", tmp.display())
    })
}

/// Run one input through `op` and check the property.
fn check(
    w: &World,
    bytes: &[u8],
    op: impl FnOnce(&ImageStore, &Path) -> Result<(), shoal_runtime::image::ImageError>,
) -> Result<(), TestCaseError> {
    let n = w.n.get();
    w.n.set(n + 1);
    let archive = w.base.join(format!("in-{n}.tar"));
    std::fs::write(&archive, bytes).expect("write archive");
    let before_store = snapshot(&w.data);
    let before_list = w.store.list().expect("list before");
    let before_outside = outside(w);
    let result = op(&w.store, &archive);
    if result.is_ok() {
        w.accepted.set(w.accepted.get() + 1);
    }
    std::fs::remove_file(&archive).expect("remove archive");
    ensure(outside(w) == before_outside, || {
        format!("files outside the store changed ({result:?})")
    })?;
    ensure(
        std::fs::read(w.sentinel.join("secret")).expect("read secret") == b"do not touch"
            && std::fs::metadata(w.sentinel.join("secret"))
                .expect("stat secret")
                .nlink()
                == 1,
        || "sentinel secret touched".into(),
    )?;
    no_partial_layers(w)?;
    let after_list = w.store.list();
    ensure(after_list.is_ok(), || {
        format!("store unreadable after load: {after_list:?}")
    })?;
    match result {
        Err(e) => {
            ensure(!e.to_string().is_empty(), || "empty error message".into())?;
            ensure(snapshot(&w.data) == before_store, || {
                format!("store files changed after refusing: {e}")
            })?;
            let after: Vec<_> = after_list
                .unwrap_or_default()
                .into_iter()
                .map(|i| (i.id, i.repo_tags))
                .collect();
            let before: Vec<_> = before_list
                .into_iter()
                .map(|i| (i.id, i.repo_tags))
                .collect();
            ensure(after == before, || {
                format!("listing changed after refusing: {e}")
            })?;
        }
        Ok(()) => {
            // An accepted image must be usable: every layer unpacks (or is already unpacked).
            for info in after_list.unwrap_or_default() {
                if let Err(e) = w.store.prepare(&info.id) {
                    let all = w.store.list().unwrap_or_default();
                    return Err(TestCaseError::fail(format!(
                        "accepted image {} does not prepare: {e}; store: {all:#?}",
                        info.id
                    )));
                }
            }
            no_partial_layers(w)?;
        }
    }
    Ok(())
}

fn load(s: &ImageStore, p: &Path) -> Result<(), shoal_runtime::image::ImageError> {
    s.load(p).map(|_| ())
}

#[test]
fn hostile_layers_in_docker_save_archives() {
    let w = world();
    runner()
        .run(&prop::collection::vec(layer_case(), 1..3), |layers| {
            let built: Vec<_> = layers.iter().map(LayerCase::build).collect();
            check(
                &w,
                &docker_save(&built, "fuzz:1", &DocEdits::default()),
                load,
            )
        })
        .unwrap();
}

#[test]
fn hostile_layers_in_oci_layouts() {
    let w = world();
    runner()
        .run(
            &(prop::collection::vec(layer_case(), 1..3), any::<bool>()),
            |(layers, nested)| {
                let built: Vec<_> = layers.iter().map(LayerCase::build).collect();
                check(
                    &w,
                    &oci_archive(&built, "fuzz:2", &DocEdits::default(), nested),
                    load,
                )
            },
        )
        .unwrap();
}

#[test]
fn hostile_rootfs_imports() {
    let w = world();
    runner()
        .run(&layer_case(), |layer| {
            let (_, stored) = layer.build();
            check(&w, &stored, |s, p| {
                s.import_rootfs_tar(p, "fuzz:3").map(|_| ())
            })
        })
        .unwrap();
}

#[test]
fn mutated_image_documents() {
    let w = world();
    let small = layer_tar(
        &[Member::File {
            name: "m".into(),
            body: b"m".to_vec(),
            mode: 0o644,
        }],
        true,
    );
    runner()
        .run(
            &(doc_edits(), any::<bool>(), any::<bool>(), any::<bool>()),
            |(edits, oci, nested, gz)| {
                let stored = if gz { gzip(&small) } else { small.clone() };
                let layers = [(small.clone(), stored)];
                let bytes = if oci {
                    oci_archive(&layers, "fuzz:4", &edits, nested)
                } else {
                    docker_save(&layers, "fuzz:4", &edits)
                };
                check(&w, &bytes, load)
            },
        )
        .unwrap();
}

/// Byte-level damage to a valid archive: flips, overwrites, cuts, insertions.
#[derive(Debug, Clone)]
enum Damage {
    Flip(u32, u8),
    Set(u32, u8),
    Cut(u32),
    Insert(u32, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<u32>(), 1u8..=255).prop_map(|(i, b)| Damage::Flip(i, b)),
        2 => (any::<u32>(), prop::sample::select(vec![0u8, b'/', b'.', 0xff, b'7', b'0', b' '])).prop_map(|(i, b)| Damage::Set(i, b)),
        1 => any::<u32>().prop_map(Damage::Cut),
        1 => (any::<u32>(), prop::collection::vec(any::<u8>(), 1..600)).prop_map(|(i, b)| Damage::Insert(i, b)),
    ]
}

fn damaged(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        if bytes.is_empty() {
            break;
        }
        let at = |i: &u32| *i as usize % bytes.len();
        match d {
            Damage::Flip(i, b) => {
                let i = at(i);
                bytes[i] ^= b;
            }
            Damage::Set(i, b) => {
                let i = at(i);
                bytes[i] = *b;
            }
            Damage::Cut(i) => {
                let i = at(i);
                bytes.truncate(i);
            }
            Damage::Insert(i, b) => {
                let i = at(i);
                bytes.splice(i..i, b.iter().copied());
            }
        }
    }
    bytes
}

#[test]
fn damaged_archives() {
    let w = world();
    let layer = layer_tar(
        &[
            Member::Dir { name: "d/".into() },
            Member::File {
                name: "d/f".into(),
                body: b"body".to_vec(),
                mode: 0o644,
            },
            Member::Symlink {
                name: "d/l".into(),
                target: "f".into(),
            },
            Member::Hardlink {
                name: "d/h".into(),
                target: "d/f".into(),
            },
            Member::File {
                name: "d/.wh.gone".into(),
                body: Vec::new(),
                mode: 0o644,
            },
        ],
        true,
    );
    let gz = gzip(&layer);
    let docker_plain = docker_save(
        &[(layer.clone(), layer.clone())],
        "fuzz:5",
        &DocEdits::default(),
    );
    let docker_gz = docker_save(
        &[(layer.clone(), gz.clone())],
        "fuzz:5",
        &DocEdits::default(),
    );
    let oci = oci_archive(&[(layer.clone(), gz)], "fuzz:5", &DocEdits::default(), true);
    let mut outer_gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    outer_gz.write_all(&docker_plain).expect("gzip");
    let outer_gz = outer_gz.finish().expect("gzip");
    let inputs = [docker_plain, docker_gz, oci, outer_gz];
    runner()
        .run(
            &(0..inputs.len(), prop::collection::vec(damage(), 1..4)),
            |(which, dmg)| check(&w, &damaged(inputs[which].clone(), &dmg), load),
        )
        .unwrap();
}
