//! `shoal runtime …`: the runc-style CLI over an OCI bundle.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use shoal_runtime::container::{
    Container, CreateOptions, ExecOptions, LogConfig, Overlay, Stdio, DEFAULT_ROOT, EXEC_TIMED_OUT,
};

/// Options of every `shoal runtime` command.
#[derive(Args)]
pub struct RuntimeArgs {
    /// Directory holding the containers' state
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    #[command(subcommand)]
    command: RuntimeCommand,
}

impl RuntimeArgs {
    /// The subcommand only reports (state, lists, events): nothing of a container depends on
    /// its stdout, so a closed one may end it like any Unix tool.
    pub fn only_reports(&self) -> bool {
        matches!(
            self.command,
            RuntimeCommand::State { .. }
                | RuntimeCommand::Ps { .. }
                | RuntimeCommand::List { .. }
                | RuntimeCommand::Wait { .. }
                | RuntimeCommand::Events { .. }
        )
    }
}

/// Default rotation size of a captured log.
const DEFAULT_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default count of rotated log files.
const DEFAULT_LOG_MAX_FILES: u32 = 3;

#[derive(Args)]
struct LogArgs {
    /// Capture stdout and stderr into this file (stdin is /dev/null)
    #[arg(long)]
    log: Option<PathBuf>,
    /// Rotate the log at this many bytes [default: 10485760]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    log_max_bytes: Option<u64>,
    /// Rotated log files to keep, 0 to truncate instead [default: 3]
    #[arg(long)]
    log_max_files: Option<u32>,
}

impl LogArgs {
    fn config(&self) -> Result<Option<LogConfig>> {
        let Some(path) = &self.log else {
            if self.log_max_bytes.is_some() || self.log_max_files.is_some() {
                bail!("--log-max-bytes and --log-max-files need --log");
            }
            return Ok(None);
        };
        Ok(Some(LogConfig {
            path: path.clone(),
            max_bytes: self.log_max_bytes.unwrap_or(DEFAULT_LOG_MAX_BYTES),
            max_files: self.log_max_files.unwrap_or(DEFAULT_LOG_MAX_FILES),
        }))
    }
}

/// An overlayfs root over image layers (hidden: the worker agent's way of creating a task's
/// container in a process of its own, so the monitor forks from this small process and not
/// from the daemon).
#[derive(Args)]
struct OverlayArgs {
    /// Read-only layer directories, lowest first, separated by ':'
    #[arg(long, hide = true, value_name = "DIR:DIR:...")]
    overlay_lower: Option<String>,
    /// The container's writable layer
    #[arg(long, hide = true, value_name = "DIR")]
    overlay_upper: Option<PathBuf>,
    /// Overlayfs work directory (empty, on the upper's filesystem)
    #[arg(long, hide = true, value_name = "DIR")]
    overlay_work: Option<PathBuf>,
}

impl OverlayArgs {
    fn config(&self) -> Result<Option<Overlay>> {
        let (lower, upper, work) =
            match (&self.overlay_lower, &self.overlay_upper, &self.overlay_work) {
                (None, None, None) => return Ok(None),
                (Some(l), Some(u), Some(w)) => (l, u, w),
                _ => bail!("--overlay-lower, --overlay-upper and --overlay-work go together"),
            };
        let mut lower_dirs = Vec::new();
        for d in lower.split(':') {
            if d.is_empty() {
                bail!("--overlay-lower {lower:?}: empty layer directory");
            }
            lower_dirs.push(existing_dir("--overlay-lower", Path::new(d))?);
        }
        Ok(Some(Overlay {
            lower_dirs,
            upper: existing_dir("--overlay-upper", upper)?,
            work: existing_dir("--overlay-work", work)?,
        }))
    }
}

/// `dir` made absolute, refused unless it is a directory.
fn existing_dir(flag: &str, dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!("{flag} {}: not a directory", dir.display());
    }
    std::path::absolute(dir).with_context(|| format!("{flag} {}", dir.display()))
}

