//! Reaching husk-vmm and its guests from tests.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::repo_root;

/// A binary of this workspace: `$env`, or the one cargo built
/// (`cargo test --workspace` builds each for its crate's own tests).
pub(crate) fn workspace_binary(name: &str, package: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    for profile in ["debug", "release"] {
        let p = repo_root().join("target").join(profile).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not built (cargo build -p {package}, or set {env})")
}

/// The husk-vmm binary (`HUSK_VMM` overrides).
pub fn husk_vmm_binary() -> Result<PathBuf> {
    workspace_binary("husk-vmm", "husk-vmm", "HUSK_VMM")
}

/// The husk CLI (`HUSK_CLI` overrides).
pub fn husk_cli_binary() -> Result<PathBuf> {
    workspace_binary("husk", "husk-cli", "HUSK_CLI")
}

/// containerd-shim-husk-v2 (`HUSK_SHIM` overrides).
pub fn husk_shim_binary() -> Result<PathBuf> {
    workspace_binary("containerd-shim-husk-v2", "husk-shim", "HUSK_SHIM")
}

/// The husk-agent binary (`HUSK_AGENT` overrides), for running the agent on
/// the host.
pub fn husk_agent_binary() -> Result<PathBuf> {
    workspace_binary("husk-agent", "husk-agent", "HUSK_AGENT")
}

pub use husk_runtime::vmm::{vsock_connect, VmmClient};
