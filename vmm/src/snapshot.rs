//! Snapshot files: a JSON state file (format version, VMM version, the VM's
//! config, CPU template identity, vCPU/VM/device state) and a memory file
//! (guest RAM, byte for byte). Firecracker's /snapshot/create and
//! /snapshot/load are the model.
//!
//! Restoring maps the memory file private, so VMs restored from one file
//! share its unchanged pages. A state file is untrusted input: it is checked
//! against this VMM and host before any KVM call, and KVM validates the rest.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
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

/// What `/snapshot/load` asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub resume_vm: bool,
    /// Each restored VM needs its own hybrid-vsock socket.
    #[serde(default)]
    pub vsock_uds_path: Option<PathBuf>,
    /// Where the restored VM's console goes (default: as saved).
    #[serde(default)]
    pub serial: Option<crate::config::SerialConfig>,
    /// New backing files for drives of the snapshot (not the root drive):
    /// a template booted with placeholder drives gets each sandbox's images.
    /// The guest is told their capacity changed.
    #[serde(default)]
    pub drives: Vec<DriveBacking>,
    /// New taps for network interfaces of the snapshot: each restored
    /// sandbox has its own. The guest keeps its MAC (the agent sets one).
    #[serde(default)]
    pub network_interfaces: Vec<TapBacking>,
    /// Backends for virtio-fs devices of the snapshot (which had none when
    /// it was taken). Guest memory is then copied into memory a backend can
    /// map instead of mapped private from the memory file.
    #[serde(default)]
    pub filesystems: Vec<FsBacking>,
}

/// A virtio-fs device of a snapshot and the vhost-user backend it gets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsBacking {
    pub fs_id: String,
    #[serde(default)]
    pub socket_path: Option<PathBuf>,
    #[serde(default)]
    pub socket_fd: Option<i32>,
}

/// A network interface of a snapshot and the tap behind it after restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TapBacking {
    pub iface_id: String,
    /// A tap to open by name, or `tap_fd`, one this process inherited.
    #[serde(default)]
    pub host_dev_name: String,
    #[serde(default)]
    pub tap_fd: Option<i32>,
}

/// A drive of a snapshot and the file that backs it after the restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveBacking {
    pub drive_id: String,
    pub path_on_host: PathBuf,
}

/// What `/snapshot/create` asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
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
