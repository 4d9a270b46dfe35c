//! `shoal volume create|ls|inspect|rm|prune`: this node's volumes (docker's local driver),
//! kept under `<data dir>/volumes/`. Containers mount them with `run -v NAME:/path` or
//! `--mount type=volume,…`, services with `--mount`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use shoal_runtime::volume::{VolumeError, VolumeInfo, Volumes};

use super::output::{print_json, Table};

#[derive(Args)]
pub struct VolumeArgs {
    /// Data directory (volumes in <DIR>/volumes); default: the one of the agent on
    /// SHOAL_SOCKET, else /var/lib/shoal
    #[arg(long, global = true, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume (an existing one is kept as it is); prints its name
    Create {
        /// Set a label (KEY=VALUE)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        label: Vec<String>,
        /// Driver: only docker's "local" (a directory on this node)
        #[arg(short, long, default_value = "local")]
        driver: String,
        /// The name (default: a generated one); [a-zA-Z0-9][a-zA-Z0-9_.-]+
        name: Option<String>,
    },
    /// List volumes
    #[command(alias = "list")]
    Ls {
        /// Only volume names
        #[arg(short, long)]
        quiet: bool,
        /// Output format
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show volumes in full as JSON
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes (refused while a container uses one)
    #[command(alias = "remove")]
    Rm {
        /// Do not fail on a volume that does not exist
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove the anonymous volumes no container uses (all unused ones with --all)
    Prune {
        /// Named volumes too
        #[arg(short, long)]
        all: bool,
        /// Do not ask
        #[arg(short, long)]
        force: bool,
    },
}

fn open(dir: Option<PathBuf>) -> anyhow::Result<Volumes> {
    if !shoal_runtime::container::is_root() {
        bail!("must run as root");
    }
    let dir = super::output::data_dir(dir);
    Volumes::open(&dir).with_context(|| format!("open data dir {}", dir.display()))
}

/// A volume as `docker volume inspect` shows it.
fn inspect_json(v: &VolumeInfo) -> Value {
    let mut labels = v.labels.clone();
    if v.anonymous {
        labels.insert("com.docker.volume.anonymous".into(), String::new());
    }
    json!({
        "CreatedAt": v.created_at,
        "Driver": "local",
        "Labels": if labels.is_empty() { Value::Null } else { json!(labels) },
        "Mountpoint": v.mountpoint,
        "Name": v.name,
        "Options": Value::Null,
        "Scope": "local",
    })
}

/// Docker's sizes: decimal units, four significant digits (`1.234kB`).
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    let digits = if v >= 1000.0 {
        0
    } else if v >= 100.0 {
        1
    } else if v >= 10.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[u])
}

pub fn run(a: VolumeArgs) -> anyhow::Result<()> {
    // Checked before the data dir is looked for.
    if let VolumeCommand::Create {
        driver,
        name,
        label,
    } = &a.command
    {
        if driver != "local" {
            bail!("volume driver {driver:?} is not supported: only \"local\"");
        }
        if let Some(n) = name {
            shoal_runtime::volume::check_name(n)?;
        }
        super::output::parse_kv(label)?;
    }
    let vols = open(a.data_dir)?;
    match a.command {
        VolumeCommand::Create { label, name, .. } => {
            let labels: BTreeMap<String, String> =
                super::output::parse_kv(&label)?.into_iter().collect();
            let (v, _) = vols.create(name.as_deref(), &labels)?;
            println!("{}", v.name);
        }
        VolumeCommand::Ls { quiet, format } => {
            let list = vols.list()?;
            if quiet {
                for v in &list {
                    println!("{}", v.name);
                }
                return Ok(());
            }
            match format {
                Format::Json => print_json(&Value::Array(
                    list.iter()
                        .map(|v| {
                            let mut j = inspect_json(v);
                            j["Size"] = json!("N/A");
                            j
                        })
                        .collect(),
                ))?,
                Format::Table => {
                    let mut t = Table::new(&["DRIVER", "VOLUME NAME"]);
                    for v in &list {
                        t.row(vec!["local".into(), v.name.clone()]);
                    }
                    t.print();
                }
            }
        }
        VolumeCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in &names {
                out.push(inspect_json(&vols.inspect(n)?));
            }
            print_json(&Value::Array(out))?;
        }
        VolumeCommand::Rm { force, names } => {
            let mut failed = 0;
            for n in &names {
                match vols.remove(n) {
                    Ok(()) => println!("{n}"),
                    Err(VolumeError::NoSuchVolume(_)) if force => {}
                    Err(e) if names.len() == 1 => return Err(e.into()),
                    Err(e) => {
                        eprintln!("shoal: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("volume rm: {failed} of {} volumes failed", names.len());
            }
        }
        VolumeCommand::Prune { all, force } => {
            if !force {
                let what = if all {
                    "all local volumes"
                } else {
                    "anonymous local volumes"
                };
                print!(
                    "WARNING! This will remove {what} not used by at least one container.\nAre you sure you want to continue? [y/N] "
                );
                let _ = std::io::stdout().flush();
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                if !matches!(line.trim(), "y" | "Y" | "yes" | "Yes") {
                    println!();
                    return Ok(());
                }
            }
            let removed = vols.prune(all)?;
            if !removed.is_empty() {
                println!("Deleted Volumes:");
                for (n, _) in &removed {
                    println!("{n}");
                }
                println!();
            }
            let total: u64 = removed.iter().map(|(_, b)| b).sum();
            println!("Total reclaimed space: {}", human_size(total));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(5), "5B");
        assert_eq!(human_size(1234), "1.234kB");
        assert_eq!(human_size(12_345_678), "12.35MB");
        assert_eq!(human_size(999_999), "1000kB");
    }
}
