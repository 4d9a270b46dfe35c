//! `shoal node …`: ls, ps, inspect, update, promote, demote, rm.

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_client::DaemonClient;

use super::output::{self, block_on, print_json, rpc, Format, SocketArg, Table};

#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Availability {
    Active,
    Pause,
    Drain,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the cluster's nodes
    #[command(alias = "list")]
    Ls {
        /// Only node ids
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List the tasks on nodes (default: this node)
    Ps {
        /// Nodes by id, id prefix or hostname ("self" = this node)
        #[arg(default_value = "self")]
        nodes: Vec<String>,
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
    /// Show nodes in full ("self" = this node)
    Inspect {
        #[arg(required = true)]
        nodes: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Change a node's availability or labels
    Update {
        #[arg(long, value_enum)]
        availability: Option<Availability>,
        /// Add or replace a label (KEY=VALUE)
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a label (KEY)
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        node: String,
    },
    /// Make workers managers
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers (refused if the managers left would lose quorum)
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the cluster
    #[command(alias = "remove")]
    Rm {
        /// Remove a node that is not down
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

pub fn run(a: NodeArgs) -> anyhow::Result<()> {
    block_on(run_async(a))
}

async fn run_async(a: NodeArgs) -> anyhow::Result<()> {
    // Flags are checked before the daemon is asked anything.
    let ps_filter = match &a.command {
        NodeCommand::Ps { filter, .. } => super::service::parse_ps_filters(filter)?,
        _ => Default::default(),
    };
    let ch = a.socket.channel().await?;
    let mut c = ControlClient::new(ch.clone());
    match a.command {
        NodeCommand::Ps {
            nodes,
            no_trunc,
            quiet,
            format,
            ..
        } => {
            let out = super::service::PsOutput::of(quiet, format, no_trunc);
            super::service::node_ps(&mut c, &nodes, ps_filter, out).await?;
        }
        NodeCommand::Ls { quiet, format } => {
            let me = rpc(DaemonClient::new(ch).info(pb::InfoRequest {}).await)?.node_id;
            let mut json = output::JsonArray::start();
            let mut t = Table::new(&["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"]);
            crate::each_page!(
                c,
                list_nodes,
                pb::ListNodesRequest::default(),
                |page: Vec<pb::Node>| {
                    for n in &page {
                        if quiet {
                            println!("{}", id(n));
                        } else if format == Format::Json {
                            json.item(&output::node_json(n))?;
                        } else {
                            node_row(&mut t, n, &me);
                        }
                    }
                    anyhow::Ok(())
                }
            )
            .await?;
            match (quiet, format) {
                (true, _) => {}
                (false, Format::Json) => json.end()?,
                (false, Format::Table) => t.print(),
            }
        }
        NodeCommand::Inspect { nodes, format } => {
            let mut out = Vec::new();
            for n in nodes {
                let node = rpc(c.get_node(pb::GetNodeRequest { node: n }).await)?
                    .node
                    .unwrap_or_default();
                out.push(node);
            }
            match format {
                Format::Json => {
                    print_json(&Value::Array(out.iter().map(output::node_json).collect()))?
                }
                Format::Table => {
                    for n in &out {
                        let v = output::node_json(n);
                        println!("ID:\t\t\t{}", id(n));
                        println!(
                            "Hostname:\t\t{}",
                            v["Description"]["Hostname"].as_str().unwrap_or("")
                        );
                        println!("Role:\t\t\t{}", v["Role"].as_str().unwrap_or(""));
                        println!(
                            "Status:\t\t\t{}",
                            output::state_name(n.status.as_ref().map(|s| s.state).unwrap_or(0))
                        );
                        println!(
                            "Availability:\t\t{}",
                            output::availability_name(
                                n.spec.as_ref().map(|s| s.availability).unwrap_or(0)
                            )
                        );
                        println!("Address:\t\t{}", v["Status"]["Addr"].as_str().unwrap_or(""));
                        if let Some(ms) = &n.manager_status {
                            println!("Manager Status:\t\t{}", output::manager_status_name(n));
                            println!("Manager Address:\t{}", ms.addr);
                        }
                        for (k, val) in n
                            .spec
                            .as_ref()
                            .map(|s| s.labels.clone())
                            .unwrap_or_default()
                        {
                            println!("Label:\t\t\t{k}={val}");
                        }
                    }
                }
            }
        }
        NodeCommand::Update {
            availability,
            label_add,
            label_rm,
            node,
        } => {
            if availability.is_none() && label_add.is_empty() && label_rm.is_empty() {
                bail!("nothing to update: pass --availability, --label-add or --label-rm");
            }
            let availability = availability.map(|a| match a {
                Availability::Active => pb::NodeAvailability::Active as i32,
                Availability::Pause => pb::NodeAvailability::Pause as i32,
                Availability::Drain => pb::NodeAvailability::Drain as i32,
            });
            let label_add = output::parse_kv(&label_add)?;
            let n = rpc(c
                .update_node(pb::UpdateNodeRequest {
                    node,
                    version: 0,
                    availability,
                    label_add,
                    label_rm,
                })
                .await)?;
            println!("{}", n.node.as_ref().map(id).unwrap_or_default());
        }
        NodeCommand::Promote { nodes } => {
            for n in nodes {
                let before = rpc(c.get_node(pb::GetNodeRequest { node: n.clone() }).await)?
                    .node
                    .unwrap_or_default();
                if before.role == pb::NodeRole::Manager as i32 {
                    println!("Node {n} is already a manager.");
                    continue;
                }
                rpc(c
                    .promote_node(pb::PromoteNodeRequest { node: n.clone() })
                    .await)?;
                println!("Node {n} promoted to a manager in the cluster.");
            }
        }
        NodeCommand::Demote { nodes } => {
            for n in nodes {
                let before = rpc(c.get_node(pb::GetNodeRequest { node: n.clone() }).await)?
                    .node
                    .unwrap_or_default();
                if before.role != pb::NodeRole::Manager as i32 {
                    println!("Node {n} is already a worker.");
                    continue;
                }
                rpc(c
                    .demote_node(pb::DemoteNodeRequest { node: n.clone() })
                    .await)?;
                println!("Manager {n} demoted in the cluster.");
            }
        }
        NodeCommand::Rm { force, nodes } => {
            for n in nodes {
                let r = rpc(c
                    .remove_node(pb::RemoveNodeRequest { node: n, force })
                    .await)?;
                println!("{}", r.id);
            }
        }
    }
    Ok(())
}

fn id(n: &pb::Node) -> String {
    n.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default()
}

/// A row of the `node ls` table; `me` is the node the CLI talks to (marked `*`).
fn node_row(t: &mut Table, n: &pb::Node, me: &str) {
    let mark = if id(n) == me { " *" } else { "" };
    t.row(vec![
        format!("{}{mark}", id(n)),
        n.description
            .as_ref()
            .map(|d| {
                // A hollow node runs no containers (scale tests): say so.
                if d.hollow {
                    format!("{} (hollow)", d.hostname)
                } else {
                    d.hostname.clone()
                }
            })
            .unwrap_or_default(),
        output::state_name(n.status.as_ref().map(|s| s.state).unwrap_or(0)).into(),
        output::availability_name(n.spec.as_ref().map(|s| s.availability).unwrap_or(0)).into(),
        output::manager_status_name(n).into(),
    ]);
}
