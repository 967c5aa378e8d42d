//! A process's stdio between containerd's FIFOs and the agent's streams;
//! or, for a `binary://` log URI, a logger process fed as containerd's runc
//! shim feeds one (stdout on fd 3, stderr on fd 4, fd 5 closed by the
//! logger when it is ready; only CONTAINER_ID and CONTAINER_NAMESPACE in
//! its environment; the URI's query as arguments).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use crate::error::{Result, ShimError};
use husk_runtime::guest::{Io, Streams};
use husk_runtime::util::{IoContext, IoError};

/// The stdio a task was created with (paths as containerd gave them).
#[derive(Clone, Debug, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Stdio {
    /// The streams to ask the agent for: a terminal merges stderr into its
    /// output.
    pub fn io(&self) -> Io {
        Io {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
        }
    }
}

/// containerd's FIFO paths; `file://` is a file to append to. Other URI
/// schemes are refused by name (`binary://` is handled before).
fn path_of(uri: &str) -> Result<&str> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(p);
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(ShimError::Unsupported(format!(
            "stdio {uri:?}: {scheme}:// is not supported (FIFO paths, file:// and binary:// are)"
        )));
    }
    Ok(uri)
}

/// Whose output a logger gets.
pub struct Owner<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
}

/// `%XX` escapes of a URI component decoded (`+` is a space in a query).
fn unescape(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| Some(hex(b[i + 1])? << 4 | hex(b[i + 2])?))
            .flatten();
        match (escaped, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `binary://` URI's program and arguments (each query key, then its
/// first value if it has one), as containerd builds them.
fn logger_command(uri: &str) -> Result<(String, Vec<String>)> {
    let rest = uri
        .strip_prefix("binary://")
        .ok_or_else(|| ShimError::Unsupported(format!("{uri:?} is not a binary:// URI")))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = unescape(path);
    if !path.starts_with('/') {
        return Err(ShimError::Unsupported(format!(
            "log URI {uri:?}: the logger's path must be absolute"
        )));
    }
    let mut args = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        args.push(unescape(k));
        if !v.is_empty() {
            args.push(unescape(v));
        }
    }
    Ok((path, args))
}

