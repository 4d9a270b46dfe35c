//! `shoal node ps` and the list filters through the real CLI, on a real two-node cluster with
//! busybox containers: the tasks on this node (`self`, the default) and on another, `-q`,
//! `--format json`, `--filter desired-state|node|name|id`; `service ls --filter
//! name|id|label|mode`; bad filters and unknown nodes in one line, changing nothing.

use crate::services;

use services::*;

/// Task ids of `shoal ARGS` run with `-q` on node `n`.
fn ids(n: &Node, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = n.ok(args).lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn node_ps_lists_each_nodes_tasks_and_the_filters_pick_among_them() {
    let c = Cluster::new(2, 1);
    let (m, w) = (&c.nodes[0], &c.nodes[1]);
    m.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "--label",
        "tier=front",
        IMAGE,
        "sleep",
        "3600",
    ]);
    m.ok(&[
        "service", "create", "--name", "agent", "--mode", "global", IMAGE, "sleep", "3600",
    ]);
    c.until("web on both nodes, agent on each", || {
        c.per_node("web").len() == 2 && c.running("agent").len() == 2
    });
    c.assert_real("web");

    // The tasks on this node: one of web, one of agent, named as service ps names them.
    let mine = m.ok(&["node", "ps"]);
    let rows = parse_ps(&mine);
    assert_eq!(rows.len(), 2, "{mine}");
    assert!(rows.iter().all(|r| r.node == m.host), "{mine}");
    assert!(rows.iter().any(|r| r.name.starts_with("web.")), "{mine}");
    assert!(rows.iter().any(|r| r.name.starts_with("agent.")), "{mine}");
    assert!(rows.iter().all(|r| r.desired == "Running"), "{mine}");
    assert_eq!(m.ok(&["node", "ps", "self"]), mine);
    // Another node by hostname; both at once.
    let theirs = parse_ps(&m.ok(&["node", "ps", "--no-trunc", &w.host]));
    assert_eq!(theirs.len(), 2);
    assert!(theirs.iter().all(|r| r.node == w.host));
    let both = ids(m, &["node", "ps", "-q", "self", &w.host]);
    assert_eq!(both.len(), 4);
    // The same tasks service ps shows on that node.
    let web_there = ids(
        m,
        &[
            "service",
            "ps",
            "-q",
            "--filter",
            &format!("node={}", w.host),
            "web",
        ],
    );
    assert_eq!(web_there.len(), 1);
    let on_w = ids(m, &["node", "ps", "-q", &w.host]);
    assert!(on_w.contains(&web_there[0]), "{on_w:?} {web_there:?}");
    // JSON: every task in full.
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&m.ok(&["node", "ps", "--format", "json", &w.host])).unwrap();
    assert_eq!(json.len(), 2);
    assert!(
        json.iter().all(|t| t["DesiredState"] == "running"),
        "{json:?}"
    );

    // A forced update replaces web's tasks: the old ones stay as history, desired Shutdown,
    // and the desired-state filters tell them apart.
    let before = ids(m, &["service", "ps", "-q", "web"]);
    m.ok(&["service", "update", "--force", "web"]);
    c.until("web replaced", || {
        let now = c.running("web");
        now.len() == 2 && now.keys().all(|id| !before.contains(id))
    });
    let running = ids(
        m,
        &[
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=running",
            "web",
        ],
    );
    let stopped = ids(
        m,
        &[
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=shutdown",
            "web",
        ],
    );
    assert_eq!(stopped, before);
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(running.iter().all(|id| !before.contains(id)));
    let accepted = ids(
        m,
        &[
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=accepted",
            "web",
        ],
    );
    assert!(accepted.is_empty(), "{accepted:?}");
    let all_nodes_stopped: Vec<String> = ids(
        m,
        &[
            "node",
            "ps",
            "-q",
            "--filter",
            "desired-state=shutdown",
            "self",
            &w.host,
        ],
    );
    assert_eq!(all_nodes_stopped, stopped);
    // History under its slot, as docker shows it.
    let table = m.ok(&["node", "ps", "self", &w.host]);
    assert_eq!(table.matches(" \\_ web.").count(), 2, "{table}");
    // By name (SERVICE.SLOT: the slot's task and its history) and by id prefix.
    let slot1 = ids(m, &["service", "ps", "-q", "--filter", "name=web.1", "web"]);
    assert_eq!(slot1.len(), 2, "{slot1:?}");
    let by_id = ids(
        m,
        &[
            "node",
            "ps",
            "-q",
            "--filter",
            &format!("id={}", &running[0][..10]),
            "self",
            &w.host,
        ],
    );
    assert_eq!(by_id, running[..1]);

    // service ls filters.
    let ls = |f: &str| -> Vec<String> { parse_names(&m.ok(&["service", "ls", "--filter", f])) };
    assert_eq!(ls("name=we"), ["web"]);
    assert_eq!(ls("label=tier"), ["web"]);
    assert_eq!(ls("label=tier=front"), ["web"]);
    assert!(ls("label=tier=back").is_empty());
    assert_eq!(ls("mode=global"), ["agent"]);
    assert_eq!(ls("mode=replicated"), ["web"]);
    let web_id = m.ok(&["service", "ls", "-q", "--filter", "name=web"]);
    assert_eq!(web_id.lines().count(), 1);
    assert_eq!(ls(&format!("id={}", &web_id.trim()[..6])), ["web"]);
    // Several values of one key: either; of several keys: both.
    let mut either = m
        .ok(&["service", "ls", "-q", "-f", "name=web", "-f", "name=agent"])
        .lines()
        .count();
    assert_eq!(either, 2);
    either = m
        .ok(&["service", "ls", "-q", "-f", "name=web", "-f", "mode=global"])
        .lines()
        .count();
    assert_eq!(either, 0);

    // Bad input: one line, non-zero, nothing changed.
    let before = m.ok(&["service", "ls"]);
    for (args, want) in [
        (
            &["node", "ps", "--filter", "color=red"][..],
            "invalid filter \"color\"",
        ),
        (
            &["node", "ps", "--filter", "desired-state=sleeping"][..],
            "invalid filter desired-state=sleeping",
        ),
        (
            &["node", "ps", "--filter", "node"][..],
            "expected KEY=VALUE",
        ),
        (
            &["node", "ps", "nosuchnode"][..],
            "node nosuchnode not found",
        ),
        (
            &["service", "ps", "--filter", "node=nosuchnode", "web"][..],
            "no such node: nosuchnode",
        ),
        (
            &["service", "ls", "--filter", "size=3"][..],
            "invalid filter \"size\"",
        ),
        (
            &["service", "ls", "--filter", "mode=sideways"][..],
            "invalid filter mode=sideways",
        ),
        (
            &["service", "ls", "--filter", "label="][..],
            "invalid filter label=",
        ),
    ] {
        let out = m.shoal(args);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("shoal: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert_eq!(parse_names(&m.ok(&["service", "ls"])), parse_names(&before));
}

/// The NAME column of `service ls`.
fn parse_names(table: &str) -> Vec<String> {
    let mut lines = table.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let col = header.find("NAME").unwrap();
    let mut names: Vec<String> = lines
        .map(|l| l[col..].split_whitespace().next().unwrap_or("").to_string())
        .collect();
    names.sort();
    names
}
