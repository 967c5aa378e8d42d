//! Builds a microVM from a [`VmConfig`] and runs it: memory, kernel, command
//! line, devices, boot structures, vCPUs (Firecracker's builder is the model).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::arch::mptable;
use crate::arch::regs::BootProtocol;
use crate::config::{Checked, MachineConfig, SerialOutput, VmConfig, DEFAULT_BOOT_ARGS};
use crate::cpu_template::{CpuTemplate, HostProfile};
use crate::devices::bus::Bus;
use crate::devices::legacy::{ConsoleOut, EventFdTrigger, SerialDevice, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{adopt_tap_fd, open_tap, parse_mac, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{GuestMemoryMmap, Interrupt};
use crate::snapshot::{CreateRequest, LoadRequest, Snapshot};
use crate::vstate::memory;
use crate::vstate::state::{self, VmState};
use crate::vstate::vcpu::{kick_signal, StopReason, Stopper, Vcpu, VcpuControl};
use crate::vstate::vm::Vm;

const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

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

struct LoadedKernel {
    protocol: BootProtocol,
    entry: u64,
    result: KernelLoaderResult,
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut f = File::open(path).with_context(|| format!("opening kernel {}", path.display()))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .with_context(|| format!("reading kernel {}", path.display()))?;
    f.seek(SeekFrom::Start(0))?;
    if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .with_context(|| format!("loading ELF kernel {}", path.display()))?;
        match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                protocol: BootProtocol::Pvh,
                entry: entry.0,
                result: r,
            }),
            _ => Ok(LoadedKernel {
                protocol: BootProtocol::Linux64,
                entry: r.kernel_load.0,
                result: r,
            }),
        }
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .with_context(|| format!("loading bzImage {} (not ELF either)", path.display()))?;
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        Ok(LoadedKernel {
            protocol: BootProtocol::Linux64,
            entry: r.kernel_load.0 + 0x200,
            result: r,
        })
    }
}

/// Loads the initrd page-aligned at the top of low memory; returns (addr, size).
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<(u64, u64)> {
    let data = std::fs::read(path).with_context(|| format!("reading initrd {}", path.display()))?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .with_context(|| format!("initrd of {size} bytes does not fit in guest memory"))?;
    mem.write_slice(&data, GuestAddress(addr))
        .context("writing initrd")?;
    Ok((addr, size))
}

fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.start_addr().0 + r.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

fn write_pvh(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>) -> Result<()> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = MODLIST_START;
    }
    let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    bp.set_sections::<hvm_memmap_table_entry>(&map, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .context("writing PVH start info")?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &KernelLoaderResult,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(mem);
    if map.len() > params.e820_table.len() {
        bail!(
            "memory map has {} entries, the zero page holds {}",
            map.len(),
            params.e820_table.len()
        );
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .context("writing the zero page")?;
    Ok(())
}

/// Hands out virtio-mmio windows and interrupt lines.
struct MmioSlots {
    bus: Bus,
    next_irq: u32,
    next_addr: u64,
}

impl MmioSlots {
    /// Puts `device` behind a transport on the next window and IRQ, and tells
    /// the guest about it on the command line. Returns the transport and a
    /// description of where it is.
    fn attach(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        cmdline: &mut Cmdline,
        device: Box<dyn crate::devices::virtio::VirtioDevice>,
    ) -> Result<(Arc<Mutex<MmioTransport>>, String)> {
        let (irq, addr) = (self.next_irq, self.next_addr);
        if irq > IRQ_MAX {
            bail!("out of interrupt lines for virtio devices");
        }
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.fd.register_irqfd(&evt, irq).context("virtio irqfd")?;
        let t = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(evt)))
            .map_err(|e| anyhow::anyhow!("virtio queue: {e:?}"))?;
        let t = Arc::new(Mutex::new(t));
        self.bus.insert(t.clone(), addr, MMIO_DEVICE_SIZE)?;
        cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(addr), irq, None)
            .context("command line")?;
        self.next_irq += 1;
        self.next_addr += MMIO_DEVICE_SIZE;
        Ok((t, format!("{addr:#x} irq {irq}")))
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

