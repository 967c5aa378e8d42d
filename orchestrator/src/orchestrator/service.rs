//! One service's pass of the reconciler, in swarmkit's parts: the
//! constraint enforcer, the replicated and global orchestrators' slots,
//! the restart supervisor, and the updater (progress, failure action,
//! batches, completion). The steps run in the order `reconcile_service`
//! lists; each reads the pass's [`Pass`] and changes only what it names.

use std::collections::{BTreeMap, HashMap};

use crate::orchestrator::{
    dependencies_up, ended_by_itself, failed, new_task, restart_allowed, slot_of, status, Slot,
    Snapshot,
};
use crate::scheduler::{self as sched, Load};
use crate::types::*;

/// What one service's pass works from.
struct Pass<'a> {
    s: &'a Snapshot<'a>,
    nodes: &'a HashMap<&'a str, &'a Node>,
    /// The spec its tasks should have.
    spec: ServiceSpec,
    /// Indices of its tasks in the pass's task list.
    mine: Vec<usize>,
    updating: bool,
    rolling_back: bool,
    /// The update (or rollback) config in force.
    ucfg: UpdateConfig,
    /// When the update began (0: none).
    update_started: u64,
    version: u64,
}

impl Pass<'_> {
    fn constraints_ok(&self, n: &Node) -> bool {
        self.spec
            .placement
            .constraints
            .iter()
            .all(|c| sched::Constraint::parse(c).is_ok_and(|k| k.matches(n)))
    }

    /// A task of this version, made since the update began.
    fn is_new(&self, t: &Task) -> bool {
        t.version == self.version && t.created_ms >= self.update_started
    }

    /// Running past the update's monitor period.
    fn monitored(&self, t: &Task) -> bool {
        t.status.state == TaskState::Running
            && t.status.timestamp_ms + self.ucfg.monitor_ms <= self.s.now_ms
    }

    /// A task stopping because the spec changed (stop-first: its
    /// successor waits for it, they must not race for ports).
    fn stopping_outdated(&self, t: &Task) -> bool {
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
    fn at_rest(&self, t: &Task, idx: &[usize], tasks: &[Task]) -> bool {
        t.desired_state == TaskState::Running
            && ended_by_itself(t)
            && !restart_allowed(self.s, &self.spec, t, idx, tasks)
    }
}

fn latest_of(idx: &[usize], tasks: &[Task]) -> Option<usize> {
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

/// Live tasks on drained nodes, or nodes that no longer meet the
/// constraints, stop (the emptied slot is filled later in the pass).
fn enforce_constraints(p: &Pass, tasks: &mut [Task]) {
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
fn wanted_slots(p: &Pass) -> Vec<Slot> {
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
fn scale_down(p: &Pass, tasks: &mut [Task], wanted: &[Slot]) {
    for &i in &p.mine {
        let t = &mut tasks[i];
        if t.is_live() && !wanted.contains(&slot_of(t)) {
            t.desired_state = TaskState::Shutdown;
        }
    }
}

/// An update's new tasks so far.
struct Progress {
    updated: u64,
    failures: u64,
    /// When the last new task finished its monitor period.
    last_done: u64,
}

/// New tasks (this version, since the update began) that failed, or ran
/// past the monitor period.
fn update_progress(p: &Pass, tasks: &[Task]) -> Progress {
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
fn apply_failure_action(p: &Pass, svc: &mut Service, g: &Progress) -> bool {
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
struct Flight {
    in_flight: u64,
    outdated_left: u64,
}

/// A slot is in flight while an outdated task stops, while its successor
/// has not been monitored long enough, or while it is empty and its last
/// task not at rest.
fn in_flight(
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
fn update_budget(p: &Pass, in_flight: u64, last_done: u64) -> u64 {
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

/// The restart supervisor: an empty slot gets a task unless an outdated
/// one is still stopping there, its node is paused (global), or its last
/// task rests or waits out the restart delay. A finished last task is
/// retired (the slot's history keeps it).
fn refill_empty(p: &Pass, tasks: &mut [Task], slot: &Slot, idx: &[usize]) -> bool {
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

/// Done when nothing outdated is left and every new task has run past the
/// monitor period. True when the service changed.
fn complete_update(p: &Pass, svc: &mut Service, f: &Flight) -> bool {
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
