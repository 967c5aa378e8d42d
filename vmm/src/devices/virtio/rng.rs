//! virtio-rng (virtio 1.2 spec, 5.4): fills guest buffers from the host's
//! getrandom(2), so a fresh or restored guest has entropy without waiting.

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use crate::metrics::{add, METRICS};

use super::{GuestMemoryMmap, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request: bounds the host buffer whatever
/// length the guest's descriptors claim.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    acked: u64,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        let mut buf = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            let mut budget = MAX_REQUEST;
            for d in chain {
                if !d.is_write_only() || budget == 0 {
                    break;
                }
                let n = (d.len() as usize).min(budget);
                buf.resize(n, 0);
                if getrandom(&mut buf).is_err() || mem.write_slice(&buf, d.addr()).is_err() {
                    break;
                }
                written += n as u32;
                add(&METRICS.rng.bytes, n as u64);
                budget -= n;
            }
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("virtio-rng: add_used: {e}");
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn fills_writable_buffers_and_bounds_huge_ones() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let d = RawDescriptor::from(SplitDescriptor::new(
            0x2000,
            64,
            VRING_DESC_F_WRITE as u16,
            0,
        ));
        vq.build_desc_chain(&[d]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::new();
        assert!(rng.process_queue(0, std::slice::from_mut(&mut q), &m));
        let e = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(e.len(), 64);
        let mut got = [0u8; 64];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_ne!(got, [0u8; 64]);

        // A buffer claiming more than guest memory holds: bounded, no panic.
        let vq = MockSplitQueue::new(&m, 16);
        let d = RawDescriptor::from(SplitDescriptor::new(
            0xf_0000,
            u32::MAX,
            VRING_DESC_F_WRITE as u16,
            0,
        ));
        vq.build_desc_chain(&[d]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        rng.process_queue(0, std::slice::from_mut(&mut q), &m);
        // And a read-only buffer gets nothing.
        let vq = MockSplitQueue::new(&m, 16);
        let d = RawDescriptor::from(SplitDescriptor::new(0x2000, 64, 0, 0));
        vq.build_desc_chain(&[d]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(rng.process_queue(0, std::slice::from_mut(&mut q), &m));
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}
