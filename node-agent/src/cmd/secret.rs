//! `shoal secret …` and `shoal config …`: create, ls, inspect, rm — as docker's. A secret's
//! data goes in at create and never comes back out; `config inspect --pretty` shows a
//! config's data, as docker's does.

use std::io::Read;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;

use super::output::{self, block_on, parse_kv, print_json, rpc, short, Format, SocketArg, Table};
use super::service::{human_duration, now_ms};

/// Largest secret or config (swarm's limit), checked here too so a large file is not sent.
const MAX_DATA_BYTES: usize = shoal_manager::secrets::MAX_DATA_BYTES;

#[derive(Args)]
pub struct SecretArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: FileCommand,
}

#[derive(Subcommand)]
enum FileCommand {
    /// Create one from a file, or from stdin with `-`
    Create {
        /// A label (KEY=VALUE)
        #[arg(short, long)]
        label: Vec<String>,
        name: String,
        /// The file holding the data, or `-` for stdin
        file: String,
    },
    /// List them
    #[command(alias = "list")]
    Ls {
        /// Only ids
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show them in full (a secret's data never)
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        /// Human-readable (a config's data included)
        #[arg(long)]
        pretty: bool,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Remove them (refused while a service uses one)
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Which of the two the command is about.
#[derive(Clone, Copy, PartialEq, Eq)]
enum What {
    Secret,
    Config,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::Secret => "secret",
            What::Config => "config",
        }
    }
}

/// A secret or config as the CLI shows it.
struct Item {
    meta: pb::Meta,
    name: String,
    labels: std::collections::HashMap<String, String>,
    data: Vec<u8>,
}

impl Item {
    fn json(&self, what: What) -> Value {
        let mut spec = json!({"Name": self.name, "Labels": self.labels});
        if what == What::Config {
            use base64::Engine;
            spec["Data"] = json!(base64::engine::general_purpose::STANDARD.encode(&self.data));
        }
        json!({
            "ID": self.meta.id,
            "Version": {"Index": self.meta.version},
            "CreatedAtMs": self.meta.created_at_ms,
            "UpdatedAtMs": self.meta.updated_at_ms,
            "Spec": spec,
        })
    }
}

fn of_secret(s: pb::Secret) -> Item {
    let spec = s.spec.unwrap_or_default();
    Item {
        meta: s.meta.unwrap_or_default(),
        name: spec.name,
        labels: spec.labels,
        // Never sent by the control API; cleared again so nothing could ever print it.
        data: Vec::new(),
    }
}

fn of_config(c: pb::Config) -> Item {
    let spec = c.spec.unwrap_or_default();
    Item {
        meta: c.meta.unwrap_or_default(),
        name: spec.name,
        labels: spec.labels,
        data: spec.data,
    }
}

/// `shoal secret …`.
pub fn run_secret(a: SecretArgs) -> anyhow::Result<()> {
    block_on(run_async(What::Secret, a))
}

/// `shoal config …`.
pub fn run_config(a: SecretArgs) -> anyhow::Result<()> {
    block_on(run_async(What::Config, a))
}

/// The data of `file` (`-`: stdin), refused beyond the size limit without reading it all.
fn read_data(what: What, name: &str, file: &str) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    let limit = MAX_DATA_BYTES as u64 + 1;
    if file == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut data)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(limit).read_to_end(&mut data))
            .with_context(|| format!("reading {file}"))?;
    }
    if data.len() > MAX_DATA_BYTES {
        bail!(
            "{} {name} is over {MAX_DATA_BYTES} bytes: at most 500 KiB are allowed",
            what.name()
        );
    }
    Ok(data)
}

async fn get(c: &mut ControlClient<Channel>, what: What, key: String) -> anyhow::Result<Item> {
    Ok(match what {
        What::Secret => of_secret(
            rpc(c.get_secret(pb::GetSecretRequest { secret: key }).await)?
                .secret
                .unwrap_or_default(),
        ),
        What::Config => of_config(
            rpc(c.get_config(pb::GetConfigRequest { config: key }).await)?
                .config
                .unwrap_or_default(),
        ),
    })
}

