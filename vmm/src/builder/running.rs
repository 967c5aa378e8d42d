//! A built VM running: its vCPU threads, device event loops, pause,
//! resume, snapshot, the wait for its end.

use std::fs::File;
use std::sync::{Arc, Mutex};

use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::Vmm;
use crate::config::VmConfig;
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::GuestMemoryMmap;
use crate::snapshot::{CreateRequest, Snapshot};
use crate::vstate::memory;
use crate::vstate::state::VmState;
use crate::vstate::vcpu::{kick_signal, StopReason, Stopper, VcpuControl};
use crate::vstate::vm::Vm;

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
            notifiers,
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
        if !notifiers.is_empty() {
            let epoll = queue_epoll(&notifiers)?;
            std::thread::Builder::new()
                .name("virtio-queues".into())
                .spawn(move || queue_event_loop(epoll, notifiers))?;
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
            config: Mutex::new(config),
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
    pub(super) vm: Vm,
    pub(super) mem: GuestMemoryMmap,
    pub(super) _mem_file: File,
    pub(super) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Its configuration: what a snapshot records (a patched drive's new
    /// file included).
    pub(super) config: Mutex<VmConfig>,
    pub(super) cpu_identity: String,
    pub(super) vcpu_count: usize,
    pub(super) stopper: Arc<Stopper>,
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) control: Arc<VcpuControl>,
    pub(super) handles: Vec<std::thread::JoinHandle<()>>,
    pub(super) started: std::time::Instant,
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
        let config = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mem_size = config.machine_config.mem_size_mib << 20;
        let vcpus = self
            .control
            .saved_states(self.vcpu_count)
            .map_err(|e| anyhow::anyhow!("snapshot: {e}"))?;
        Snapshot {
            magic: crate::snapshot::MAGIC.into(),
            format_version: crate::snapshot::FORMAT_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            cpu_identity: self.cpu_identity.clone(),
            config,
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

    /// Backs drive `drive_id` with `path` (Firecracker's `PATCH /drives`
    /// after start): the placeholder slot pattern, for a cooperative
    /// guest that has not mounted the drive. The root drive is refused:
    /// the guest runs from it.
    pub fn patch_drive(&self, drive_id: &str, path: &std::path::Path) -> Result<()> {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let ordered = config.ordered_drives();
        let Some(i) = ordered.iter().position(|d| d.drive_id == drive_id) else {
            bail!("the VM has no drive {drive_id:?}");
        };
        if ordered[i].is_root_device {
            bail!("drive {drive_id:?} is the root device: the guest runs from it");
        }
        // Drives are the first transports, in the order the guest found
        // them.
        self.transports[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace_backing(path)
            .map_err(|e| anyhow::anyhow!("drive {drive_id:?}: {e}"))?;
        if let Some(d) = config.drives.iter_mut().find(|d| d.drive_id == drive_id) {
            d.path_on_host = path.to_path_buf();
        }
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
pub(super) fn wait_readable(fd: std::os::fd::RawFd) -> std::io::Result<()> {
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

/// An epoll set of every queue's notification, each tagged with its index
/// in `notifiers`.
fn queue_epoll(notifiers: &[super::devices::QueueEvent]) -> Result<Epoll> {
    let epoll = Epoll::new().context("epoll for virtio queue notifications")?;
    for (i, n) in notifiers.iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                n.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )
            .context("epoll_ctl for a queue notification")?;
    }
    Ok(epoll)
}

/// Lets devices process the queues their drivers notified, on this thread
/// (Firecracker's way): a vCPU that notifies goes straight back to the
/// guest instead of exiting to run the device, and device work is
/// confined with the device event loops' filter.
fn queue_event_loop(epoll: Epoll, notifiers: Vec<super::devices::QueueEvent>) {
    if let Err(e) = crate::seccomp::confine(crate::seccomp::ThreadKind::Device) {
        tracing::error!("{e}; virtio queues will not be served");
        return;
    }
    let mut events = vec![EpollEvent::default(); notifiers.len().min(64)];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio queue event loop: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let Some(q) = notifiers.get(ev.data() as usize) else {
                continue;
            };
            // Reset before processing: a notify that comes while the
            // device runs fires the eventfd again, and is not lost.
            let _ = q.evt.read();
            crate::metrics::inc(&crate::metrics::METRICS.virtio.queue_notifies);
            q.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queue_notified(q.queue);
        }
    }
}

/// Waits for host-side events of a device and lets it run its RX queue.
pub(super) fn device_event_loop(fd: std::os::fd::RawFd, transport: Arc<Mutex<MmioTransport>>) {
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
