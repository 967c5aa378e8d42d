//! husk-vmm: runs one microVM, from a config file, the API socket, or both.
//!
//! Exit status: 0 when the guest reset (a `reboot=k` guest's reboot or
//! poweroff), 2 when it triple-faulted, 3 when KVM could not run it (both with
//! the vCPU registers in the log), 1 on a VMM error such as a bad config,
//! which is reported before any KVM call.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use husk_vmm::api::{self, Controller};
use husk_vmm::seccomp;
use husk_vmm::vstate::vcpu::install_kick_handler;

#[derive(Parser)]
#[command(version, about = "husk's KVM microVM monitor")]
struct Args {
    /// VM configuration (JSON, Firecracker-style sections); boots at once.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Serve the HTTP API on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

fn main() -> ExitCode {
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let env = tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(env.and(husk_vmm::logging::RateLimit::new())),
        )
        .init();
    let args = Args::parse();
    let run = || -> anyhow::Result<u8> {
        if args.config_file.is_none() && args.api_sock.is_none() {
            bail!("nothing to run: give --config-file, --api-sock, or both");
        }
        install_kick_handler().context("installing the vCPU kick handler")?;
        if args.no_seccomp {
            tracing::warn!("seccomp filtering is off (--no-seccomp)");
        } else {
            seccomp::install_sigsys_handler().context("installing the SIGSYS handler")?;
            seccomp::ENABLED.store(true, std::sync::atomic::Ordering::SeqCst);
            seccomp::confine(seccomp::ThreadKind::Vmm).map_err(anyhow::Error::msg)?;
        }
        let ctl = Arc::new(Controller::default());
        if let Some(p) = &args.config_file {
            let config = husk_vmm::config::from_file(p)?;
            ctl.set_config(config);
        }
        if let Some(sock) = &args.api_sock {
            api::serve(sock, ctl.clone())
                .with_context(|| format!("API socket {}", sock.display()))?;
            tracing::info!("API on {}", sock.display());
        }
        if args.config_file.is_some() {
            ctl.start().map_err(anyhow::Error::msg)?;
        }
        let vm = ctl.wait_started();
        let reason = vm.wait();
        if let Some(sock) = &args.api_sock {
            let _ = std::fs::remove_file(sock);
        }
        Ok(reason as u8)
    };
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
