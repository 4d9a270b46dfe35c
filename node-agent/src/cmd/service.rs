//! `shoal service …`: create, ls, ps, inspect, scale, update, rollback, rm, with docker's
//! words and flags. create, scale, update and rollback follow the tasks until the service
//! converges unless `--detach`.

#[cfg(test)]
mod fuzz;
mod logs;
pub(crate) mod progress;
pub(crate) mod update;

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::service_spec::Mode;
use tonic::transport::Channel;

use super::output::{self, block_on, parse_duration_ms, print_json, rpc, Format, SocketArg, Table};

#[derive(Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum ModeArg {
    Replicated,
    Global,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RestartArg {
    None,
    OnFailure,
    Any,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum FailureActionArg {
    Pause,
    Continue,
    Rollback,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OrderArg {
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
        /// Human-readable text instead of JSON
        #[arg(long)]
        pretty: bool,
    },
    /// List the tasks of services
    Ps {
        #[arg(required = true)]
        services: Vec<String>,
        /// Filter: desired-state=running|shutdown|accepted, node=ID|HOSTNAME, id=ID, name=NAME
        #[arg(short, long)]
        filter: Vec<String>,
        /// Do not truncate ids and errors
        #[arg(long)]
        no_trunc: bool,
        /// Only task ids
        #[arg(short, long)]
        quiet: bool,
        /// json: every task (that passes the filters) in full, its status times included
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Scale replicated services (NAME=REPLICAS ...)
    Scale {
        #[arg(required = true, value_name = "SERVICE=REPLICAS")]
        scales: Vec<String>,
        /// Return at once instead of waiting for the services to converge
        #[arg(short, long)]
        detach: bool,
    },
    /// List services
    #[command(alias = "list")]
    Ls {
        /// Only service ids
        #[arg(short, long)]
        quiet: bool,
        /// Filter: name=NAME (or its start), id=ID (or its start), label=KEY[=VALUE],
        /// mode=replicated|global
        #[arg(short, long)]
        filter: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Change a service's spec: a rolling update of the tasks whose spec changed
    Update(Box<update::UpdateArgs>),
    /// Roll a service back to its previous spec
    Rollback {
        /// Return at once instead of following the rollback
        #[arg(short, long)]
        detach: bool,
        /// Follow the rollback without drawing progress
        #[arg(short, long)]
        quiet: bool,
        service: String,
    },
    /// Show the lines of a service's or a task's containers, from every node
    Logs(logs::LogsArgs),
    /// Remove services
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// Service name (default: a generated one)
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// replicated (default) or global
    #[arg(long, value_enum, default_value_t = ModeArg::Replicated)]
    pub(crate) mode: ModeArg,
    /// Number of tasks (replicated mode)
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) replicas: Option<i64>,
    /// Environment variables (NAME=VALUE)
    #[arg(short, long = "env")]
    pub(crate) env: Vec<String>,
    /// Service labels (KEY=VALUE)
    #[arg(short, long = "label")]
    pub(crate) label: Vec<String>,
    /// Container labels (KEY=VALUE)
    #[arg(long = "container-label")]
    pub(crate) container_label: Vec<String>,
    /// Placement constraints (node.role==manager, node.labels.zone!=east, ...)
    #[arg(long)]
    pub(crate) constraint: Vec<String>,
    /// Placement preferences (spread=node.labels.zone)
    #[arg(long = "placement-pref")]
    pub(crate) placement_pref: Vec<String>,
    /// Most tasks per node (0 = unlimited)
    #[arg(long = "replicas-max-per-node", default_value_t = 0)]
    pub(crate) replicas_max_per_node: u64,
    /// Working directory in the container
    #[arg(short, long)]
    pub(crate) workdir: Option<String>,
    /// User in the container (name|uid[:group|gid])
    #[arg(short, long)]
    pub(crate) user: Option<String>,
    /// Container hostname
    #[arg(long)]
    pub(crate) hostname: Option<String>,
    /// CPU limit (e.g. 0.5)
    #[arg(long)]
    pub(crate) limit_cpu: Option<String>,
    /// Memory limit (e.g. 512m)
    #[arg(long)]
    pub(crate) limit_memory: Option<String>,
    /// CPUs reserved (e.g. 0.25)
    #[arg(long)]
    pub(crate) reserve_cpu: Option<String>,
    /// Memory reserved (e.g. 256m)
    #[arg(long)]
    pub(crate) reserve_memory: Option<String>,
    /// Process count limit (0 = none)
    #[arg(long, default_value_t = 0)]
    pub(crate) limit_pids: i64,
    /// Restart when: none, on-failure, any
    #[arg(long, value_enum, default_value_t = RestartArg::Any)]
    pub(crate) restart_condition: RestartArg,
    /// Delay between restarts (e.g. 5s)
    #[arg(long, default_value = "5s")]
    pub(crate) restart_delay: String,
    /// Restarts before giving up (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    pub(crate) restart_max_attempts: u64,
    /// Window the restart attempts are counted in (e.g. 1m)
    #[arg(long)]
    pub(crate) restart_window: Option<String>,
    #[command(flatten)]
    pub(crate) configs: update::CreateConfigArgs,
    /// Time to wait after SIGTERM before SIGKILL
    #[arg(long, default_value = "10s")]
    pub(crate) stop_grace_period: String,
    #[command(flatten)]
    pub(crate) health: update::HealthFlags,
    /// Published ports: [PUBLISHED:]TARGET[/PROTO]
    #[arg(short, long)]
    pub(crate) publish: Vec<String>,
    /// Networks to attach
    #[arg(long)]
    pub(crate) network: Vec<String>,
    /// How the service's name resolves: vip (one balanced address) or dnsrr (the tasks')
    #[arg(long, value_parser = ["vip", "dnsrr"], default_value = "vip")]
    pub(crate) endpoint_mode: String,
    /// Mount the container's root filesystem read-only
    #[arg(long)]
    pub(crate) read_only: bool,
    /// A secret as a file: NAME or source=NAME[,target=PATH,uid=U,gid=G,mode=0444]
    #[arg(long)]
    pub(crate) secret: Vec<String>,
    /// A config as a file: NAME or source=NAME[,target=PATH,uid=U,gid=G,mode=0444]
    #[arg(long)]
    pub(crate) config: Vec<String>,
    /// A mount in the tasks' containers: type=bind|volume,source=SRC,target=DST[,readonly]
    /// (a volume is the node's own, made there on first use; a bind source must exist on the
    /// node)
    #[arg(long = "mount", value_name = "type=…,source=…,target=…")]
    pub(crate) mount: Vec<String>,
    /// Return at once instead of waiting for the service to converge
    #[arg(short, long)]
    pub(crate) detach: bool,
    /// Wait without drawing progress (only the service id is printed)
    #[arg(short, long)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) registry: update::RegistryFlags,
    /// Image reference: NAME[:TAG][@sha256:DIGEST]
    pub(crate) image: String,
    /// Replace the image's entrypoint: words as a shell splits them (quotes, escapes)
    #[arg(
        long = "entrypoint",
        value_name = "COMMAND",
        allow_hyphen_values = true
    )]
    pub(crate) entrypoint_line: Option<String>,
    /// The container's entrypoint (the image's when empty): `--entrypoint`'s words, or a
    /// compose file's (`stack deploy`).
    #[arg(skip)]
    pub(crate) entrypoint: Vec<String>,
    /// Command and arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) command: Vec<String>,
}

