//! A process's stdio: the host's named streams, /dev/null, or a
//! terminal (libcontainer's console socket, relayed to the streams).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use husk_protocol::agent::Stdio;

use super::*;
use crate::stream::Streams;

/// A process's stdio that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A stream the host named did not come (or is not a valid name):
    /// the caller's mistake or a lost connection.
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("console socket: no terminal descriptor received")]
    NoTerminal,
    #[error("the console socket's thread failed")]
    ConsoleThread,
}

/// A stream the host did not connect (or named badly) is the caller's
/// argument; the rest is the agent's own failure.
impl From<StdioError> for ttrpc::Error {
    fn from(e: StdioError) -> ttrpc::Error {
        let code = match e {
            StdioError::Stream(_) => ttrpc::Code::INVALID_ARGUMENT,
            _ => ttrpc::Code::INTERNAL,
        };
        crate::rpc::status(code, crate::rpc::causes(&e))
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StdioError {
    let what = what.into();
    move |source| StdioError::Io { what, source }
}

pub(super) fn dev_null(write: bool) -> Result<OwnedFd, StdioError> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(io("/dev/null"))
}

/// The streams a process gets, claimed by name; /dev/null for "".
pub(super) struct ProcStdio {
    pub(super) stdin: OwnedFd,
    pub(super) stdout: OwnedFd,
    pub(super) stderr: OwnedFd,
    pub(super) has_stdin: bool,
}

impl ProcStdio {
    /// A handle on the stdin stream, for CloseStdin (none on /dev/null).
    pub(super) fn stdin_handle(&self) -> Option<OwnedFd> {
        self.has_stdin
            .then(|| self.stdin.try_clone().ok())
            .flatten()
    }

    pub(super) fn claim(streams: &Streams, s: &Stdio) -> Result<Self, StdioError> {
        let get = |name: &str, write: bool| {
            if name.is_empty() {
                dev_null(write)
            } else {
                Ok(streams.claim(name, crate::rpc::time_left(STREAM_WAIT))?)
            }
        };
        Ok(Self {
            stdin: get(&s.stdin, false)?,
            stdout: get(&s.stdout, true)?,
            stderr: get(&s.stderr, true)?,
            has_stdin: !s.stdin.is_empty(),
        })
    }
}

/// Receives a terminal's master side from libcontainer on a console socket.
pub(super) struct ConsoleSocket {
    pub(super) path: PathBuf,
    pub(super) accept: std::thread::JoinHandle<Result<OwnedFd, StdioError>>,
}

impl ConsoleSocket {
    pub(super) fn listen(path: PathBuf) -> Result<Self, StdioError> {
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path)
            .map_err(io(format!("console socket {}", path.display())))?;
        let accept = std::thread::spawn(move || {
            let (c, _) = l.accept().map_err(io("console socket"))?;
            c.set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(io("console socket"))?;
            recv_fd(&c)
        });
        Ok(Self { path, accept })
    }

    pub(super) fn master(self) -> Result<OwnedFd, StdioError> {
        let r = self.accept.join().unwrap_or(Err(StdioError::ConsoleThread));
        let _ = std::fs::remove_file(&self.path);
        r
    }

    /// Unblocks the accept when the build failed before connecting.
    pub(super) fn abandon(self) {
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = self.master();
    }
}

pub(super) fn recv_fd(c: &std::os::unix::net::UnixStream) -> Result<OwnedFd, StdioError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        c.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io("console socket")(e.into()))?;
    for m in msg.cmsgs().map_err(|e| io("console socket")(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = m {
            let mut owned = fds.into_iter().map(|fd| {
                // SAFETY: SCM_RIGHTS delivered this descriptor to us; nothing
                // else owns it.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            });
            if let Some(fd) = owned.next() {
                return Ok(fd);
            }
        }
    }
    Err(StdioError::NoTerminal)
}

/// Copies the terminal's output to `out` and `input` into the terminal.
pub(super) fn relay_tty(master: Arc<OwnedFd>, out: OwnedFd, input: Option<OwnedFd>) {
    let m = master.clone();
    std::thread::spawn(move || {
        let mut r = std::fs::File::from(match m.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => return,
        });
        let mut w = std::fs::File::from(out);
        let mut buf = [0u8; 16 * 1024];
        // EIO once the last process holding the terminal exits.
        while let Ok(n @ 1..) = r.read(&mut buf) {
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    if let Some(input) = input {
        std::thread::spawn(move || {
            let Ok(fd) = master.as_fd().try_clone_to_owned() else {
                return;
            };
            let mut w = std::fs::File::from(fd);
            let mut r = std::fs::File::from(input);
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            // The host closed stdin: end of input for a canonical-mode reader.
            let _ = w.write_all(&[4]);
        });
    }
}

pub(super) fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) -> Result<(), StdioError> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid
    // for the call; the fd is an open terminal we own.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(io("TIOCSWINSZ")(std::io::Error::last_os_error()));
    }
    Ok(())
}
