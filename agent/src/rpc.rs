//! Helpers every service uses: the version check, error statuses and the
//! caller's deadline.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use ttrpc::Code;

/// A request's ttrpc metadata.
pub type Metadata = HashMap<String, Vec<String>>;

/// Refuses a request whose client speaks another API version.
pub fn check_version(meta: &Metadata) -> ttrpc::Result<()> {
    let values = meta.get(husk_protocol::VERSION_KEY).map(|v| v.as_slice());
    husk_protocol::check_version(values)
        .map_err(|m| ttrpc::Error::RpcStatus(ttrpc::get_status(Code::FAILED_PRECONDITION, m)))
}

pub fn invalid(msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, msg.into()))
}

pub fn internal(msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, msg.into()))
}

pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An error with every cause under it: libcontainer's outer errors
/// ("failed to launch init process") name the step, the errno is below.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}

thread_local! {
    /// When the request this thread serves must be answered by (the
    /// caller's ttrpc timeout), if it set one.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// What a wait inside a request leaves for the answer to travel back: at
/// least this, and a tenth of the caller's deadline. The deadline starts
/// when the caller sends, ours when the request arrives, seconds later in a
/// slow guest; with a fixed 2 s, a stream that never came timed the
/// caller out (a bare "timeout") before our error naming it got back.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);
const ANSWER_SHARE: u32 = 10;

/// Runs `f` as the handler of a request whose caller waits `timeout_nano`
/// (0: no deadline).
pub fn with_deadline<T>(timeout_nano: i64, f: impl FnOnce() -> T) -> T {
    let deadline = u64::try_from(timeout_nano)
        .ok()
        .filter(|&n| n > 0)
        .map(Duration::from_nanos)
        .map(|t| Instant::now() + t.saturating_sub(ANSWER_MARGIN.max(t / ANSWER_SHARE)));
    DEADLINE.with(|d| d.set(deadline));
    let r = f();
    DEADLINE.with(|d| d.set(None));
    r
}

/// How long a wait inside the current request may last: until just before
/// the caller gives up, or `default` for a caller with no deadline. The
/// guest's speed is the host's to judge: where guest-kernel work is
/// emulated, a stream's connection or a killed process's exit takes tens
/// of seconds under load, and a fixed guess in the agent failed calls the
/// caller was still willing to wait for.
pub fn time_left(default: Duration) -> Duration {
    DEADLINE.with(|d| match d.get() {
        Some(at) => at.saturating_duration_since(Instant::now()),
        None => default,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_causes() {
        // As libcontainer's errors: the outer message names the step only.
        #[derive(Debug)]
        struct Step(std::io::Error);
        impl std::fmt::Display for Step {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("failed to launch init process")
            }
        }
        impl std::error::Error for Step {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Step(std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(e.to_string(), "failed to launch init process");
        assert!(
            causes(&e).ends_with(": Cannot allocate memory (os error 12)"),
            "{}",
            causes(&e)
        );
    }

    #[test]
    fn waits_follow_the_callers_deadline() {
        let d = Duration::from_secs(7);
        assert_eq!(time_left(d), d, "no request: the default");
        let left = with_deadline(60_000_000_000, || time_left(d));
        assert!(
            left > Duration::from_secs(50) && left <= Duration::from_secs(54),
            "a tenth kept for the answer: {left:?}"
        );
        let left = with_deadline(5_000_000_000, || time_left(d));
        assert!(
            left <= Duration::from_secs(3),
            "at least 2 s kept: {left:?}"
        );
        assert_eq!(
            with_deadline(0, || time_left(d)),
            d,
            "no deadline: the default"
        );
        assert_eq!(
            with_deadline(1, || time_left(d)),
            Duration::ZERO,
            "already past"
        );
        assert_eq!(time_left(d), d, "cleared after the request");
    }
}