impl CreateArgs {
    /// `service create IMAGE` with every flag at its default: the compose path (`stack
    /// deploy`) starts from these and sets what the file says, so both paths share one
    /// definition of the defaults and one `build_spec`.
    pub(crate) fn defaults(image: &str) -> anyhow::Result<CreateArgs> {
        use clap::FromArgMatches;
        let cmd = CreateArgs::augment_args(clap::Command::new("create").no_binary_name(true));
        let m = cmd.try_get_matches_from([image])?;
        Ok(CreateArgs::from_arg_matches(&m)?)
    }
}

/// A `--mount` value (docker's syntax) as a task's mount; checked here as the manager checks
/// it, so a mistake is one line before anything is sent.
pub(crate) fn mount(v: &str) -> anyhow::Result<pb::Mount> {
    use shoal_runtime::volume::{parse_mount_flag, MountKind};
    let m = parse_mount_flag(v)?;
    Ok(pb::Mount {
        r#type: match m.kind {
            Some(MountKind::Bind) => pb::MountType::Bind,
            _ => pb::MountType::Volume,
        } as i32,
        source: m.source,
        target: m.target,
        read_only: m.read_only,
        volume_nocopy: m.nocopy,
        volume_labels: m.labels.into_iter().collect(),
    })
}

fn replicas(n: i64) -> anyhow::Result<u64> {
    if n < 0 {
        bail!("invalid replicas {n}: must not be negative");
    }
    Ok(n as u64)
}

/// `--publish` in Docker's long form: `published=P,target=T,protocol=tcp|udp,mode=host|ingress`.
fn long_port(s: &str) -> anyhow::Result<pb::PortConfig> {
    let mut p = pb::PortConfig {
        protocol: "tcp".into(),
        publish_mode: "ingress".into(),
        ..Default::default()
    };
    let num = |k: &str, v: &str| -> anyhow::Result<u32> {
        match v.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n),
            _ => bail!("invalid port {s:?}: {k}={v} is not a port (1-65535)"),
        }
    };
    for field in s.split(',') {
        let (k, v) = field
            .split_once('=')
            .with_context(|| format!("invalid port {s:?}: {field:?} is not KEY=VALUE"))?;
        match k {
            "published" => p.published_port = num(k, v)?,
            "target" => p.target_port = num(k, v)?,
            "protocol" if matches!(v, "tcp" | "udp" | "sctp") => p.protocol = v.into(),
            "mode" if matches!(v, "host" | "ingress") => p.publish_mode = v.into(),
            "protocol" | "mode" => bail!("invalid port {s:?}: {k}={v} is not allowed"),
            other => bail!("invalid port {s:?}: unknown key {other:?}"),
        }
    }
    if p.target_port == 0 {
        bail!("invalid port {s:?}: no target");
    }
    Ok(p)
}

/// `--network` values: cluster networks by name or id (`NAME` or `name=NAME,alias=A,...`), or
/// `host` / `none` alone; the networks and the aliases given on them.
fn networks(given: &[String]) -> anyhow::Result<(Vec<String>, Vec<pb::NetworkAliases>)> {
    let mut names = Vec::new();
    let mut aliases = Vec::new();
    for g in given {
        let (name, alias) = if g.contains('=') {
            let mut name = None;
            let mut alias = Vec::new();
            for kv in g.split(',') {
                match kv.split_once('=') {
                    Some(("name" | "target", v)) if name.is_none() => name = Some(v.to_string()),
                    Some(("alias", v)) if !v.is_empty() => alias.push(v.to_string()),
                    _ => bail!(
                        "invalid --network {g:?}: expected NAME or name=NAME[,alias=ALIAS...]"
                    ),
                }
            }
            let Some(name) = name else {
                bail!("invalid --network {g:?}: no name=");
            };
            (name, alias)
        } else {
            (g.clone(), Vec::new())
        };
        if name.is_empty() {
            bail!("an empty network name");
        }
        if names.contains(&name) {
            bail!("network {name} is given twice");
        }
        if !alias.is_empty() {
            if name == "host" || name == "none" {
                bail!("network {name} takes no aliases");
            }
            aliases.push(pb::NetworkAliases {
                network: name.clone(),
                aliases: alias,
            });
        }
        names.push(name);
    }
    if names.len() > 1 && names.iter().any(|n| n == "host" || n == "none") {
        bail!("network host or none is the task's only network: it joins no other");
    }
    Ok((names, aliases))
}

