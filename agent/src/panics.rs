//! What a panic does in PID 1.
//!
//! The guest build unwinds (the `guest` profile), so a bug in one request
//! handler fails that request, answered INTERNAL, and the agent serves on:
//! the sandbox and its other containers are not lost to one bad request.
//! Anywhere else a panic leaves the agent without a part it needs (the
//! reaper, the server thread, a stream relay), so it is logged and the
//! guest reboots at once: the host sees the VM end, with the reason on its
//! console, rather than a guest that half works. A forked child of the
//! agent (the spawner and its builders) must never unwind into the
//! parent's code it shares: it aborts.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

thread_local! {
    /// Set while this thread runs a request handler.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// The agent's own pid: a panic in any other process is a forked child's.
static AGENT_PID: OnceLock<u32> = OnceLock::new();

/// Installs the hook. `fatal` runs for a panic outside a handler, after it
/// is logged: rebooting the guest, or exiting on a host.
pub fn install(fatal: fn() -> !) {
    let _ = AGENT_PID.set(std::process::id());
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = message(info.payload());
        if Some(&std::process::id()) != AGENT_PID.get() {
            eprintln!("husk-agent (forked child): panic{place}: {msg}; aborting");
            std::process::abort();
        }
        if IN_HANDLER.with(Cell::get) {
            eprintln!("husk-agent: request handler panicked{place} (thread {name}): {msg}");
            return;
        }
        eprintln!(
            "husk-agent: panic outside a request handler{place} (thread {name}): {msg}; \
             the agent cannot go on"
        );
        fatal()
    }));
}

/// Runs one request handler: a panic in it becomes `Err` with its message,
/// and the agent goes on.
pub fn in_handler<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = IN_HANDLER.with(|h| h.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f)).map_err(|p| message(&*p));
    IN_HANDLER.with(|h| h.set(outer));
    r
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-string panic payload)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_panic_is_an_error_and_the_flag_is_restored() {
        let r: Result<(), String> = in_handler(|| panic!("boom {}", 7));
        assert_eq!(r, Err("boom 7".into()));
        assert!(!IN_HANDLER.with(Cell::get));
        assert_eq!(in_handler(|| 5), Ok(5));
        // Nested handlers (an inline call inside a pool one) keep the outer flag.
        let inner = in_handler(|| {
            let _ = in_handler(|| ());
            IN_HANDLER.with(Cell::get)
        });
        assert_eq!(inner, Ok(true));
    }
}
