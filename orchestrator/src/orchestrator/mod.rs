//! The leader's reconciler: from one snapshot of the cluster (nodes,
//! services, tasks) to the writes that bring actual state towards the
//! desired one. Pure — the leader loop reads etcd, calls [`reconcile`]
//! and writes back — so every rule is unit-tested without a cluster.
//!
//! Rules (Swarm's): each slot of a replicated service (each eligible node
//! of a global one) has one live task; a task that ended by itself is
//! replaced as its restart policy says; a task whose node is down is
//! orphaned and replaced at once; tasks on drained nodes or nodes that no
//! longer meet the constraints are stopped and replaced elsewhere; an
//! update replaces outdated tasks in batches, watching for failures.

use std::collections::{BTreeMap, HashMap};

use crate::scheduler::{self as sched, Load};
use crate::types::*;
use crate::util::new_id;

mod dependencies;
mod restart;
mod service;
mod slots;
mod update;

use dependencies::*;
use restart::*;
use service::reconcile_service;

/// Terminal tasks kept per slot (Swarm's task history retention limit).
pub const HISTORY: usize = 5;

pub struct Snapshot<'a> {
    pub nodes: &'a [Node],
    pub services: &'a [Service],
    pub tasks: &'a [Task],
    pub now_ms: u64,
}

#[derive(Debug, PartialEq)]
pub enum Write {
    /// A new task or a changed one.
    Task(Box<Task>),
    DeleteTask(String),
    Service(Box<Service>),
}

/// Where a task counts: its slot, or its node for global services.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Slot {
    Index(u64),
    Node(String),
}

fn slot_of(t: &Task) -> Slot {
    if t.slot > 0 {
        Slot::Index(t.slot)
    } else {
        Slot::Node(t.node_id.clone())
    }
}

/// Ended by itself (not stopped by the orchestrator): what restart
/// policies and update failure ratios count.
fn ended_by_itself(t: &Task) -> bool {
    matches!(
        t.status.state,
        TaskState::Complete | TaskState::Failed | TaskState::Rejected
    )
}

fn failed(t: &Task) -> bool {
    matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
        || (t.status.state == TaskState::Complete && t.status.exit_code.is_some_and(|c| c != 0))
}

pub fn reconcile(s: &Snapshot) -> Vec<Write> {
    let mut out = Vec::new();
    let nodes: HashMap<&str, &Node> = s.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let services: HashMap<&str, &Service> = s.services.iter().map(|v| (v.id.as_str(), v)).collect();
    let original: HashMap<&str, &Task> = s.tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    // Tasks as they will be after this pass; written back where changed.
    let mut tasks: Vec<Task> = Vec::with_capacity(s.tasks.len());

    // 1. Tasks whose service is gone, or whose node is down or gone.
    for t in s.tasks {
        let mut t = t.clone();
        let node = nodes.get(t.node_id.as_str());
        if !services.contains_key(t.service_id.as_str()) {
            // Gone once stopped, or when no node will ever report it.
            let node_ok = node.is_some_and(|n| n.state != NodeState::Down);
            if t.status.state.is_terminal() || !node_ok {
                out.push(Write::DeleteTask(t.id.clone()));
            } else if t.desired_state == TaskState::Running {
                t.desired_state = TaskState::Shutdown;
                out.push(Write::Task(Box::new(t)));
            }
            continue;
        }
        let lost = match node {
            _ if t.node_id.is_empty() => false,
            None => true,
            Some(n) => n.state == NodeState::Down,
        };
        if lost && !t.status.state.is_terminal() {
            t.desired_state = TaskState::Shutdown;
            t.status = TaskStatus {
                state: TaskState::Orphaned,
                timestamp_ms: s.now_ms,
                message: "node down".into(),
                err: String::new(),
                exit_code: None,
                health: None,
            };
        }
        tasks.push(t);
    }

    // Load on each node: every task not yet finished holds its place.
    let mut load = Load::default();
    for t in &tasks {
        if !t.node_id.is_empty() && !t.status.state.is_terminal() {
            load.add(&t.node_id, false, &t.spec);
        }
    }

    let mut new_tasks: Vec<Task> = Vec::new();
    for svc in s.services {
        let mut svc_load = load.clone();
        for t in tasks.iter().filter(|t| t.service_id == svc.id) {
            if !t.node_id.is_empty() && !t.status.state.is_terminal() {
                *svc_load.service_tasks.entry(t.node_id.clone()).or_default() += 1;
            }
        }
        let mut svc = svc.clone();
        let before = new_tasks.len();
        let svc_changed = reconcile_service(
            s,
            &mut svc,
            &nodes,
            &mut tasks,
            &mut new_tasks,
            &mut svc_load,
        );
        // Placements of this service count for the next ones.
        for t in &new_tasks[before..] {
            if !t.node_id.is_empty() {
                load.add(&t.node_id, false, &t.spec);
            }
        }
        if svc_changed {
            out.push(Write::Service(Box::new(svc)));
        }
    }

    // History: drop the oldest finished tasks past the limit, per slot.
    let mut by_slot: BTreeMap<(String, Slot), Vec<&Task>> = BTreeMap::new();
    for t in &tasks {
        if t.desired_state != TaskState::Running && t.status.state.is_terminal() {
            by_slot
                .entry((t.service_id.clone(), slot_of(t)))
                .or_default()
                .push(t);
        }
    }
    let mut deleted = std::collections::HashSet::new();
    for (_, mut v) in by_slot {
        if v.len() > HISTORY {
            v.sort_by_key(|t| (t.created_ms, t.id.clone()));
            for t in &v[..v.len() - HISTORY] {
                deleted.insert(t.id.clone());
            }
        }
    }
    for t in tasks {
        if deleted.contains(&t.id) {
            out.push(Write::DeleteTask(t.id));
        } else if original.get(t.id.as_str()) != Some(&&t) {
            out.push(Write::Task(Box::new(t)));
        }
    }
    out.extend(new_tasks.into_iter().map(|t| Write::Task(Box::new(t))));
    out
}

