//! `shoal stack` end to end: compose files deployed onto a real cluster (agents on 127.0.0.x,
//! busybox containers), redeployed, listed and removed through the CLI.

use crate::services;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use services::*;

fn write(c: &Cluster, name: &str, text: &str) -> String {
    let p = c._root.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// The arguments of `stack deploy [EXTRA] -c FILE… --resolve-image never STACK` (the images
/// are the ones the nodes hold).
fn deploy_args<'a>(files: &[&'a str], extra: &[&'a str], stack: &'a str) -> Vec<&'a str> {
    let mut a = vec!["stack", "deploy"];
    a.extend_from_slice(extra);
    for f in files {
        a.extend(["-c", f]);
    }
    a.extend(["--resolve-image", "never", stack]);
    a
}

/// A `stack deploy` that must succeed; its output.
fn deploy(n: &Node, files: &[&str], stack: &str) -> String {
    n.ok(&deploy_args(files, &[], stack))
}

fn version(c: &Cluster, service: &str) -> u64 {
    c.inspect(service)["Version"]["Index"].as_u64().unwrap()
}

/// The ids of every task the store holds for `service` (running or not).
fn task_ids(c: &Cluster, service: &str) -> BTreeSet<String> {
    c.tasks_json(service)
        .iter()
        .map(|t| t["ID"].as_str().unwrap().to_string())
        .collect()
}

/// Every service `STACK_NAME` of `names` runs all its replicas (`stack services`).
fn all_running(c: &Cluster, stack: &str, names: &[&str]) -> bool {
    let out = c.any().ok(&["stack", "services", stack]);
    names.iter().all(|s| {
        out.lines().any(|l| {
            l.contains(&format!(" {stack}_{s} "))
                && l.split_whitespace()
                    .nth(3)
                    .is_some_and(|r| r.split_once('/').is_some_and(|(a, b)| a == b && a != "0"))
        })
    })
}

/// Waits until nothing of the tasks `ids` is left on the machine (their containers, dirs,
/// files, cgroups, namespaces, mounts, links and address reservations on every node), no
/// node holds a container, and no mount is left under the nodes' directories.
fn assert_nothing_left(c: &Cluster, ids: &BTreeSet<String>) {
    assert!(!ids.is_empty());
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let mut left: Vec<String> = ids.iter().flat_map(|id| c.task_traces(id)).collect();
        for n in &c.nodes {
            left.extend(
                n.containers()
                    .into_iter()
                    .map(|id| format!("{id} on {}", n.host)),
            );
        }
        left.extend(mounts_under(c._root.path()));
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left of the stack's tasks: {left:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What this network namespace (where the loopback nodes' containers are) still has of the
/// overlay with VNI `vni`: its devices (`shb…`, `shx…`) and its state dir. The test cluster's
/// VNIs are its own (`VniLease`): nothing of a cluster of another test is named by them.
fn overlay_traces(vni: &str) -> Vec<String> {
    let ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let state = Path::new(shoal_runtime::network::RUN_DIR)
        .join("net")
        .join(format!("ov{vni}@{ino}"));
    let devices = [format!("shb{vni}"), format!("shx{vni}")];
    let mut left: Vec<String> = link_names()
        .into_iter()
        .filter(|l| devices.contains(l))
        .collect();
    if state.exists() {
        left.push(state.display().to_string());
    }
    left
}

fn stack_file() -> String {
    format!(
        r#"version: "3.8"
x-common: &common
  image: {IMAGE}
  stop_grace_period: 1s
services:
  web:
    <<: *common
    command: sleep 3600
    networks: [back]
    deploy:
      replicas: 2
      labels:
        tier: front
  api:
    <<: *common
    command: ["sleep", "3600"]
    environment:
      MODE: one
    networks:
      back:
        aliases: [backend]
    deploy:
      replicas: 2
      update_config:
        parallelism: 2
  worker:
    <<: *common
    entrypoint: ["/bin/sh", "-c"]
    command: ["sleep 3600"]
    deploy:
      mode: global
networks:
  back:
    driver: overlay
    attachable: true
"#
    )
}

