//! Shared by the fuzz targets: guest memory laid out from fuzz input, and a
//! split virtqueue whose rings and descriptors are whatever the input says.

use husk_vmm::devices::virtio::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const MEM_SIZE: usize = 0x10_0000;

/// Memory filled with `data` from address 0 (descriptor table, rings and
/// buffers all come from the input), and a queue whose size and ring
/// addresses come from the first bytes.
pub fn guest(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    if data.len() < 8 {
        return None;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    mem.write_slice(&data[8..data.len().min(MEM_SIZE) ], GuestAddress(0x1000)).ok()?;
    let size = 1u16 << (data[0] % 9); // 1..=256
    let mut q = Queue::new(256).ok()?;
    q.set_size(size);
    // Rings somewhere in (or just past) the first 64 KiB of the input.
    let at = |b: u8| u32::from(b) * 0x100 + 0x1000;
    q.set_desc_table_address(Some(at(data[1]) & !0xf), Some(0));
    q.set_avail_ring_address(Some(at(data[2]) & !0x1), Some(0));
    q.set_used_ring_address(Some(at(data[3]) & !0x3), Some(0));
    q.set_event_idx(data[4] & 1 == 1);
    q.set_ready(true);
    Some((mem, q))
}