/// The boot args, then the host profile's.
fn kernel_cmdline(config: &VmConfig, kernel_args: &[String]) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).context("command line")?;
    cmdline
        .insert_str(
            config
                .boot_source
                .boot_args
                .as_deref()
                .unwrap_or(DEFAULT_BOOT_ARGS),
        )
        .context("boot_args")?;
    for a in kernel_args {
        cmdline.insert_str(a).context("host profile kernel args")?;
    }
    Ok(cmdline)
}

/// The port I/O bus: the serial console (its state restored from `snap`)
/// and the i8042 whose reset stops the VM.
fn attach_legacy_devices(
    vm: &Vm,
    config: &VmConfig,
    snap: Option<&Snapshot>,
    stopper: &Stopper,
) -> Result<(Bus, Arc<Mutex<SerialDevice>>)> {
    let mut pio = Bus::new();
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.fd
        .register_irqfd(&serial_evt, SERIAL_IRQ)
        .context("serial irqfd")?;
    let out = match &config.serial.output {
        SerialOutput::Stdout => ConsoleOut::Stdout,
        SerialOutput::None => ConsoleOut::Sink,
        SerialOutput::File(p) => ConsoleOut::File(
            File::create(p).with_context(|| format!("console file {}", p.display()))?,
        ),
    };
    let serial = Arc::new(Mutex::new(match snap {
        None => SerialDevice::new(EventFdTrigger(serial_evt), out),
        Some(snap) => SerialDevice::from_state(&snap.serial, EventFdTrigger(serial_evt), out)
            .map_err(|e| anyhow::anyhow!(e))?,
    }));
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
    let i8042 = I8042::new(EventFdTrigger(stopper.evt.try_clone()?));
    pio.insert(Arc::new(Mutex::new(i8042)), u64::from(I8042_DATA_PORT), 5)?;
    Ok((pio, serial))
}

/// The virtio-mmio devices on their bus.
struct VirtioDevices {
    bus: Bus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    event_loops: Vec<(&'static str, std::os::fd::RawFd, Arc<Mutex<MmioTransport>>)>,
}

/// Drives, interfaces, vsock, entropy and filesystems, one 4 KiB window
/// and one IRQ each, in the order the guest enumerates them (the root
/// drive first: /dev/vda); their `virtio_mmio.device=` args and the root
/// drive's on the command line.
fn attach_virtio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &mut Cmdline,
) -> Result<VirtioDevices> {
    let mut slots = MmioSlots {
        bus: Bus::new(),
        next_irq: IRQ_BASE,
        next_addr: MMIO_DEVICES_START,
    };
    let mut d = VirtioDevices {
        bus: Bus::new(),
        transports: Vec::new(),
        event_loops: Vec::new(),
    };
    let root_args = attach_drives(&mut slots, vm, mem, config, cmdline, &mut d)?;
    // Inherited descriptors first: one this process opens could otherwise
    // take the number of one it was handed.
    let (taps, fs_sockets) = adopt_backends(config)?;
    attach_interfaces(&mut slots, vm, mem, config, cmdline, taps, &mut d)?;
    if let Some(vc) = &config.vsock {
        let vsock = Vsock::new(vc.guest_cid, &vc.uds_path)?;
        let epfd = vsock.epoll_fd();
        let (t, at) = slots.attach(vm, mem, cmdline, Box::new(vsock))?;
        d.transports.push(t.clone());
        tracing::info!(
            "vsock: guest cid {}, host socket {} at {at}",
            vc.guest_cid,
            vc.uds_path.display()
        );
        d.event_loops.push(("vsock", epfd, t));
    }
    if config.entropy.is_some() {
        let (t, at) = slots.attach(vm, mem, cmdline, Box::new(Rng::new()))?;
        d.transports.push(t);
        tracing::info!("entropy: virtio-rng at {at}");
    }
    attach_filesystems(&mut slots, vm, mem, config, cmdline, fs_sockets, &mut d)?;
    if let Some(r) = root_args {
        cmdline.insert_str(r).context("command line")?;
    }
    d.bus = slots.bus;
    Ok(d)
}

