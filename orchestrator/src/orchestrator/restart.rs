//! The restart supervisor: whether a slot whose task ended by itself
//! gets a new one (condition, attempts in a window, delay).

use super::service::{latest_of, Pass};
use super::*;

pub(super) fn restart_allowed(
    s: &Snapshot,
    spec: &ServiceSpec,
    t: &Task,
    slot: &[usize],
    tasks: &[Task],
) -> bool {
    let p = &spec.restart_policy;
    match p.condition {
        RestartCondition::None => return false,
        RestartCondition::OnFailure if !failed(t) => return false,
        _ => {}
    }
    if p.max_attempts == 0 {
        return true;
    }
    // Restarts so far (in the window): tasks of the slot that ended by
    // themselves, less the first run.
    let since = if p.window_ms == 0 {
        0
    } else {
        s.now_ms.saturating_sub(p.window_ms)
    };
    let ended = slot
        .iter()
        .filter(|&&i| ended_by_itself(&tasks[i]) && tasks[i].status.timestamp_ms >= since)
        .count() as u64;
    ended <= p.max_attempts
}

/// The restart supervisor: an empty slot gets a task unless an outdated
/// one is still stopping there, its node is paused (global), or its last
/// task rests or waits out the restart delay. A finished last task is
/// retired (the slot's history keeps it).
pub(super) fn refill_empty(p: &Pass, tasks: &mut [Task], slot: &Slot, idx: &[usize]) -> bool {
    if idx.iter().any(|&i| p.stopping_outdated(&tasks[i])) {
        return false;
    }
    if let Slot::Node(id) = slot {
        if p.nodes
            .get(id.as_str())
            .is_some_and(|n| n.availability != Availability::Active)
        {
            return false;
        }
    }
    // The newest task of the slot says whether it restarts.
    if let Some(l) = latest_of(idx, tasks) {
        let t = &tasks[l];
        if t.desired_state == TaskState::Running && t.status.state.is_terminal() {
            if p.at_rest(t, idx, tasks) {
                return false;
            }
            if ended_by_itself(t)
                && p.s.now_ms < t.status.timestamp_ms + p.spec.restart_policy.delay_ms
            {
                return false;
            }
            tasks[l].desired_state = TaskState::Shutdown;
        }
    }
    true
}
