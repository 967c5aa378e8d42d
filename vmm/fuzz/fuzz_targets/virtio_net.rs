//! virtio-net on guest-controlled queues: TX chains (headers, frame
//! lengths, directions) to a packet socket standing in for the tap, and RX
//! buffers for frames the input puts on that socket.
#![no_main]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use husk_vmm::devices::virtio::net::{Net, RX_QUEUE, TX_QUEUE};
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((mem, tx)) = common::guest(data) else { return };
    let Some((_, rx)) = common::guest(&data[data.len() / 2..]) else { return };
    let Ok((tap, peer)) = UnixDatagram::pair() else { return };
    if tap.set_nonblocking(true).is_err() || peer.set_nonblocking(true).is_err() {
        return;
    }
    // Frames from "the host": slices of the input, as many as fit.
    for frame in data.chunks(1514).take(8) {
        let _ = peer.send(frame);
    }
    let Ok(mut net) = Net::new(OwnedFd::from(tap).into(), [6, 0, 0, 0, 0, 1]) else { return };
    net.ack_features(net.features());
    let mut queues = vec![rx, tx];
    net.process_queue(TX_QUEUE, &mut queues, &mem);
    net.process_queue(RX_QUEUE, &mut queues, &mem);
    net.host_events(&mut queues, &mem);
});
