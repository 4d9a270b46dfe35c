//! `shoal service update` and `shoal service rollback`: change a running service's spec
//! (which starts a rolling update of the tasks whose spec changed), or swap the previous spec
//! back in. Both follow the update until it completes unless `--detach`.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::service_spec::Mode;
use tonic::transport::Channel;

use super::super::output::{self, parse_duration_ms, rpc};
use super::{id, progress, replicas, FailureActionArg, OrderArg, RestartArg};

/// How many times an update is re-read and re-sent when the service changed in between (the
/// update orchestrator writes the update status as it goes).
pub const UPDATE_RETRIES: usize = 10;

/// A rollback's failure action: a rollback is never itself rolled back.
#[derive(Clone, Copy, ValueEnum)]
pub enum RollbackActionArg {
    Pause,
    Continue,
}

/// The health check flags of `service create` and `service update` (docker's).
#[derive(Args, Clone, Default)]
pub struct HealthFlags {
    /// Command to run to check health (run by /bin/sh -c in the container)
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) health_cmd: Option<String>,
    /// Time between running the check (ms|s|m|h) (default 30s)
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) health_interval: Option<String>,
    /// Maximum time to allow one check to run (ms|s|m|h) (default 30s)
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) health_timeout: Option<String>,
    /// Consecutive failures needed to report unhealthy (default 3)
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) health_retries: Option<String>,
    /// Start period for the container to initialize before failed checks count (ms|s|m|h)
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) health_start_period: Option<String>,
    /// Disable any container-specified HEALTHCHECK
    #[arg(long)]
    pub(crate) no_healthcheck: bool,
}

/// The health check flags, checked: what they change in a container spec's health check.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct HealthEdit {
    cmd: Option<String>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    start_period_ms: Option<u64>,
    retries: Option<u32>,
    none: bool,
}

fn health_duration(flag: &str, v: &Option<String>) -> anyhow::Result<Option<u64>> {
    match v.as_deref() {
        Some(s) if s.trim_start().starts_with('-') => {
            bail!("invalid {flag} {s:?}: must not be negative")
        }
        _ => duration(flag, v),
    }
}

impl HealthFlags {
    /// Checks the flags; nothing is sent yet.
    pub fn edit(&self) -> anyhow::Result<HealthEdit> {
        let e = HealthEdit {
            cmd: self.health_cmd.clone(),
            interval_ms: health_duration("--health-interval", &self.health_interval)?,
            timeout_ms: health_duration("--health-timeout", &self.health_timeout)?,
            start_period_ms: health_duration("--health-start-period", &self.health_start_period)?,
            retries: self
                .health_retries
                .as_deref()
                .map(|r| match r.trim().parse::<i64>() {
                    Ok(n) if n < 0 => bail!("invalid --health-retries {r:?}: must not be negative"),
                    Ok(n) => u32::try_from(n)
                        .map_err(|_| anyhow::anyhow!("invalid --health-retries {r:?}: too large")),
                    Err(_) => bail!("invalid --health-retries {r:?}: expected a whole number"),
                })
                .transpose()?,
            none: self.no_healthcheck,
        };
        let others = e.cmd.is_some()
            || e.interval_ms.is_some()
            || e.timeout_ms.is_some()
            || e.start_period_ms.is_some()
            || e.retries.is_some();
        if e.none && others {
            bail!("--no-healthcheck conflicts with --health-* options");
        }
        Ok(e)
    }
}

impl HealthEdit {
    /// No health flag was given.
    pub fn is_empty(&self) -> bool {
        *self == HealthEdit::default()
    }

    /// Applies the flags to a container spec's health check, as docker's `service update`
    /// does: `--no-healthcheck` sets test NONE (timers cleared); any other flag first drops a
    /// NONE, then sets what it names (`--health-cmd ""` leaves the image's command).
    pub fn apply(&self, h: &mut Option<pb::HealthCheck>) {
        if self.is_empty() {
            return;
        }
        if self.none {
            *h = Some(pb::HealthCheck {
                test: vec!["NONE".into()],
                ..Default::default()
            });
            return;
        }
        let hc = h.get_or_insert_with(Default::default);
        if hc.test.first().is_some_and(|t| t == "NONE") {
            hc.test.clear();
        }
        if let Some(cmd) = &self.cmd {
            hc.test = if cmd.is_empty() {
                Vec::new()
            } else {
                vec!["CMD-SHELL".into(), cmd.clone()]
            };
        }
        if let Some(v) = self.interval_ms {
            hc.interval_ms = v;
        }
        if let Some(v) = self.timeout_ms {
            hc.timeout_ms = v;
        }
        if let Some(v) = self.start_period_ms {
            hc.start_period_ms = v;
        }
        if let Some(v) = self.retries {
            hc.retries = v;
        }
    }
}

