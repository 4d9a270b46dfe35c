//! Scale (issue 4): 3 `shoal agent` managers on 127.0.0.1, drained, plus N hollow nodes spread
//! over a few host processes (`shoal-bench hollow-nodes`), each hollow node with its own key,
//! certificate and dispatcher session and the sim executor (no container). A service of R
//! replicas is created and the time until all R tasks are RUNNING is measured, with the
//! managers' and the hosts' memory. Every process started here is killed by pid at the end
//! (when its handle drops, so on errors too); all traffic stays on 127.0.0.1.
//!
//! No peer runs here: the reference is Nomad's published C2M figure (about 3,750 containers/s
//! on a large cluster), quoted in BENCHMARKS.md, not measured.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::Request;

use crate::cluster::{mem_of, Mem, Proc, Shoal, Side, Timers, MEMBERS};

/// Hollow nodes joining at once in one host process (each join is a CSR and a Raft write).
pub const JOIN_CONCURRENCY: usize = 16;
/// Attempts of one hollow node's join (a busy leader may time a join out).
pub const JOIN_ATTEMPTS: u32 = 5;
/// Most hollow nodes one host process runs.
pub const MAX_HOLLOW_PER_HOST: usize = 5_000;
/// Most hollow nodes and host processes of one run.
pub const MAX_NODES: usize = 10_000;
pub const MAX_HOST_PROCS: usize = 16;
/// Most replicas of the service.
pub const MAX_REPLICAS: u64 = 1_000_000;
/// How often node counts are polled, and task counts near the end (each poll is one control
/// API call on the leader).
const POLL: Duration = Duration::from_millis(200);
/// How often task counts are polled while far from done: counting reads every task of the
/// service on the leader, which must not load the system under test much.
const SLOW_POLL: Duration = Duration::from_secs(1);
/// Share of the replicas running from which [`POLL`] applies.
const NEAR_DONE: f64 = 0.9;
/// Longest wait for every hollow node to be Ready.
const JOIN_DEADLINE: Duration = Duration::from_secs(600);
/// Longest wait for every task to run (a failed run, not a slow one).
const RUN_DEADLINE: Duration = Duration::from_secs(900);
/// Pause before reading idle memory (the managers settle after the joins).
const SETTLE: Duration = Duration::from_secs(3);
/// How long one control API call of the poller may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The service under test; the image reference is never pulled (sim executor).
const SERVICE: &str = "scale";
const IMAGE: &str = "busybox:1.36";
/// Failed task-count polls tolerated (leader changes under load) before the run fails.
const MAX_POLL_ERRORS: usize = 100;
/// Largest control API answer the poller accepts (node ls of thousands of nodes).
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// What a host process prints once all its nodes have joined.
const JOINED_LINE: &str = "joined";

#[derive(clap::Args)]
pub struct HollowArgs {
    /// Hollow nodes to run in this process.
    #[arg(long)]
    count: usize,
    /// Worker join token.
    #[arg(long)]
    token: String,
    /// Manager address (host:port) to join through.
    #[arg(long)]
    manager: String,
    /// Directory for this host's record of its nodes (hollow nodes keep no task data).
    #[arg(long)]
    data_dir: PathBuf,
    /// Hostname prefix: nodes are PREFIX-0000, PREFIX-0001, ...
    #[arg(long, default_value = "hollow")]
    prefix: String,
}

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// Hollow nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Replicas of the service.
    #[arg(long, default_value_t = 100_000)]
    replicas: u64,
    /// Processes the hollow nodes are spread over.
    #[arg(long, default_value_t = 4)]
    hosts_procs: usize,
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Parent of the run's temporary directory.
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
    /// Raft timers instead of shoal's defaults, in ms: HEARTBEAT,MIN,MAX (set with
    /// `cluster update` before the nodes join; the managers restart to take them).
    #[arg(long, value_delimiter = ',')]
    raft_timers: Option<Vec<u64>>,
    /// Longest wait, in seconds, for the joins and again for the tasks (default 600 and 900):
    /// a run that takes longer fails with what it reached.
    #[arg(long)]
    deadline: Option<u64>,
    /// Keep the run's directory (managers' and hosts' logs) after a successful run too.
    #[arg(long)]
    keep_logs: bool,
}

