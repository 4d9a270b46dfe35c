//! `shoal agent`: the daemon, in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shoal_manager::daemon::{Daemon, DaemonConfig, DEFAULT_DATA_DIR, DEFAULT_LISTEN_ADDR};

#[derive(Args)]
pub struct AgentArgs {
    /// Where the node keeps its state (raft, pki, images, containers)
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address the gRPC port (raft, CA, control, dispatcher) listens on
    #[arg(long, default_value = DEFAULT_LISTEN_ADDR)]
    listen_addr: SocketAddr,
    /// Address other nodes reach this one on (host[:port]); default: the listen address
    #[arg(long)]
    advertise_addr: Option<String>,
    /// The local control socket (root only)
    #[arg(long, env = "SHOAL_SOCKET", default_value = shoal_manager::daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Name this node reports (default: the machine's hostname)
    #[arg(long)]
    hostname: Option<String>,
}

pub fn run(a: AgentArgs) -> anyhow::Result<()> {
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut cfg = DaemonConfig::new(a.data_dir, a.listen_addr, a.socket);
        cfg.advertise_addr = a.advertise_addr;
        cfg.hostname = a.hostname;
        let daemon = Daemon::start(cfg)
            .await
            .context("starting the shoal daemon")?;
        tracing::info!(socket = %daemon.socket().display(), "shoal agent ready");
        wait_for_signal().await?;
        tracing::info!("shutting down");
        daemon.shutdown().await;
        Ok(())
    })
}

/// Logs to stderr; under systemd (journald adds its own timestamps) without timestamps.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