/// The update config flags of `service create` (docker's defaults).
#[derive(Args)]
pub struct CreateConfigArgs {
    /// Tasks updated at once (0 = all)
    #[arg(long, default_value_t = 1)]
    pub(crate) update_parallelism: u64,
    /// Delay between task updates
    #[arg(long, default_value = "0s")]
    pub(crate) update_delay: String,
    /// On update failure: pause, continue, rollback
    #[arg(long, value_enum, default_value_t = FailureActionArg::Pause)]
    pub(crate) update_failure_action: FailureActionArg,
    /// stop-first or start-first
    #[arg(long, value_enum, default_value_t = OrderArg::StopFirst)]
    pub(crate) update_order: OrderArg,
    /// How long an updated task is watched for failure
    #[arg(long, default_value = "5s")]
    pub(crate) update_monitor: String,
    /// Share of failed tasks tolerated during an update
    #[arg(long, default_value_t = 0.0)]
    pub(crate) update_max_failure_ratio: f32,
    /// Tasks rolled back at once (0 = all)
    #[arg(long, default_value_t = 1)]
    pub(crate) rollback_parallelism: u64,
    /// Delay between task rollbacks
    #[arg(long, default_value = "0s")]
    pub(crate) rollback_delay: String,
    /// On rollback failure: pause, continue
    #[arg(long, value_enum, default_value_t = RollbackActionArg::Pause)]
    pub(crate) rollback_failure_action: RollbackActionArg,
    /// stop-first or start-first
    #[arg(long, value_enum, default_value_t = OrderArg::StopFirst)]
    pub(crate) rollback_order: OrderArg,
    /// How long a rolled-back task is watched for failure
    #[arg(long, default_value = "5s")]
    pub(crate) rollback_monitor: String,
    /// Share of failed tasks tolerated during a rollback
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rollback_max_failure_ratio: f32,
}

fn action(a: FailureActionArg) -> i32 {
    (match a {
        FailureActionArg::Pause => pb::FailureAction::Pause,
        FailureActionArg::Continue => pb::FailureAction::Continue,
        FailureActionArg::Rollback => pb::FailureAction::Rollback,
    }) as i32
}

fn rollback_action(a: RollbackActionArg) -> i32 {
    (match a {
        RollbackActionArg::Pause => pb::FailureAction::Pause,
        RollbackActionArg::Continue => pb::FailureAction::Continue,
    }) as i32
}

fn order(o: OrderArg) -> i32 {
    (match o {
        OrderArg::StopFirst => pb::UpdateOrder::StopFirst,
        OrderArg::StartFirst => pb::UpdateOrder::StartFirst,
    }) as i32
}

fn ratio(flag: &str, r: f32) -> anyhow::Result<f32> {
    if !(0.0..=1.0).contains(&r) {
        bail!("invalid {flag} {r}: must be between 0 and 1");
    }
    Ok(r)
}

impl CreateConfigArgs {
    /// The update and rollback configs.
    pub fn configs(&self) -> anyhow::Result<(pb::UpdateConfig, pb::UpdateConfig)> {
        let update = pb::UpdateConfig {
            parallelism: self.update_parallelism,
            delay_ms: parse_duration_ms(&self.update_delay).context("--update-delay")?,
            failure_action: action(self.update_failure_action),
            monitor_ms: parse_duration_ms(&self.update_monitor).context("--update-monitor")?,
            max_failure_ratio: ratio("--update-max-failure-ratio", self.update_max_failure_ratio)?,
            order: order(self.update_order),
        };
        let rollback = pb::UpdateConfig {
            parallelism: self.rollback_parallelism,
            delay_ms: parse_duration_ms(&self.rollback_delay).context("--rollback-delay")?,
            failure_action: rollback_action(self.rollback_failure_action),
            monitor_ms: parse_duration_ms(&self.rollback_monitor).context("--rollback-monitor")?,
            max_failure_ratio: ratio(
                "--rollback-max-failure-ratio",
                self.rollback_max_failure_ratio,
            )?,
            order: order(self.rollback_order),
        };
        Ok((update, rollback))
    }
}

/// How a service's image meets its registry (create and update).
#[derive(Args, Clone, Default)]
pub struct RegistryFlags {
    /// Keep the image's tag as given instead of pinning it to the registry's digest
    #[arg(long)]
    pub no_resolve_image: bool,
    /// Send this node's registry login (`shoal login`) to the nodes that run the tasks
    #[arg(long)]
    pub with_registry_auth: bool,
}

impl RegistryFlags {
    /// Gives `spec` this node's credentials for its image's registry, with
    /// `--with-registry-auth` (none kept: none sent, as docker does).
    pub async fn apply(&self, spec: &mut pb::ServiceSpec) {
        if !self.with_registry_auth {
            return;
        }
        let Some(c) = spec.task.as_mut().and_then(|t| t.container.as_mut()) else {
            return;
        };
        let data = output::data_dir_async().await;
        if let Some((server, username, password)) =
            shoal_worker::registry::login_for(&data, &c.image)
        {
            c.registry_auth = Some(pb::RegistryCredentials {
                server,
                username,
                password,
            });
        }
    }
}

/// A `--secret`/`--config` value (docker's): `NAME`, or
/// `source=NAME[,target=PATH][,uid=U][,gid=G][,mode=0444]` (mode in octal). Targets and
/// defaults are the manager's to check and fill in.
pub fn file_ref(flag: &str, v: &str) -> anyhow::Result<pb::FileReference> {
    let mut r = pb::FileReference::default();
    if !v.contains('=') {
        r.name = v.to_string();
    } else {
        for field in v.split(',') {
            let (k, val) = field
                .split_once('=')
                .with_context(|| format!("invalid {flag} {v:?}: {field:?} is not KEY=VALUE"))?;
            let num = |what: &str, radix: u32| {
                u32::from_str_radix(val, radix).map_err(|_| {
                    anyhow::anyhow!("invalid {flag} {v:?}: {what} {val:?} is not a number")
                })
            };
            match k {
                "source" | "src" => r.name = val.to_string(),
                "target" => r.target = val.to_string(),
                "uid" => r.uid = num("uid", 10)?,
                "gid" => r.gid = num("gid", 10)?,
                "mode" => r.mode = num("mode (octal)", 8)?,
                other => bail!("invalid {flag} {v:?}: unknown key {other:?}"),
            }
        }
    }
    if r.name.is_empty() {
        bail!("invalid {flag} {v:?}: no source");
    }
    Ok(r)
}

