//! Snapshot files: a JSON state file (format version, VMM version, the VM's
//! config, CPU template identity, vCPU/VM/device state) and a memory file
//! (guest RAM, byte for byte). Firecracker's /snapshot/create and
//! /snapshot/load are the model.
//!
//! Restoring maps the memory file private, so VMs restored from one file
//! share its unchanged pages. A state file is untrusted input: it is checked
//! against this VMM and host before any KVM call, and KVM validates the rest.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use husk_vmm_api::snapshot::{CreateRequest, DriveBacking, FsBacking, LoadRequest, TapBacking};

use crate::config::{Checked, VmConfig};
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::state::{VcpuState, VmState};

pub const MAGIC: &str = "husk-vmm-snapshot";
/// Bumped on any change to what a state file holds.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state file read (a few vCPUs' XSAVE areas and MSRs are ~100 KiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub magic: String,
    pub format_version: u32,
    pub vmm_version: String,
    /// Which host profile and CPU template shaped the vCPUs: restoring under
    /// another would hand the guest CPU features it was not booted with.
    pub cpu_identity: String,
    pub config: VmConfig,
    pub mem_size: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<TransportState>,
    pub serial: SerialSnapshot,
}

impl Snapshot {
    /// Writes the state file (atomically: a reader never sees half of one).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec(self).context("encoding the snapshot state")?;
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads and checks a state file: magic, format and VMM version, and
    /// that its parts agree with its own config.
    pub fn read(path: &Path) -> Result<Snapshot> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("snapshot {}", path.display()))?
            .len();
        if len > MAX_STATE_BYTES {
            bail!(
                "snapshot {}: {len} bytes is not a state file",
                path.display()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("snapshot {}", path.display()))?;
        // The header first, so another version's file gets a version error
        // rather than a field error.
        #[derive(Deserialize)]
        struct Header {
            magic: String,
            format_version: u32,
            vmm_version: String,
        }
        let h: Header = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "snapshot {}: not a husk-vmm state file (truncated or corrupt)",
                path.display()
            )
        })?;
        if h.magic != MAGIC {
            bail!("snapshot {}: not a husk-vmm state file", path.display());
        }
        if h.format_version != FORMAT_VERSION || h.vmm_version != env!("CARGO_PKG_VERSION") {
            bail!(
                "snapshot {} was written by husk-vmm {} (format {}); this is husk-vmm {} (format {})",
                path.display(),
                h.vmm_version,
                h.format_version,
                env!("CARGO_PKG_VERSION"),
                FORMAT_VERSION
            );
        }
        let s: Snapshot = serde_json::from_slice(&bytes)
            .with_context(|| format!("snapshot {}: corrupt state", path.display()))?;
        s.config.validate()?;
        let m = &s.config.machine_config;
        if s.vcpus.len() != usize::from(m.vcpu_count) {
            bail!(
                "snapshot {}: {} vCPU states for a {}-vCPU machine",
                path.display(),
                s.vcpus.len(),
                m.vcpu_count
            );
        }
        if s.mem_size != m.mem_size_mib << 20 {
            bail!(
                "snapshot {}: memory size disagrees with its config",
                path.display()
            );
        }
        Ok(s)
    }
}
