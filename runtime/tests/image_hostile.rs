//! Hostile layers and corrupt images are refused with an error naming the problem, write
//! nothing outside the store, and leave the store exactly as it was.

use crate::image_support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use image_support::{docker_save, gzip, oci_layout, snapshot, tar, E};
use shoal_runtime::image::{
    ImageError, ImageStore, UnpackBudget, IMAGE_BUDGET_ENV, LAYER_BUDGET_ENV,
};

struct World {
    _base: tempfile::TempDir,
    base: PathBuf,
    data: PathBuf,
    sentinel: PathBuf,
    store: ImageStore,
}

fn world() -> World {
    let base_dir = tempfile::tempdir().unwrap();
    let base = base_dir.path().to_path_buf();
    let data = base.join("data");
    let sentinel = base.join("sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("secret"), b"do not touch").unwrap();
    let store = ImageStore::open(&data).unwrap();
    // A good image first, so "unchanged" covers an index with content in it.
    let good = tar(&[E::Dir("ok/"), E::File("ok/file", b"fine", 0o644)]);
    let archive = base.join("good.tar");
    std::fs::write(&archive, docker_save(&[(good.clone(), good)], &["good:1"])).unwrap();
    store.load(&archive).unwrap();
    World {
        _base: base_dir,
        base,
        data,
        sentinel,
        store,
    }
}

impl World {
    /// Load `archive_bytes`, expect an error, and check nothing changed anywhere.
    fn refuse(&self, name: &str, archive_bytes: Vec<u8>) -> ImageError {
        let archive = self.base.join(format!("{name}.tar"));
        std::fs::write(&archive, archive_bytes).unwrap();
        self.refuse_path(&archive)
    }

    fn refuse_path(&self, path: &Path) -> ImageError {
        let before_store = snapshot(&self.data);
        let before_sentinel = snapshot(&self.sentinel);
        let err = self
            .store
            .load(path)
            .expect_err("hostile input was accepted");
        eprintln!("refused: {err}");
        assert_eq!(
            snapshot(&self.data),
            before_store,
            "store changed after refusing: {err}"
        );
        assert_eq!(
            snapshot(&self.sentinel),
            before_sentinel,
            "sentinel dir changed: {err}"
        );
        assert_eq!(
            std::fs::metadata(self.sentinel.join("secret"))
                .unwrap()
                .nlink(),
            1,
            "secret was hardlinked"
        );
        assert_eq!(
            std::fs::read(self.sentinel.join("secret")).unwrap(),
            b"do not touch"
        );
        let tags: Vec<String> = self
            .store
            .list()
            .unwrap()
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect();
        assert_eq!(tags, vec!["good:1".to_string()]);
        err
    }

    /// Relative path from a layer's rootfs (`data/layers/.tmp-X/rootfs`) to the sentinel.
    fn up_to_sentinel(&self) -> String {
        "../../../../sentinel".to_string()
    }
}

fn layer_archive(entries: &[E<'_>]) -> Vec<u8> {
    let base = tar(&[E::File("base.txt", b"base", 0o644)]);
    let layer = tar(entries);
    docker_save(&[(base.clone(), base), (layer.clone(), layer)], &["evil:1"])
}

fn assert_unsafe(err: &ImageError, entry: &str) {
    match err {
        ImageError::UnsafeEntry { entry: e, .. } => assert_eq!(e, entry, "{err}"),
        other => panic!("expected an unsafe-entry error for {entry}, got: {other}"),
    }
    assert!(err.to_string().contains(entry), "{err}");
}

#[test]
fn dotdot_entry_is_refused() {
    let w = world();
    let err = w.refuse(
        "dotdot",
        layer_archive(&[E::File("../../etc/x", b"pwned", 0o644)]),
    );
    assert_unsafe(&err, "../../etc/x");
    assert!(err.to_string().contains(".."), "{err}");
}

#[test]
fn write_through_absolute_symlink_is_refused() {
    let w = world();
    let target = w.sentinel.display().to_string();
    let err = w.refuse(
        "abs-symlink",
        layer_archive(&[
            E::Symlink("evil", &target),
            E::File("evil/pwned", b"x", 0o644),
        ]),
    );
    assert_unsafe(&err, "evil/pwned");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(!w.sentinel.join("pwned").exists());
}

#[test]
fn write_through_relative_escaping_symlink_is_refused() {
    let w = world();
    let up = w.up_to_sentinel();
    let err = w.refuse(
        "rel-symlink",
        layer_archive(&[E::Symlink("a", &up), E::File("a/x", b"x", 0o644)]),
    );
    assert_unsafe(&err, "a/x");
    // Also the plain `a -> ../../..` form from the brief.
    let err = w.refuse(
        "rel-symlink2",
        layer_archive(&[
            E::Symlink("a", "../../.."),
            E::Dir("a/b/"),
            E::File("a/b/x", b"x", 0o644),
        ]),
    );
    assert_unsafe(&err, "a/b/");
}

#[test]
fn hardlink_to_host_file_is_refused() {
    let w = world();
    let target = w.sentinel.join("secret").display().to_string();
    let err = w.refuse(
        "hardlink-abs",
        layer_archive(&[E::Hardlink("stolen", &target)]),
    );
    assert_unsafe(&err, "stolen");
    let err = w.refuse(
        "hardlink-passwd",
        layer_archive(&[E::Hardlink("passwd", "/etc/passwd")]),
    );
    assert_unsafe(&err, "passwd");
    let err = w.refuse(
        "hardlink-dotdot",
        layer_archive(&[E::Hardlink("p", "../../../../sentinel/secret")]),
    );
    assert_unsafe(&err, "p");
}

#[test]
fn hardlink_to_escaping_symlink_is_refused() {
    let w = world();
    let up = format!("{}/secret", w.up_to_sentinel());
    let err = w.refuse(
        "hardlink-symlink",
        layer_archive(&[E::Symlink("s", &up), E::Hardlink("h", "s")]),
    );
    assert_unsafe(&err, "h");
    assert!(err.to_string().contains("symlink"), "{err}");
    let abs = w.sentinel.join("secret").display().to_string();
    let err = w.refuse(
        "hardlink-abs-symlink",
        layer_archive(&[E::Symlink("s", &abs), E::Hardlink("h", "s")]),
    );
    assert_unsafe(&err, "h");
    // A chain: t -> d/.. -> ... where d is itself a symlink climbing out.
    let err = w.refuse(
        "hardlink-chain",
        layer_archive(&[
            E::Symlink("d", "../.."),
            E::Symlink("t", "d/x"),
            E::Hardlink("h", "t"),
        ]),
    );
    assert_unsafe(&err, "h");
}

#[test]
fn forged_whiteout_device_and_trusted_xattr_do_not_land() {
    // Device nodes are skipped by policy; a layer with one still loads, without the node.
    let w = world();
    let archive = w.base.join("dev.tar");
    let layer = tar(&[
        E::Char("fakewhiteout", 0, 0),
        E::Char("kmem", 1, 2),
        E::File("keep", b"k", 0o644),
    ]);
    std::fs::write(&archive, docker_save(&[(layer.clone(), layer)], &["dev:1"])).unwrap();
    w.store.load(&archive).unwrap();
    let p = w.store.prepare("dev:1").unwrap();
    assert!(p.layer_dirs[0].join("keep").exists());
    assert!(std::fs::symlink_metadata(p.layer_dirs[0].join("kmem")).is_err());
    assert!(std::fs::symlink_metadata(p.layer_dirs[0].join("fakewhiteout")).is_err());

    // trusted.* xattrs from PAX headers (overlayfs reads trusted.overlay.*) are dropped;
    // security.capability and user.* are kept.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
        ("SCHILY.xattr.user.note", &b"kept"[..]),
    ])
    .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "d", std::io::empty()).unwrap();
    let layer = b.into_inner().unwrap();
    std::fs::write(
        &archive,
        docker_save(&[(layer.clone(), layer)], &["xattr:1"]),
    )
    .unwrap();
    w.store.load(&archive).unwrap();
    let p = w.store.prepare("xattr:1").unwrap();
    let d = p.layer_dirs[0].join("d");
    assert!(d.is_dir());
    assert_eq!(getxattr(&d, "user.note"), Some(b"kept".to_vec()));
    assert_eq!(getxattr(&d, "trusted.overlay.opaque"), None);
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length passed.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

