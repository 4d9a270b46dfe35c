//! `shoal image …` as a user runs it: the built binary, a temp `--data-dir`, exit codes and
//! one-line errors.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

fn shoal(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("image")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("SHOAL_DATA_DIR")
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
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("shoal: "), "{err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

fn rootfs_tar(path: &Path, content: &str) {
    let mut b = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, "etc/motd", content.as_bytes())
        .unwrap();
    std::fs::File::create(path)
        .unwrap()
        .write_all(&b.into_inner().unwrap())
        .unwrap();
}

#[test]
fn import_ls_inspect_rm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tar = dir.path().join("rootfs.tar");
    rootfs_tar(&tar, "hello");

    let id1 = ok(&shoal(&data, &["import", tar.to_str().unwrap(), "bb:1"]))
        .trim()
        .to_string();
    assert!(id1.starts_with("sha256:"), "{id1}");
    let tar2 = dir.path().join("rootfs2.tar");
    rootfs_tar(&tar2, "other");
    let id2 = ok(&shoal(&data, &["import", tar2.to_str().unwrap(), "bb:2"]))
        .trim()
        .to_string();
    assert_ne!(id1, id2);
    assert_eq!(std::fs::read_dir(data.join("layers")).unwrap().count(), 2);

    let table = ok(&shoal(&data, &["ls"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("REPOSITORY   TAG   IMAGE ID       CREATED"),
        "{table}"
    );
    for (tag, id) in [("1", &id1), ("2", &id2)] {
        let row = lines.iter().find(|l| l.contains(&id[7..19])).expect(&table);
        assert!(
            row.starts_with(&format!("bb           {tag}     {}", &id[7..19])),
            "{table}"
        );
        assert!(row.ends_with("MB"), "{table}");
    }
    assert!(table.contains(" ago "), "{table}");

    let quiet = ok(&shoal(&data, &["ls", "-q"]));
    let mut ids: Vec<&str> = quiet.lines().collect();
    ids.sort();
    let mut want = vec![&id1[7..19], &id2[7..19]];
    want.sort();
    assert_eq!(ids, want);

    // The shape of every listing's and inspect's JSON: an array of objects, docker's keys.
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&shoal(&data, &["ls", "--format", "json"]))).unwrap();
    assert_eq!(json.len(), 2);
    assert!(
        json[0]["RepoTags"][0].as_str().unwrap().starts_with("bb:"),
        "{json:?}"
    );
    let mut listed: Vec<&str> = json.iter().map(|v| v["Id"].as_str().unwrap()).collect();
    listed.sort();
    let mut want = vec![id1.as_str(), id2.as_str()];
    want.sort();
    assert_eq!(listed, want);

    let inspect: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&shoal(&data, &["inspect", "bb:1"]))).unwrap();
    assert_eq!(inspect.len(), 1);
    assert_eq!(inspect[0]["Id"], id1);
    assert_eq!(inspect[0]["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(inspect[0]["Os"], "linux");
    assert_eq!(inspect[0]["RepoTags"], serde_json::json!(["bb:1"]));
    // By short id too, and several at once.
    let both: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&shoal(&data, &["inspect", "bb:1", &id2[7..19]]))).unwrap();
    assert_eq!(both.len(), 2);
    assert_eq!(both[1]["Id"], id2);

    assert_eq!(
        ok(&shoal(&data, &["rm", "bb:1"])).trim(),
        format!("Deleted: {id1}")
    );
    assert_eq!(
        std::fs::read_dir(data.join("layers")).unwrap().count(),
        1,
        "gc removed bb:1's layer only"
    );
    assert_eq!(
        ok(&shoal(&data, &["rm", &id2[7..19]])).trim(),
        format!("Deleted: {id2}")
    );
    assert_eq!(ok(&shoal(&data, &["ls", "-q"])).trim(), "");
    assert_eq!(
        std::fs::read_dir(data.join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(std::fs::read_dir(data.join("layers")).unwrap().count(), 0);
}

#[test]
fn load_docker_save_archive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(2);
        b.append_data(&mut h, "hi", &b"hi"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let diff = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config_name, "RepoTags": ["saved:1", "saved:2"], "Layers": ["l/layer.tar"]}
    ]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        (config_name.as_str(), &config),
        ("l/layer.tar", &layer),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    let archive = dir.path().join("saved.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    assert_eq!(
        ok(&shoal(&data, &["load", "-i", archive.to_str().unwrap()])),
        "Loaded image: saved:1\nLoaded image: saved:2\n"
    );
    assert!(ok(&shoal(&data, &["ls"])).contains("saved "));
    assert_eq!(
        ok(&shoal(&data, &["rm", "saved:1"])).trim(),
        "Untagged: saved:1"
    );
    assert_eq!(ok(&shoal(&data, &["ls", "-q"])).lines().count(), 1);
    let out = ok(&shoal(&data, &["prune"]));
    assert!(
        out.starts_with("Deleted 0 images, 0 blobs, 0 layers"),
        "{out}"
    );
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("nope.tar");
    one_line_error(
        &shoal(&data, &["import", missing.to_str().unwrap(), "x:1"]),
        "No such file",
    );
    one_line_error(
        &shoal(&data, &["load", missing.to_str().unwrap()]),
        "No such file",
    );

    let tar = dir.path().join("rootfs.tar");
    rootfs_tar(&tar, "x");
    one_line_error(
        &shoal(&data, &["import", tar.to_str().unwrap(), "Not/A:Valid:Ref"]),
        "invalid reference",
    );
    one_line_error(
        &shoal(&data, &["inspect", "nothere:1"]),
        "no such image: nothere:1",
    );
    one_line_error(&shoal(&data, &["rm", "nothere"]), "no such image");

    let corrupt = dir.path().join("corrupt.tar");
    std::fs::write(&corrupt, vec![0x42u8; 4096]).unwrap();
    one_line_error(
        &shoal(&data, &["load", corrupt.to_str().unwrap()]),
        "not a readable tar archive",
    );
    let gz = dir.path().join("corrupt.tar.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00]).unwrap();
    one_line_error(&shoal(&data, &["load", gz.to_str().unwrap()]), "load ");

    // Unknown flag: clap's usage error, non-zero.
    let out = shoal(&data, &["ls", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));

    assert_eq!(ok(&shoal(&data, &["ls", "-q"])).trim(), "");
    assert_eq!(
        std::fs::read_dir(data.join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(std::fs::read_dir(data.join("layers")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(data.join("images/.shoal/tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// Usage errors keep clap's whole message: what is missing, a "did you mean", the usage line.
#[test]
fn usage_errors_say_what_is_wrong_and_how_to_use() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(args)
            .env("SHOAL_SOCKET", "/nonexistent/shoal.sock")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let err = run(&["service", "create"]);
    assert!(
        err.starts_with("shoal: the following required arguments were not provided:"),
        "{err}"
    );
    assert!(
        err.contains("<IMAGE>") && err.contains("Usage: shoal service create"),
        "{err}"
    );
    let err = run(&["servce", "ls"]);
    assert!(
        err.contains("'service'") && err.contains("similar"),
        "{err}"
    );
    let err = run(&["service", "ls", "--formt", "json"]);
    assert!(err.contains("--format"), "{err}");
    // Output piped into a reader that stops early ends quietly (no panic on a broken pipe).
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for i in 1 2 3; do {} version; done | head -c 1",
            env!("CARGO_BIN_EXE_shoal")
        ))
        .env("SHOAL_SOCKET", "/nonexistent/shoal.sock")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_layer_over_the_unpack_budget_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tar = dir.path().join("rootfs.tar");
    rootfs_tar(&tar, "hello");
    let budget = |var: &str, bytes: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("image")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .env_remove("SHOAL_DATA_DIR")
            .env(var, bytes)
            .output()
            .unwrap()
    };
    // busybox alone is over a 64 KiB layer budget.
    let import = ["import", tar.to_str().unwrap(), "bb:1"];
    let out = budget("SHOAL_MAX_LAYER_BYTES", "65536", &import);
    one_line_error(&out, "unpacks to more than 65536 bytes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHOAL_MAX_LAYER_BYTES"));
    let out = budget("SHOAL_MAX_IMAGE_BYTES", "65536", &import);
    one_line_error(&out, "the image unpacks to more than 65536 bytes");
    // Nothing left: no image, no layer, no blob, no temp dir.
    assert_eq!(ok(&shoal(&data, &["ls", "-q"])).trim(), "");
    assert_eq!(std::fs::read_dir(data.join("layers")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(data.join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(data.join("images/.shoal/tmp"))
            .unwrap()
            .count(),
        0
    );
    // A budget that is no number is one clear line too; the default takes it.
    one_line_error(
        &budget("SHOAL_MAX_LAYER_BYTES", "lots", &import),
        "SHOAL_MAX_LAYER_BYTES=lots: expected a number of bytes",
    );
    ok(&shoal(&data, &import));
}
