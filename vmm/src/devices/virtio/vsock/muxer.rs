//! The vsock muxer: guest packets to host Unix streams and back, with
//! every piece of state bounded by `Limits`, never by the guest.
//!
//! - Connections: at most `max_connections` (host- and guest-initiated,
//!   with host connections still sending their CONNECT line).
//! - Packets for the guest: none are queued per packet. A connection owes
//!   the guest at most one control packet of each kind (conn.rs), and the
//!   RX queue holds each connection at most once, served round robin, so
//!   one busy connection cannot starve the others. RSTs for connections
//!   that no longer exist (or never did) wait in a queue of
//!   `max_orphan_rsts`; past that they are dropped, as a guest that sends
//!   to nowhere and never posts RX buffers deserves.
//! - Guest data the host has not read: per connection at most the credit
//!   we advertise, and across connections `max_buffered`; a connection
//!   whose data would go past that is reset.
//! - Connections that linger: a host-initiated one the guest never
//!   answers, one whose host end is gone but the guest keeps open, one the
//!   guest closed whose data the host never reads: each is killed after a
//!   timeout (a timerfd in the muxer's epoll wakes the event loop).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{owed, Conn, Key, State, BUF_ALLOC};
use super::packet::*;
use super::{VsockError, HOST_CID};
use crate::metrics::{add, inc, METRICS};

/// Host ports for host-initiated connections start here (as in Firecracker).
pub(super) const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;

/// Batches of 64 host events handled per poll.
const MAX_EVENT_BATCHES: usize = 16;

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;

/// The muxer's bounds. The defaults are the VMM's; tests use small ones.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections, established or being set up; further ones are refused.
    pub max_connections: usize,
    /// Guest data held for host streams that do not read, all connections.
    pub max_buffered: usize,
    /// RSTs for gone connections waiting for RX buffers.
    pub max_orphan_rsts: usize,
    /// How long the guest has to answer a host connection's REQUEST.
    pub connect_timeout: Duration,
    /// How long a connection may take to end once either side closed it.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_buffered: 8 << 20,
            max_orphan_rsts: 256,
            // Generous: a guest kernel emulated instruction by instruction
            // answers slowly, and a restored one holds packets for a while.
            connect_timeout: Duration::from_secs(30),
            // Firecracker gives a closing connection 2 s.
            shutdown_timeout: Duration::from_secs(2),
        }
    }
}

/// A connection accepted on the listener, before its CONNECT line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

pub(super) struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    limits: Limits,
    conns: HashMap<Key, Conn>,
    pending: HashMap<u64, Pending>,
    /// Epoll token of each established connection's stream.
    tokens: HashMap<u64, Key>,
    next_token: u64,
    pub next_local_port: u32,
    /// Connections with something for the guest, each at most once.
    rxq: VecDeque<Key>,
    /// RSTs for connections that are gone.
    orphan_rsts: VecDeque<Header>,
    /// Memory held for guest data across all connections: the capacity of
    /// every `Conn::to_host`, not only what is in them.
    buffered: usize,
    /// The earliest `kill_at` of any connection (the timer is set to it).
    next_kill: Option<Instant>,
}

