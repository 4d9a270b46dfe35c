//! `shoal system df|prune` — the disk the node's images, unpacked layers and containers take,
//! and its reclaiming — and `shoal completion bash|zsh|fish`.
//!
//! Containers are the front door's (`shoal run`) and the service tasks' (the worker agent's);
//! prune removes only stopped front-door containers: a task's container is its agent's to
//! remove. An image or layer that any container (running or not, task or not) uses is never
//! removed.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use shoal_runtime::frontdoor::{FrontDoor, CONTAINERS_DIR};
use shoal_runtime::image::ImageStore;

use super::output::{print_json, Format, Table};

#[derive(Args)]
pub struct SystemArgs {
    /// Data directory (default: the agent's on SHOAL_SOCKET, else /var/lib/shoal)
    #[arg(long, global = true, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: SystemCommand,
}

#[derive(Subcommand)]
enum SystemCommand {
    /// Show the disk the images, unpacked layers and containers use, and what prune frees
    Df {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove stopped containers, dangling images (every unused image with -a) and the
    /// blobs and layers nothing references
    Prune {
        /// Every image no container uses, not only untagged ones
        #[arg(short, long)]
        all: bool,
        /// Do not ask for confirmation
        #[arg(short, long)]
        force: bool,
    },
}

/// `shoal completion` flags.
#[derive(Args)]
pub struct CompletionArgs {
    /// The shell to write the completion script for
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// `shoal completion SHELL`: the shell's completion script for `cli`, on stdout.
pub fn completion(a: CompletionArgs, cli: &mut clap::Command) -> anyhow::Result<()> {
    let shell = match a.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, cli, "shoal", &mut std::io::stdout());
    Ok(())
}

/// One row of `system df`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Usage {
    total: usize,
    active: usize,
    size: u64,
    reclaimable: u64,
}

/// What the data dir holds, as `system df` counts it.
#[derive(Debug, Default)]
struct DiskUse {
    images: Usage,
    layers: Usage,
    containers: Usage,
}

