//! The updater (swarmkit's): an update's progress and failure action,
//! how many of its tasks are in flight, the next batch's budget, and its
//! completion.

use std::collections::BTreeMap;

use super::service::{latest_of, Pass};
use super::*;

/// An update's new tasks so far.
pub(super) struct Progress {
    pub(super) updated: u64,
    pub(super) failures: u64,
    /// When the last new task finished its monitor period.
    pub(super) last_done: u64,
}

/// New tasks (this version, since the update began) that failed, or ran
/// past the monitor period.
pub(super) fn update_progress(p: &Pass, tasks: &[Task]) -> Progress {
    let mut g = Progress {
        updated: 0,
        failures: 0,
        last_done: 0,
    };
    for &i in &p.mine {
        let t = &tasks[i];
        if !p.is_new(t) {
            continue;
        }
        g.updated += 1;
        if failed(t) {
            g.failures += 1;
        } else if t.is_live() && p.monitored(t) {
            g.last_done = g.last_done.max(t.status.timestamp_ms + p.ucfg.monitor_ms);
        }
    }
    g
}

/// Too many failures: roll back (to the previous spec, as a new version)
/// or pause, as the update config says. True when the service changed.
pub(super) fn apply_failure_action(p: &Pass, svc: &mut Service, g: &Progress) -> bool {
    let u = &p.ucfg;
    if !p.updating || g.failures == 0 || u.failure_action == FailureAction::Continue {
        return false;
    }
    let ratio = g.failures as f64 / g.updated as f64;
    if ratio <= u.max_failure_ratio {
        return false;
    }
    let now = p.s.now_ms;
    let what = format!("{} of {} updated tasks failed", g.failures, g.updated);
    if u.failure_action == FailureAction::Rollback && !p.rolling_back {
        if let Some(prev) = svc.previous_spec.take() {
            svc.previous_spec = Some(std::mem::replace(&mut svc.spec, prev));
            svc.version += 1;
            svc.updated_ms = now;
            svc.update_status = Some(UpdateStatus {
                state: UpdateState::RollbackStarted,
                started_ms: now,
                completed_ms: 0,
                message: format!("update rolled back: {what}"),
            });
            // The next pass works from the rolled-back spec.
            return true;
        }
    }
    svc.update_status = Some(UpdateStatus {
        state: if p.rolling_back {
            UpdateState::RollbackPaused
        } else {
            UpdateState::Paused
        },
        started_ms: p.update_started,
        completed_ms: 0,
        message: format!("update paused: {what}"),
    });
    true
}

/// Slots mid-replacement, and slots with an outdated task left.
pub(super) struct Flight {
    pub(super) in_flight: u64,
    pub(super) outdated_left: u64,
}

/// A slot is in flight while an outdated task stops, while its successor
/// has not been monitored long enough, or while it is empty and its last
/// task not at rest.
pub(super) fn in_flight(
    p: &Pass,
    tasks: &[Task],
    wanted: &[Slot],
    slots: &BTreeMap<Slot, Vec<usize>>,
) -> Flight {
    let mut f = Flight {
        in_flight: 0,
        outdated_left: 0,
    };
    for slot in wanted {
        let idx = slots.get(slot).cloned().unwrap_or_default();
        let live: Vec<&Task> = idx
            .iter()
            .map(|&i| &tasks[i])
            .filter(|t| t.is_live())
            .collect();
        if live.iter().any(|t| t.spec != p.spec) {
            f.outdated_left += 1;
        }
        let successor_pending = live.iter().any(|t| p.is_new(t) && !p.monitored(t));
        let handover = live.is_empty()
            && latest_of(&idx, tasks).is_none_or(|l| !p.at_rest(&tasks[l], &idx, tasks));
        if successor_pending || handover || idx.iter().any(|&i| p.stopping_outdated(&tasks[i])) {
            f.in_flight += 1;
        }
    }
    f
}

/// How many outdated slots may be replaced now: the parallelism left,
/// after the delay since the last batch finished; none while a batch with
/// a delay is in flight.
pub(super) fn update_budget(p: &Pass, in_flight: u64, last_done: u64) -> u64 {
    let u = &p.ucfg;
    let parallelism = if u.parallelism == 0 {
        u64::MAX
    } else {
        u.parallelism
    };
    if in_flight > 0 && u.delay_ms > 0 {
        return 0;
    }
    if p.updating && in_flight < parallelism && p.s.now_ms >= last_done + u.delay_ms {
        parallelism - in_flight
    } else {
        0
    }
}

/// Done when nothing outdated is left and every new task has run past the
/// monitor period. True when the service changed.
pub(super) fn complete_update(p: &Pass, svc: &mut Service, f: &Flight) -> bool {
    if !(p.updating && f.outdated_left == 0 && f.in_flight == 0) {
        return false;
    }
    let Some(u) = svc.update_status.as_mut() else {
        return false;
    };
    u.state = if p.rolling_back {
        UpdateState::RollbackCompleted
    } else {
        UpdateState::Completed
    };
    u.completed_ms = p.s.now_ms;
    u.message = if p.rolling_back {
        "rollback completed".into()
    } else {
        "update completed".into()
    };
    true
}
