//! `shoal-chaos`: brings up a test bed of real `shoal agent`s (3 managers and 2 workers for
//! `--smoke`; a long run has 3 or 5 managers, by its seed), runs concurrent clients against
//! it while injecting faults (one at a time, or two at once), heals, and checks: every fault
//! recovered and stayed recovered, linearizable service specs, no lost acknowledged write,
//! convergence within 15 s, never two tasks in one slot, never two tasks with one network
//! address, a routing mesh that answers outside faults, no panic, and a manager whose disk
//! fills up or stops losing the lead, refusing clearly and recovering. Writes a JSON report
//! and a summary (with the recovery per fault kind and the command that replays the run);
//! exits 0 only when every check passes. Always bounded, and the test bed is brought down on
//! every exit path (Ctrl-C included).

mod cluster;
mod faults;
mod mesh;
mod observe;
mod report;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_chaos::history;
use shoal_chaos::lincheck::SpecValue;
use shoal_proto::v1 as pb;

use cluster::{container_live, control, Cluster, CALL_TIMEOUT, READY_TIMEOUT};
use faults::{Fault, Injector, Planned, ALL};
use observe::{FaultTag, Observations};
use report::{Check, Report};
use workload::Shared;

/// Every service must run its replicas this soon after the cluster is well again.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long final reads of every service may be retried.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Workload alone before the first fault and after the last.
const WARMUP: Duration = Duration::from_secs(3);
/// Beyond the requested duration, how long setup, healing and checks may take before the
/// watchdog brings the test bed down and exits.
const WATCHDOG_SLACK: Duration = Duration::from_secs(600);
/// The agents' log filter unless RUST_LOG is set.
const AGENT_LOG_FILTER: &str = "info,openraft=info,h2=warn,tower=warn,hyper=warn";
/// Findings listed per check at most.
const MAX_FINDINGS: usize = 50;

/// Set by Ctrl-C / SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(
    name = "shoal-chaos",
    about = "Fault injection and consistency checks for shoal"
)]
struct Args {
    /// Every fault once, short holds (a few minutes): the CI run
    #[arg(long, conflicts_with = "duration")]
    smoke: bool,
    /// Keep injecting faults for this long (e.g. 10m, 90s)
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Seed of the fault and workload choices (default: random, printed)
    #[arg(long)]
    seed: Option<u64>,
    /// Where the report goes (default: a new directory under the temp dir)
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// With --smoke: only these faults (by name, like disk-full-manager, or two at once like
    /// disk-full-manager+partition-minority), in this order
    #[arg(long = "fault", value_name = "NAME")]
    only: Vec<String>,
    /// Concurrent clients
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Managers (at least 3: faults need a majority to survive one loss). Default: 3 for
    /// --smoke; for a long run 5 when the seed is odd, 3 when it is even
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..=7))]
    managers: Option<u64>,
    /// Workers
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8))]
    workers: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration '{s}'"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration '{s}' (use 90s, 10m, 1h)")),
    };
    if secs == 0 || secs > 24 * 3600 {
        return Err(format!("duration '{s}' out of range (1s..24h)"));
    }
    Ok(Duration::from_secs(secs))
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("shoal-chaos: {e:#}");
            std::process::exit(if INTERRUPTED.load(Ordering::Relaxed) {
                130
            } else {
                2
            });
        }
    }
}

/// Logs `msg` with the seconds since the run started and the UTC time of day (the agents'
/// logs are in UTC: a fault is found in them by its time).
fn log(epoch: Instant, msg: &str) {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() % 86_400_000)
        .unwrap_or(0);
    eprintln!(
        "[{:>7.1}s {:02}:{:02}:{:02}.{:03}Z] {msg}",
        epoch.elapsed().as_secs_f64(),
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    );
}