#[derive(Subcommand)]
enum RuntimeCommand {
    /// Create and start a container; in the foreground, wait, delete it and exit with its code
    Run {
        /// Bundle directory (holding config.json)
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// Return once it runs (its stdio goes to /dev/null unless --log)
        #[arg(short, long)]
        detach: bool,
        #[command(flatten)]
        log: LogArgs,
        id: String,
    },
    /// Create a container whose process waits for `start`
    Create {
        /// Bundle directory (holding config.json)
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        overlay: OverlayArgs,
        id: String,
    },
    /// Start the process of a created container
    Start { id: String },
    /// Print the OCI state of a container as JSON
    State { id: String },
    /// Send a signal (default SIGTERM) to the container's init
    Kill {
        id: String,
        /// Name (KILL, SIGKILL) or number
        signal: Option<String>,
    },
    /// Freeze every process of the container
    Pause { id: String },
    /// Thaw a paused container
    Resume { id: String },
    /// Delete a container (cgroup, state, mounts)
    Delete {
        /// Kill it first if it runs (a container still being created is waited for; what a
        /// creator that died half-way left is removed)
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Run a command inside a running container
    Exec {
        /// Set an environment variable (KEY=VALUE)
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// Working directory inside the container
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Do not wait for it
        #[arg(short, long)]
        detach: bool,
        /// Kill it (and what it started) when it runs longer than this (e.g. 30s); exit 124
        #[arg(long, conflicts_with = "detach")]
        timeout: Option<String>,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// List the host pids of the container's processes
    Ps {
        /// table or json
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
    },
    /// List containers
    List {
        /// Only ids
        #[arg(short, long)]
        quiet: bool,
    },
    /// Wait for the container's init to exit; print how it ended and exit with its code
    Wait { id: String },
    /// Print resource usage (cpu, memory, pids) as JSON
    Events {
        /// Print one sample and exit
        #[arg(long)]
        stats: bool,
        id: String,
    },
}

/// The init of a foreground `run`, for forwarding the caller's signals.
static FOREGROUND_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FOREGROUND_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

fn forward_signals(pid: i32) {
    FOREGROUND_PID.store(pid, Ordering::Relaxed);
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: installing a handler that only calls kill.
        unsafe {
            libc::signal(
                sig,
                forward as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Ok(n);
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    let sig: nix::sys::signal::Signal = name
        .parse()
        .with_context(|| format!("unknown signal {s}"))?;
    Ok(sig as i32)
}

fn create(
    root: &Path,
    bundle: &Path,
    id: &str,
    log: &LogArgs,
    overlay: Option<Overlay>,
    stdio: Stdio,
) -> Result<Container> {
    let opts = CreateOptions {
        log: log.config()?,
        overlay,
        stdio,
        ..Default::default()
    };
    Container::create(root, id, bundle, &opts).with_context(|| format!("create container {id}"))
}

/// Run one `shoal runtime` command.
pub fn run(args: RuntimeArgs) -> Result<()> {
    if !shoal_runtime::container::is_root() {
        bail!("shoal runtime must run as root");
    }
    let root = args.root;
    let load = |id: &str| Container::load(&root, id).with_context(|| format!("container {id}"));
    match args.command {
        RuntimeCommand::Run {
            bundle,
            detach,
            log,
            id,
        } => {
            protect()?;
            let stdio = if detach { Stdio::Null } else { Stdio::Inherit };
            let mut c = create(&root, &bundle, &id, &log, None, stdio)?;
            if !detach {
                forward_signals(c.pid());
            }
            if let Err(e) = c.start() {
                let _ = c.delete(true);
                return Err(e).with_context(|| format!("start container {id}"));
            }
            if detach {
                return Ok(());
            }
            let status = c
                .wait_reaped()
                .with_context(|| format!("wait for container {id}"))?;
            c.delete(true)
                .with_context(|| format!("delete container {id}"))?;
            std::process::exit(status.shell_code());
        }
        RuntimeCommand::Create {
            bundle,
            log,
            overlay,
            id,
        } => {
            let overlay = overlay.config()?;
            protect()?;
            create(&root, &bundle, &id, &log, overlay, Stdio::Null)?;
        }
        RuntimeCommand::Start { id } => load(&id)?
            .start()
            .with_context(|| format!("start container {id}"))?,
        RuntimeCommand::State { id } => {
            let s = load(&id)?.state();
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        RuntimeCommand::Kill { id, signal } => {
            let sig = parse_signal(signal.as_deref().unwrap_or("SIGTERM"))?;
            load(&id)?
                .kill(sig)
                .with_context(|| format!("kill container {id}"))?;
        }
        RuntimeCommand::Pause { id } => load(&id)?
            .pause()
            .with_context(|| format!("pause container {id}"))?,
        RuntimeCommand::Resume { id } => load(&id)?
            .resume()
            .with_context(|| format!("resume container {id}"))?,
        RuntimeCommand::Delete { force, id } => {
            if force {
                // Whatever it is doing, half-made ones included.
                Container::remove(&root, &id).with_context(|| format!("delete container {id}"))?;
            } else {
                load(&id)?
                    .delete(force)
                    .with_context(|| format!("delete container {id}"))?;
            }
            // And the network shoal made for it, if any (a no-op for plain OCI containers).
            shoal_runtime::network::detach(&id)
                .with_context(|| format!("release the network of container {id}"))?;
        }
        RuntimeCommand::Exec {
            env,
            cwd,
            detach,
            timeout,
            id,
            command,
        } => {
            let timeout = timeout
                .as_deref()
                .map(|t| super::output::parse_duration_ms(t).context("--timeout"))
                .transpose()?;
            if timeout == Some(0) {
                bail!("--timeout must be more than 0");
            }
            protect()?;
            let c = load(&id)?;
            let p = c
                .exec(&ExecOptions {
                    args: command,
                    env,
                    cwd,
                    detach,
                    timeout: timeout.map(std::time::Duration::from_millis),
                })
                .with_context(|| format!("exec in container {id}"))?;
            if p.timed_out() {
                let t = super::output::format_ms(timeout.unwrap_or(0));
                eprintln!("shoal: exec in container {id}: {EXEC_TIMED_OUT} ({t}), killed");
                std::process::exit(124);
            }
            if let Some(status) = p.wait() {
                std::process::exit(status.shell_code());
            }
        }
        RuntimeCommand::Ps { format, id } => {
            let pids = load(&id)?
                .pids()
                .with_context(|| format!("pids of container {id}"))?;
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string(&pids)?),
                "table" => {
                    println!("PID");
                    for p in pids {
                        println!("{p}");
                    }
                }
                other => bail!("unknown format {other}: use table or json"),
            }
        }
        RuntimeCommand::List { quiet } => {
            let list = Container::list(&root)?;
            if quiet {
                for s in list {
                    println!("{}", s.id);
                }
            } else {
                println!("{:<24} {:<8} {:<10} BUNDLE", "ID", "PID", "STATUS");
                for s in list {
                    println!(
                        "{:<24} {:<8} {:<10} {}",
                        s.id,
                        s.pid,
                        s.status,
                        s.bundle.display()
                    );
                }
            }
        }
        RuntimeCommand::Wait { id } => {
            let status = load(&id)?
                .wait()
                .with_context(|| format!("wait for container {id}"))?;
            println!("{}", serde_json::to_string(&status)?);
            std::process::exit(status.shell_code());
        }
        RuntimeCommand::Events { stats, id } => {
            if !stats {
                bail!("only `events --stats` is supported");
            }
            let s = load(&id)?
                .stats()
                .with_context(|| format!("stats of container {id}"))?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
    }
    Ok(())
}

/// Run from the immutable copy of this binary before touching a container (CVE-2019-5736).
fn protect() -> Result<()> {
    shoal_runtime::exe::reexec_protected().context("protect the runtime binary")?;
    shoal_runtime::exe::forget_reexec_mark();
    Ok(())
}
