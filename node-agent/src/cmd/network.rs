//! `shoal network …`: create, ls, inspect, rm, prune — the cluster's networks, as `docker
//! network` shows swarm-scoped ones (plus the node-local `bridge`, `host` and `none`).

use std::collections::HashMap;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;

use super::output::{self, block_on, print_json, rpc, Format, SocketArg, Table};

#[derive(Args)]
pub struct NetworkArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a cluster network
    Create {
        /// Driver: overlay (the only cluster driver)
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form (default: a free /24 from 10.0.0.0/8)
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address (default: the subnet's first host address)
        #[arg(long)]
        gateway: Option<String>,
        /// Let standalone containers (`shoal run --network NAME`) join it
        #[arg(long)]
        attachable: bool,
        /// No route out of the network
        #[arg(long)]
        internal: bool,
        /// A label (KEY=VALUE)
        #[arg(long)]
        label: Vec<String>,
        /// A driver option (KEY=VALUE)
        #[arg(short, long)]
        opt: Vec<String>,
        name: String,
    },
    /// List networks
    #[command(alias = "list")]
    Ls {
        /// Only network ids
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show networks in full
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Remove networks (refused while a service uses one)
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove every cluster network no service uses
    Prune {
        /// Do not ask (shoal never asks; accepted for docker's habit)
        #[arg(short, long)]
        force: bool,
    },
}

/// The node-local networks every node has (not store objects).
const PREDEFINED: [(&str, &str); 3] = [("bridge", "bridge"), ("host", "host"), ("none", "null")];

fn key_values(flag: &str, items: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for kv in items {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => bail!("invalid {flag} {kv:?}: want KEY=VALUE"),
        }
    }
    Ok(out)
}

fn id(n: &pb::Network) -> &str {
    n.meta.as_ref().map_or("", |m| m.id.as_str())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A network as `network inspect` shows it (docker's field names).
pub fn network_json(n: &pb::Network) -> Value {
    let spec = n.spec.clone().unwrap_or_default();
    let meta = n.meta.clone().unwrap_or_default();
    json!({
        "ID": meta.id,
        "Name": spec.name,
        "Version": {"Index": meta.version},
        "CreatedAtMs": meta.created_at_ms,
        "Scope": "swarm",
        "Driver": spec.driver,
        "IPAM": {"Config": [{"Subnet": n.subnet, "Gateway": n.gateway}]},
        "Attachable": spec.attachable,
        "Internal": spec.internal,
        "Labels": spec.labels,
        "Options": {"com.docker.network.driver.overlay.vxlanid_list": n.vni.to_string()},
    })
}

pub fn run(a: NetworkArgs) -> anyhow::Result<()> {
    block_on(run_async(a))
}

async fn run_async(a: NetworkArgs) -> anyhow::Result<()> {
    // Flags are checked before the daemon is asked anything.
    let create = match &a.command {
        NetworkCommand::Create {
            driver,
            subnet,
            gateway,
            attachable,
            internal,
            label,
            opt,
            name,
        } => Some(pb::NetworkSpec {
            name: name.clone(),
            driver: driver.clone(),
            subnet: subnet.clone().unwrap_or_default(),
            gateway: gateway.clone().unwrap_or_default(),
            attachable: *attachable,
            internal: *internal,
            labels: key_values("--label", label)?,
            options: key_values("--opt", opt)?,
        }),
        _ => None,
    };
    let mut c = ControlClient::new(a.socket.channel().await?);
    match a.command {
        NetworkCommand::Create { .. } => {
            let n = rpc(c
                .create_network(pb::CreateNetworkRequest { spec: create })
                .await)?
            .network
            .unwrap_or_default();
            println!("{}", id(&n));
        }
        NetworkCommand::Ls { quiet, format } => {
            let networks = output::all_networks(&c, pb::ListNetworksRequest::default()).await?;
            if quiet {
                for n in &networks {
                    println!("{}", short(id(n)));
                }
                return Ok(());
            }
            if format == Format::Json {
                let mut all: Vec<Value> = PREDEFINED
                    .iter()
                    .map(|(name, driver)| json!({"Name": name, "Driver": driver, "Scope": "local"}))
                    .collect();
                all.extend(networks.iter().map(network_json));
                return print_json(&Value::Array(all));
            }
            let mut t = Table::new(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"]);
            for (name, driver) in PREDEFINED {
                t.row(vec![
                    String::new(),
                    name.into(),
                    driver.into(),
                    "local".into(),
                ]);
            }
            for n in &networks {
                let spec = n.spec.clone().unwrap_or_default();
                t.row(vec![
                    short(id(n)).to_string(),
                    spec.name,
                    spec.driver,
                    "swarm".into(),
                ]);
            }
            t.print();
        }
        NetworkCommand::Inspect { networks, format } => {
            let mut out = Vec::new();
            for n in networks {
                out.push(
                    rpc(c.get_network(pb::GetNetworkRequest { network: n }).await)?
                        .network
                        .unwrap_or_default(),
                );
            }
            match format {
                Format::Json => print_json(&Value::Array(out.iter().map(network_json).collect()))?,
                Format::Table => {
                    for n in &out {
                        let spec = n.spec.clone().unwrap_or_default();
                        println!("ID:         {}", id(n));
                        println!("Name:       {}", spec.name);
                        println!("Driver:     {}", spec.driver);
                        println!("Subnet:     {}", n.subnet);
                        println!("Gateway:    {}", n.gateway);
                        println!("VXLAN ID:   {}", n.vni);
                        println!("Attachable: {}", spec.attachable);
                        println!("Internal:   {}", spec.internal);
                    }
                }
            }
        }
        NetworkCommand::Rm { networks } => {
            let mut failed = 0;
            for n in &networks {
                match c
                    .remove_network(pb::RemoveNetworkRequest { network: n.clone() })
                    .await
                {
                    Ok(_) => println!("{n}"),
                    Err(e) if networks.len() == 1 => bail!("{}", e.message()),
                    Err(e) => {
                        eprintln!("shoal: {n}: {}", e.message());
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} networks not removed", networks.len());
            }
        }
        NetworkCommand::Prune { .. } => {
            let networks = output::all_networks(&c, pb::ListNetworksRequest::default()).await?;
            for n in &networks {
                let req = pb::RemoveNetworkRequest {
                    network: id(n).to_string(),
                };
                // In use: kept, as docker keeps it.
                if c.remove_network(req).await.is_ok() {
                    println!("{}", n.spec.as_ref().map_or("", |s| s.name.as_str()));
                }
            }
        }
    }
    Ok(())
}
