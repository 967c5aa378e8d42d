//! huskd: the cluster daemon. Every host of a husk cluster runs one; the
//! local `husk` CLI drives it over its control socket (`husk cluster
//! init|join`, `husk node ...`, `husk service ...`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use husk_orchestrator::node::{Config, Daemon};
use husk_orchestrator::roles;
use husk_runtime::Boot;

#[derive(Parser)]
#[command(
    name = "huskd",
    version,
    about = "husk's cluster daemon: manager and node of a Swarm-style cluster of microVM sandboxes"
)]
struct Args {
    /// Where this node keeps its identity, certificates and task logs.
    #[arg(long, default_value = "/var/lib/huskd")]
    state_dir: PathBuf,
    /// The control socket the husk CLI talks to (HUSK_HOST for the CLI).
    #[arg(long, default_value = "/run/husk/huskd.sock")]
    socket: PathBuf,
    /// Where the cluster endpoint listens (managers).
    #[arg(long, default_value = "0.0.0.0:4377")]
    listen_addr: std::net::SocketAddr,
    /// host:port other nodes reach this one at (default: --listen-addr).
    #[arg(long)]
    advertise_addr: Option<String>,
    /// etcd endpoints for `cluster init` (comma-separated URLs).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long)]
    hostname: Option<String>,
    /// How its tasks' sandboxes start: `parked` restores a template with
    /// the container already created (built by the first task of the same
    /// image and spec), `template` creates it in each task's restored VM,
    /// `cold` boots the guest kernel.
    #[arg(long, default_value = "parked", value_parser = parse_boot)]
    boot: Boot,
}

fn parse_boot(s: &str) -> std::result::Result<Boot, String> {
    s.parse()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn main() -> Result<()> {
    // huskd run as a task's log copier (it outlives this huskd).
    if let Some(code) = husk_runtime::container::logcopy::run_if_asked() {
        std::process::exit(code);
    }
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(daemon())
}

async fn daemon() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSKD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = Args::parse();
    if a.advertise_addr.is_none() && a.listen_addr.ip().is_unspecified() {
        tracing::warn!("--listen-addr {} is unspecified: pass --advertise-addr so other nodes can reach this one", a.listen_addr);
    }
    let daemon = Daemon::new(
        Config {
            state_dir: a.state_dir,
            socket: a.socket,
            listen: a.listen_addr,
            advertise: a.advertise_addr,
            etcd: a.etcd,
            hostname: a.hostname.unwrap_or_else(hostname),
            boot: a.boot,
        },
        Box::new(roles::Huskd),
    )?;
    husk_orchestrator::api::serve_local(daemon.clone()).await?;
    daemon
        .start_roles()
        .await
        .context("resuming this node's roles")?;
    tracing::info!("huskd ready on {}", daemon.cfg.socket.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("huskd stopping");
    Ok(())
}