impl Muxer {
    pub fn new(cid: u64, uds_path: &Path, limits: Limits) -> Result<Muxer, VsockError> {
        let listen_err = |source| VsockError::Listen {
            path: uds_path.display().to_string(),
            source,
        };
        // A stale socket from a dead VMM would make bind fail.
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VsockError::Epoll)?;
        }
        Ok(Muxer {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            limits,
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 0,
            next_local_port: FIRST_LOCAL_PORT,
            rxq: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            buffered: 0,
            next_kill: None,
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Something waits for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Drops every connection and packet (a device reset).
    pub fn clear(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.orphan_rsts.clear();
        self.rxq.clear();
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

    /// Queues an RST for a connection that is gone, if there is room.
    fn push_rst(&mut self, h: Header) {
        if self.orphan_rsts.len() < self.limits.max_orphan_rsts {
            self.orphan_rsts.push_back(h);
        } else {
            inc(&METRICS.vsock.dropped_rsts);
        }
    }

    /// Resets connection `key`: an RST to the guest, and it is gone.
    fn reset_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.get(&key) {
            let h = c.hdr(self.cid, OP_RST, 0, 0);
            self.push_rst(h);
            self.remove(key);
        }
    }

    /// Puts `key` on the RX queue if it has something for the guest.
    fn requeue(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx() {
                c.queued = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// Connection `key` owes the guest control packet `bit`.
    fn owe(&mut self, key: Key, bit: u8) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.owed |= bit;
        }
        self.requeue(key);
    }

    /// Connection `key` is dropped at `after` from now unless it ends first.
    fn kill_after(&mut self, key: Key, after: Duration) {
        let at = Instant::now() + after;
        if let Some(c) = self.conns.get_mut(&key) {
            c.kill_at = Some(at);
            if self.next_kill.is_none_or(|k| at < k) {
                self.next_kill = Some(at);
                self.arm_timer(at);
            }
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        // A zero duration would disarm the timer: fire in a microsecond.
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        if let Err(e) = self.timer.reset(d, None) {
            tracing::warn!("vsock: kill timer: {e}");
        }
    }

    /// Drops the connections whose time is up; sets the timer to the next
    /// deadline (or disarms it). `fired`: the timer went off, and must be
    /// set again, or its readiness would wake the event loop forever.
    fn kill_expired(&mut self, fired: bool) {
        let now = Instant::now();
        let due = self.next_kill.is_some_and(|k| k <= now);
        if !due && !fired {
            return;
        }
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.kill_at.is_some_and(|k| k <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!("vsock: connection {key:?} did not end in time; reset");
            inc(&METRICS.vsock.killed);
            self.reset_conn(key);
        }
        self.next_kill = self.conns.values().filter_map(|c| c.kill_at).min();
        match self.next_kill {
            Some(at) => self.arm_timer(at),
            None => {
                if let Err(e) = self.timer.clear() {
                    tracing::warn!("vsock: kill timer: {e}");
                }
            }
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1) % (u64::MAX - 2);
        self.next_token
    }

    fn insert(&mut self, key: Key, mut c: Conn) {
        c.token = self.token();
        let ev = EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            c.token,
        );
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, c.stream.as_raw_fd(), ev)
        {
            tracing::warn!("vsock: epoll add: {e}");
        }
        self.tokens.insert(c.token, key);
        self.conns.insert(key, c);
    }

    fn remove(&mut self, key: Key) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.buffered -= c.to_host.capacity();
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        self.tokens.remove(&c.token);
        if c.queued {
            // A connection of the same ports may come next; it must not
            // find this one's place (the queue would grow with every
            // reconnect).
            self.rxq.retain(|k| *k != key);
        }
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

    fn connections(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Handles host-side events without blocking.
    pub fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let mut fired = false;
        // A bounded number of batches: events that keep coming (a busy
        // host, or a bug that makes its own events) are left for the next
        // wake-up instead of holding the guest's vCPU here.
        for _ in 0..MAX_EVENT_BATCHES {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                fired |= ev.data() == TOKEN_TIMER;
                self.host_event(ev.data(), ev.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        self.kill_expired(fired);
    }

    fn host_event(&mut self, token: u64, set: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept();
            return;
        }
        if token == TOKEN_TIMER {
            return; // poll_host runs kill_expired
        }
        if self.pending.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(key) = self.tokens.get(&token).copied() else {
            return;
        };
        if set.contains(EventSet::HANG_UP) {
            self.host_gone(key);
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::ERROR) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.readable = true;
            }
            self.requeue(key);
        }
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
    }

    /// The host closed its end of `key` altogether. What it wrote is still
    /// read; once its end is read, the guest is told both directions are
    /// done and has `shutdown_timeout` to reset the connection.
    fn host_gone(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.host_gone {
            return;
        }
        c.host_gone = true;
        c.readable = true;
        if c.host_eof {
            // SHUTDOWN SEND went out already; now the rest.
            c.shutdown_flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
            self.owe(key, owed::SHUTDOWN);
            self.kill_after(key, self.limits.shutdown_timeout);
        }
        self.requeue(key);
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.connections() >= self.limits.max_connections
                        || s.set_nonblocking(true).is_err()
                    {
                        inc(&METRICS.vsock.refused);
                        continue; // dropped: closes the stream
                    }
                    let t = self.token();
                    let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, t);
                    if self
                        .epoll
                        .ctl(ControlOperation::Add, s.as_raw_fd(), ev)
                        .is_err()
                    {
                        continue;
                    }
                    let p = Pending {
                        stream: s,
                        line: Vec::new(),
                    };
                    self.pending.insert(t, p);
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
                Ok(0) => return self.drop_pending(token),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => {
                    p.line.push(byte[0]);
                    if p.line.len() > MAX_CONNECT_LINE {
                        tracing::debug!("vsock: CONNECT line too long");
                        return self.drop_pending(token);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_pending(token),
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
        let key = (local_port, peer_port);
        inc(&METRICS.vsock.host_connections);
        self.insert(
            key,
            Conn::new(p.stream, State::HostConnecting, local_port, peer_port),
        );
        self.owe(key, owed::REQUEST);
        self.kill_after(key, self.limits.connect_timeout);
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
    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut progress = false;
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    add(&METRICS.vsock.tx_bytes, n as u64);
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The host end is gone: tell the guest.
                Err(_) => return self.reset_conn(key),
            }
        }
        // Give memory back: a burst must not stay resident, neither in an
        // empty buffer nor in one the host has mostly read.
        let before = c.to_host.capacity();
        if c.to_host.is_empty() {
            c.to_host = VecDeque::new();
        } else if before > 2 * c.to_host.len() + 4096 {
            c.to_host.shrink_to_fit();
        }
        self.buffered = self.buffered - before + c.to_host.capacity();
        if c.to_host.is_empty() {
            if c.closing {
                // Everything the guest sent has reached the host: close.
                return self.remove(key);
            }
            if c.guest_send_done && !c.host_write_shut {
                c.host_write_shut = true;
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        let closing = c.closing;
        // Tell the guest about freed buffer space once half of it is free.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            self.owe(key, owed::CREDIT_UPDATE);
        }
        if closing && progress {
            self.kill_after(key, self.limits.shutdown_timeout);
        }
    }

    /// Hands a guest's data to the host stream, holding what it does not
    /// take yet within the credit and the muxer's budget.
    fn guest_data(&mut self, key: Key, h: &Header, mut payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return self.push_rst(self.rst_for(h));
        };
        if c.state != State::Established
            || c.closing
            || c.to_host.len() + payload.len() > BUF_ALLOC as usize
        {
            // Data before the connection exists, or beyond the credit we
            // gave: the guest broke the protocol.
            tracing::debug!("vsock: guest overran its credit on port {}", h.src_port);
            return self.reset_conn(key);
        }
        if c.to_host.is_empty() {
            // Straight to the host when it takes it: nothing held.
            match c.stream.write(payload) {
                Ok(n) => {
                    add(&METRICS.vsock.tx_bytes, n as u64);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    payload = &payload[n..];
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return self.reset_conn(key),
            }
        }
        // What the connection's buffer will take: its capacity, which is
        // what holds memory (a buffer mostly drained still holds it all).
        let before = c.to_host.capacity();
        let after = before.max(c.to_host.len() + payload.len());
        if payload.is_empty() {
            return self.flush_to_host(key);
        }
        if self.buffered - before + after > self.limits.max_buffered {
            tracing::warn!(
                "vsock: host streams hold {} bytes of guest data, the most allowed; \
                 connection to host port {} reset",
                self.buffered,
                key.0
            );
            inc(&METRICS.vsock.over_budget);
            return self.reset_conn(key);
        }
        c.to_host.reserve_exact(payload.len());
        c.to_host.extend(payload);
        self.buffered = self.buffered - before + c.to_host.capacity();
        self.flush_to_host(key);
    }

    /// Handles one packet the guest sent.
    pub fn send(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: packet from cid {} to cid {} dropped",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        if h.type_ != TYPE_STREAM {
            return self.push_rst(self.rst_for(&h));
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            // The guest may now have room for data we hold back.
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_connect(&h),
            OP_RESPONSE => self.guest_accepted(key, &h),
            OP_RW => self.guest_data(key, &h, payload),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    self.owe(key, owed::CREDIT_UPDATE);
                }
            }
            OP_SHUTDOWN => self.guest_shutdown(key, h.flags),
            OP_RST => {
                inc(&METRICS.vsock.resets);
                self.remove(key)
            }
            _ => self.push_rst(self.rst_for(&h)),
        }
        self.requeue(key);
    }

    fn guest_accepted(&mut self, key: Key, h: &Header) {
        match self.conns.get_mut(&key) {
            Some(c) if c.state == State::HostConnecting => {
                c.state = State::Established;
                c.kill_at = None;
                let line = format!("OK {}\n", c.local_port);
                // The stream is fresh; a short ack fits its buffer.
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.reset_conn(key);
                }
            }
            _ => self.push_rst(self.rst_for(h)),
        }
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        if flags & both == both {
            // The guest is done. Acknowledge with RST so it can free the
            // socket, but keep what it sent until it reaches the host:
            // closing is orderly, not a reset.
            c.closing = true;
            c.guest_send_done = true;
            c.owed = 0;
            let rst = c.hdr(self.cid, OP_RST, 0, 0);
            self.push_rst(rst);
            self.kill_after(key, self.limits.shutdown_timeout);
            self.flush_to_host(key);
        } else if flags & SHUTDOWN_SEND != 0 {
            c.guest_send_done = true;
            self.flush_to_host(key);
        }
    }

    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.connections() >= self.limits.max_connections {
            inc(&METRICS.vsock.refused);
            return self.push_rst(self.rst_for(h));
        }
        let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connection to {path}: {e}");
                return self.push_rst(self.rst_for(h));
            }
        };
        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        // The host end may have written before we registered it (edge-triggered).
        c.readable = true;
        inc(&METRICS.vsock.guest_connections);
        self.insert(key, c);
        self.owe(key, owed::RESPONSE);
    }

    /// The next packet for the guest, for an RX buffer with room for `cap`
    /// payload bytes; its payload goes to the start of `buf`. None when no
    /// connection has anything after all (its host stream had no data).
    pub fn recv(&mut self, cap: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.orphan_rsts.pop_front() {
            return Some((h, 0));
        }
        // Each connection once: one with nothing after all goes back to
        // the queue's end, and must not be tried again in this call.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            let pkt = self.conn_rx(key, cap, buf);
            // To the back: the next buffer goes to the next connection.
            self.requeue(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Connection `key`'s next packet: an owed control packet, else data.
    fn conn_rx(&mut self, key: Key, cap: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        let cid = self.cid;
        let c = self.conns.get_mut(&key)?;
        if let Some((op, flags)) = c.take_owed() {
            if op == OP_CREDIT_UPDATE || op == OP_RESPONSE {
                c.last_fwd_cnt_sent = c.fwd_cnt;
            }
            return Some((c.hdr(cid, op, 0, flags), 0));
        }
        if !c.wants_data() {
            return None;
        }
        let want = cap.min(c.peer_free() as usize).min(buf.len());
        if want == 0 {
            return None;
        }
        match c.stream.read(&mut buf[..want]) {
            Ok(0) => {
                // The host closed its write side (or all of it): the guest
                // reads EOF but may still send; if the host end is fully
                // gone, it has `shutdown_timeout` to finish.
                c.host_eof = true;
                let gone = c.host_gone;
                let flags = if gone {
                    SHUTDOWN_SEND | SHUTDOWN_RCV
                } else {
                    SHUTDOWN_SEND
                };
                let h = c.hdr(cid, OP_SHUTDOWN, 0, flags);
                if gone {
                    self.kill_after(key, self.limits.shutdown_timeout);
                }
                Some((h, 0))
            }
            Ok(n) => {
                add(&METRICS.vsock.rx_bytes, n as u64);
                let h = c.hdr(cid, OP_RW, n as u32, 0);
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.last_fwd_cnt_sent = c.fwd_cnt;
                Some((h, n))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.readable = false;
                None
            }
            Err(_) => {
                let h = c.hdr(cid, OP_RST, 0, 0);
                self.remove(key);
                Some((h, 0))
            }
        }
    }

    #[cfg(test)]
    pub fn stats(&self) -> (usize, usize, usize, usize) {
        (
            self.conns.len(),
            self.rxq.len(),
            self.orphan_rsts.len(),
            self.buffered,
        )
    }
}

/// Connects to a host Unix socket without waiting: a listener whose
/// backlog is full refuses (EAGAIN) instead of stalling the thread that
/// runs the guest's device, which a guest could otherwise do at will by
/// connecting faster than the host program accepts.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket(2) call; the fd is owned by the UnixStream
    // below (or closed by it on error).
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just created and nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un for the length given.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