/// The drives; the root drive's kernel args.
fn attach_drives(
    slots: &mut MmioSlots,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &mut Cmdline,
    d: &mut VirtioDevices,
) -> Result<Option<&'static str>> {
    let mut root_args = None;
    for drive in config.ordered_drives() {
        let block = Block::open(&drive.path_on_host, drive.is_read_only, &drive.drive_id)?;
        if drive.is_root_device {
            root_args = Some(if drive.is_read_only {
                "root=/dev/vda ro"
            } else {
                "root=/dev/vda rw"
            });
        }
        let (t, at) = slots.attach(vm, mem, cmdline, Box::new(block))?;
        d.transports.push(t);
        tracing::info!(
            "drive {}: {} ({}) at {at}",
            drive.drive_id,
            drive.path_on_host.display(),
            if drive.is_read_only { "ro" } else { "rw" }
        );
    }
    Ok(root_args)
}

type Taps = Vec<Option<File>>;
type FsSockets = Vec<Option<std::os::unix::net::UnixStream>>;

/// The taps and vhost-user sockets the VMM inherited (or connects to).
fn adopt_backends(config: &VmConfig) -> Result<(Taps, FsSockets)> {
    let mut taps = Vec::new();
    for n in &config.network_interfaces {
        taps.push(n.tap_fd.map(adopt_tap_fd).transpose()?);
    }
    let mut fs_sockets = Vec::new();
    for f in &config.filesystems {
        fs_sockets.push(match (&f.socket_fd, &f.socket_path) {
            (Some(fd), _) => Some(
                fs::adopt_socket_fd(*fd).with_context(|| format!("filesystem {:?}", f.fs_id))?,
            ),
            (None, Some(p)) => {
                Some(std::os::unix::net::UnixStream::connect(p).with_context(|| {
                    format!("filesystem {:?}: connecting to {}", f.fs_id, p.display())
                })?)
            }
            (None, None) => None,
        });
    }
    Ok((taps, fs_sockets))
}

fn attach_interfaces(
    slots: &mut MmioSlots,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &mut Cmdline,
    taps: Taps,
    d: &mut VirtioDevices,
) -> Result<()> {
    for (i, (n, tap)) in config.network_interfaces.iter().zip(taps).enumerate() {
        // Without a MAC the guest picks a random one; a stable default is kinder.
        let mac = match &n.guest_mac {
            Some(m) => parse_mac(m)?,
            None => [0x06, 0x00, 0x00, 0x00, 0x00, i as u8 + 1],
        };
        let tap = match tap {
            Some(t) => t,
            None => open_tap(&n.host_dev_name)?,
        };
        let net = Net::new(tap, mac)?;
        let epfd = net.epoll_fd();
        let (t, at) = slots.attach(vm, mem, cmdline, Box::new(net))?;
        d.transports.push(t.clone());
        match n.tap_fd {
            Some(fd) => tracing::info!("interface {}: inherited tap fd {fd} at {at}", n.iface_id),
            None => tracing::info!("interface {}: tap {} at {at}", n.iface_id, n.host_dev_name),
        }
        d.event_loops.push(("net", epfd, t));
    }
    Ok(())
}

fn attach_filesystems(
    slots: &mut MmioSlots,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &mut Cmdline,
    sockets: FsSockets,
    d: &mut VirtioDevices,
) -> Result<()> {
    for (f, sock) in config.filesystems.iter().zip(sockets) {
        let backed = sock.is_some();
        let dev = fs::Fs::new(&f.tag, sock).with_context(|| format!("filesystem {:?}", f.fs_id))?;
        let epfd = dev.epoll_fd();
        let (t, at) = slots.attach(vm, mem, cmdline, Box::new(dev))?;
        d.transports.push(t.clone());
        tracing::info!(
            "filesystem {}: virtio-fs tag {:?} at {at}, {}",
            f.fs_id,
            f.tag,
            if backed {
                "vhost-user backend"
            } else {
                "no backend yet"
            }
        );
        d.event_loops.push(("fs", epfd, t));
    }
    Ok(())
}

