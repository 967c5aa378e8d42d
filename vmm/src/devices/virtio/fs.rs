//! virtio-fs (virtio 1.2 spec 5.11) with a vhost-user backend: virtiofsd
//! reads and writes the queues in guest memory itself, the VMM keeps the
//! device's registers and configuration space, hands the backend the
//! memory map and the rings at activation, relays the driver's
//! notifications (kick eventfds) and turns the backend's completions (call
//! eventfds) into interrupts.
//!
//! Without a backend the device still probes (a template VM's): the rings
//! it was given are handed over when a backend arrives with a snapshot
//! load. Nothing the backend says is trusted beyond the vhost-user
//! message checks of the `vhost` crate; a failed exchange fails the device.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{read_config_bytes, EventFd, GuestMemoryMmap, VirtioDevice, VIRTIO_F_VERSION_1};

pub const TYPE_FS: u32 = 26;
/// Bytes of the tag in configuration space.
pub const TAG_LEN: usize = 36;
/// The high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// Feature bit 30: the backend speaks vhost-user protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// A backend that stops answering fails the device instead of hanging the
/// vCPU that activates it.
const BACKEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum FsError {
    #[error("virtio-fs eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("virtio-fs epoll: {0}")]
    Epoll(std::io::Error),
    #[error("virtio-fs backend {what}: {source}")]
    Backend {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("virtio-fs backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("virtio-fs backend socket: {0}")]
    Socket(std::io::Error),
}

fn backend(what: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::Backend { what, source }
}

/// The backend connection once the session is set up (owner, features).
struct Backend {
    frontend: Frontend,
    features: u64,
    /// Rings handed over and running.
    running: bool,
}

pub struct Fs {
    config: Vec<u8>,
    backend: Option<Backend>,
    acked: u64,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    epoll: Epoll,
}

impl Fs {
    /// A device for `tag`, served by the backend on `socket` if there is one.
    pub fn new(tag: &str, socket: Option<UnixStream>) -> Result<Fs, FsError> {
        let mut config = vec![0u8; TAG_LEN + 4];
        let n = tag.len().min(TAG_LEN);
        config[..n].copy_from_slice(&tag.as_bytes()[..n]);
        config[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        let epoll = Epoll::new().map_err(FsError::Epoll)?;
        for i in 0..NUM_QUEUES {
            kicks.push(EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?);
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(FsError::Epoll)?;
            calls.push(call);
        }
        let backend = socket.map(connect).transpose()?;
        Ok(Fs {
            config,
            backend,
            acked: 0,
            kicks,
            calls,
            epoll,
        })
    }

    /// Readable when the backend completed requests.
    pub fn epoll_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    /// True if a backend serves this device (a VM with one cannot be
    /// snapshotted: the FUSE session lives in the backend).
    pub fn has_backend(&self) -> bool {
        self.backend.is_some()
    }

    fn drain_calls(&self) -> bool {
        let mut any = false;
        for c in &self.calls {
            // Nonblocking: an error is "nothing signalled".
            any |= c.read().is_ok();
        }
        any
    }

    /// Hands the rings to the backend and starts them.
    fn start(&mut self, mem: &GuestMemoryMmap, queues: &[Queue]) -> Result<(), FsError> {
        let acked = self.acked;
        let calls = &self.calls;
        let kicks = &self.kicks;
        let Some(b) = self.backend.as_mut() else {
            return Ok(());
        };
        let f = &mut b.frontend;
        f.set_features(acked | (b.features & VHOST_USER_F_PROTOCOL_FEATURES))
            .map_err(backend("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend("memory regions"))?;
        f.set_mem_table(&regions)
            .map_err(backend("SET_MEM_TABLE"))?;
        // vhost-user ring addresses are this process's addresses.
        let hva = |gpa: u64| -> Result<u64, FsError> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| FsError::Backend {
                    what: "ring address",
                    source: vhost::Error::InvalidGuestMemory,
                })
        };
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: hva(q.desc_table())?,
                used_ring_addr: hva(q.used_ring())?,
                avail_ring_addr: hva(q.avail_ring())?,
                log_addr: None,
            };
            f.set_vring_num(i, q.size())
                .map_err(backend("SET_VRING_NUM"))?;
            f.set_vring_addr(i, &ring)
                .map_err(backend("SET_VRING_ADDR"))?;
            f.set_vring_base(i, q.next_avail())
                .map_err(backend("SET_VRING_BASE"))?;
            f.set_vring_call(i, &calls[i])
                .map_err(backend("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &kicks[i])
                .map_err(backend("SET_VRING_KICK"))?;
            if b.features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                f.set_vring_enable(i, true)
                    .map_err(backend("SET_VRING_ENABLE"))?;
            }
            // Requests the driver queued before the backend came (a
            // restored VM's) are picked up.
            let _ = kicks[i].write(1);
        }
        b.running = true;
        Ok(())
    }
}

/// Takes ownership of an inherited descriptor that must be a connected
/// Unix stream socket (a vhost-user backend's).
pub fn adopt_socket_fd(fd: i32) -> Result<UnixStream, FsError> {
    let opt = |name| -> Result<i32, FsError> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, an int; on
        // a descriptor that is not a socket it fails and writes nothing.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(FsError::Socket(std::io::Error::new(
                e.kind(),
                format!("fd {fd} is not a socket ({e})"),
            )));
        }
        Ok(v)
    };
    if opt(libc::SO_DOMAIN)? != libc::AF_UNIX || opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(FsError::Socket(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a Unix stream socket"),
        )));
    }
    // SAFETY: fcntl on a descriptor just shown to be an open socket.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(FsError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: an open socket this process inherited that nothing else in it
    // owns (the configuration names each inherited fd once, and they are
    // adopted before the VMM opens descriptors of its own).
    Ok(unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sets up a vhost-user session on a connected socket: owner, features,
/// protocol features.
fn connect(sock: UnixStream) -> Result<Backend, FsError> {
    sock.set_read_timeout(Some(BACKEND_TIMEOUT))
        .and_then(|()| sock.set_write_timeout(Some(BACKEND_TIMEOUT)))
        .map_err(FsError::Socket)?;
    let mut frontend = Frontend::from_stream(sock, NUM_QUEUES as u64);
    frontend.set_owner().map_err(backend("SET_OWNER"))?;
    let features = frontend.get_features().map_err(backend("GET_FEATURES"))?;
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(FsError::NoVersion1(features));
    }
    if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        // Nothing optional is needed; asking commits the backend to
        // protocol-feature semantics (rings start disabled).
        let offered = frontend
            .get_protocol_features()
            .map_err(backend("GET_PROTOCOL_FEATURES"))?;
        frontend
            .set_protocol_features(offered & VhostUserProtocolFeatures::empty())
            .map_err(backend("SET_PROTOCOL_FEATURES"))?;
    }
    Ok(Backend {
        frontend,
        features,
        running: false,
    })
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    /// Only what every backend must handle: a template's guest negotiates
    /// before the backend it will have is known.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate_queues(&mut self, mem: &GuestMemoryMmap, queues: &[Queue]) -> Result<(), String> {
        if self.backend.is_none() {
            tracing::info!("virtio-fs: driver ready, no backend yet");
            return Ok(());
        }
        self.start(mem, queues).map_err(|e| {
            // A half-set-up session is not reused.
            self.backend = None;
            e.to_string()
        })
    }

    fn process_queue(&mut self, index: usize, _queues: &mut [Queue], _m: &GuestMemoryMmap) -> bool {
        if self.backend.as_ref().is_some_and(|b| b.running) {
            if let Some(k) = self.kicks.get(index) {
                let _ = k.write(1);
            }
        }
        false
    }

    fn host_events(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        self.drain_calls()
    }

    fn poll_host_events(&mut self) {
        self.drain_calls();
    }

    fn reset(&mut self) {
        if let Some(b) = self.backend.as_mut() {
            if b.running {
                // GET_VRING_BASE stops a ring (vhost-user spec).
                for i in 0..NUM_QUEUES {
                    if let Err(e) = b.frontend.get_vring_base(i) {
                        tracing::warn!("virtio-fs: stopping ring {i}: {e}");
                    }
                }
                b.running = false;
            }
        }
        self.acked = 0;
    }

    fn snapshot_blocker(&self) -> Option<String> {
        self.has_backend().then(|| {
            "a virtio-fs device has a backend: its FUSE session lives in virtiofsd and cannot be saved"
                .to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_the_tag_and_one_request_queue() {
        let fs = Fs::new("husk-shared", None).unwrap();
        let mut tag = [0u8; TAG_LEN];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag[..11], b"husk-shared");
        assert!(tag[11..].iter().all(|&b| b == 0));
        let mut n = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        assert_eq!(fs.features(), VIRTIO_F_VERSION_1);
        assert!(fs.snapshot_blocker().is_none());
    }

    #[test]
    fn only_unix_stream_sockets_are_adopted() {
        use std::os::fd::IntoRawFd;
        let f = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        let e = adopt_socket_fd(f).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        // SAFETY: closing the descriptor opened above, owned by nothing.
        unsafe { libc::close(f) };
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = adopt_socket_fd(udp.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a Unix stream socket"), "{e}");
        let (a, _b) = UnixStream::pair().unwrap();
        let s = adopt_socket_fd(a.into_raw_fd()).unwrap();
        // SAFETY: F_GETFD on a descriptor `s` owns.
        let fl = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fl & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn a_backend_that_hangs_up_is_an_error_not_a_panic() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let e = Fs::new("t", Some(ours)).err().expect("refused");
        assert!(e.to_string().contains("SET_OWNER"), "{e}");
    }

    #[test]
    fn a_backend_answering_garbage_is_refused() {
        use std::io::{Read, Write};
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut hdr = [0u8; 12];
            // SET_OWNER (no reply), then GET_FEATURES: answer nonsense.
            theirs.read_exact(&mut hdr).unwrap();
            theirs.read_exact(&mut hdr).unwrap();
            let _ = theirs.write_all(&[0xff; 20]);
        });
        let e = Fs::new("t", Some(ours)).err().expect("refused");
        assert!(e.to_string().contains("GET_FEATURES"), "{e}");
        t.join().unwrap();
    }
}
