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

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use packet::*;

use crate::metrics::{add, inc, METRICS};

use super::{
    drain_queue, read_config_bytes, GuestMemoryMmap, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;

pub const HOST_CID: u64 = 2;
/// What we advertise per connection; also the most we buffer for it.
const BUF_ALLOC: u32 = 256 * 1024;
/// Host ports for host-initiated connections start here (as in Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest a restored device holds packets for the guest while waiting for
/// it to handle the transport reset.
const RESET_HOLD: std::time::Duration = std::time::Duration::from_secs(2);
/// Most simultaneous connections; further ones are refused.
const MAX_CONNECTIONS: usize = 1024;
/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;

const TOKEN_LISTENER: u64 = u64::MAX;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host connected and sent CONNECT; waiting for the guest's RESPONSE.
    HostConnecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Our port (CID 2 side) and the guest's.
    local_port: u32,
    peer_port: u32,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest we handed to the host stream.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest data not yet accepted by the host stream (bounded by BUF_ALLOC).
    to_host: VecDeque<u8>,
    /// The host stream had data last we looked (edge-triggered epoll).
    readable: bool,
    /// The host closed its end; SHUTDOWN sent, waiting for the guest's RST.
    host_eof: bool,
    /// Guest will send no more: shut the host stream's write side once flushed.
    guest_send_done: bool,
    /// The guest closed; the conn lives only until `to_host` is flushed.
    closing: bool,
}

impl Conn {
    /// A connection with nothing sent or received yet; the guest's buffer is
    /// unknown (0) until its first packet says.
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
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
            guest_send_done: false,
            closing: false,
        }
    }

    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .wrapping_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
            .min(self.peer_buf_alloc)
    }
}

/// A connection accepted on the listener, before its CONNECT line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    acked: u64,
    config: [u8; 8],
    conns: HashMap<(u32, u32), Conn>,
    pending: HashMap<u64, Pending>,
    /// Tokens of established conns by stream: epoll token -> key.
    tokens: HashMap<u64, (u32, u32)>,
    next_token: u64,
    next_local_port: u32,
    /// Set by a restore until the guest has handled the TRANSPORT_RESET
    /// (it refills and kicks the event queue): packets sent before that
    /// could be reset along with the stale sockets, leaving the host side
    /// waiting. Bounded, in case a driver never kicks.
    reset_pending_since: Option<std::time::Instant>,
    /// Control packets waiting for RX buffers.
    rx_control: VecDeque<Header>,
}