/// A booting VM's setup: the command line and boot parameters in memory,
/// the MP table, and its vCPUs configured to enter the kernel.
fn configure_system_for_boot(
    vmm: &mut Vmm,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
    cmdline: &Cmdline,
    template: &CpuTemplate,
) -> Result<()> {
    let m = &vmm.config.machine_config;
    let mem = &vmm.mem;
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).context("writing command line")?;
    let cmdline_str = cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::info!("kernel command line: {cmdline_str}");
    match kernel.protocol {
        BootProtocol::Pvh => write_pvh(mem, initrd)?,
        BootProtocol::Linux64 => {
            write_zero_page(mem, &kernel.result, cmdline_str.len() + 1, initrd)?
        }
    }
    mptable::setup(mem, m.vcpu_count)?;
    vmm.vcpus = create_vcpus(&vmm.vm, mem, m.vcpu_count, template, kernel)?;
    tracing::info!(
        "boot: {:?} entry {:#x}, {} vCPU(s), {} MiB",
        kernel.protocol,
        kernel.entry,
        m.vcpu_count,
        m.mem_size_mib
    );
    Ok(())
}

/// The vCPUs, their CPUID from `template` (what the host refused of it
/// said once), their registers set to enter the kernel.
fn create_vcpus(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    count: u8,
    template: &CpuTemplate,
    kernel: &LoadedKernel,
) -> Result<Vec<Vcpu>> {
    let msr_list = Arc::new(state::msr_indices(&vm.kvm)?);
    let mut vcpus = Vec::new();
    for i in 0..count {
        let mut v = Vcpu::new(&vm.fd, i)?;
        v.msr_list = msr_list.clone();
        let refused = v.configure_cpuid(&vm.kvm, count, template)?;
        if i == 0 {
            warn_refused(template, &refused);
        }
        v.configure_boot(mem, template, kernel.protocol, kernel.entry)?;
        vcpus.push(v);
    }
    Ok(vcpus)
}

/// What the template asked for and did not get matters (warn); KVM
/// recomputing other registers (XSAVE sizes, ...) is detail.
fn warn_refused(template: &CpuTemplate, refused: &[crate::arch::cpuid::Refused]) {
    for r in refused {
        let masked = template.cpuid_modifiers.iter().any(|m| {
            m.leaf == r.leaf
                && m.modifiers.iter().any(|x| {
                    let bits = x.bitmap.mask as u32;
                    format!("{:?}", x.register).eq_ignore_ascii_case(r.register)
                        && (r.got ^ r.wanted) & bits != 0
                })
        });
        if masked {
            tracing::warn!("host refused template bits: {r}");
        } else {
            tracing::debug!("host changed: {r}");
        }
    }
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

impl Vmm {
    /// Starts the vCPUs and device event loops.
    pub fn start(self) -> Result<RunningVm> {
        self.start_paused(false)
    }

    /// Starts the VM; with `paused` its vCPUs park before running any guest
    /// code (a snapshot loaded without resume_vm).
    pub fn start_paused(self, paused: bool) -> Result<RunningVm> {
        let Vmm {
            vm,
            vcpus,
            pio,
            mmio,
            stopper,
            serial,
            event_loops,
            mem,
            _mem_file,
            transports,
            config,
            cpu_identity,
        } = self;
        let vcpu_count = vcpus.len();
        for (name, fd, transport) in event_loops {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || device_event_loop(fd, transport))?;
        }
        let control = Arc::new(VcpuControl::new(paused));
        let mut handles = Vec::new();
        for v in vcpus {
            let (pio, mmio, stopper, control) =
                (pio.clone(), mmio.clone(), stopper.clone(), control.clone());
            let name = format!("vcpu{}", v.index);
            handles.push(std::thread::Builder::new().name(name).spawn(move || {
                // Confined before the first guest instruction.
                if let Err(e) = crate::seccomp::confine(crate::seccomp::ThreadKind::Vcpu) {
                    tracing::error!("{e}");
                    stopper.stop(StopReason::VmmError);
                    return;
                }
                v.run(pio, mmio, stopper, control)
            })?);
        }
        Ok(RunningVm {
            vm,
            mem,
            _mem_file,
            transports,
            config,
            cpu_identity,
            vcpu_count,
            stopper,
            serial,
            control,
            handles,
            started: std::time::Instant::now(),
        })
    }

    /// Runs the guest until it stops; returns why.
    pub fn run(self) -> Result<StopReason> {
        Ok(self.start()?.wait())
    }
}