#[test]
fn layer_digest_mismatch_is_refused() {
    let w = world();
    let layer = tar(&[E::File("f", b"original", 0o644)]);
    let dir = w.base.join("oci-tampered");
    oci_layout(
        &dir,
        &[(layer.clone(), layer)],
        "tampered:1",
        |blobs, layers| {
            blobs.insert(layers[0].clone(), tar(&[E::File("f", b"swapped!", 0o644)]));
        },
    );
    let err = w.refuse_path(&dir);
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
}

#[test]
fn diff_id_mismatch_is_refused() {
    let w = world();
    let layer = tar(&[E::File("f", b"real", 0o644)]);
    let other = tar(&[E::File("f", b"claimed", 0o644)]);
    let config = image_support::config_json(&[&other], &["/bin/sh"]);
    let archive =
        image_support::docker_save_with_config(&[(layer.clone(), layer)], &["liar:1"], &config);
    let err = w.refuse("diffid", archive);
    assert!(err.to_string().contains("diff id"), "{err}");
}

#[test]
fn truncated_gzip_layer_is_refused() {
    let w = world();
    let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let layer = tar(&[E::File("big", &big, 0o644)]);
    let gz = gzip(&layer);
    let truncated = gz[..gz.len() / 2].to_vec();
    let dir = w.base.join("oci-truncated");
    // The descriptor matches the truncated bytes, so only unpacking can notice.
    oci_layout(&dir, &[(layer, truncated)], "trunc:1", |_, _| {});
    let err = w.refuse_path(&dir);
    assert!(matches!(err, ImageError::CorruptLayer { .. }), "{err}");
}