fn run(args: Args) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (network namespaces, cgroups, tmpfs)");
    }
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let mut smoke_faults: Vec<Planned> = ALL.iter().map(|&f| Planned::one(f)).collect();
    // The smoke's overlaps, always the same: a partition during a disk-full, a leader kill
    // during a rolling update (a long run draws its overlaps from the seed).
    for p in &mut smoke_faults {
        p.overlap = match p.fault {
            Fault::DiskFull => Some(Fault::PartitionMinority),
            Fault::RollingUpdate => Some(Fault::KillLeader),
            _ => None,
        };
    }
    if !args.only.is_empty() {
        smoke_faults = Vec::new();
        for n in &args.only {
            smoke_faults.push(Planned::parse(n).map_err(anyhow::Error::msg)?);
        }
    }
    let epoch = Instant::now();
    let logf = move |m: &str| log(epoch, m);
    let seed = args.seed.unwrap_or_else(|| rand::thread_rng().gen());
    // CI's smoke stays at 3 managers; long runs alternate 3 and 5 by seed (issue 18: a fault
    // seen only at 5 managers).
    let n_managers = args
        .managers
        .unwrap_or(if args.smoke || seed.is_multiple_of(2) {
            3
        } else {
            5
        }) as usize;
    let mode = if args.smoke {
        "smoke".to_string()
    } else {
        format!(
            "duration {} s",
            args.duration.unwrap_or(Duration::from_secs(600)).as_secs()
        )
    };
    let run_id = format!("{:06x}", seed & 0xff_ffff);
    // The shoal binary next to this one, unless told otherwise.
    if std::env::var_os("SHOAL_BIN").is_none() {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
        {
            let b = dir.join("shoal");
            if b.is_file() {
                std::env::set_var("SHOAL_BIN", b);
            }
        }
    }
    // The agents inherit this environment: keep openraft's own info lines (RaftCore shutting
    // down, sled recovery) in their logs, which the default filter of `shoal agent` drops.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", AGENT_LOG_FILTER);
    }
    let report_dir = args
        .report_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("shoal-chaos-{run_id}")));
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    logf(&format!(
        "shoal-chaos {mode}, seed {seed}, {n_managers} managers, report in {}",
        report_dir.display()
    ));
    let replay = format!(
        "shoal-chaos {} --seed {seed} --managers {n_managers} --workers {} --clients {}{}",
        if args.smoke {
            "--smoke".to_string()
        } else {
            format!("--duration {}s", budget_of(&args).as_secs())
        },
        args.workers,
        args.clients,
        args.only
            .iter()
            .map(|f| format!(" --fault {f}"))
            .collect::<String>()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.spawn(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("shoal-chaos: interrupted; healing and bringing the test bed down");
        INTERRUPTED.store(true, Ordering::Relaxed);
    });
    let interrupted = || INTERRUPTED.load(Ordering::Relaxed);

    let budget = budget_of(&args);
    let cluster = Cluster::start(n_managers, args.workers as usize, &logf)?;
    spawn_watchdog(&cluster, budget + WATCHDOG_SLACK);
    if interrupted() {
        bail!("interrupted");
    }
    let (d, _) = rt
        .block_on(cluster.wait_well(READY_TIMEOUT))
        .context("bootstrapping")?;
    logf(&format!("every node Ready ({:.1} s)", d.as_secs_f64()));

    let (mesh_targets, network) = mesh::setup(&cluster).context("the mesh service")?;
    logf(&format!(
        "network {} made; {} answers through every node's port {}",
        mesh::NETWORK,
        mesh::SERVICE,
        mesh::PORT
    ));
    let managers = cluster.sockets(&cluster.managers);
    let shared = Arc::new(Shared::new(run_id.clone(), managers.clone(), network));
    let tag = Arc::new(Mutex::new(FaultTag::default()));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = rt.spawn(observe::sample(
        shared.clone(),
        managers.clone(),
        tag.clone(),
        stop_sampler.clone(),
    ));
    let mesh_client = rt.spawn(mesh::client(
        mesh_targets,
        shared.clone(),
        tag.clone(),
        stop_sampler.clone(),
    ));
    let clients = workload::spawn_clients(rt.handle(), &shared, args.clients, seed);
    let workload_start = Instant::now();

    let mut inj = Injector {
        cluster: &cluster,
        rt: rt.handle().clone(),
        shared: shared.clone(),
        tag: tag.clone(),
        interrupted: &INTERRUPTED,
        rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed),
        log: &logf,
        disk: Vec::new(),
        overlap: None,
    };
    std::thread::sleep(WARMUP);
    let mut records: Vec<faults::FaultRecord> = Vec::new();
    if args.smoke {
        for &p in &smoke_faults {
            if interrupted() {
                break;
            }
            relapse_check(&inj, &mut records);
            records.push(inj.run(p, Duration::from_secs(6)));
        }
    } else {
        let mut queue: Vec<Fault> = Vec::new();
        while workload_start.elapsed() < budget && !interrupted() {
            if queue.is_empty() {
                queue = ALL.to_vec();
                queue.shuffle(&mut inj.rng);
            }
            let f = queue.pop().unwrap_or(Fault::KillLeader);
            let p = inj.plan(f);
            let hold = Duration::from_secs(inj.rng.gen_range(5..=15));
            relapse_check(&inj, &mut records);
            records.push(inj.run(p, hold));
            let calm = Duration::from_secs(inj.rng.gen_range(1..=5));
            std::thread::sleep(calm);
        }
    }
    std::thread::sleep(WARMUP);
    relapse_check(&inj, &mut records);
    let workload_s = workload_start.elapsed().as_secs_f64();

    // Stop the clients (each call is bounded), heal whatever is left, and check.
    shared.stop.store(true, Ordering::Relaxed);
    logf("stopping the clients");
    rt.block_on(async {
        for c in clients {
            let _ = tokio::time::timeout(workload::OP_TIMEOUT * 3, c).await;
        }
    });
    let heal_errors = inj.heal_all();
    let ext4_dir = cluster
        .ext4
        .as_ref()
        .map(|fs| fs.dir().display().to_string());
    let disk = std::mem::take(&mut inj.disk);
    let well = rt.block_on(cluster.wait_well(faults::RECOVERY_TIMEOUT));
    if interrupted() {
        bail!("interrupted");
    }
    logf("final reads");
    let (finals, unread) = rt.block_on(workload::final_reads(&shared, FINAL_READ_TIMEOUT));
    logf("waiting for convergence");
    let converge = rt.block_on(converge(&cluster, &shared.run_id, &finals));
    stop_sampler.store(true, Ordering::Relaxed);
    let observations = rt
        .block_on(async { tokio::time::timeout(CALL_TIMEOUT * 2, sampler).await })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let mesh_stats = rt
        .block_on(async { tokio::time::timeout(CALL_TIMEOUT * 2, mesh_client).await })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();

    let calls = shared
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut checks = vec![
        check_recovery(&records, &well, &heal_errors),
        check_lin(&calls, &unread),
        check_acked(&calls, &finals),
        converge,
    ];
    checks.extend(check_slots(&observations));
    checks.push(check_addresses(&observations));
    checks.push(check_mesh(&mesh_stats));
    checks.push(check_panics(&cluster));
    checks.push(check_disk(&disk, &records));
    let passed = checks.iter().all(|c| c.passed);
    let report = Report {
        run_id,
        mode,
        seed,
        managers: n_managers,
        replay,
        hosts: format!(
            "{} managers, {} workers ({}; tmpfs data dir {}, ext4 data dir {})",
            cluster.managers.len(),
            cluster.workers.len(),
            cluster.tb.prefix(),
            cluster
                .host(cluster.disk_host)
                .map(|h| h.name().to_string())
                .unwrap_or_default(),
            match (&ext4_dir, &cluster.ext4_missing) {
                (Some(_), _) => cluster
                    .host(cluster.ext4_host)
                    .map(|h| h.name().to_string())
                    .unwrap_or_default(),
                (None, Some(why)) => format!("none: {why}"),
                (None, None) => "none".into(),
            }
        ),
        started_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .saturating_sub(epoch.elapsed().as_secs()),
        runtime_s: epoch.elapsed().as_secs_f64(),
        workload_s,
        recovery_by_kind: report::by_kind(&records),
        faults: records,
        disk_full: disk,
        operations: report::op_stats(&calls),
        observations,
        mesh: mesh_stats,
        checks,
        passed,
    };
    // Keep the agents' logs with the report: they are what a failure is debugged from.
    for (host, text) in cluster.logs() {
        let _ = std::fs::write(report_dir.join(format!("{host}.agent.log")), text);
    }
    let _ = std::fs::write(
        report_dir.join("history.json"),
        serde_json::to_vec(&calls).unwrap_or_default(),
    );
    std::fs::write(
        report_dir.join("report.json"),
        serde_json::to_vec_pretty(&report).context("encoding the report")?,
    )
    .context("writing report.json")?;
    let summary = report.summary();
    std::fs::write(report_dir.join("summary.txt"), &summary).context("writing summary.txt")?;
    logf("bringing the test bed down");
    // Thawed before the agents are killed (a process blocked on a frozen disk cannot die).
    if let Some(fs) = &cluster.ext4 {
        let _ = fs.thaw();
    }
    let down = cluster.tb.down();
    println!("{summary}");
    println!("report: {}", report_dir.join("report.json").display());
    down.context("bringing the test bed down")?;
    Ok(passed)
}

