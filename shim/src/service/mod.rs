//! The task service: containerd's Create/Start/Wait/Kill/Delete/Exec/...
//! mapped onto a husk sandbox and its agent.
//!
//! The sandbox (a microVM) starts with the group's first container; its
//! rootfs (containerd's snapshot, mounted in the bundle as runc's shim
//! does) and bind mounts are shared over virtio-fs. Each process has a
//! waiter thread blocked in the agent's WaitProcess; its exit is recorded,
//! its output drained, then TaskExit published.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{Code, Error as TtrpcError, Status as RpcStatus};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcResult};
use husk_runtime::guest::{ctx as actx, AgentConn};
use husk_runtime::util::chain;
use husk_runtime::{Runtime, Sandbox};
use log::warn;

use crate::io::{Copies, Stdio};

mod create;
mod task;

/// CRI's annotation naming the pod a container belongs to.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's annotation: "sandbox" (the pod's pause container, which starts
/// the VM) or "container" (joins it).
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

fn err(code: Code, msg: impl Into<String>) -> TtrpcError {
    TtrpcError::RpcStatus(RpcStatus {
        code: code.into(),
        message: msg.into(),
        ..Default::default()
    })
}

/// A failure as containerd sees it: an agent's refusal keeps the agent's
/// code (NOT_FOUND, FAILED_PRECONDITION, ... which containerd maps to its
/// errdefs); anything else is the shim's own, INTERNAL.
fn internal(e: impl std::error::Error + 'static) -> TtrpcError {
    let code = husk_runtime::guest::find_rpc(&e)
        .and_then(|r| r.code)
        .unwrap_or(Code::INTERNAL);
    err(code, husk_runtime::util::chain(&e))
}

