//! Numbers from cgroup v2 files, for stats and OOM events.

use std::collections::HashMap;
use std::path::Path;
use std::time::UNIX_EPOCH;

pub(super) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A cgroup "key value" file as a map (missing file: empty).
pub(super) fn read_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

pub(super) fn oom_kills(cgroup: &Path) -> u64 {
    read_keyed(&cgroup.join("memory.events"))
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

pub(super) fn unix_nanos(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
