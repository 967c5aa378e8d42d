//! The node side of tasks: each assigned task runs in a sandbox of its
//! own (husk-runtime), on a thread of its own (the runtime blocks), and
//! every change of its state is reported to the managers.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_runtime::container::spec::ProcessOptions;
use husk_runtime::container::{
    logcopy, Container, ContainerSpec, Control as ContainerControl, Mount, MountSource, Net,
    Resources,
};
use husk_runtime::guest::Io;
use husk_runtime::image::{ImageRecord, ImageStore};
use husk_runtime::net::ports::PortMapping;
use husk_runtime::storage::volume::VolumeStore;
use husk_runtime::util::chain;
use husk_runtime::util::child::Watched;
use husk_runtime::{Boot, Runtime};
use tokio::sync::mpsc::UnboundedSender;

use crate::types::{Health, MountType, Task, TaskState};
use crate::util::lock;

mod health;

/// How long a task has after SIGTERM before SIGKILL (Docker's default).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a log copier has to write what a task printed once its
/// streams end.
const COPIER_GRACE: Duration = Duration::from_secs(5);

/// A task's state as this node saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub task_id: String,
    pub state: TaskState,
    pub message: String,
    pub err: String,
    pub exit_code: Option<i32>,
    pub health: Option<Health>,
}

#[derive(Default)]
struct Control {
    stop: bool,
    /// The container's control handle (its own agent connection), to
    /// signal while the task thread waits; a clone is taken so that a
    /// signal is sent without holding this lock.
    container: Option<ContainerControl>,
    finished: bool,
    /// Stopped by its own healthcheck: a failure, not a shutdown.
    unhealthy: bool,
}

pub struct Executor {
    rt: Option<Runtime>,
    /// How the tasks' sandboxes start.
    boot: Boot,
    images: PathBuf,
    volumes: PathBuf,
    logs: PathBuf,
    tasks: Mutex<HashMap<String, Arc<Mutex<Control>>>>,
    /// Sandboxes an earlier huskd on this node left running, until the
    /// first assignment set says which tasks they still serve; the rest
    /// are removed then.
    left: Mutex<Option<HashSet<String>>>,
    /// The last report of each task, sent again to a new manager session.
    last: Mutex<HashMap<String, Report>>,
    reports: UnboundedSender<Report>,
}

impl Executor {
    /// `rt` None: this node cannot run sandboxes (no husk-vmm or kernel
    /// found); its tasks are rejected with that reason.
    pub fn new(
        rt: Option<Runtime>,
        boot: Boot,
        state_dir: &std::path::Path,
        reports: UnboundedSender<Report>,
    ) -> Executor {
        let data = husk_runtime::default_data_dir();
        let left: HashSet<String> = rt
            .as_ref()
            .map(|rt| rt.sandbox_ids().into_iter().collect())
            .unwrap_or_default();
        if !left.is_empty() {
            tracing::info!(
                "{} sandboxes left by an earlier huskd: kept for the tasks they serve",
                left.len()
            );
        }
        Executor {
            rt,
            boot,
            images: husk_runtime::image::default_store_dir(),
            volumes: data.join("volumes"),
            logs: state_dir.join("logs"),
            tasks: Mutex::new(HashMap::new()),
            left: Mutex::new(Some(left)),
            last: Mutex::new(HashMap::new()),
            reports,
        }
    }

    /// Every report held, for a new session.
    pub fn all_reports(&self) -> Vec<Report> {
        lock(&self.last).values().cloned().collect()
    }

    pub fn log_path(&self, task_id: &str) -> PathBuf {
        self.logs.join(format!("{task_id}.log"))
    }

    fn report(&self, task: &str, state: TaskState, message: &str, err: &str, code: Option<i32>) {
        let mut last = lock(&self.last);
        // A running task keeps its health verdict across reports.
        let health = last
            .get(task)
            .filter(|r| r.state == state)
            .and_then(|r| r.health);
        let r = Report {
            task_id: task.to_string(),
            state,
            message: message.to_string(),
            err: err.to_string(),
            exit_code: code,
            health,
        };
        last.insert(task.to_string(), r.clone());
        let _ = self.reports.send(r);
    }