async fn run_async(what: What, a: SecretArgs) -> anyhow::Result<()> {
    // Flags and the file are checked before the daemon is asked anything.
    let create = match &a.command {
        FileCommand::Create { label, name, file } => {
            shoal_manager::secrets::check_name(what.name(), name).map_err(anyhow::Error::msg)?;
            let labels = parse_kv(label).context("--label")?;
            Some((name.clone(), labels, read_data(what, name, file)?))
        }
        _ => None,
    };
    let mut c = ControlClient::new(a.socket.channel().await?);
    match a.command {
        FileCommand::Create { .. } => {
            let (name, labels, data) = create.unwrap_or_default();
            let id = match what {
                What::Secret => rpc(c
                    .create_secret(pb::CreateSecretRequest {
                        spec: Some(pb::SecretSpec { name, labels, data }),
                    })
                    .await)?
                .secret
                .and_then(|s| s.meta)
                .map(|m| m.id),
                What::Config => rpc(c
                    .create_config(pb::CreateConfigRequest {
                        spec: Some(pb::ConfigSpec { name, labels, data }),
                    })
                    .await)?
                .config
                .and_then(|s| s.meta)
                .map(|m| m.id),
            };
            println!("{}", id.unwrap_or_default());
        }
        FileCommand::Ls { quiet, format } => {
            let items: Vec<Item> = match what {
                What::Secret => output::all_secrets(&c, pb::ListSecretsRequest::default())
                    .await?
                    .into_iter()
                    .map(of_secret)
                    .collect(),
                What::Config => output::all_configs(&c, pb::ListConfigsRequest::default())
                    .await?
                    .into_iter()
                    .map(of_config)
                    .collect(),
            };
            if quiet {
                for i in &items {
                    println!("{}", i.meta.id);
                }
                return Ok(());
            }
            if format == Format::Json {
                return print_json(&Value::Array(
                    items
                        .iter()
                        .map(|i| {
                            let mut v = i.json(what);
                            // A listing carries no data (docker's neither).
                            if let Some(s) = v["Spec"].as_object_mut() {
                                s.remove("Data");
                            }
                            v
                        })
                        .collect(),
                ));
            }
            let now = now_ms();
            let ago = |t: i64| format!("{} ago", human_duration(now - t));
            let mut t = Table::new(&["ID", "NAME", "CREATED", "UPDATED"]);
            for i in &items {
                t.row(vec![
                    short(&i.meta.id).to_string(),
                    i.name.clone(),
                    ago(i.meta.created_at_ms),
                    ago(i.meta.updated_at_ms),
                ]);
            }
            t.print();
        }
        FileCommand::Inspect {
            names,
            pretty,
            format,
        } => {
            let mut out = Vec::new();
            for n in names {
                out.push(get(&mut c, what, n).await?);
            }
            if !pretty && format == Format::Json {
                return print_json(&Value::Array(out.iter().map(|i| i.json(what)).collect()));
            }
            for (k, i) in out.iter().enumerate() {
                if k > 0 {
                    println!();
                }
                println!("ID:              {}", i.meta.id);
                println!("Name:            {}", i.name);
                if !i.labels.is_empty() {
                    println!("Labels:");
                    let mut l: Vec<_> = i.labels.iter().collect();
                    l.sort();
                    for (k, v) in l {
                        println!(" - {k}={v}");
                    }
                }
                println!("Created at:      {}", i.meta.created_at_ms);
                println!("Updated at:      {}", i.meta.updated_at_ms);
                if what == What::Config {
                    println!("Data:");
                    println!("{}", String::from_utf8_lossy(&i.data));
                }
            }
        }
        FileCommand::Rm { names } => {
            let mut failed = 0;
            for n in &names {
                let r = match what {
                    What::Secret => c
                        .remove_secret(pb::RemoveSecretRequest { secret: n.clone() })
                        .await
                        .map(drop),
                    What::Config => c
                        .remove_config(pb::RemoveConfigRequest { config: n.clone() })
                        .await
                        .map(drop),
                };
                match r {
                    Ok(()) => println!("{n}"),
                    Err(e) if names.len() == 1 => bail!("{}", e.message()),
                    Err(e) => {
                        eprintln!("shoal: {n}: {}", e.message());
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} {}s not removed", names.len(), what.name());
            }
        }
    }
    Ok(())
}
