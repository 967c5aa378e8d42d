//! What a sandbox's VM is made of: its machine (vCPUs, memory, host
//! profile), the guest kernel's arguments, the fixed drive slots images and
//! volumes fill, husk-vmm's configuration, and the jail it runs in.

use std::path::{Path, PathBuf};

use crate::sandbox::{Result, SandboxError};
use husk_vmm_api::{
    BootSource, Drive, EntropyConfig, FsConfig, MachineConfig, NetConfig, SerialConfig, VmConfig,
    VsockConfig,
};
use serde::{Deserialize, Serialize};

use crate::config::Runtime;
use crate::vmm::jail::{JailSpec, Share};

/// Read-only drive slots (container images) every guest has: vdb..vde.
pub const RO_SLOTS: usize = 4;
/// Read-write drive slots (volumes): vdf, vdg.
pub const RW_SLOTS: usize = 2;
/// Kernel arguments of every husk guest: the agent as init, root on the
/// read-only erofs guest image. Quiet: console output is emulated I/O.
pub const BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off rootfstype=erofs init=/sbin/husk-agent quiet";

/// Every guest has one NIC (eth0 in the guest); the sandbox's tap backs
/// it after a restore.
pub const NET_IFACE: &str = "eth0";

/// The machine a sandbox gets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Machine {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// husk-vmm's host profile: "auto", "none" or a profile name.
    pub host_profile: String,
    /// A custom CPU template file, if any.
    pub cpu_template: Option<PathBuf>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            vcpus: 1,
            mem_mib: 256,
            host_profile: "auto".into(),
            cpu_template: None,
        }
    }
}

/// A drive a sandbox gets: a container image (read-only) or a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The drive id of slot `i` of a kind.
pub fn slot_id(read_only: bool, i: usize) -> String {
    format!("{}{i}", if read_only { "ro" } else { "rw" })
}

/// The guest device of slot `i` of a kind: slots follow the root drive
/// (vda), read-only ones first.
pub fn slot_device(read_only: bool, i: usize) -> String {
    let n = if read_only { i } else { RO_SLOTS + i };
    format!("/dev/vd{}", (b'b' + n as u8) as char)
}

/// husk-vmm's configuration for a guest with `slots` backing the drive
/// slots in order (read-only, then read-write).
pub(crate) fn vm_config(
    rt: &Runtime,
    machine: &Machine,
    slots: &[PathBuf],
    vsock: &Path,
    console: Option<&Path>,
    tap_fd: i32,
    fs_fd: Option<i32>,
) -> VmConfig {
    let mut drives = vec![Drive {
        drive_id: "rootfs".into(),
        path_on_host: rt.guest_image.clone(),
        is_root_device: true,
        is_read_only: true,
    }];
    for (i, path) in slots.iter().enumerate() {
        let ro = i < RO_SLOTS;
        let n = if ro { i } else { i - RO_SLOTS };
        drives.push(Drive {
            drive_id: slot_id(ro, n),
            path_on_host: path.clone(),
            is_root_device: false,
            is_read_only: ro,
        });
    }
    VmConfig {
        boot_source: BootSource {
            kernel_image_path: rt.kernel.clone(),
            boot_args: Some(BOOT_ARGS.into()),
            initrd_path: None,
        },
        machine_config: MachineConfig {
            vcpu_count: machine.vcpus,
            mem_size_mib: machine.mem_mib,
            cpu_template: machine.cpu_template.clone(),
            host_profile: machine.host_profile.clone(),
        },
        drives,
        network_interfaces: vec![NetConfig::inherited(NET_IFACE, tap_fd)],
        vsock: Some(VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: vsock.into(),
        }),
        entropy: Some(EntropyConfig {}),
        // Always there (a template's guest probes it); a backend only when
        // the sandbox shares host paths.
        filesystems: vec![FsConfig {
            fs_id: crate::storage::shared::FS_ID.into(),
            tag: crate::storage::shared::FS_TAG.into(),
            socket_path: None,
            socket_fd: fs_fd,
        }],
        serial: SerialConfig::to_file(console.map(Path::to_path_buf)),
    }
}

