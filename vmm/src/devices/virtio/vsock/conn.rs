//! One vsock connection between a guest port and a host Unix stream: its
//! state, its credit, and the control packets it owes the guest.
//!
//! A connection never queues packets: it holds at most one pending flag per
//! control packet kind, and its data stays in the host stream until the
//! guest has both credit and an RX buffer. So what a connection holds for
//! the guest is a few bytes, whatever the guest does; what it holds for the
//! host (`to_host`) is bounded by the credit we advertise and by the
//! muxer's budget across connections.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::*;

/// A connection's key: (our port on CID 2, the guest's port).
pub(super) type Key = (u32, u32);

/// What we advertise per connection; also the most we buffer for it.
pub(super) const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Host connected and sent CONNECT; waiting for the guest's RESPONSE.
    HostConnecting,
    Established,
}

/// Control packets a connection owes the guest, sent in this order as RX
/// buffers arrive.
pub(super) mod owed {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
    pub const SHUTDOWN: u8 = 8;
}

pub(super) struct Conn {
    pub stream: UnixStream,
    /// The stream's token in the muxer's epoll.
    pub token: u64,
    pub state: State,
    pub local_port: u32,
    pub peer_port: u32,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    pub tx_cnt: u32,
    /// Bytes from the guest we handed to the host stream.
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    /// Guest data not yet accepted by the host stream (bounded by BUF_ALLOC).
    pub to_host: VecDeque<u8>,
    /// The host stream had data last we looked (edge-triggered epoll).
    pub readable: bool,
    /// We read the host stream's end and told the guest (SHUTDOWN SEND).
    pub host_eof: bool,
    /// The host closed its end altogether (HUP), not only its write side.
    pub host_gone: bool,
    /// Guest will send no more: shut the host stream's write side once flushed.
    pub guest_send_done: bool,
    /// That shutdown is done (once: each one is a new epoll event, and
    /// shutting down again on it spun the event loop).
    pub host_write_shut: bool,
    /// The guest closed; the conn lives only until `to_host` is flushed.
    pub closing: bool,
    /// `owed` flags, and the flags of the owed SHUTDOWN.
    pub owed: u8,
    pub shutdown_flags: u32,
    /// In the muxer's RX queue (at most once).
    pub queued: bool,
    /// When the muxer drops the connection if it has not ended by itself.
    pub kill_at: Option<Instant>,
}

impl Conn {
    /// A connection with nothing sent or received yet; the guest's buffer is
    /// unknown (0) until its first packet says.
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            token: 0,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            readable: false,
            host_eof: false,
            host_gone: false,
            guest_send_done: false,
            host_write_shut: false,
            closing: false,
            owed: 0,
            shutdown_flags: 0,
            queued: false,
            kill_at: None,
        }
    }

    /// How much more the guest can take from us.
    pub fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .wrapping_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
            .min(self.peer_buf_alloc)
    }

    /// Host data may be waiting and the guest has room for it.
    pub fn wants_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.closing
            && self.peer_free() > 0
    }

    /// The connection has a packet for the guest.
    pub fn has_rx(&self) -> bool {
        self.owed != 0 || self.wants_data()
    }

    /// Takes the next owed control packet's op and flags.
    pub fn take_owed(&mut self) -> Option<(u16, u32)> {
        for (bit, op) in [
            (owed::REQUEST, OP_REQUEST),
            (owed::RESPONSE, OP_RESPONSE),
            (owed::CREDIT_UPDATE, OP_CREDIT_UPDATE),
            (owed::SHUTDOWN, OP_SHUTDOWN),
        ] {
            if self.owed & bit != 0 {
                self.owed &= !bit;
                let flags = if op == OP_SHUTDOWN {
                    self.shutdown_flags
                } else {
                    0
                };
                return Some((op, flags));
            }
        }
        None
    }

    /// A header from us (CID 2) on this connection to guest `cid`.
    pub fn hdr(&self, cid: u64, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: super::HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}
