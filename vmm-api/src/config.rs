//! The VM configuration: a JSON document whose sections and field names
//! follow Firecracker's, given whole (`--config-file`) or a resource at a
//! time through the API.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default)]
    pub boot_args: Option<String>,
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

/// Kernel arguments every husk guest needs: serial console, i8042 reboot so
/// the VMM exits, no PCI probing.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    /// Path of a custom CPU template (Firecracker's format).
    #[serde(default)]
    pub cpu_template: Option<PathBuf>,
    /// "auto" (detect), "none", or a built-in profile name.
    #[serde(default = "auto")]
    pub host_profile: String,
}

fn auto() -> String {
    "auto".to_string()
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            cpu_template: None,
            host_profile: auto(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    #[serde(default)]
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
}

/// `PATCH /drives/{drive_id}` on a running VM: another backing file for a
/// drive (Firecracker's `PartialDrive`, its path only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
}

/// virtio-net on a tap: one named (opened, or created with CAP_NET_ADMIN),
/// or an open tap file descriptor the VMM inherited (`tap_fd`), so a
/// launcher can create the tap and the tap lives exactly as long as its
/// holders.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub iface_id: String,
    #[serde(default)]
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<i32>,
    #[serde(default)]
    pub guest_mac: Option<String>,
}

impl NetConfig {
    /// An interface on a tap the VMM inherits as `fd`.
    pub fn inherited(iface_id: &str, fd: i32) -> NetConfig {
        NetConfig {
            iface_id: iface_id.into(),
            host_dev_name: String::new(),
            tap_fd: Some(fd),
            guest_mac: None,
        }
    }
}

/// virtio-vsock with Firecracker's hybrid vsock on `uds_path`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default)]
    pub vsock_id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {}

/// virtio-fs served by a vhost-user backend (virtiofsd), as Cloud
/// Hypervisor's `--fs`. The backend is a socket to connect to
/// (`socket_path`) or a connected one the VMM inherited (`socket_fd`).
/// With neither the device is there for the guest to find but has no
/// backend yet: a template VM's, given one when a snapshot is loaded.
/// A backend needs guest memory it can map, so a snapshot loaded with
/// one has its memory copied, not mapped private.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub fs_id: String,
    /// What the guest mounts: `mount -t virtiofs <tag> <dir>`.
    pub tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_fd: Option<i32>,
}

impl FsConfig {
    pub fn has_backend(&self) -> bool {
        self.socket_path.is_some() || self.socket_fd.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    #[default]
    Stdout,
    None,
    File(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default)]
    pub output: SerialOutput,
}

impl SerialConfig {
    /// Console output to `file`, or nowhere.
    pub fn to_file(file: Option<PathBuf>) -> SerialConfig {
        SerialConfig {
            output: file.map_or(SerialOutput::None, SerialOutput::File),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng (Firecracker calls it `entropy`); `{}` enables it.
    #[serde(default)]
    pub entropy: Option<EntropyConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<FsConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
}

impl VmConfig {
    /// Drives in the order the guest sees them: the root drive is /dev/vda.
    pub fn ordered_drives(&self) -> Vec<&Drive> {
        let mut d: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        d.extend(self.drives.iter().filter(|d| !d.is_root_device));
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_style_config_parses() {
        let c: VmConfig = serde_json::from_str(
            r#"{
              "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
              "drives": [
                {"drive_id": "data", "path_on_host": "/d", "is_root_device": false, "is_read_only": false},
                {"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}
              ]
            }"#,
        )
        .unwrap();
        assert_eq!(c.machine_config.host_profile, "auto");
        assert_eq!(c.ordered_drives()[0].drive_id, "rootfs");
        assert_eq!(c.serial.output, SerialOutput::Stdout);
    }

    #[test]
    fn serial_outputs_keep_their_wire_form() {
        let j = |s: SerialConfig| serde_json::to_string(&s).unwrap();
        assert_eq!(j(SerialConfig::to_file(None)), r#"{"output":"none"}"#);
        assert_eq!(
            j(SerialConfig::to_file(Some("/c".into()))),
            r#"{"output":{"file":"/c"}}"#
        );
    }

    #[test]
    fn an_inherited_tap_omits_what_it_does_not_use() {
        let n = serde_json::to_value(NetConfig::inherited("eth0", 5)).unwrap();
        assert_eq!(
            n,
            serde_json::json!({"iface_id": "eth0", "host_dev_name": "", "tap_fd": 5, "guest_mac": null})
        );
        // And it reads back under deny_unknown_fields.
        let back: NetConfig = serde_json::from_value(n).unwrap();
        assert_eq!(back.tap_fd, Some(5));
    }
}
