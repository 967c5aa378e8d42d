//! containerd's Task service on a husk sandbox: create, start, wait,
//! kill, exec, delete, and the rest, each on the agent.

use std::time::Duration;

use containerd_shim::api::{self, Status};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::{TtrpcContext, TtrpcResult};
use husk_runtime::guest::{container, ctx as actx};
use log::{info, warn};

use crate::io::{Copies, Stdio};

use super::*;

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
        if req.exec_id.is_empty() && self.is_pause(&req.id)? {
            return Ok(self.start_pause(&req.id));
        }
        let agent = self.agent()?;
        if req.exec_id.is_empty() {
            let started = agent.start(&req.id);
            // The VM's start is over, whichever way: the next one may go.
            drop(self.lock().start_slot.take());
            started.map_err(internal)?;
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
        if req.exec_id.is_empty() && self.is_pause(&req.id)? {
            self.kill_pause(&req.id, req.signal);
            return Ok(api::Empty::new());
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
            if c.pause {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "{} is the pod's sandbox container, which runs no process under husk: \
                         nothing to exec in",
                        req.id
                    ),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            c.execs.insert(
                req.exec_id.clone(),
                Process::created(
                    0,
                    Stdio {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                    },
                    Some(process),
                ),
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
            if c.pause {
                g.pod = None;
            }
            if !last && !c.pause {
                // The pod goes on: this container leaves the guest, and its
                // paths the share.
                if let Some(sb) = g.sandbox.as_mut() {
                    for e in sb.remove_member(&req.id, &c.shares) {
                        warn!("{}: {}", req.id, chain(&e));
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
                if let Err(e) = sb.end(Duration::from_secs(20)) {
                    warn!("{id}: ending its sandbox: {}", chain(&e));
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
        if self.is_pause(&req.id)? {
            // No process, no cgroup: nothing used.
            let any = containerd_shim::util::convert_to_any(Box::new(Metrics::new()))
                .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
            return Ok(api::StatsResponse {
                stats: Some(any).into(),
                ..Default::default()
            });
        }
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
