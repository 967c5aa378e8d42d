//! A container's output copied to its log by a process of its own, as a
//! containerd shim holds a container's pipes: the process that started the
//! container (huskd) may restart while it runs, and the container's
//! stdout and stderr are its vsock streams, whose host end must stay open
//! or its next write fails (EPIPE, SIGPIPE). The copier is the same binary
//! run as `<exe> copy-logs <log>`, the streams as its descriptors 3 and 4;
//! it ends when both streams end (the container's processes closed them,
//! or its VM went).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::container::lifecycle::copy_to_log;
use crate::container::record::LogWriter;
use crate::guest::Streams;
use crate::util::child::Watched;

/// The first argument that makes a binary the copier ([`run_if_asked`]).
pub const SUBCOMMAND: &str = "copy-logs";

/// Starts `exe copy-logs log` with the output streams taken from `streams`
/// (a missing one reads as empty), in a session of its own so that a
/// signal to the starter's process group does not reach it.
pub fn spawn(exe: &Path, streams: &mut Streams, log: &Path) -> std::io::Result<Watched> {
    let null = || std::fs::File::open("/dev/null");
    let out: std::os::fd::OwnedFd = match streams.stdout.take() {
        Some(s) => s.into(),
        None => null()?.into(),
    };
    let err: std::os::fd::OwnedFd = match streams.stderr.take() {
        Some(s) => s.into(),
        None => null()?.into(),
    };
    // Copies at 5 and up (close-on-exec, like every descriptor here), so
    // the child's dup2 to 3 and 4 never lands on the other's source, nor on
    // the pipe std uses to report a failed exec.
    let high = |fd: &std::os::fd::OwnedFd| -> std::io::Result<std::os::fd::OwnedFd> {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own; the result
        // is a new descriptor owned by no one else.
        let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 5) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just returned to us.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(n) })
    };
    let (out, err) = (high(&out)?, high(&err)?);
    let (out_fd, err_fd) = (out.as_raw_fd(), err.as_raw_fd());
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec: only dup2 and setsid, which are
    // async-signal-safe, on descriptors that live until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears FD_CLOEXEC on the copy.
            for (from, to) in [(out_fd, 3), (err_fd, 4)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(Watched::new(child))
}

/// When the process was started as the copier (`copy-logs <log>`), copies
/// descriptors 3 (stdout) and 4 (stderr) to the log until both end and
/// returns the exit code; otherwise None.
pub fn run_if_asked() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != SUBCOMMAND {
        return None;
    }
    let Some(log) = args.next() else {
        eprintln!("usage: {SUBCOMMAND} <log file>, its streams as descriptors 3 and 4");
        return Some(2);
    };
    // Checked before anything here opens a file (which could take 3).
    // Only what `spawn` hands over: a stream (a socket) or /dev/null.
    for fd in [3, 4] {
        // SAFETY: a zeroed stat is a valid value of the plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which we own, for any fd number.
        let ok = unsafe { libc::fstat(fd, &mut st) } == 0
            && matches!(st.st_mode & libc::S_IFMT, libc::S_IFSOCK | libc::S_IFCHR);
        if !ok {
            eprintln!("{SUBCOMMAND}: descriptor {fd} is not a stream: this mode is husk's own");
            return Some(2);
        }
    }
    let log = match LogWriter::create(Path::new(&log)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{SUBCOMMAND}: {}", crate::util::chain(&e));
            return Some(1);
        }
    };
    // SAFETY: descriptors 3 and 4 were set up for this process by `spawn`
    // (checked first) and nothing else in it owns them.
    let (out, err) = unsafe {
        use std::os::fd::FromRawFd;
        (UnixStream::from_raw_fd(3), UnixStream::from_raw_fd(4))
    };
    let out = copy_to_log(Some(out), "stdout", log.clone(), None);
    let err = copy_to_log(Some(err), "stderr", log, None);
    let _ = out.join();
    let _ = err.join();
    Some(0)
}
