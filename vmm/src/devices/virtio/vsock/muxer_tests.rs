//! The muxer against real host Unix streams, with the guest played by
//! packets: what a well-behaved guest gets, and that a hostile one (floods,
//! no RX buffers, credit overruns, connections held open) finds every
//! piece of state bounded.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::*;

const CID: u64 = 3;

struct T {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mux: Muxer,
}

fn muxer(limits: Limits) -> T {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mux = Muxer::new(CID, &uds, limits).unwrap();
    T {
        _dir: dir,
        uds,
        mux,
    }
}

/// A header from the guest (CID 3) port `src` to host port `dst`.
fn from_guest(op: u16, src: u32, dst: u32, len: u32, flags: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    }
}

impl T {
    /// Everything the muxer has for the guest, with RX buffers of `cap`.
    fn drain(&mut self, cap: usize) -> Vec<(Header, Vec<u8>)> {
        let mut buf = vec![0u8; MAX_PAYLOAD as usize];
        let mut out = Vec::new();
        while let Some((h, n)) = self.mux.recv(cap, &mut buf) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    /// A host program listening on guest-connectable port `port`.
    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds.display())).unwrap()
    }

    /// The guest connects from `src` to host port `dst`; the muxer answers.
    fn guest_connects(&mut self, src: u32, dst: u32) -> Header {
        self.mux.send(from_guest(OP_REQUEST, src, dst, 0, 0), &[]);
        let got = self.drain(0);
        let answer = got.iter().find(|(h, _)| h.dst_port == src);
        answer.unwrap_or_else(|| panic!("no answer: {got:?}")).0
    }

    /// A host program connects to guest port `port`; returns its stream
    /// and the REQUEST the guest gets.
    fn host_connects(&mut self, port: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.mux.poll_host();
        let got = self.drain(0);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, OP_REQUEST);
        (s, got[0].0)
    }
}

