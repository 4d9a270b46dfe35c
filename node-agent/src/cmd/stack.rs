//! `shoal stack deploy|ls|ps|services|rm`, with docker's words and flags. A stack exists only
//! in the client, as in docker: its services and networks are named `STACK_key` and carry
//! the label `com.docker.stack.namespace=STACK`; deploy computes every spec from the compose
//! files first and then calls the control API's create/update/remove RPCs.

mod compose;
mod yaml;

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail};
use clap::{ArgAction, Args, Subcommand, ValueEnum};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;

use super::output::{self, block_on, Format, SocketArg, Table};
use super::service::{self, progress, PsFilter};

/// Docker's label naming a stack's objects.
pub const NAMESPACE: &str = "com.docker.stack.namespace";

#[derive(Args)]
pub struct StackArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: StackCommand,
}

/// When service images are pinned to their registry's digest (docker's `--resolve-image`).
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ResolveImage {
    /// Every deploy asks the registry for every service
    Always,
    /// Only new services and those whose image changed
    Changed,
    /// Never: the image is used as written
    Never,
}

#[derive(Subcommand)]
enum StackCommand {
    /// Deploy a new stack or update an existing one from compose files
    #[command(alias = "up")]
    Deploy {
        /// Compose file (several: later files override keys of earlier ones)
        #[arg(short = 'c', long = "compose-file", required = true)]
        compose_file: Vec<String>,
        /// Remove the stack's services that the files no longer name
        #[arg(long)]
        prune: bool,
        /// Pin images to their registry digest: always, changed, never
        #[arg(long, value_enum, default_value_t = ResolveImage::Always)]
        resolve_image: ResolveImage,
        /// Send this node's registry login to the nodes that run the tasks
        #[arg(long)]
        with_registry_auth: bool,
        /// Return once the RPCs are done (--detach=false: wait until every service converged)
        #[arg(short, long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        detach: bool,
        /// With --detach=false: wait without drawing progress
        #[arg(short, long)]
        quiet: bool,
        stack: String,
    },
    /// List stacks
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List the tasks of a stack
    Ps {
        stack: String,
        /// Filter: desired-state=running|shutdown|accepted, node=ID|HOSTNAME, id=ID, name=NAME
        #[arg(short, long)]
        filter: Vec<String>,
        /// Do not truncate ids and errors
        #[arg(long)]
        no_trunc: bool,
        /// Only task ids
        #[arg(short, long)]
        quiet: bool,
        /// json: every task (that passes the filters) in full
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List the services of a stack
    Services {
        stack: String,
        /// Only service ids
        #[arg(short, long)]
        quiet: bool,
        /// json: each service in full, with its task counts
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove stacks: their services, then their networks
    #[command(aliases = ["remove", "down"])]
    Rm {
        #[arg(required = true)]
        stacks: Vec<String>,
    },
}

pub fn run(a: StackArgs) -> anyhow::Result<()> {
    block_on(run_async(a))
}

fn check_name(stack: &str) -> anyhow::Result<()> {
    let ok = stack
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && stack
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        bail!("invalid stack name {stack:?}: letters, digits, '_', '.', '-', starting with a letter or digit");
    }
    Ok(())
}

/// The stack's services and networks as computed from the files, before any RPC.
struct Plan {
    /// Full network name → its spec (`None`: external, must exist).
    networks: BTreeMap<String, Option<pb::NetworkSpec>>,
    services: Vec<pb::ServiceSpec>,
    /// Full secret and config names → (name, labels, data) to create (`None`: external).
    secrets: BTreeMap<String, Option<FileObj>>,
    configs: BTreeMap<String, Option<FileObj>>,
    registry: service::update::RegistryFlags,
}

/// A secret or config the deploy creates: its labels and data, read before any RPC.
struct FileObj {
    labels: HashMap<String, String>,
    data: Vec<u8>,
}

/// The stack's secrets or configs, named (`STACK_key`, `name:`, or an external one's name)
/// and read from their files.
fn file_objects(
    stack: &str,
    defs: &BTreeMap<String, compose::FileDef>,
    file: &str,
    what: &str,
) -> anyhow::Result<BTreeMap<String, (String, Option<FileObj>)>> {
    let mut out = BTreeMap::new();
    for (key, d) in defs {
        let name = match (&d.name, d.external) {
            (Some(n), _) => n.clone(),
            (None, true) => key.clone(),
            (None, false) => format!("{stack}_{key}"),
        };
        let obj = match &d.file {
            None => None,
            Some(path) => {
                let data = std::fs::read(path).map_err(|e| {
                    anyhow!(
                        "{file}:{}: {what}.{key}.file: {}: {e}",
                        d.line,
                        path.display()
                    )
                })?;
                let mut labels = output::parse_kv(&d.labels)?;
                labels.insert(NAMESPACE.into(), stack.into());
                Some(FileObj { labels, data })
            }
        };
        out.insert(key.clone(), (name, obj));
    }
    Ok(out)
}

fn plan(stack: &str, files: &[String], with_registry_auth: bool) -> anyhow::Result<Plan> {
    check_name(stack)?;
    let env = |k: &str| std::env::var(k).ok();
    let c = compose::load(files, &env)?;
    let full = |key: &str| -> String {
        match c.networks.get(key) {
            Some(d) if d.external => d.name.clone().unwrap_or_else(|| key.to_string()),
            Some(compose::NetworkDef { name: Some(n), .. }) => n.clone(),
            _ => format!("{stack}_{key}"),
        }
    };
    let mut networks = BTreeMap::new();
    let mut services = Vec::new();
    let secrets = file_objects(stack, &c.secrets, &c.file, "secrets")?;
    let configs = file_objects(stack, &c.configs, &c.file, "configs")?;
    for s in c.services {
        let mut a = s.args;
        // `--secret`/`--config` in their long form; the default target is the compose key's.
        for (refs, objs, flags, dir) in [
            (&s.secrets, &secrets, &mut a.secret, "/run/secrets/"),
            (&s.configs, &configs, &mut a.config, "/"),
        ] {
            for r in refs {
                let name = &objs[&r.key].0;
                let target = r
                    .target
                    .clone()
                    .unwrap_or_else(|| format!("{dir}{}", r.key));
                let mut f = format!("source={name},target={target}");
                for (k, v) in [("uid", &r.uid), ("gid", &r.gid), ("mode", &r.mode)] {
                    if let Some(v) = v {
                        f.push_str(&format!(",{k}={v}"));
                    }
                }
                flags.push(f);
            }
        }
        // `--mount` in its long form: a named volume by its full name (`STACK_key`, `name:`,
        // or an external one's), labelled with the stack.
        for r in &s.volumes {
            use shoal_runtime::volume::MountKind;
            let m = &r.mount;
            let mut fields = vec![(
                "type",
                m.kind.unwrap_or(MountKind::Volume).name().to_string(),
            )];
            if m.kind == Some(MountKind::Volume) && !m.source.is_empty() {
                let d = &c.volumes[&m.source];
                let name = match (&d.name, d.external) {
                    (Some(n), _) => n.clone(),
                    (None, true) => m.source.clone(),
                    (None, false) => format!("{stack}_{}", m.source),
                };
                fields.push(("source", name));
                if !d.external {
                    fields.push(("volume-label", format!("{NAMESPACE}={stack}")));
                    for l in &d.labels {
                        fields.push(("volume-label", l.clone()));
                    }
                }
            } else if !m.source.is_empty() {
                fields.push(("source", m.source.clone()));
            }
            fields.push(("target", m.target.clone()));
            if m.read_only {
                fields.push(("readonly", "true".into()));
            }
            if m.nocopy {
                fields.push(("volume-nocopy", "true".into()));
            }
            let csv: Vec<String> = fields
                .iter()
                .map(|(k, v)| {
                    let f = format!("{k}={v}");
                    if f.contains([',', '"']) {
                        format!("\"{}\"", f.replace('"', "\"\""))
                    } else {
                        f
                    }
                })
                .collect();
            a.mount.push(csv.join(","));
        }
        a.name = Some(format!("{stack}_{}", s.key));
        a.label.push(format!("{NAMESPACE}={stack}"));
        a.container_label.push(format!("{NAMESPACE}={stack}"));
        a.network.clear();
        for (key, aliases) in &s.networks {
            let name = full(key);
            let def = c.networks.get(key);
            let spec = match def {
                Some(d) if d.external => None,
                _ => {
                    let d = def.map(|d| (d.attachable, d.internal, &d.labels, &d.driver_opts));
                    let mut labels = output::parse_kv(d.map(|d| d.2.as_slice()).unwrap_or(&[]))?;
                    labels.insert(NAMESPACE.into(), stack.into());
                    Some(pb::NetworkSpec {
                        name: name.clone(),
                        driver: "overlay".into(),
                        attachable: d.is_some_and(|d| d.0),
                        internal: d.is_some_and(|d| d.1),
                        labels,
                        options: d
                            .map(|d| d.3.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default(),
                        ..Default::default()
                    })
                }
            };
            networks.insert(name.clone(), spec);
            a.network.push(if aliases.is_empty() {
                name
            } else {
                let mut v = format!("name={name}");
                for al in aliases {
                    v.push_str(&format!(",alias={al}"));
                }
                v
            });
        }
        let spec = service::build_spec(&a)
            .map_err(|e| anyhow!("{}:{}: services.{}: {e:#}", s.file, s.line, s.key))?;
        services.push(spec);
    }
    let by_name = |m: BTreeMap<String, (String, Option<FileObj>)>| {
        m.into_values()
            .collect::<BTreeMap<String, Option<FileObj>>>()
    };
    Ok(Plan {
        networks,
        services,
        secrets: by_name(secrets),
        configs: by_name(configs),
        registry: service::update::RegistryFlags {
            with_registry_auth,
            ..Default::default()
        },
    })
}

fn in_stack(labels: &HashMap<String, String>, stack: &str) -> bool {
    labels.get(NAMESPACE).map(String::as_str) == Some(stack)
}

async fn stack_services(
    c: &mut ControlClient<Channel>,
    stack: &str,
) -> anyhow::Result<Vec<pb::ServiceSummary>> {
    let list = output::all_services(
        c,
        pb::ListServicesRequest {
            name_prefix: format!("{stack}_"),
            ..Default::default()
        },
    )
    .await?;
    Ok(list
        .into_iter()
        .filter(|s| {
            s.service
                .as_ref()
                .and_then(|s| s.spec.as_ref())
                .is_some_and(|sp| in_stack(&sp.labels, stack))
        })
        .collect())
}

/// Makes `want` comparable with what the control API stored for `old` (network ids, the
/// digest the image was pinned to, ports the mesh allocated) and says whether they differ.
fn changed(
    old: &pb::ServiceSpec,
    want: &mut pb::ServiceSpec,
    net_ids: &HashMap<String, String>,
    keep_pin: bool,
) -> bool {
    if let Some(t) = want.task.as_mut() {
        for n in t.networks.iter_mut() {
            if let Some(id) = net_ids.get(n) {
                *n = id.clone();
            }
        }
        for al in t.network_aliases.iter_mut() {
            if let Some(id) = net_ids.get(&al.network) {
                al.network = id.clone();
            }
        }
        let old_image = old
            .task
            .as_ref()
            .and_then(|t| t.container.as_ref())
            .map(|c| c.image.clone())
            .unwrap_or_default();
        if let Some(c) = t.container.as_mut() {
            if keep_pin && old_image.starts_with(&format!("{}@", c.image)) {
                c.image = old_image;
            }
        }
    }
    for p in want.ports.iter_mut().filter(|p| p.published_port == 0) {
        if let Some(o) = old.ports.iter().find(|o| {
            o.target_port == p.target_port
                && o.protocol == p.protocol
                && o.publish_mode == p.publish_mode
        }) {
            p.published_port = o.published_port;
        }
    }
    old != want
}

async fn deploy(
    c: &mut ControlClient<Channel>,
    stack: &str,
    mut plan: Plan,
    prune: bool,
    resolve: ResolveImage,
    detach: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    for s in plan.services.iter_mut() {
        plan.registry.apply(s).await;
    }
    let names: std::collections::HashSet<String> =
        plan.services.iter().map(|s| s.name.clone()).collect();
    // Reads first: an external network that is missing stops the deploy before any write.
    let nets = output::all_networks(c, pb::ListNetworksRequest::default()).await?;
    let mut net_ids: HashMap<String, String> = HashMap::new();
    for n in &nets {
        if let (Some(m), Some(s)) = (&n.meta, &n.spec) {
            net_ids.insert(s.name.clone(), m.id.clone());
        }
    }
    for (name, spec) in &plan.networks {
        // `host` and `none` are no cluster networks but exist on every node (docker's too).
        let builtin = name == "host" || name == "none";
        if spec.is_none() && !builtin && !net_ids.contains_key(name) {
            bail!("network {name:?} is declared as external, but could not be found");
        }
    }
    let have_secrets: std::collections::HashSet<String> =
        output::all_secrets(c, pb::ListSecretsRequest::default())
            .await?
            .into_iter()
            .filter_map(|s| s.spec.map(|s| s.name))
            .collect();
    let have_configs: std::collections::HashSet<String> =
        output::all_configs(c, pb::ListConfigsRequest::default())
            .await?
            .into_iter()
            .filter_map(|s| s.spec.map(|s| s.name))
            .collect();
    for (what, objs, have) in [
        ("secret", &plan.secrets, &have_secrets),
        ("config", &plan.configs, &have_configs),
    ] {
        for (name, obj) in objs {
            if obj.is_none() && !have.contains(name) {
                bail!("{what} {name:?} is declared as external, but could not be found");
            }
        }
    }
    let existing: HashMap<String, pb::Service> = stack_services(c, stack)
        .await?
        .into_iter()
        .filter_map(|s| s.service)
        .map(|s| (s.spec.clone().unwrap_or_default().name, s))
        .collect();

    let mut done: Vec<String> = Vec::new();
    let failed = |done: &[String], what: String, e: anyhow::Error| -> anyhow::Error {
        if done.is_empty() {
            anyhow!("{what}: {e:#} (nothing was changed)")
        } else {
            anyhow!("{what}: {e:#} (done before it: {})", done.join(", "))
        }
    };
    for (name, spec) in &plan.networks {
        let Some(spec) = spec else { continue };
        if net_ids.contains_key(name) {
            continue;
        }
        println!("Creating network {name}");
        match c
            .create_network(pb::CreateNetworkRequest {
                spec: Some(spec.clone()),
            })
            .await
        {
            Ok(r) => {
                let n = r.into_inner().network.unwrap_or_default();
                net_ids.insert(name.clone(), n.meta.map(|m| m.id).unwrap_or_default());
                done.push(format!("created network {name}"));
            }
            Err(e) => {
                return Err(failed(
                    &done,
                    format!("creating network {name}"),
                    anyhow!(e.message().to_string()),
                ));
            }
        }
    }
    // Secrets and configs cannot change: one that exists is kept (a new value needs a new
    // name, as in docker).
    for (name, obj) in &plan.secrets {
        let Some(obj) = obj.as_ref().filter(|_| !have_secrets.contains(name)) else {
            continue;
        };
        println!("Creating secret {name}");
        let spec = pb::SecretSpec {
            name: name.clone(),
            labels: obj.labels.clone(),
            data: obj.data.clone(),
        };
        if let Err(e) = c
            .create_secret(pb::CreateSecretRequest { spec: Some(spec) })
            .await
        {
            let e = anyhow!(e.message().to_string());
            return Err(failed(&done, format!("creating secret {name}"), e));
        }
        done.push(format!("created secret {name}"));
    }
    for (name, obj) in &plan.configs {
        let Some(obj) = obj.as_ref().filter(|_| !have_configs.contains(name)) else {
            continue;
        };
        println!("Creating config {name}");
        let spec = pb::ConfigSpec {
            name: name.clone(),
            labels: obj.labels.clone(),
            data: obj.data.clone(),
        };
        if let Err(e) = c
            .create_config(pb::CreateConfigRequest { spec: Some(spec) })
            .await
        {
            let e = anyhow!(e.message().to_string());
            return Err(failed(&done, format!("creating config {name}"), e));
        }
        done.push(format!("created config {name}"));
    }
    let mut follow = Vec::new();
    for mut spec in plan.services {
        let name = spec.name.clone();
        match existing.get(&name) {
            Some(old) => {
                let old_spec = old.spec.clone().unwrap_or_default();
                let keep_pin = resolve != ResolveImage::Always;
                if !changed(&old_spec, &mut spec, &net_ids, keep_pin)
                    && resolve != ResolveImage::Always
                {
                    continue;
                }
                let id = old.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                println!("Updating service {name} (id: {id})");
                let r = c
                    .update_service(pb::UpdateServiceRequest {
                        service: id.clone(),
                        version: old.meta.as_ref().map(|m| m.version).unwrap_or(0),
                        spec: Some(spec),
                        no_resolve_image: resolve == ResolveImage::Never,
                    })
                    .await;
                match r {
                    Ok(r) => service::update::warn(&r.into_inner().warnings),
                    Err(e) => {
                        return Err(failed(
                            &done,
                            format!("updating service {name}"),
                            anyhow!(e.message().to_string()),
                        ));
                    }
                }
                done.push(format!("updated service {name}"));
                follow.push(id);
            }
            None => {
                println!("Creating service {name}");
                match c
                    .create_service(pb::CreateServiceRequest {
                        spec: Some(spec),
                        no_resolve_image: resolve == ResolveImage::Never,
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        service::update::warn(&r.warnings);
                        follow.push(
                            r.service
                                .and_then(|s| s.meta)
                                .map(|m| m.id)
                                .unwrap_or_default(),
                        );
                        done.push(format!("created service {name}"));
                    }
                    Err(e) => {
                        return Err(failed(
                            &done,
                            format!("creating service {name}"),
                            anyhow!(e.message().to_string()),
                        ));
                    }
                }
            }
        }
    }
    if prune {
        let mut gone: Vec<&String> = existing.keys().filter(|n| !names.contains(*n)).collect();
        gone.sort();
        for name in gone {
            println!("Removing service {name}");
            if let Err(e) = c
                .remove_service(pb::RemoveServiceRequest {
                    service: name.clone(),
                })
                .await
            {
                return Err(failed(
                    &done,
                    format!("removing service {name}"),
                    anyhow!(e.message().to_string()),
                ));
            }
            done.push(format!("removed service {name}"));
        }
    }
    if !detach {
        for id in follow {
            progress::wait_converged(c, &id, quiet).await?;
        }
    }
    Ok(())
}

/// Removes one stack: its services, then its networks (a network is refused while a service
/// uses it, so the services go first). Says what it removed.
async fn remove(c: &mut ControlClient<Channel>, stack: &str) -> anyhow::Result<bool> {
    let services = stack_services(c, stack).await?;
    let nets: Vec<pb::Network> = output::all_networks(c, pb::ListNetworksRequest::default())
        .await?
        .into_iter()
        .filter(|n| n.spec.as_ref().is_some_and(|s| in_stack(&s.labels, stack)))
        .collect();
    let secrets: Vec<String> = output::all_secrets(c, pb::ListSecretsRequest::default())
        .await?
        .into_iter()
        .filter_map(|s| s.spec)
        .filter(|s| in_stack(&s.labels, stack))
        .map(|s| s.name)
        .collect();
    let configs: Vec<String> = output::all_configs(c, pb::ListConfigsRequest::default())
        .await?
        .into_iter()
        .filter_map(|s| s.spec)
        .filter(|s| in_stack(&s.labels, stack))
        .map(|s| s.name)
        .collect();
    if services.is_empty() && nets.is_empty() && secrets.is_empty() && configs.is_empty() {
        return Ok(false);
    }
    let mut errors = Vec::new();
    for s in &services {
        let sp = s.service.as_ref().and_then(|s| s.spec.as_ref());
        let name = sp.map(|s| s.name.clone()).unwrap_or_default();
        println!("Removing service {name}");
        if let Err(e) = c
            .remove_service(pb::RemoveServiceRequest {
                service: name.clone(),
            })
            .await
        {
            errors.push(format!("service {name}: {}", e.message()));
        }
    }
    for name in &secrets {
        println!("Removing secret {name}");
        let req = pb::RemoveSecretRequest {
            secret: name.clone(),
        };
        if let Err(e) = c.remove_secret(req).await {
            errors.push(format!("secret {name}: {}", e.message()));
        }
    }
    for name in &configs {
        println!("Removing config {name}");
        let req = pb::RemoveConfigRequest {
            config: name.clone(),
        };
        if let Err(e) = c.remove_config(req).await {
            errors.push(format!("config {name}: {}", e.message()));
        }
    }
    for n in &nets {
        let name = n.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        println!("Removing network {name}");
        if let Err(e) = c
            .remove_network(pb::RemoveNetworkRequest {
                network: n.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
            })
            .await
        {
            errors.push(format!("network {name}: {}", e.message()));
        }
    }
    if !errors.is_empty() {
        bail!("stack {stack}: could not remove {}", errors.join("; "));
    }
    Ok(true)
}

async fn run_async(a: StackArgs) -> anyhow::Result<()> {
    // The files are read and every spec built before the daemon is asked anything.
    let planned = match &a.command {
        StackCommand::Deploy {
            compose_file,
            stack,
            with_registry_auth,
            ..
        } => Some(plan(stack, compose_file, *with_registry_auth)?),
        _ => None,
    };
    let ps_filter = match &a.command {
        StackCommand::Ps { filter, .. } => service::parse_ps_filters(filter)?,
        _ => PsFilter::default(),
    };
    let mut c = ControlClient::new(a.socket.channel().await?);
    match a.command {
        StackCommand::Deploy {
            stack,
            prune,
            resolve_image,
            detach,
            quiet,
            ..
        } => {
            let plan = planned.expect("planned above");
            deploy(&mut c, &stack, plan, prune, resolve_image, detach, quiet).await?;
        }
        StackCommand::Ls { format } => {
            let list = output::all_services(&c, pb::ListServicesRequest::default()).await?;
            let mut stacks: BTreeMap<String, usize> = BTreeMap::new();
            for s in &list {
                if let Some(ns) = s
                    .service
                    .as_ref()
                    .and_then(|s| s.spec.as_ref())
                    .and_then(|sp| sp.labels.get(NAMESPACE))
                {
                    *stacks.entry(ns.clone()).or_default() += 1;
                }
            }
            if format == Format::Json {
                let v: Vec<serde_json::Value> = stacks
                    .iter()
                    .map(|(name, n)| serde_json::json!({"Name": name, "Services": n}))
                    .collect();
                return output::print_json(&serde_json::Value::Array(v));
            }
            let mut t = Table::new(&["NAME", "SERVICES"]);
            for (name, n) in stacks {
                t.row(vec![name, n.to_string()]);
            }
            t.print();
        }
        StackCommand::Services {
            stack,
            quiet,
            format,
        } => {
            let list = stack_services(&mut c, &stack).await?;
            if list.is_empty() {
                bail!("nothing found in stack: {stack}");
            }
            if quiet {
                for s in &list {
                    let id = s.service.as_ref().and_then(|s| s.meta.as_ref());
                    println!("{}", id.map(|m| m.id.as_str()).unwrap_or_default());
                }
            } else if format == Format::Json {
                service::print_services_json(&list)?;
            } else {
                service::print_services(&list);
            }
        }
        StackCommand::Ps {
            stack,
            no_trunc,
            quiet,
            format,
            ..
        } => {
            let names: Vec<String> = stack_services(&mut c, &stack)
                .await?
                .into_iter()
                .filter_map(|s| s.service.and_then(|s| s.spec).map(|s| s.name))
                .collect();
            if names.is_empty() {
                bail!("nothing found in stack: {stack}");
            }
            let out = service::PsOutput::of(quiet, format, no_trunc);
            service::ps(&mut c, &names, ps_filter, out).await?;
        }
        StackCommand::Rm { stacks } => {
            let mut missing = Vec::new();
            for s in &stacks {
                if !remove(&mut c, s).await? {
                    missing.push(s.clone());
                }
            }
            if !missing.is_empty() {
                bail!("nothing found in stack: {}", missing.join(", "));
            }
        }
    }
    Ok(())
}
