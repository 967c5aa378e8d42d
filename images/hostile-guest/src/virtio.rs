//! Just enough of a virtio-mmio driver (v2, split rings) to reach the
//! devices' queue code, with nothing checked on the way: what it posts is
//! whatever an attack says.

use crate::mem;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

const STATUS: usize = 0x70;
const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

#[derive(Clone, Copy)]
pub struct Device {
    pub base: usize,
}

impl Device {
    pub fn new(base: usize) -> Device {
        Device { base }
    }

    pub fn reset(&self) {
        mem::w32(self.base + STATUS, 0);
    }

    /// Reset, acknowledge, accept VIRTIO_F_VERSION_1 only, FEATURES_OK.
    pub fn init(&self) {
        self.reset();
        mem::w32(self.base + STATUS, ACK);
        mem::w32(self.base + STATUS, ACK | DRIVER);
        mem::w32(self.base + 0x24, 1);
        mem::w32(self.base + 0x20, 1);
        mem::w32(self.base + 0x24, 0);
        mem::w32(self.base + 0x20, 0);
        mem::w32(self.base + STATUS, ACK | DRIVER | FEATURES_OK);
    }

    pub fn driver_ok(&self) {
        mem::w32(self.base + STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    pub fn select_queue(&self, index: u32) {
        mem::w32(self.base + 0x30, index);
    }

    pub fn set_queue_addrs(&self, desc: u64, avail: u64, used: u64) {
        for (reg, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            mem::w32(self.base + reg, a as u32);
            mem::w32(self.base + reg + 4, (a >> 32) as u32);
        }
    }

    /// Queue `index` of `size` with its rings at `at` (desc, then avail at
    /// +4 KiB, used at +8 KiB), made ready.
    pub fn queue(&self, index: u32, size: u16, at: usize) -> Queue {
        self.select_queue(index);
        mem::w32(self.base + 0x38, u32::from(size));
        let (desc, avail, used) = (at, at + 0x1000, at + 0x2000);
        self.set_queue_addrs(desc as u64, avail as u64, used as u64);
        mem::w32(self.base + 0x44, 1);
        Queue {
            dev: *self,
            index,
            size,
            desc,
            avail,
            next: mem::r16(avail + 2),
        }
    }

    pub fn notify(&self, index: u32) {
        mem::w32(self.base + 0x50, index);
    }
}

pub struct Queue {
    dev: Device,
    index: u32,
    pub size: u16,
    desc: usize,
    avail: usize,
    next: u16,
}

impl Queue {
    pub fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + usize::from(i % self.size) * 16;
        mem::w64(at, addr);
        mem::w32(at + 8, len);
        mem::w16(at + 12, flags);
        mem::w16(at + 14, next);
    }

    /// Makes chain `head` available without a kick.
    pub fn post_quiet(&mut self, head: u16) {
        let slot = self.avail + 4 + usize::from(self.next % self.size) * 2;
        mem::w16(slot, head);
        self.next = self.next.wrapping_add(1);
        mem::w16(self.avail + 2, self.next);
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.next = idx;
        mem::w16(self.avail + 2, idx);
    }

    pub fn kick(&self) {
        self.dev.notify(self.index);
    }

    pub fn post(&mut self, head: u16) {
        self.post_quiet(head);
        self.kick();
    }
}
