//! virtio-mmio transport, version 2 (virtio 1.2 spec, 4.2.2).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{GuestMemoryMmap, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "HUSK", little-endian.
const VENDOR_ID: u32 = 0x4b53_5548;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// A virtqueue's registers and ring positions, for snapshots.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// What a transport and its device's negotiation hold, for snapshots.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportState {
    pub device_type: u32,
    pub queues: Vec<QueueSnapshot>,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub status: u32,
    pub activated: bool,
    pub config_generation: u32,
    pub interrupt_status: u32,
}

/// The QueueNotify register: the driver writes a queue's index there when
/// it has made buffers available.
pub const QUEUE_NOTIFY: u64 = 0x50;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        })
    }

    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        event_idx: s.event_idx_enabled,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                    }
                })
                .collect(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            activated: self.activated,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
        }
    }

    /// Puts a freshly built transport (same device, same guest memory) back
    /// in `s`'s state. The state is untrusted: it must fit this device, and
    /// every queue is validated as a driver-configured one would be.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        let kind = self.device.device_type();
        if s.device_type != kind {
            return Err(format!(
                "snapshot has a device of type {} where this VM has type {kind}",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {kind}: {} queues in the snapshot, {} here",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "device type {kind}: the snapshot acked features {:#x} this device does not offer",
                s.driver_features & !self.device.features()
            ));
        }
        let mut queues = Vec::new();
        for (q, mine) in s.queues.iter().zip(&self.queues) {
            if q.max_size != mine.max_size() {
                return Err(format!(
                    "device type {kind}: queue size {} in the snapshot, {} here",
                    q.max_size,
                    mine.max_size()
                ));
            }
            let restored = Queue::try_from(QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            })
            .map_err(|e| format!("device type {kind}: queue: {e:?}"))?;
            if restored.ready() && !restored.is_valid(&self.mem) {
                return Err(format!(
                    "device type {kind}: a queue lies outside guest memory"
                ));
            }
            queues.push(restored);
        }
        self.queues = queues;
        self.queue_select = s.queue_select;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        if s.status & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(s.driver_features);
        }
        if s.activated {
            self.device.activate_queues(&self.mem, &self.queues)?;
            self.activated = true;
            // Host-side connections did not survive; the device tells the
            // driver so (vsock: a transport reset event).
            if self.device.restored(&mut self.queues, &self.mem) {
                self.interrupt.signal(INT_VRING);
            }
        }
        self.interrupt
            .status
            .fetch_or(s.interrupt_status, Ordering::SeqCst);
        if s.interrupt_status != 0 {
            self.interrupt.signal(0);
        }
        Ok(())
    }

    /// Tells an active driver that configuration space changed (a drive's
    /// new capacity after a restore with another backing file).
    pub fn config_changed(&mut self) {
        if self.activated {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.interrupt.signal(INT_CONFIG);
        }
    }

    /// Backs the device with `path` and tells the driver its
    /// configuration changed.
    pub fn replace_backing(&mut self, path: &std::path::Path) -> Result<(), String> {
        self.device.replace_backing(path)?;
        self.config_changed();
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue setup is only allowed while the driver is configuring.
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && self.status & STATUS_FAILED == 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (spec 3.1.1); anything else is a driver
        // bug we refuse by ignoring it.
        if v & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {:#x}); ignored",
                self.status,
                v
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
        }
        self.status = v;
        if new & STATUS_DRIVER_OK != 0 && !self.activated {
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                tracing::warn!("virtio-mmio: DRIVER_OK with an invalid queue; device failed");
                self.status |= STATUS_FAILED;
                return;
            }
            match self.device.activate_queues(&self.mem, &self.queues) {
                Ok(()) => self.activated = true,
                Err(e) => {
                    tracing::warn!("virtio-mmio: activating device failed: {e}");
                    self.status |= STATUS_FAILED;
                }
            }
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.activated {
            return;
        }
        let i = index as usize;
        if i >= self.queues.len() || !self.queues[i].ready() {
            return;
        }
        if self.device.process_queue(i, &mut self.queues, &self.mem) {
            self.interrupt.signal(INT_VRING);
        }
    }

    /// The driver notified queue `index` (its ioeventfd fired): the
    /// device processes it on the caller's thread, a device event loop,
    /// not the vCPU's.
    pub fn queue_notified(&mut self, index: u32) {
        self.notify(index);
    }

    /// How many queues the device has (one ioeventfd each).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Lets a device's own event source (a host socket, a tap, a backend)
    /// run.
    pub fn process_host_events(&mut self) {
        if !self.activated {
            self.device.poll_host_events();
            return;
        }
        if self.device.host_events(&mut self.queues, &self.mem) {
            self.interrupt.signal(INT_VRING);
        }
    }

    /// Why this device cannot be snapshotted now, if it cannot.
    pub fn snapshot_blocker(&self) -> Option<String> {
        self.device.snapshot_blocker()
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = self.device.features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_select = v,
            0x20 => {
                if self.status & STATUS_FEATURES_OK == 0 {
                    let offered = self.device.features();
                    match self.driver_features_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                    // Features the device did not offer are not accepted.
                    self.driver_features &= offered;
                }
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            // Notifies of a queue this transport has are ioeventfds (see
            // `queue_notified`); a write KVM did not match lands here.
            QUEUE_NOTIFY => {
                crate::metrics::inc(&crate::metrics::METRICS.virtio.notify_exits);
                self.notify(v)
            }
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            0x80..=0xa4 if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    match offset {
                        0x80 => q.set_desc_table_address(Some(v), None),
                        0x84 => q.set_desc_table_address(None, Some(v)),
                        0x90 => q.set_avail_ring_address(Some(v), None),
                        0x94 => q.set_avail_ring_address(None, Some(v)),
                        0xa0 => q.set_used_ring_address(Some(v), None),
                        0xa4 => q.set_used_ring_address(None, Some(v)),
                        _ => {}
                    }
                }
            }
            _ => {
                tracing::debug!("virtio-mmio: write {v:#x} to {offset:#x} ignored");
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}