/// Prints what the manager warned about on stderr, as docker does.
pub fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// `service update` flags: each one given changes that part of the spec.
#[derive(Args)]
pub struct UpdateArgs {
    /// Number of tasks
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    /// Image reference
    #[arg(long)]
    image: Option<String>,
    /// Command arguments (replaces them; split into words as a shell does: quotes, escapes)
    #[arg(long, allow_hyphen_values = true)]
    args: Option<String>,
    /// Entrypoint (replaces it; split into words as a shell does; "" for the image's)
    #[arg(long, value_name = "COMMAND", allow_hyphen_values = true)]
    entrypoint: Option<String>,
    /// Add or replace environment variables (NAME=VALUE)
    #[arg(long)]
    env_add: Vec<String>,
    /// Remove environment variables (NAME)
    #[arg(long)]
    env_rm: Vec<String>,
    /// Add placement constraints
    #[arg(long)]
    constraint_add: Vec<String>,
    /// Remove placement constraints
    #[arg(long)]
    constraint_rm: Vec<String>,
    /// Add or replace service labels (KEY=VALUE)
    #[arg(long)]
    label_add: Vec<String>,
    /// Remove service labels (KEY)
    #[arg(long)]
    label_rm: Vec<String>,
    /// Attach the service to a cluster network (name or id)
    #[arg(long)]
    network_add: Vec<String>,
    /// Detach the service from a cluster network (name or id)
    #[arg(long)]
    network_rm: Vec<String>,
    /// Add a secret: NAME or source=NAME[,target=PATH,uid=U,gid=G,mode=0444]
    #[arg(long)]
    secret_add: Vec<String>,
    /// Remove a secret (name)
    #[arg(long)]
    secret_rm: Vec<String>,
    /// Add a config: NAME or source=NAME[,target=PATH,uid=U,gid=G,mode=0444]
    #[arg(long)]
    config_add: Vec<String>,
    /// Remove a config (name)
    #[arg(long)]
    config_rm: Vec<String>,
    /// Add a mount (or replace the one at its target): type=bind|volume,source=…,target=…
    #[arg(long)]
    mount_add: Vec<String>,
    /// Remove a mount by its target path
    #[arg(long)]
    mount_rm: Vec<String>,
    /// CPU limit (e.g. 0.5; 0 = none)
    #[arg(long)]
    limit_cpu: Option<String>,
    /// Memory limit (e.g. 512m; 0 = none)
    #[arg(long)]
    limit_memory: Option<String>,
    /// Process count limit (0 = none)
    #[arg(long)]
    limit_pids: Option<i64>,
    /// CPUs reserved
    #[arg(long)]
    reserve_cpu: Option<String>,
    /// Memory reserved
    #[arg(long)]
    reserve_memory: Option<String>,
    /// Working directory in the container
    #[arg(short, long)]
    workdir: Option<String>,
    /// User in the container
    #[arg(short, long)]
    user: Option<String>,
    /// Time to wait after SIGTERM before SIGKILL
    #[arg(long)]
    stop_grace_period: Option<String>,
    #[command(flatten)]
    health: HealthFlags,
    /// Restart when: none, on-failure, any
    #[arg(long, value_enum)]
    restart_condition: Option<RestartArg>,
    /// Delay between restarts
    #[arg(long)]
    restart_delay: Option<String>,
    /// Restarts before giving up (0 = unlimited)
    #[arg(long)]
    restart_max_attempts: Option<u64>,
    /// Tasks updated at once (0 = all)
    #[arg(long)]
    update_parallelism: Option<u64>,
    /// Delay between task updates
    #[arg(long)]
    update_delay: Option<String>,
    /// On update failure: pause, continue, rollback
    #[arg(long, value_enum)]
    update_failure_action: Option<FailureActionArg>,
    /// How long an updated task is watched for failure
    #[arg(long)]
    update_monitor: Option<String>,
    /// Share of failed tasks tolerated during an update
    #[arg(long)]
    update_max_failure_ratio: Option<f32>,
    /// stop-first or start-first
    #[arg(long, value_enum)]
    update_order: Option<OrderArg>,
    /// Tasks rolled back at once (0 = all)
    #[arg(long)]
    rollback_parallelism: Option<u64>,
    /// Delay between task rollbacks
    #[arg(long)]
    rollback_delay: Option<String>,
    /// On rollback failure: pause, continue
    #[arg(long, value_enum)]
    rollback_failure_action: Option<RollbackActionArg>,
    /// How long a rolled-back task is watched for failure
    #[arg(long)]
    rollback_monitor: Option<String>,
    /// Share of failed tasks tolerated during a rollback
    #[arg(long)]
    rollback_max_failure_ratio: Option<f32>,
    /// stop-first or start-first
    #[arg(long, value_enum)]
    rollback_order: Option<OrderArg>,
    /// Redeploy every task even if nothing changed
    #[arg(long)]
    force: bool,
    /// Roll back to the previous spec (as `service rollback`)
    #[arg(long)]
    rollback: bool,
    /// Return at once instead of following the update
    #[arg(short, long)]
    detach: bool,
    /// Follow the update without drawing progress
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryFlags,
    pub service: String,
}

