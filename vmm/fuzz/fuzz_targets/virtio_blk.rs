//! virtio-blk request parsing and execution on guest-controlled queues.
#![no_main]

use husk_vmm::devices::virtio::block::Block;
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((mem, q)) = common::guest(data) else { return };
    thread_local! {
        static DISK: tempfile_path::Disk = tempfile_path::Disk::new();
    }
    DISK.with(|d| {
        let Ok(mut blk) = Block::open(&d.path, data[5] & 1 == 1, "fuzz") else { return };
        blk.ack_features(blk.features());
        let mut queues = vec![q];
        blk.process_queue(0, &mut queues, &mem);
    });
});

mod tempfile_path {
    pub struct Disk {
        pub path: std::path::PathBuf,
    }
    impl Disk {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!("husk-fuzz-disk-{}", std::process::id()));
            std::fs::write(&path, vec![0u8; 64 * 1024]).expect("fuzz disk");
            Disk { path }
        }
    }
}