fn status(state: TaskState, now: u64, message: &str) -> TaskStatus {
    TaskStatus {
        state,
        timestamp_ms: now,
        message: message.into(),
        err: String::new(),
        exit_code: None,
        health: None,
    }
}

fn new_task(s: &Snapshot, svc: &Service, slot: &Slot, load: &mut Load) -> Task {
    let mut t = Task {
        id: new_id(),
        service_id: svc.id.clone(),
        service_name: svc.spec.name.clone(),
        slot: 0,
        node_id: String::new(),
        version: svc.version,
        spec: svc.spec.clone(),
        desired_state: TaskState::Running,
        status: status(TaskState::Pending, s.now_ms, "pending"),
        created_ms: s.now_ms,
    };
    match slot {
        Slot::Index(i) => {
            t.slot = *i;
            match sched::place(s.nodes, &svc.spec, load) {
                Ok(n) => {
                    t.node_id = n.id.clone();
                    t.status = status(TaskState::Assigned, s.now_ms, "scheduled");
                }
                Err(why) => t.status.err = why,
            }
        }
        Slot::Node(id) => {
            t.node_id = id.clone();
            t.status = status(TaskState::Assigned, s.now_ms, "scheduled");
        }
    }
    if !t.node_id.is_empty() {
        load.add(&t.node_id, true, &t.spec);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, role: Role) -> Node {
        Node {
            id: id.into(),
            hostname: id.into(),
            addr: String::new(),
            role,
            availability: Availability::Active,
            labels: Default::default(),
            state: NodeState::Ready,
            resources: Resources {
                nano_cpus: 2_000_000_000,
                memory_bytes: 4 << 30,
            },
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn service(replicas: u64) -> Service {
        Service {
            id: "s1".into(),
            spec: ServiceSpec {
                name: "web".into(),
                image: "busybox".into(),
                mode: Mode::Replicated { replicas },
                ..Default::default()
            },
            version: 1,
            previous_spec: None,
            created_ms: 0,
            updated_ms: 0,
            update_status: None,
        }
    }

    /// Applies writes the way the leader does, and marks what nodes would
    /// report: assigned tasks run, shut-down ones stop.
    fn apply(tasks: &mut Vec<Task>, services: &mut [Service], w: Vec<Write>, now: u64) {
        for w in w {
            match w {
                Write::Task(t) => {
                    if let Some(x) = tasks.iter_mut().find(|x| x.id == t.id) {
                        *x = *t;
                    } else {
                        tasks.push(*t);
                    }
                }
                Write::DeleteTask(id) => tasks.retain(|t| t.id != id),
                Write::Service(s) => {
                    for x in services.iter_mut() {
                        if x.id == s.id {
                            *x = (*s).clone();
                        }
                    }
                }
            }
        }
        for t in tasks.iter_mut() {
            if t.desired_state == TaskState::Running && t.status.state == TaskState::Assigned {
                t.status = status(TaskState::Running, now, "started");
            }
            if t.desired_state == TaskState::Shutdown && !t.status.state.is_terminal() {
                t.status = status(TaskState::Shutdown, now, "stopped");
            }
        }
    }

    fn step(nodes: &[Node], services: &mut [Service], tasks: &mut Vec<Task>, now: u64) {
        let w = reconcile(&Snapshot {
            nodes,
            services,
            tasks,
            now_ms: now,
        });
        apply(tasks, services, w, now);
    }

    fn running_on(tasks: &[Task]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in tasks.iter().filter(|t| t.is_live()) {
            *m.entry(t.node_id.clone()).or_default() += 1;
        }
        m
    }

    #[test]
    fn replicas_spread_scale_and_node_loss() {
        let mut nodes = vec![
            node("a", Role::Manager),
            node("b", Role::Worker),
            node("c", Role::Worker),
        ];
        let mut svcs = vec![service(3)];
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 1000);
        assert_eq!(
            running_on(&tasks).values().copied().collect::<Vec<_>>(),
            [1, 1, 1]
        );
        svcs[0].spec.mode = Mode::Replicated { replicas: 5 };
        step(&nodes, &mut svcs, &mut tasks, 2000);
        assert_eq!(running_on(&tasks).values().sum::<usize>(), 5);
        svcs[0].spec.mode = Mode::Replicated { replicas: 2 };
        step(&nodes, &mut svcs, &mut tasks, 3000);
        assert_eq!(running_on(&tasks).values().sum::<usize>(), 2);
        // Node loss: its task is orphaned and replaced elsewhere at once.
        let victim = tasks.iter().find(|t| t.is_live()).unwrap().node_id.clone();
        nodes.iter_mut().find(|n| n.id == victim).unwrap().state = NodeState::Down;
        step(&nodes, &mut svcs, &mut tasks, 4000);
        step(&nodes, &mut svcs, &mut tasks, 4001);
        let on = running_on(&tasks);
        assert_eq!(on.values().sum::<usize>(), 2);
        assert!(!on.contains_key(&victim));
        assert!(tasks.iter().any(|t| t.status.state == TaskState::Orphaned));
    }

    #[test]
    fn global_drain_and_constraints() {
        let mut nodes = vec![
            node("a", Role::Manager),
            node("b", Role::Worker),
            node("c", Role::Worker),
        ];
        let mut svcs = vec![service(1)];
        svcs[0].spec.mode = Mode::Global;
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 1000);
        assert_eq!(running_on(&tasks).len(), 3);
        nodes[1].availability = Availability::Drain;
        step(&nodes, &mut svcs, &mut tasks, 2000);
        assert_eq!(
            running_on(&tasks).keys().cloned().collect::<Vec<_>>(),
            ["a", "c"]
        );
        // Manager-only replicated service.
        let mut svcs = vec![service(2)];
        svcs[0].spec.placement.constraints = vec!["node.role==manager".into()];
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 1000);
        assert_eq!(running_on(&tasks).get("a"), Some(&2));
    }

    #[test]
    fn restart_policy_delay_and_attempts() {
        let nodes = vec![node("a", Role::Worker)];
        let mut svcs = vec![service(1)];
        svcs[0].spec.restart_policy = RestartPolicy {
            condition: RestartCondition::OnFailure,
            delay_ms: 1000,
            max_attempts: 2,
            window_ms: 0,
        };
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 0);
        let fail = |tasks: &mut Vec<Task>, now| {
            for t in tasks.iter_mut().filter(|t| t.is_live()) {
                t.status = status(TaskState::Failed, now, "exit 1");
            }
        };
        fail(&mut tasks, 100);
        step(&nodes, &mut svcs, &mut tasks, 500);
        assert!(
            tasks.iter().all(|t| !t.is_live()),
            "restart waits for the delay"
        );
        step(&nodes, &mut svcs, &mut tasks, 1200);
        assert_eq!(tasks.iter().filter(|t| t.is_live()).count(), 1);
        fail(&mut tasks, 1300);
        step(&nodes, &mut svcs, &mut tasks, 2400);
        assert_eq!(tasks.iter().filter(|t| t.is_live()).count(), 1);
        fail(&mut tasks, 2500);
        step(&nodes, &mut svcs, &mut tasks, 9000);
        assert_eq!(tasks.len(), 3, "two restarts, then no more");
        // A clean exit is not restarted on-failure.
        let mut svcs = vec![service(1)];
        svcs[0].spec.restart_policy.condition = RestartCondition::OnFailure;
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 0);
        for t in tasks.iter_mut() {
            t.status = status(TaskState::Complete, 10, "exit 0");
            t.status.exit_code = Some(0);
        }
        step(&nodes, &mut svcs, &mut tasks, 99_999);
        assert_eq!(tasks.len(), 1);
    }

    #[test]
    fn rolling_update_one_at_a_time_then_rollback_on_failure() {
        let nodes = vec![node("a", Role::Worker), node("b", Role::Worker)];
        let mut svcs = vec![service(3)];
        svcs[0].spec.update_config = UpdateConfig {
            parallelism: 1,
            delay_ms: 100,
            failure_action: FailureAction::Rollback,
            monitor_ms: 500,
            max_failure_ratio: 0.0,
            order: UpdateOrder::StopFirst,
        };
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 0);
        // Update to v2.
        let old = svcs[0].spec.clone();
        svcs[0].previous_spec = Some(old.clone());
        svcs[0].spec.image = "busybox:2".into();
        svcs[0].version = 2;
        svcs[0].update_status = Some(UpdateStatus {
            state: UpdateState::Updating,
            started_ms: 1000,
            completed_ms: 0,
            message: String::new(),
        });
        let mut now = 1000;
        let mut min_live = usize::MAX;
        for _ in 0..200 {
            step(&nodes, &mut svcs, &mut tasks, now);
            let live = tasks
                .iter()
                .filter(|t| t.is_live() && t.status.state == TaskState::Running)
                .count();
            min_live = min_live.min(live);
            now += 50;
            if svcs[0].update_status.as_ref().unwrap().state == UpdateState::Completed {
                break;
            }
        }
        assert_eq!(
            svcs[0].update_status.as_ref().unwrap().state,
            UpdateState::Completed
        );
        assert!(min_live >= 2, "never fewer than N-1 running: {min_live}");
        assert!(tasks.iter().filter(|t| t.is_live()).all(|t| t.version == 2));

        // v3 fails on start: rolled back to v2's spec.
        svcs[0].previous_spec = Some(svcs[0].spec.clone());
        svcs[0].spec.image = "broken".into();
        svcs[0].version = 3;
        svcs[0].update_status = Some(UpdateStatus {
            state: UpdateState::Updating,
            started_ms: now,
            completed_ms: 0,
            message: String::new(),
        });
        for _ in 0..400 {
            let w = reconcile(&Snapshot {
                nodes: &nodes,
                services: &svcs,
                tasks: &tasks,
                now_ms: now,
            });
            apply(&mut tasks, &mut svcs, w, now);
            // "broken" never starts: its node rejects it.
            for t in tasks.iter_mut() {
                if t.spec.image == "broken" && t.status.state == TaskState::Running {
                    t.status = status(TaskState::Rejected, now, "no such image");
                }
            }
            now += 50;
            if svcs[0].update_status.as_ref().unwrap().state == UpdateState::RollbackCompleted {
                break;
            }
        }
        let svc = &svcs[0];
        assert_eq!(
            svc.update_status.as_ref().unwrap().state,
            UpdateState::RollbackCompleted
        );
        assert_eq!(svc.spec.image, "busybox:2");
        let live: Vec<&Task> = tasks.iter().filter(|t| t.is_live()).collect();
        assert_eq!(live.len(), 3);
        assert!(live.iter().all(|t| t.spec.image == "busybox:2"));
    }

    #[test]
    fn dependencies_start_first_and_healthy_waits_for_health() {
        let nodes = vec![node("a", Role::Worker)];
        let mut db = service(1);
        db.spec.name = "db".into();
        let mut web = service(1);
        web.id = "s2".into();
        web.spec.depends_on = vec![Dependency {
            service: "db".into(),
            condition: DependCondition::Healthy,
        }];
        let mut svcs = vec![db, web];
        let mut tasks = Vec::new();
        // Only db's task is created; it runs but is not yet healthy.
        step(&nodes, &mut svcs, &mut tasks, 0);
        step(&nodes, &mut svcs, &mut tasks, 10);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].service_id, "s1");
        tasks[0].status.health = Some(Health::Starting);
        step(&nodes, &mut svcs, &mut tasks, 20);
        assert_eq!(tasks.len(), 1);
        tasks[0].status.health = Some(Health::Healthy);
        step(&nodes, &mut svcs, &mut tasks, 30);
        assert_eq!(tasks.len(), 2);
        // A dependency that does not exist holds the service back.
        svcs[1].spec.depends_on[0].service = "nope".into();
        let mut tasks2 = Vec::new();
        step(&nodes, &mut svcs[1..], &mut tasks2, 0);
        assert!(tasks2.is_empty());
    }

    #[test]
    fn removed_service_tasks_stop_then_go() {
        let nodes = vec![node("a", Role::Worker)];
        let mut svcs = vec![service(2)];
        let mut tasks = Vec::new();
        step(&nodes, &mut svcs, &mut tasks, 0);
        let mut none: Vec<Service> = Vec::new();
        step(&nodes, &mut none, &mut tasks, 10);
        assert!(tasks.iter().all(|t| t.desired_state == TaskState::Shutdown));
        step(&nodes, &mut none, &mut tasks, 20);
        assert!(tasks.is_empty());
    }
}
