//! `shoal cluster …`: init (and --force-new-cluster), join, join-token, leave, inspect,
//! update, backup, restore.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_client::DaemonClient;

use super::output::{self, block_on, parse_duration_ms, print_json, rpc, Format, SocketArg};

#[derive(Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenRole {
    Worker,
    Manager,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Make this node the first manager of a new cluster
    Init {
        /// Address other nodes reach this one on (host[:port])
        #[arg(long)]
        advertise_addr: Option<String>,
        /// VXLAN id of the ingress network; cluster networks get the ones above it (default
        /// 4096). Clusters whose agents share a network namespace need ranges of their own
        #[arg(long)]
        vni_start: Option<u32>,
        /// On a manager of a cluster that lost its quorum for good: rebuild a one-manager
        /// cluster from this manager's state (same cluster, objects and CA); the other
        /// managers leave the raft group
        #[arg(long, conflicts_with = "vni_start")]
        force_new_cluster: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Write a backup of the cluster (the store as this manager applied it, the CA, the
    /// secrets key) to FILE
    Backup {
        /// Where to write it (replaced whole, never half-written)
        file: PathBuf,
    },
    /// Start a one-manager cluster on this node (in no cluster) from a backup FILE
    Restore {
        /// Address other nodes reach this one on (host[:port])
        #[arg(long)]
        advertise_addr: Option<String>,
        file: PathBuf,
    },
    /// Join a cluster as a worker or a manager (by the token)
    Join {
        /// Join token (`shoal cluster join-token worker|manager` on a manager)
        #[arg(long)]
        token: String,
        /// Address this node is reached on (host[:port])
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Any manager, host[:port]
        manager_addr: String,
    },
    /// Show (or rotate) the command that joins a node
    JoinToken {
        #[arg(value_enum)]
        role: TokenRole,
        /// Replace the token; the old one stops working
        #[arg(long)]
        rotate: bool,
        /// Print the token only
        #[arg(short, long)]
        quiet: bool,
    },
    /// Leave the cluster (a manager needs --force)
    Leave {
        #[arg(short, long)]
        force: bool,
    },
    /// Show the cluster's settings and Raft state
    Inspect {
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Change the cluster's timers
    Update(UpdateArgs),
}

#[derive(Args)]
struct UpdateArgs {
    /// Raft heartbeat interval (default 50ms)
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// Raft election timeout, lower bound (default 200ms)
    #[arg(long)]
    election_timeout_min: Option<String>,
    /// Raft election timeout, upper bound and leader lease (default 400ms)
    #[arg(long)]
    election_timeout_max: Option<String>,
    /// Raft log entries between snapshots
    #[arg(long)]
    snapshot_interval: Option<u64>,
    /// Raft log entries kept behind a snapshot
    #[arg(long)]
    keep_old_entries: Option<u64>,
    /// Dispatcher heartbeat period (e.g. 1s)
    #[arg(long)]
    dispatcher_heartbeat: Option<String>,
    /// Missed heartbeats before a node is marked down
    #[arg(long)]
    missed_heartbeats: Option<u32>,
    /// Status-update batching window (e.g. 10ms)
    #[arg(long)]
    status_batch_window: Option<String>,
    /// Status updates per batch at most
    #[arg(long)]
    status_batch_max: Option<u32>,
    /// Node certificate lifetime (e.g. 90d)
    #[arg(long)]
    cert_expiry: Option<String>,
    /// Finished tasks kept per slot
    #[arg(long)]
    task_history_limit: Option<u32>,
}

pub fn run(a: ClusterArgs) -> anyhow::Result<()> {
    block_on(run_async(a))
}

async fn run_async(a: ClusterArgs) -> anyhow::Result<()> {
    // Read and checked before the daemon is asked anything: a bad file changes nothing.
    let restoring = match &a.command {
        ClusterCommand::Restore { file, .. } => Some(read_backup(file)?),
        _ => None,
    };
    let ch = a.socket.channel().await?;
    let mut local = DaemonClient::new(ch.clone());
    let mut control = ControlClient::new(ch);
    match a.command {
        ClusterCommand::Init {
            advertise_addr,
            vni_start,
            force_new_cluster,
            format,
        } => {
            if vni_start == Some(0) {
                anyhow::bail!("invalid --vni-start 0: VXLAN ids start at 1");
            }
            let r = rpc(local
                .init(pb::InitRequest {
                    advertise_addr: advertise_addr.unwrap_or_default(),
                    cluster_name: String::new(),
                    vni_start: vni_start.unwrap_or(0),
                    force_new_cluster,
                })
                .await)?;
            if format == Format::Json {
                let mut v = json!({"NodeID": r.node_id, "ClusterID": r.cluster_id, "AdvertiseAddr": r.advertise_addr,
                    "JoinTokens": {"Worker": r.worker_token, "Manager": r.manager_token}});
                if force_new_cluster {
                    v["RaftIndex"] = json!(r.raft_index);
                    v["RemovedManagers"] = json!(r.removed_managers);
                }
                return print_json(&v);
            }
            if force_new_cluster {
                println!(
                    "Cluster {} rebuilt from this manager's state at raft index {}: current node ({}) is its only manager.",
                    r.cluster_id, r.raft_index, r.node_id
                );
                if !r.removed_managers.is_empty() {
                    println!(
                        "Managers no longer in the raft group, now workers marked down: {}.",
                        r.removed_managers.join(", ")
                    );
                }
                println!();
            } else {
                println!(
                    "Cluster initialized: current node ({}) is now a manager.\n",
                    r.node_id
                );
            }
            print_join_command("worker", &r.worker_token, &r.advertise_addr);
            println!(
                "To add a manager to this cluster, run 'shoal cluster join-token manager' and follow the instructions.\n"
            );
        }
        ClusterCommand::Join {
            token,
            advertise_addr,
            manager_addr,
        } => {
            let r = rpc(local
                .join(pb::JoinRequest {
                    token,
                    manager_addr,
                    advertise_addr: advertise_addr.unwrap_or_default(),
                })
                .await)?;
            println!(
                "This node joined a cluster as a {}.",
                output::role_name(r.role)
            );
        }
        ClusterCommand::JoinToken {
            role,
            rotate,
            quiet,
        } => {
            let prole = match role {
                TokenRole::Worker => pb::NodeRole::Worker,
                TokenRole::Manager => pb::NodeRole::Manager,
            };
            let cluster = if rotate {
                rpc(control
                    .rotate_join_token(pb::RotateJoinTokenRequest { role: prole as i32 })
                    .await)?
            } else {
                rpc(control.get_cluster(pb::GetClusterRequest {}).await)?
            };
            let tokens = cluster
                .cluster
                .and_then(|c| c.join_tokens)
                .ok_or_else(|| anyhow!("the cluster has no join tokens"))?;
            let (name, token) = match role {
                TokenRole::Worker => ("worker", tokens.worker),
                TokenRole::Manager => ("manager", tokens.manager),
            };
            if quiet {
                println!("{token}");
                return Ok(());
            }
            if rotate {
                println!("Successfully rotated {name} join token.\n");
            }
            let info = rpc(local.info(pb::InfoRequest {}).await)?;
            print_join_command(name, &token, &info.advertise_addr);
        }
        ClusterCommand::Leave { force } => {
            rpc(local.leave(pb::LeaveRequest { force }).await)?;
            println!("Node left the cluster.");
        }
        ClusterCommand::Inspect { format } => {
            let c = rpc(control.get_cluster(pb::GetClusterRequest {}).await)?;
            let v = output::cluster_json(&c);
            match format {
                Format::Json => print_json(&json!([v]))?,
                Format::Table => {
                    let spec = &v["Spec"];
                    let mut t = output::Table::new(&["SETTING", "VALUE"]);
                    t.row(vec!["ID".into(), v["ID"].as_str().unwrap_or("").into()]);
                    t.row(vec![
                        "Name".into(),
                        spec["Name"].as_str().unwrap_or("").into(),
                    ]);
                    for (group, obj) in [
                        ("Raft", &spec["Raft"]),
                        ("Dispatcher", &spec["Dispatcher"]),
                        ("CA", &spec["CAConfig"]),
                        ("Orchestration", &spec["Orchestration"]),
                        ("Network", &spec["Network"]),
                    ] {
                        if let Some(m) = obj.as_object() {
                            for (k, val) in m {
                                let s = val
                                    .as_str()
                                    .map(String::from)
                                    .unwrap_or_else(|| val.to_string());
                                t.row(vec![format!("{group}.{k}"), s]);
                            }
                        }
                    }
                    t.row(vec!["Leader".into(), c.leader_node_id.clone()]);
                    t.row(vec!["Raft term".into(), c.raft_term.to_string()]);
                    t.print();
                }
            }
        }
        ClusterCommand::Backup { file } => backup(&mut local, &file).await?,
        ClusterCommand::Restore {
            advertise_addr,
            file,
        } => {
            let bytes = restoring.unwrap_or_default();
            let addr = advertise_addr.unwrap_or_default();
            let chunks: Vec<pb::RestoreChunk> = bytes
                .chunks(shoal_manager::daemon::BACKUP_CHUNK_BYTES)
                .enumerate()
                .map(|(i, c)| pb::RestoreChunk {
                    data: c.to_vec(),
                    advertise_addr: if i == 0 { addr.clone() } else { String::new() },
                })
                .collect();
            drop(bytes);
            let r = rpc(local
                .restore(tonic::codegen::tokio_stream::iter(chunks))
                .await)?;
            println!(
                "Cluster {} restored from {} (raft index {}): current node ({}) is its only manager; {} services, {} other nodes marked down until they connect again.\n",
                r.cluster_id,
                file.display(),
                r.raft_index,
                r.node_id,
                r.services,
                r.nodes_down
            );
            print_join_command("worker", &r.worker_token, &r.advertise_addr);
        }
        ClusterCommand::Update(u) => {
            let c = rpc(control.get_cluster(pb::GetClusterRequest {}).await)?;
            let cluster = c
                .cluster
                .ok_or_else(|| anyhow!("the cluster is not initialised"))?;
            let version = cluster.meta.as_ref().map(|m| m.version).unwrap_or(0);
            let mut spec = cluster.spec.unwrap_or_default();
            let raft = spec.raft.get_or_insert_with(Default::default);
            let restart_needed =
                u.election_timeout_min.is_some() || u.election_timeout_max.is_some();
            if let Some(d) = &u.heartbeat_interval {
                raft.heartbeat_interval_ms = parse_duration_ms(d)?;
            }
            if let Some(d) = &u.election_timeout_min {
                raft.election_timeout_min_ms = parse_duration_ms(d)?;
            }
            if let Some(d) = &u.election_timeout_max {
                raft.election_timeout_max_ms = parse_duration_ms(d)?;
            }
            if let Some(n) = u.snapshot_interval {
                raft.snapshot_interval = n;
            }
            if let Some(n) = u.keep_old_entries {
                raft.keep_old_entries = n;
            }
            let d = spec.dispatcher.get_or_insert_with(Default::default);
            if let Some(x) = &u.dispatcher_heartbeat {
                d.heartbeat_period_ms = parse_duration_ms(x)?;
            }
            if let Some(n) = u.missed_heartbeats {
                d.missed_heartbeats_down = n;
            }
            if let Some(x) = &u.status_batch_window {
                d.status_batch_ms = parse_duration_ms(x)?;
            }
            if let Some(n) = u.status_batch_max {
                d.status_batch_max = n;
            }
            if let Some(x) = &u.cert_expiry {
                spec.ca
                    .get_or_insert_with(Default::default)
                    .node_cert_lifetime_ms = parse_duration_ms(x)?;
            }
            if let Some(n) = u.task_history_limit {
                spec.orchestration
                    .get_or_insert_with(Default::default)
                    .task_history_per_slot = n;
            }
            rpc(control
                .update_cluster(pb::UpdateClusterRequest {
                    version,
                    spec: Some(spec),
                })
                .await)?;
            println!("Cluster updated.");
            if restart_needed {
                // The elections follow at once; these two live in openraft's own config.
                println!(
                    "Elections follow the new timeouts at once; the vote lease and the append deadline follow at each manager's next restart."
                );
            }
        }
    }
    Ok(())
}

/// Reads a backup file and checks it whole (`backup::decode`): one line naming the file and
/// what is wrong with it.
fn read_backup(file: &Path) -> anyhow::Result<Vec<u8>> {
    let max = shoal_manager::backup::MAX_BACKUP_BYTES;
    let meta = std::fs::metadata(file).with_context(|| format!("{}", file.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{}: not a file", file.display());
    }
    if meta.len() > max {
        anyhow::bail!(
            "{}: {}",
            file.display(),
            shoal_manager::backup::BackupError::TooLarge(meta.len())
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    shoal_manager::backup::decode(&bytes).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    Ok(bytes)
}

/// `cluster backup FILE`: the daemon's backup, checked, written to a temporary file beside
/// FILE (0600), synced, renamed over FILE, the directory synced: FILE is the old one or the
/// whole new one, never half of it.
async fn backup(
    local: &mut DaemonClient<tonic::transport::Channel>,
    file: &Path,
) -> anyhow::Result<()> {
    let max = shoal_manager::backup::MAX_BACKUP_BYTES;
    let mut stream = rpc(local.backup(pb::BackupRequest {}).await)?;
    let mut info = None;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
    {
        if info.is_none() {
            info = chunk.info;
        }
        if (bytes.len() + chunk.data.len()) as u64 > max {
            anyhow::bail!("the daemon's backup exceeds {max} bytes");
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let info = info.ok_or_else(|| anyhow!("the daemon sent no backup"))?;
    if bytes.len() as u64 != info.bytes {
        anyhow::bail!(
            "the backup ended after {} of its {} bytes",
            bytes.len(),
            info.bytes
        );
    }
    shoal_manager::backup::decode(&bytes).map_err(|e| anyhow!("the daemon's backup: {e}"))?;
    write_whole(file, &bytes)?;
    println!(
        "Backup of cluster {} written to {} ({} bytes): raft index {} (term {}) as applied on manager {} ({}); {} services, {} nodes, {} tasks, {} networks, {} secrets, {} configs.",
        info.cluster_id,
        file.display(),
        info.bytes,
        info.raft_index,
        info.raft_term,
        info.node_id,
        if info.leader { "the leader" } else { "a follower" },
        info.services,
        info.nodes,
        info.tasks,
        info.networks,
        info.secrets,
        info.configs
    );
    if !info.encrypted {
        println!("It holds the cluster's CA key and secrets key unencrypted (shoal has no autolock): it is readable by root only; keep it so.");
    }
    if !info.caught_up {
        eprintln!(
            "shoal: warning: no leader confirmed what this manager had to apply: the backup is this manager's own state at raft index {}",
            info.raft_index
        );
    }
    Ok(())
}

/// Replaces `path` with `bytes` (mode 0600) through a temporary file in its directory.
fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("writing {}: {e}", path.display())
    })
}

fn print_join_command(role: &str, token: &str, addr: &str) {
    if addr.is_empty() {
        println!("To add a {role} to this cluster, run the following command:\n\n    shoal cluster join --token {token} <MANAGER-ADDR>\n");
    } else {
        println!("To add a {role} to this cluster, run the following command:\n\n    shoal cluster join --token {token} {addr}\n");
    }
}
