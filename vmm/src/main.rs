//! husk-vmm: runs one microVM from a config file until the guest stops.
//!
//! Exit status: 0 when the guest reset (a `reboot=k` guest's reboot or
//! poweroff), 2 when it triple-faulted, 3 when KVM could not run it (both with
//! the vCPU registers in the log), 1 on a VMM error such as a bad config,
//! which is reported before any KVM call.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use husk_vmm::builder;
use husk_vmm::config::VmConfig;

#[derive(Parser)]
#[command(version, about = "husk's KVM microVM monitor")]
struct Args {
    /// VM configuration (JSON, Firecracker-style sections).
    #[arg(long)]
    config_file: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let run = || -> anyhow::Result<u8> {
        let config = VmConfig::from_file(&args.config_file)?;
        let vmm = builder::build(&config)?;
        Ok(vmm.run()? as u8)
    };
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