    /// Brings what runs here in line with the assignment set.
    pub fn apply(self: &Arc<Self>, assigned: Vec<Task>) {
        let ids: HashSet<String> = assigned.iter().map(|t| t.id.clone()).collect();
        // Only the first set decides what an earlier huskd left.
        let mut left = lock(&self.left).take();
        let mut known = lock(&self.tasks);
        for t in assigned {
            if let Some(c) = known.get(&t.id) {
                if t.desired_state != TaskState::Running {
                    stop(c, &t.id);
                }
                continue;
            }
            let st = t.status.state;
            // A sandbox an earlier huskd left for this task is taken out of
            // `left` only by the branch that deals with it; one of an ended
            // task stays there and is removed below.
            let found = left.as_ref().is_some_and(|l| l.contains(&t.id));
            let mut take = || {
                if let Some(l) = left.as_mut() {
                    l.remove(&t.id);
                }
            };
            if t.desired_state == TaskState::Running && st <= TaskState::Assigned {
                // A sandbox of it while the manager still has it assigned:
                // the earlier huskd died before its report arrived.
                take();
                self.spawn_task(&mut known, t, false, found, Executor::run);
            } else if found && st == TaskState::Running {
                // Started by an earlier huskd on this node: held again, and
                // stopped if that is what is asked now. (One that was still
                // preparing or starting has no container to follow: it is
                // lost, below, and its sandbox removed.)
                take();
                let stop = t.desired_state != TaskState::Running;
                self.spawn_task(&mut known, t, stop, false, Executor::resume);
            } else if !st.is_terminal() && st >= TaskState::Preparing {
                let why = if t.desired_state == TaskState::Running {
                    TaskState::Failed
                } else {
                    TaskState::Shutdown
                };
                self.report(
                    &t.id,
                    why,
                    "task lost: huskd restarted on this node and its sandbox was not there",
                    "",
                    None,
                );
            } else if !st.is_terminal() && t.desired_state != TaskState::Running {
                self.report(
                    &t.id,
                    TaskState::Shutdown,
                    "shut down before it started",
                    "",
                    None,
                );
            }
        }
        // What an earlier huskd left that serves no task assigned here.
        for id in left.into_iter().flatten() {
            self.remove_left(id, "no task assigned to this node owns it");
        }
        // Tasks no longer assigned here: stop; forget finished ones.
        known.retain(|id, c| {
            if ids.contains(id) {
                return true;
            }
            stop(c, id);
            !lock(c).finished
        });
        lock(&self.last).retain(|id, _| ids.contains(id));
    }