#[test]
fn deploy_redeploy_list_and_remove_a_stack() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    let f = write(&c, "stack.yml", &stack_file());
    let out = deploy(m, &[&f], "st");
    // Networks before services.
    let created: Vec<&str> = out.lines().collect();
    assert_eq!(
        created,
        [
            "Creating network st_back",
            "Creating network st_default",
            "Creating service st_web",
            "Creating service st_api",
            "Creating service st_worker",
        ],
        "{out}"
    );
    c.until("every task of the stack running", || {
        all_running(&c, "st", &["web", "api", "worker"])
    });
    for s in ["st_web", "st_api", "st_worker"] {
        c.assert_real(s);
    }
    assert_eq!(c.running("st_worker").len(), 2, "global: one per node");
    let spec = &c.inspect("st_web")["Spec"];
    let spec_text = spec.to_string();
    assert!(
        spec_text.contains("com.docker.stack.namespace"),
        "{spec_text}"
    );
    assert!(spec_text.contains("tier"), "{spec_text}");

    let ls = m.ok(&["stack", "ls"]);
    assert_eq!(
        ls.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        [vec!["NAME", "SERVICES"], vec!["st", "3"]],
        "{ls}"
    );
    let ps = m.ok(&["stack", "ps", "st"]);
    for name in ["st_web.1", "st_web.2", "st_api.1", "st_api.2", "st_worker."] {
        assert!(ps.contains(name), "{ps}");
    }
    let services = m.ok(&["stack", "services", "st"]);
    assert_eq!(services.lines().count(), 4, "{services}");
    assert!(services.contains("replicated   2/2"), "{services}");
    let networks = m.ok(&["network", "ls"]);
    assert!(
        networks.contains("st_back") && networks.contains("st_default"),
        "{networks}"
    );

    // The same files again: nothing changes (a one-service change is in
    // a_full_stack_deploys_redeploys_one_service_and_leaves_nothing).
    let before = [
        version(&c, "st_web"),
        version(&c, "st_api"),
        version(&c, "st_worker"),
    ];
    let out = deploy(m, &[&f], "st");
    assert_eq!(out, "", "an unchanged stack makes no call");
    assert_eq!(
        [
            version(&c, "st_web"),
            version(&c, "st_api"),
            version(&c, "st_worker"),
        ],
        before
    );
    let mut ids: BTreeSet<String> = ["st_web", "st_api", "st_worker"]
        .iter()
        .flat_map(|s| task_ids(&c, s))
        .collect();

    // A service gone from the file stays without --prune, goes with it.
    let smaller = write(
        &c,
        "smaller.yml",
        &stack_file().replace("  worker:\n", "  x-worker:\n"),
    );
    deploy(m, &[&smaller], "st");
    assert!(m.ok(&["service", "ls"]).contains("st_worker"));
    let out = m.ok(&deploy_args(&[&smaller], &["--prune"], "st"));
    assert!(out.contains("Removing service st_worker"), "{out}");
    assert!(!m.ok(&["service", "ls"]).contains("st_worker"));

    ids.extend(["st_web", "st_api"].iter().flat_map(|s| task_ids(&c, s)));
    let out = m.ok(&["stack", "rm", "st"]);
    assert!(out.contains("Removing service st_web"), "{out}");
    assert!(out.contains("Removing network st_back"), "{out}");
    assert_eq!(m.ok(&["service", "ls"]).lines().count(), 1);
    let networks = m.ok(&["network", "ls"]);
    assert!(!networks.contains("st_"), "{networks}");
    assert_eq!(m.ok(&["stack", "ls"]).lines().count(), 1);
    assert_nothing_left(&c, &ids);
    let e = m.fails(&["stack", "rm", "st"]);
    assert_eq!(e, "shoal: nothing found in stack: st\n");
}

