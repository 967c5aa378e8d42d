//! `PUT /snapshot/create` and `PUT /snapshot/load`, as Firecracker's, with
//! the backings a restored sandbox needs (its own drives, tap, vsock socket
//! and virtio-fs backend in place of its template's).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::SerialConfig;

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
    pub serial: Option<SerialConfig>,
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
