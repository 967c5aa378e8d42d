//! vsock packet parsing and the connection state machine, fed TX packets from
//! guest-controlled queues (and RX buffers from the same input).
#![no_main]

use husk_vmm::devices::virtio::vsock::{Vsock, RX_QUEUE, TX_QUEUE};
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((mem, tx)) = common::guest(data) else { return };
    let Some((_, rx)) = common::guest(&data[data.len() / 2..]) else { return };
    let sock = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
    let Ok(mut v) = Vsock::new(3, &sock) else { return };
    let evt = <virtio_queue::Queue as virtio_queue::QueueT>::new(16).expect("queue");
    let mut queues = vec![rx, tx, evt];
    v.process_queue(TX_QUEUE, &mut queues, &mem);
    v.process_queue(RX_QUEUE, &mut queues, &mem);
});
