//! virtio-mmio transport, version 2 (virtio 1.2 spec, 4.2.2).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{GuestMemoryMmap, Interrupt, VirtioDevice, INT_VRING};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "HUSK", little-endian.
const VENDOR_ID: u32 = 0x4b53_5548;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

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
            match self.device.activate(&self.mem) {
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

    /// Lets a device's own event source (a host socket, a tap) run a queue.
    pub fn process(&mut self, index: usize) {
        if !self.activated || index >= self.queues.len() || !self.queues[index].ready() {
            self.device.poll_host_events();
            return;
        }
        if self
            .device
            .process_queue(index, &mut self.queues, &self.mem)
        {
            self.interrupt.signal(INT_VRING);
        }
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
            0x50 => self.notify(v),
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