/// A `--publish` value; refuses what the cluster cannot publish yet, as the server would.
fn port(s: &str) -> anyhow::Result<pb::PortConfig> {
    let p = parse_port(s)?;
    if p.protocol == "sctp" {
        bail!("invalid port {s:?}: protocol sctp is not supported (tcp or udp)");
    }
    Ok(p)
}

fn parse_port(s: &str) -> anyhow::Result<pb::PortConfig> {
    if s.contains('=') {
        return long_port(s);
    }
    let bad = || anyhow::anyhow!("invalid port {s:?}: expected [PUBLISHED:]TARGET[/tcp|udp|sctp]");
    let (ports, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let (published, target) = match ports.split_once(':') {
        Some((p, t)) => (
            p.parse::<u32>().map_err(|_| bad())?,
            t.parse::<u32>().map_err(|_| bad())?,
        ),
        None => (0, ports.parse::<u32>().map_err(|_| bad())?),
    };
    if target == 0 || target > 65535 || published > 65535 {
        bail!("invalid port {s:?}: ports are 1-65535");
    }
    if !matches!(proto, "tcp" | "udp" | "sctp") {
        return Err(bad());
    }
    Ok(pb::PortConfig {
        name: String::new(),
        protocol: proto.to_string(),
        target_port: target,
        published_port: published,
        publish_mode: "ingress".into(),
    })
}

pub(crate) fn build_spec(a: &CreateArgs) -> anyhow::Result<pb::ServiceSpec> {
    if a.limit_pids < 0 {
        bail!(
            "invalid --limit-pids {}: must not be negative",
            a.limit_pids
        );
    }
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
    let entrypoint = match &a.entrypoint_line {
        Some(line) => output::shell_words(line).context("--entrypoint")?,
        None => a.entrypoint.clone(),
    };
    let (command, args): (Vec<String>, Vec<String>) = (entrypoint, a.command.clone());
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
    let (update, rollback) = a.configs.configs()?;
    let (nets, network_aliases) = networks(&a.network)?;
    let spec = pb::ServiceSpec {
        name: a.name.clone().unwrap_or_else(generated_name),
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
                healthcheck: {
                    let mut h = None;
                    a.health.edit()?.apply(&mut h);
                    h
                },
                mounts: a
                    .mount
                    .iter()
                    .map(|v| mount(v))
                    .collect::<anyhow::Result<_>>()?,
                read_only: a.read_only,
                pids_limit: a.limit_pids,
                registry_auth: None,
                secrets: a
                    .secret
                    .iter()
                    .map(|v| update::file_ref("--secret", v))
                    .collect::<anyhow::Result<_>>()?,
                configs: a
                    .config
                    .iter()
                    .map(|v| update::file_ref("--config", v))
                    .collect::<anyhow::Result<_>>()?,
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
            networks: nets,
            force_update: 0,
            network_aliases,
        }),
        mode: Some(mode),
        update: Some(update),
        rollback: Some(rollback),
        ports: a
            .publish
            .iter()
            .map(|p| port(p))
            .collect::<anyhow::Result<_>>()?,
        secrets: vec![],
        configs: vec![],
        endpoint_mode: a.endpoint_mode.clone(),
    };
    if let Some(n) = spec
        .task
        .as_ref()
        .and_then(|t| t.networks.iter().find(|n| *n == "host" || *n == "none"))
        .filter(|_| !spec.ports.is_empty())
    {
        bail!("ports are published only from the node bridge, not network {n}");
    }
    Ok(spec)
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
    let wanted = match &a.command {
        ServiceCommand::Scale { scales, .. } => parse_scales(scales)?,
        _ => Vec::new(),
    };
    let edit = match &a.command {
        ServiceCommand::Update(u) => Some(u.edit()?),
        _ => None,
    };
    let ps_filter = match &a.command {
        ServiceCommand::Ps { filter, .. } => parse_ps_filters(filter)?,
        _ => PsFilter::default(),
    };
    let ls_filter = match &a.command {
        ServiceCommand::Ls { filter, .. } => LsFilter::parse(filter)?,
        _ => LsFilter::default(),
    };
    let mut c = ControlClient::new(a.socket.channel().await?);
    match a.command {
        ServiceCommand::Create(args) => {
            let mut spec = spec;
            if let Some(s) = spec.as_mut() {
                args.registry.apply(s).await;
            }
            let r = rpc(c
                .create_service(pb::CreateServiceRequest {
                    spec,
                    no_resolve_image: args.registry.no_resolve_image,
                })
                .await)?;
            update::warn(&r.warnings);
            let s = r.service.unwrap_or_default();
            let sid = id(&s);
            println!("{sid}");
            if !args.detach {
                progress::wait_converged(&mut c, &sid, args.quiet).await?;
            }
        }
        ServiceCommand::Ps {
            services,
            no_trunc,
            quiet,
            format,
            ..
        } => {
            ps(
                &mut c,
                &services,
                ps_filter,
                PsOutput::of(quiet, format, no_trunc),
            )
            .await?
        }
        ServiceCommand::Scale { detach, .. } => {
            let mut scaled = Vec::new();
            for (name, n) in wanted {
                let sid = scale(&mut c, &name, n).await?;
                println!("{name} scaled to {n}");
                scaled.push(sid);
            }
            if !detach {
                for sid in scaled {
                    progress::wait_converged(&mut c, &sid, false).await?;
                }
            }
        }
        ServiceCommand::Inspect {
            services,
            format,
            pretty,
        } => {
            let mut out = Vec::new();
            for s in services {
                out.push(
                    rpc(c.get_service(pb::GetServiceRequest { service: s }).await)?
                        .service
                        .unwrap_or_default(),
                );
            }
            if pretty {
                for s in &out {
                    print!("{}", pretty_service(s));
                }
                return Ok(());
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
        ServiceCommand::Ls { quiet, format, .. } => {
            // A single name filter is asked of the server (names starting with it).
            let req = pb::ListServicesRequest {
                name_prefix: match ls_filter.names.as_slice() {
                    [one] => one.clone(),
                    _ => String::new(),
                },
                ..Default::default()
            };
            let mut json = output::JsonArray::start();
            let mut table = services_table();
            crate::each_page!(c, list_services, req, |page: Vec<pb::ServiceSummary>| {
                for s in page.iter().filter(|s| ls_filter.keeps(s)) {
                    if quiet {
                        println!("{}", s.service.as_ref().map(id).unwrap_or_default());
                    } else if format == Format::Json {
                        json.item(&service_summary_json(s))?;
                    } else {
                        service_row(&mut table, s);
                    }
                }
                anyhow::Ok(())
            })
            .await?;
            match (quiet, format) {
                (true, _) => {}
                (false, Format::Json) => json.end()?,
                (false, Format::Table) => table.print(),
            }
        }
        ServiceCommand::Update(u) => {
            if let Some(edit) = &edit {
                update::update(&mut c, &u.service, edit).await?;
            }
        }
        ServiceCommand::Rollback {
            detach,
            quiet,
            service,
        } => {
            update::rollback(&mut c, &service, detach, quiet).await?;
        }
        ServiceCommand::Logs(l) => logs::run(&a.socket, l).await?,
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

/// The `service ls` table (also `stack services`).
/// `service ls --format json`: each service in full, with its task counts.
pub(crate) fn print_services_json(list: &[pb::ServiceSummary]) -> anyhow::Result<()> {
    print_json(&Value::Array(
        list.iter().map(service_summary_json).collect(),
    ))
}

/// A service in full with its task counts (`service ls --format json`).
fn service_summary_json(s: &pb::ServiceSummary) -> Value {
    let mut v = output::service_json(&s.service.clone().unwrap_or_default());
    v["ServiceStatus"] = serde_json::json!({
        "RunningTasks": s.running_tasks,
        "DesiredTasks": s.desired_tasks,
    });
    v
}

pub(crate) fn print_services(list: &[pb::ServiceSummary]) {
    let mut t = services_table();
    for s in list {
        service_row(&mut t, s);
    }
    t.print();
}

fn services_table() -> Table {
    Table::new(&[
        "ID",
        "NAME",
        "MODE",
        "REPLICAS",
        "IMAGE",
        "PORTS",
        "UPDATE STATUS",
    ])
}

fn service_row(t: &mut Table, s: &pb::ServiceSummary) {
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
        update_state_word(&svc),
    ]);
}

/// `service ls --filter`s, as docker's: a service passes when it matches one of the values
/// given for each key (names and ids by their start; labels by key, or key and value).
#[derive(Default)]
struct LsFilter {
    names: Vec<String>,
    ids: Vec<String>,
    labels: Vec<(String, Option<String>)>,
    modes: Vec<ModeArg>,
}

impl LsFilter {
    fn parse(filters: &[String]) -> anyhow::Result<LsFilter> {
        let mut f = LsFilter::default();
        for item in filters {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("invalid filter {item:?}: expected KEY=VALUE"))?;
            match k {
                "name" => f.names.push(v.to_string()),
                "id" => f.ids.push(v.to_string()),
                "label" => {
                    if v.is_empty() {
                        bail!("invalid filter label=: expected label=KEY or label=KEY=VALUE");
                    }
                    f.labels.push(match v.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (v.to_string(), None),
                    })
                }
                "mode" => f.modes.push(match v {
                    "replicated" => ModeArg::Replicated,
                    "global" => ModeArg::Global,
                    _ => bail!("invalid filter mode={v}: expected replicated or global"),
                }),
                _ => bail!("invalid filter {k:?}: expected name, id, label or mode"),
            }
        }
        Ok(f)
    }

    fn keeps(&self, s: &pb::ServiceSummary) -> bool {
        let svc = s.service.clone().unwrap_or_default();
        let sp = svc.spec.unwrap_or_default();
        let sid = svc.meta.map(|m| m.id).unwrap_or_default();
        let mode = match sp.mode {
            Some(Mode::Global(_)) => ModeArg::Global,
            _ => ModeArg::Replicated,
        };
        (self.names.is_empty() || self.names.iter().any(|n| sp.name.starts_with(n.as_str())))
            && (self.ids.is_empty() || self.ids.iter().any(|i| sid.starts_with(i.as_str())))
            // Every label filter must match (docker's rule for labels).
            && self.labels.iter().all(|(k, v)| match v {
                Some(v) => sp.labels.get(k) == Some(v),
                None => sp.labels.contains_key(k),
            })
            && (self.modes.is_empty() || self.modes.contains(&mode))
    }
}