#[test]
fn manifest_with_missing_blob_is_refused() {
    let w = world();
    let layer = tar(&[E::File("f", b"x", 0o644)]);
    let dir = w.base.join("oci-missing");
    oci_layout(
        &dir,
        &[(layer.clone(), layer)],
        "missing:1",
        |blobs, layers| {
            blobs.remove(&layers[0]);
        },
    );
    let err = w.refuse_path(&dir);
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn corrupt_archive_and_bad_json_are_refused() {
    let w = world();
    let err = w.refuse(
        "garbage",
        b"this is not a tar archive at all, not even close".repeat(20),
    );
    assert!(!err.to_string().is_empty());
    let err = w.refuse(
        "badjson",
        tar(&[E::File("manifest.json", b"{not json", 0o644)]),
    );
    assert!(err.to_string().contains("manifest.json"), "{err}");
    let err = w.refuse("empty", tar(&[E::File("hello.txt", b"hi", 0o644)]));
    assert!(err.to_string().contains("docker save"), "{err}");
}

#[test]
fn hostile_rootfs_import_is_refused() {
    let w = world();
    let path = w.base.join("rootfs.tar");
    std::fs::write(
        &path,
        tar(&[
            E::File("ok", b"ok", 0o644),
            E::File("/../escape", b"x", 0o644),
        ]),
    )
    .unwrap();
    let before = snapshot(&w.data);
    let err = w
        .store
        .import_rootfs_tar(&path, "imported:1")
        .expect_err("accepted");
    assert_unsafe(&err, "/../escape");
    assert_eq!(snapshot(&w.data), before);
    assert!(!w.base.join("escape").exists());
}

/// A world whose store unpacks within `layer` bytes per layer and `image` per load.
fn budgeted(layer: u64, image: u64) -> World {
    let mut w = world();
    w.store = ImageStore::open(&w.data)
        .unwrap()
        .with_unpack_budget(UnpackBudget {
            layer_bytes: layer,
            image_bytes: image,
        });
    w
}

fn assert_budget(err: &ImageError, limit: u64, var: &str) {
    match err {
        ImageError::UnpackBudget {
            limit: l, var: v, ..
        } => {
            assert_eq!((*l, *v), (limit, var), "{err}");
        }
        other => panic!("expected an unpack budget error, got: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("unpacks to more than") && msg.contains(var),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn a_layer_over_the_unpack_budget_is_refused_and_leaves_nothing() {
    let w = budgeted(1 << 20, 64 << 20);
    let big = vec![7u8; (1 << 20) + 1];
    let err = w.refuse("big", layer_archive(&[E::File("big.bin", &big, 0o644)]));
    assert_budget(&err, 1 << 20, LAYER_BUDGET_ENV);
    // Compressed, it is the inflated bytes that count.
    let layer = tar(&[E::File("big.bin", &big, 0o644)]);
    let base = tar(&[E::File("base.txt", b"base", 0o644)]);
    let err = w.refuse(
        "big-gz",
        docker_save(&[(base.clone(), base), (gzip(&layer), layer)], &["evil:1"]),
    );
    assert_budget(&err, 1 << 20, LAYER_BUDGET_ENV);
    // Exactly the budget fits.
    let fits = vec![7u8; 1 << 20];
    let archive = w.base.join("fits.tar");
    std::fs::write(
        &archive,
        layer_archive(&[E::File("fits.bin", &fits, 0o644)]),
    )
    .unwrap();
    w.store
        .load(&archive)
        .expect("a layer of exactly the budget");
}

/// A GNU sparse file of `size` bytes: all hole but its last byte, a few hundred bytes of tar.
fn sparse_tar(name: &str, size: u64) -> Vec<u8> {
    let octal = |n: u64| {
        let s = format!("{n:011o}\0");
        let mut out = [0u8; 12];
        out.copy_from_slice(s.as_bytes());
        out
    };
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_size(1);
    let g = h.as_gnu_mut().unwrap();
    g.realsize = octal(size);
    g.sparse[0].offset = octal(size - 1);
    g.sparse[0].numbytes = octal(1);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn a_sparse_file_s_holes_count_against_the_unpack_budget() {
    let w = budgeted(64 << 20, 256 << 20);
    // 1 GiB of hole in a few hundred bytes: unpacked as zeros, it is over the budget.
    let layer = sparse_tar("hole", 1 << 30);
    assert!(layer.len() < 4096);
    let base = tar(&[E::File("base.txt", b"base", 0o644)]);
    let err = w.refuse(
        "sparse",
        docker_save(&[(base.clone(), base), (layer.clone(), layer)], &["evil:1"]),
    );
    assert_budget(&err, 64 << 20, LAYER_BUDGET_ENV);
}

#[test]
fn layers_together_over_the_image_budget_are_refused() {
    let w = budgeted(1 << 20, 3 << 19);
    let a = tar(&[E::File("a.bin", &vec![1u8; 1 << 20], 0o644)]);
    let b = tar(&[E::File("b.bin", &vec![2u8; 1 << 20], 0o644)]);
    let err = w.refuse(
        "two",
        docker_save(&[(a.clone(), a), (b.clone(), b)], &["evil:1"]),
    );
    assert_budget(&err, 3 << 19, IMAGE_BUDGET_ENV);
}
