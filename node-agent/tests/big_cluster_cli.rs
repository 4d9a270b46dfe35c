//! Listings that do not fit one control API answer (4 MiB), through the real CLI: a manager
//! agent (sim executor) and 80 hollow nodes joined in this process (each its own key,
//! certificate and dispatcher session), every node carrying 60 KiB of labels; a service of 80
//! tasks each carrying 60 KiB of container labels; 40 more services of 120 KiB of labels each.
//! `node ls`, `service ps` and `service ls` — table, `-q` and JSON — list every one (the
//! control API pages them), and the filters and `node ps` work over the pages.

use crate::support;

use std::time::{Duration, Instant};

use shoal_tests::cluster::{ClusterBuilder, Member};
use support::{Agent, AgentKind};

const KIND: AgentKind = AgentKind {
    net: "127.0.7",
    host_prefix: "big",
    hollow: true,
    advertise: true,
};

/// Hollow nodes joined besides the manager.
const HOLLOW: usize = 80;
/// Services with large specs besides the one with many tasks.
const SERVICES: usize = 40;
/// A label value: 15 of them are 60 KiB, under the 64 KiB of labels an object may hold.
const LABEL_BYTES: usize = 4_000;
const LABELS: usize = 15;
/// Tries of a write that timed out on a loaded machine.
const WRITE_ATTEMPTS: usize = 3;
/// The tasks' image (hollow nodes run none: never pulled, never looked up).
const IMAGE: &str = "busybox:1.36";
// Each listing is more than one answer may hold: nodes and tasks of 60 KiB of labels each,
// services of 120 KiB.
const _: () = assert!(HOLLOW * LABELS * LABEL_BYTES > 4 << 20);
const _: () = assert!(SERVICES * 2 * LABELS * LABEL_BYTES > 4 << 20);

/// How long the hollow nodes take to join and be Ready, and the service to run everywhere.
const WAIT: Duration = Duration::from_secs(120);

/// `--FLAG k0=xxx… --FLAG k1=xxx…`: 60 KiB of labels.
fn label_flags(flag: &str) -> Vec<String> {
    (0..LABELS)
        .flat_map(|i| {
            [
                flag.to_string(),
                format!("k{i}={}", "x".repeat(LABEL_BYTES)),
            ]
        })
        .collect()
}

