//! The image store end to end: import, load (docker save, OCI layout dir and archive),
//! overlay view of whiteouts and opaque dirs, ls/inspect/rm/gc, concurrent writers.

use crate::image_support;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use image_support::{
    busybox_rootfs_tar, docker_save, gzip, oci_layout, sha, tar, tar_dir, zstd, E,
};
use shoal_runtime::image::{ImageError, ImageStore};

fn store() -> (tempfile::TempDir, PathBuf, ImageStore) {
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    let store = ImageStore::open(&data).unwrap();
    (base, data, store)
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn import_busybox_rootfs() {
    let (base, data, store) = store();
    let plain = base.path().join("rootfs.tar");
    std::fs::write(&plain, busybox_rootfs_tar()).unwrap();
    let info = store.import_rootfs_tar(&plain, "busybox").unwrap();
    assert_eq!(info.repo_tags, vec!["busybox:latest"]);
    assert_eq!(info.os, "linux");
    assert_eq!(info.layers.len(), 1);
    assert_eq!(info.diff_ids[0], sha(&busybox_rootfs_tar()));

    let p = store.prepare("busybox:latest").unwrap();
    assert_eq!(
        p.layer_dirs,
        vec![data
            .join("layers")
            .join(&info.chain_ids[0][7..])
            .join("rootfs")]
    );
    let bb = p.layer_dirs[0].join("bin/busybox");
    assert_eq!(
        std::fs::read(&bb).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        std::fs::metadata(&bb).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(p.layer_dirs[0].join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let cfg = p.config.config().as_ref().unwrap();
    assert_eq!(cfg.cmd().as_deref(), Some(&["/bin/sh".to_string()][..]));
    assert!(p.config.created().is_some());
    assert_eq!(p.config.rootfs().diff_ids(), &info.diff_ids);

    // The same rootfs gzip-compressed: a different blob, the same diff id, so one layer dir.
    let gz = base.path().join("rootfs.tar.gz");
    std::fs::write(&gz, gzip(&busybox_rootfs_tar())).unwrap();
    let info2 = store.import_rootfs_tar(&gz, "busybox:gz").unwrap();
    assert_ne!(info2.layers, info.layers);
    assert_eq!(info2.chain_ids, info.chain_ids);
    assert_eq!(count(&data.join("layers")), 1);
    assert_eq!(
        store.prepare("busybox:gz").unwrap().layer_dirs,
        p.layer_dirs
    );
    // A missing layer dir (e.g. removed by hand) is unpacked again from the blob.
    std::fs::remove_dir_all(data.join("layers").join(&info.chain_ids[0][7..])).unwrap();
    let again = store.prepare(info.short_id()).unwrap();
    assert!(again.layer_dirs[0].join("bin/busybox").is_file());
}

#[test]
fn layer_metadata_is_kept() {
    let (base, _data, store) = store();
    let layer = tar(&[
        E::Dir("usr/"),
        E::Owned("usr/suid", b"#!", 0o4755, 0, 0),
        E::Owned("usr/mine", b"mine", 0o640, 1234, 5678),
        E::Hardlink("usr/suid-link", "usr/suid"),
        E::Symlink("usr/abs", "/etc/hostname"),
        E::Symlink("usr/rel", "suid"),
        E::Hardlink("usr/rel-link", "usr/rel"),
    ]);
    let path = base.path().join("meta.tar");
    std::fs::write(&path, &layer).unwrap();
    store.import_rootfs_tar(&path, "meta:1").unwrap();
    let root = &store.prepare("meta:1").unwrap().layer_dirs[0];
    let suid = std::fs::metadata(root.join("usr/suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    assert_eq!(
        suid.nlink(),
        2,
        "hardlink inside the layer is a real hardlink"
    );
    let mine = std::fs::metadata(root.join("usr/mine")).unwrap();
    assert_eq!(
        (mine.uid(), mine.gid(), mine.mode() & 0o777),
        (1234, 5678, 0o640)
    );
    assert_eq!(mine.mtime(), 1_700_000_000);
    // An absolute symlink is fine as long as nothing is written through it.
    assert_eq!(
        std::fs::read_link(root.join("usr/abs")).unwrap(),
        Path::new("/etc/hostname")
    );
    // A hardlink to a symlink that stays inside the layer is allowed.
    assert_eq!(
        std::fs::read_link(root.join("usr/rel-link")).unwrap(),
        Path::new("suid")
    );
}

/// Three layers: base files; whiteouts + an opaque dir; a gzip layer on top.
fn three_layers() -> Vec<(Vec<u8>, Vec<u8>)> {
    let l1 = tar(&[
        E::Dir("a/"),
        E::File("a/keep", b"keep", 0o644),
        E::File("a/gone", b"gone", 0o644),
        E::Dir("o/"),
        E::File("o/lower1", b"lower", 0o644),
        E::Dir("o/sub/"),
        E::File("o/sub/deep", b"deep", 0o644),
        E::File("del", b"deleted later", 0o644),
        E::File("changed", b"v1", 0o644),
    ]);
    let l2 = tar(&[
        E::File(".wh.del", b"", 0o644),
        E::File("a/.wh.gone", b"", 0o644),
        E::Dir("o/"),
        E::File("o/.wh..wh..opq", b"", 0o644),
        E::File("o/new", b"new", 0o644),
        E::File("changed", b"v2", 0o644),
    ]);
    let l3 = tar(&[
        E::File("top.txt", b"top", 0o644),
        E::File("a/added", b"added", 0o644),
    ]);
    let l3gz = gzip(&l3);
    vec![(l1.clone(), l1), (l2.clone(), l2), (l3, l3gz)]
}

#[test]
fn docker_save_three_layers_merge_correctly_in_overlayfs() {
    let (base, data, store) = store();
    let archive = base.path().join("three.tar");
    std::fs::write(
        &archive,
        docker_save(&three_layers(), &["three:v1", "three:latest"]),
    )
    .unwrap();
    let loaded = store.load(&archive).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].repo_tags, vec!["three:latest", "three:v1"]);
    assert_eq!(loaded[0].layers.len(), 3);

    let p = store.prepare("three:v1").unwrap();
    assert_eq!(p.layer_dirs.len(), 3);
    assert_eq!(p.chain_ids, loaded[0].chain_ids);
    let env = p.config.config().as_ref().unwrap().env().clone().unwrap();
    assert!(env.contains(&"HELLO=world".to_string()));

    // Overlay form in the layer dir itself.
    let wh = std::fs::symlink_metadata(p.layer_dirs[1].join("del")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!p.layer_dirs[1].join(".wh.del").exists());
    assert!(!p.layer_dirs[1].join("o/.wh..wh..opq").exists());

    // Mount the layers (topmost first in lowerdir) and look at the merged view.
    let merged = base.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let lower: Vec<String> = p
        .layer_dirs
        .iter()
        .rev()
        .map(|d| d.display().to_string())
        .collect();
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lower.join(":")).as_str()),
    )
    .expect("mount overlayfs (tests run as root)");
    let check = || -> Result<(), String> {
        let read =
            |p: &str| std::fs::read_to_string(merged.join(p)).map_err(|e| format!("{p}: {e}"));
        let absent = |p: &str| {
            if std::fs::symlink_metadata(merged.join(p)).is_ok() {
                Err(format!("{p} should be hidden"))
            } else {
                Ok(())
            }
        };
        assert_eq!(read("a/keep")?, "keep");
        absent("a/gone")?;
        absent("del")?;
        absent("o/lower1")?;
        absent("o/sub")?;
        assert_eq!(read("o/new")?, "new");
        assert_eq!(read("changed")?, "v2");
        assert_eq!(read("top.txt")?, "top");
        assert_eq!(read("a/added")?, "added");
        Ok(())
    };
    let result = check();
    nix::mount::umount(&merged).unwrap();
    result.unwrap();

    // Shared layers: loading again adds nothing.
    let before = count(&data.join("layers"));
    store.load(&archive).unwrap();
    assert_eq!(count(&data.join("layers")), before);
}