/// The issue's stack: three services on one overlay network; `api` reads a secret made from
/// a file, `web` has a health check, `worker` runs on every node.
fn full_stack_file() -> String {
    format!(
        r#"version: "3.8"
x-common: &common
  image: {IMAGE}
  stop_grace_period: 1s
  networks: [back]
services:
  web:
    <<: *common
    command: ["sh", "-c", "touch /tmp/up; exec sleep 3600"]
    healthcheck:
      test: ["CMD-SHELL", "test -e /tmp/up"]
      interval: 1s
      timeout: 5s
      retries: 3
    deploy:
      replicas: 2
  api:
    <<: *common
    command: ["sh", "-c", "echo mode=$$MODE pw=$$(cat /run/secrets/pw); exec sleep 3600"]
    environment:
      MODE: one
    secrets: [pw]
    deploy:
      replicas: 2
  worker:
    <<: *common
    command: sleep 3600
    deploy:
      mode: global
networks:
  back:
    driver: overlay
secrets:
  pw:
    file: pw.txt
"#
    )
}

/// The lines `api`'s tasks printed with its secret in mode `mode`.
fn secret_lines(c: &Cluster, mode: &str) -> usize {
    let want = format!("mode={mode} pw=hunter2-full");
    c.any()
        .ok(&["service", "logs", "--raw", "full_api"])
        .lines()
        .filter(|l| *l == want)
        .count()
}

