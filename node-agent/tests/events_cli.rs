//! `shoal events` through the real CLI on a real one-node cluster: live events while a
//! service is created, scaled and removed; the same replayed with --since/--until (which ends
//! the stream by itself); task events by service; JSON lines; bad input in one line.

use crate::services;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use services::*;

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn events_show_a_service_created_scaled_and_removed_live_and_replayed() {
    let c = Cluster::new(1, 1);
    let n = &c.nodes[0];
    let t0 = format!("{:.3}", now_s() - 1.0);

    // Live: a client that follows service events.
    let mut live = Command::new(SHOAL)
        .args(["events", "--filter", "type=service"])
        .env("SHOAL_SOCKET", n.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = live.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The stream is open once the client is connected: give it a moment, then act.
    std::thread::sleep(Duration::from_millis(500));

    n.ok(&["service", "create", "--name", "ev", IMAGE, "sleep", "3600"]);
    c.until("ev runs", || c.running("ev").len() == 1);
    n.ok(&["service", "scale", "ev=2"]);
    c.until("ev runs twice", || c.running("ev").len() == 2);
    let id = n.ok(&["service", "inspect", "ev", "--format", "json"]);
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    let id = id[0]["ID"].as_str().unwrap().to_string();
    n.ok(&["service", "rm", "ev"]);

    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(" service remove ")) {
        match rx.recv_timeout(CONVERGE) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no service remove event; saw {seen:#?}"),
        }
    }
    live.kill().unwrap();
    live.wait().unwrap();
    assert!(
        seen[0].contains(&format!(" service create {id} (name=ev)")),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!(" service update {id} (name=ev"))),
        "{seen:#?}"
    );
    assert!(
        seen.last()
            .unwrap()
            .contains(&format!(" service remove {id} (name=ev)")),
        "{seen:#?}"
    );
    // docker's time format: RFC 3339 with nanoseconds.
    let stamp = seen[0].split(' ').next().unwrap();
    assert!(
        stamp.len() == 30 && stamp.ends_with('Z') && &stamp[19..20] == ".",
        "{stamp}"
    );

    // Replayed: the same service events, and the stream ends by itself at --until.
    let until = format!("{:.3}", now_s() + 1.0);
    let replay = n.ok(&[
        "events",
        "--since",
        &t0,
        "--until",
        &until,
        "--filter",
        "type=service",
    ]);
    let lines: Vec<&str> = replay.lines().collect();
    assert_eq!(
        lines,
        seen.iter().map(String::as_str).collect::<Vec<_>>(),
        "replay differs from live"
    );

    // Task events of the service, by its name, as JSON lines.
    let tasks = n.ok(&[
        "events",
        "--since",
        &t0,
        "--until",
        &until,
        "--filter",
        "type=task",
        "--filter",
        "service=ev",
        "--format",
        "json",
    ]);
    let tasks: Vec<serde_json::Value> = tasks
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        tasks.iter().all(|t| t["Type"] == "task"
            && t["Actor"]["Attributes"]["service"] == "ev"
            && t["scope"] == "swarm"),
        "{tasks:#?}"
    );
    assert!(
        tasks
            .iter()
            .any(|t| t["Actor"]["Attributes"]["state"] == "running"),
        "{tasks:#?}"
    );
    let slots: std::collections::BTreeSet<&str> = tasks
        .iter()
        .filter_map(|t| t["Actor"]["Attributes"]["slot"].as_str())
        .collect();
    assert_eq!(slots, ["1", "2"].into_iter().collect(), "{tasks:#?}");

    // Only creations of anything.
    let created = n.ok(&[
        "events",
        "--since",
        &t0,
        "--until",
        &until,
        "--filter",
        "event=create",
    ]);
    assert!(
        created.lines().all(|l| l.contains(" create ")) && created.lines().count() >= 3,
        "{created}"
    );
}

#[test]
fn bad_events_input_is_one_line_and_a_failure() {
    let c = Cluster::new(1, 1);
    let n = &c.nodes[0];
    for (args, want) in [
        (
            &["events", "--filter", "type=container"][..],
            "invalid filter type=container",
        ),
        (
            &["events", "--filter", "label=x"][..],
            "invalid filter \"label\"",
        ),
        (&["events", "--since", "yesterday"][..], "--since"),
        (
            &[
                "events",
                "--since",
                "2026-01-02T00:00:00Z",
                "--until",
                "2026-01-01T00:00:00Z",
            ][..],
            "--since is after --until",
        ),
        (&["events", "--format", "{{.Type}}"][..], "invalid --format"),
    ] {
        let out = n.shoal(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