#[test]
fn host_connection_handshake_and_data_both_ways() {
    let mut t = muxer(Limits::default());
    let (mut host, req) = t.host_connects(1024);
    assert_eq!((req.dst_cid, req.dst_port), (CID, 1024));
    // The guest accepts: the host reads OK and our port.
    t.mux
        .send(from_guest(OP_RESPONSE, 1024, req.src_port, 0, 0), &[]);
    let mut ok = [0u8; 32];
    let n = host.read(&mut ok).unwrap();
    assert_eq!(
        std::str::from_utf8(&ok[..n]).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    t.mux
        .send(from_guest(OP_RW, 1024, req.src_port, 5, 0), b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    host.write_all(b"world").unwrap();
    t.mux.poll_host();
    let rx = t.drain(4096);
    assert_eq!(rx.len(), 1, "{rx:?}");
    assert_eq!((rx[0].0.op, rx[0].1.as_slice()), (OP_RW, &b"world"[..]));
    assert_eq!(rx[0].0.fwd_cnt, 5, "our header says what reached the host");
}

#[test]
fn rsts_to_nowhere_are_bounded_without_rx_buffers() {
    let mut t = muxer(Limits {
        max_orphan_rsts: 8,
        ..Limits::default()
    });
    // No listener on port 9: every REQUEST is refused; the guest posts no
    // RX buffers, so the RSTs pile up, but only to the bound.
    for src in 0..10_000 {
        t.mux.send(from_guest(OP_REQUEST, src, 9, 0, 0), &[]);
        // Packets of other kinds to nowhere too.
        t.mux.send(from_guest(OP_RW, src, 9, 1, 0), b"x");
    }
    assert_eq!(t.mux.stats(), (0, 0, 8, 0));
    assert_eq!(t.drain(0).len(), 8);
}

#[test]
fn connections_are_capped_and_reconnects_do_not_grow_the_rx_queue() {
    let mut t = muxer(Limits {
        max_connections: 16,
        max_orphan_rsts: 4,
        ..Limits::default()
    });
    let _l = t.listen(5000);
    for src in 0..100 {
        t.mux.send(from_guest(OP_REQUEST, src, 5000, 0, 0), &[]);
    }
    let (conns, rxq, rsts, _) = t.mux.stats();
    assert_eq!((conns, rxq), (16, 16), "16 owe a RESPONSE");
    assert!(rsts <= 4);
    // Connect, reset, connect again, forever, without RX buffers.
    for _ in 0..1000 {
        t.mux.send(from_guest(OP_RST, 0, 5000, 0, 0), &[]);
        t.mux.send(from_guest(OP_REQUEST, 0, 5000, 0, 0), &[]);
    }
    let (conns, rxq, rsts, _) = t.mux.stats();
    assert_eq!((conns, rxq), (16, 16));
    assert!(rsts <= 4);
}

#[test]
fn rx_buffers_go_round_robin_between_busy_connections() {
    let mut t = muxer(Limits::default());
    let l = t.listen(5000);
    t.guest_connects(1, 5000);
    let (mut a, _) = l.accept().unwrap();
    t.guest_connects(2, 5000);
    let (mut b, _) = l.accept().unwrap();
    a.write_all(&[b'a'; 100]).unwrap();
    b.write_all(&[b'b'; 100]).unwrap();
    t.mux.poll_host();
    let rx = t.drain(10);
    assert_eq!(rx.len(), 20);
    let ports: Vec<u32> = rx.iter().map(|(h, _)| h.dst_port).collect();
    for pair in ports.chunks(2) {
        assert_ne!(pair[0], pair[1], "one connection took two turns: {ports:?}");
    }
}

#[test]
fn a_guest_beyond_its_credit_is_reset() {
    let mut t = muxer(Limits::default());
    let l = t.listen(5000);
    t.guest_connects(1, 5000);
    let (_host, _) = l.accept().unwrap(); // never reads
    let chunk = vec![7u8; MAX_PAYLOAD as usize];
    let mut sent = 0;
    while sent < 2 * BUF_ALLOC as usize {
        t.mux
            .send(from_guest(OP_RW, 1, 5000, MAX_PAYLOAD, 0), &chunk);
        sent += chunk.len();
        if t.mux.stats().0 == 0 {
            break;
        }
    }
    assert_eq!(t.mux.stats().0, 0, "the connection was reset");
    assert_eq!(t.mux.stats().3, 0, "its held data was freed");
    let rx = t.drain(0);
    assert!(rx.iter().any(|(h, _)| h.op == OP_RST && h.dst_port == 1));
}

#[test]
fn guest_data_the_host_does_not_read_stays_within_the_budget() {
    let budget = 300 * 1024;
    let mut t = muxer(Limits {
        max_buffered: budget,
        ..Limits::default()
    });
    let l = t.listen(5000);
    let mut hosts = Vec::new();
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    for src in 1..=32 {
        t.guest_connects(src, 5000);
        hosts.push(l.accept().unwrap().0); // never read
                                           // Up to the credit, as a well-behaved guest may.
        for _ in 0..(BUF_ALLOC / MAX_PAYLOAD) {
            t.mux
                .send(from_guest(OP_RW, src, 5000, MAX_PAYLOAD, 0), &chunk);
            assert!(t.mux.stats().3 <= budget, "held {}", t.mux.stats().3);
        }
    }
    let reset = t.drain(0).iter().filter(|(h, _)| h.op == OP_RST).count();
    assert!(reset > 0, "connections past the budget are reset");
    assert!(t.mux.stats().0 < 32);
}

/// The muxer's epoll fd becomes readable within `within` (an event loop
/// waiting on it wakes).
fn wakes(mux: &Muxer, within: Duration) -> bool {
    let outer = Epoll::new().unwrap();
    outer
        .ctl(
            ControlOperation::Add,
            mux.epoll_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )
        .unwrap();
    let mut ev = [EpollEvent::default(); 1];
    outer.wait(within.as_millis() as i32, &mut ev).unwrap() == 1
}

/// Runs the muxer as its event loop would, waking on its epoll fd, until
/// it has no connection left; fails if it stops waking first.
fn runs_until_no_connection(t: &mut T) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.mux.stats().0 > 0 {
        assert!(std::time::Instant::now() < deadline, "connections remain");
        assert!(
            wakes(&t.mux, Duration::from_secs(5)),
            "the loop is not woken"
        );
        t.mux.poll_host();
    }
}

#[test]
fn a_host_connection_the_guest_never_answers_is_dropped() {
    let mut t = muxer(Limits {
        connect_timeout: Duration::from_millis(50),
        ..Limits::default()
    });
    let (mut host, _) = t.host_connects(1024);
    runs_until_no_connection(&mut t);
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "the host sees the end");
    // The timer is disarmed: the loop does not spin.
    assert!(!wakes(&t.mux, Duration::from_millis(100)));
}