/// How long a run injects faults (0 for --smoke: every fault once).
fn budget_of(args: &Args) -> Duration {
    if args.smoke {
        Duration::from_secs(0)
    } else {
        args.duration.unwrap_or(Duration::from_secs(600))
    }
}

/// The check that follows a fault's recovery: a cluster unwell again before the next fault
/// (or the final checks) takes the previous fault's recovery back.
fn relapse_check(inj: &Injector, records: &mut [faults::FaultRecord]) {
    let Some(prev) = records.last_mut() else {
        return;
    };
    if prev.recovery_s.is_none() {
        return;
    }
    if let Some(why) = inj.unwell_now() {
        prev.relapses += 1;
        prev.recovery_s = None;
        prev.errors.push(format!(
            "recovered, then unwell again at the check before the next step: {why}"
        ));
    }
}

/// Brings the test bed down and exits if the run overstays its bound (a hang somewhere).
fn spawn_watchdog(cluster: &Cluster, limit: Duration) {
    let prefix = cluster.tb.prefix().to_string();
    let frozen = cluster.ext4.as_ref().map(|fs| fs.dir().to_path_buf());
    let script = shoal_tests::testbed::script_path();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!(
            "shoal-chaos: still running after {} s; bringing {prefix} down and giving up",
            limit.as_secs()
        );
        // A frozen file system unmounted lazily could never be thawed: thaw it first.
        if let Some(dir) = &frozen {
            let _ = std::process::Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(dir)
                .status();
        }
        let _ = std::process::Command::new("bash")
            .arg(script)
            .args(["--prefix", &prefix, "down"])
            .status();
        std::process::exit(3);
    });
}

