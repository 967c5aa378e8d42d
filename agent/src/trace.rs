//! libcontainer's own steps, timed: while the host profiles (Profile with
//! `count`), a build's builder installs this subscriber for libcontainer's
//! `tracing` events. The builder and the processes libcontainer clones from
//! it (the intermediate and the container's init, which does the mounts)
//! each write one line per event to the same O_APPEND file: the monotonic
//! time, the pid and the message. The agent turns the lines into profile
//! steps: each event the time until the next one.
//!
//! One write(2) per event: lines from the three processes do not mix, and
//! the file outlives pivot_root (the descriptor does).

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata};

/// Events kept from one build's trace, and the longest message kept.
const MAX_EVENTS: usize = 200;
const MAX_MESSAGE: usize = 96;

struct Tracer {
    file: OwnedFd,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0.len() < MAX_MESSAGE * 2 {
            if field.name() == "message" {
                let _ = write!(self.0, "{value:?} ");
            } else {
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
    }
}

impl tracing::Subscriber for Tracer {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::DEBUG
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut m = Message(String::new());
        e.record(&mut m);
        let text: String =
            m.0.trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_MESSAGE)
                .collect();
        let line = format!(
            "{} {} {}\n",
            crate::spawner::monotonic_ns(),
            std::process::id(),
            text
        );
        // SAFETY: one write of a buffer we own to a descriptor we own.
        unsafe { libc::write(self.file.as_raw_fd(), line.as_ptr().cast(), line.len()) };
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// In a builder: libcontainer's events go to `path` from now on. Fails
/// quietly (a build is not refused for want of its trace).
pub fn install(path: &Path) {
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let mut f = f;
    let _ = writeln!(
        f,
        "{} {} build",
        crate::spawner::monotonic_ns(),
        std::process::id()
    );
    let _ = tracing::subscriber::set_global_default(Tracer { file: f.into() });
}

/// In the agent: a build's trace as profile steps, `lc.<n> [pid] <message>`,
/// each timed from its line to the next (by whichever process): the work
/// that followed the event. The file is removed.
pub fn record(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    for (name, micros) in steps(&text) {
        crate::profile::PROFILE.record(&name, micros);
    }
}

/// The steps of a trace's text (see `record`); the last line ends the last
/// step.
fn steps(text: &str) -> Vec<(String, u64)> {
    let events: Vec<(u64, &str, &str)> = text
        .lines()
        .take(MAX_EVENTS)
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let t = parts.next()?.parse::<u64>().ok()?;
            Some((t, parts.next()?, parts.next().unwrap_or("")))
        })
        .collect();
    events
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let ((t, pid, msg), (next, _, _)) = (w[0], w[1]);
            (
                format!("lc.{i:02} [{pid}] {msg}"),
                next.saturating_sub(t) / 1000,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_steps_between_its_lines() {
        let text = "1000000 7 build\n3000000 8 mounting \"/proc\"\nbad line\n4500000 9 done\n";
        assert_eq!(
            steps(text),
            vec![
                ("lc.00 [7] build".to_string(), 2000),
                ("lc.01 [8] mounting \"/proc\"".to_string(), 1500)
            ]
        );
        assert!(steps("").is_empty());
    }
}