/// Assigns drives to slots: (slot paths for all slots, guest device of each
/// drive).
pub(crate) fn assign_slots(
    drives: &[DriveSpec],
    placeholder: &Path,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut slots = vec![placeholder.to_path_buf(); RO_SLOTS + RW_SLOTS];
    let (mut ro, mut rw) = (0, 0);
    let mut devices = Vec::new();
    for d in drives {
        let (n, limit, base) = if d.read_only {
            (&mut ro, RO_SLOTS, 0)
        } else {
            (&mut rw, RW_SLOTS, RO_SLOTS)
        };
        if *n == limit {
            return Err(SandboxError::Drives(format!(
                "more than {limit} {} drives: a sandbox has {RO_SLOTS} read-only and {RW_SLOTS} read-write drive slots",
                if d.read_only { "read-only" } else { "read-write" }
            )));
        }
        if !d.path.is_file() {
            return Err(SandboxError::Drives(format!(
                "drive {}: not a file",
                d.path.display()
            )));
        }
        slots[base + *n] = d.path.clone();
        devices.push(slot_device(d.read_only, *n));
        *n += 1;
    }
    Ok((slots, devices))
}

/// What a VMM's jail shows of a sandbox's drives.
pub(crate) fn drive_shares(drives: &[DriveSpec]) -> Vec<Share> {
    drives
        .iter()
        .map(|d| Share {
            path: d.path.clone(),
            writable: !d.read_only,
        })
        .collect()
}

impl Runtime {
    /// The jail for a VMM whose sockets and files live in `dir`: `dir`
    /// (writable), the kernel, guest image and CPU template (read-only)
    /// and `shares`; None when confinement is off.
    pub(crate) fn jail_for(
        &self,
        dir: &Path,
        cgroup: &str,
        mut shares: Vec<Share>,
        machine: &Machine,
    ) -> Option<JailSpec> {
        if !self.confine {
            return None;
        }
        shares.insert(0, Share::rw(dir));
        // Executed inside the jail: its own binary, at its host path.
        shares.push(Share::ro(&self.vmm));
        shares.push(Share::ro(&self.kernel));
        shares.push(Share::ro(&self.guest_image));
        if let Some(t) = &machine.cpu_template {
            shares.push(Share::ro(t));
        }
        Some(JailSpec {
            root: dir.join("jail"),
            shares,
            cgroup: cgroup.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_guest_devices() {
        assert_eq!(slot_device(true, 0), "/dev/vdb");
        assert_eq!(slot_device(true, RO_SLOTS - 1), "/dev/vde");
        assert_eq!(slot_device(false, 0), "/dev/vdf");
        assert_eq!(slot_id(false, 1), "rw1");
    }

    #[test]
    fn the_virtio_fs_device_is_always_there_and_backed_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let rt = crate::sandbox::template::tests::rt(d.path());
        let m = Machine::default();
        let v = Path::new("/v.sock");
        let json = |c: VmConfig| serde_json::to_value(c).unwrap()["filesystems"].clone();
        let plain = vm_config(&rt, &m, &[], v, None, 5, None);
        assert_eq!(
            json(plain),
            serde_json::json!([{"fs_id": "shared", "tag": "husk-shared"}])
        );
        let backed = vm_config(&rt, &m, &[], v, None, 5, Some(7));
        assert_eq!(
            json(backed),
            serde_json::json!([{"fs_id": "shared", "tag": "husk-shared", "socket_fd": 7}])
        );
    }

    #[test]
    fn drives_fill_slots_in_order() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, v) = (d.path().join("a"), d.path().join("b"), d.path().join("v"));
        for p in [&a, &b, &v] {
            std::fs::write(p, "").unwrap();
        }
        let ph = d.path().join("empty");
        let ro = |p: &Path| DriveSpec {
            path: p.into(),
            read_only: true,
        };
        let drives = vec![
            ro(&a),
            DriveSpec {
                path: v.clone(),
                read_only: false,
            },
            ro(&b),
        ];
        let (slots, devices) = assign_slots(&drives, &ph).unwrap();
        assert_eq!(devices, ["/dev/vdb", "/dev/vdf", "/dev/vdc"]);
        assert_eq!(slots[0], a);
        assert_eq!(slots[1], b);
        assert_eq!(slots[2], ph);
        assert_eq!(slots[RO_SLOTS], v);
        let too_many = vec![ro(&a); RO_SLOTS + 1];
        let e = assign_slots(&too_many, &ph).unwrap_err().to_string();
        assert!(e.contains("more than 4 read-only drives"), "{e}");
        let e = assign_slots(&[ro(&d.path().join("nope"))], &ph).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