/// The flags of `service update`, checked and parsed before the daemon is asked anything.
#[derive(Clone)]
pub struct Edit {
    replicas: Option<u64>,
    image: Option<String>,
    args: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    env_add: Vec<(String, String)>,
    env_rm: Vec<String>,
    constraint_add: Vec<String>,
    constraint_rm: Vec<String>,
    label_add: Vec<(String, String)>,
    label_rm: Vec<String>,
    /// Cluster networks, by name or id as given until [`Edit::resolve_networks`] makes them ids.
    network_add: Vec<String>,
    network_rm: Vec<String>,
    secret_add: Vec<pb::FileReference>,
    secret_rm: Vec<String>,
    config_add: Vec<pb::FileReference>,
    config_rm: Vec<String>,
    mount_add: Vec<pb::Mount>,
    mount_rm: Vec<String>,
    limit_cpu: Option<i64>,
    limit_memory: Option<i64>,
    limit_pids: Option<i64>,
    reserve_cpu: Option<i64>,
    reserve_memory: Option<i64>,
    workdir: Option<String>,
    user: Option<String>,
    stop_grace_ms: Option<u64>,
    health: HealthEdit,
    restart_condition: Option<i32>,
    restart_delay_ms: Option<u64>,
    restart_max_attempts: Option<u64>,
    update: ConfigEdit,
    rollback_cfg: ConfigEdit,
    force: bool,
    /// Roll back instead of editing.
    pub rollback: bool,
    pub detach: bool,
    pub quiet: bool,
    registry: RegistryFlags,
}

#[derive(Default, Clone)]
struct ConfigEdit {
    parallelism: Option<u64>,
    delay_ms: Option<u64>,
    failure_action: Option<i32>,
    monitor_ms: Option<u64>,
    max_failure_ratio: Option<f32>,
    order: Option<i32>,
}

impl ConfigEdit {
    fn apply(&self, c: &mut pb::UpdateConfig) {
        if let Some(v) = self.parallelism {
            c.parallelism = v;
        }
        if let Some(v) = self.delay_ms {
            c.delay_ms = v;
        }
        if let Some(v) = self.failure_action {
            c.failure_action = v;
        }
        if let Some(v) = self.monitor_ms {
            c.monitor_ms = v;
        }
        if let Some(v) = self.max_failure_ratio {
            c.max_failure_ratio = v;
        }
        if let Some(v) = self.order {
            c.order = v;
        }
    }
}

fn duration(flag: &str, v: &Option<String>) -> anyhow::Result<Option<u64>> {
    v.as_deref()
        .map(|s| parse_duration_ms(s).with_context(|| flag.to_string()))
        .transpose()
}

fn env_pair(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("invalid --env-add {s:?}: expected NAME=VALUE"),
    }
}

impl UpdateArgs {
    /// Checks every flag; nothing is sent yet.
    pub fn edit(&self) -> anyhow::Result<Edit> {
        let cpu = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<i64>> {
            v.as_deref()
                .map(|s| output::parse_cpus(s).with_context(|| flag.to_string()))
                .transpose()
        };
        let mem = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<i64>> {
            v.as_deref()
                .map(|s| output::parse_bytes(s).with_context(|| flag.to_string()))
                .transpose()
        };
        if self.rollback {
            let edits = self.replicas.is_some()
                || self.image.is_some()
                || self.args.is_some()
                || self.entrypoint.is_some()
                || !self.env_add.is_empty()
                || !self.env_rm.is_empty()
                || !self.constraint_add.is_empty()
                || !self.constraint_rm.is_empty()
                || !self.network_add.is_empty()
                || !self.network_rm.is_empty()
                || !self.health.edit()?.is_empty()
                || !self.secret_add.is_empty()
                || !self.secret_rm.is_empty()
                || !self.config_add.is_empty()
                || !self.config_rm.is_empty()
                || !self.mount_add.is_empty()
                || !self.mount_rm.is_empty()
                || self.force;
            if edits {
                bail!("--rollback cannot be combined with flags that change the spec");
            }
        }
        if let Some(p) = self.limit_pids {
            if p < 0 {
                bail!("invalid --limit-pids {p}: must not be negative");
            }
        }
        let label_add = self
            .label_add
            .iter()
            .map(|s| match s.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => bail!("invalid --label-add {s:?}: expected KEY=VALUE"),
            })
            .collect::<anyhow::Result<_>>()?;
        let update = ConfigEdit {
            parallelism: self.update_parallelism,
            delay_ms: duration("--update-delay", &self.update_delay)?,
            failure_action: self.update_failure_action.map(action),
            monitor_ms: duration("--update-monitor", &self.update_monitor)?,
            max_failure_ratio: self
                .update_max_failure_ratio
                .map(|r| ratio("--update-max-failure-ratio", r))
                .transpose()?,
            order: self.update_order.map(order),
        };
        let rollback_cfg = ConfigEdit {
            parallelism: self.rollback_parallelism,
            delay_ms: duration("--rollback-delay", &self.rollback_delay)?,
            failure_action: self.rollback_failure_action.map(rollback_action),
            monitor_ms: duration("--rollback-monitor", &self.rollback_monitor)?,
            max_failure_ratio: self
                .rollback_max_failure_ratio
                .map(|r| ratio("--rollback-max-failure-ratio", r))
                .transpose()?,
            order: self.rollback_order.map(order),
        };
        Ok(Edit {
            replicas: self.replicas.map(replicas).transpose()?,
            image: self.image.clone(),
            args: self
                .args
                .as_deref()
                .map(output::shell_words)
                .transpose()
                .context("--args")?,
            entrypoint: self
                .entrypoint
                .as_deref()
                .map(output::shell_words)
                .transpose()
                .context("--entrypoint")?,
            env_add: self
                .env_add
                .iter()
                .map(|s| env_pair(s))
                .collect::<anyhow::Result<_>>()?,
            env_rm: self.env_rm.clone(),
            constraint_add: self.constraint_add.clone(),
            constraint_rm: self.constraint_rm.clone(),
            label_add,
            label_rm: self.label_rm.clone(),
            network_add: checked_networks("--network-add", &self.network_add)?,
            network_rm: checked_networks("--network-rm", &self.network_rm)?,
            secret_add: self
                .secret_add
                .iter()
                .map(|v| file_ref("--secret-add", v))
                .collect::<anyhow::Result<_>>()?,
            secret_rm: self.secret_rm.clone(),
            config_add: self
                .config_add
                .iter()
                .map(|v| file_ref("--config-add", v))
                .collect::<anyhow::Result<_>>()?,
            config_rm: self.config_rm.clone(),
            mount_add: self
                .mount_add
                .iter()
                .map(|v| super::mount(v).context("--mount-add"))
                .collect::<anyhow::Result<_>>()?,
            mount_rm: self.mount_rm.clone(),
            limit_cpu: cpu("--limit-cpu", &self.limit_cpu)?,
            limit_memory: mem("--limit-memory", &self.limit_memory)?,
            limit_pids: self.limit_pids,
            reserve_cpu: cpu("--reserve-cpu", &self.reserve_cpu)?,
            reserve_memory: mem("--reserve-memory", &self.reserve_memory)?,
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            stop_grace_ms: duration("--stop-grace-period", &self.stop_grace_period)?,
            health: self.health.edit()?,
            restart_condition: self.restart_condition.map(|c| {
                (match c {
                    RestartArg::None => pb::RestartCondition::None,
                    RestartArg::OnFailure => pb::RestartCondition::OnFailure,
                    RestartArg::Any => pb::RestartCondition::Any,
                }) as i32
            }),
            restart_delay_ms: duration("--restart-delay", &self.restart_delay)?,
            restart_max_attempts: self.restart_max_attempts,
            update,
            rollback_cfg,
            force: self.force,
            rollback: self.rollback,
            detach: self.detach,
            quiet: self.quiet,
            registry: self.registry.clone(),
        })
    }
}

