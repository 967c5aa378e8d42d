//! A process's stdio between containerd's FIFOs and the agent's streams.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use husk_runtime::agent::{Io, Streams};

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
/// schemes (`binary://` loggers) are refused by name.
fn path_of(uri: &str) -> Result<&str> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(p);
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        bail!("stdio {uri:?}: {scheme}:// is not supported (FIFO paths and file:// are)");
    }
    Ok(uri)
}

/// Copy threads of one process; joined once it exits, so its output is all
/// delivered before containerd hears of the exit.
#[derive(Default)]
pub struct Copies {
    out: Vec<JoinHandle<()>>,
}

impl Copies {
    /// Starts copying between `stdio`'s FIFOs and the agent's `streams`.
    pub fn start(stdio: &Stdio, streams: &mut Streams) -> Result<Copies> {
        let mut c = Copies::default();
        let outputs = [
            (&stdio.stdout, streams.stdout.take()),
            (&stdio.stderr, streams.stderr.take()),
        ];
        for (path, stream) in outputs {
            let (Some(stream), false) = (stream, path.is_empty()) else {
                continue;
            };
            let p = path_of(path)?;
            // containerd holds the read end open: this does not block.
            let fifo = OpenOptions::new()
                .append(true)
                .open(p)
                .with_context(|| format!("opening {p}"))?;
            c.out
                .push(std::thread::spawn(move || copy_out(stream, fifo)));
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
        let e = path_of("binary:///usr/bin/logger?x=1").unwrap_err();
        assert!(e.to_string().contains("binary:// is not supported"), "{e}");
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
