//! `shoal service …`: create, inspect, ls, update, rm (the spec; orchestration comes later).

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::service_spec::Mode;

use super::output::{self, block_on, parse_duration_ms, print_json, rpc, Format, SocketArg, Table};

#[derive(Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ModeArg {
    Replicated,
    Global,
}

#[derive(Clone, Copy, ValueEnum)]
enum RestartArg {
    None,
    OnFailure,
    Any,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailureActionArg {
    Pause,
    Continue,
    Rollback,
}

#[derive(Clone, Copy, ValueEnum)]
enum OrderArg {
    StopFirst,
    StartFirst,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Create a service
    Create(Box<CreateArgs>),
    /// Show services in full
    Inspect {
        #[arg(required = true)]
        services: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// List services
    #[command(alias = "list")]
    Ls {
        /// Only service ids
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Change a service's replicas or image
    Update {
        /// Number of tasks
        #[arg(long, allow_negative_numbers = true)]
        replicas: Option<i64>,
        /// Image reference
        #[arg(long)]
        image: Option<String>,
        /// Redeploy every task even if nothing changed
        #[arg(long)]
        force: bool,
        service: String,
    },
    /// Remove services
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// Service name
    #[arg(long)]
    name: String,
    /// replicated (default) or global
    #[arg(long, value_enum, default_value_t = ModeArg::Replicated)]
    mode: ModeArg,
    /// Number of tasks (replicated mode)
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    /// Environment variables (NAME=VALUE)
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Service labels (KEY=VALUE)
    #[arg(short, long = "label")]
    label: Vec<String>,
    /// Container labels (KEY=VALUE)
    #[arg(long = "container-label")]
    container_label: Vec<String>,
    /// Placement constraints (node.role==manager, node.labels.zone!=east, ...)
    #[arg(long)]
    constraint: Vec<String>,
    /// Placement preferences (spread=node.labels.zone)
    #[arg(long = "placement-pref")]
    placement_pref: Vec<String>,
    /// Most tasks per node (0 = unlimited)
    #[arg(long = "replicas-max-per-node", default_value_t = 0)]
    replicas_max_per_node: u64,
    /// Working directory in the container
    #[arg(short, long)]
    workdir: Option<String>,
    /// User in the container (name|uid[:group|gid])
    #[arg(short, long)]
    user: Option<String>,
    /// Container hostname
    #[arg(long)]
    hostname: Option<String>,
    /// CPU limit (e.g. 0.5)
    #[arg(long)]
    limit_cpu: Option<String>,
    /// Memory limit (e.g. 512m)
    #[arg(long)]
    limit_memory: Option<String>,
    /// CPUs reserved (e.g. 0.25)
    #[arg(long)]
    reserve_cpu: Option<String>,
    /// Memory reserved (e.g. 256m)
    #[arg(long)]
    reserve_memory: Option<String>,
    /// Process count limit (0 = none)
    #[arg(long, default_value_t = 0)]
    limit_pids: i64,
    /// Restart when: none, on-failure, any
    #[arg(long, value_enum, default_value_t = RestartArg::Any)]
    restart_condition: RestartArg,
    /// Delay between restarts (e.g. 5s)
    #[arg(long, default_value = "5s")]
    restart_delay: String,
    /// Restarts before giving up (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    restart_max_attempts: u64,
    /// Window the restart attempts are counted in (e.g. 1m)
    #[arg(long)]
    restart_window: Option<String>,
    /// Tasks updated at once (0 = all)
    #[arg(long, default_value_t = 1)]
    update_parallelism: u64,
    /// Delay between update batches
    #[arg(long, default_value = "0s")]
    update_delay: String,
    /// On update failure: pause, continue, rollback
    #[arg(long, value_enum, default_value_t = FailureActionArg::Pause)]
    update_failure_action: FailureActionArg,
    /// stop-first or start-first
    #[arg(long, value_enum, default_value_t = OrderArg::StopFirst)]
    update_order: OrderArg,
    /// How long an updated task is watched for failure
    #[arg(long, default_value = "5s")]
    update_monitor: String,
    /// Share of failed tasks tolerated during an update
    #[arg(long, default_value_t = 0.0)]
    update_max_failure_ratio: f32,
    /// Time to wait after SIGTERM before SIGKILL
    #[arg(long, default_value = "10s")]
    stop_grace_period: String,
    /// Published ports: [PUBLISHED:]TARGET[/PROTO]
    #[arg(short, long)]
    publish: Vec<String>,
    /// Networks to attach
    #[arg(long)]
    network: Vec<String>,
    /// Mount the container's root filesystem read-only
    #[arg(long)]
    read_only: bool,
    /// Accepted for docker compatibility: create always returns at once
    #[arg(short, long)]
    detach: bool,
    /// Image reference: NAME[:TAG][@sha256:DIGEST]
    image: String,
    /// Command and arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn replicas(n: i64) -> anyhow::Result<u64> {
    if n < 0 {
        bail!("invalid replicas {n}: must not be negative");
    }
    Ok(n as u64)
}

fn port(s: &str) -> anyhow::Result<pb::PortConfig> {
    let bad = || anyhow::anyhow!("invalid port {s:?}: expected [PUBLISHED:]TARGET[/tcp|udp|sctp]");
    let (ports, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let (published, target) = match ports.split_once(':') {
        Some((p, t)) => (
            p.parse::<u32>().map_err(|_| bad())?,
            t.parse::<u32>().map_err(|_| bad())?,
        ),
        None => (0, ports.parse::<u32>().map_err(|_| bad())?),
    };
    Ok(pb::PortConfig {
        name: String::new(),
        protocol: proto.to_string(),
        target_port: target,
        published_port: published,
        publish_mode: "ingress".into(),
    })
}

fn build_spec(a: &CreateArgs) -> anyhow::Result<pb::ServiceSpec> {
    let mode = match a.mode {
        ModeArg::Global => {
            if a.replicas.is_some() {
                bail!("--replicas applies to replicated services only");
            }
            Mode::Global(pb::GlobalService {})
        }
        ModeArg::Replicated => Mode::Replicated(pb::ReplicatedService {
            replicas: replicas(a.replicas.unwrap_or(1))?,
        }),
    };
    let cpu = |s: &Option<String>| {
        s.as_deref()
            .map(output::parse_cpus)
            .transpose()
            .map(|v| v.unwrap_or(0))
    };
    let mem = |s: &Option<String>| {
        s.as_deref()
            .map(output::parse_bytes)
            .transpose()
            .map(|v| v.unwrap_or(0))
    };
    // Like docker: the words after the image replace the image's command (its entrypoint
    // stays); an empty list keeps the image's default.
    let (command, args): (Vec<String>, Vec<String>) = (Vec::new(), a.command.clone());
    let prefs = a
        .placement_pref
        .iter()
        .map(|p| {
            p.strip_prefix("spread=")
                .map(|d| pb::PlacementPreference {
                    spread_descriptor: d.to_string(),
                })
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "invalid placement preference {p:?}: expected spread=node.labels.<name>"
                    )
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let update = pb::UpdateConfig {
        parallelism: a.update_parallelism,
        delay_ms: parse_duration_ms(&a.update_delay).context("--update-delay")?,
        failure_action: match a.update_failure_action {
            FailureActionArg::Pause => pb::FailureAction::Pause,
            FailureActionArg::Continue => pb::FailureAction::Continue,
            FailureActionArg::Rollback => pb::FailureAction::Rollback,
        } as i32,
        monitor_ms: parse_duration_ms(&a.update_monitor).context("--update-monitor")?,
        max_failure_ratio: a.update_max_failure_ratio,
        order: match a.update_order {
            OrderArg::StopFirst => pb::UpdateOrder::StopFirst,
            OrderArg::StartFirst => pb::UpdateOrder::StartFirst,
        } as i32,
    };
    Ok(pb::ServiceSpec {
        name: a.name.clone(),
        labels: output::parse_kv(&a.label)?,
        task: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: a.image.clone(),
                command,
                args,
                env: a.env.clone(),
                dir: a.workdir.clone().unwrap_or_default(),
                user: a.user.clone().unwrap_or_default(),
                hostname: a.hostname.clone().unwrap_or_default(),
                labels: output::parse_kv(&a.container_label)?,
                stop_grace_period_ms: parse_duration_ms(&a.stop_grace_period)
                    .context("--stop-grace-period")?,
                healthcheck: None,
                mounts: vec![],
                read_only: a.read_only,
                pids_limit: a.limit_pids,
            }),
            resources: Some(pb::ResourceRequirements {
                limits: Some(pb::Resources {
                    nano_cpus: cpu(&a.limit_cpu)?,
                    memory_bytes: mem(&a.limit_memory)?,
                }),
                reservations: Some(pb::Resources {
                    nano_cpus: cpu(&a.reserve_cpu)?,
                    memory_bytes: mem(&a.reserve_memory)?,
                }),
            }),
            restart: Some(pb::RestartPolicy {
                condition: match a.restart_condition {
                    RestartArg::None => pb::RestartCondition::None,
                    RestartArg::OnFailure => pb::RestartCondition::OnFailure,
                    RestartArg::Any => pb::RestartCondition::Any,
                } as i32,
                delay_ms: parse_duration_ms(&a.restart_delay).context("--restart-delay")?,
                max_attempts: a.restart_max_attempts,
                window_ms: a
                    .restart_window
                    .as_deref()
                    .map(parse_duration_ms)
                    .transpose()?
                    .unwrap_or(0),
            }),
            placement: Some(pb::Placement {
                constraints: a.constraint.clone(),
                preferences: prefs,
                max_replicas_per_node: a.replicas_max_per_node,
            }),
            networks: a.network.clone(),
            force_update: 0,
        }),
        mode: Some(mode),
        update: Some(update),
        rollback: Some(update),
        ports: a
            .publish
            .iter()
            .map(|p| port(p))
            .collect::<anyhow::Result<_>>()?,
        secrets: vec![],
        configs: vec![],
    })
}

pub fn run(a: ServiceArgs) -> anyhow::Result<()> {
    block_on(run_async(a))
}

async fn run_async(a: ServiceArgs) -> anyhow::Result<()> {
    // Flags are checked before the daemon is asked anything.
    let spec = match &a.command {
        ServiceCommand::Create(c) => Some(build_spec(c)?),
        _ => None,
    };
    let mut c = ControlClient::new(a.socket.channel().await?);
    match a.command {
        ServiceCommand::Create(_) => {
            let s = rpc(c.create_service(pb::CreateServiceRequest { spec }).await)?
                .service
                .unwrap_or_default();
            println!("{}", s.meta.map(|m| m.id).unwrap_or_default());
        }
        ServiceCommand::Inspect { services, format } => {
            let mut out = Vec::new();
            for s in services {
                out.push(
                    rpc(c.get_service(pb::GetServiceRequest { service: s }).await)?
                        .service
                        .unwrap_or_default(),
                );
            }
            match format {
                Format::Json => print_json(&Value::Array(
                    out.iter().map(output::service_json).collect(),
                ))?,
                Format::Table => {
                    let mut t = Table::new(&["ID", "NAME", "MODE", "IMAGE", "VERSION"]);
                    for s in &out {
                        let sp = s.spec.clone().unwrap_or_default();
                        t.row(vec![
                            id(s),
                            sp.name.clone(),
                            mode_name(&sp),
                            image(&sp),
                            s.meta.as_ref().map(|m| m.version).unwrap_or(0).to_string(),
                        ]);
                    }
                    t.print();
                }
            }
        }
        ServiceCommand::Ls { quiet, format } => {
            let list = rpc(c.list_services(pb::ListServicesRequest::default()).await)?.services;
            if quiet {
                for s in &list {
                    println!("{}", s.service.as_ref().map(id).unwrap_or_default());
                }
                return Ok(());
            }
            if format == Format::Json {
                let v: Vec<Value> = list
                    .iter()
                    .map(|s| {
                        let mut v = output::service_json(&s.service.clone().unwrap_or_default());
                        v["ServiceStatus"] = serde_json::json!({"RunningTasks": s.running_tasks, "DesiredTasks": s.desired_tasks});
                        v
                    })
                    .collect();
                return print_json(&Value::Array(v));
            }
            let mut t = Table::new(&["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]);
            for s in &list {
                let svc = s.service.clone().unwrap_or_default();
                let sp = svc.spec.clone().unwrap_or_default();
                let ports: Vec<String> = sp
                    .ports
                    .iter()
                    .map(|p| {
                        if p.published_port > 0 {
                            format!("*:{}->{}/{}", p.published_port, p.target_port, p.protocol)
                        } else {
                            format!("{}/{}", p.target_port, p.protocol)
                        }
                    })
                    .collect();
                t.row(vec![
                    output::short(&id(&svc)).to_string(),
                    sp.name.clone(),
                    mode_name(&sp),
                    format!("{}/{}", s.running_tasks, s.desired_tasks),
                    image(&sp),
                    ports.join(","),
                ]);
            }
            t.print();
        }
        ServiceCommand::Update {
            replicas: r,
            image: img,
            force,
            service,
        } => {
            if r.is_none() && img.is_none() && !force {
                bail!("nothing to update: pass --replicas, --image or --force");
            }
            let cur = rpc(c
                .get_service(pb::GetServiceRequest {
                    service: service.clone(),
                })
                .await)?
            .service
            .unwrap_or_default();
            let mut spec = cur.spec.clone().unwrap_or_default();
            if let Some(n) = r {
                match &mut spec.mode {
                    Some(Mode::Replicated(rep)) => rep.replicas = replicas(n)?,
                    _ => bail!("--replicas applies to replicated services only"),
                }
            }
            let task = spec.task.get_or_insert_with(Default::default);
            if let Some(i) = img {
                task.container.get_or_insert_with(Default::default).image = i;
            }
            if force {
                task.force_update += 1;
            }
            let version = cur.meta.as_ref().map(|m| m.version).unwrap_or(0);
            rpc(c
                .update_service(pb::UpdateServiceRequest {
                    service: id(&cur),
                    version,
                    spec: Some(spec),
                })
                .await)?;
            println!("{service}");
        }
        ServiceCommand::Rm { services } => {
            for s in services {
                rpc(c
                    .remove_service(pb::RemoveServiceRequest { service: s.clone() })
                    .await)?;
                println!("{s}");
            }
        }
    }
    Ok(())
}

fn id(s: &pb::Service) -> String {
    s.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default()
}

fn mode_name(s: &pb::ServiceSpec) -> String {
    match s.mode {
        Some(Mode::Global(_)) => "global".into(),
        _ => "replicated".into(),
    }
}

fn image(s: &pb::ServiceSpec) -> String {
    s.task
        .as_ref()
        .and_then(|t| t.container.as_ref())
        .map(|c| c.image.clone())
        .unwrap_or_default()
}
