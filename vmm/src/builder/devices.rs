//! The VM's devices: the legacy ones on the port I/O bus, the virtio-mmio
//! ones on theirs, with their host-side backends.

use std::fs::File;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::config::{SerialOutput, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::{ConsoleOut, EventFdTrigger, SerialDevice, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::net::{adopt_tap_fd, open_tap, parse_mac, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{GuestMemoryMmap, Interrupt};
use crate::snapshot::Snapshot;
use crate::vstate::vcpu::Stopper;
use crate::vstate::vm::Vm;

/// Hands out virtio-mmio windows and interrupt lines.
pub(super) struct MmioSlots {
    pub(super) bus: Bus,
    pub(super) next_irq: u32,
    pub(super) next_addr: u64,
    pub(super) notifiers: Vec<QueueEvent>,
}

/// A queue's notification: KVM signals `evt` when the driver writes the
/// queue's index to its transport's QueueNotify register, without a VM
/// exit; a device event loop then lets the device process the queue.
pub(crate) struct QueueEvent {
    pub(crate) evt: EventFd,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    pub(crate) queue: u32,
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
        let queues = t.queue_count();
        let t = Arc::new(Mutex::new(t));
        for q in 0..queues as u32 {
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            // A 4-byte write of exactly the index: anything else still
            // exits to the transport, which refuses it.
            vm.fd
                .register_ioevent(&evt, &IoEventAddress::Mmio(addr + QUEUE_NOTIFY), q)
                .with_context(|| format!("ioeventfd for queue {q} at {addr:#x}"))?;
            self.notifiers.push(QueueEvent {
                evt,
                transport: t.clone(),
                queue: q,
            });
        }
        self.bus.insert(t.clone(), addr, MMIO_DEVICE_SIZE)?;
        cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(addr), irq, None)
            .context("command line")?;
        self.next_irq += 1;
        self.next_addr += MMIO_DEVICE_SIZE;
        Ok((t, format!("{addr:#x} irq {irq}")))
    }
}

/// The port I/O bus: the serial console (its state restored from `snap`)
/// and the i8042 whose reset stops the VM.
pub(super) fn attach_legacy_devices(
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
pub(super) struct VirtioDevices {
    pub(super) bus: Bus,
    pub(super) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) event_loops: Vec<(&'static str, std::os::fd::RawFd, Arc<Mutex<MmioTransport>>)>,
    /// Every queue's notification, for the queue event loop.
    pub(super) notifiers: Vec<QueueEvent>,
}

/// Drives, interfaces, vsock, entropy and filesystems, one 4 KiB window
/// and one IRQ each, in the order the guest enumerates them (the root
/// drive first: /dev/vda); their `virtio_mmio.device=` args and the root
/// drive's on the command line.
pub(super) fn attach_virtio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &mut Cmdline,
) -> Result<VirtioDevices> {
    let mut slots = MmioSlots {
        bus: Bus::new(),
        next_irq: IRQ_BASE,
        next_addr: MMIO_DEVICES_START,
        notifiers: Vec::new(),
    };
    let mut d = VirtioDevices {
        bus: Bus::new(),
        transports: Vec::new(),
        event_loops: Vec::new(),
        notifiers: Vec::new(),
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
    d.notifiers = slots.notifiers;
    Ok(d)
}

/// The drives; the root drive's kernel args.
pub(super) fn attach_drives(
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

pub(super) type Taps = Vec<Option<File>>;

pub(super) type FsSockets = Vec<Option<std::os::unix::net::UnixStream>>;

/// The taps and vhost-user sockets the VMM inherited (or connects to).
pub(super) fn adopt_backends(config: &VmConfig) -> Result<(Taps, FsSockets)> {
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

pub(super) fn attach_interfaces(
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

pub(super) fn attach_filesystems(
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