/// `--network-add/--network-rm` values: cluster networks, each once, in no other flag's way.
fn checked_networks(flag: &str, given: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for n in given {
        if n.is_empty() {
            bail!("invalid {flag}: an empty network name");
        }
        if matches!(n.as_str(), "host" | "none" | "bridge" | "ingress") {
            bail!("invalid {flag} {n}: only cluster networks are added or removed");
        }
        if out.contains(n) {
            bail!("invalid {flag}: network {n} is given twice");
        }
        out.push(n.clone());
    }
    Ok(out)
}

impl Edit {
    /// The edit with `--network-add/--network-rm` named by network id, as the spec holds them
    /// (an unknown network, or removing one the service is not on, is an error later).
    pub async fn resolve_networks(&self, c: &mut ControlClient<Channel>) -> anyhow::Result<Edit> {
        if self.network_add.is_empty() && self.network_rm.is_empty() {
            return Ok(self.clone());
        }
        let networks = output::all_networks(c, pb::ListNetworksRequest::default()).await?;
        let resolve = |key: &String| -> anyhow::Result<String> {
            let id = |n: &pb::Network| n.meta.as_ref().map_or(String::new(), |m| m.id.clone());
            let name =
                |n: &pb::Network| n.spec.as_ref().map_or("", |s| s.name.as_str()).to_string();
            let hits: Vec<&pb::Network> = networks
                .iter()
                .filter(|n| name(n) == *key || id(n) == *key)
                .collect();
            let hits = if hits.is_empty() {
                networks
                    .iter()
                    .filter(|n| id(n).starts_with(key.as_str()))
                    .collect()
            } else {
                hits
            };
            match hits.as_slice() {
                [one] => Ok(id(one)),
                [] => bail!("network {key} not found"),
                _ => bail!("network {key} is ambiguous"),
            }
        };
        let mut e = self.clone();
        e.network_add = self
            .network_add
            .iter()
            .map(resolve)
            .collect::<anyhow::Result<_>>()?;
        e.network_rm = self
            .network_rm
            .iter()
            .map(resolve)
            .collect::<anyhow::Result<_>>()?;
        Ok(e)
    }

