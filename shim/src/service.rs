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

use containerd_shim::api::{self, Status};
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{Code, Error as TtrpcError, Status as RpcStatus};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use husk_runtime::container::{join, ContainerError, ContainerSpec, Net, NotCreated, Root};
use husk_runtime::guest::{container, ctx as actx, AgentConn};
use husk_runtime::{Runtime, Sandbox};
use log::{info, warn};

use crate::error::ShimError;
use crate::io::{Copies, Stdio};
use husk_runtime::util::{shown, IoContext};

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
        warn!("{e:#}");
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

struct Container {
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
    containers: HashMap<String, Container>,
    /// The sandbox being stopped after its last container's delete: the
    /// shim exits (Shutdown) only once it is gone.
    stopping: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
pub struct Service {
    namespace: String,
    /// The task (and, outside pods, sandbox) id containerd started us for.
    id: String,
    exit: Arc<ExitSignal>,
    inner: Arc<(Mutex<Inner>, Condvar)>,
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
                    warn!("{id}/{exec_id}: {e:#}; counted as killed");
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

    fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let bundle = PathBuf::from(&req.bundle);
        let spec: oci_spec::runtime::Spec =
            oci_spec::runtime::Spec::load(bundle.join("config.json"))?;
        let joins = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(CONTAINER_TYPE))
            .is_some_and(|t| t == "container");
        let netns = crate::spec::netns_path(&spec).filter(|p| !p.starts_with("/proc"));
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).at(|| shown(&rootfs))?;
        for m in &req.rootfs {
            containerd_shim::mount::mount_rootfs(
                Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                Some(m.source.as_str()).filter(|s| !s.is_empty()),
                &m.options,
                &rootfs,
            )
            .map_err(|e| ShimError::Rootfs {
                typ: m.type_.clone(),
                message: e.to_string(),
            })?;
        }
        let mounted = !req.rootfs.is_empty();
        // Undone when the container is not created.
        let unmount = || {
            if mounted {
                let _ = containerd_shim::mount::umount_recursive(rootfs.to_str(), libc::MNT_DETACH);
            }
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let r = if joins {
            self.join_sandbox(&req.id, spec, &rootfs, &stdio)
        } else {
            let (type_url, options) = req
                .options
                .as_ref()
                .map_or(("", &[][..]), |o| (o.type_url.as_str(), &o.value[..]));
            crate::config::ShimConfig::find(type_url, options).and_then(|conf| {
                let g = crate::spec::for_guest(spec, &rootfs, &[])?;
                self.start_sandbox(&req.id, g, netns, &stdio, &conf)
            })
        };
        if r.is_err() {
            unmount();
        }
        let (pid, shares, copies) = r?;
        self.lock().containers.insert(
            req.id.clone(),
            Container {
                bundle,
                rootfs: mounted.then_some(rootfs),
                shares,
                init: Process {
                    pid,
                    state: State::Created,
                    stdio,
                    exit: None,
                    exec_spec: None,
                },
                execs: HashMap::new(),
            },
        );
        self.watch(req.id.clone(), String::new(), copies);
        Ok(pid)
    }

    /// Starts the sandbox with this container (a pod's sandbox container,
    /// or a container of its own) and creates it there, through the
    /// runtime's lifecycle with the bundle as a shared root.
    fn start_sandbox(
        &self,
        id: &str,
        guest: crate::spec::GuestSpec,
        netns: Option<PathBuf>,
        stdio: &Stdio,
        conf: &crate::config::ShimConfig,
    ) -> Result<(u32, Vec<usize>, Copies), ShimError> {
        let mut g = self.lock();
        if g.sandbox.is_some() {
            return Err(ShimError::Pod(format!(
                "this shim's sandbox already runs; only containers of its CRI pod ({CONTAINER_TYPE}=container) can join it"
            )));
        }
        let rt = conf.runtime()?;
        let entries = (0..guest.shares.len()).collect();
        let mut c = ContainerSpec::with_root(
            id,
            Root::Shared {
                spec: Box::new(guest.spec),
                shares: guest.shares,
            },
        );
        // Under CRI the VM takes over the pod's namespace CNI set up; under
        // plain ctr, like runc: loopback only.
        c.net = Net::Pod(netns);
        conf.apply(&mut c.machine);
        // Kept so that a container that cannot be created comes with what
        // the guest printed about it.
        c.console_log = true;
        let created = c
            .plan(None)?
            .acquire(None, None)?
            .start(&rt)?
            .create_only(stdio.io());
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                if let ContainerError::NotCreated(NotCreated {
                    logs: Some(logs), ..
                }) = &e
                {
                    warn!("{id}: not created; the sandbox's {logs}");
                }
                return Err(e.into());
            }
        };
        let pid = container.pid();
        let (sandbox, mut streams, _no_leases) = container.into_parts();
        let copies = Copies::start(stdio, &mut streams, &self.owner(id))?;
        info!("{id}: created in sandbox (VMM pid {})", sandbox.vmm_pid());
        if let Ok(conn) = sandbox.connect() {
            self.watch_oom(conn);
        }
        g.sandbox = Some(sandbox);
        Ok((pid, entries, copies))
    }

    /// Creates a container of the pod in its running sandbox: its rootfs
    /// and binds are added to the sandbox's share first.
    fn join_sandbox(
        &self,
        id: &str,
        spec: oci_spec::runtime::Spec,
        rootfs: &Path,
        stdio: &Stdio,
    ) -> Result<(u32, Vec<usize>, Copies), ShimError> {
        // The shares are added under the lock; the (slow) create runs on a
        // connection of its own, so the pod's other tasks answer meanwhile.
        let joining = {
            let mut g = self.lock();
            let pids: Vec<u32> = g.containers.values().map(|c| c.init.pid).collect();
            let guest = crate::spec::for_guest(spec, rootfs, &pids)?;
            let sandbox = g.sandbox.as_mut().ok_or_else(|| {
                ShimError::Pod(format!(
                    "{id} is a pod's container but its pod's sandbox is not running"
                ))
            })?;
            join(sandbox, id, guest.spec, &guest.shares)?
        };
        let mut m = match joining.create_only(stdio.io()) {
            Ok(m) => m,
            Err(e) => {
                if let Some(sb) = self.lock().sandbox.as_mut() {
                    unshare(sb, &e.entries);
                }
                return Err(e.into());
            }
        };
        match Copies::start(stdio, &mut m.streams, &self.owner(id)) {
            Ok(copies) => {
                info!("{id}: joined the pod's sandbox as pid {}", m.pid);
                Ok((m.pid, m.entries, copies))
            }
            Err(e) => {
                if let Some(sb) = self.lock().sandbox.as_mut() {
                    unshare(sb, &m.entries);
                }
                Err(e)
            }
        }
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
                    warn!("cleaning sandbox {}: {e:#}", self.id);
                }
            }
            Err(e) => warn!("{e:#}"),
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

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!("create {} in {}", req.id, req.bundle);
        let pid = self.create_task(&req).map_err(internal)?;
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let agent = self.agent()?;
        if req.exec_id.is_empty() {
            agent.start(&req.id).map_err(internal)?;
            let pid = {
                let mut g = self.lock();
                let c = Self::container(&mut g, &req.id)?;
                if c.init.state == State::Created {
                    c.init.state = State::Running;
                }
                c.init.pid
            };
            self.publish(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            });
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let (process, stdio) = {
            let mut g = self.lock();
            let c = Self::container(&mut g, &req.id)?;
            let p = Self::process(c, &req.exec_id)?;
            let spec = p
                .exec_spec
                .take()
                .ok_or_else(|| err(Code::FAILED_PRECONDITION, "exec already started"))?;
            (spec, p.stdio.clone())
        };
        let mut streams = agent
            .exec(&req.id, &req.exec_id, &process, stdio.io())
            .map_err(internal)?;
        let copies = Copies::start(&stdio, &mut streams, &self.owner(&req.id)).map_err(internal)?;
        // The agent answers ExecProcess once the process runs; its pid is
        // the guest's (not needed by containerd beyond display).
        {
            let mut g = self.lock();
            if let Some(p) = g
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.execs.get_mut(&req.exec_id))
            {
                p.state = State::Running;
            }
        }
        self.watch(req.id.clone(), req.exec_id.clone(), copies);
        self.publish(TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::StartResponse::default())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let mut g = self.lock();
        let c = Self::container(&mut g, &req.id)?;
        let bundle = c.bundle.display().to_string();
        let p = Self::process(c, &req.exec_id)?;
        let (exit_status, exited_at) = p.exit.clone().unwrap_or((0, Timestamp::new()));
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle,
            pid: p.pid,
            status: match p.state {
                State::Created => Status::CREATED,
                State::Running => Status::RUNNING,
                State::Paused => Status::PAUSED,
                State::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status,
            exited_at: Some(exited_at).into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut g = self.lock();
        loop {
            let c = Self::container(&mut g, &req.id)?;
            let p = Self::process(c, &req.exec_id)?;
            if let Some((status, at)) = p.exit.clone() {
                return Ok(api::WaitResponse {
                    exit_status: status,
                    exited_at: Some(at).into(),
                    ..Default::default()
                });
            }
            g = self
                .inner
                .1
                .wait_timeout(g, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        {
            let mut g = self.lock();
            let c = Self::container(&mut g, &req.id)?;
            let p = Self::process(c, &req.exec_id)?;
            if p.state == State::Stopped {
                return Err(err(Code::NOT_FOUND, "process already finished"));
            }
        }
        self.agent()?
            .signal(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(internal)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let process: serde_json::Value = serde_json::from_slice(&req.spec.value)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        {
            let mut g = self.lock();
            let c = Self::container(&mut g, &req.id)?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            c.execs.insert(
                req.exec_id.clone(),
                Process {
                    pid: 0,
                    state: State::Created,
                    stdio: Stdio {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                    },
                    exit: None,
                    exec_spec: Some(process),
                },
            );
        }
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let mut g = self.lock();
            let c = Self::container(&mut g, &req.id)?;
            let p = c
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {} not found", req.exec_id)))?;
            let (status, at) = p.exit.unwrap_or((0, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: status,
                exited_at: Some(at).into(),
                ..Default::default()
            });
        }
        let (c, sandbox) = {
            let mut g = self.lock();
            let c = g
                .containers
                .remove(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("{} not found", req.id)))?;
            let last = g.containers.is_empty();
            if !last {
                // The pod goes on: this container leaves the guest, and its
                // paths the share.
                if let Some(sb) = g.sandbox.as_mut() {
                    for e in sb.remove_member(&req.id, &c.shares) {
                        warn!("{}: {e:#}", req.id);
                    }
                }
            }
            (c, if last { g.sandbox.take() } else { None })
        };
        if let Some(sb) = sandbox {
            // A guest's shutdown takes seconds of guest-kernel work, more
            // than containerd waits for a delete (10 s when a pod's sandbox
            // exits; it then never asks this shim to shut down): the VM
            // stops on a thread of its own, and Shutdown waits for it.
            let id = req.id.clone();
            let stop = std::thread::spawn(move || {
                let down = sb.remove_and_shutdown(&id, Duration::from_secs(20));
                if let Err(e) = down.remove {
                    warn!("{id}: {e:#}");
                }
                if let Err(e) = down.shutdown {
                    warn!("stopping the sandbox: {e:#}");
                }
            });
            self.lock().stopping = Some(stop);
        }
        if let Some(r) = &c.rootfs {
            if let Err(e) = containerd_shim::mount::umount_recursive(r.to_str(), libc::MNT_DETACH) {
                warn!("unmounting {}: {e}", r.display());
            }
        }
        let (status, at) = c.init.exit.clone().unwrap_or((137, now()));
        self.publish(TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid: c.init.pid,
            exit_status: status,
            exited_at: Some(at.clone()).into(),
            ..Default::default()
        });
        Ok(api::DeleteResponse {
            pid: c.init.pid,
            exit_status: status,
            exited_at: Some(at).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let g = self.lock();
        let c = g
            .containers
            .get(&req.id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("{} not found", req.id)))?;
        let mut r = api::PidsResponse::new();
        let mut info = containerd_shim::protos::types::task::ProcessInfo::new();
        info.pid = c.init.pid;
        r.processes.push(info);
        Ok(r)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // The copy thread also passes on the end of the stdin FIFO; this
        // closes the process's input even while containerd holds it open.
        if req.stdin {
            let r = husk_protocol::agent::ProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            };
            self.with_agent(|a| a.containers.close_stdin(actx(Duration::from_secs(30)), &r))?;
        }
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let r = husk_protocol::agent::TtyWinResizeRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            cols: req.width,
            ..Default::default()
        };
        self.with_agent(|a| {
            a.containers
                .tty_win_resize(actx(Duration::from_secs(30)), &r)
        })?;
        Ok(api::Empty::new())
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.with_agent(|a| {
            a.containers
                .pause_container(actx(Duration::from_secs(60)), &container(&req.id))
        })?;
        self.set_state(&req.id, State::Running, State::Paused);
        self.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.with_agent(|a| {
            a.containers
                .resume_container(actx(Duration::from_secs(60)), &container(&req.id))
        })?;
        self.set_state(&req.id, State::Paused, State::Running);
        self.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        // containerd sends the OCI LinuxResources as JSON in the Any.
        let r = husk_protocol::agent::UpdateContainerRequest {
            container_id: req.id.clone(),
            resources: req.resources.value.clone(),
            ..Default::default()
        };
        self.with_agent(|a| {
            a.containers
                .update_container(actx(Duration::from_secs(60)), &r)
        })?;
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics::{
            CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
        };
        let s = self.with_agent(|a| {
            a.containers
                .stats_container(actx(Duration::from_secs(30)), &container(&req.id))
        })?;
        // The container's cgroup v2 figures in the guest, in the type runc's
        // shim reports on a cgroup v2 host.
        let mut m = Metrics::new();
        let mut pids = PidsStat::new();
        pids.current = s.pids_current;
        pids.limit = s.pids_limit;
        m.pids = Some(pids).into();
        if let Some(c) = s.cpu.as_ref() {
            let mut cpu = CPUStat::new();
            cpu.usage_usec = c.usage_usec;
            cpu.user_usec = c.user_usec;
            cpu.system_usec = c.system_usec;
            cpu.nr_throttled = c.nr_throttled;
            cpu.throttled_usec = c.throttled_usec;
            m.cpu = Some(cpu).into();
        }
        if let Some(mem) = s.memory.as_ref() {
            let mut ms = MemoryStat::new();
            ms.usage = mem.usage;
            ms.usage_limit = mem.limit;
            ms.anon = mem.anon;
            ms.file = mem.file;
            m.memory = Some(ms).into();
            let mut ev = MemoryEvents::new();
            ev.oom_kill = mem.oom_kill;
            m.memory_events = Some(ev).into();
        }
        let any = containerd_shim::util::convert_to_any(Box::new(m))
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let g = self.lock();
        let task_pid = g.containers.get(&req.id).map_or(0, |c| c.init.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let mut g = self.lock();
        if g.containers.is_empty() {
            let stopping = g.stopping.take();
            let exit = self.exit.clone();
            // Answered now; the shim exits once its sandbox is stopped.
            std::thread::spawn(move || {
                if let Some(t) = stopping {
                    let _ = t.join();
                }
                exit.signal();
            });
        }
        Ok(api::Empty::new())
    }
}
