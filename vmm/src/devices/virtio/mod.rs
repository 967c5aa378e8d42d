//! virtio devices behind a virtio-mmio (version 2) transport.
//!
//! Everything a device reads from a virtqueue is guest-controlled: descriptor
//! chains are walked through virtio-queue (which bounds chain length and
//! checks addresses), and a malformed request is answered with an error status
//! or dropped, never a panic.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
pub use vmm_sys_util::eventfd::EventFd;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Device feature: modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: a used ring changed.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one device: status register plus an irqfd.
pub struct Interrupt {
    pub status: AtomicU32,
    pub evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
        }
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }
}

/// A virtio device model. The transport owns the queues and calls in.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with valid queues.
    fn activate(&mut self, _mem: &GuestMemoryMmap) -> Result<(), String> {
        Ok(())
    }
    /// Activation for devices that hand their queues elsewhere (vhost-user).
    fn activate_queues(&mut self, mem: &GuestMemoryMmap, _queues: &[Queue]) -> Result<(), String> {
        self.activate(mem)
    }
    /// The driver notified queue `index`. Returns true if the used ring of
    /// any queue changed and the driver should be interrupted.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Backs the device with another host file while the VM runs (a
    /// drive's `PATCH`); only devices with a backing file take one.
    fn replace_backing(&mut self, _path: &std::path::Path) -> Result<(), String> {
        Err("this device has no backing file".into())
    }
    /// The device was restored from a snapshot and activated; host-side
    /// state (connections) did not come along. Returns true if it used a
    /// queue (the driver is interrupted).
    fn restored(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The device's host-side event source is ready (a tap, a socket, a
    /// backend's completion); returns true if the driver should be
    /// interrupted. Most devices run their receive queue.
    fn host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        use virtio_queue::QueueT;
        if !queues.first().is_some_and(|q| q.ready()) {
            self.poll_host_events();
            return false;
        }
        self.process_queue(0, queues, mem)
    }
    /// Drains host-side events while the driver has not activated the device,
    /// so an event loop waiting on them does not spin.
    fn poll_host_events(&mut self) {}
    /// Why the VM cannot be snapshotted as things stand, if it cannot.
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }
}

/// Pops every chain the driver made available on `queue`, hands each to `f`,
/// and returns it used with the length `f` reports (bytes written into it).
/// True if any chain was used.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    what: &str,
    mut f: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> bool {
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut used = false;
    loop {
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                tracing::warn!("{what}: bad avail ring: {e}");
                break;
            }
        };
        if chains.is_empty() {
            break;
        }
        for chain in chains {
            let head = chain.head_index();
            let len = f(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("{what}: add_used: {e}");
            }
            used = true;
        }
    }
    used
}

/// Writes `parts` one after the other into the device-writable descriptors of
/// an RX chain; returns the bytes written, or None if a descriptor is not
/// device-writable, lies outside guest memory, or the chain is too small.
pub fn write_chain<M, T>(chain: &virtio_queue::DescriptorChain<M>, parts: &[&[u8]]) -> Option<u32>
where
    M: std::ops::Deref<Target = T> + Clone,
    T: vm_memory::GuestMemory + ?Sized,
{
    use vm_memory::{Address, Bytes};
    let mem = chain.memory();
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut next = 0;
    let mut total = 0u32;
    for d in chain.clone() {
        if next == parts.len() {
            break;
        }
        if !d.is_write_only() {
            return None;
        }
        let mut addr = d.addr();
        let mut room = d.len() as usize;
        while room > 0 && next < parts.len() {
            let part = parts[next];
            let n = room.min(part.len());
            mem.write_slice(&part[..n], addr).ok()?;
            parts[next] = &part[n..];
            if parts[next].is_empty() {
                next += 1;
            }
            room -= n;
            total = total.checked_add(n as u32)?;
            addr = addr.checked_add(n as u64)?;
        }
    }
    (next == parts.len()).then_some(total)
}

/// Copies `src` into the start of a config space read, zero-filling the rest.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - off);
    data[..n].copy_from_slice(&src[off..off + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn chain_write(descs: &[RawDescriptor], parts: &[&[u8]]) -> (Option<u32>, GuestMemoryMmap) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&m).unwrap();
        let r = write_chain(&chain, parts);
        (r, m)
    }

    #[test]
    fn write_chain_spans_descriptors_and_refuses_what_does_not_fit() {
        const W: u32 = VRING_DESC_F_WRITE;
        const N: u32 = VRING_DESC_F_NEXT;
        // "abc" + "defgh" over buffers of 2 and 10 bytes.
        let (r, m) = chain_write(
            &[d(0x1000, 2, W | N, 1), d(0x2000, 10, W, 0)],
            &[b"abc", b"defgh"],
        );
        assert_eq!(r, Some(8));
        let mut a = [0u8; 2];
        let mut b = [0u8; 6];
        m.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!((&a, &b), (b"ab", b"cdefgh"));
        // Too small, not device-writable, outside memory.
        assert_eq!(chain_write(&[d(0x1000, 4, W, 0)], &[b"abc", b"de"]).0, None);
        assert_eq!(chain_write(&[d(0x1000, 8, 0, 0)], &[b"abc"]).0, None);
        assert_eq!(chain_write(&[d(0xff_fffe, 8, W, 0)], &[b"abc"]).0, None);
    }
}
