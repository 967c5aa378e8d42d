//! The VM configuration: a JSON file whose sections and field names follow
//! Firecracker's (`boot-source`, `machine-config`, `drives`, ...), so a
//! Firecracker user can read it, plus husk's `host_profile` and `serial`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::layout::{IRQ_BASE, IRQ_MAX};
use crate::arch::mptable::MAX_VCPUS;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("config: {0}")]
    Invalid(String),
}

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

/// Fails on the first id that appears twice.
fn unique<'a>(what: &str, ids: impl Iterator<Item = &'a str>) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(ConfigError::Invalid(format!("duplicate {what} {id:?}")));
        }
    }
    Ok(())
}

impl VmConfig {
    pub fn from_json(json: &str) -> Result<VmConfig, ConfigError> {
        let c: VmConfig = serde_json::from_str(json)?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_file(path: &std::path::Path) -> Result<VmConfig, ConfigError> {
        let json = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&json)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine_config;
        if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "vcpu_count {} out of range 1..={MAX_VCPUS}",
                m.vcpu_count
            )));
        }
        // Below 16 MiB a kernel cannot boot; the top is what 64-bit mmap and
        // KVM slots can hold comfortably.
        if m.mem_size_mib < 16 || m.mem_size_mib > 1 << 20 {
            return Err(ConfigError::Invalid(format!(
                "mem_size_mib {} out of range 16..={}",
                m.mem_size_mib,
                1 << 20
            )));
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err(ConfigError::Invalid("more than one root drive".into()));
        }
        unique("drive_id", self.drives.iter().map(|d| d.drive_id.as_str()))?;
        for n in &self.network_interfaces {
            match (n.host_dev_name.is_empty(), n.tap_fd) {
                (true, None) | (false, Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "interface {:?}: give one of host_dev_name and tap_fd",
                        n.iface_id
                    )))
                }
                (true, Some(fd)) if fd < 3 => {
                    return Err(ConfigError::Invalid(format!(
                        "interface {:?}: tap_fd {fd} is stdio, not a tap",
                        n.iface_id
                    )))
                }
                _ => {}
            }
            if let Some(m) = &n.guest_mac {
                crate::devices::virtio::net::parse_mac(m).map_err(|e| {
                    ConfigError::Invalid(format!("interface {:?}: {e}", n.iface_id))
                })?;
            }
        }
        unique(
            "iface_id",
            self.network_interfaces.iter().map(|n| n.iface_id.as_str()),
        )?;
        for f in &self.filesystems {
            if f.tag.is_empty() || f.tag.len() > crate::devices::virtio::fs::TAG_LEN {
                return Err(ConfigError::Invalid(format!(
                    "filesystem {:?}: tag {:?} must be 1 to {} bytes",
                    f.fs_id,
                    f.tag,
                    crate::devices::virtio::fs::TAG_LEN
                )));
            }
            match (&f.socket_path, f.socket_fd) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "filesystem {:?}: give at most one of socket_path and socket_fd",
                        f.fs_id
                    )))
                }
                (None, Some(fd)) if fd < 3 => {
                    return Err(ConfigError::Invalid(format!(
                        "filesystem {:?}: socket_fd {fd} is stdio, not a socket",
                        f.fs_id
                    )))
                }
                _ => {}
            }
        }
        unique("fs_id", self.filesystems.iter().map(|f| f.fs_id.as_str()))?;
        unique("tag", self.filesystems.iter().map(|f| f.tag.as_str()))?;
        // An inherited fd is adopted (owned) once, whatever it is for.
        let fds: Vec<String> = self
            .network_interfaces
            .iter()
            .filter_map(|n| n.tap_fd)
            .chain(self.filesystems.iter().filter_map(|f| f.socket_fd))
            .map(|f| f.to_string())
            .collect();
        unique("inherited fd", fds.iter().map(String::as_str))?;
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::Invalid(format!(
                    "vsock guest_cid {} out of range 3..={}",
                    v.guest_cid,
                    u32::MAX
                )));
            }
        }
        // Every virtio device takes one interrupt line; say so before any KVM
        // call rather than when the builder runs out.
        let lines = (IRQ_MAX - IRQ_BASE + 1) as usize;
        let devices = self.drives.len()
            + self.network_interfaces.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy.is_some())
            + self.filesystems.len();
        if devices > lines {
            return Err(ConfigError::Invalid(format!(
                "{devices} virtio devices (drives, interfaces, vsock, entropy, filesystems); at most {lines}"
            )));
        }
        Ok(())
    }

    /// Checks that every file the VM needs can be opened, so a bad path fails
    /// before any KVM call.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let readable = |what: &str, p: &std::path::Path| -> Result<(), ConfigError> {
            std::fs::File::open(p)
                .map(|_| ())
                .map_err(|e| ConfigError::Invalid(format!("{what} {}: {e}", p.display())))
        };
        readable("kernel_image_path", &self.boot_source.kernel_image_path)?;
        if let Some(i) = &self.boot_source.initrd_path {
            readable("initrd_path", i)?;
        }
        for d in &self.drives {
            readable(
                &format!("drive {:?} path_on_host", d.drive_id),
                &d.path_on_host,
            )?;
        }
        Ok(())
    }

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
        let c = VmConfig::from_json(
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
    fn more_devices_than_interrupt_lines_is_refused() {
        let drives: Vec<String> = (0..19)
            .map(|i| format!(r#"{{"drive_id": "d{i}", "path_on_host": "/d"}}"#))
            .collect();
        let json = |extra: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "drives": [{}]{extra}}}"#,
                drives.join(",")
            )
        };
        // 19 lines (IRQ 5 to 23): 19 drives fit, one more device does not.
        VmConfig::from_json(&json("")).unwrap();
        let e = VmConfig::from_json(&json(r#", "entropy": {}"#)).unwrap_err();
        assert!(e.to_string().contains("20 virtio devices"), "{e}");
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            (r#"{"boot-source": {}}"#, "kernel_image_path"),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#,
                "vcpu_count 0",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 1}}"#,
                "mem_size_mib 1",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "bogus": 1}"#,
                "bogus",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [
                    {"drive_id": "a", "path_on_host": "/a"}, {"drive_id": "a", "path_on_host": "/b"}]}"#,
                "duplicate drive_id",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [
                    {"iface_id": "eth0"}]}"#,
                "give one of host_dev_name and tap_fd",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [
                    {"iface_id": "eth0", "host_dev_name": "t0", "tap_fd": 5}]}"#,
                "give one of host_dev_name and tap_fd",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [
                    {"iface_id": "eth0", "tap_fd": 1}]}"#,
                "is stdio",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [
                    {"iface_id": "a", "tap_fd": 5}, {"iface_id": "b", "tap_fd": 5}]}"#,
                "duplicate inherited fd",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [
                    {"iface_id": "a", "tap_fd": 5}], "filesystems": [
                    {"fs_id": "f", "tag": "t", "socket_fd": 5}]}"#,
                "duplicate inherited fd",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "filesystems": [
                    {"fs_id": "f", "tag": "0123456789012345678901234567890123456"}]}"#,
                "must be 1 to 36 bytes",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "filesystems": [
                    {"fs_id": "f", "tag": "a", "socket_fd": 7, "socket_path": "/s"}]}"#,
                "at most one of socket_path and socket_fd",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "/k"}, "filesystems": [
                    {"fs_id": "f", "tag": "a"}, {"fs_id": "g", "tag": "a"}]}"#,
                "duplicate tag",
            ),
        ];
        for (json, want) in cases {
            let e = VmConfig::from_json(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
