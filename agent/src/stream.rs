//! Stdio streams: connections the host opens to the stream port, each
//! announced by a first line naming it, claimed by name when a process is
//! created. The process gets the connection itself as stdin/stdout/stderr,
//! so nothing is copied or buffered in the agent.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use husk_protocol::{valid_stream_name, MAX_STREAM_NAME};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, listen, recv, socket, AddressFamily, Backlog, MsgFlags, SockFlag, SockType,
    VsockAddr,
};

/// Streams nobody claimed are dropped after this long.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);
/// At most this many unclaimed streams are held.
const MAX_PENDING: usize = 256;
/// At most this many connections may be naming themselves at once.
const MAX_ARRIVING: usize = 64;
/// A connection must name itself within this long. The host sends the
/// name right after the connection is made, but in a guest whose kernel is
/// emulated, its packet can take seconds to be received while other
/// containers start (a dropped stream leaves its process's request waiting
/// for it until the caller's deadline).
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// A claim waiting this long is reported on the console.
const SLOW_REPORT: Duration = Duration::from_secs(20);

/// A connection that has not named itself yet.
struct Arrival {
    fd: OwnedFd,
    /// Its name so far (no newline yet).
    buf: Vec<u8>,
    deadline: Instant,
}

#[derive(Default)]
pub struct Streams {
    pending: Mutex<HashMap<String, (OwnedFd, Instant)>>,
    arrived: Condvar,
}

