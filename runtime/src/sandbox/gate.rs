//! The host's start gate: at most a few sandboxes do their start's guest
//! work at once, host-wide, across every process that starts them (husk,
//! huskd, each containerd shim).
//!
//! Why: a start is guest-kernel work, CPU-bound in the guest's one vCPU.
//! More runnable vCPUs than host CPUs makes each start cost more host CPU,
//! not only more wall time: measured with `bench/ctr` on this machine's
//! emulated guest kernel (2 CPUs), the vCPU time of one CRI pod's start
//! was 4.2 s alone, 6.3 s each with 3 at once and 18 s each with 10 at
//! once (every VM's vCPU preempted mid-emulation, its work redone or
//! its caches refilled). Starting them a CPU's worth at a time finishes
//! all of them sooner and each one sooner than the last in the crowd.
//!
//! A slot is an exclusive flock(2) on one of N files: released when its
//! holder closes it or dies, so a crashed start frees its slot. The files
//! are opened close-on-exec: a VMM spawned while the slot is held does not
//! inherit it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{IoContext, IoError, Lock};

/// How long a waiter sleeps between looks at the slots: short against a
/// start's seconds, long enough that waiting costs the host nothing.
const POLL: Duration = Duration::from_millis(25);

/// At most this many slots, whatever `HUSK_START_SLOTS` says: each waiter
/// tries every slot's file on each look.
const MAX_SLOTS: usize = 256;

/// The gate: `slots` lock files under `dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartGate {
    pub dir: PathBuf,
    /// 0: no gate (every start goes at once).
    pub slots: usize,
}

/// One start's place through the gate, held until dropped.
#[derive(Debug)]
pub struct StartSlot {
    _lock: Lock,
    /// Which slot (for logs).
    pub index: usize,
    /// How long the start waited for it.
    pub waited: Duration,
}

impl StartGate {
    /// The host's gate: `$HUSK_START_SLOTS` slots (0 turns it off; at most
    /// `MAX_SLOTS`), else
    /// one per CPU this process may run on; under `/run/husk-start` for
    /// root (one gate for the host, whatever run directory each husk
    /// process uses; /run, not the world-writable /run/lock, so no other
    /// user can hold its slots), else under `run_dir`.
    pub fn host(run_dir: &Path) -> StartGate {
        let slots = std::env::var("HUSK_START_SLOTS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .min(MAX_SLOTS);
        // SAFETY: geteuid has no arguments and cannot fail.
        let dir = if unsafe { libc::geteuid() } == 0 {
            PathBuf::from("/run/husk-start")
        } else {
            run_dir.join("start-slots")
        };
        StartGate { dir, slots }
    }

    /// Waits for a free slot; None when the gate is off.
    pub fn enter(&self) -> Result<Option<StartSlot>, IoError> {
        if self.slots == 0 {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir).at(|| crate::util::shown(&self.dir))?;
        let t = Instant::now();
        // Each waiter looks at the slots from a different one first, so
        // that waiters do not all contend for slot 0.
        let first = std::process::id() as usize % self.slots;
        loop {
            for k in 0..self.slots {
                let index = (first + k) % self.slots;
                let path = self.dir.join(format!("slot-{index}"));
                if let Some(lock) = Lock::take(&path, false)? {
                    return Ok(Some(StartSlot {
                        _lock: lock,
                        index,
                        waited: t.elapsed(),
                    }));
                }
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_waits_for_a_slot_and_gets_one_freed() {
        let dir = tempfile::tempdir().unwrap();
        let gate = StartGate {
            dir: dir.path().join("gate"),
            slots: 2,
        };
        let a = gate.enter().unwrap().unwrap();
        let b = gate.enter().unwrap().unwrap();
        assert_ne!(a.index, b.index);
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.enter().unwrap().unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "a third start went through a gate of two"
        );
        let freed = a.index;
        drop(a);
        let c = waiter.join().unwrap();
        assert_eq!(c.index, freed);
        assert!(c.waited >= Duration::from_millis(150), "{:?}", c.waited);
        drop(b);
    }

    #[test]
    fn no_slots_is_no_gate() {
        let dir = tempfile::tempdir().unwrap();
        let gate = StartGate {
            dir: dir.path().join("gate"),
            slots: 0,
        };
        assert!(gate.enter().unwrap().is_none());
        assert!(!gate.dir.exists());
    }
}
