//! Which slots a service wants (the replicated orchestrator's 1..=n, the
//! global one's every ready node its constraints allow), the scale-down
//! of the rest, and the constraint enforcer.

use super::service::Pass;
use super::*;

/// Live tasks on drained nodes, or nodes that no longer meet the
/// constraints, stop (the emptied slot is filled later in the pass).
pub(super) fn enforce_constraints(p: &Pass, tasks: &mut [Task]) {
    for &i in &p.mine {
        let t = &mut tasks[i];
        if !t.is_live() || t.node_id.is_empty() {
            continue;
        }
        let keep = p
            .nodes
            .get(t.node_id.as_str())
            .is_some_and(|n| n.availability != Availability::Drain && p.constraints_ok(n));
        if !keep {
            t.desired_state = TaskState::Shutdown;
        }
    }
}

/// The slots there should be: 1..=replicas, or one per ready, undrained
/// node that meets the constraints (a paused node keeps its global task).
pub(super) fn wanted_slots(p: &Pass) -> Vec<Slot> {
    match &p.spec.mode {
        Mode::Replicated { replicas } => (1..=*replicas).map(Slot::Index).collect(),
        Mode::Global => {
            let mut v: Vec<Slot> = p
                .nodes
                .values()
                .filter(|n| {
                    n.state == NodeState::Ready
                        && n.availability != Availability::Drain
                        && p.constraints_ok(n)
                })
                .map(|n| Slot::Node(n.id.clone()))
                .collect();
            v.sort();
            v
        }
    }
}

/// Slots past the count stop.
pub(super) fn scale_down(p: &Pass, tasks: &mut [Task], wanted: &[Slot]) {
    for &i in &p.mine {
        let t = &mut tasks[i];
        if t.is_live() && !wanted.contains(&slot_of(t)) {
            t.desired_state = TaskState::Shutdown;
        }
    }
}