#[test]
fn a_full_stack_deploys_redeploys_one_service_and_leaves_nothing() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    write(&c, "pw.txt", "hunter2-full");
    let f = write(&c, "full.yml", &full_stack_file());
    let out = deploy(m, &[&f], "full");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "Creating network full_back",
            "Creating secret full_pw",
            "Creating service full_web",
            "Creating service full_api",
            "Creating service full_worker",
        ],
        "{out}"
    );
    let services = ["full_web", "full_api", "full_worker"];
    c.until("every task of the stack running", || {
        all_running(&c, "full", &["web", "api", "worker"])
    });
    for s in services {
        c.assert_real(s);
    }
    assert_eq!(c.per_node("full_worker").len(), 2, "global: one per node");
    // One overlay network, every task on it.
    let net: serde_json::Value =
        serde_json::from_str(&m.ok(&["network", "inspect", "full_back"])).unwrap();
    let vni = net[0]["Options"]["com.docker.network.driver.overlay.vxlanid_list"]
        .as_str()
        .unwrap()
        .to_string();
    let net_id = net[0]["ID"].as_str().unwrap().to_string();
    for s in services {
        for t in c.tasks_json(s) {
            assert_eq!(
                t["NetworksAttachments"][0]["Network"]["ID"], net_id,
                "{s}: {t:#}"
            );
        }
    }
    // The secret, read at /run/secrets/pw by each of api's tasks.
    c.until("api's tasks printed the secret", || {
        secret_lines(&c, "one") == 2
    });
    // The health check: web's tasks get healthy, and say so.
    c.until("web's tasks healthy", || {
        let tasks = c.tasks_json("full_web");
        tasks.len() == 2
            && tasks
                .iter()
                .all(|t| t["Status"]["Health"]["Status"] == "healthy")
    });
    let ps = m.ok(&["service", "ps", "full_web"]);
    assert_eq!(ps.matches("Running (healthy) ").count(), 2, "{ps}");
    let hc = c.inspect("full_web")["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"].clone();
    assert_eq!(hc["Test"][0], "CMD-SHELL", "{hc}");
    assert!(
        c.inspect("full_api")["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"].is_null()
    );

    // What a running task holds on its node: what must be gone after `stack rm`.
    for s in services {
        for id in c.running(s).keys() {
            let traces = c.task_traces(id).join("\n");
            for kind in [
                "container ",
                "cgroup ",
                "netns ",
                "mount ",
                "link shv",
                "link so",
            ] {
                assert!(
                    traces.contains(kind),
                    "{s} task {id} has no {kind}: {traces}"
                );
            }
        }
    }

    // One change in one service: only it is updated; the others keep their version and
    // their tasks.
    let versions = services.map(|s| version(&c, s));
    let tasks = services.map(|s| task_ids(&c, s));
    let over = write(
        &c,
        "override.yml",
        "services:\n  api:\n    environment:\n      MODE: two\n",
    );
    let out = deploy(m, &[&f, &over], "full");
    assert!(out.starts_with("Updating service full_api (id: "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(version(&c, "full_api") > versions[1]);
    // api's new tasks (none of the old ones) read the secret too.
    c.until("api's tasks replaced", || {
        let now = c.running("full_api");
        now.len() == 2 && now.keys().all(|id| !tasks[1].contains(id))
    });
    c.until("api's new tasks printed the secret", || {
        secret_lines(&c, "two") == 2
    });
    for (i, s) in services.iter().enumerate() {
        if *s != "full_api" {
            assert_eq!(version(&c, s), versions[i], "{s}");
            assert_eq!(task_ids(&c, s), tasks[i], "{s}: its tasks kept");
            let running: BTreeSet<String> = c.running(s).into_keys().collect();
            assert_eq!(running, tasks[i], "{s}: its tasks still running");
        }
    }

    // Removed: nothing of it in the cluster, nothing of its tasks on any node.
    let mut ids: BTreeSet<String> = services.iter().flat_map(|s| task_ids(&c, s)).collect();
    ids.extend(tasks.into_iter().flatten());
    let out = m.ok(&["stack", "rm", "full"]);
    for s in services {
        assert!(out.contains(&format!("Removing service {s}\n")), "{out}");
    }
    assert!(out.contains("Removing secret full_pw\n"), "{out}");
    assert!(out.contains("Removing network full_back\n"), "{out}");
    assert_eq!(m.ok(&["service", "ls"]).lines().count(), 1);
    assert_eq!(m.ok(&["stack", "ls"]).lines().count(), 1);
    let networks = m.ok(&["network", "ls"]);
    assert!(!networks.contains("full_"), "{networks}");
    let secrets = m.ok(&["secret", "ls"]);
    assert_eq!(secrets.lines().count(), 1, "{secrets}");
    assert_nothing_left(&c, &ids);
    c.until("the overlay's devices and records removed", || {
        overlay_traces(&vni).is_empty()
    });
}

fn nothing_created(m: &Node) {
    assert_eq!(m.ok(&["service", "ls"]).lines().count(), 1);
    let networks = m.ok(&["network", "ls"]);
    assert!(!networks.contains("bad_"), "{networks}");
}

#[test]
fn bad_compose_files_are_refused_by_line_and_create_nothing() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    let f = write(
        &c,
        "unknown.yml",
        &format!("services:\n  web:\n    image: {IMAGE}\n    networks: [n]\n  db:\n    image: {IMAGE}\n    build: .\nnetworks:\n  n: {{}}\n"),
    );
    let e = m.fails(&deploy_args(&[&f], &[], "bad"));
    assert_eq!(
        e,
        format!("shoal: {f}:7: services.db.build: not supported by shoal stack deploy\n")
    );
    nothing_created(m);

    let f = write(
        &c,
        "interp.yml",
        &format!("services:\n  web:\n    image: {IMAGE}\n  db:\n    image: {IMAGE}\n    user: ${{SHOAL_TEST_UNSET_USER:?must be set}}\n"),
    );
    let e = m.fails(&deploy_args(&[&f], &[], "bad"));
    assert_eq!(
        e,
        format!("shoal: {f}:6: services.db.user: variable SHOAL_TEST_UNSET_USER is required and not set: must be set\n")
    );
    let f = write(
        &c,
        "unclosed.yml",
        &format!("services:\n  web:\n    image: {IMAGE}\n    command: echo ${{HOME\n"),
    );
    let e = m.fails(&["stack", "deploy", "-c", &f, "bad"]);
    assert!(
        e.starts_with(&format!("shoal: {f}:4: services.web.command: unclosed ${{")),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
    // A spec the service flags would refuse: refused before any call, naming the service.
    let f = write(
        &c,
        "spec.yml",
        &format!("services:\n  web:\n    image: {IMAGE}\n  db:\n    image: {IMAGE}\n    deploy:\n      resources:\n        limits:\n          memory: lots\n"),
    );
    let e = m.fails(&["stack", "deploy", "-c", &f, "bad"]);
    assert!(
        e.starts_with(&format!("shoal: {f}:4: services.db: invalid size")),
        "{e}"
    );
    // A missing external network: found out before any write.
    let f = write(
        &c,
        "external.yml",
        &format!("services:\n  web:\n    image: {IMAGE}\n    networks: [outside]\nnetworks:\n  outside:\n    external: true\n"),
    );
    let e = m.fails(&deploy_args(&[&f], &[], "bad"));
    assert_eq!(
        e,
        "shoal: network \"outside\" is declared as external, but could not be found\n"
    );
    nothing_created(m);
    assert!(Path::new(&f).exists());
}

#[test]
fn a_call_failing_midway_names_what_was_done() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    // A service outside any stack holds the name the file's second service would take.
    m.ok(&[
        "service", "create", "--detach", "--name", "half_b", IMAGE, "sleep", "3600",
    ]);
    let f = write(
        &c,
        "half.yml",
        &format!("services:\n  a:\n    image: {IMAGE}\n    command: sleep 3600\n  b:\n    image: {IMAGE}\n"),
    );
    let e = m.fails(&deploy_args(&[&f], &[], "half"));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("shoal: creating service half_b: "), "{e}");
    assert!(
        e.trim_end()
            .ends_with("(done before it: created network half_default, created service half_a)"),
        "{e}"
    );
    // What it names is there; `stack rm` takes the stack's part and leaves the other service.
    let ls = m.ok(&["stack", "services", "half"]);
    assert!(ls.contains("half_a") && !ls.contains("half_b"), "{ls}");
    m.ok(&["stack", "rm", "half"]);
    let ls = m.ok(&["service", "ls"]);
    assert!(ls.contains("half_b") && !ls.contains("half_a"), "{ls}");
    assert!(!m.ok(&["network", "ls"]).contains("half_default"));
}