fn id(s: &pb::Service) -> String {
    s.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default()
}

/// The update state as docker words it (`updating`, `rollback_paused`, …); empty if none.
fn update_state_word(s: &pb::Service) -> String {
    s.update_status
        .as_ref()
        .filter(|u| u.state() != pb::UpdateState::Unknown)
        .map(|u| {
            u.state()
                .as_str_name()
                .trim_start_matches("UPDATE_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// `--pretty` lines of an update or rollback config.
fn pretty_update_config(line: &mut dyn FnMut(&str, String), title: &str, u: &pb::UpdateConfig) {
    line(title, String::new());
    line(" Parallelism:", u.parallelism.to_string());
    if u.delay_ms > 0 {
        line(" Delay:", output::format_ms(u.delay_ms));
    }
    let action = u
        .failure_action()
        .as_str_name()
        .trim_start_matches("FAILURE_ACTION_")
        .to_ascii_lowercase();
    line(" On failure:", action);
    line(" Monitoring Period:", output::format_ms(u.monitor_ms));
    line(" Max failure ratio:", u.max_failure_ratio.to_string());
    let order = u
        .order()
        .as_str_name()
        .trim_start_matches("UPDATE_ORDER_")
        .to_ascii_lowercase()
        .replace('_', "-");
    line(" Update order:", order);
}

fn mode_name(s: &pb::ServiceSpec) -> String {
    match s.mode {
        Some(Mode::Global(_)) => "global".into(),
        _ => "replicated".into(),
    }
}

/// The service's image as `service ls` shows it: without the digest it is pinned to.
fn image(s: &pb::ServiceSpec) -> String {
    s.task
        .as_ref()
        .and_then(|t| t.container.as_ref())
        .map(|c| unpinned(&c.image).to_string())
        .unwrap_or_default()
}

/// `name:tag` of a pinned `name:tag@sha256:…` (docker's lists show it so).
fn unpinned(image: &str) -> &str {
    image.split('@').next().unwrap_or(image)
}

/// A service name when the user gives none: `adjective_noun`, as docker makes them.
fn generated_name() -> String {
    const LEFT: [&str; 16] = [
        "brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry",
        "nimble", "proud", "quiet", "sharp", "tender", "witty",
    ];
    const RIGHT: [&str; 16] = [
        "bass", "carp", "dace", "eel", "gar", "hake", "ide", "koi", "ling", "minnow", "perch",
        "pike", "roach", "shad", "tench", "trout",
    ];
    use rand::seq::SliceRandom;
    let mut rng = rand::thread_rng();
    format!(
        "{}_{}",
        LEFT.choose(&mut rng).unwrap_or(&"shoal"),
        RIGHT.choose(&mut rng).unwrap_or(&"service")
    )
}

/// How many times a scale is retried when the service changed between read and write.
const SCALE_RETRIES: usize = 5;

/// Sets a replicated service's replica count; returns its id.
async fn scale(c: &mut ControlClient<Channel>, name: &str, n: u64) -> anyhow::Result<String> {
    let mut attempt = 0;
    loop {
        let cur = rpc(c
            .get_service(pb::GetServiceRequest {
                service: name.to_string(),
            })
            .await)?
        .service
        .unwrap_or_default();
        let mut spec = cur.spec.clone().unwrap_or_default();
        match &mut spec.mode {
            Some(Mode::Replicated(r)) => r.replicas = n,
            _ => bail!("{name}: scale can only be used with replicated mode"),
        }
        let version = cur.meta.as_ref().map(|m| m.version).unwrap_or(0);
        match c
            .update_service(pb::UpdateServiceRequest {
                service: id(&cur),
                version,
                spec: Some(spec),
                ..Default::default()
            })
            .await
        {
            Ok(_) => return Ok(id(&cur)),
            Err(e) if e.code() == tonic::Code::FailedPrecondition && attempt < SCALE_RETRIES => {
                attempt += 1;
            }
            Err(e) => bail!("{}", e.message()),
        }
    }
}

/// Docker's capitalised task state.
fn state_title(s: i32) -> String {
    let w = progress::state_word(s);
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => w,
    }
}

/// "5 seconds", "about a minute", "3 hours": how long ago, as `docker service ps` says it.
pub(crate) fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0 => "less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{s} seconds"),
        60..=119 => "about a minute".into(),
        120..=3_599 => format!("{} minutes", s / 60),
        3_600..=7_199 => "about an hour".into(),
        7_200..=172_799 => format!("{} hours", s / 3_600),
        _ => format!("{} days", s / 86_400),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Longest error shown by `service ps` without `--no-trunc`.
const PS_ERROR_WIDTH: usize = 40;

/// `service ps`: each slot's (or node's) tasks, newest first, history indented as docker does.
/// `service ps --filter`s.
#[derive(Default)]
pub(crate) struct PsFilter {
    desired: Option<i32>,
    node: Option<String>,
    id: Option<String>,
    name: Option<String>,
}

pub(crate) fn parse_ps_filters(filters: &[String]) -> anyhow::Result<PsFilter> {
    let mut f = PsFilter::default();
    for item in filters {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("invalid filter {item:?}: expected KEY=VALUE"))?;
        match k {
            "desired-state" => {
                f.desired = Some(match v {
                    "running" => pb::TaskState::Running as i32,
                    "shutdown" => pb::TaskState::Shutdown as i32,
                    "accepted" => pb::TaskState::Accepted as i32,
                    _ => bail!(
                        "invalid filter desired-state={v}: expected running, shutdown or accepted"
                    ),
                })
            }
            "node" => f.node = Some(v.to_string()),
            "id" => f.id = Some(v.to_string()),
            "name" => f.name = Some(v.to_string()),
            _ => bail!("invalid filter {k:?}: expected desired-state, node, id or name"),
        }
    }
    Ok(f)
}

/// `NAME=N` arguments of `service scale`.
fn parse_scales(scales: &[String]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut wanted = Vec::new();
    for s in scales {
        let bad = || anyhow::anyhow!("invalid scale specifier {s:?}: expected SERVICE=REPLICAS");
        let (name, n) = s.split_once('=').ok_or_else(bad)?;
        let n: i64 = n.parse().map_err(|_| bad())?;
        if name.is_empty() {
            return Err(bad());
        }
        wanted.push((name.to_string(), replicas(n)?));
    }
    Ok(wanted)
}

/// How `service ps` (and `stack ps`) prints the tasks it keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PsOutput {
    /// docker's table, ids and errors cut unless `no_trunc`.
    Table { no_trunc: bool },
    /// Task ids only.
    Quiet,
    /// Every task in full, in a JSON array.
    Json,
}

