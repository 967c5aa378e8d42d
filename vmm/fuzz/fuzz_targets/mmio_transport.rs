//! The virtio-mmio register interface: any sequence of guest reads and writes
//! (any offset, any width) against a transport with a block device behind it.
#![no_main]

use std::sync::Arc;

use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::virtio::block::Block;
use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::{GuestMemoryMmap, Interrupt};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let disk = std::env::temp_dir().join(format!("husk-fuzz-mmio-{}", std::process::id()));
    if !disk.exists() {
        std::fs::write(&disk, vec![0u8; 4096]).expect("fuzz disk");
    }
    let Ok(blk) = Block::open(&disk, true, "fuzz") else { return };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let evt = vmm_sys_util_evt();
    let Ok(mut t) = MmioTransport::new(Box::new(blk), mem, Arc::new(Interrupt::new(evt))) else {
        return;
    };
    // Each op: [kind, offset lo, offset hi, width, value (4 bytes)].
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1000;
        let width = [1usize, 2, 4, 8][usize::from(op[3] % 4)];
        if op[0] & 1 == 0 {
            let mut buf = vec![0u8; width];
            t.read(offset, &mut buf);
        } else {
            let mut buf = vec![0u8; width];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = op[4 + i % 4];
            }
            t.write(offset, &buf);
        }
    }
});

fn vmm_sys_util_evt() -> husk_vmm::devices::virtio::EventFd {
    husk_vmm::devices::virtio::EventFd::new(0).expect("eventfd")
}