/// Runs a write with 60 KiB of flags (not echoed when it fails). A loaded machine may time a
/// proposal out: it is tried again, a bounded number of times.
fn run(a: &Agent, args: &[String]) -> String {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut last = String::new();
    for _ in 0..WRITE_ATTEMPTS {
        let out = a.shoal(&argv);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("in time") {
            break;
        }
    }
    panic!(
        "shoal {} … failed: {last}\n{}",
        argv[..2].join(" "),
        a.log()
            .lines()
            .filter(|l| !l.contains(" INFO "))
            .rev()
            .take(30)
            .map(|l| &l[..l.len().min(300)])
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn json_len(out: &str) -> usize {
    serde_json::from_str::<Vec<serde_json::Value>>(out)
        .unwrap_or_else(|e| panic!("not a JSON array ({e}): {}", &out[..out.len().min(300)]))
        .len()
}

fn rows(table: &str) -> usize {
    table.lines().count().saturating_sub(1)
}

#[test]
fn listings_larger_than_one_answer_list_every_node_service_and_task() {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("{:>6.1}s {what}", t0.elapsed().as_secs_f64());
    let root = tempfile::tempdir().unwrap();
    let manager = Agent::start(root.path(), 1, KIND);
    let member = manager.member();
    ClusterBuilder::new()
        .heartbeat("1s", 10)
        .form(&[&member as &dyn Member])
        .unwrap();
    let token = manager
        .ok(&["cluster", "join-token", "-q", "worker"])
        .trim()
        .to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let agents = rt.block_on(async {
        let mut joins = tokio::task::JoinSet::new();
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
        for i in 0..HOLLOW {
            let (addr, token, limit) = (manager.addr.clone(), token.clone(), limit.clone());
            joins.spawn(async move {
                let _permit = limit.acquire_owned().await.unwrap();
                shoal_worker::hollow::join_hollow(&addr, &token, &format!("hollow{i:03}"), 20).await
            });
        }
        let mut agents = Vec::new();
        while let Some(r) = joins.join_next().await {
            agents.push(r.unwrap().unwrap().1);
        }
        agents
    });
    step("hollow nodes joined");
    let nodes = HOLLOW + 1;
    let deadline = Instant::now() + WAIT;
    while manager
        .ok(&["node", "ls"])
        .lines()
        .filter(|l| l.contains(" Ready "))
        .count()
        < nodes
    {
        assert!(
            Instant::now() < deadline,
            "the hollow nodes never all Ready"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    step("every node Ready");
    // 60 KiB of labels on every node: `node ls` of them all is more than 4 MiB.
    let ids: Vec<String> = manager
        .ok(&["node", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), nodes);
    for id in &ids {
        let mut args = vec!["node".to_string(), "update".into()];
        args.extend(label_flags("--label-add"));
        args.push(id.clone());
        run(&manager, &args);
    }
    step("nodes labelled");
    let json = manager.ok(&["node", "ls", "--format", "json"]);
    assert!(json.len() > 4 << 20, "node ls is {} bytes", json.len());
    assert_eq!(json_len(&json), nodes);
    assert_eq!(rows(&manager.ok(&["node", "ls"])), nodes);
    assert_eq!(manager.ok(&["node", "ls", "-q"]).lines().count(), nodes);

    // One service of a task per node, each task with 60 KiB of container labels: its
    // `service ps` is more than 4 MiB. Created without --detach: the progress follows all.
    let mut args: Vec<String> = [
        "service",
        "create",
        "--no-resolve-image",
        "--name",
        "wide",
        "--replicas",
    ]
    .map(String::from)
    .into();
    args.push(HOLLOW.to_string());
    args.extend(label_flags("--container-label"));
    args.extend(["--label".into(), "tier=front".into()]);
    args.extend([IMAGE.into(), "sleep".into(), "3600".into()]);
    step("node ls checked");
    run(&manager, &args);
    step("service wide converged");
    // (The JSON shows no container labels: the tasks on the wire carry them.)
    let json = manager.ok(&["service", "ps", "--format", "json", "wide"]);
    assert_eq!(json_len(&json), HOLLOW);
    let table = manager.ok(&["service", "ps", "wide"]);
    assert_eq!(rows(&table), HOLLOW, "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(" Running ")).count(),
        HOLLOW
    );
    assert_eq!(
        manager.ok(&["service", "ps", "-q", "wide"]).lines().count(),
        HOLLOW
    );
    let running = manager.ok(&[
        "service",
        "ps",
        "-q",
        "--filter",
        "desired-state=running",
        "wide",
    ]);
    assert_eq!(running.lines().count(), HOLLOW);
    let shutdown = manager.ok(&[
        "service",
        "ps",
        "-q",
        "--filter",
        "desired-state=shutdown",
        "wide",
    ]);
    assert_eq!(shutdown.lines().count(), 0);
    // The tasks on one hollow node, by its hostname: one, named wide.N.
    let on = manager.ok(&["node", "ps", "--no-trunc", "hollow007"]);
    assert_eq!(rows(&on), 1, "{on}");
    assert!(on.contains("wide."), "{on}");
    let one = manager.ok(&["service", "ps", "-q", "--filter", "node=hollow007", "wide"]);
    assert_eq!(one.lines().count(), 1);
    assert_eq!(
        one.trim(),
        manager.ok(&["node", "ps", "-q", "hollow007"]).trim()
    );

    // 40 more services of 120 KiB of labels: `service ls` of them is more than 4 MiB.
    for i in 0..SERVICES {
        let mut args: Vec<String> = [
            "service",
            "create",
            "--no-resolve-image",
            "--detach",
            "--replicas",
            "0",
        ]
        .map(String::from)
        .into();
        args.extend(["--name".into(), format!("s{i:02}")]);
        args.extend(label_flags("--label"));
        args.extend(label_flags("--container-label"));
        args.extend([IMAGE.into(), "true".into()]);
        run(&manager, &args);
    }
    step("services created");
    let json = manager.ok(&["service", "ls", "--format", "json"]);
    assert!(json.len() > 4 << 20, "service ls is {} bytes", json.len());
    assert_eq!(json_len(&json), SERVICES + 1);
    assert_eq!(rows(&manager.ok(&["service", "ls"])), SERVICES + 1);
    assert_eq!(
        manager.ok(&["service", "ls", "-q"]).lines().count(),
        SERVICES + 1
    );
    // Filters over the pages: by name start, label and mode.
    let named = manager.ok(&["service", "ls", "-q", "--filter", "name=s1"]);
    assert_eq!(named.lines().count(), 10, "{named}");
    let front = manager.ok(&["service", "ls", "--filter", "label=tier=front"]);
    assert_eq!(rows(&front), 1, "{front}");
    assert!(front.contains(" wide "), "{front}");
    let keyed = manager.ok(&["service", "ls", "-q", "--filter", "label=k3"]);
    assert_eq!(keyed.lines().count(), SERVICES);
    let global = manager.ok(&["service", "ls", "-q", "--filter", "mode=global"]);
    assert_eq!(global.lines().count(), 0);

    rt.block_on(async {
        for a in agents {
            a.shutdown().await;
        }
    });
}
