//! One service's pass of the reconciler, in swarmkit's parts: the
//! constraint enforcer, the replicated and global orchestrators' slots,
//! the restart supervisor, and the updater (progress, failure action,
//! batches, completion). The steps run in the order `reconcile_service`
//! lists; each reads the pass's [`Pass`] and changes only what it names.

use std::collections::{BTreeMap, HashMap};

use crate::orchestrator::{
    dependencies_up, ended_by_itself, new_task, restart_allowed, slot_of, status, Slot, Snapshot,
};
use crate::scheduler::{self as sched, Load};
use crate::types::*;

use super::restart::*;
use super::slots::*;
use super::update::*;

/// What one service's pass works from.
pub(super) struct Pass<'a> {
    pub(super) s: &'a Snapshot<'a>,
    pub(super) nodes: &'a HashMap<&'a str, &'a Node>,
    /// The spec its tasks should have.
    pub(super) spec: ServiceSpec,
    /// Indices of its tasks in the pass's task list.
    pub(super) mine: Vec<usize>,
    pub(super) updating: bool,
    pub(super) rolling_back: bool,
    /// The update (or rollback) config in force.
    pub(super) ucfg: UpdateConfig,
    /// When the update began (0: none).
    pub(super) update_started: u64,
    pub(super) version: u64,
}

impl Pass<'_> {
    pub(super) fn constraints_ok(&self, n: &Node) -> bool {
        self.spec
            .placement
            .constraints
            .iter()
            .all(|c| sched::Constraint::parse(c).is_ok_and(|k| k.matches(n)))
    }

    /// A task of this version, made since the update began.
    pub(super) fn is_new(&self, t: &Task) -> bool {
        t.version == self.version && t.created_ms >= self.update_started
    }

    /// Running past the update's monitor period.
    pub(super) fn monitored(&self, t: &Task) -> bool {
        t.status.state == TaskState::Running
            && t.status.timestamp_ms + self.ucfg.monitor_ms <= self.s.now_ms
    }

    /// A task stopping because the spec changed (stop-first: its
    /// successor waits for it, they must not race for ports).
    pub(super) fn stopping_outdated(&self, t: &Task) -> bool {
        t.desired_state != TaskState::Running
            && !t.status.state.is_terminal()
            && t.spec != self.spec
            && self
                .nodes
                .get(t.node_id.as_str())
                .is_some_and(|n| n.state == NodeState::Ready)
    }

    /// The slot's last task is done for good: it ended by itself and its
    /// restart policy lets it rest.
    pub(super) fn at_rest(&self, t: &Task, idx: &[usize], tasks: &[Task]) -> bool {
        t.desired_state == TaskState::Running
            && ended_by_itself(t)
            && !restart_allowed(self.s, &self.spec, t, idx, tasks)
    }
}

pub(super) fn latest_of(idx: &[usize], tasks: &[Task]) -> Option<usize> {
    idx.iter()
        .copied()
        .max_by_key(|&i| (tasks[i].created_ms, tasks[i].id.clone()))
}

/// One service's slots; returns whether the service record changed.
pub(super) fn reconcile_service(
    s: &Snapshot,
    svc: &mut Service,
    nodes: &HashMap<&str, &Node>,
    tasks: &mut [Task],
    new_tasks: &mut Vec<Task>,
    load: &mut Load,
) -> bool {
    let p = pass(s, svc, nodes, tasks);
    enforce_constraints(&p, tasks);
    let wanted = wanted_slots(&p);
    scale_down(&p, tasks, &wanted);
    let progress = update_progress(&p, tasks);
    if apply_failure_action(&p, svc, &progress) {
        return true;
    }
    let mut slots: BTreeMap<Slot, Vec<usize>> = BTreeMap::new();
    for &i in &p.mine {
        slots.entry(slot_of(&tasks[i])).or_default().push(i);
    }
    let flight = in_flight(&p, tasks, &wanted, &slots);
    let mut budget = update_budget(&p, flight.in_flight, progress.last_done);
    for slot in &wanted {
        let idx = slots.get(slot).cloned().unwrap_or_default();
        if fill_slot(&p, tasks, slot, &idx, &mut budget) {
            if let Err(why) = dependencies_up(s, &p.spec, tasks) {
                tracing::debug!("service {}: {why}", p.spec.name);
                continue;
            }
            new_tasks.push(new_task(s, svc, slot, load));
        }
    }
    place_pending(&p, tasks, load);
    complete_update(&p, svc, &flight)
}

fn pass<'a>(
    s: &'a Snapshot,
    svc: &Service,
    nodes: &'a HashMap<&'a str, &'a Node>,
    tasks: &[Task],
) -> Pass<'a> {
    let spec = svc.spec.clone();
    let ustate = svc.update_status.as_ref().map(|u| u.state);
    let updating = matches!(
        ustate,
        Some(UpdateState::Updating | UpdateState::RollbackStarted)
    );
    let rolling_back = matches!(
        ustate,
        Some(UpdateState::RollbackStarted | UpdateState::RollbackPaused)
    );
    let ucfg = if rolling_back {
        spec.rollback_config.clone()
    } else {
        spec.update_config.clone()
    };
    Pass {
        s,
        nodes,
        mine: (0..tasks.len())
            .filter(|&i| tasks[i].service_id == svc.id)
            .collect(),
        spec,
        updating,
        rolling_back,
        ucfg,
        update_started: svc.update_status.as_ref().map_or(0, |u| u.started_ms),
        version: svc.version,
    }
}

/// One wanted slot: settles a slot with a current task, replaces an
/// outdated one within the budget, refills an empty one as its restart
/// policy says. True when the slot needs a new task.
fn fill_slot(p: &Pass, tasks: &mut [Task], slot: &Slot, idx: &[usize], budget: &mut u64) -> bool {
    let live: Vec<usize> = idx
        .iter()
        .copied()
        .filter(|&i| tasks[i].is_live())
        .collect();
    let (current, outdated): (Vec<usize>, Vec<usize>) =
        live.iter().partition(|&&i| tasks[i].spec == p.spec);
    if !current.is_empty() {
        settle_current(tasks, &current, &outdated);
        return false;
    }
    if !outdated.is_empty() {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        if p.ucfg.order == UpdateOrder::StopFirst {
            for &i in &outdated {
                tasks[i].desired_state = TaskState::Shutdown;
            }
            // Its successor comes once it has stopped.
            return false;
        }
        // start-first: the successor now, beside it.
        return true;
    }
    refill_empty(p, tasks, slot, idx)
}

/// start-first: the old task stops once its successor runs; more than
/// one current task in a slot: keep one.
fn settle_current(tasks: &mut [Task], current: &[usize], outdated: &[usize]) {
    let running = current
        .iter()
        .any(|&i| tasks[i].status.state == TaskState::Running);
    if running {
        for &i in outdated {
            tasks[i].desired_state = TaskState::Shutdown;
        }
    }
    for &i in current.iter().skip(1) {
        tasks[i].desired_state = TaskState::Shutdown;
    }
}

/// Pending tasks (no node fitted before): placed if one fits now.
fn place_pending(p: &Pass, tasks: &mut [Task], load: &mut Load) {
    for &i in &p.mine {
        let t = &mut tasks[i];
        if t.is_live() && t.node_id.is_empty() && t.slot > 0 {
            if let Ok(n) = sched::place(p.s.nodes, &t.spec, load) {
                load.add(&n.id, true, &t.spec);
                t.node_id = n.id.clone();
                t.status = status(TaskState::Assigned, p.s.now_ms, "scheduled");
            }
        }
    }
}