#[test]
fn oci_layout_dir_and_archive_load() {
    let (base, _data, store) = store();
    let dir = oci_layout(
        &base.path().join("layout"),
        &three_layers(),
        "oci/app:1.0",
        |_, _| {},
    );
    let from_dir = store.load(&dir).unwrap();
    assert_eq!(from_dir[0].repo_tags, vec!["oci/app:1.0"]);

    let archive = base.path().join("layout.tar");
    std::fs::write(&archive, gzip(&tar_dir(&dir))).unwrap();
    let (_base2, _data2, store2) = self::store();
    let from_archive = store2.load(&archive).unwrap();
    assert_eq!(from_archive[0].id, from_dir[0].id);
    assert_eq!(
        from_archive[0].manifest_digest, from_dir[0].manifest_digest,
        "OCI manifests are kept verbatim"
    );
    assert_eq!(store2.prepare("oci/app:1.0").unwrap().layer_dirs.len(), 3);
}

#[test]
fn ls_inspect_rm_and_gc() {
    let (base, data, store) = store();
    let layers = three_layers();
    let one = base.path().join("one.tar");
    std::fs::write(
        &one,
        docker_save(&layers[..2], &["shared:one", "shared:alias"]),
    )
    .unwrap();
    let two = base.path().join("two.tar");
    std::fs::write(&two, docker_save(&layers, &["shared:two"])).unwrap();
    let a = store.load(&one).unwrap().remove(0);
    let b = store.load(&two).unwrap().remove(0);
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(
        count(&data.join("layers")),
        3,
        "two images share their first two layers"
    );

    // inspect by tag, short id, full id, sha256: prefix; bad and unknown references.
    assert_eq!(store.inspect("shared:two").unwrap(), b);
    assert_eq!(store.inspect(b.short_id()).unwrap().id, b.id);
    assert_eq!(store.inspect(&b.id).unwrap().id, b.id);
    assert_eq!(store.inspect(&b.id[..20]).unwrap().id, b.id);
    assert!(matches!(
        store.inspect("shared:nope"),
        Err(ImageError::NotFound(_))
    ));
    assert!(matches!(
        store.inspect("Bad Ref"),
        Err(ImageError::InvalidReference { .. })
    ));

    // Untagging one of two tags keeps the image.
    store.remove("shared:alias").unwrap();
    assert_eq!(store.inspect(&a.id).unwrap().repo_tags, vec!["shared:one"]);
    // In use: refused, nothing changes.
    let err = store
        .remove_unless_used("shared:one", std::slice::from_ref(&a.id))
        .unwrap_err();
    assert!(matches!(err, ImageError::InUse(_)), "{err}");
    assert_eq!(store.list().unwrap().len(), 2);

    // Removing the last tag removes the image; gc frees its unshared blobs only.
    store.remove("shared:two").unwrap();
    assert!(store.inspect("shared:two").is_err());
    let blobs = data.join("images/blobs/sha256");
    let blobs_before = count(&blobs);
    let report = store.gc(&[]).unwrap();
    assert_eq!(report.layers_removed, 1);
    assert_eq!(
        report.blobs_removed, 3,
        "manifest, config and the third layer"
    );
    assert_eq!(count(&blobs), blobs_before - 3);
    assert_eq!(count(&data.join("layers")), 2);
    store.prepare("shared:one").unwrap();

    // A layer a caller says is in use survives gc even with no image left.
    store.remove(a.short_id()).unwrap();
    let report = store.gc(&[a.chain_ids[0].clone()]).unwrap();
    assert_eq!(report.layers_removed, 1);
    assert_eq!(count(&data.join("layers")), 1);
    store.gc(&[]).unwrap();
    assert_eq!(count(&blobs), 0);
    assert_eq!(count(&data.join("layers")), 0);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn retag_leaves_a_dangling_image_that_prune_removes() {
    let (base, data, store) = store();
    let layers = three_layers();
    let v1 = base.path().join("v1.tar");
    std::fs::write(&v1, docker_save(&layers[..1], &["app:latest"])).unwrap();
    let v2 = base.path().join("v2.tar");
    std::fs::write(&v2, docker_save(&layers[..2], &["app:latest"])).unwrap();
    let old = store.load(&v1).unwrap().remove(0);
    let new = store.load(&v2).unwrap().remove(0);
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(store.inspect(&old.id).unwrap().repo_tags.is_empty());
    assert_eq!(store.inspect("app").unwrap().id, new.id);
    // Dangling but in use: kept.
    assert_eq!(
        store
            .prune(std::slice::from_ref(&old.id), &[])
            .unwrap()
            .images_removed,
        0
    );
    let r = store.prune(&[], &[]).unwrap();
    assert_eq!(r.images_removed, 1);
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(
        count(&data.join("layers")),
        2,
        "new image's two layers stay"
    );
}

#[test]
fn concurrent_writers_keep_every_tag() {
    const WRITERS: usize = 6;
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    let handles: Vec<_> = (0..WRITERS)
        .map(|i| {
            let data = data.clone();
            let path = base.path().join(format!("r{i}.tar"));
            std::fs::write(
                &path,
                tar(&[E::File("f", format!("image {i}").as_bytes(), 0o644)]),
            )
            .unwrap();
            std::thread::spawn(move || {
                // Separate store handles, as separate `shoal` processes would have.
                let store = ImageStore::open(&data).unwrap();
                store.import_rootfs_tar(&path, &format!("par:{i}")).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let store = ImageStore::open(&data).unwrap();
    let mut tags: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .collect();
    tags.sort();
    let want: Vec<String> = (0..WRITERS).map(|i| format!("par:{i}")).collect();
    assert_eq!(tags, want);
    let tmp = data.join("images/.shoal/tmp");
    assert_eq!(count(&tmp), 0, "no staging left behind");
}

#[test]
fn gc_keeps_layers_an_overlay_mount_uses() {
    let (base, data, store) = store();
    let path = base.path().join("rootfs.tar");
    std::fs::write(&path, busybox_rootfs_tar()).unwrap();
    store.import_rootfs_tar(&path, "mounted:1").unwrap();
    let p = store.prepare("mounted:1").unwrap();
    let (upper, work, merged) = (
        base.path().join("u"),
        base.path().join("w"),
        base.path().join("m"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        p.layer_dirs[0].display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .expect("mount overlayfs (tests run as root)");
    store.remove("mounted:1").unwrap();
    // No caller-supplied in-use list: the mount alone keeps the layer.
    let kept = store.gc(&[]);
    let still_there = p.layer_dirs[0].join("bin/busybox").is_file();
    nix::mount::umount(&merged).unwrap();
    assert_eq!(kept.unwrap().layers_removed, 0);
    assert!(still_there);
    assert_eq!(store.gc(&[]).unwrap().layers_removed, 1);
    assert_eq!(count(&data.join("layers")), 0);
}

/// zstd layers (OCI's `tar+zstd`) make the same image as gzip ones; a layer that inflates
/// beyond any real one (a decompression bomb) is refused before it fills the disk, and leaves
/// nothing.
#[test]
fn zstd_layers_load_and_a_decompression_bomb_is_refused() {
    let (base, data, store) = store();
    let gz = oci_layout(
        &base.path().join("gz"),
        &three_layers(),
        "app:gz",
        |_, _| {},
    );
    let zs: Vec<(Vec<u8>, Vec<u8>)> = three_layers()
        .into_iter()
        .map(|(u, _)| {
            let z = zstd(&u);
            (u, z)
        })
        .collect();
    let zd = oci_layout(&base.path().join("zstd"), &zs, "app:zstd", |_, _| {});
    let from_gz = store.load(&gz).unwrap();
    let from_zstd = store.load(&zd).unwrap();
    assert_eq!(
        from_zstd[0].id, from_gz[0].id,
        "one image, by its uncompressed layers"
    );
    assert_eq!(store.prepare("app:zstd").unwrap().layer_dirs.len(), 3);

    // 300 MiB of zeros in a few KiB of zstd.
    let zeros = vec![0u8; 300 << 20];
    let bomb = tar(&[E::File("zeros", &zeros, 0o644)]);
    let packed = zstd(&bomb);
    assert!(packed.len() < 1 << 20);
    let layers_before = count(&data.join("layers"));
    let bd = oci_layout(
        &base.path().join("bomb"),
        &[(bomb, packed)],
        "bomb:1",
        |_, _| {},
    );
    let err = store.load(&bd).unwrap_err().to_string();
    assert!(err.contains("decompression bomb"), "{err}");
    assert!(matches!(
        store.inspect("bomb:1"),
        Err(ImageError::NotFound(_))
    ));
    assert_eq!(count(&data.join("layers")), layers_before);
}