    /// Runs `body` for task `t` on a thread of its own, known from now
    /// on; `stop` already asked for; `clear` first removes a sandbox of
    /// the same id an earlier huskd left.
    fn spawn_task(
        self: &Arc<Self>,
        known: &mut HashMap<String, Arc<Mutex<Control>>>,
        t: Task,
        stop: bool,
        clear: bool,
        body: fn(Arc<Executor>, Task, Arc<Mutex<Control>>),
    ) {
        let c = Arc::new(Mutex::new(Control {
            stop,
            ..Control::default()
        }));
        known.insert(t.id.clone(), c.clone());
        let me = self.clone();
        let name = format!("task-{}", t.id.chars().take(8).collect::<String>());
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            if clear {
                if let Some(rt) = &me.rt {
                    if let Err(e) = rt.remove_left(&t.id) {
                        tracing::warn!(
                            "task {}: removing its earlier sandbox: {}",
                            t.id,
                            chain(&e)
                        );
                    }
                }
            }
            body(me, t, c)
        });
        if let Err(e) = spawned {
            tracing::error!("starting a task thread: {e}");
        }
    }

    /// Removes a sandbox an earlier huskd left, on a thread of its own (a
    /// VM's end takes a moment).
    fn remove_left(self: &Arc<Self>, id: String, why: &'static str) {
        let me = self.clone();
        std::thread::spawn(move || {
            let Some(rt) = &me.rt else { return };
            tracing::info!("removing sandbox {id} left by an earlier huskd: {why}");
            if let Err(e) = rt.remove_left(&id) {
                tracing::warn!("sandbox {id}: {}", chain(&e));
            }
        });
    }

    fn run(self: Arc<Self>, t: Task, ctl: Arc<Mutex<Control>>) {
        self.report(&t.id, TaskState::Preparing, "preparing", "", None);
        let r = self.run_sandbox(&t, &ctl);
        self.finish(&t, &ctl, r);
    }

    /// A task an earlier huskd on this node started: its sandbox found
    /// again and followed to its end as if this huskd had started it.
    fn resume(self: Arc<Self>, t: Task, ctl: Arc<Mutex<Control>>) {
        let r = self.found_sandbox(&t, &ctl);
        self.finish(&t, &ctl, r);
    }

    /// Reports how the task ended.
    fn finish(&self, t: &Task, ctl: &Arc<Mutex<Control>>, r: Result<Option<i32>, TaskError>) {
        let (state, message, err, code) = match r {
            Ok(_) if lock(ctl).unhealthy => (
                TaskState::Failed,
                "failed".into(),
                "task: unhealthy container".into(),
                None,
            ),
            Ok(code) => {
                let stopped = lock(ctl).stop;
                match (stopped, code) {
                    (true, _) => (
                        TaskState::Shutdown,
                        "shutdown".to_string(),
                        String::new(),
                        code,
                    ),
                    (false, Some(0)) => {
                        (TaskState::Complete, "finished".into(), String::new(), code)
                    }
                    (false, Some(c)) => (
                        TaskState::Failed,
                        "failed".into(),
                        format!("task: non-zero exit ({c})"),
                        code,
                    ),
                    (false, None) => (TaskState::Shutdown, "shutdown".into(), String::new(), None),
                }
            }
            Err(TaskError::Rejected(e)) => (TaskState::Rejected, "rejected".into(), e, None),
            Err(TaskError::Failed(e)) => (TaskState::Failed, "failed".into(), e, None),
        };
        lock(ctl).finished = true;
        self.report(&t.id, state, &message, &err, code);
    }

    /// Runs the task's container to its end: its exit code, or None when
    /// it was stopped before it started.
    fn run_sandbox(
        self: &Arc<Self>,
        t: &Task,
        ctl: &Arc<Mutex<Control>>,
    ) -> Result<Option<i32>, TaskError> {
        let reject = |e: &dyn std::error::Error| TaskError::Rejected(chain(e));
        let fail = |e: &dyn std::error::Error| TaskError::Failed(chain(e));
        let rt = self.rt.as_ref().ok_or_else(|| {
            TaskError::Rejected(
                "this node cannot run sandboxes: husk-vmm, the guest kernel or image not found"
                    .into(),
            )
        })?;
        let store = ImageStore::open(&self.images).map_err(|e| reject(&e))?;
        let image = store.get(&t.spec.image).map_err(|e| {
            TaskError::Rejected(format!("No such image: {} ({})", t.spec.image, chain(&e)))
        })?;
        let mut spec = container_spec(t, image);
        spec.boot = self.boot;
        let plan = spec.plan(Some(&store)).map_err(|e| reject(&e))?;
        let env = process_env(&plan);
        let volumes = VolumeStore::open(&self.volumes).map_err(|e| fail(&e))?;
        let prepared = plan
            .acquire(Some(&store), Some(&volumes))
            .map_err(|e| fail(&e))?;
        if lock(ctl).stop {
            return Ok(None);
        }
        self.report(&t.id, TaskState::Starting, "starting", "", None);
        let starting = prepared.start(rt).map_err(|e| fail(&e))?;
        let control = starting.control().map_err(|e| fail(&e))?;
        if lock(ctl).stop {
            let _ = starting.abandon(Duration::from_secs(10));
            return Ok(None);
        }
        let mut c = starting.create(Io::OUT_ERR).map_err(|e| fail(&e))?;
        self.report(&t.id, TaskState::Running, "started", "", None);
        std::fs::create_dir_all(&self.logs).map_err(|e| fail(&e))?;
        // Its output is copied by a process of its own, which outlives
        // this huskd as the container does.
        let copier = logcopy::spawn(
            Path::new("/proc/self/exe"),
            &mut c.take_streams(),
            &self.log_path(&t.id),
        )
        .map_err(|e| TaskError::Failed(format!("starting its log copier: {e}")))?;
        self.follow(t, ctl, c, control, env, Some(copier))
    }

    /// The container of a task an earlier huskd started, found again (its
    /// log copier still runs).
    fn found_sandbox(
        self: &Arc<Self>,
        t: &Task,
        ctl: &Arc<Mutex<Control>>,
    ) -> Result<Option<i32>, TaskError> {
        let lost = |e: &dyn std::error::Error| {
            TaskError::Failed(format!(
                "task lost: huskd restarted on this node and its sandbox could not be held \
                 again: {}",
                chain(e)
            ))
        };
        let Some(rt) = self.rt.as_ref() else {
            return Err(TaskError::Failed("this node cannot run sandboxes".into()));
        };
        let found = (|| {
            let store = ImageStore::open(&self.images)?;
            let image = store.get(&t.spec.image)?;
            let plan = container_spec(t, image).plan(Some(&store))?;
            let env = process_env(&plan);
            let volumes = VolumeStore::open(&self.volumes)?;
            let c = plan.find(rt, Some(&volumes))?;
            let control = c.control()?;
            Ok::<_, husk_runtime::container::ContainerError>((c, control, env))
        })();
        let (c, control, env) = match found {
            Ok(x) => x,
            Err(e) => {
                if let Err(r) = rt.remove_left(&t.id) {
                    tracing::warn!("task {}: removing its sandbox: {}", t.id, chain(&r));
                }
                return Err(lost(&e));
            }
        };
        tracing::info!(
            "task {}: its sandbox held again after huskd restarted",
            t.id
        );
        self.report(
            &t.id,
            TaskState::Running,
            "running (held again after huskd restarted)",
            "",
            None,
        );
        self.follow(t, ctl, c, control, env, None)
    }

    /// A running container followed to its end: a stop that came while it
    /// started carried out, its healthcheck run, its exit waited for, its
    /// sandbox removed. Its exit code.
    fn follow(
        self: &Arc<Self>,
        t: &Task,
        ctl: &Arc<Mutex<Control>>,
        c: Container,
        control: ContainerControl,
        env: Vec<String>,
        copier: Option<Watched>,
    ) -> Result<Option<i32>, TaskError> {
        let fail = |e: &dyn std::error::Error| TaskError::Failed(chain(e));
        // A stop asked for while it started is carried out now.
        let stop_now = {
            let mut ctl = lock(ctl);
            ctl.container = Some(control.clone());
            ctl.stop
        };
        if stop_now {
            signal_stop(ctl, &t.id);
        } else if let Some(hc) = t.spec.healthcheck.clone() {
            let (me, id, ctl) = (self.clone(), t.id.clone(), ctl.clone());
            std::thread::spawn(move || me.watch_health(id, hc, env, control, ctl));
        }
        let status = c.wait().map_err(|e| fail(&e));
        lock(ctl).container = None;
        // Its output up to the exit logged first (its streams end with its
        // processes; one a left-behind child holds ends with the VM).
        let mut copier = copier;
        if let Some(cp) = copier.as_mut() {
            let _ = cp.wait_timeout(COPIER_GRACE);
        }
        if let Err(e) = c.remove(Duration::from_secs(20)) {
            tracing::warn!("task {}: stopping its sandbox: {}", t.id, chain(&e));
        }
        if let Some(mut cp) = copier {
            if !matches!(cp.wait_timeout(COPIER_GRACE), Ok(Some(_))) {
                tracing::warn!("task {}: its log copier did not end with its VM", t.id);
                cp.kill_and_wait();
            }
        }
        Ok(Some(status?.status))
    }
}

