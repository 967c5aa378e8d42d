//! Process-wide counters, served as JSON on `GET /metrics` (one VM per
//! process, so process-wide is per-VM). Relaxed atomics: counters only.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($group:ident { $($name:ident),* $(,)? })*) => {
        /// Counters grouped as in the JSON output.
        pub struct Metrics {
            $(pub $group: $group::Group,)*
        }

        $(
            #[allow(non_snake_case)]
            pub mod $group {
                use super::*;
                pub struct Group {
                    $(pub $name: AtomicU64,)*
                }
                impl Default for Group {
                    fn default() -> Self {
                        Self::new()
                    }
                }
                impl Group {
                    pub const fn new() -> Self {
                        Group { $($name: AtomicU64::new(0),)* }
                    }
                    pub fn json(&self) -> serde_json::Value {
                        serde_json::json!({ $(stringify!($name): self.$name.load(Ordering::Relaxed),)* })
                    }
                }
            }
        )*

        impl Default for Metrics {
            fn default() -> Self {
                Self::new()
            }
        }
        impl Metrics {
            pub const fn new() -> Self {
                Metrics { $($group: $group::Group::new(),)* }
            }
            pub fn json(&self) -> serde_json::Value {
                serde_json::json!({ $(stringify!($group): self.$group.json(),)* })
            }
        }
    };
}

metrics! {
    vcpu { exits_io, exits_mmio, exits_other, failures }
    block { requests, read_bytes, write_bytes, flushes, errors }
    vsock {
        host_connections, guest_connections, rx_bytes, tx_bytes, resets, bad_packets,
        refused, dropped_rsts, killed, over_budget
    }
    rng { bytes }
    virtio { queue_notifies, notify_exits }
    net { rx_bytes, tx_bytes, rx_dropped, tx_dropped }
    api { requests, errors }
}

pub static METRICS: Metrics = Metrics::new();

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub fn inc(c: &AtomicU64) {
    add(c, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_group() {
        inc(&METRICS.block.requests);
        let j = METRICS.json();
        assert!(j["block"]["requests"].as_u64().unwrap() >= 1);
        assert!(j["vsock"]["rx_bytes"].is_u64());
    }
}