/// Takes a container's entries out of the sandbox's share (best effort:
/// the sandbox may be going).
fn unshare(sb: &mut Sandbox, entries: &[usize]) {
    for e in sb.remove_shares(entries) {
        warn!("{}", chain(&e));
    }
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

struct Process {
    pid: u32,
    state: State,
    stdio: Stdio,
    exit: Option<(u32, Timestamp)>,
    /// Exec processes: their OCI process, until started.
    exec_spec: Option<serde_json::Value>,
}

impl Process {
    /// A process created, not started.
    fn created(pid: u32, stdio: Stdio, exec_spec: Option<serde_json::Value>) -> Process {
        Process {
            pid,
            state: State::Created,
            stdio,
            exit: None,
            exec_spec,
        }
    }
}

struct Container {
    /// A CRI pod's sandbox container that runs no process (`crate::pod`):
    /// its task lives in the shim.
    pause: bool,
    bundle: PathBuf,
    rootfs: Option<PathBuf>,
    /// Its entries in the sandbox's virtio-fs share.
    shares: Vec<usize>,
    init: Process,
    execs: HashMap<String, Process>,
}

#[derive(Default)]
struct Inner {
    sandbox: Option<Sandbox>,
    /// The layer cache a pod's joining containers take their erofs roots
    /// from (`rootfs = "drive"`, the default), set with the sandbox.
    layers: Option<PathBuf>,
    /// A CRI pod whose sandbox container runs no process: its VM starts
    /// with its first container.
    pod: Option<crate::pod::PodPlan>,
    containers: HashMap<String, Container>,
    /// The sandbox being stopped after its last container's delete: the
    /// shim exits (Shutdown) only once it is gone.
    stopping: Option<std::thread::JoinHandle<()>>,
    /// The VM's place through the host's start gate, from its start to its
    /// first container's task start (or `START_SLOT_HOLD` after).
    start_slot: Option<husk_runtime::sandbox::StartSlot>,
}

#[derive(Clone)]
pub struct Service {
    namespace: String,
    /// The task (and, outside pods, sandbox) id containerd started us for.
    id: String,
    exit: Arc<ExitSignal>,
    inner: Arc<(Mutex<Inner>, Condvar)>,
    /// Held by a pod container's create while the pod's VM may be started
    /// by it: a second create then joins the VM the first started.
    starting: Arc<Mutex<()>>,
    publisher: Option<Arc<RemotePublisher>>,
}

impl Service {
    /// Whose output a `binary://` logger gets.
    fn owner<'a>(&'a self, id: &'a str) -> crate::io::Owner<'a> {
        crate::io::Owner {
            id,
            namespace: &self.namespace,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, event: impl Event + 'static) {
        let Some(p) = &self.publisher else { return };
        let topic = event.topic();
        if let Err(e) = p.publish(Context::default(), &topic, &self.namespace, Box::new(event)) {
            warn!("publishing {topic}: {e}");
        }
    }

    /// Runs the agent call `f` on a connection to the agent; the agent's
    /// refusal reaches containerd with its code, a failed call as INTERNAL.
    fn with_agent<T>(&self, f: impl FnOnce(&AgentConn) -> Result<T, TtrpcError>) -> TtrpcResult<T> {
        f(&self.agent()?).map_err(|e| match e {
            TtrpcError::RpcStatus(s) => TtrpcError::RpcStatus(s),
            other => err(Code::INTERNAL, other.to_string()),
        })
    }

    /// Whether `id` is a pod's sandbox container that runs no process.
    fn is_pause(&self, id: &str) -> TtrpcResult<bool> {
        let mut g = self.lock();
        Ok(Self::container(&mut g, id)?.pause)
    }

    /// Starts the sandbox container that runs no process: it is running.
    fn start_pause(&self, id: &str) -> containerd_shim::api::StartResponse {
        let pid = {
            let mut g = self.lock();
            match g.containers.get_mut(id) {
                Some(c) => {
                    if c.init.state == State::Created {
                        c.init.state = State::Running;
                    }
                    c.init.pid
                }
                None => 0,
            }
        };
        self.publish(containerd_shim::protos::events::task::TaskStart {
            container_id: id.to_string(),
            pid,
            ..Default::default()
        });
        containerd_shim::api::StartResponse {
            pid,
            ..Default::default()
        }
    }

    /// A signal to the sandbox container that runs no process, as the
    /// pause process takes it: SIGINT and SIGTERM end it with status 0
    /// (pause exits cleanly), SIGKILL with 137; others are ignored. The
    /// pod's VM ends with its last container.
    fn kill_pause(&self, id: &str, signal: u32) {
        let status = match signal as i32 {
            libc::SIGINT | libc::SIGTERM => 0,
            libc::SIGKILL => 128 + signal,
            _ => return,
        };
        let at = now();
        let pid = {
            let mut g = self.lock();
            let Some(c) = g.containers.get_mut(id) else {
                return;
            };
            c.init.state = State::Stopped;
            c.init.exit = Some((status, at.clone()));
            c.init.pid
        };
        self.inner.1.notify_all();
        self.publish(TaskExit {
            container_id: id.to_string(),
            id: id.to_string(),
            pid,
            exit_status: status,
            exited_at: Some(at).into(),
            ..Default::default()
        });
    }

    fn agent(&self) -> TtrpcResult<AgentConn> {
        let g = self.lock();
        let sb = g
            .sandbox
            .as_ref()
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "no sandbox running"))?;
        sb.connect().map_err(internal)
    }

    /// Waits in the agent for `exec_id` of `id` to exit, then records it,
    /// drains its output and tells containerd.
    fn watch(&self, id: String, exec_id: String, copies: Copies) {
        let svc = self.clone();
        std::thread::spawn(move || {
            let status = match svc.agent().map(|a| a.wait(&id, &exec_id)) {
                Ok(Ok(r)) => r.status as u32,
                Ok(Err(e)) => {
                    warn!("{id}/{exec_id}: {}; counted as killed", chain(&e));
                    137
                }
                Err(e) => {
                    warn!("{id}/{exec_id}: {e}; counted as killed");
                    137
                }
            };
            copies.join();
            let at = now();
            let pid = {
                let mut g = svc.lock();
                let Some(p) = g
                    .containers
                    .get_mut(&id)
                    .and_then(|c| Self::process(c, &exec_id).ok())
                else {
                    return;
                };
                p.state = State::Stopped;
                p.exit = Some((status, at.clone()));
                p.pid
            };
            svc.inner.1.notify_all();
            let ev = TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() {
                    id.clone()
                } else {
                    exec_id.clone()
                },
                pid,
                exit_status: status,
                exited_at: Some(at).into(),
                ..Default::default()
            };
            svc.publish(ev);
        });
    }

    fn set_state(&self, id: &str, from: State, to: State) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            if c.init.state == from {
                c.init.state = to;
            }
        }
    }

    /// Publishes TaskOOM for each OOM kill the agent reports, until the
    /// sandbox goes (the call then fails).
    fn watch_oom(&self, conn: AgentConn) {
        let svc = self.clone();
        std::thread::spawn(move || loop {
            let r = conn
                .containers
                .get_oom_event(actx(Duration::ZERO), &husk_protocol::agent::Empty::new());
            match r {
                Ok(ev) => svc.publish(TaskOOM {
                    container_id: ev.container_id,
                    ..Default::default()
                }),
                Err(_) => return,
            }
        });
    }

    fn container<'a>(g: &'a mut Inner, id: &str) -> TtrpcResult<&'a mut Container> {
        g.containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("{id} not found")))
    }

    fn process<'a>(c: &'a mut Container, exec_id: &str) -> TtrpcResult<&'a mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut c.init);
        }
        c.execs
            .get_mut(exec_id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
            inner: Arc::new((Mutex::new(Inner::default()), Condvar::new())),
            starting: Arc::new(Mutex::new(())),
            publisher: None,
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // Containers of a CRI pod share the pod's shim (and VM).
        let spec = oci_spec::runtime::Spec::load("config.json").ok();
        let grouping = spec
            .as_ref()
            .and_then(|s| s.annotations().as_ref())
            .and_then(|a| a.get(SANDBOX_ID).cloned())
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // Run by containerd in the bundle after the shim is gone: what the
        // shim would have undone. Its VMM outlives it (the keeper is not
        // tied to the shim): killed through its cgroup.
        match Runtime::locate() {
            Ok(rt) => {
                if let Err(e) = rt.clean_sandbox(&self.id) {
                    warn!("cleaning sandbox {}: {}", self.id, chain(&e));
                }
            }
            Err(e) => warn!("{}", chain(&e)),
        }
        let rootfs = Path::new("rootfs");
        if rootfs.exists() {
            let _ = containerd_shim::mount::umount_recursive(rootfs.to_str(), libc::MNT_DETACH);
        }
        let mut r = DeleteResponse::new();
        r.exit_status = 137;
        r.exited_at = Some(now()).into();
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut s = self.clone();
        s.publisher = Some(Arc::new(publisher));
        s
    }
}