impl PsOutput {
    /// `-q` over `--format` (docker's rule), then the format.
    pub(crate) fn of(quiet: bool, format: Format, no_trunc: bool) -> PsOutput {
        match (quiet, format) {
            (true, _) => PsOutput::Quiet,
            (false, Format::Json) => PsOutput::Json,
            (false, Format::Table) => PsOutput::Table { no_trunc },
        }
    }
}

pub(crate) async fn ps(
    c: &mut ControlClient<Channel>,
    services: &[String],
    filter: PsFilter,
    output: PsOutput,
) -> anyhow::Result<()> {
    let mut lists = Vec::new();
    for name in services {
        let svc = rpc(c
            .get_service(pb::GetServiceRequest {
                service: name.clone(),
            })
            .await)?
        .service
        .unwrap_or_default();
        lists.push(pb::ListTasksRequest {
            service: id(&svc),
            ..Default::default()
        });
    }
    print_tasks(c, lists, filter, output).await
}

/// `node ps`: the tasks on each node (`self`: the node the CLI talks to), as `service ps`
/// prints them.
pub(crate) async fn node_ps(
    c: &mut ControlClient<Channel>,
    nodes: &[String],
    filter: PsFilter,
    output: PsOutput,
) -> anyhow::Result<()> {
    let mut lists = Vec::new();
    for n in nodes {
        let node = rpc(c.get_node(pb::GetNodeRequest { node: n.clone() }).await)?
            .node
            .unwrap_or_default();
        lists.push(pb::ListTasksRequest {
            node: node.meta.map(|m| m.id).unwrap_or_default(),
            ..Default::default()
        });
    }
    print_tasks(c, lists, filter, output).await
}