/// A VM whose vCPUs are running (or paused).
pub struct RunningVm {
    vm: Vm,
    mem: GuestMemoryMmap,
    _mem_file: File,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    config: VmConfig,
    cpu_identity: String,
    vcpu_count: usize,
    stopper: Arc<Stopper>,
    serial: Arc<Mutex<SerialDevice>>,
    control: Arc<VcpuControl>,
    handles: Vec<std::thread::JoinHandle<()>>,
    started: std::time::Instant,
}

impl RunningVm {
    pub fn pause(&self) -> Result<()> {
        let kick = || {
            for h in &self.handles {
                // A vCPU that already exited cannot be signalled; that is fine.
                let _ = vmm_sys_util::signal::Killable::kill(h, kick_signal());
            }
        };
        self.control
            .pause(self.handles.len(), kick, std::time::Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!("pause: {e}"))
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    pub fn paused(&self) -> bool {
        self.control.paused()
    }

    /// Writes a snapshot of a paused VM: the state file, then guest memory.
    /// Device threads are held off (their transports locked) meanwhile, so
    /// nothing changes guest memory or device state under the copy.
    pub fn snapshot(&self, req: &CreateRequest) -> Result<()> {
        if !self.paused() {
            bail!("the VM must be paused for a snapshot");
        }
        // Paused was asked for; wait until every vCPU has parked (and so
        // recorded its state).
        self.pause()?;
        let started = std::time::Instant::now();
        let guards: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        if let Some(why) = guards.iter().find_map(|t| t.snapshot_blocker()) {
            bail!("cannot snapshot this VM: {why}");
        }
        let devices: Vec<_> = guards.iter().map(|t| t.state()).collect();
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state();
        let vm_state = VmState::save(&self.vm.fd).context("reading VM state")?;
        let mem_size = self.config.machine_config.mem_size_mib << 20;
        let vcpus = self
            .control
            .saved_states(self.vcpu_count)
            .map_err(|e| anyhow::anyhow!("snapshot: {e}"))?;
        Snapshot {
            magic: crate::snapshot::MAGIC.into(),
            format_version: crate::snapshot::FORMAT_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            cpu_identity: self.cpu_identity.clone(),
            config: self.config.clone(),
            mem_size,
            vm: vm_state,
            vcpus,
            devices,
            serial,
        }
        .write(&req.snapshot_path)?;
        let mut out = File::create(&req.mem_file_path)
            .with_context(|| format!("memory file {}", req.mem_file_path.display()))?;
        memory::write_to(&self.mem, &mut out)
            .with_context(|| format!("writing {}", req.mem_file_path.display()))?;
        drop(guards);
        tracing::info!(
            "snapshot: {} and {} ({} MiB) in {:?}",
            req.snapshot_path.display(),
            req.mem_file_path.display(),
            mem_size >> 20,
            started.elapsed()
        );
        Ok(())
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Blocks until the VM stops (a vCPU exit or the i8042 reset line).
    pub fn wait(&self) -> StopReason {
        while wait_readable(std::os::fd::AsRawFd::as_raw_fd(&self.stopper.evt)).is_err() {}
        self.stopped().unwrap_or(StopReason::GuestStop)
    }

    /// Why the VM stopped, if it has.
    pub fn stopped(&self) -> Option<StopReason> {
        let r = self.stopper.reason();
        if r.is_some() {
            if let Ok(mut s) = self.serial.lock() {
                let _ = std::io::Write::flush(s.serial.writer_mut());
            }
        }
        r
    }
}

/// Blocks until `fd` is readable. EINTR is an error the caller may retry.
fn wait_readable(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, -1) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for host-side events of a device and lets it run its RX queue.
fn device_event_loop(fd: std::os::fd::RawFd, transport: Arc<Mutex<MmioTransport>>) {
    if let Err(e) = crate::seccomp::confine(crate::seccomp::ThreadKind::Device) {
        tracing::error!("{e}; vsock host events will not be served");
        return;
    }
    loop {
        // The fd belongs to the device, which lives as long as the VM.
        if let Err(e) = wait_readable(fd) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("device event loop: poll: {e}");
            return;
        }
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process_host_events();
    }
}