impl ScaleArgs {
    fn deadline(&self, default: Duration) -> Duration {
        self.deadline.map_or(default, Duration::from_secs)
    }
}

fn timers(a: &ScaleArgs) -> Result<Option<Timers>> {
    match a.raft_timers.as_deref() {
        None => Ok(None),
        Some(&[heartbeat, election_min, election_max])
            if heartbeat > 0 && heartbeat < election_min && election_min <= election_max =>
        {
            Ok(Some(Timers {
                heartbeat,
                election_min,
                election_max,
            }))
        }
        Some(_) => {
            bail!("--raft-timers: expected HEARTBEAT,MIN,MAX with 0 < HEARTBEAT < MIN <= MAX")
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

// ---- the hollow-node host ----

/// Joins one hollow node and starts its agent.
async fn hollow_node(
    manager: String,
    token: String,
    hostname: String,
) -> Result<(String, shoal_worker::Agent)> {
    Ok(shoal_worker::hollow::join_hollow(&manager, &token, &hostname, JOIN_ATTEMPTS).await?)
}

/// `shoal-bench hollow-nodes`: joins `count` hollow nodes in this process and runs them until
/// the process is killed (or gets SIGINT/SIGTERM).
pub fn hollow_nodes(a: &HollowArgs) -> Result<()> {
    if a.count == 0 || a.count > MAX_HOLLOW_PER_HOST {
        bail!("--count must be 1..={MAX_HOLLOW_PER_HOST}");
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    runtime()?.block_on(async {
        let t = Instant::now();
        let limit = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
        let mut joins = JoinSet::new();
        for i in 0..a.count {
            let (manager, token) = (a.manager.clone(), a.token.clone());
            let hostname = format!("{}-{i:04}", a.prefix);
            let limit = limit.clone();
            joins.spawn(async move {
                let _permit = limit.acquire_owned().await?;
                hollow_node(manager, token, hostname).await
            });
        }
        let mut agents = Vec::with_capacity(a.count);
        let mut ids = String::new();
        while let Some(r) = joins.join_next().await {
            let (id, agent) = r.context("a join task panicked")??;
            ids.push_str(&id);
            ids.push('\n');
            agents.push(agent);
        }
        std::fs::write(a.data_dir.join("nodes"), ids).context("recording the node ids")?;
        println!("{JOINED_LINE} {} {}", agents.len(), t.elapsed().as_millis());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        for agent in agents {
            agent.shutdown().await;
        }
        Ok(())
    })
}

// ---- the benchmark ----

/// One hollow-node host process.
struct Host {
    proc: Proc,
    log: PathBuf,
    stdout: BufReader<std::process::ChildStdout>,
}

fn start_host(root: &Path, k: usize, count: usize, token: &str, manager: &str) -> Result<Host> {
    let dir = root.join(format!("hollow{k}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join("host.log");
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(std::env::current_exe().context("this executable")?);
    cmd.args([
        "hollow-nodes",
        "--count",
        &count.to_string(),
        "--token",
        token,
    ])
    .args(["--manager", manager, "--prefix", &format!("hollow{k}")])
    .arg("--data-dir")
    .arg(&dir)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(err);
    let mut proc = Proc::spawn(&mut cmd, &format!("hollow-node host {k}"))?;
    let stdout = proc.take_stdout().context("the host's stdout")?;
    Ok(Host {
        proc,
        log,
        stdout: BufReader::new(stdout),
    })
}

/// Nodes the managers know and how many of them are hollow and Ready.
async fn hollow_ready(c: &mut ControlClient<tonic::transport::Channel>) -> Result<(usize, usize)> {
    let nodes = shoal_proto::paging::all_pages(pb::ListNodesRequest::default(), |r| {
        let mut c = c.clone();
        let mut req = Request::new(r);
        req.set_timeout(CALL_TIMEOUT);
        async move { c.list_nodes(req).await.map(|r| r.into_inner()) }
    })
    .await
    .map_err(|s| anyhow::anyhow!("node ls: {}", s.message()))?;
    let ready = nodes
        .iter()
        .filter(|n| n.description.as_ref().is_some_and(|d| d.hollow))
        .filter(|n| n.status.as_ref().map(|s| s.state) == Some(pb::NodeState::Ready as i32))
        .count();
    Ok((nodes.len(), ready))
}

/// (desired, running) tasks of the service, counted by the manager.
async fn running(c: &mut ControlClient<tonic::transport::Channel>) -> Result<(u64, u64)> {
    let mut req = Request::new(pb::ListServicesRequest {
        name_prefix: SERVICE.into(),
        ..Default::default()
    });
    req.set_timeout(CALL_TIMEOUT);
    let services = c
        .list_services(req)
        .await
        .map_err(|s| anyhow::anyhow!("service ls: {}", s.message()))?
        .into_inner()
        .services;
    Ok(services
        .iter()
        .find(|s| {
            s.service
                .as_ref()
                .and_then(|s| s.spec.as_ref())
                .is_some_and(|sp| sp.name == SERVICE)
        })
        .map_or((0, 0), |s| (s.desired_tasks, s.running_tasks)))
}

/// What the tasks that are not running are doing: counts by (state, desired state, message),
/// with one example task id each, for a run that missed its deadline.
async fn breakdown(c: &mut ControlClient<tonic::transport::Channel>) -> Result<String> {
    let list = pb::ListTasksRequest {
        service: SERVICE.into(),
        ..Default::default()
    };
    let tasks = shoal_proto::paging::all_pages(list, |r| {
        let mut c = c.clone();
        let mut req = Request::new(r);
        req.set_timeout(CALL_TIMEOUT);
        async move { c.list_tasks(req).await.map(|r| r.into_inner()) }
    })
    .await
    .map_err(|s| anyhow::anyhow!("service ps: {}", s.message()))?;
    type Group = (u64, String, std::collections::BTreeSet<String>);
    let mut groups: std::collections::BTreeMap<(String, String, String), Group> =
        Default::default();
    for t in &tasks {
        let st = t.status.clone().unwrap_or_default();
        if st.state == pb::TaskState::Running as i32 && t.desired_state == st.state {
            continue;
        }
        let name = |s: i32| {
            pb::TaskState::try_from(s).map_or_else(|_| s.to_string(), |s| s.as_str_name().into())
        };
        let key = (name(st.state), name(t.desired_state), st.message.clone());
        let e = groups.entry(key).or_default();
        e.0 += 1;
        e.2.insert(t.node_id.clone());
        if e.1.is_empty() {
            e.1 = format!(
                "{} on {}",
                t.meta.as_ref().map_or("", |m| m.id.as_str()),
                t.node_id
            );
        }
    }
    Ok(groups
        .iter()
        .map(|((s, d, m), (n, eg, nodes))| {
            format!(
                "{n} {s} on {} nodes (desired {d}, {m:?}; e.g. {eg})",
                nodes.len()
            )
        })
        .collect::<Vec<_>>()
        .join("; "))
}

fn kib(m: &Mem) -> String {
    format!("{:.1} MiB", m.rss as f64 / 1024.0)
}

async fn manager_mems(shoal: &Shoal) -> Result<Vec<Mem>> {
    (0..MEMBERS)
        .map(|i| {
            let pid = shoal
                .pid(i)
                .with_context(|| format!("manager {i} is not running"))?;
            mem_of(pid)
        })
        .collect()
}

/// A client of whoever leads now (`current` if that cannot be found out), counting changes.
async fn reconnect(
    shoal: &Shoal,
    leader: &mut usize,
    changes: &mut usize,
    current: ControlClient<tonic::transport::Channel>,
) -> ControlClient<tonic::transport::Channel> {
    let Ok(l) = shoal.leader().await else {
        return current;
    };
    if l != *leader {
        *changes += 1;
        *leader = l;
    }
    match shoal.channel(l).await {
        Ok(ch) => ControlClient::new(ch).max_decoding_message_size(MAX_REPLY_BYTES),
        Err(_) => current,
    }
}

/// `shoal-bench scale`.
pub fn scale(a: &ScaleArgs) -> Result<()> {
    if a.nodes == 0 || a.nodes > MAX_NODES {
        bail!("--nodes must be 1..={MAX_NODES}");
    }
    if a.hosts_procs == 0 || a.hosts_procs > MAX_HOST_PROCS || a.hosts_procs > a.nodes {
        bail!("--hosts-procs must be 1..={MAX_HOST_PROCS} and at most --nodes");
    }
    if a.nodes.div_ceil(a.hosts_procs) > MAX_HOLLOW_PER_HOST {
        bail!("at most {MAX_HOLLOW_PER_HOST} hollow nodes per host process");
    }
    if a.replicas == 0 || a.replicas > MAX_REPLICAS {
        bail!("--replicas must be 1..={MAX_REPLICAS}");
    }
    let timers = timers(a)?;
    let bin = crate::services::shoal_bin(&a.shoal)?;
    std::fs::create_dir_all(&a.workdir)
        .with_context(|| format!("creating {}", a.workdir.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("shoal-bench-scale-")
        .tempdir_in(&a.workdir)
        .with_context(|| format!("making a directory in {}", a.workdir.display()))?;
    let result = runtime()?.block_on(run(a, timers, &bin, dir.path()));
    if result.is_err() || a.keep_logs {
        // Every process is gone by now; the logs stay for the post-mortem.
        eprintln!("logs kept in {}", dir.keep().display());
    }
    result
}

async fn run(a: &ScaleArgs, timers: Option<Timers>, bin: &Path, root: &Path) -> Result<()> {
    let mut shoal = Shoal::start(bin, root).await?;
    if let Some(t) = timers {
        shoal.set_timers(t).await?;
    }
    for i in 0..MEMBERS {
        shoal.cli(
            0,
            &["node", "update", "--availability", "drain", &shoal.host(i)],
        )?;
    }
    let mut leader = shoal.leader().await?;
    let token = shoal.cli(leader, &["cluster", "join-token", "worker", "-q"])?;
    let token = token.trim().to_string();
    let mut control =
        ControlClient::new(shoal.channel(leader).await?).max_decoding_message_size(MAX_REPLY_BYTES);
    tokio::time::sleep(SETTLE).await;
    let idle = manager_mems(&shoal).await?;
    eprintln!(
        "managers idle: {} (leader {})",
        idle.iter().map(kib).collect::<Vec<_>>().join(" / "),
        shoal.host(leader)
    );

    // Joins.
    let t = Instant::now();
    let mut hosts = Vec::new();
    let per = a.nodes / a.hosts_procs;
    for k in 0..a.hosts_procs {
        let count = per + usize::from(k < a.nodes % a.hosts_procs);
        hosts.push(start_host(root, k, count, &token, &shoal.addr(leader))?);
    }
    let mut last_print = Instant::now();
    let mut errors = 0;
    let mut leader_changes = 0;
    loop {
        let ready = match hollow_ready(&mut control).await {
            Ok((_, ready)) => ready,
            Err(e) if errors < MAX_POLL_ERRORS => {
                errors += 1;
                eprintln!("  {:>6.1} s: {e:#}", t.elapsed().as_secs_f64());
                tokio::time::sleep(POLL).await;
                control = reconnect(&shoal, &mut leader, &mut leader_changes, control).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if ready == a.nodes {
            break;
        }
        for h in &mut hosts {
            if let Some(why) = h.proc.exited() {
                let log = std::fs::read_to_string(&h.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "{why}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
        }
        if t.elapsed() > a.deadline(JOIN_DEADLINE) {
            bail!(
                "{ready} of {} hollow nodes Ready after {:?}",
                a.nodes,
                a.deadline(JOIN_DEADLINE)
            );
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {:>6.1} s: {ready} hollow nodes ready",
                t.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
    let join_time = t.elapsed();
    let mut host_join_ms = Vec::new();
    for h in &mut hosts {
        let mut line = String::new();
        h.stdout
            .read_line(&mut line)
            .context("reading a host's joined line")?;
        let ms: u64 = line
            .strip_prefix(JOINED_LINE)
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected host output {line:?}"))?;
        host_join_ms.push(ms);
    }
    eprintln!(
        "{} hollow nodes Ready in {:.2} s",
        a.nodes,
        join_time.as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let before = manager_mems(&shoal).await?;
    let hosts_before: Vec<Mem> = hosts
        .iter()
        .map(|h| mem_of(h.proc.pid()))
        .collect::<Result<_>>()?;

    // The service.
    let t = Instant::now();
    shoal.cli(
        leader,
        &[
            "service",
            "create",
            "--detach",
            // The sim executor pulls nothing; no registry is asked for a digest either.
            "--no-resolve-image",
            "--name",
            SERVICE,
            "--replicas",
            &a.replicas.to_string(),
            IMAGE,
            "sleep",
            "3600",
        ],
    )?;
    let created = t.elapsed();
    let mut timeline: Vec<(f64, u64)> = Vec::new();
    let mut last_print = Instant::now();
    loop {
        let up = match running(&mut control).await {
            Ok((_, up)) => up,
            Err(e) if errors < MAX_POLL_ERRORS => {
                // A leader change under load: count it and ask whoever leads now.
                errors += 1;
                eprintln!("  {:>6.1} s: {e:#}", t.elapsed().as_secs_f64());
                tokio::time::sleep(POLL).await;
                control = reconnect(&shoal, &mut leader, &mut leader_changes, control).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        timeline.push((t.elapsed().as_secs_f64(), up));
        if up == a.replicas {
            break;
        }
        if t.elapsed() > a.deadline(RUN_DEADLINE) {
            let why = breakdown(&mut control)
                .await
                .unwrap_or_else(|e| format!("(no task list: {e:#})"));
            bail!(
                "{up} of {} tasks running after {:?}; the others: {why}",
                a.replicas,
                a.deadline(RUN_DEADLINE)
            );
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("  {:>6.1} s: {up} running", t.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        let near = up as f64 >= a.replicas as f64 * NEAR_DONE;
        tokio::time::sleep(if near { POLL } else { SLOW_POLL }).await;
    }
    let all_running = t.elapsed();
    let after = manager_mems(&shoal).await?;
    let hosts_after: Vec<Mem> = hosts
        .iter()
        .map(|h| mem_of(h.proc.pid()))
        .collect::<Result<_>>()?;
    let rate = a.replicas as f64 / all_running.as_secs_f64();

    println!(
        "scale: 3 managers (drained), {} hollow nodes in {} processes, {} replicas",
        a.nodes, a.hosts_procs, a.replicas
    );
    println!(
        "  join: all {} Ready in {:.2} s (hosts' own join times {:?} ms)",
        a.nodes,
        join_time.as_secs_f64(),
        host_join_ms
    );
    println!(
        "  service create returned in {:.2} s; all {} RUNNING in {:.2} s = {:.0} tasks/s",
        created.as_secs_f64(),
        a.replicas,
        all_running.as_secs_f64(),
        rate
    );
    println!("  leader changes seen: {leader_changes} ({errors} failed polls)");
    for i in 0..MEMBERS {
        let mark = if i == leader { " (leader)" } else { "" };
        println!(
            "  {}{mark} RSS: idle {}, with {} nodes {}, at the end {}",
            shoal.host(i),
            kib(&idle[i]),
            a.nodes,
            kib(&before[i]),
            kib(&after[i])
        );
    }
    let host_sum = |v: &[Mem]| Mem {
        rss: v.iter().map(|m| m.rss).sum(),
        ..Mem::default()
    };
    println!(
        "  hollow hosts RSS: after joins {} in all, at the end {} in all ({:.1} KiB per task)",
        kib(&host_sum(&hosts_before)),
        kib(&host_sum(&hosts_after)),
        (host_sum(&hosts_after)
            .rss
            .saturating_sub(host_sum(&hosts_before).rss)) as f64
            / a.replicas as f64
    );
    println!(
        "{}",
        serde_json::json!({
            "nodes": a.nodes, "replicas": a.replicas, "hosts": a.hosts_procs,
            "join_s": join_time.as_secs_f64(),
            "running_s": all_running.as_secs_f64(),
            "tasks_per_s": rate,
            "leader": leader,
            "leader_changes": leader_changes,
            "managers_idle_rss_kib": idle.iter().map(|m| m.rss).collect::<Vec<_>>(),
            "managers_joined_rss_kib": before.iter().map(|m| m.rss).collect::<Vec<_>>(),
            "managers_end_rss_kib": after.iter().map(|m| m.rss).collect::<Vec<_>>(),
            "hosts_end_rss_kib": hosts_after.iter().map(|m| m.rss).collect::<Vec<_>>(),
            "timeline": timeline.iter().map(|(s, n)| (format!("{s:.1}"), n)).collect::<Vec<_>>(),
        })
    );
    drop(hosts);
    drop(shoal);
    Ok(())
}
