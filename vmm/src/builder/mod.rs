//! Builds a microVM from a [`VmConfig`] and runs it: memory, kernel, command
//! line, devices, boot structures, vCPUs (Firecracker's builder is the model).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

use crate::config::{Checked, MachineConfig, VmConfig};
use crate::cpu_template::{CpuTemplate, HostProfile};
use crate::devices::bus::Bus;
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::GuestMemoryMmap;
use crate::snapshot::{LoadRequest, Snapshot};
use crate::vstate::memory;
use crate::vstate::state;
use crate::vstate::vcpu::{Stopper, Vcpu};
use crate::vstate::vm::Vm;

mod boot;
mod devices;
mod running;

use boot::{configure_system_for_boot, kernel_cmdline, load_initrd, load_kernel, LoadedKernel};
use devices::{attach_legacy_devices, attach_virtio_devices};
pub use running::RunningVm;

/// The host profile the config asks for, with the reason it applies.
pub fn resolve_host_profile(name: &str) -> Result<Option<(HostProfile, String)>> {
    match name {
        "none" => Ok(None),
        "auto" => Ok(HostProfile::detect(Path::new("/sys/module"))?),
        n => Ok(Some((
            HostProfile::built_in(n)?,
            "chosen in the config".into(),
        ))),
    }
}

/// A built microVM, ready to run.
pub struct Vmm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stopper: Arc<Stopper>,
    // Devices and memory live as long as the VM.
    mem: GuestMemoryMmap,
    _mem_file: File,
    serial: Arc<Mutex<SerialDevice>>,
    /// Devices with host-side event sources: (fd to wait on, transport).
    event_loops: Vec<(&'static str, std::os::fd::RawFd, Arc<Mutex<MmioTransport>>)>,
    /// Every virtio queue's notification (ioeventfds).
    notifiers: Vec<devices::QueueEvent>,
    /// Every virtio transport, in bus order (snapshots).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    config: VmConfig,
    cpu_identity: String,
}

/// Builds a VM that boots `config`'s kernel.
pub fn build(config: &VmConfig) -> Result<Vmm> {
    build_vm(config, None)
}

/// Builds a VM from a snapshot: the same machine, its memory mapped private
/// from the memory file, every vCPU, interrupt controller and device back in
/// the state it was saved in. Run it to resume the guest.
pub fn restore(req: &LoadRequest) -> Result<Vmm> {
    let snap = Snapshot::read(&req.snapshot_path)?;
    let mut config = snap.config.clone();
    if let (Some(v), Some(path)) = (config.vsock.as_mut(), &req.vsock_uds_path) {
        v.uds_path = path.clone();
    }
    if let Some(s) = &req.serial {
        config.serial = s.clone();
    }
    let mut changed = Vec::new();
    for b in &req.drives {
        let Some(d) = config.drives.iter_mut().find(|d| d.drive_id == b.drive_id) else {
            bail!("the snapshot has no drive {:?}", b.drive_id);
        };
        if d.is_root_device {
            bail!(
                "drive {:?} is the root device: its image is part of the snapshot",
                b.drive_id
            );
        }
        d.path_on_host = b.path_on_host.clone();
        changed.push(b.drive_id.clone());
    }
    for t in &req.network_interfaces {
        let Some(n) = config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == t.iface_id)
        else {
            bail!("the snapshot has no network interface {:?}", t.iface_id);
        };
        n.host_dev_name = t.host_dev_name.clone();
        n.tap_fd = t.tap_fd;
    }
    for b in &req.filesystems {
        let Some(f) = config.filesystems.iter_mut().find(|f| f.fs_id == b.fs_id) else {
            bail!("the snapshot has no filesystem {:?}", b.fs_id);
        };
        f.socket_path = b.socket_path.clone();
        f.socket_fd = b.socket_fd;
        if !f.has_backend() {
            bail!("filesystem {:?}: give socket_path or socket_fd", b.fs_id);
        }
    }
    // A snapshot's inherited fd meant something only to the process that
    // took it.
    if let Some(n) = config.network_interfaces.iter().find(|n| {
        n.tap_fd.is_some()
            && !req
                .network_interfaces
                .iter()
                .any(|t| t.iface_id == n.iface_id)
    }) {
        bail!(
            "network interface {:?} had an inherited tap (fd {}) when the snapshot was taken: name its tap in the load request",
            n.iface_id,
            n.tap_fd.unwrap_or_default()
        );
    }
    config.validate()?;
    let vmm = build_vm(&config, Some((&snap, &req.mem_file_path)))?;
    // Drives are the first transports, in the order the guest found them.
    for (i, d) in config.ordered_drives().iter().enumerate() {
        if changed.contains(&d.drive_id) {
            vmm.transports[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_changed();
        }
    }
    Ok(vmm)
}