/// A packet header from us (CID 2) on connection `c` to guest CID `cid`.
fn hdr(cid: u64, c: &Conn, op: u16, len: u32, flags: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

fn set_nonblocking(s: &UnixStream) -> std::io::Result<()> {
    s.set_nonblocking(true)
}

impl Vsock {
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        // A stale socket from a dead VMM would make bind fail.
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Listen {
            path: uds_path.display().to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Listen {
                path: uds_path.display().to_string(),
                source,
            })?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            acked: 0,
            config: cid.to_le_bytes(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 0,
            next_local_port: FIRST_LOCAL_PORT,
            reset_pending_since: None,
            rx_control: VecDeque::new(),
        })
    }

    /// The fd an event loop waits on; then it runs the RX queue.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn rst_for(&self, h: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1) % (u64::MAX - 1);
        self.next_token
    }

    fn register(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let fd = c.stream.as_raw_fd();
        let t = self.token();
        let ev = EpollEvent::new(EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED, t);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
            tracing::warn!("vsock: epoll add: {e}");
        }
        self.tokens.insert(t, key);
    }

    fn remove(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.retain(|_, k| *k != key);
    }

    fn free_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    /// Handles host-side events without blocking.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll wait: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_LISTENER {
                    self.accept();
                } else if self.pending.contains_key(&token) {
                    self.read_connect_line(token);
                } else if let Some(key) = self.tokens.get(&token).copied() {
                    let set = ev.event_set();
                    if set.intersects(
                        EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
                    ) {
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.readable = true;
                        }
                    }
                    if set.contains(EventSet::OUT) {
                        self.flush_to_host(key);
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
                        || set_nonblocking(&s).is_err()
                    {
                        continue; // dropped: closes the stream
                    }
                    let t = self.token();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            s.as_raw_fd(),
                            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, t),
                        )
                        .is_err()
                    {
                        continue;
                    }
                    self.pending.insert(
                        t,
                        Pending {
                            stream: s,
                            line: Vec::new(),
                        },
                    );
                    // Data may already be there (edge-triggered).
                    self.read_connect_line(t);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: nothing after the newline may be consumed, it belongs
        // to the connection.
        loop {
            match p.stream.read(&mut byte) {
                Ok(0) => {
                    self.drop_pending(token);
                    return;
                }
                Ok(_) => {
                    if byte[0] == b'\n' {
                        break;
                    }
                    p.line.push(byte[0]);
                    if p.line.len() > MAX_CONNECT_LINE {
                        tracing::debug!("vsock: CONNECT line too long");
                        self.drop_pending(token);
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.drop_pending(token);
                    return;
                }
            }
        }
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let line = String::from_utf8_lossy(&p.line);
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            tracing::debug!("vsock: bad CONNECT line {line:?}");
            let mut s = p.stream;
            let _ = s.write_all(b"ERR bad CONNECT line\n");
            return;
        };
        let local_port = self.free_local_port();
        let c = Conn::new(p.stream, State::HostConnecting, local_port, peer_port);
        inc(&METRICS.vsock.host_connections);
        let h = hdr(self.cid, &c, OP_REQUEST, 0, 0);
        self.conns.insert((local_port, peer_port), c);
        self.register((local_port, peer_port));
        self.rx_control.push_back(h);
    }

    fn drop_pending(&mut self, token: u64) {
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Writes buffered guest data to the host stream.
    fn flush_to_host(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    add(&METRICS.vsock.tx_bytes, n as u64);
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The host end is gone: tell the guest.
                    let h = hdr(self.cid, &self.conns[&key], OP_RST, 0, 0);
                    self.rx_control.push_back(h);
                    self.remove(key);
                    return;
                }
            }
        }
        let c = &self.conns[&key];
        if c.to_host.is_empty() && c.closing {
            // Everything the guest sent has reached the host: close.
            self.remove(key);
            return;
        }
        if c.to_host.is_empty() && c.guest_send_done {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        // Tell the guest about freed buffer space once half of it is free.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
            let h = hdr(self.cid, c, OP_CREDIT_UPDATE, 0, 0);
            self.rx_control.push_back(h);
            if let Some(c) = self.conns.get_mut(&key) {
                c.last_fwd_cnt_sent = c.fwd_cnt;
            }
        }
    }

    /// Handles one packet the guest sent.
    fn handle_tx(&mut self, h: Header, payload: Vec<u8>) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: packet from cid {} to cid {} dropped",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.rx_control.push_back(self.rst_for(&h));
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            // The guest may now have room for data we hold back.
        }
        match h.op {
            OP_REQUEST => self.guest_connect(h),
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::HostConnecting => {
                    c.state = State::Established;
                    let line = format!("OK {}\n", c.local_port);
                    // The stream is fresh; a short ack fits its buffer.
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        let rst = hdr(self.cid, &self.conns[&key], OP_RST, 0, 0);
                        self.rx_control.push_back(rst);
                        self.remove(key);
                    }
                }
                _ => self.rx_control.push_back(self.rst_for(&h)),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.rx_control.push_back(self.rst_for(&h));
                    return;
                };
                if c.state != State::Established
                    || c.closing
                    || c.to_host.len() + payload.len() > BUF_ALLOC as usize
                {
                    // Data before the connection exists, or beyond the credit
                    // we gave: the guest broke the protocol.
                    tracing::debug!("vsock: guest overran its credit on port {}", h.src_port);
                    let rst = hdr(self.cid, c, OP_RST, 0, 0);
                    self.rx_control.push_back(rst);
                    self.remove(key);
                    return;
                }
                c.to_host.extend(payload);
                self.flush_to_host(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    let u = hdr(self.cid, &self.conns[&key], OP_CREDIT_UPDATE, 0, 0);
                    self.rx_control.push_back(u);
                }
            }
            OP_SHUTDOWN => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                if h.flags & both == both {
                    // The guest is done. Acknowledge with RST so it can free
                    // the socket, but keep what it sent until it reaches the
                    // host: closing is orderly, not a reset.
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.closing = true;
                        c.guest_send_done = true;
                        let rst = hdr(self.cid, c, OP_RST, 0, 0);
                        self.rx_control.push_back(rst);
                    }
                    self.flush_to_host(key);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.guest_send_done = true;
                    }
                    self.flush_to_host(key);
                }
            }
            OP_RST => {
                inc(&METRICS.vsock.resets);
                self.remove(key)
            }
            _ => self.rx_control.push_back(self.rst_for(&h)),
        }
    }

    fn guest_connect(&mut self, h: Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.rx_control.push_back(self.rst_for(&h));
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
        let stream = match UnixStream::connect(&path) {
            Ok(s) if set_nonblocking(&s).is_ok() => s,
            _ => {
                self.rx_control.push_back(self.rst_for(&h));
                return;
            }
        };
        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        // The host end may have written before we registered it (edge-triggered).
        c.readable = true;
        inc(&METRICS.vsock.guest_connections);
        let resp = hdr(self.cid, &c, OP_RESPONSE, 0, 0);
        self.conns.insert(key, c);
        self.register(key);
        self.rx_control.push_back(resp);
    }

    /// Fills RX buffers: control packets first, then host data the guest has
    /// credit for. Returns true if any buffer was used.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if let Some(since) = self.reset_pending_since {
            if since.elapsed() < RESET_HOLD {
                return false;
            }
            self.reset_pending_since = None;
        }
        let mut used = false;
        loop {
            // Is there anything to send?
            let data_key = self
                .conns
                .iter()
                .find(|(_, c)| {
                    c.state == State::Established
                        && c.readable
                        && !c.host_eof
                        && !c.closing
                        && c.peer_free() > 0
                })
                .map(|(k, _)| *k);
            if self.rx_control.is_empty() && data_key.is_none() {
                return used;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return used;
            };
            let head = chain.head_index();
            let cap = rx_capacity(&chain);
            let len = if let Some(h) = self.rx_control.pop_front() {
                write_rx(&chain, &h, &[]).unwrap_or(0)
            } else if let Some(key) = data_key {
                self.rx_data(key, &chain, cap)
            } else {
                0
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("vsock: add_used: {e}");
            }
            used = true;
        }
    }

    /// Reads host data for one connection into an RX chain.
    fn rx_data(
        &mut self,
        key: (u32, u32),
        chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        cap: usize,
    ) -> u32 {
        let Some(c) = self.conns.get_mut(&key) else {
            return 0;
        };
        let want = cap.min(c.peer_free() as usize);
        if want == 0 {
            // Not even room for a header: hand the buffer back empty.
            return 0;
        }
        let mut buf = vec![0u8; want];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                // The host closed its write side (or all of it): the guest
                // reads EOF but may still send; if the host end is fully gone,
                // the next write to it fails and resets the connection.
                c.host_eof = true;
                let h = hdr(self.cid, c, OP_SHUTDOWN, 0, SHUTDOWN_SEND);
                write_rx(chain, &h, &[]).unwrap_or(0)
            }
            Ok(n) => {
                let h = hdr(self.cid, c, OP_RW, n as u32, 0);
                match write_rx(chain, &h, &buf[..n]) {
                    Ok(w) => {
                        add(&METRICS.vsock.rx_bytes, n as u64);
                        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        c.last_fwd_cnt_sent = c.fwd_cnt;
                        w
                    }
                    Err(e) => {
                        tracing::warn!("vsock: RX buffer: {e}");
                        0
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.readable = false;
                // The chain goes back unused (len 0), as the spec allows.
                0
            }
            Err(_) => {
                let h = hdr(self.cid, c, OP_RST, 0, 0);
                let n = write_rx(chain, &h, &[]).unwrap_or(0);
                self.remove(key);
                n
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
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
                    Ok((h, payload)) => self.handle_tx(h, payload),
                    Err(e) => {
                        inc(&METRICS.vsock.bad_packets);
                        tracing::debug!("vsock: bad TX packet: {e}")
                    }
                }
                0
            });
        }
        self.poll_host();
        used |= self.fill_rx(&mut queues[RX_QUEUE], mem);
        used
    }

    fn poll_host_events(&mut self) {
        self.poll_host();
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
        self.next_local_port = FIRST_LOCAL_PORT + offset;
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
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.rx_control.clear();
    }
}
