//! virtio-net on a tap device (virtio 1.2 spec, 5.1), no offloads: frames
//! cross with a 12-byte virtio-net header that the device strips (TX) and
//! writes zeroed (RX). The host side is a tap in user space: this host has no
//! vhost-net.
//!
//! Guest-controlled sizes are bounded: a TX chain longer than the largest
//! frame is dropped, an RX buffer too small for a frame gets nothing.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{
    drain_queue, read_config_bytes, write_chain, GuestMemoryMmap, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};
use crate::metrics::{add, inc, METRICS};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;

/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;
/// Largest frame either way: a 64 KiB IP packet plus Ethernet and VLAN
/// headers; without offloads the guest's MTU keeps frames far smaller.
pub const MAX_FRAME: usize = 65_562;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("bad MAC address {0:?} (expected six hex bytes like 06:00:ac:10:00:02)")]
    Mac(String),
    #[error("net epoll: {0}")]
    Epoll(std::io::Error),
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(NetError::Mac(s.into()));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(NetError::Mac(s.into()));
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| NetError::Mac(s.into()))?;
    }
    Ok(mac)
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Opens (or creates, with CAP_NET_ADMIN) the tap `name`, non-blocking.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    let err = |source| NetError::Tap {
        name: name.into(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "interface names are 1 to 15 bytes",
        )));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(err)?;
    // struct ifreq: 16 bytes of name, then the flags (a union, 24 bytes).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is a buffer of
    // its size that lives across the call, and the fd is ours.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(f)
}

use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Takes ownership of `fd`, a tap this process inherited: checked to be a
/// tap without packet info or vnet headers (the frames this device
/// exchanges), made non-blocking and close-on-exec.
pub fn adopt_tap_fd(fd: i32) -> Result<File, NetError> {
    let err = |source| NetError::Tap {
        name: format!("fd {fd}"),
        source,
    };
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes a struct ifreq into `ifr`, a buffer of its
    // size; on a descriptor that is not a tun device it fails and changes
    // nothing, so any integer is safe to ask about.
    let r = unsafe { libc::ioctl(fd, TUNGETIFF, ifr.as_mut_ptr()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(err(std::io::Error::new(
            e.kind(),
            format!("not an open tap ({e})"),
        )));
    }
    let flags = libc::c_short::from_ne_bytes([ifr[16], ifr[17]]);
    if flags & IFF_TAP == 0 || flags & IFF_NO_PI == 0 || flags & IFF_VNET_HDR != 0 {
        return Err(err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("a tun device with flags {flags:#x}; a tap with IFF_NO_PI and no vnet header is needed"),
        )));
    }
    // SAFETY: fcntl on a descriptor just shown to be an open tun device.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    // SAFETY: the descriptor is an open tap this process inherited and
    // nothing else in it owns (the configuration names each fd once, and
    // the VMM adopts inherited fds before it opens taps of its own).
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub struct Net {
    tap: File,
    epoll: Epoll,
    acked: u64,
    config: [u8; 8],
    tap_readable: bool,
    /// A frame read from the tap that found no RX buffer yet.
    pending: Option<Vec<u8>>,
}

impl Net {
    /// `tap` is any non-blocking fd with packet boundaries: a tap, or a
    /// SOCK_SEQPACKET socket in tests.
    pub fn new(tap: File, mac: [u8; 6]) -> Result<Net, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
            )
            .map_err(NetError::Epoll)?;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        Ok(Net {
            tap,
            epoll,
            acked: 0,
            config,
            // Frames may be queued before the first edge.
            tap_readable: true,
            pending: None,
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn poll_tap(&mut self) {
        let mut ev = [EpollEvent::default(); 4];
        while let Ok(n) = self.epoll.wait(0, &mut ev) {
            if n == 0 {
                break;
            }
            self.tap_readable = true;
        }
    }

    fn read_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(f) = self.pending.take() {
            return Some(f);
        }
        if !self.tap_readable {
            return None;
        }
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            match self.tap.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.tap_readable = false;
                    return None;
                }
            }
        }
    }

    fn transmit(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) {
        let mem = chain.memory();
        let mut frame = Vec::new();
        for d in chain.clone() {
            if d.is_write_only() {
                inc(&METRICS.net.tx_dropped);
                return;
            }
            let len = d.len() as usize;
            if frame.len() + len > HDR_LEN + MAX_FRAME {
                inc(&METRICS.net.tx_dropped);
                return;
            }
            let at = frame.len();
            frame.resize(at + len, 0);
            if mem.read_slice(&mut frame[at..], d.addr()).is_err() {
                inc(&METRICS.net.tx_dropped);
                return;
            }
        }
        if frame.len() <= HDR_LEN {
            inc(&METRICS.net.tx_dropped);
            return;
        }
        match self.tap.write(&frame[HDR_LEN..]) {
            Ok(n) => add(&METRICS.net.tx_bytes, n as u64),
            // A full tap queue drops the frame, as a NIC would.
            Err(_) => inc(&METRICS.net.tx_dropped),
        }
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(frame) = self.read_frame() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let len = match write_frame(&chain, &frame) {
                Some(n) => {
                    add(&METRICS.net.rx_bytes, frame.len() as u64);
                    n
                }
                None => {
                    inc(&METRICS.net.rx_dropped);
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-net: add_used: {e}");
            }
            used = true;
        }
        used
    }
}

