//! The VMM's log, bounded: much of what it logs is caused by the guest (a
//! bad ring, a refused request), and a guest that repeats a mistake in a
//! loop must not fill the host's disk through us. Each (target, level)
//! gets a burst of lines and then a few a second; what is dropped is
//! counted, and the count is written when lines flow again.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Lines a (target, level) may write at once, and per second after that.
pub const BURST: f64 = 20.0;
pub const PER_SECOND: f64 = 5.0;
/// Distinct (target, level) pairs tracked; targets are the program's and
/// its crates' modules, so this is never reached in practice. Past it,
/// lines of new pairs are dropped.
const MAX_KEYS: usize = 1024;

struct Bucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

#[derive(Default)]
pub struct RateLimit {
    buckets: Mutex<HashMap<(String, Level), Bucket>>,
}

impl RateLimit {
    pub fn new() -> RateLimit {
        RateLimit::default()
    }

    /// Whether a line of `target` at `level` may be written now.
    pub fn allow(&self, target: &str, level: Level, now: Instant) -> bool {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = buckets.len() >= MAX_KEYS;
        let b = match buckets.entry((target.to_string(), level)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => return false,
            Entry::Vacant(e) => e.insert(Bucket {
                tokens: BURST,
                last: now,
                dropped: 0,
            }),
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * PER_SECOND).min(BURST);
        b.last = now;
        if b.tokens < 1.0 {
            b.dropped += 1;
            return false;
        }
        b.tokens -= 1.0;
        if b.dropped > 0 {
            // Straight to stderr: logging from inside the filter would
            // come back here.
            eprintln!(
                "husk-vmm: {} {level} lines from {target} were dropped \
                 (more than {PER_SECOND} a second)",
                b.dropped
            );
            b.dropped = 0;
        }
        true
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        !meta.is_event() || self.allow(meta.target(), *meta.level(), Instant::now())
    }

    /// Asked per event, never cached for the call site.
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_event() {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_a_few_a_second_per_target_and_level() {
        let r = RateLimit::new();
        let t0 = Instant::now();
        let allowed = (0..1000)
            .filter(|_| r.allow("virtio_queue", Level::ERROR, t0))
            .count();
        assert_eq!(allowed, BURST as usize);
        // Another target, another level: their own budgets.
        assert!(r.allow("husk_vmm::devices", Level::ERROR, t0));
        assert!(r.allow("virtio_queue", Level::WARN, t0));
        // A second later: five more.
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..1000)
            .filter(|_| r.allow("virtio_queue", Level::ERROR, t1))
            .count();
        assert_eq!(allowed, PER_SECOND as usize);
    }
}