fn bounded(mut v: Vec<String>) -> Vec<String> {
    v.truncate(MAX_FINDINGS);
    v
}

fn check_recovery(
    records: &[faults::FaultRecord],
    well: &Result<(Duration, cluster::Health)>,
    heal_errors: &[String],
) -> Check {
    let mut findings: Vec<String> = records
        .iter()
        .flat_map(|r| r.errors.iter().map(move |e| format!("{}: {e}", r.name)))
        .collect();
    findings.extend(heal_errors.iter().map(|e| format!("final heal: {e}")));
    if let Err(e) = well {
        findings.push(format!("after the run: {e:#}"));
    }
    for r in records.iter().filter(|r| r.recovery_s.is_none()) {
        if r.errors.is_empty() {
            findings.push(format!("{}: not recovered", r.name));
        }
    }
    let worst = records
        .iter()
        .filter_map(|r| r.recovery_s)
        .fold(0.0f64, f64::max);
    let relapses: u32 = records.iter().map(|r| r.relapses).sum();
    Check {
        name: "faults injected, healed, recovered (well, and still well 3 s later)".into(),
        passed: findings.is_empty(),
        summary: format!(
            "{} faults ({} of them two at once), {} recovered (slowest {worst:.1} s), {relapses} relapses",
            records.len(),
            records.iter().filter(|r| r.overlap.is_some()).count(),
            records.iter().filter(|r| r.recovery_s.is_some()).count()
        ),
        findings: bounded(findings),
    }
}

fn check_lin(calls: &[history::Call], unread: &[String]) -> Check {
    let (services, ops, anomalies) = history::check_linearizable(calls);
    let mut findings: Vec<String> = anomalies
        .iter()
        .map(|a| {
            format!(
                "{}: {} ({} operations; stuck at call {:?} after {:?})",
                a.service, a.verdict, a.operations, a.stuck_call, a.prefix_calls
            )
        })
        .collect();
    findings.extend(
        unread
            .iter()
            .map(|n| format!("{n}: never read back after healing")),
    );
    Check {
        name: "service specs linearizable (Wing-Gong/Lowe, per-service register)".into(),
        passed: findings.is_empty(),
        summary: format!(
            "{services} services, {ops} operations checked, {} anomalies",
            anomalies.len()
        ),
        findings: bounded(findings),
    }
}