/// The tasks of each listing (one per service or node asked for), page after page, that pass
/// `filter`: each listing's tasks grouped by slot (replicated) or node (global), newest first
/// within a group, history indented as docker does.
async fn print_tasks(
    c: &mut ControlClient<Channel>,
    lists: Vec<pb::ListTasksRequest>,
    filter: PsFilter,
    output: PsOutput,
) -> anyhow::Result<()> {
    let no_trunc = output == PsOutput::Table { no_trunc: true };
    let quiet = output == PsOutput::Quiet;
    let mut json = output::JsonArray::start();
    let PsFilter {
        desired,
        node: node_filter,
        id: id_filter,
        name: name_filter,
    } = filter;
    let nodes = output::all_nodes(c, pb::ListNodesRequest::default()).await?;
    let hostname: HashMap<String, String> = nodes
        .iter()
        .map(|n| {
            (
                n.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
                n.description
                    .as_ref()
                    .map(|d| d.hostname.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    drop(nodes);
    let node_id = match &node_filter {
        Some(f) => Some(
            hostname
                .keys()
                .find(|id| *id == f || hostname.get(*id) == Some(f))
                .or_else(|| hostname.keys().find(|id| id.starts_with(f.as_str())))
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no such node: {f}"))?,
        ),
        None => None,
    };
    let now = now_ms();
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "IMAGE",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
        "PORTS",
    ]);
    let keep = |t: &pb::Task| {
        let wanted_state = match desired {
            // docker: "running" also shows tasks still on their way there.
            Some(d) if d == pb::TaskState::Running as i32 => {
                t.desired_state <= pb::TaskState::Running as i32
            }
            Some(d) if d == pb::TaskState::Accepted as i32 => {
                t.desired_state == pb::TaskState::Accepted as i32
            }
            Some(_) => t.desired_state > pb::TaskState::Running as i32,
            None => true,
        };
        let tid = t.meta.as_ref().map_or("", |m| m.id.as_str());
        wanted_state
            && node_id.as_ref().is_none_or(|n| &t.node_id == n)
            && id_filter
                .as_ref()
                .is_none_or(|f| tid.starts_with(f.as_str()))
            && name_filter.as_ref().is_none_or(|f| *f == task_name(t))
    };
    for mut list in lists {
        if let (Some(n), true) = (&node_id, list.node.is_empty()) {
            list.node = n.clone();
        }
        // Only the tasks the filters keep are held, page after page.
        let mut tasks = Vec::new();
        crate::each_page!(c, list_tasks, list, |page: Vec<pb::Task>| {
            tasks.extend(page.into_iter().filter(keep));
            anyhow::Ok(())
        })
        .await?;
        // Group by service and slot (replicated) or node (global); newest first in a group.
        let key = |t: &pb::Task| {
            (
                t.service_name.clone(),
                t.slot,
                if t.slot == 0 {
                    t.node_id.clone()
                } else {
                    String::new()
                },
            )
        };
        tasks.sort_by(|a, b| {
            key(a).cmp(&key(b)).then_with(|| {
                let at = |t: &pb::Task| t.meta.as_ref().map_or(0, |m| m.created_at_ms);
                at(b).cmp(&at(a))
            })
        });
        let mut previous_key = None;
        for task in &tasks {
            let k = key(task);
            let first = previous_key.as_ref() != Some(&k);
            previous_key = Some(k);
            let tname = task_name(task);
            let tid = task.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
            if quiet {
                println!("{tid}");
                continue;
            }
            if output == PsOutput::Json {
                json.item(&task_json(task))?;
                continue;
            }
            let status = task.status.clone().unwrap_or_default();
            let err = if status.state == pb::TaskState::Pending as i32 {
                task.scheduling_message.clone()
            } else if status.state > pb::TaskState::Running as i32 {
                status.err.clone()
            } else {
                String::new()
            };
            let err = if err.is_empty() {
                String::new()
            } else if no_trunc || err.chars().count() <= PS_ERROR_WIDTH {
                format!("\"{err}\"")
            } else {
                let cut: String = err.chars().take(PS_ERROR_WIDTH - 1).collect();
                format!("\"{cut}…\"")
            };
            // A preparing task says what it does ("Preparing (pulling app:1) 3 seconds ago").
            let title = if status.state == pb::TaskState::Preparing as i32
                && status.message.starts_with("pulling")
            {
                format!("{} (pulling)", state_title(status.state))
            } else if status.state == pb::TaskState::Running as i32 && status.health != 0 {
                // A checked task says how it fares, as `docker ps` does ("Up … (healthy)").
                format!(
                    "{} ({})",
                    state_title(status.state),
                    health_word(status.health)
                )
            } else {
                state_title(status.state)
            };
            let when = if status.timestamp_ms > 0 {
                format!("{title} {} ago", human_duration(now - status.timestamp_ms))
            } else {
                title
            };
            let img = task
                .spec
                .as_ref()
                .and_then(|s| s.container.as_ref())
                .map(|c| {
                    if no_trunc {
                        c.image.clone()
                    } else {
                        unpinned(&c.image).to_string()
                    }
                })
                .unwrap_or_default();
            t.row(vec![
                if no_trunc {
                    tid.clone()
                } else {
                    output::short(&tid).to_string()
                },
                if first {
                    tname
                } else {
                    format!(" \\_ {tname}")
                },
                img,
                hostname.get(&task.node_id).cloned().unwrap_or_default(),
                state_title(task.desired_state),
                when,
                err,
                String::new(),
            ]);
        }
    }
    match output {
        PsOutput::Quiet => {}
        PsOutput::Json => json.end()?,
        PsOutput::Table { .. } => t.print(),
    }
    Ok(())
}

/// A task's name as `service ps` shows it: SERVICE.SLOT, or SERVICE.NODE for a global one.
fn task_name(t: &pb::Task) -> String {
    if t.slot > 0 {
        format!("{}.{}", t.service_name, t.slot)
    } else {
        format!("{}.{}", t.service_name, t.node_id)
    }
}

/// Docker's word for a container's health (`State.Health.Status`).
fn health_word(h: i32) -> &'static str {
    match pb::HealthState::try_from(h) {
        Ok(pb::HealthState::Starting) => "health: starting",
        Ok(pb::HealthState::Healthy) => "healthy",
        Ok(pb::HealthState::Unhealthy) => "unhealthy",
        _ => "none",
    }
}

/// A task in full, as `service ps --format json` prints it.
fn task_json(t: &pb::Task) -> Value {
    let st = t.status.clone().unwrap_or_default();
    let c = t
        .spec
        .as_ref()
        .and_then(|s| s.container.clone())
        .unwrap_or_default();
    serde_json::json!({
        "ID": t.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
        "CreatedAtMs": t.meta.as_ref().map_or(0, |m| m.created_at_ms),
        "ServiceID": t.service_id,
        "Slot": t.slot,
        "NodeID": t.node_id,
        "SpecVersion": t.spec_version,
        "Image": c.image,
        "Args": c.args,
        "Env": c.env,
        "DesiredState": progress::state_word(t.desired_state),
        "Status": {
            "State": progress::state_word(st.state),
            "TimestampMs": st.timestamp_ms,
            "Message": st.message,
            "Err": st.err,
            "ExitCode": st.exit_code,
            // Docker's State.Health (no log: the output of the check that last changed it).
            "Health": (st.health != 0).then(|| serde_json::json!({
                "Status": health_word(st.health).trim_start_matches("health: "),
                "FailingStreak": st.health_failing_streak,
                "Output": st.health_output,
            })),
        },
        "NetworksAttachments": t.networks.iter().map(|a| serde_json::json!({
            "Network": {"ID": a.network_id, "Name": a.network_name, "VXLAN": a.vni},
            "Addresses": [a.address],
        })).collect::<Vec<_>>(),
    })
}

/// `service ps --format json`: every task of the services.
/// `service inspect --pretty`.
fn pretty_service(s: &pb::Service) -> String {
    let sp = s.spec.clone().unwrap_or_default();
    let task = sp.task.clone().unwrap_or_default();
    let c = task.container.clone().unwrap_or_default();
    let mut out = String::new();
    // Values start in column 17, or one space after a longer key ("Monitoring Period: 5s").
    let mut line = |k: &str, v: String| {
        let w = 16.max(k.chars().count() + 1);
        out.push_str(&format!("{}\n", format!("{k:<w$}{v}").trim_end()))
    };
    line("ID:", id(s));
    line("Name:", sp.name.clone());
    if !sp.labels.is_empty() {
        line("Labels:", String::new());
        for (k, v) in &sp.labels {
            line(&format!(" {k}"), format!("= {v}"));
        }
    }
    match &sp.mode {
        Some(Mode::Global(_)) => line("Service Mode:", "Global".into()),
        Some(Mode::Replicated(r)) => {
            line("Service Mode:", "Replicated".into());
            line(" Replicas:", r.replicas.to_string());
        }
        None => {}
    }
    let placement = task.placement.clone().unwrap_or_default();
    line("Placement:", String::new());
    if !placement.constraints.is_empty() {
        line(
            " Constraints:",
            format!("[{}]", placement.constraints.join(" ")),
        );
    }
    if placement.max_replicas_per_node > 0 {
        line(
            " Max Replicas Per Node:",
            placement.max_replicas_per_node.to_string(),
        );
    }
    if let Some(u) = s.update_status.as_ref().filter(|u| u.started_at_ms > 0) {
        line("UpdateStatus:", String::new());
        line(" State:", update_state_word(s));
        line(
            " Started:",
            format!("{} ago", human_duration(now_ms() - u.started_at_ms)),
        );
        if u.completed_at_ms > 0 {
            line(
                " Completed:",
                format!("{} ago", human_duration(now_ms() - u.completed_at_ms)),
            );
        }
        line(" Message:", u.message.clone());
    }
    let r = task.restart.unwrap_or_default();
    line("RestartPolicy:", String::new());
    line(
        " Condition:",
        r.condition()
            .as_str_name()
            .trim_start_matches("RESTART_CONDITION_")
            .to_ascii_lowercase()
            .replace('_', "-"),
    );
    line(" Delay:", output::format_ms(r.delay_ms));
    if r.max_attempts > 0 {
        line(" Max Attempts:", r.max_attempts.to_string());
    }
    if r.window_ms > 0 {
        line(" Window:", output::format_ms(r.window_ms));
    }
    line("ContainerSpec:", String::new());
    line(" Image:", c.image.clone());
    if !c.command.is_empty() {
        line(" Command:", c.command.join(" "));
    }
    if !c.args.is_empty() {
        line(" Args:", c.args.join(" "));
    }
    if !c.env.is_empty() {
        line(" Env:", c.env.join(" "));
    }
    line(" Stop Grace:", output::format_ms(c.stop_grace_period_ms));
    if let Some(h) = &c.healthcheck {
        line("Healthcheck:", String::new());
        if h.test.first().is_some_and(|t| t == "NONE") {
            line(" Disabled:", "true (the image's too)".into());
        } else {
            if !h.test.is_empty() {
                line(" Test:", h.test.join(" "));
            }
            let or_default = |ms: u64, d: &str| {
                if ms == 0 {
                    d.to_string()
                } else {
                    output::format_ms(ms)
                }
            };
            line(" Interval:", or_default(h.interval_ms, "image's or 30s"));
            line(" Timeout:", or_default(h.timeout_ms, "image's or 30s"));
            line(
                " Start Period:",
                or_default(h.start_period_ms, "image's or 0s"),
            );
            line(
                " Retries:",
                match h.retries {
                    0 => "image's or 3".into(),
                    r => r.to_string(),
                },
            );
        }
    }
    if let Some(u) = &sp.update {
        pretty_update_config(&mut line, "UpdateConfig:", u);
    }
    if let Some(u) = &sp.rollback {
        pretty_update_config(&mut line, "RollbackConfig:", u);
    }
    let res = task.resources.unwrap_or_default();
    let (lim, rsv) = (
        res.limits.unwrap_or_default(),
        res.reservations.unwrap_or_default(),
    );
    if lim != pb::Resources::default() || rsv != pb::Resources::default() {
        line("Resources:", String::new());
        let cpus = |n: i64| format!("{}", n as f64 / 1e9);
        let mem = |b: i64| format!("{}MiB", b / (1 << 20));
        if rsv != pb::Resources::default() {
            line(" Reservations:", String::new());
            if rsv.nano_cpus > 0 {
                line("  CPU:", cpus(rsv.nano_cpus));
            }
            if rsv.memory_bytes > 0 {
                line("  Memory:", mem(rsv.memory_bytes));
            }
        }
        if lim != pb::Resources::default() {
            line(" Limits:", String::new());
            if lim.nano_cpus > 0 {
                line("  CPU:", cpus(lim.nano_cpus));
            }
            if lim.memory_bytes > 0 {
                line("  Memory:", mem(lim.memory_bytes));
            }
        }
    }
    out
}

#[cfg(test)]
mod pretty_tests {
    use super::*;

    #[test]
    fn pretty_values_line_up_and_long_keys_keep_a_space() {
        let s = pb::Service {
            spec: Some(pb::ServiceSpec {
                name: "web".into(),
                update: Some(pb::UpdateConfig {
                    monitor_ms: 5_000,
                    parallelism: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = pretty_service(&s);
        assert!(text.contains("Name:           web\n"), "{text}");
        assert!(text.contains(" Monitoring Period: 5s\n"), "{text}");
        for l in text.lines() {
            if let Some((k, v)) = l.split_once(':') {
                assert!(v.is_empty() || v.starts_with(' '), "{l:?}");
                let _ = k;
            }
        }
    }
}
