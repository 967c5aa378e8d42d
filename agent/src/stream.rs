//! Stdio streams: connections the host opens to the stream port, each
//! announced by a first line naming it, claimed by name when a process is
//! created. The process gets the connection itself as stdin/stdout/stderr,
//! so nothing is copied or buffered in the agent.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use husk_protocol::{valid_stream_name, MAX_STREAM_NAME};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
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
/// for it until the caller's deadline). Each waiting connection holds a
/// thread; MAX_ARRIVING bounds them.
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// A claim waiting this long is reported on the console.
const SLOW_REPORT: Duration = Duration::from_secs(20);

/// One connection counted in `Streams::arriving` while it exists.
struct Arriving(Arc<Streams>);

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.arriving.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Streams {
    pending: Mutex<HashMap<String, (OwnedFd, Instant)>>,
    arrived: Condvar,
    /// Connections whose name is still being read.
    arriving: AtomicUsize,
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
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(libc::VMADDR_CID_ANY, port),
        )?;
        listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
        let me = self.clone();
        std::thread::spawn(move || loop {
            match accept4(std::os::fd::AsRawFd::as_raw_fd(&fd), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor nothing else owns.
                Ok(c) => me.arrive(UnixOrVsock(unsafe {
                    <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(c)
                })),
                Err(e) => {
                    eprintln!("husk-agent: stream accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Ok(())
    }

    /// Serves the stream port on a Unix socket (an agent on a host).
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)?;
        let me = self.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                match c {
                    Ok(c) => me.arrive(UnixOrVsock(c.into())),
                    Err(e) => {
                        eprintln!("husk-agent: stream accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Ok(())
    }

    /// Reads the name line on its own thread: a slow client must not hold
    /// up others.
    fn arrive(self: &Arc<Self>, conn: UnixOrVsock) {
        // Counted until the name is read or the connection dropped: the
        // guard goes with the thread's closure, or with it unstarted.
        let counted = Arriving(self.clone());
        if self.arriving.fetch_add(1, Ordering::SeqCst) >= MAX_ARRIVING {
            eprintln!(
                "husk-agent: stream dropped: {MAX_ARRIVING} streams have not named themselves yet"
            );
            return;
        }
        let spawned = std::thread::Builder::new().spawn(move || match read_name(&conn.0) {
            Ok(name) => counted.0.add(name, conn.0),
            Err(e) => eprintln!("husk-agent: stream dropped: {}", crate::rpc::causes(&e)),
        });
        if let Err(e) = spawned {
            eprintln!("husk-agent: stream dropped: no thread to read its name: {e}");
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

struct UnixOrVsock(OwnedFd);

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

/// Reads "<name>\n" a byte at a time, so no data after it is consumed.
fn read_name(fd: &OwnedFd) -> Result<String, StreamError> {
    let timeout = nix::sys::time::TimeVal::new(HEADER_TIMEOUT.as_secs() as i64, 0);
    let set = |t| {
        nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::ReceiveTimeout, &t).map_err(
            |e| StreamError::Io {
                what: "setsockopt",
                source: e.into(),
            },
        )
    };
    set(timeout)?;
    let mut f =
        UnixStream::from(
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|source| StreamError::Io {
                    what: "duplicating the stream",
                    source,
                })?,
        );
    let mut name = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match f.read(&mut b) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if name.len() < MAX_STREAM_NAME => name.push(b[0]),
            Ok(_) => return Err(StreamError::TooLong),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(StreamError::Io {
                    what: "reading its name",
                    source,
                })
            }
        }
    }
    set(nix::sys::time::TimeVal::new(0, 0))?;
    let name = String::from_utf8(name).map_err(|_| StreamError::NotUtf8)?;
    if !valid_stream_name(&name) {
        return Err(StreamError::BadName(name));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
}