#[test]
fn a_stack_brings_its_secrets_and_configs_and_takes_them_away() {
    let c = Cluster::new(1, 1);
    let m = &c.nodes[0];
    write(&c, "pw.txt", "hunter2-stack");
    write(&c, "app.conf", "level=debug\n");
    m.ok(&[
        "secret",
        "create",
        "shared",
        &write(&c, "shared.txt", "from-outside"),
    ]);
    let f = write(
        &c,
        "s.yml",
        &format!(
            r#"services:
  app:
    image: {IMAGE}
    stop_grace_period: 1s
    command: ["sh", "-c", "echo pw=$$(cat /run/secrets/pw) other=$$(cat /run/secrets/other); stat -c 'own=%u:%g:%a' /etc/app.conf; sleep 3600"]
    secrets:
      - pw
      - source: shared
        target: /run/secrets/other
    configs:
      - source: conf
        target: /etc/app.conf
        uid: "1000"
        mode: 0440
secrets:
  pw: {{file: pw.txt}}
  shared: {{external: true}}
configs:
  conf: {{file: app.conf}}
"#
        ),
    );
    let out = deploy(m, &[&f], "st");
    assert!(
        out.contains("Creating secret st_pw") && out.contains("Creating config st_conf"),
        "{out}"
    );
    c.until("the task printed its files", || {
        m.ok(&["service", "logs", "--raw", "st_app"])
            .contains("own=")
    });
    let log = m.ok(&["service", "logs", "--raw", "st_app"]);
    assert!(log.contains("pw=hunter2-stack other=from-outside"), "{log}");
    assert!(log.contains("own=1000:0:440"), "{log}");
    let secrets = m.ok(&["secret", "ls"]);
    assert!(
        secrets.contains("st_pw") && secrets.contains("shared"),
        "{secrets}"
    );
    // Deployed again: kept, not created twice.
    let again = deploy(m, &[&f], "st");
    assert!(!again.contains("Creating secret"), "{again}");

    let ids = task_ids(&c, "st_app");
    m.ok(&["stack", "rm", "st"]);
    assert_nothing_left(&c, &ids);
    let secrets = m.ok(&["secret", "ls"]);
    assert!(
        !secrets.contains("st_pw") && secrets.contains("shared"),
        "{secrets}"
    );
    assert!(!m.ok(&["config", "ls"]).contains("st_conf"));

    // An external one that does not exist stops the deploy before anything is made.
    let f = write(
        &c,
        "bad.yml",
        &format!(
            "services:\n  app:\n    image: {IMAGE}\n    secrets: [gone]\nsecrets:\n  gone: {{external: true}}\n"
        ),
    );
    let out = m.shoal(&deploy_args(&[&f], &[], "st"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("secret \"gone\" is declared as external"),
        "{err}"
    );
    assert!(!m.ok(&["network", "ls"]).contains("st_default"));
}