impl Streams {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Serves the stream port on vsock (in the guest).
    pub fn serve_vsock(self: &Arc<Self>, port: u32) -> std::io::Result<()> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            // Non-blocking: a connection gone between the poll and the
            // accept must not stall the one thread that names streams.
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
        self.serve(fd)
    }

    /// Serves the stream port on a Unix socket (an agent on a host).
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)?;
        l.set_nonblocking(true)?;
        self.serve(l.into())
    }

    /// Accepts connections on `listener` and reads their names, all on one
    /// thread: each connection's bytes are taken as they come (a slow
    /// client holds up no other), with no thread per connection, which
    /// cost ~0.1 s of emulated guest time each, on the way of every start.
    fn serve(self: &Arc<Self>, listener: OwnedFd) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("streams".into())
            .spawn(move || me.arrivals(listener))?;
        Ok(())
    }

    fn arrivals(&self, listener: OwnedFd) {
        let mut arriving: Vec<Arrival> = Vec::new();
        loop {
            let now = Instant::now();
            let wait = arriving
                .iter()
                .map(|a| a.deadline.saturating_duration_since(now))
                .min();
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                arriving
                    .iter()
                    .map(|a| PollFd::new(a.fd.as_fd(), PollFlags::POLLIN)),
            );
            let timeout = wait.map_or(PollTimeout::NONE, |w| {
                // Rounded up: a deadline is not missed by a millisecond.
                let ms = w.as_millis().saturating_add(1).min(i32::MAX as u128);
                PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
            });
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("husk-agent: stream poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            let now = Instant::now();
            let mut keep = Vec::with_capacity(arriving.len());
            for (a, ready) in arriving.drain(..).zip(ready[1..].iter().copied()) {
                if ready {
                    keep.extend(self.read_some(a));
                } else if a.deadline <= now {
                    eprintln!("husk-agent: stream dropped: not named within {HEADER_TIMEOUT:?}");
                } else {
                    keep.push(a);
                }
            }
            arriving = keep;
            if ready[0] {
                self.accept(&listener, &mut arriving);
            }
        }
    }

    /// A new connection: named at once (most often its name is there
    /// already), or kept to be read as its bytes come.
    fn accept(&self, listener: &OwnedFd, arriving: &mut Vec<Arrival>) {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor nothing else owns.
            Ok(c) => unsafe { OwnedFd::from_raw_fd(c) },
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ECONNABORTED) => return,
            Err(e) => {
                eprintln!("husk-agent: stream accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        let a = Arrival {
            fd,
            buf: Vec::new(),
            deadline: Instant::now() + HEADER_TIMEOUT,
        };
        let Some(a) = self.read_some(a) else {
            return;
        };
        if arriving.len() >= MAX_ARRIVING {
            eprintln!(
                "husk-agent: stream dropped: {MAX_ARRIVING} streams have not named themselves yet"
            );
            return;
        }
        arriving.push(a);
    }

    /// Takes what arrived of `a`'s name: the stream is added once its name
    /// is whole (None), kept while more is to come, dropped on an error.
    fn read_some(&self, mut a: Arrival) -> Option<Arrival> {
        match read_name(&a.fd, &mut a.buf) {
            Ok(Some(name)) => {
                self.add(name, a.fd);
                None
            }
            Ok(None) => Some(a),
            Err(e) => {
                eprintln!("husk-agent: stream dropped: {}", crate::rpc::causes(&e));
                None
            }
        }
    }

    fn add(&self, name: String, fd: OwnedFd) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, (_, at)| at.elapsed() < UNCLAIMED_TTL);
        if p.len() >= MAX_PENDING {
            eprintln!("husk-agent: stream {name:?} dropped: {MAX_PENDING} streams unclaimed");
            return;
        }
        if p.contains_key(&name) {
            eprintln!("husk-agent: stream {name:?} dropped: the name is taken");
            return;
        }
        p.insert(name, (fd, Instant::now()));
        self.arrived.notify_all();
    }

    /// Takes the stream called `name`, waiting up to `timeout` for it.
    pub fn claim(&self, name: &str, timeout: Duration) -> Result<OwnedFd, StreamError> {
        if !valid_stream_name(name) {
            return Err(StreamError::BadName(name.into()));
        }
        let start = Instant::now();
        let deadline = start + timeout;
        let mut reported = false;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((fd, _)) = p.remove(name) {
                if reported {
                    eprintln!(
                        "husk-agent: stream {name:?} came after {:.1} s",
                        start.elapsed().as_secs_f64()
                    );
                }
                return Ok(fd);
            }
            let Some(mut left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(StreamError::NotConnected {
                    name: name.into(),
                    timeout,
                    unclaimed: p.len(),
                });
            };
            // Once, after a while: on the console, while the caller waits.
            if !reported && start.elapsed() >= SLOW_REPORT {
                reported = true;
                let others: Vec<&String> = p.keys().take(8).collect();
                eprintln!(
                    "husk-agent: waiting {:.0} s for stream {name:?}; unclaimed: {others:?}",
                    start.elapsed().as_secs_f64()
                );
            } else if !reported {
                left = left.min(SLOW_REPORT.saturating_sub(start.elapsed()));
            }
            p = self
                .arrived
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A stream that cannot be claimed, or one that did not name itself.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0:?} is not a valid stream name")]
    BadName(String),
    #[error(
        "no stream named {name:?} connected within {timeout:?} ({unclaimed} others unclaimed)"
    )]
    NotConnected {
        name: String,
        timeout: Duration,
        unclaimed: usize,
    },
    #[error("closed before naming itself")]
    Closed,
    #[error("name longer than {MAX_STREAM_NAME} bytes")]
    TooLong,
    #[error("name is not UTF-8")]
    NotUtf8,
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Takes what is there of "<name>\n" into `buf`, never a byte past the
/// newline (what follows is the stream's data): a peek shows the bytes,
/// then as many are taken as belong to the name. Two system calls for a
/// name that came whole, where reading a byte at a time took one a byte.
/// `Ok(None)`: not whole yet (all that came is taken, so a poll waits for
/// more rather than seeing the same bytes again).
fn read_name(fd: &OwnedFd, buf: &mut Vec<u8>) -> Result<Option<String>, StreamError> {
    let failed = |source: Errno| StreamError::Io {
        what: "reading its name",
        source: source.into(),
    };
    let mut peek = [0u8; MAX_STREAM_NAME + 1];
    let room = (MAX_STREAM_NAME + 1).saturating_sub(buf.len()).max(1);
    let n = loop {
        match recv(
            fd.as_raw_fd(),
            &mut peek[..room],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(failed(e)),
            Ok(0) => return Err(StreamError::Closed),
            Ok(n) => break n,
        }
    };
    let newline = peek[..n].iter().position(|&b| b == b'\n');
    // The name's bytes only: up to and with the newline, else all.
    let take = newline.map_or(n, |i| i + 1);
    let mut got = 0;
    while got < take {
        match recv(fd.as_raw_fd(), &mut peek[got..take], MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EINTR) => {}
            Err(e) => return Err(failed(e)),
            Ok(0) => return Err(StreamError::Closed),
            Ok(k) => got += k,
        }
    }
    buf.extend_from_slice(&peek[..newline.unwrap_or(n)]);
    if buf.len() > MAX_STREAM_NAME {
        return Err(StreamError::TooLong);
    }
    if newline.is_none() {
        return Ok(None);
    }
    let name = String::from_utf8(std::mem::take(buf)).map_err(|_| StreamError::NotUtf8)?;
    if !valid_stream_name(&name) {
        return Err(StreamError::BadName(name));
    }
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn named_streams_are_claimed_with_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let s = Streams::new();
        s.serve_unix(&path).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"out-1\nhello").unwrap();
        let fd = s.claim("out-1", Duration::from_secs(5)).unwrap();
        let mut got = [0u8; 5];
        UnixStream::from(fd).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Claimed once only; bad names are refused up front.
        assert!(s.claim("out-1", Duration::from_millis(50)).is_err());
        assert!(s.claim("../x", Duration::from_millis(50)).is_err());
        // A bad header is dropped, not kept under some name.
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"a b\n").unwrap();
        assert!(s.claim("a b", Duration::from_millis(100)).is_err());
    }

    #[test]
    fn a_name_in_pieces_is_read_whole_and_a_slow_one_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let s = Streams::new();
        s.serve_unix(&path).unwrap();
        // Says nothing yet: others are named meanwhile.
        let mut slow = UnixStream::connect(&path).unwrap();
        slow.write_all(b"sl").unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"ou").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        c.write_all(b"t-2\nda").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        c.write_all(b"ta").unwrap();
        let fd = s.claim("out-2", Duration::from_secs(5)).unwrap();
        let mut got = [0u8; 4];
        UnixStream::from(fd).read_exact(&mut got).unwrap();
        // Nothing after the newline was taken for the name.
        assert_eq!(&got, b"data");
        slow.write_all(b"ow\n").unwrap();
        s.claim("slow", Duration::from_secs(5)).unwrap();
        // Too long, in pieces or whole: dropped, and the server goes on.
        let long = "x".repeat(MAX_STREAM_NAME + 1);
        let mut l = UnixStream::connect(&path).unwrap();
        l.write_all(&long.as_bytes()[..10]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        l.write_all(format!("{}\n", &long[10..]).as_bytes())
            .unwrap();
        let mut b = [0u8; 1];
        // Dropped: the server closed it (unread bytes make that a reset).
        let r = l.read(&mut b);
        assert!(
            matches!(&r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        let mut ok = UnixStream::connect(&path).unwrap();
        ok.write_all(b"after\n").unwrap();
        s.claim("after", Duration::from_secs(5)).unwrap();
    }
}
