//! virtio-rng on guest-controlled queues: chains of any shape, lengths and
//! directions; the device must fill only writable buffers inside memory.
#![no_main]

use husk_vmm::devices::virtio::rng::Rng;
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((mem, q)) = common::guest(data) else { return };
    let mut rng = Rng::new();
    rng.ack_features(rng.features());
    let mut queues = vec![q];
    rng.process_queue(0, &mut queues, &mem);
});