/// Writes a zeroed header (num_buffers = 1) and `frame` into a device-writable
/// chain; None if the chain is not writable or too small.
fn write_frame(chain: &DescriptorChain<&GuestMemoryMmap>, frame: &[u8]) -> Option<u32> {
    let mut hdr = [0u8; HDR_LEN];
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    write_chain(chain, &[&hdr, frame])
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC | F_STATUS
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        if queues.len() < 2 {
            return false;
        }
        let mut used = false;
        if index == TX_QUEUE {
            used |= drain_queue(&mut queues[TX_QUEUE], mem, "virtio-net TX", |chain| {
                self.transmit(chain);
                0
            });
        }
        self.poll_tap();
        used |= self.fill_rx(&mut queues[RX_QUEUE], mem);
        used
    }

    fn poll_host_events(&mut self) {
        // Before the driver is up, frames from the host have nowhere to go.
        self.poll_tap();
        while self.read_frame().is_some() {
            inc(&METRICS.net.rx_dropped);
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn pair() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into `fds`; checked below.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds are new and owned by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn frames_cross_both_ways() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (tap, mut host) = pair();
        let mut net = Net::new(tap, parse_mac("06:00:ac:10:00:02").unwrap()).unwrap();
        net.ack_features(net.features());

        // TX: header + frame split over two descriptors.
        let frame: Vec<u8> = (0..100u8).collect();
        m.write_slice(&[0u8; HDR_LEN], GuestAddress(0x1000))
            .unwrap();
        m.write_slice(&frame, GuestAddress(0x2000)).unwrap();
        let tx = MockSplitQueue::new(&m, 16);
        tx.build_desc_chain(&[
            d(0x1000, HDR_LEN as u32, VRING_DESC_F_NEXT, 1),
            d(0x2000, 100, 0, 0),
        ])
        .unwrap();
        let rx = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        let mut queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        assert!(net.process_queue(TX_QUEUE, &mut queues, &m));
        let mut got = vec![0u8; 2000];
        let n = host.read(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);

        // RX: a frame from the host lands after a header with num_buffers 1.
        host.write_all(b"from the host").unwrap();
        rx.build_desc_chain(&[d(0x4000, 2048, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let mut queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        assert!(net.process_queue(RX_QUEUE, &mut queues, &m));
        let used = rx.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, HDR_LEN + 13);
        let mut buf = [0u8; HDR_LEN + 13];
        m.read_slice(&mut buf, GuestAddress(0x4000)).unwrap();
        assert_eq!(&buf[10..12], &1u16.to_le_bytes());
        assert_eq!(&buf[HDR_LEN..], b"from the host");
    }

    #[test]
    fn bad_chains_are_dropped_not_fatal() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (tap, mut host) = pair();
        let mut net = Net::new(tap, [6, 0, 0, 0, 0, 1]).unwrap();
        // TX chains: device-writable, absurdly long, outside memory, header only.
        for chain in [
            vec![d(0x1000, 100, VRING_DESC_F_WRITE, 0)],
            vec![d(0x1000, u32::MAX, 0, 0)],
            vec![d(0xff_0000, 64, 0, 0)],
            vec![d(0x1000, HDR_LEN as u32, 0, 0)],
        ] {
            let tx = MockSplitQueue::new(&m, 16);
            tx.build_desc_chain(&chain).unwrap();
            let rx = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
            let mut queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.process_queue(TX_QUEUE, &mut queues, &m);
        }
        let mut buf = [0u8; 16];
        assert!(host.read(&mut buf).is_err(), "a bad chain reached the host");
        // An RX buffer too small for the frame: used with length 0, frame dropped.
        host.write_all(&[7u8; 500]).unwrap();
        let rx = MockSplitQueue::new(&m, 16);
        rx.build_desc_chain(&[d(0x4000, 64, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let tx = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        let mut queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        net.process_queue(RX_QUEUE, &mut queues, &m);
        assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02").unwrap(),
            [6, 0, 0xac, 0x10, 0, 2]
        );
        for bad in ["", "06:00:ac:10:00", "06:00:ac:10:00:0g", "6:0:ac:10:0:2"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_tap_fd_is_adopted() {
        let (a, _b) = pair();
        let e = adopt_tap_fd(a.into_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not an open tap"), "{e}");
        let name = format!("hkt{}", std::process::id() % 1_000_000);
        let tap = match open_tap(&name) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped the tap half: creating a tap needs /dev/net/tun and CAP_NET_ADMIN ({e})");
                return;
            }
        };
        let fd = tap.into_raw_fd();
        let tap = adopt_tap_fd(fd).unwrap();
        // SAFETY: F_GETFL/F_GETFD only read the flags of a descriptor we own.
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(tap.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(tap.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert!(fl & libc::O_NONBLOCK != 0 && fdfl & libc::FD_CLOEXEC != 0);
    }
}