/// Starts the logger of `uri` and waits until it says it is ready;
/// returns the write ends of its stdout and stderr pipes.
fn start_logger(uri: &str, owner: &Owner) -> Result<(File, File)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let (program, args) = logger_command(uri)?;
    let pipe = || -> Result<(File, File)> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array with new descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(IoError {
                what: "pipe2".into(),
                source: std::io::Error::last_os_error(),
            }
            .into());
        }
        // SAFETY: both descriptors were just returned to us, owned by no one.
        Ok(unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from_raw_fd(fds[1]),
            )
        })
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (mut ready_r, ready_w) = pipe()?;
    let child_fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .env("CONTAINER_ID", owner.id)
        .env("CONTAINER_NAMESPACE", owner.namespace)
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only dup2/fcntl on descriptors we hold.
    unsafe {
        cmd.pre_exec(move || {
            // Moved out of the way first, so no dup2 overwrites a source.
            let mut high = [0; 3];
            for (i, fd) in child_fds.iter().enumerate() {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .at(|| format!("starting the logger {program}"))?;
    drop((out_r, err_r, ready_w));
    // Ready when it closes fd 5 (EOF here); one that exits first is too.
    let mut b = [0u8; 1];
    let _ = ready_r.read(&mut b);
    // The shim's reaper collects it; the handle is not needed.
    drop(child);
    Ok((out_w, err_w))
}

/// Copy threads of one process; joined once it exits, so its output is all
/// delivered before containerd hears of the exit.
#[derive(Default)]
pub struct Copies {
    out: Vec<JoinHandle<()>>,
}

impl Copies {
    /// Starts copying between `stdio`'s FIFOs (or logger) and the agent's
    /// `streams`.
    pub fn start(stdio: &Stdio, streams: &mut Streams, owner: &Owner) -> Result<Copies> {
        let mut c = Copies::default();
        let mut logger = if stdio.stdout.starts_with("binary://") {
            let (o, e) = start_logger(&stdio.stdout, owner)?;
            (Some(o), Some(e))
        } else {
            (None, None)
        };
        let outputs = [
            (&stdio.stdout, streams.stdout.take(), logger.0.take()),
            (&stdio.stderr, streams.stderr.take(), logger.1.take()),
        ];
        for (path, stream, to_logger) in outputs {
            let (Some(stream), false) = (stream, path.is_empty()) else {
                continue;
            };
            let to = match to_logger {
                Some(pipe) => pipe,
                None => {
                    let p = path_of(path)?;
                    // containerd holds the read end open: this does not block.
                    OpenOptions::new()
                        .append(true)
                        .open(p)
                        .at(|| format!("opening {p}"))?
                }
            };
            c.out.push(std::thread::spawn(move || copy_out(stream, to)));
        }
        if let (Some(stream), false) = (streams.stdin.take(), stdio.stdin.is_empty()) {
            let p = path_of(&stdio.stdin)?.to_string();
            // Opening a FIFO for reading waits for a writer: in its own
            // thread, which ends with the input.
            std::thread::spawn(move || {
                if let Ok(f) = File::open(&p) {
                    copy_in(f, stream);
                }
            });
        }
        Ok(c)
    }

    /// Waits for the output to be drained (the agent closes the streams
    /// when the process has exited and its output is sent).
    pub fn join(self) {
        for t in self.out {
            let _ = t.join();
        }
    }
}

/// Copies until either side ends.
fn pump(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

fn copy_out(mut from: UnixStream, mut to: File) {
    pump(&mut from, &mut to);
}

fn copy_in(mut from: File, mut to: UnixStream) {
    pump(&mut from, &mut to);
    // The process sees the end of its input.
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_uris() {
        assert_eq!(path_of("/run/fifo").unwrap(), "/run/fifo");
        assert_eq!(path_of("file:///var/log/x").unwrap(), "/var/log/x");
        let e = path_of("syslog://x").unwrap_err();
        assert!(e.to_string().contains("syslog:// is not supported"), "{e}");
        let (p, a) = logger_command("binary:///usr/bin/my%20logger?tag=a%2Fb&verbose").unwrap();
        assert_eq!(p, "/usr/bin/my logger");
        assert_eq!(a, ["tag", "a/b", "verbose"]);
        assert!(logger_command("binary://rel/logger").is_err());
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%zz+x"), "%zz x");
    }

    #[test]
    fn a_logger_gets_the_output_on_fds_3_and_4_once_ready() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("logger");
        // Ready only after a second, then copies both outputs.
        std::fs::write(
            &script,
            "#!/bin/sh\nsleep 1\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $HOME $*\" > \"$2.env\"\n\
             exec 5>&-\ncat <&3 > \"$2.out\" &\ncat <&4 > \"$2.err\"\nwait\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let base = dir.path().join("log");
        let uri = format!("binary://{}?to={}", script.display(), base.display());
        let t = std::time::Instant::now();
        let (mut o, mut e) = start_logger(
            &uri,
            &Owner {
                id: "c1",
                namespace: "ns",
            },
        )
        .unwrap();
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(900),
            "not waited for"
        );
        o.write_all(b"to stdout\n").unwrap();
        e.write_all(b"to stderr\n").unwrap();
        drop((o, e));
        let read = |ext: &str| {
            let p = base.with_extension(ext);
            for _ in 0..100 {
                match std::fs::read_to_string(&p) {
                    Ok(s) if s.ends_with('\n') => return s,
                    _ => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            }
            panic!("{} never written", p.display())
        };
        assert_eq!(read("out"), "to stdout\n");
        assert_eq!(read("err"), "to stderr\n");
        // Only the two variables (no HOME), the query as arguments.
        assert_eq!(read("env"), format!("c1 ns  to {}\n", base.display()));
        let e = start_logger(
            "binary:///nonexistent/logger",
            &Owner {
                id: "c",
                namespace: "n",
            },
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/logger"), "{e:#}");
    }

    #[test]
    fn a_terminal_has_no_separate_stderr() {
        let s = Stdio {
            stdin: "/i".into(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: true,
        };
        let io = s.io();
        assert!(io.stdin && io.stdout && !io.stderr);
    }
}
