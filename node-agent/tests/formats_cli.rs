//! Output for scripts, on a real cluster (an agent on 127.0.0.x with busybox containers): every
//! command that lists or shows objects takes `--format json` and prints a JSON array of
//! objects with docker's PascalCase keys; `-q` where docker has it.

use crate::services;

use std::process::Command;

use services::*;

/// `--format json` output: a JSON array of objects whose keys all start upper-case.
fn objects(n: &Node, args: &[&str]) -> Vec<serde_json::Value> {
    let out = n.ok(args);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("shoal {args:?}: not one JSON document ({e}): {out}"));
    let list = v
        .as_array()
        .unwrap_or_else(|| panic!("shoal {args:?}: not an array: {out}"));
    for o in list {
        let keys = o
            .as_object()
            .unwrap_or_else(|| panic!("shoal {args:?}: not an object: {o}"));
        for k in keys.keys() {
            assert!(
                k.starts_with(|c: char| c.is_ascii_uppercase()),
                "shoal {args:?}: key {k:?} is not docker's PascalCase: {o}"
            );
        }
    }
    list.clone()
}

#[test]
fn every_listing_and_inspect_prints_one_json_shape() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    m.ok(&["service", "create", "--name", "web", IMAGE, "sleep", "600"]);
    m.ok(&["network", "create", "--driver", "overlay", "back"]);
    let secret = c._root.path().join("s.txt");
    std::fs::write(&secret, "x").unwrap();
    let secret = secret.to_str().unwrap();
    m.ok(&["secret", "create", "pw", secret]);
    m.ok(&["config", "create", "conf", secret]);
    let compose = c._root.path().join("app.yml");
    std::fs::write(
        &compose,
        "services:\n  tick:\n    image: busybox:latest\n    command: sleep 600\n",
    )
    .unwrap();
    m.ok(&[
        "stack",
        "deploy",
        "-c",
        compose.to_str().unwrap(),
        "--resolve-image",
        "never",
        "app",
    ]);
    c.until("both services running", || {
        c.running("web").len() == 1 && c.running("app_tick").len() == 1
    });

    for (args, at_least) in [
        (&["service", "ls", "--format", "json"][..], 2),
        (&["service", "ps", "--format", "json", "web"], 1),
        (&["service", "inspect", "web"], 1),
        (&["node", "ls", "--format", "json"], 1),
        (&["node", "inspect", "self"], 1),
        (&["network", "ls", "--format", "json"], 2),
        (&["network", "inspect", "back"], 1),
        (&["secret", "ls", "--format", "json"], 1),
        (&["secret", "inspect", "pw"], 1),
        (&["config", "ls", "--format", "json"], 1),
        (&["config", "inspect", "conf"], 1),
        (&["cluster", "inspect"], 1),
        (&["stack", "ls", "--format", "json"], 1),
        (&["stack", "services", "--format", "json", "app"], 1),
        (&["stack", "ps", "--format", "json", "app"], 1),
        (&["image", "ls", "--format", "json"], 1),
        (&["image", "inspect", IMAGE], 1),
        (&["ps", "--format", "json"], 2),
    ] {
        let list = objects(m, args);
        assert!(list.len() >= at_least, "shoal {args:?}: {list:?}");
    }

    let stacks = objects(m, &["stack", "ls", "--format", "json"]);
    assert_eq!(stacks, [serde_json::json!({"Name": "app", "Services": 1})]);
    let tick = objects(m, &["stack", "services", "--format", "json", "app"]);
    assert_eq!(tick[0]["Spec"]["Name"], "app_tick", "{tick:?}");
    assert_eq!(tick[0]["ServiceStatus"]["RunningTasks"], 1, "{tick:?}");
    // Filters apply to the JSON as to the table.
    let id = c.running("web").into_keys().next().unwrap();
    let web = objects(m, &["service", "ps", "--format", "json", "web"]);
    assert_eq!(web.len(), 1);
    assert_eq!(web[0]["ID"], id.as_str());
    let none = objects(
        m,
        &[
            "service",
            "ps",
            "--format",
            "json",
            "-f",
            "desired-state=shutdown",
            "web",
        ],
    );
    assert!(none.is_empty(), "{none:?}");
    let none = objects(
        m,
        &[
            "stack",
            "ps",
            "--format",
            "json",
            "-f",
            "name=app_tick.9",
            "app",
        ],
    );
    assert!(none.is_empty(), "{none:?}");
    // `-q` wins over --format, as with docker.
    let q = m.ok(&["service", "ps", "-q", "--format", "json", "web"]);
    assert_eq!(q, format!("{id}\n"));

    // The image store's objects, by the data dir's agent.
    let images = objects(m, &["image", "ls", "--format", "json"]);
    let out = Command::new(SHOAL)
        .args(["image", "inspect", "--data-dir"])
        .arg(m.data())
        .arg(IMAGE)
        .output()
        .unwrap();
    let inspected: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(images[0]["Id"], inspected[0]["Id"]);
    assert_eq!(inspected[0]["RepoTags"], serde_json::json!([IMAGE]));
    assert!(inspected[0]["Config"].is_object(), "{inspected:?}");
}

/// `-q` where docker has it: `service create/update/rollback` and `stack deploy` still wait,
/// but print only what docker prints without progress; `image load -q` is accepted.
#[test]
fn quiet_commands_wait_without_progress() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let out = m.ok(&[
        "service", "create", "-q", "--name", "web", IMAGE, "sleep", "600",
    ]);
    let id = out.trim();
    assert_eq!(out, format!("{id}\n"), "{out}");
    // It waited: the task runs.
    assert_eq!(c.running("web").len(), 1);

    let out = m.ok(&["service", "update", "-q", "--env-add", "A=1", "web"]);
    assert_eq!(out, "web\n");
    let s = c.inspect("web");
    assert_eq!(s["UpdateStatus"]["State"], "completed", "{s}");
    let out = m.ok(&["service", "rollback", "-q", "web"]);
    assert_eq!(out, "web\n");
    let s = c.inspect("web");
    assert_eq!(s["UpdateStatus"]["State"], "rollback_completed", "{s}");

    let compose = c._root.path().join("app.yml");
    std::fs::write(
        &compose,
        "services:\n  tick:\n    image: busybox:latest\n    command: sleep 600\n",
    )
    .unwrap();
    let out = m.ok(&[
        "stack",
        "deploy",
        "-q",
        "--detach=false",
        "-c",
        compose.to_str().unwrap(),
        "--resolve-image",
        "never",
        "app",
    ]);
    assert!(
        !out.contains("progress") && !out.contains("verify"),
        "{out}"
    );
    assert_eq!(c.running("app_tick").len(), 1);

    let layout = c._root.path().join("busybox.tar");
    let err = m.shoal(&["image", "load", "-q", "-i", layout.to_str().unwrap()]);
    // A rootfs tar is no image archive: refused as without -q, not as an unknown flag.
    assert_eq!(err.status.code(), Some(1), "{err:?}");
}
