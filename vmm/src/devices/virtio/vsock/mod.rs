//! virtio-vsock with Firecracker-compatible hybrid vsock: guest AF_VSOCK
//! streams are carried over Unix sockets on the host.
//!
//! - host -> guest: connect to `uds_path`, send `CONNECT <port>\n`, read
//!   `OK <host_port>\n`, then the stream is the connection.
//! - guest -> host: the guest connects to (CID 2, port P); the VMM connects to
//!   `<uds_path>_<P>`.
//!
//! Flow control is the spec's credit scheme: we never send the guest more than
//! its advertised buffer allows, and we advertise a fixed buffer per
//! connection; a guest that overruns it is reset, so host memory per
//! connection stays bounded whatever the guest does.

mod conn;
mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use packet::*;

pub use muxer::Limits;
use muxer::{Muxer, FIRST_LOCAL_PORT};

use crate::metrics::{inc, METRICS};

use super::{
    drain_queue, read_config_bytes, GuestMemoryMmap, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;

pub const HOST_CID: u64 = 2;
/// Longest a restored device holds packets for the guest while waiting for
/// it to handle the transport reset.
const RESET_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("vsock epoll: {0}")]
    Epoll(std::io::Error),
    #[error("guest CID {0} is reserved (must be >= 3)")]
    Cid(u64),
}

pub struct Vsock {
    acked: u64,
    config: [u8; 8],
    mux: Muxer,
    /// Where host data is read before it is written into an RX chain.
    scratch: Box<[u8]>,
    /// Set by a restore until the guest has handled the TRANSPORT_RESET
    /// (it refills and kicks the event queue): packets sent before that
    /// could be reset along with the stale sockets, leaving the host side
    /// waiting. Bounded, in case a driver never kicks.
    reset_pending_since: Option<std::time::Instant>,
}

impl Vsock {
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        Self::with_limits(cid, uds_path, Limits::default())
    }

    pub fn with_limits(cid: u64, uds_path: &Path, limits: Limits) -> Result<Vsock, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        Ok(Vsock {
            acked: 0,
            config: cid.to_le_bytes(),
            mux: Muxer::new(cid, uds_path, limits)?,
            scratch: vec![0u8; MAX_PAYLOAD as usize].into_boxed_slice(),
            reset_pending_since: None,
        })
    }

    /// The fd an event loop waits on; then it runs the RX queue.
    pub fn epoll_fd(&self) -> RawFd {
        self.mux.epoll_fd()
    }

    /// Fills RX buffers with what the muxer has for the guest. Returns
    /// true if any buffer was used.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if let Some(since) = self.reset_pending_since {
            if since.elapsed() < RESET_HOLD {
                return false;
            }
            self.reset_pending_since = None;
        }
        let mut used = false;
        while self.mux.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return used;
            };
            let head = chain.head_index();
            let cap = rx_capacity(&chain);
            let Some((h, n)) = self.mux.recv(cap, &mut self.scratch) else {
                // Nothing after all (a host stream had no data): the
                // buffer stays the driver's.
                queue.go_to_previous_position();
                return used;
            };
            let len = match write_rx(&chain, &h, &self.scratch[..n]) {
                Ok(len) => len,
                Err(e) => {
                    inc(&METRICS.vsock.bad_packets);
                    tracing::debug!("vsock: RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("vsock: add_used: {e}");
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        if queues.len() <= EVT_QUEUE {
            return false;
        }
        let mut used = false;
        if index == EVT_QUEUE {
            // The guest refilled the event queue: the reset is handled.
            self.reset_pending_since = None;
        }
        if index == TX_QUEUE {
            used |= drain_queue(&mut queues[TX_QUEUE], mem, "vsock TX", |chain| {
                match read_tx(chain) {
                    Ok((h, payload)) => self.mux.send(h, &payload),
                    Err(e) => {
                        inc(&METRICS.vsock.bad_packets);
                        tracing::debug!("vsock: bad TX packet: {e}")
                    }
                }
                0
            });
        }
        self.mux.poll_host();
        used |= self.fill_rx(&mut queues[RX_QUEUE], mem);
        used
    }

    fn poll_host_events(&mut self) {
        self.mux.poll_host();
    }

    /// After a restore no host connection exists: a TRANSPORT_RESET event
    /// makes the guest drop its connected sockets (listeners stay), as
    /// Firecracker does.
    fn restored(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(q) = queues.get_mut(EVT_QUEUE) else {
            return false;
        };
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset after restore");
            return false;
        };
        // The guest may still hold its sockets of the saved VMM's
        // connections until it handles the reset; new host connections
        // must not reuse their port numbers (a REQUEST on a stale 4-tuple
        // was ignored, costing a 30 s retry). Start at a random port.
        let r =
            std::hash::BuildHasher::build_hasher(&std::collections::hash_map::RandomState::new());
        let offset = (std::hash::Hasher::finish(&r) % (1 << 29)) as u32;
        self.mux.next_local_port = FIRST_LOCAL_PORT + offset;
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id; }, id 0 = TRANSPORT_RESET.
        let len = crate::devices::virtio::write_chain(&chain, &[&0u32.to_le_bytes()]).unwrap_or(0);
        let used = q.add_used(mem, head, len).is_ok();
        if used {
            self.reset_pending_since = Some(std::time::Instant::now());
        }
        used
    }

    fn reset(&mut self) {
        self.mux.clear();
    }
}
