//! `shoal image …`: the node-local image store (pull, import, load, ls, inspect, rm, prune).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use shoal_runtime::image::{ImageInfo, ImageStore};

/// Where shoal keeps its state unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";

#[derive(Args)]
pub struct ImageArgs {
    /// Data directory (images in <DIR>/images, unpacked layers in <DIR>/layers); default: the
    /// one of the agent on SHOAL_SOCKET, else /var/lib/shoal
    #[arg(long, global = true, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: ImageCommand,
}

/// How the registry commands reach registries.
#[derive(Args)]
struct Registry {
    /// A registry (host[:port]) to reach over plain HTTP (loopback ones are, unless the node
    /// keeps a CA for them in <data dir>/certs.d/HOST:PORT/)
    #[arg(
        long = "insecure-registry",
        env = "SHOAL_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure: Vec<String>,
}

impl Registry {
    /// The options for `reference`, with this node's kept credentials for its registry.
    fn options(self, data_dir: &Path, reference: &str) -> shoal_worker::registry::PullOptions {
        shoal_worker::registry::PullOptions {
            insecure: self.insecure,
            ..Default::default()
        }
        .with_node(data_dir, reference)
    }
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image from a registry (`busybox`, `registry:5000/app:1.4`, `app@sha256:…`)
    Pull {
        /// Print only the image id
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        registry: Registry,
        /// The image
        reference: String,
    },
    /// Push a stored image to its registry (tag it with the registry's name first)
    Push {
        /// Print only the manifest digest
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        registry: Registry,
        /// The image, by the name it has in the registry (`registry:5000/app:1.4`)
        reference: String,
    },
    /// Give an image another name (`shoal image tag busybox registry:5000/tools/busybox:1`)
    Tag {
        /// NAME[:TAG], image id (prefix) or sha256 digest
        source: String,
        /// NAME[:TAG] to add
        target: String,
    },
    /// Import a root filesystem tar (plain or gzip) as a one-layer image
    Import {
        /// The rootfs tar
        tar: PathBuf,
        /// NAME[:TAG] for the new image
        reference: String,
    },
    /// Load images from an OCI layout (directory or tar) or a `docker save` archive
    Load {
        /// Directory or archive; `-i` is accepted for docker compatibility
        #[arg(short = 'i', long = "input")]
        input: Option<PathBuf>,
        /// No progress (load draws none; accepted for docker's habit): the loaded images
        /// are still named
        #[arg(short, long)]
        quiet: bool,
        /// Directory or archive
        path: Option<PathBuf>,
    },
    /// List images
    #[command(alias = "list")]
    Ls {
        /// Only image ids
        #[arg(short, long)]
        quiet: bool,
        /// Output format
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show images in full as JSON (their store records and their configs)
    Inspect {
        /// NAME[:TAG], image id (prefix) or sha256 digest
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Untag an image; remove it (and collect what nothing uses) when no tag is left
    #[command(alias = "remove")]
    Rm {
        /// NAME[:TAG], image id (prefix) or sha256 digest
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Remove untagged images, then blobs and unpacked layers nothing references
    Prune,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Docker's per-layer progress: on a terminal one line per blob, redrawn in place
/// (`Downloading [=====>     ]  1.2MB/3.4MB`, then `done`); elsewhere one line per blob as it
/// completes.
struct Bars {
    done: &'static str,
    tty: bool,
    state: std::sync::Mutex<BarState>,
}

#[derive(Default)]
struct BarState {
    /// (short id, bytes so far, size, completion printed), in the order first heard of.
    rows: Vec<(String, u64, u64, bool)>,
    drawn: usize,
    last: Option<std::time::Instant>,
}

/// How often a terminal's progress lines are redrawn at most.
const REDRAW_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Bars {
    fn new(done: &'static str) -> Bars {
        Bars {
            done,
            tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            state: Default::default(),
        }
    }

    fn update(&self, blob: &str, so_far: u64, size: u64) {
        let hex = blob.trim_start_matches("sha256:");
        let short = hex[..hex.len().min(12)].to_string();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = match st.rows.iter().position(|r| r.0 == short) {
            Some(i) => i,
            None => {
                st.rows.push((short.clone(), 0, size, false));
                st.rows.len() - 1
            }
        };
        st.rows[i].1 = so_far;
        let complete = so_far >= size;
        if !self.tty {
            if complete && !st.rows[i].3 {
                st.rows[i].3 = true;
                println!("{short}: {}", self.done);
            }
            return;
        }
        if !complete && st.last.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return;
        }
        st.last = Some(std::time::Instant::now());
        let mut out = String::new();
        if st.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", st.drawn));
        }
        for (id, n, size, _) in &st.rows {
            let line = if n >= size {
                self.done.to_string()
            } else {
                let width = 50usize;
                let filled = (*n as f64 / (*size).max(1) as f64 * width as f64) as usize;
                format!(
                    "Downloading [{}>{}] {}/{}",
                    "=".repeat(filled.min(width - 1)),
                    " ".repeat(width - 1 - filled.min(width - 1)),
                    human_size(*n),
                    human_size(*size)
                )
            };
            out.push_str(&format!("\x1b[2K{id}: {line}\n"));
        }
        st.drawn = st.rows.len();
        print!("{out}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

pub fn run(mut args: ImageArgs) -> anyhow::Result<()> {
    let data_dir = super::output::data_dir(args.data_dir.take());
    let store = open(&data_dir)?;
    match args.command {
        ImageCommand::Pull {
            quiet,
            registry,
            reference,
        } => {
            let opts = registry.options(&data_dir, &reference);
            let store = std::sync::Arc::new(store);
            let bars = Bars::new("Pull complete");
            let progress = |layer: &str, done: u64, size: u64| {
                if !quiet {
                    bars.update(layer, done, size);
                }
            };
            let info = super::output::block_on(async {
                Ok(
                    shoal_worker::registry::pull(store, &data_dir, &reference, &opts, &progress)
                        .await?,
                )
            })?;
            if quiet {
                println!("{}", info.id);
            } else {
                println!("Digest: {}", info.manifest_digest);
                println!(
                    "Status: Downloaded image for {}",
                    info.repo_tags.first().cloned().unwrap_or(reference)
                );
            }
        }
        ImageCommand::Push {
            quiet,
            registry,
            reference,
        } => {
            let opts = registry.options(&data_dir, &reference);
            let bars = Bars::new("Pushed");
            let progress = |blob: &str, done: u64, size: u64| {
                if !quiet {
                    bars.update(blob, done, size);
                }
            };
            let digest = super::output::block_on(async {
                Ok(shoal_worker::registry::push(
                    std::sync::Arc::new(store),
                    &reference,
                    &opts,
                    &progress,
                )
                .await?)
            })?;
            if quiet {
                println!("{digest}");
            } else {
                println!("{reference}: digest: {digest}");
            }
        }
        ImageCommand::Tag { source, target } => {
            store
                .tag(&source, &target)
                .with_context(|| format!("tag {source} {target}"))?;
        }
        ImageCommand::Import { tar, reference } => {
            let info = store
                .import_rootfs_tar(&tar, &reference)
                .with_context(|| format!("import {}", tar.display()))?;
            println!("{}", info.id);
        }
        ImageCommand::Load { input, path, .. } => {
            let path = input
                .or(path)
                .context("load: give the archive or directory to load")?;
            let infos = store
                .load(&path)
                .with_context(|| format!("load {}", path.display()))?;
            for info in infos {
                if info.repo_tags.is_empty() {
                    println!("Loaded image ID: {}", info.id);
                }
                for tag in &info.repo_tags {
                    println!("Loaded image: {tag}");
                }
            }
        }
        ImageCommand::Ls { quiet, format } => {
            let mut images = store.list().context("list images")?;
            images.sort_by(|a, b| {
                b.created_unix()
                    .cmp(&a.created_unix())
                    .then(a.repo_tags.cmp(&b.repo_tags))
            });
            if quiet {
                for i in &images {
                    println!("{}", i.short_id());
                }
            } else {
                match format {
                    Format::Json => super::output::print_json(&serde_json::Value::Array(
                        images.iter().map(image_json).collect(),
                    ))?,
                    Format::Table => print!("{}", table(&images, now_unix())),
                }
            }
        }
        ImageCommand::Inspect { references } => {
            let mut out = Vec::new();
            for reference in &references {
                let info = store
                    .inspect(reference)
                    .with_context(|| format!("inspect {reference}"))?;
                let config = store
                    .image_config(reference)
                    .with_context(|| format!("inspect {reference}"))?;
                let mut v = image_json(&info);
                v["Config"] = serde_json::to_value(config.config())?;
                out.push(v);
            }
            super::output::print_json(&serde_json::Value::Array(out))?;
        }
        ImageCommand::Rm { references } => {
            // Images and layers of local containers (running or not) stay; gc also keeps
            // every layer an overlay mount on this host uses.
            let used = in_use(&data_dir)?;
            for r in &references {
                let info = store.inspect(r).with_context(|| format!("rm {r}"))?;
                store
                    .remove_unless_used(r, &used.image_ids)
                    .with_context(|| format!("rm {r}"))?;
                match store.inspect(&info.id) {
                    Ok(_) => println!("Untagged: {r}"),
                    Err(_) => println!("Deleted: {}", info.id),
                }
            }
            store
                .gc(&used.chain_ids)
                .context("garbage-collect images")?;
        }
        ImageCommand::Prune => {
            let used = in_use(&data_dir)?;
            let report = store
                .prune(&used.image_ids, &used.chain_ids)
                .context("prune images")?;
            println!(
                "Deleted {} images, {} blobs, {} layers; reclaimed {}",
                report.images_removed,
                report.blobs_removed,
                report.layers_removed,
                human_size(report.blob_bytes_freed)
            );
        }
    }
    Ok(())
}

fn open(data_dir: &Path) -> anyhow::Result<ImageStore> {
    ImageStore::open(data_dir)
        .with_context(|| format!("open image store in {}", data_dir.display()))
}

/// What the data dir's containers use, so rm and prune keep it.
fn in_use(data_dir: &Path) -> anyhow::Result<shoal_runtime::frontdoor::ImagesInUse> {
    shoal_runtime::frontdoor::FrontDoor::open(data_dir)
        .and_then(|f| f.images_in_use())
        .context("list the images local containers use")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// `docker images`-style table: one row per tag (`<none>` for dangling images).
/// An image as `image ls --format json` and `image inspect` show it: docker's keys (`Id`,
/// `RepoTags`, `RepoDigests`, `RootFS`, …) and the store's own (`ManifestDigest`, `Layers`,
/// `ChainIds`).
fn image_json(i: &ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "Id": i.id,
        "RepoTags": i.repo_tags,
        "RepoDigests": i.repo_digests,
        "Created": i.created.clone().unwrap_or_default(),
        "Size": i.size,
        "Architecture": i.architecture,
        "Os": i.os,
        "ManifestDigest": i.manifest_digest,
        "RootFS": {"Type": "layers", "Layers": i.diff_ids},
        "Layers": i.layers,
        "ChainIds": i.chain_ids,
    })
}

fn table(images: &[ImageInfo], now: i64) -> String {
    let mut rows: Vec<[String; 5]> =
        vec![["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"].map(String::from)];
    for i in images {
        let created = i
            .created_unix()
            .map_or_else(|| "N/A".to_string(), |t| human_ago(now - t));
        let size = human_size(i.size);
        let tags: Vec<(String, String)> = if i.repo_tags.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            i.repo_tags
                .iter()
                .map(|t| match t.rsplit_once(':') {
                    Some((n, tag)) => (n.to_string(), tag.to_string()),
                    None => (t.clone(), String::new()),
                })
                .collect()
        };
        for (repo, tag) in tags {
            rows.push([
                repo,
                tag,
                i.short_id().to_string(),
                created.clone(),
                size.clone(),
            ]);
        }
    }
    let mut widths = [0usize; 5];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (k, c) in r.iter().enumerate() {
            if k + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}   ", w = widths[k]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Docker's "N units ago".
fn human_ago(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let t = if s < 1 {
        "Less than a second".to_string()
    } else if s == 1 {
        "1 second".to_string()
    } else if s < 60 {
        format!("{s} seconds")
    } else if m < 2 {
        "About a minute".to_string()
    } else if m < 60 {
        format!("{m} minutes")
    } else if h < 2 {
        "About an hour".to_string()
    } else if h < 48 {
        format!("{h} hours")
    } else if d < 14 {
        format!("{d} days")
    } else if d < 60 {
        format!("{} weeks", d / 7)
    } else if d < 730 {
        format!("{} months", d / 30)
    } else {
        format!("{} years", d / 365)
    };
    format!("{t} ago")
}

/// Docker's decimal sizes with three significant digits: `4.26MB`, `812kB`, `17B`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_like_docker() {
        assert_eq!(human_size(17), "17B");
        assert_eq!(human_size(4_261_000), "4.26MB");
        assert_eq!(human_size(812_345), "812kB");
        assert_eq!(human_size(1_500_000_000), "1.5GB");
        assert_eq!(human_ago(30), "30 seconds ago");
        assert_eq!(human_ago(90), "About a minute ago");
        assert_eq!(human_ago(3 * 86_400), "3 days ago");
    }

    #[test]
    fn table_aligns_columns() {
        let info = |tags: &[&str], id: char| ImageInfo {
            id: format!("sha256:{}", id.to_string().repeat(64)),
            manifest_digest: String::new(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            created: Some("2024-01-01T00:00:00Z".into()),
            size: 4_261_000,
            architecture: "amd64".into(),
            os: "linux".into(),
            layers: vec![],
            diff_ids: vec![],
            repo_digests: vec![],
            chain_ids: vec![],
        };
        let now = shoal_runtime::image::parse_rfc3339("2024-01-04T00:00:00Z").unwrap();
        let t = table(
            &[
                info(&["busybox:latest", "registry.local:5000/app:v1"], 'a'),
                info(&[], 'b'),
            ],
            now,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        let col = lines[0].find("TAG").unwrap();
        assert_eq!(lines[1].find("latest"), Some(col));
        assert_eq!(lines[2].find("v1"), Some(col));
        assert_eq!(lines[3].find("<none>   "), Some(0));
        assert!(lines[1].ends_with("3 days ago   4.26MB"), "{}", lines[1]);
        assert!(lines[2].contains("aaaaaaaaaaaa"));
    }
}

/// `shoal login`.
#[derive(Args)]
pub struct LoginArgs {
    /// Data directory (the credentials are kept in <DIR>/auth.json, root only); default: the
    /// one of the agent on SHOAL_SOCKET, else /var/lib/shoal
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// User name
    #[arg(short, long)]
    username: String,
    /// Password (prefer --password-stdin)
    #[arg(short, long)]
    password: Option<String>,
    /// Read the password from standard input
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    registry: Registry,
    /// The registry (host[:port]; default Docker Hub)
    server: Option<String>,
}

/// `shoal logout`.
#[derive(Args)]
pub struct LogoutArgs {
    /// Data directory; default: the one of the agent on SHOAL_SOCKET, else /var/lib/shoal
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The registry (host[:port]; default Docker Hub)
    server: Option<String>,
}

/// The registry a login names: `host[:port]`, a URL's host, or Docker Hub.
fn login_server(given: Option<&str>) -> anyhow::Result<String> {
    let s = given.unwrap_or("docker.io");
    let s = s
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let host = s.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        anyhow::bail!("invalid registry {s:?}: expected HOST[:PORT]");
    }
    Ok(host.to_string())
}

pub fn login(a: LoginArgs) -> anyhow::Result<()> {
    let server = login_server(a.server.as_deref())?;
    let password = match (a.password, a.password_stdin) {
        (Some(_), true) => anyhow::bail!("--password and --password-stdin are exclusive"),
        (Some(p), false) => p,
        (None, true) => {
            let mut p = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut p)
                .context("reading the password from standard input")?;
            p.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => anyhow::bail!("give the password with --password-stdin (or -p)"),
    };
    if a.username.is_empty() || password.is_empty() {
        anyhow::bail!("the user name and the password must not be empty");
    }
    let data_dir = super::output::data_dir(a.data_dir);
    super::output::block_on(async {
        Ok(shoal_worker::registry::check_login(
            &server,
            &a.username,
            &password,
            &a.registry.insecure,
            &data_dir,
        )
        .await?)
    })?;
    shoal_worker::registry::AuthFile::of(&data_dir).set(&server, &a.username, &password)?;
    println!("Login Succeeded");
    Ok(())
}

pub fn logout(a: LogoutArgs) -> anyhow::Result<()> {
    let server = login_server(a.server.as_deref())?;
    if shoal_worker::registry::AuthFile::of(&super::output::data_dir(a.data_dir)).remove(&server)? {
        println!("Removing login credentials for {server}");
    } else {
        println!("Not logged in to {server}");
    }
    Ok(())
}