#[test]
fn a_connection_the_host_closed_is_killed_if_the_guest_holds_it() {
    let mut t = muxer(Limits {
        shutdown_timeout: Duration::from_millis(50),
        ..Limits::default()
    });
    let l = t.listen(5000);
    t.guest_connects(1, 5000);
    let (host, _) = l.accept().unwrap();
    drop(host);
    t.mux.poll_host();
    let rx = t.drain(4096);
    let shut = rx
        .iter()
        .find(|(h, _)| h.op == OP_SHUTDOWN)
        .expect("SHUTDOWN");
    assert_eq!(shut.0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // The guest never sends its RST.
    runs_until_no_connection(&mut t);
    assert!(t.drain(0).iter().any(|(h, _)| h.op == OP_RST));
}

#[test]
fn a_closed_connection_whose_host_never_reads_is_killed() {
    let mut t = muxer(Limits {
        shutdown_timeout: Duration::from_millis(50),
        ..Limits::default()
    });
    let l = t.listen(5000);
    t.guest_connects(1, 5000);
    let (_host, _) = l.accept().unwrap(); // never reads
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    for _ in 0..(BUF_ALLOC / MAX_PAYLOAD) {
        t.mux
            .send(from_guest(OP_RW, 1, 5000, MAX_PAYLOAD, 0), &chunk);
    }
    assert!(t.mux.stats().3 > 0, "some data is held for the host");
    t.mux.send(
        from_guest(OP_SHUTDOWN, 1, 5000, 0, SHUTDOWN_RCV | SHUTDOWN_SEND),
        &[],
    );
    assert_eq!(t.mux.stats().0, 1, "kept while its data may still go");
    runs_until_no_connection(&mut t);
    assert_eq!(t.mux.stats().3, 0);
}

#[test]
fn a_guest_half_close_flushes_then_shuts_the_host_write_side() {
    let mut t = muxer(Limits::default());
    let l = t.listen(5000);
    t.guest_connects(1, 5000);
    let (mut host, _) = l.accept().unwrap();
    t.mux.send(from_guest(OP_RW, 1, 5000, 3, 0), b"abc");
    t.mux
        .send(from_guest(OP_SHUTDOWN, 1, 5000, 0, SHUTDOWN_SEND), &[]);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"abc");
    // The host can still answer.
    host.write_all(b"ok").unwrap();
    t.mux.poll_host();
    let rx = t.drain(4096);
    assert!(
        rx.iter().any(|(h, p)| h.op == OP_RW && p == b"ok"),
        "{rx:?}"
    );
}

#[test]
fn many_guest_half_closes_do_not_spin_the_event_loop() {
    // Shutting a host stream's write side is itself an epoll event; once
    // it was done again on every such event, and a guest that half-closed
    // many connections kept the VMM's vCPU thread in poll_host forever.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut t = muxer(Limits::default());
        let l = t.listen(5000);
        let mut hosts = Vec::new();
        for src in 1..=200 {
            t.guest_connects(src, 5000);
            hosts.push(l.accept().unwrap().0);
            t.mux
                .send(from_guest(OP_SHUTDOWN, src, 5000, 0, SHUTDOWN_SEND), &[]);
        }
        for _ in 0..10 {
            t.mux.poll_host();
        }
        let _ = tx.send(t.mux.stats().0);
    });
    let conns = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("poll_host returned");
    assert_eq!(conns, 200, "half-closed connections stay until they end");
}
