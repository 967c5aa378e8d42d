//! The VM configuration's checks. Its types (Firecracker's sections and
//! field names, plus husk's `host_profile` and `serial`) are husk-vmm-api's,
//! shared with the runtime that writes them; what needs this VMM's limits
//! (vCPUs, interrupt lines, tag length) and the host's files is checked here.

pub use husk_vmm_api::config::*;
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

/// A configuration from JSON, checked.
pub fn from_json(json: &str) -> Result<VmConfig, ConfigError> {
    let c: VmConfig = serde_json::from_str(json)?;
    c.validate()?;
    Ok(c)
}

/// A configuration file (`--config-file`), checked.
pub fn from_file(path: &std::path::Path) -> Result<VmConfig, ConfigError> {
    let json = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    from_json(&json)
}

/// The checks of a configuration this VMM can build.
pub trait Checked {
    /// Limits and consistency: counts, ids, fds, interrupt lines.
    fn validate(&self) -> Result<(), ConfigError>;
    /// Every file the VM needs can be opened, so a bad path fails before
    /// any KVM call.
    fn check_files(&self) -> Result<(), ConfigError>;
}

impl Checked for VmConfig {
    fn validate(&self) -> Result<(), ConfigError> {
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

    fn check_files(&self) -> Result<(), ConfigError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        from_json(&json("")).unwrap();
        let e = from_json(&json(r#", "entropy": {}"#)).unwrap_err();
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
            let e = from_json(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