/// The environment of the container's process (its healthcheck runs
/// with it).
fn process_env(plan: &husk_runtime::container::Plan) -> Vec<String> {
    plan.oci
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default()
}

/// A task's container as the runtime's lifecycle takes it: the service's
/// args, env, mounts, published ports and limits; hostname the task id's
/// first 12 characters.
fn container_spec(t: &Task, image: ImageRecord) -> ContainerSpec {
    let limits = t.spec.resources.limits;
    let mut c = ContainerSpec::new(&t.id, image);
    c.process = ProcessOptions {
        cmd: t.spec.args.clone(),
        env: t.spec.env.clone(),
        ..Default::default()
    };
    c.mounts = t
        .spec
        .mounts
        .iter()
        .map(|m| Mount {
            source: match m.typ {
                MountType::Tmpfs => MountSource::Tmpfs,
                MountType::Volume => MountSource::Volume(m.source.clone()),
            },
            target: m.target.clone(),
            read_only: m.read_only,
        })
        .collect();
    c.net = Net::Bridge(
        t.spec
            .ports
            .iter()
            .map(|p| PortMapping {
                host_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                host_port: p.published,
                container_port: p.target,
                protocol: p.protocol,
            })
            .collect(),
    );
    c.resources = Resources {
        memory: (limits.memory_bytes > 0).then_some(limits.memory_bytes),
        nano_cpus: (limits.nano_cpus > 0).then_some(limits.nano_cpus),
    };
    c
}

enum TaskError {
    /// It cannot run here (no such image, bad spec).
    Rejected(String),
    /// It could have, and did not.
    Failed(String),
}

fn stop(c: &Arc<Mutex<Control>>, id: &str) {
    let first = {
        let mut g = lock(c);
        let first = !g.stop && !g.finished;
        g.stop = true;
        first
    };
    if first {
        signal_stop(c, id);
    }
}

/// The runtime's stop (SIGTERM, SIGKILL after the grace period if it
/// still runs), from a thread of its own: a signal is an RPC to a guest
/// that may take seconds, and the caller (the assignment set being applied)
/// must not wait for it, or the node's heartbeats stop meanwhile.
fn signal_stop(c: &Arc<Mutex<Control>>, id: &str) {
    let c = c.clone();
    let id = id.to_string();
    let Some(container) = ({
        let g = lock(&c);
        (!g.finished).then(|| g.container.clone()).flatten()
    }) else {
        return;
    };
    std::thread::spawn(move || {
        // Running while the task thread still holds the handle: it lets go
        // as soon as the container's wait returns.
        let running = || {
            let g = lock(&c);
            !g.finished && g.container.is_some()
        };
        for e in container.stop(STOP_GRACE, running) {
            tracing::debug!("task {id}: {}", chain(&e));
        }
    });
}
