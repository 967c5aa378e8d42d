//! The node side of tasks: each assigned task runs in a sandbox of its
//! own (husk-runtime), on a thread of its own (the runtime blocks), and
//! every change of its state is reported to the managers.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_runtime::container::record::LogWriter;
use husk_runtime::container::spec::ProcessOptions;
use husk_runtime::container::{
    copy_to_log, ContainerSpec, Control as ContainerControl, Mount, MountSource, Net, Resources,
};
use husk_runtime::guest::Io;
use husk_runtime::image::{ImageRecord, ImageStore};
use husk_runtime::net::ports::PortMapping;
use husk_runtime::storage::volume::VolumeStore;
use husk_runtime::util::chain;
use husk_runtime::Runtime;
use tokio::sync::mpsc::UnboundedSender;

use crate::types::{Health, MountType, Task, TaskState};
use crate::util::lock;

mod health;

/// How long a task has after SIGTERM before SIGKILL (Docker's default).
const STOP_GRACE: Duration = Duration::from_secs(10);

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
    images: PathBuf,
    volumes: PathBuf,
    logs: PathBuf,
    tasks: Mutex<HashMap<String, Arc<Mutex<Control>>>>,
    /// The last report of each task, sent again to a new manager session.
    last: Mutex<HashMap<String, Report>>,
    reports: UnboundedSender<Report>,
}

impl Executor {
    /// `rt` None: this node cannot run sandboxes (no husk-vmm or kernel
    /// found); its tasks are rejected with that reason.
    pub fn new(
        rt: Option<Runtime>,
        state_dir: &std::path::Path,
        reports: UnboundedSender<Report>,
    ) -> Executor {
        let data = husk_runtime::default_data_dir();
        Executor {
            rt,
            images: husk_runtime::image::default_store_dir(),
            volumes: data.join("volumes"),
            logs: state_dir.join("logs"),
            tasks: Mutex::new(HashMap::new()),
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
        let mut known = lock(&self.tasks);
        for t in assigned {
            if let Some(c) = known.get(&t.id) {
                if t.desired_state != TaskState::Running {
                    stop(c, &t.id);
                }
                continue;
            }
            let st = t.status.state;
            if t.desired_state == TaskState::Running && st <= TaskState::Assigned {
                let c = Arc::new(Mutex::new(Control::default()));
                known.insert(t.id.clone(), c.clone());
                let me = self.clone();
                let name = format!("task-{}", t.id.chars().take(8).collect::<String>());
                let spawned = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || me.run(t, c));
                if let Err(e) = spawned {
                    tracing::error!("starting a task thread: {e}");
                }
            } else if !st.is_terminal() && st >= TaskState::Preparing {
                // Started by an earlier huskd on this node: its sandbox
                // went with it.
                let why = if t.desired_state == TaskState::Running {
                    TaskState::Failed
                } else {
                    TaskState::Shutdown
                };
                self.report(
                    &t.id,
                    why,
                    "task lost: huskd restarted on this node",
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

    fn run(self: Arc<Self>, t: Task, ctl: Arc<Mutex<Control>>) {
        self.report(&t.id, TaskState::Preparing, "preparing", "", None);
        let (state, message, err, code) = match self.run_sandbox(&t, &ctl) {
            Ok(_) if lock(&ctl).unhealthy => (
                TaskState::Failed,
                "failed".into(),
                "task: unhealthy container".into(),
                None,
            ),
            Ok(code) => {
                let stopped = lock(&ctl).stop;
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
        lock(&ctl).finished = true;
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
        let plan = container_spec(t, image)
            .plan(Some(&store))
            .map_err(|e| reject(&e))?;
        let env = plan
            .oci
            .process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default();
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
        let log = LogWriter::create(&self.log_path(&t.id)).map_err(|e| fail(&e))?;
        let mut streams = c.take_streams();
        let out = copy_to_log(streams.stdout.take(), "stdout", log.clone(), None);
        let err = copy_to_log(streams.stderr.take(), "stderr", log, None);
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
        let _ = out.join();
        let _ = err.join();
        if let Err(e) = c.remove(Duration::from_secs(20)).shutdown {
            tracing::warn!("task {}: stopping its sandbox: {}", t.id, chain(&e));
        }
        Ok(Some(status?.status))
    }
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