pub fn run(a: SystemArgs) -> anyhow::Result<()> {
    let data = super::output::data_dir(a.data_dir);
    match a.command {
        SystemCommand::Df { format } => {
            let u = disk_use(&data)?;
            let rows = [
                ("Images", &u.images),
                ("Layers", &u.layers),
                ("Containers", &u.containers),
            ];
            if format == Format::Json {
                return print_json(&json!(rows
                    .iter()
                    .map(|(t, u)| json!({
                        "Type": t, "TotalCount": u.total, "Active": u.active,
                        "Size": u.size, "Reclaimable": u.reclaimable,
                    }))
                    .collect::<Vec<_>>()));
            }
            let mut t = Table::new(&["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]);
            for (name, u) in rows {
                let pct = (u.reclaimable * 100).checked_div(u.size).unwrap_or(0);
                t.row(vec![
                    name.into(),
                    u.total.to_string(),
                    u.active.to_string(),
                    human_size(u.size),
                    format!("{} ({pct}%)", human_size(u.reclaimable)),
                ]);
            }
            t.print();
        }
        SystemCommand::Prune { all, force } => {
            if !force && !confirmed(all)? {
                return Ok(());
            }
            prune(&data, all)?;
        }
    }
    Ok(())
}

/// Asks docker's question on stderr and reads the answer from stdin.
fn confirmed(all: bool) -> anyhow::Result<bool> {
    let images = if all {
        "all images without at least one container associated to them"
    } else {
        "all dangling images"
    };
    eprint!(
        "WARNING! This will remove:\n  - all stopped containers\n  - {images}\n  - all blobs and unpacked layers no image references\n\nAre you sure you want to continue? [y/N] "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes"))
}

fn prune(data: &Path, all: bool) -> anyhow::Result<()> {
    let before = disk_use(data)?;
    let front = FrontDoor::open(data).context("opening the containers")?;
    let mut removed = Vec::new();
    for c in front.list(true).context("listing the containers")? {
        if c.state.is_running() {
            continue;
        }
        // One mid-creation (its `shoal run` still at work) is locked: it stays.
        match front.remove(&c.record.id, false) {
            Ok(()) => removed.push(c.record.id),
            Err(e) => eprintln!("shoal: kept container {}: {e}", c.record.short_id()),
        }
    }
    let used = front
        .images_in_use()
        .context("listing the images the containers use")?;
    let store = ImageStore::open(data).context("opening the image store")?;
    let kept: BTreeSet<String> = store.list()?.into_iter().map(|i| i.id).collect();
    store
        .prune_images(all, &used.image_ids, &used.chain_ids)
        .context("pruning images")?;
    let left: BTreeSet<String> = store.list()?.into_iter().map(|i| i.id).collect();
    if !removed.is_empty() {
        println!("Deleted Containers:");
        for id in &removed {
            println!("{id}");
        }
        println!();
    }
    let gone: Vec<&String> = kept.difference(&left).collect();
    if !gone.is_empty() {
        println!("Deleted Images:");
        for id in gone {
            println!("deleted: {id}");
        }
        println!();
    }
    let after = disk_use(data)?;
    let size = |d: &DiskUse| d.images.size + d.layers.size + d.containers.size;
    println!(
        "Total reclaimed space: {}",
        human_size(size(&before).saturating_sub(size(&after)))
    );
    Ok(())
}

/// Counts and sizes of the data dir's images, unpacked layers and containers.
fn disk_use(data: &Path) -> anyhow::Result<DiskUse> {
    let front = FrontDoor::open(data).context("opening the containers")?;
    let used = front
        .images_in_use()
        .context("listing the images the containers use")?;
    let store = ImageStore::open(data).context("opening the image store")?;
    let images = store.list().context("listing the images")?;
    let mut u = DiskUse::default();
    for i in &images {
        u.images.total += 1;
        u.images.size += i.size;
        if used.image_ids.contains(&i.id) {
            u.images.active += 1;
        } else {
            u.images.reclaimable += i.size;
        }
    }
    // A layer is kept while an image a container uses (or the container itself) names it.
    let mut in_use: BTreeSet<String> = used.chain_ids.iter().map(|c| hex(c)).collect();
    for i in images.iter().filter(|i| used.image_ids.contains(&i.id)) {
        in_use.extend(i.chain_ids.iter().map(|c| hex(c)));
    }
    for e in std::fs::read_dir(store.layers_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let size = tree_bytes(&e.path());
        u.layers.total += 1;
        u.layers.size += size;
        // A layer no container uses goes with its images (prune -a), or at once when no
        // image references it (any prune).
        if in_use.contains(&name) {
            u.layers.active += 1;
        } else {
            u.layers.reclaimable += size;
        }
    }
    let containers = data.join(CONTAINERS_DIR);
    let mut seen = BTreeSet::new();
    for c in front.list(true).context("listing the containers")? {
        let size = tree_bytes(&front.container_dir(&c.record.id));
        u.containers.total += 1;
        u.containers.size += size;
        if c.state.is_running() {
            u.containers.active += 1;
        } else {
            u.containers.reclaimable += size;
        }
        seen.insert(c.record.id);
    }
    // Service tasks' containers: counted, never reclaimable here (their agent removes them).
    let tasks =
        shoal_runtime::container::Container::list(&containers.join(".tasks")).unwrap_or_default();
    for t in tasks.iter().filter(|t| !seen.contains(&t.id)) {
        u.containers.total += 1;
        u.containers.size += tree_bytes(&containers.join(&t.id));
        if matches!(
            t.status,
            shoal_runtime::container::Status::Running | shoal_runtime::container::Status::Paused
        ) {
            u.containers.active += 1;
        }
    }
    Ok(u)
}

fn hex(chain_id: &str) -> String {
    chain_id
        .strip_prefix("sha256:")
        .unwrap_or(chain_id)
        .to_string()
}

/// Bytes of the files under `dir` (apparent sizes, as docker counts them); symlinks are not
/// followed, mount points of other file systems are not entered.
fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                if m.dev() == root.dev() {
                    stack.push(e.path());
                }
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Docker's decimal sizes: `4.26MB`, `812kB`, `17B`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        return format!("{bytes}B");
    }
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_500), "1.5kB");
        assert_eq!(human_size(4_260_000), "4.26MB");
        assert_eq!(human_size(2_000_000_000), "2GB");
    }

    #[test]
    fn a_tree_is_measured_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/f"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.path().join("g"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("/usr", d.path().join("link")).unwrap();
        let link_len = std::fs::symlink_metadata(d.path().join("link"))
            .unwrap()
            .len();
        assert_eq!(tree_bytes(d.path()), 1024 + link_len);
        assert_eq!(tree_bytes(&d.path().join("none")), 0);
    }
}