/// Names the CPU a guest sees: the host profile and template in effect.
fn cpu_identity(profile: &str, kernel_args: &[String], template: &CpuTemplate) -> String {
    format!(
        "profile={profile} args=[{}] template={template:?}",
        kernel_args.join(" ")
    )
}

/// A VM from `config`, in Firecracker's steps: the vCPUs' CPU template,
/// guest memory (new, or the snapshot's), the VM with its memory and kernel,
/// the command line, legacy devices, virtio devices; then either the
/// snapshot's state or the boot setup.
fn build_vm(config: &VmConfig, from: Option<(&Snapshot, &Path)>) -> Result<Vmm> {
    config.validate()?;
    config.check_files()?;
    let cpu = resolve_cpu_template(&config.machine_config)?;
    if let Some((snap, _)) = from {
        if snap.cpu_identity != cpu.identity {
            bail!(
                "the snapshot's vCPUs were made with another CPU template or host profile \
                 ({}); this host resolves {}",
                snap.cpu_identity,
                cpu.identity
            );
        }
    }
    let (mem, mem_file) = create_memory(config, from)?;
    let (vm, kernel) = create_vm_and_load_kernel(&mem, config, from.is_none())?;
    let initrd = match (&config.boot_source.initrd_path, &kernel) {
        (Some(p), Some(k)) => Some(load_initrd(&mem, p, k.result.kernel_end)?),
        _ => None,
    };
    let mut cmdline = kernel_cmdline(config, &cpu.kernel_args)?;
    let stopper = Arc::new(Stopper::new()?);
    let (pio, serial) = attach_legacy_devices(&vm, config, from.map(|f| f.0), &stopper)?;
    let devices = attach_virtio_devices(&vm, &mem, config, &mut cmdline)?;
    let mut vmm = Vmm {
        vm,
        vcpus: Vec::new(),
        pio: Arc::new(pio),
        mmio: Arc::new(devices.bus),
        stopper,
        mem,
        _mem_file: mem_file,
        serial,
        event_loops: devices.event_loops,
        notifiers: devices.notifiers,
        transports: devices.transports,
        config: config.clone(),
        cpu_identity: cpu.identity.clone(),
    };
    match from {
        Some((snap, _)) => restore_into(&mut vmm, snap)?,
        None => {
            let kernel = kernel.context("no kernel loaded")?;
            configure_system_for_boot(&mut vmm, &kernel, initrd, &cmdline, &cpu.template)?;
        }
    }
    Ok(vmm)
}

/// What shapes the vCPUs: the host profile's kernel args and CPUID
/// modifiers, a custom template's on top, and their identity (a snapshot
/// restores only under the same).
struct CpuSetup {
    template: CpuTemplate,
    kernel_args: Vec<String>,
    identity: String,
}

