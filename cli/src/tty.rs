//! A container's terminal on this one: raw mode, window size, stdin.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use husk_protocol::agent::TtyWinResizeRequest;
use husk_runtime::guest::{ctx, AgentConn};

/// Copies this process's stdin to a process's stdin stream. Detached: the
/// process may exit before stdin ends. End of input is a half-close, which
/// reaches the process after the data (a CloseStdin call could overtake
/// data still on its way).
pub(crate) fn forward_stdin(mut input: UnixStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut input);
        let _ = input.shutdown(std::net::Shutdown::Write);
    });
}

/// This terminal, while a container's terminal is attached to it: raw
/// (keys go to the container as typed) and its size followed; restored
/// when dropped. Without a terminal on stdin, only the size is sent (none).
pub(crate) struct Terminal {
    saved: Option<libc::termios>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub(crate) fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own; fd 1 may not be a tty, in
    // which case the call fails and nothing is read.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

impl Terminal {
    pub(crate) fn attach(agent: &AgentConn, id: &str, exec_id: &str) -> Terminal {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios we own.
        let saved = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::isatty(0) == 1 && libc::tcgetattr(0, &mut t) == 0 {
                let mut raw = t;
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(0, libc::TCSANOW, &raw);
                Some(t)
            } else {
                None
            }
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The size is polled: a SIGWINCH handler would need a thread of its
        // own anyway, and a resize is rare.
        if let Some(first) = window_size() {
            let (stop2, containers) = (stop.clone(), agent.containers.clone());
            let (id, exec_id) = (id.to_string(), exec_id.to_string());
            std::thread::spawn(move || {
                let mut last = None;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let size = window_size().unwrap_or(first);
                    if last != Some(size) {
                        let req = TtyWinResizeRequest {
                            container_id: id.clone(),
                            exec_id: exec_id.clone(),
                            rows: size.0.into(),
                            cols: size.1.into(),
                            ..Default::default()
                        };
                        let _ = containers.tty_win_resize(ctx(Duration::from_secs(10)), &req);
                        last = Some(size);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
        Terminal { saved, stop }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read from fd 0 in attach.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}