fn check_acked(calls: &[history::Call], finals: &BTreeMap<String, Option<SpecValue>>) -> Check {
    let (acked, checked, lost) = history::check_acknowledged(calls, finals);
    Check {
        name: "acknowledged writes present".into(),
        passed: lost.is_empty(),
        summary: format!(
            "{acked} acknowledged writes, {checked} final ones compared with the state, {} lost",
            lost.len()
        ),
        findings: bounded(
            lost.iter()
                .map(|l| {
                    format!(
                        "{}: call {} ({:?}) wrote {:?}, state has {:?}",
                        l.service, l.call, l.kind, l.expected, l.found
                    )
                })
                .collect(),
        ),
    }
}

/// Waits up to [`CONVERGE_TIMEOUT`] for every service to run its replicas: as many tasks
/// desired and observed RUNNING, each with a live container.
async fn converge(
    cluster: &Cluster,
    run_id: &str,
    finals: &BTreeMap<String, Option<SpecValue>>,
) -> Check {
    let start = Instant::now();
    let sockets = cluster.sockets(&cluster.managers);
    let mut last: Vec<String> = vec!["no answer from any manager".into()];
    let want: BTreeMap<&String, u64> = finals
        .iter()
        .filter_map(|(n, v)| v.map(|v| (n, v.replicas)))
        .collect();
    while start.elapsed() < CONVERGE_TIMEOUT {
        for (_, sock) in &sockets {
            let Ok(c) = control(sock).await else {
                continue;
            };
            let all = shoal_proto::paging::all_pages(pb::ListTasksRequest::default(), |r| {
                let mut c = c.clone();
                async move { c.list_tasks(r).await.map(|r| r.into_inner()) }
            });
            let Ok(Ok(tasks)) = tokio::time::timeout(CALL_TIMEOUT, all).await else {
                continue;
            };
            let mut running: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for t in tasks {
                if !t.service_name.starts_with(&format!("chaos-{run_id}-")) {
                    continue;
                }
                let e = running.entry(t.service_name.clone()).or_default();
                if t.desired_state == pb::TaskState::Running as i32 {
                    e.0 += 1;
                    let id = t.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                    let st = t.status.as_ref();
                    let cid = st
                        .map(|s| s.container_id.clone())
                        .filter(|c| !c.is_empty())
                        .unwrap_or(id);
                    let live = container_live(&cid);
                    if st.map(|s| s.state) == Some(pb::TaskState::Running as i32) && live {
                        e.1 += 1;
                    }
                    seen.entry(t.service_name.clone())
                        .or_default()
                        .push(format!(
                            "task {cid} slot {} on {} observed {:?}{}{}",
                            t.slot,
                            t.node_id.get(..6).unwrap_or(&t.node_id),
                            st.and_then(|s| pb::TaskState::try_from(s.state).ok()),
                            st.map(|s| format!(
                                " ({} {} {})",
                                s.message, s.err, t.scheduling_message
                            ))
                            .unwrap_or_default(),
                            if live { ", container live" } else { "" }
                        ));
                }
            }
            last = Vec::new();
            for (name, &r) in &want {
                let (desired, live) = running.get(*name).copied().unwrap_or_default();
                if desired != r || live != r {
                    last.push(format!(
                        "{name}: {r} replicas wanted, {desired} tasks desired running, {live} running with a live container: {}",
                        seen.get(*name).map(|v| v.join("; ")).unwrap_or_default()
                    ));
                }
            }
            for (name, (desired, _)) in &running {
                if !want.contains_key(name) && *desired > 0 {
                    last.push(format!(
                        "{name}: removed, yet {desired} tasks desired running"
                    ));
                }
            }
            if last.is_empty() {
                return Check {
                    name: "services converge within 15 s".into(),
                    passed: true,
                    summary: format!(
                        "{} services, {} replicas running after {:.1} s",
                        want.len(),
                        want.values().sum::<u64>(),
                        start.elapsed().as_secs_f64()
                    ),
                    findings: Vec::new(),
                };
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Check {
        name: "services converge within 15 s".into(),
        passed: false,
        summary: format!("{} services not converged after 15 s", last.len()),
        findings: bounded(last),
    }
}

fn check_slots(o: &Observations) -> Vec<Check> {
    let fmt = |v: &observe::Overlap| {
        format!(
            "t={} ms {} slot {}: tasks {:?}{}",
            v.at_ms,
            v.service,
            v.slot,
            v.tasks,
            v.during_fault
                .as_ref()
                .map(|f| format!(" during {f}"))
                .unwrap_or_default()
        )
    };
    let store = Check {
        name: "never two tasks desired running in one slot (store)".into(),
        passed: o.store_overlap_count == 0 && o.samples > 0,
        summary: format!("{} samples, {} overlaps", o.samples, o.store_overlap_count),
        findings: bounded(o.store_overlaps.iter().map(fmt).collect()),
    };
    let (during, outside): (Vec<_>, Vec<_>) = o
        .live_overlaps
        .iter()
        .partition(|v| v.during_fault.is_some());
    let live = Check {
        name: "never two live containers in one slot".into(),
        passed: outside.is_empty() && o.samples > 0,
        summary: format!(
            "{} overlaps outside faults, {} while a fault cut a node off (or within {} s of its heal)",
            outside.len(),
            during.len(),
            observe::HEAL_GRACE_MS / 1000
        ),
        findings: bounded(outside.iter().chain(during.iter()).map(|v| fmt(v)).collect()),
    };
    vec![store, live]
}

fn check_addresses(o: &Observations) -> Check {
    Check {
        name: "never two tasks with one network address (store)".into(),
        passed: o.address_conflict_count == 0 && o.attachments_seen > 0,
        summary: format!(
            "{} samples, {} task attachments seen, {} conflicts",
            o.samples, o.attachments_seen, o.address_conflict_count
        ),
        findings: bounded(o.address_conflicts.clone()),
    }
}

fn check_mesh(m: &mesh::MeshStats) -> Check {
    let per_fault: Vec<String> = m
        .per_fault
        .iter()
        .filter(|(f, _)| !f.is_empty())
        .map(|(f, t)| format!("{f}: {}/{} failed", t.failed, t.requests))
        .collect();
    Check {
        name: "the routing mesh answers outside faults".into(),
        passed: m.outside_count == 0 && m.requests > 0,
        summary: format!(
            "{} requests through every node, {} failed: {} outside faults; during faults {}",
            m.requests,
            m.failed,
            m.outside_count,
            if per_fault.is_empty() {
                "none".to_string()
            } else {
                per_fault.join(", ")
            }
        ),
        findings: bounded(m.outside.clone()),
    }
}

fn check_panics(cluster: &Cluster) -> Check {
    let mut findings = Vec::new();
    for (host, text) in cluster.logs() {
        for l in text.lines().filter(|l| l.contains("panicked at")) {
            findings.push(format!("{host}: {}", l.trim()));
        }
    }
    Check {
        name: "no process panicked".into(),
        passed: findings.is_empty(),
        summary: format!("{} panics in the agents' logs", findings.len()),
        findings: bounded(findings),
    }
}

fn check_disk(disk: &[faults::DiskFullReport], records: &[faults::FaultRecord]) -> Check {
    let name = "a manager whose disk fills up or stops is replaced as leader, refuses clearly and recovers".to_string();
    if !records.iter().any(|r| r.fault.is_disk()) {
        // `--fault` left them out (or the run was too short to reach one): nothing to judge.
        return Check {
            name,
            passed: true,
            summary: "not judged: no disk fault among this run's faults".into(),
            findings: vec![],
        };
    }
    let mut findings = Vec::new();
    for d in disk {
        findings.extend(
            d.problems
                .iter()
                .map(|p| format!("{} ({}, {}): {p}", d.host, d.role, d.kind.label())),
        );
    }
    let summary =
        disk.iter()
            .map(|d| {
                format!(
                "{} {} as {}: {} MiB filled; {}writes meanwhile: {}; agent {}; writes again after {}",
                d.kind.label(),
                d.host,
                d.role,
                d.filled_bytes >> 20,
                d.new_leader_after_s
                    .map(|s| match d.failed_after_s {
                        Some(f) if f > 0.5 => format!(
                            "first storage failure after {f:.1} s; another leader after {s:.1} s; "
                        ),
                        _ => format!("another leader after {s:.1} s; "),
                    })
                    .unwrap_or_default(),
                d.writes_while_full
                    .iter()
                    .map(|(h, o)| format!("via {h} → {o}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if d.agent_survived { "survived" } else { "EXITED" },
                d.recovered_after_s
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "never".into())
            )
            })
            .collect::<Vec<_>>()
            .join(" | ");
    Check {
        name,
        passed: !disk.is_empty() && findings.is_empty(),
        summary: if disk.is_empty() {
            "the disk-full fault did not run".into()
        } else {
            summary
        },
        findings: bounded(findings),
    }
}