    /// The spec with these edits applied.
    pub fn apply(&self, mut spec: pb::ServiceSpec) -> anyhow::Result<pb::ServiceSpec> {
        if let Some(n) = self.replicas {
            match &mut spec.mode {
                Some(Mode::Replicated(r)) => r.replicas = n,
                _ => bail!("--replicas applies to replicated services only"),
            }
        }
        for (k, v) in &self.label_add {
            spec.labels.insert(k.clone(), v.clone());
        }
        for k in &self.label_rm {
            spec.labels.remove(k);
        }
        self.update
            .apply(spec.update.get_or_insert_with(default_config));
        self.rollback_cfg
            .apply(spec.rollback.get_or_insert_with(default_config));
        let task = spec.task.get_or_insert_with(Default::default);
        let c = task.container.get_or_insert_with(Default::default);
        if let Some(i) = &self.image {
            c.image = i.clone();
        }
        if let Some(a) = &self.args {
            c.args = a.clone();
        }
        if let Some(e) = &self.entrypoint {
            c.command = e.clone();
        }
        for name in &self.env_rm {
            c.env
                .retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != name);
        }
        for (k, v) in &self.env_add {
            c.env
                .retain(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) != k);
            c.env.push(format!("{k}={v}"));
        }
        if let Some(w) = &self.workdir {
            c.dir = w.clone();
        }
        for id in &self.network_rm {
            if !task.networks.contains(id) {
                bail!("service is not attached to network {id}");
            }
            task.networks.retain(|n| n != id);
            task.network_aliases.retain(|a| a.network != *id);
        }
        for id in &self.network_add {
            if task.networks.contains(id) {
                bail!("service is already attached to network {id}");
            }
            task.networks.push(id.clone());
        }
        for (kind, refs, rm, add) in [
            ("secret", &mut c.secrets, &self.secret_rm, &self.secret_add),
            ("config", &mut c.configs, &self.config_rm, &self.config_add),
        ] {
            for name in rm {
                if !refs.iter().any(|r| r.name == *name || r.id == *name) {
                    bail!("service has no {kind} {name}");
                }
                refs.retain(|r| r.name != *name && r.id != *name);
            }
            refs.extend(add.iter().cloned());
        }
        // Docker's: removed by target; an added mount replaces the one at its target.
        let clean = |t: &str| {
            let parts: Vec<&str> = t
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .collect();
            format!("/{}", parts.join("/"))
        };
        for t in &self.mount_rm {
            if !c.mounts.iter().any(|m| clean(&m.target) == clean(t)) {
                bail!("service has no mount at {t}");
            }
            c.mounts.retain(|m| clean(&m.target) != clean(t));
        }
        for m in &self.mount_add {
            c.mounts.retain(|x| clean(&x.target) != clean(&m.target));
            c.mounts.push(m.clone());
        }
        if let Some(u) = &self.user {
            c.user = u.clone();
        }
        if let Some(g) = self.stop_grace_ms {
            c.stop_grace_period_ms = g;
        }
        self.health.apply(&mut c.healthcheck);
        if let Some(p) = self.limit_pids {
            c.pids_limit = p;
        }
        let placement = task.placement.get_or_insert_with(Default::default);
        for rm in &self.constraint_rm {
            placement.constraints.retain(|x| x != rm);
        }
        for add in &self.constraint_add {
            if !placement.constraints.contains(add) {
                placement.constraints.push(add.clone());
            }
        }
        let res = task.resources.get_or_insert_with(Default::default);
        let limits = res.limits.get_or_insert_with(Default::default);
        if let Some(v) = self.limit_cpu {
            limits.nano_cpus = v;
        }
        if let Some(v) = self.limit_memory {
            limits.memory_bytes = v;
        }
        let reservations = res.reservations.get_or_insert_with(Default::default);
        if let Some(v) = self.reserve_cpu {
            reservations.nano_cpus = v;
        }
        if let Some(v) = self.reserve_memory {
            reservations.memory_bytes = v;
        }
        if self.restart_condition.is_some()
            || self.restart_delay_ms.is_some()
            || self.restart_max_attempts.is_some()
        {
            let r = task.restart.get_or_insert_with(Default::default);
            if let Some(v) = self.restart_condition {
                r.condition = v;
            }
            if let Some(v) = self.restart_delay_ms {
                r.delay_ms = v;
            }
            if let Some(v) = self.restart_max_attempts {
                r.max_attempts = v;
            }
        }
        if self.force {
            task.force_update += 1;
        }
        Ok(spec)
    }
}

/// Docker's update config (parallelism 1, pause, monitor 5 s, stop-first).
fn default_config() -> pb::UpdateConfig {
    pb::UpdateConfig {
        parallelism: 1,
        delay_ms: 0,
        failure_action: pb::FailureAction::Pause as i32,
        monitor_ms: 5_000,
        max_failure_ratio: 0.0,
        order: pb::UpdateOrder::StopFirst as i32,
    }
}

fn retryable(e: &tonic::Status) -> bool {
    e.code() == tonic::Code::FailedPrecondition
        && (e.message().contains("out of sequence") || e.message().contains("version"))
}

/// `service update`: applies the edit to the current spec (re-reading it when the service
/// changed in between), then follows the update unless detached.
pub async fn update(
    c: &mut ControlClient<Channel>,
    service: &str,
    edit: &Edit,
) -> anyhow::Result<()> {
    if edit.rollback {
        return rollback(c, service, edit.detach, edit.quiet).await;
    }
    let edit = &edit.resolve_networks(c).await?;
    let mut attempt = 0;
    let sid = loop {
        let cur = rpc(c
            .get_service(pb::GetServiceRequest {
                service: service.to_string(),
            })
            .await)?
        .service
        .unwrap_or_default();
        let mut spec = edit.apply(cur.spec.clone().unwrap_or_default())?;
        edit.registry.apply(&mut spec).await;
        let version = cur.meta.as_ref().map_or(0, |m| m.version);
        match c
            .update_service(pb::UpdateServiceRequest {
                service: id(&cur),
                version,
                spec: Some(spec),
                no_resolve_image: edit.registry.no_resolve_image,
            })
            .await
        {
            Ok(r) => {
                warn(&r.into_inner().warnings);
                break id(&cur);
            }
            Err(e) if retryable(&e) && attempt < UPDATE_RETRIES => attempt += 1,
            Err(e) => bail!("{}", e.message()),
        }
    };
    println!("{service}");
    if edit.detach {
        return Ok(());
    }
    progress::wait_updated(c, &sid, false, edit.quiet).await
}

