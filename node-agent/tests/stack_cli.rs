//! `shoal stack` end to end: compose files deployed onto a real cluster (agents on 127.0.0.x,
//! busybox containers), redeployed, listed and removed through the CLI.

use crate::services;

use std::path::Path;

use services::*;

fn write(c: &Cluster, name: &str, text: &str) -> String {
    let p = c._root.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn version(c: &Cluster, service: &str) -> u64 {
    c.inspect(service)["Version"]["Index"].as_u64().unwrap()
}

fn stack_file(api_env: &str) -> String {
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
      MODE: {api_env}
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

fn all_running(c: &Cluster) -> bool {
    let out = c.any().ok(&["stack", "services", "st"]);
    ["st_web", "st_api", "st_worker"].iter().all(|s| {
        out.lines().any(|l| {
            l.contains(&format!(" {s} "))
                && l.split_whitespace()
                    .nth(3)
                    .is_some_and(|r| r.split_once('/').is_some_and(|(a, b)| a == b && a != "0"))
        })
    })
}

#[test]
fn deploy_redeploy_list_and_remove_a_stack() {
    let c = Cluster::new(2, 1);
    let m = &c.nodes[0];
    let f = write(&c, "stack.yml", &stack_file("one"));
    let out = m.ok(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "st",
    ]);
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
    c.until("every task of the stack running", || all_running(&c));
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

    // The same files again: nothing changes.
    let before = [
        version(&c, "st_web"),
        version(&c, "st_api"),
        version(&c, "st_worker"),
    ];
    let out = m.ok(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "st",
    ]);
    assert_eq!(out, "", "an unchanged stack makes no call");
    // One change in a second file: only that service is updated.
    let over = write(
        &c,
        "override.yml",
        "services:\n  api:\n    environment:\n      MODE: two\n",
    );
    let out = m.ok(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "-c",
        &over,
        "--resolve-image",
        "never",
        "st",
    ]);
    assert!(out.starts_with("Updating service st_api (id: "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(version(&c, "st_web"), before[0]);
    assert_eq!(version(&c, "st_worker"), before[2]);
    assert!(version(&c, "st_api") > before[1]);
    let env = c.inspect("st_api")["Spec"].to_string();
    assert!(env.contains("MODE=two"), "{env}");
    c.until("st_api's tasks replaced", || {
        let tasks = c.tasks_json("st_api");
        let now: Vec<_> = tasks
            .iter()
            .filter(|t| t.to_string().contains("MODE=two"))
            .filter(|t| t["Status"]["State"] == "running")
            .collect();
        now.len() == 2
    });

    // A service gone from the file stays without --prune, goes with it.
    let smaller = write(
        &c,
        "smaller.yml",
        &stack_file("one").replace("  worker:\n", "  x-worker:\n"),
    );
    m.ok(&[
        "stack",
        "deploy",
        "-c",
        &smaller,
        "--resolve-image",
        "never",
        "st",
    ]);
    assert!(m.ok(&["service", "ls"]).contains("st_worker"));
    let out = m.ok(&[
        "stack",
        "deploy",
        "--prune",
        "-c",
        &smaller,
        "--resolve-image",
        "never",
        "st",
    ]);
    assert!(out.contains("Removing service st_worker"), "{out}");
    assert!(!m.ok(&["service", "ls"]).contains("st_worker"));

    let out = m.ok(&["stack", "rm", "st"]);
    assert!(out.contains("Removing service st_web"), "{out}");
    assert!(out.contains("Removing network st_back"), "{out}");
    assert_eq!(m.ok(&["service", "ls"]).lines().count(), 1);
    let networks = m.ok(&["network", "ls"]);
    assert!(!networks.contains("st_"), "{networks}");
    assert_eq!(m.ok(&["stack", "ls"]).lines().count(), 1);
    c.until("containers removed", || {
        c.nodes.iter().all(|n| n.containers().is_empty())
    });
    let e = m.fails(&["stack", "rm", "st"]);
    assert_eq!(e, "shoal: nothing found in stack: st\n");
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
    let e = m.fails(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "bad",
    ]);
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
    let e = m.fails(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "bad",
    ]);
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
    let e = m.fails(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "bad",
    ]);
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
    let e = m.fails(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "half",
    ]);
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
    let out = m.ok(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "st",
    ]);
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
    let again = m.ok(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "st",
    ]);
    assert!(!again.contains("Creating secret"), "{again}");

    m.ok(&["stack", "rm", "st"]);
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
    let out = m.shoal(&[
        "stack",
        "deploy",
        "-c",
        &f,
        "--resolve-image",
        "never",
        "st",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("secret \"gone\" is declared as external"),
        "{err}"
    );
    assert!(!m.ok(&["network", "ls"]).contains("st_default"));
}