fn resolve_cpu_template(m: &MachineConfig) -> Result<CpuSetup> {
    let mut template = CpuTemplate::default();
    let mut kernel_args: Vec<String> = Vec::new();
    let mut profile_name = String::from("none");
    match resolve_host_profile(&m.host_profile)? {
        Some((p, why)) => {
            profile_name = p.name.clone();
            tracing::info!(
                "host profile {} ({why}): kernel args [{}], {} CPUID modifiers",
                p.name,
                p.kernel_args.join(" "),
                p.cpu_template.cpuid_modifiers.len()
            );
            kernel_args = p.kernel_args.clone();
            template = p.cpu_template.clone();
        }
        None => tracing::info!("host profile: none"),
    }
    if let Some(path) = &m.cpu_template {
        let custom = CpuTemplate::from_file(path)?;
        template.cpuid_modifiers.extend(custom.cpuid_modifiers);
        template.msr_modifiers.extend(custom.msr_modifiers);
    }
    let identity = cpu_identity(&profile_name, &kernel_args, &template);
    Ok(CpuSetup {
        template,
        kernel_args,
        identity,
    })
}

/// Guest memory: new, or the snapshot's memory file mapped.
fn create_memory(
    config: &VmConfig,
    from: Option<(&Snapshot, &Path)>,
) -> Result<(GuestMemoryMmap, File)> {
    Ok(match from {
        None => memory::create(config.machine_config.mem_size_mib << 20)?,
        // A vhost-user backend maps guest memory itself: it must be shared
        // memory, not a private copy-on-write mapping of the file.
        Some((snap, mem_path)) if config.filesystems.iter().any(|f| f.has_backend()) => {
            memory::restore_copy(mem_path, snap.mem_size)?
        }
        Some((snap, mem_path)) => memory::restore(mem_path, snap.mem_size)?,
    })
}

/// The VM with `mem` registered and, to boot, the kernel loaded into it.
fn create_vm_and_load_kernel(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    boot: bool,
) -> Result<(Vm, Option<LoadedKernel>)> {
    let vm = Vm::new()?;
    // Registering the memory slot and loading the kernel are independent and
    // each take ~10 ms here (KVM_SET_USER_MEMORY_REGION, reading vmlinux):
    // overlap them. A restored guest's kernel is in its memory already.
    let (registered, kernel) = std::thread::scope(|scope| {
        let reg = scope.spawn(|| vm.register_memory(mem));
        let kernel = boot.then(|| load_kernel(mem, &config.boot_source.kernel_image_path));
        let registered = reg
            .join()
            .unwrap_or(Err(crate::vstate::vm::VmError::Thread));
        (registered, kernel)
    });
    registered?;
    Ok((vm, kernel.transpose()?))
}

/// The rest of a restore, once memory, buses and devices exist: VM state,
/// vCPU state, device state.
fn restore_into(vmm: &mut Vmm, snap: &Snapshot) -> Result<()> {
    if snap.devices.len() != vmm.transports.len() {
        bail!(
            "the snapshot has {} virtio devices; its config builds {}",
            snap.devices.len(),
            vmm.transports.len()
        );
    }
    snap.vm.restore(&vmm.vm.fd).context("restoring VM state")?;
    let msr_list = Arc::new(state::msr_indices(&vmm.vm.kvm)?);
    for (i, s) in snap.vcpus.iter().enumerate() {
        let mut v = Vcpu::new(&vmm.vm.fd, i as u8)?;
        v.msr_list = msr_list.clone();
        s.restore(&v.fd)
            .with_context(|| format!("restoring vCPU {i}"))?;
        vmm.vcpus.push(v);
    }
    for (t, s) in vmm.transports.iter().zip(&snap.devices) {
        t.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(s)
            .map_err(|e| anyhow::anyhow!("restoring a device: {e}"))?;
    }
    tracing::info!(
        "restored: {} vCPU(s), {} MiB, {} devices",
        vmm.vcpus.len(),
        snap.mem_size >> 20,
        vmm.transports.len()
    );
    Ok(())
}