/// `service rollback`: the previous spec back, rolled out under the rollback config.
pub async fn rollback(
    c: &mut ControlClient<Channel>,
    service: &str,
    detach: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let s = rpc(c
        .rollback_service(pb::RollbackServiceRequest {
            service: service.to_string(),
            version: 0,
        })
        .await)?
    .service
    .unwrap_or_default();
    println!("{service}");
    if detach {
        return Ok(());
    }
    progress::wait_updated(c, &id(&s), true, quiet).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        u: UpdateArgs,
    }

    fn edit(args: &[&str]) -> anyhow::Result<Edit> {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        all.push("web");
        Cli::try_parse_from(all)?.u.edit()
    }

    fn base() -> pb::ServiceSpec {
        pb::ServiceSpec {
            name: "web".into(),
            mode: Some(Mode::Replicated(pb::ReplicatedService { replicas: 2 })),
            task: Some(pb::TaskSpec {
                container: Some(pb::ContainerSpec {
                    image: "busybox:1".into(),
                    args: vec!["sleep".into(), "10".into()],
                    env: vec!["A=1".into(), "B=2".into()],
                    ..Default::default()
                }),
                placement: Some(pb::Placement {
                    constraints: vec!["node.role==worker".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn healthcheck(spec: &pb::ServiceSpec) -> Option<pb::HealthCheck> {
        spec.task.as_ref()?.container.as_ref()?.healthcheck.clone()
    }

    #[test]
    fn health_flags_follow_docker_update() {
        let spec = edit(&["--health-cmd", "test -f /ok", "--health-retries", "5"])
            .unwrap()
            .apply(base())
            .unwrap();
        let h = healthcheck(&spec).unwrap();
        assert_eq!(h.test, vec!["CMD-SHELL", "test -f /ok"]);
        assert_eq!((h.retries, h.interval_ms), (5, 0));
        // A timer alone keeps the command.
        let spec = edit(&["--health-interval", "2s"])
            .unwrap()
            .apply(spec)
            .unwrap();
        let h = healthcheck(&spec).unwrap();
        assert_eq!(h.test, vec!["CMD-SHELL", "test -f /ok"]);
        assert_eq!((h.retries, h.interval_ms), (5, 2_000));
        // --no-healthcheck: NONE, timers gone.
        let spec = edit(&["--no-healthcheck"]).unwrap().apply(spec).unwrap();
        assert_eq!(
            healthcheck(&spec).unwrap(),
            pb::HealthCheck {
                test: vec!["NONE".into()],
                ..Default::default()
            }
        );
        // Any health flag after NONE drops it: the image's command with this timer.
        let spec = edit(&["--health-timeout", "3s"])
            .unwrap()
            .apply(spec)
            .unwrap();
        let h = healthcheck(&spec).unwrap();
        assert!(h.test.is_empty());
        assert_eq!(h.timeout_ms, 3_000);
        // No health flag: untouched.
        assert_eq!(
            healthcheck(&edit(&[]).unwrap().apply(base()).unwrap()),
            None
        );
        for bad in [
            &["--health-interval", "-1s"][..],
            &["--health-retries", "-2"],
            &["--health-retries", "x"],
            &["--health-timeout", "1parsec"],
            &["--no-healthcheck", "--health-retries", "1"],
            &["--rollback", "--health-cmd", "true"],
        ] {
            assert!(edit(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_edit_only_what_they_name() {
        let e = edit(&[
            "--image",
            "busybox:2",
            "--args",
            "sleep 20",
            "--env-add",
            "B=3",
            "--env-add",
            "C=4",
            "--env-rm",
            "A",
            "--constraint-rm",
            "node.role==worker",
            "--constraint-add",
            "node.labels.zone==a",
            "--limit-memory",
            "64m",
            "--update-parallelism",
            "2",
            "--update-order",
            "start-first",
            "--rollback-failure-action",
            "continue",
        ])
        .unwrap();
        let s = e.apply(base()).unwrap();
        let t = s.task.clone().unwrap();
        let c = t.container.unwrap();
        assert_eq!(c.image, "busybox:2");
        assert_eq!(c.args, vec!["sleep", "20"]);
        assert_eq!(c.env, vec!["B=3", "C=4"]);
        assert_eq!(
            t.placement.unwrap().constraints,
            vec!["node.labels.zone==a"]
        );
        assert_eq!(t.resources.unwrap().limits.unwrap().memory_bytes, 64 << 20);
        let u = s.update.unwrap();
        assert_eq!(
            (u.parallelism, u.order),
            (2, pb::UpdateOrder::StartFirst as i32)
        );
        assert_eq!(u.monitor_ms, 5_000, "unnamed settings keep their defaults");
        assert_eq!(
            s.rollback.unwrap().failure_action,
            pb::FailureAction::Continue as i32
        );
        assert!(matches!(s.mode, Some(Mode::Replicated(r)) if r.replicas == 2));

        // Docker's way: shell words, quotes kept together.
        let quoted = edit(&["--args", "sh -c 'exit 3'"])
            .unwrap()
            .apply(base())
            .unwrap();
        assert_eq!(
            quoted.task.unwrap().container.unwrap().args,
            vec!["sh", "-c", "exit 3"]
        );
        assert!(edit(&["--args", "sh -c 'open"]).is_err());
        let entry = edit(&["--entrypoint", r#"/bin/sh -c "echo \"hi there\"""#])
            .unwrap()
            .apply(base())
            .unwrap();
        assert_eq!(
            entry.task.unwrap().container.unwrap().command,
            vec!["/bin/sh", "-c", r#"echo "hi there""#]
        );
        assert!(edit(&["--entrypoint", "sh 'open"]).is_err());

        let forced = edit(&["--force"]).unwrap().apply(base()).unwrap();
        assert_eq!(forced.task.unwrap().force_update, 1);
    }

    #[test]
    fn bad_flags_fail_before_anything_is_sent() {
        let err = |args: &[&str]| match edit(args) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err(&["--update-max-failure-ratio", "2"]).contains("between 0 and 1"));
        assert!(err(&["--update-delay", "10"]).contains("--update-delay"));
        assert!(err(&["--env-add", "=x"]).contains("NAME=VALUE"));
        assert!(err(&["--replicas", "-1"]).contains("must not be negative"));
        assert!(err(&["--rollback", "--image", "x"]).contains("cannot be combined"));
        assert!(err(&["--network-add", ""]).contains("empty network name"));
        assert!(err(&["--network-rm", "a", "--network-rm", "a"]).contains("given twice"));
        assert!(err(&["--network-add", "none"]).contains("only cluster networks"));
        assert!(err(&["--rollback", "--network-add", "x"]).contains("cannot be combined"));
        // Applied by id: a network the service is not on cannot be removed, nor one it is on
        // added again.
        let on = |ids: &[&str]| {
            let mut s = base();
            s.task.as_mut().unwrap().networks = ids.iter().map(|i| i.to_string()).collect();
            s
        };
        let e = edit(&["--network-rm", "n2"]).unwrap().apply(on(&["n1"]));
        assert!(format!("{:#}", e.unwrap_err()).contains("not attached to network n2"));
        let e = edit(&["--network-add", "n1"]).unwrap().apply(on(&["n1"]));
        assert!(format!("{:#}", e.unwrap_err()).contains("already attached"));
        let s = edit(&["--network-add", "n2", "--network-rm", "n1"])
            .unwrap()
            .apply(on(&["n1", "n3"]))
            .unwrap();
        assert_eq!(s.task.unwrap().networks, vec!["n3", "n2"]);
        // A rollback's failure action cannot be rollback.
        assert!(edit(&["--rollback-failure-action", "rollback"]).is_err());
        let global = pb::ServiceSpec {
            mode: Some(Mode::Global(pb::GlobalService {})),
            ..base()
        };
        let e = edit(&["--replicas", "3"]).unwrap().apply(global);
        assert!(format!("{:#}", e.unwrap_err()).contains("replicated services only"));
    }

    #[test]
    fn secret_and_config_flags_follow_docker() {
        let r = file_ref("--secret", "db").unwrap();
        assert_eq!((r.name.as_str(), r.target.as_str(), r.mode), ("db", "", 0));
        let r = file_ref(
            "--config",
            "source=app,target=/etc/app.conf,uid=1000,gid=1001,mode=0440",
        )
        .unwrap();
        assert_eq!(
            (r.name.as_str(), r.target.as_str(), r.uid, r.gid, r.mode),
            ("app", "/etc/app.conf", 1000, 1001, 0o440)
        );
        for (v, want) in [
            ("source=a,mode=0999", "is not a number"),
            ("target=/x", "no source"),
            ("source=a,size=1", "unknown key"),
            ("source=a,uid", "not KEY=VALUE"),
        ] {
            let e = file_ref("--secret", v).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{v}: {e}");
        }
        let mut spec = base();
        spec.task
            .as_mut()
            .unwrap()
            .container
            .as_mut()
            .unwrap()
            .secrets = vec![file_ref("--secret", "old").unwrap()];
        let s = edit(&[
            "--secret-rm",
            "old",
            "--secret-add",
            "source=new,target=/run/secrets/old",
        ])
        .unwrap()
        .apply(spec.clone())
        .unwrap();
        let c = s.task.unwrap().container.unwrap();
        assert_eq!(c.secrets.len(), 1);
        assert_eq!(
            (c.secrets[0].name.as_str(), c.secrets[0].target.as_str()),
            ("new", "/run/secrets/old")
        );
        let e = edit(&["--secret-rm", "nosuch"])
            .unwrap()
            .apply(spec)
            .unwrap_err();
        assert!(format!("{e:#}").contains("has no secret nosuch"));
        assert!(edit(&["--rollback", "--secret-add", "x"]).is_err());
    }

    #[test]
    fn mount_flags_add_replace_and_remove_by_target() {
        let mut spec = base();
        spec.task
            .as_mut()
            .unwrap()
            .container
            .as_mut()
            .unwrap()
            .mounts = vec![
            super::super::mount("source=old,target=/d").unwrap(),
            super::super::mount("type=bind,source=/srv,target=/s").unwrap(),
        ];
        let s = edit(&[
            "--mount-add",
            "type=bind,source=/data,target=/d/,readonly",
            "--mount-rm",
            "/s/",
        ])
        .unwrap()
        .apply(spec.clone())
        .unwrap();
        let c = s.task.unwrap().container.unwrap();
        assert_eq!(c.mounts.len(), 1, "{:?}", c.mounts);
        assert_eq!(
            (c.mounts[0].source.as_str(), c.mounts[0].read_only),
            ("/data", true)
        );
        assert_eq!(c.mounts[0].r#type, pb::MountType::Bind as i32);
        let e = edit(&["--mount-rm", "/nowhere"])
            .unwrap()
            .apply(spec)
            .unwrap_err();
        assert!(format!("{e:#}").contains("has no mount at /nowhere"));
        let e = edit(&["--mount-add", "type=volume,source=a/b,target=/x"])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("includes invalid characters"), "{e}");
        assert!(edit(&["--rollback", "--mount-rm", "/d"]).is_err());
    }
}
