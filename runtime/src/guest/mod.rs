//! A client of husk-agent, wherever it runs: in a guest over husk-vmm's
//! hybrid vsock, or on a host over its Unix socket (tests run the same
//! scenarios through either).

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    ContainerRequest, CreateContainerRequest, Empty, ExecProcessRequest, ProcessRequest, Stdio,
    Storage, WaitProcessResponse,
};
use husk_protocol::agent_ttrpc::{ContainersClient, NetworkClient, SandboxClient};
use husk_protocol::{AGENT_VSOCK_PORT, API_VERSION, STREAM_VSOCK_PORT, VERSION_KEY};
use oci_spec::runtime::Spec;

use crate::util::{IoContext, IoError};
use crate::vmm::{vsock_connect, VmmError, VmmProcess};

/// Talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The agent refused the call, or the call did not reach it: see
    /// [`find_rpc`] for finding it in a chain of errors.
    /// Boxed: the refusal's text is long, and every call's result
    /// carries this type.
    #[error(transparent)]
    Rpc(Box<RpcError>),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{what}")]
    Ttrpc {
        what: &'static str,
        #[source]
        source: Box<ttrpc::Error>,
    },
    #[error("reaching the agent")]
    Vmm(#[source] Box<VmmError>),
    #[error("agent says {0}")]
    NotServing(String),
    #[error("encoding the request")]
    Encode(#[from] serde_json::Error),
    #[error("no such stream")]
    NoStream,
    #[error("the agent did not answer within {timeout:?}: {last}")]
    NoAnswer { timeout: Duration, last: String },
}

pub type Result<T> = std::result::Result<T, GuestError>;

impl From<VmmError> for GuestError {
    fn from(e: VmmError) -> GuestError {
        GuestError::Vmm(Box::new(e))
    }
}

impl From<RpcError> for GuestError {
    fn from(e: RpcError) -> GuestError {
        GuestError::Rpc(Box::new(e))
    }
}

/// The agent's refusal among `e` and its causes, whichever module's
/// error carries it: what callers decide exit codes and ttrpc codes by.
pub fn find_rpc<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a RpcError> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<RpcError>() {
            return Some(r);
        }
        if let Some(GuestError::Rpc(r)) = c.downcast_ref::<GuestError>() {
            return Some(r);
        }
        cur = c.source();
    }
    None
}

/// A request context with the API version and a deadline
/// (`Duration::ZERO`: none).
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    let mut c = ttrpc::context::with_timeout(timeout.as_nanos() as i64);
    c.add(VERSION_KEY.to_string(), API_VERSION.to_string());
    c
}

/// "CODE: message" of a ttrpc error, for asserting on.
pub fn rpc_message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => format!("{other:?}"),
    }
}

/// A request the agent refused or that did not reach it: the operation,
/// the agent's code (None when the call itself failed: the connection
/// broke, the deadline passed), the type of its first detail
/// (`husk_protocol::detail`) and its message. Callers decide by code and
/// detail.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {}", self.describe())]
pub struct RpcError {
    pub op: String,
    pub code: Option<ttrpc::Code>,
    pub detail: Option<String>,
    pub message: String,
}

impl RpcError {
    pub fn new(op: impl Into<String>, e: &ttrpc::Error) -> RpcError {
        let (code, detail, message) = match e {
            ttrpc::Error::RpcStatus(s) => (
                Some(s.code()),
                s.details.first().map(|d| d.type_url.clone()),
                s.message().to_string(),
            ),
            other => (None, None, format!("{other:?}")),
        };
        RpcError {
            op: op.into(),
            code,
            detail,
            message,
        }
    }

    /// Whether the agent refused with `detail` (a `husk_protocol::detail`).
    pub fn is(&self, detail: &str) -> bool {
        self.detail.as_deref() == Some(detail)
    }

    fn describe(&self) -> String {
        match self.code {
            Some(c) => format!("{c:?}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

/// Where the agent listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// `--listen unix://PATH`; streams on `PATH.stdio`.
    Unix(PathBuf),
    /// husk-vmm's hybrid vsock socket.
    Vsock(PathBuf),
}

/// Deadline of calls whose work in the guest is many syscalls (creating a
/// container, an exec): each guest-kernel entry is emulated here, a create
/// alone takes ~16 s, and with ten sandboxes starting on two cores one
/// took over 120 s. A dead VM fails the call at once (the connection
/// closes); this only bounds a guest that hangs.
pub const SLOW_CALL: Duration = Duration::from_secs(600);

pub struct AgentConn {
    pub endpoint: Endpoint,
    pub sandbox: SandboxClient,
    pub containers: ContainersClient,
    pub network: NetworkClient,
    /// What the last Health answer said: whether DestroySandbox syncs
    /// before it answers, and the call's round trip in microseconds.
    destroy_syncs: AtomicBool,
    launch_holds: AtomicBool,
    health_rtt_us: AtomicU64,
}

impl AgentConn {
    pub fn connect(endpoint: Endpoint) -> Result<AgentConn> {
        Self::connect_within(endpoint, Duration::from_secs(60))
    }

    /// Connects, retrying a vsock connection refused (the agent not
    /// listening yet) until `timeout`; zero tries once.
    pub fn connect_within(endpoint: Endpoint, timeout: Duration) -> Result<AgentConn> {
        let client = match &endpoint {
            Endpoint::Unix(p) => ttrpc::Client::connect(&format!("unix://{}", p.display()))
                .map_err(|source| GuestError::Ttrpc {
                    what: "connecting to the agent",
                    source: Box::new(source),
                })?,
            Endpoint::Vsock(uds) => {
                let s = vsock_connect(uds, AGENT_VSOCK_PORT, timeout)?;
                ttrpc::Client::new(s.into_raw_fd()).map_err(|source| GuestError::Ttrpc {
                    what: "ttrpc client",
                    source: Box::new(source),
                })?
            }
        };
        Ok(AgentConn {
            endpoint,
            sandbox: SandboxClient::new(client.clone()),
            containers: ContainersClient::new(client.clone()),
            network: NetworkClient::new(client),
            destroy_syncs: AtomicBool::new(false),
            launch_holds: AtomicBool::new(false),
            health_rtt_us: AtomicU64::new(0),
        })
    }

    /// Opens a stdio stream named `name` to the agent.
    pub fn stream(&self, name: &str) -> Result<UnixStream> {
        let mut s = match &self.endpoint {
            Endpoint::Unix(p) => {
                UnixStream::connect(format!("{}.stdio", p.display())).at(|| "stream socket")?
            }
            Endpoint::Vsock(uds) => vsock_connect(uds, STREAM_VSOCK_PORT, Duration::from_secs(60))?,
        };
        s.write_all(format!("{name}\n").as_bytes())
            .at(|| format!("naming stream {name}"))?;
        Ok(s)
    }

    /// Creates `id` from `spec` with the streams asked for, and starts it
    /// unless `start` is false. Returns the open streams.
    pub fn run(&self, id: &str, spec: &Spec, io: Io, start: bool) -> Result<Streams> {
        self.create(id, spec, io, Vec::new(), start)
    }

    pub fn create(
        &self,
        id: &str,
        spec: &Spec,
        io: Io,
        storages: Vec<Storage>,
        start: bool,
    ) -> Result<Streams> {
        let (_, streams) = self.create_only(id, spec, io, storages, true)?;
        if start {
            self.start(id)?;
        }
        Ok(streams)
    }

    /// Creates `id` (not started) on a rootfs that is writable as it is
    /// (`overlay_rootfs` false) or gets a tmpfs overlay; returns the init
    /// process's pid in the guest and its streams.
    pub fn create_only(
        &self,
        id: &str,
        spec: &Spec,
        io: Io,
        storages: Vec<Storage>,
        overlay_rootfs: bool,
    ) -> Result<(u32, Streams)> {
        let (stdio, streams) = self.open_streams(io)?;
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: serde_json::to_vec(spec)?,
            storages,
            overlay_rootfs,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let r = self
            .containers
            .create_container(ctx(SLOW_CALL), &req)
            .map_err(|e| RpcError::new(format!("CreateContainer {id}"), &e))?;
        Ok((r.pid, streams))
    }

    /// Creates `id` parked (see the agent's containers/parked.rs): set up
    /// in full, its init waiting for `launch` to give it its process.
    /// `spec`'s args are a placeholder. Returns the init's pid.
    pub fn park(
        &self,
        id: &str,
        spec: &Spec,
        storages: Vec<Storage>,
        overlay_rootfs: bool,
        warm: Option<&(String, String)>,
    ) -> Result<u32> {
        let (warm, warm_path) = warm
            .map(|(program, path)| (vec![program.clone()], path.clone()))
            .unwrap_or_default();
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: serde_json::to_vec(spec)?,
            storages,
            overlay_rootfs,
            parked: true,
            warm,
            warm_path,
            ..Default::default()
        };
        let r = self
            .containers
            .create_container(ctx(SLOW_CALL), &req)
            .map_err(|e| RpcError::new(format!("CreateContainer {id} (parked)"), &e))?;
        Ok(r.pid)
    }

    /// Gives parked container `id` its process (`l`, with the streams
    /// `io` asks for) and starts it.
    pub fn launch(&self, id: &str, l: &Launch, io: Io) -> Result<Streams> {
        let (stdio, streams) = self.open_streams(io)?;
        let req = husk_protocol::agent::LaunchContainerRequest {
            container_id: id.into(),
            args: l.args.clone(),
            env: l.env.clone(),
            hostname: l.hostname.clone(),
            new_id: l.new_id.clone(),
            hold: l.hold,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.containers
            .launch_container(ctx(SLOW_CALL), &req)
            .map_err(|e| RpcError::new(format!("LaunchContainer {id}"), &e))?;
        Ok(streams)
    }

    pub fn start(&self, id: &str) -> Result<()> {
        self.containers
            .start_container(ctx(SLOW_CALL), &container(id))
            .map_err(|e| RpcError::new(format!("StartContainer {id}"), &e))?;
        Ok(())
    }

    /// Signals a process (`exec_id` "" for the init), or with `all` and no
    /// `exec_id` every process of the container.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = husk_protocol::agent::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.containers
            .signal_process(ctx(Duration::from_secs(30)), &req)
            .map_err(|e| RpcError::new(format!("SignalProcess {id}/{exec_id}"), &e))?;
        Ok(())
    }

    /// Opens the streams `io` asks for. Names are random (they only need
    /// to be unique in the agent; CRI's ids alone fill the name's length).
    pub fn open_streams(&self, io: Io) -> Result<(Stdio, Streams)> {
        let mut stdio = Stdio::new();
        let mut streams = Streams::default();
        let tag = crate::util::random_hex(8)?;
        let name = |s: &str| format!("{tag}-{s}");
        if io.stdin {
            stdio.stdin = name("in");
            streams.stdin = Some(self.stream(&stdio.stdin)?);
        }
        if io.stdout {
            stdio.stdout = name("out");
            streams.stdout = Some(self.stream(&stdio.stdout)?);
        }
        if io.stderr {
            stdio.stderr = name("err");
            streams.stderr = Some(self.stream(&stdio.stderr)?);
        }
        Ok((stdio, streams))
    }

    /// Runs `process` (OCI process JSON) in container `id` as `exec_id`.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        io: Io,
    ) -> Result<Streams> {
        let (stdio, streams) = self.open_streams(io)?;
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process: serde_json::to_vec(process)?,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.containers
            .exec_process(ctx(SLOW_CALL), &req)
            .map_err(|e| RpcError::new(format!("ExecProcess {id}/{exec_id}"), &e))?;
        Ok(streams)
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        // No deadline: a process runs as long as it runs. A VM that dies
        // breaks the connection, which ends the call.
        self.containers
            .wait_process(ctx(Duration::ZERO), &req)
            .map_err(|e| RpcError::new(format!("WaitProcess {id}/{exec_id}"), &e).into())
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        self.containers
            .remove_container(ctx(SLOW_CALL), &container(id))
            .map_err(|e| RpcError::new(format!("RemoveContainer {id}"), &e))?;
        Ok(())
    }

    /// The agent's steps since the last call (see agent/src/profile.rs);
    /// with `count`, it counts guest work per step from now on.
    pub fn profile(&self, count: bool) -> Result<husk_protocol::agent::ProfileResponse> {
        let req = husk_protocol::agent::ProfileRequest {
            count,
            ..Default::default()
        };
        Ok(self
            .sandbox
            .profile(ctx(Duration::from_secs(30)), &req)
            .map_err(|e| RpcError::new("Profile", &e))?)
    }

    /// One fork+exec of `args` in `root` (relative to the agent's storage
    /// directory, on `storages`), outside any container (`warm`: its
    /// program first read into the page cache, as a container template's
    /// is): its status,
    /// the guest's fork-to-reaped time and the call's time in the guest
    /// outside the exec (mounting and unmounting the storages, that read).
    pub fn bare_exec(
        &self,
        storages: Vec<Storage>,
        root: &str,
        args: &[String],
        warm: bool,
    ) -> Result<(i32, Duration, Duration)> {
        let req = husk_protocol::agent::BareExecRequest {
            storages,
            root: root.into(),
            args: args.to_vec(),
            warm,
            ..Default::default()
        };
        let r = self
            .containers
            .bare_exec(ctx(SLOW_CALL), &req)
            .map_err(|e| RpcError::new("BareExec", &e))?;
        Ok((
            r.status,
            Duration::from_micros(r.micros),
            Duration::from_micros(r.setup_micros),
        ))
    }

    pub fn health(&self) -> Result<()> {
        let sent = Instant::now();
        let h = self
            .sandbox
            .health(ctx(Duration::from_secs(30)), &Empty::new())
            .map_err(|e| RpcError::new("Health", &e))?;
        self.health_rtt_us
            .store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.destroy_syncs.store(h.destroy_syncs, Ordering::Relaxed);
        self.launch_holds.store(h.launch_holds, Ordering::Relaxed);
        if h.status != "SERVING" {
            return Err(GuestError::NotServing(h.status));
        }
        Ok(())
    }

    /// Whether the agent, as its last Health said, ends the containers'
    /// processes and syncs before it answers DestroySandbox (an agent of
    /// an older guest image answers first and syncs as it powers off).
    pub fn destroy_syncs(&self) -> bool {
        self.destroy_syncs.load(Ordering::Relaxed)
    }

    /// Whether the agent, as its last Health said, holds a launched
    /// process until StartContainer when asked (`Launch::hold`).
    pub fn launch_holds(&self) -> bool {
        self.launch_holds.load(Ordering::Relaxed)
    }

    /// The round trip of the last Health call: an estimate of a request's
    /// way there and back.
    pub fn health_rtt(&self) -> Duration {
        Duration::from_micros(self.health_rtt_us.load(Ordering::Relaxed))
    }
}

/// A parked container's process (`AgentConn::launch`).
#[derive(Clone, Debug, Default)]
pub struct Launch {
    pub args: Vec<String>,
    /// KEY=VALUE, the whole environment.
    pub env: Vec<String>,
    /// Set in the container's UTS namespace first ("" keeps its own).
    pub hostname: String,
    /// The container's id from then on ("" keeps it).
    pub new_id: String,
    /// Given, not started: StartContainer starts it.
    pub hold: bool,
}

pub fn container(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

/// Which streams a process gets.
#[derive(Clone, Copy, Default)]
pub struct Io {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Io {
    /// No streams (a healthcheck: only its exit status counts).
    pub const NONE: Io = Io {
        stdin: false,
        stdout: false,
        stderr: false,
    };
    pub const OUT_ERR: Io = Io {
        stdin: false,
        stdout: true,
        stderr: true,
    };
    pub const ALL: Io = Io {
        stdin: true,
        stdout: true,
        stderr: true,
    };
    pub const TTY: Io = Io {
        stdin: true,
        stdout: true,
        stderr: false,
    };
}

#[derive(Debug, Default)]
pub struct Streams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
}

/// Reads a stream to its end (the process closed it), with a timeout.
pub fn read_all(s: &mut Option<UnixStream>, timeout: Duration) -> Result<String> {
    let Some(s) = s.as_mut() else {
        return Err(GuestError::NoStream);
    };
    let what = || "reading a stream to its end";
    s.set_read_timeout(Some(timeout)).at(what)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).at(what)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Waits until the agent behind `vmm` answers Health.
pub(crate) fn wait_for_agent(
    vmm: &mut VmmProcess,
    log: &Path,
    timeout: Duration,
) -> Result<AgentConn> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no vsock socket yet");
    loop {
        vmm.check_alive(log)?;
        if vmm.vsock.exists() {
            match AgentConn::connect_within(Endpoint::Vsock(vmm.vsock.clone()), Duration::ZERO)
                .and_then(|a| a.health().map(|_| a))
            {
                Ok(a) => return Ok(a),
                Err(e) => last = crate::util::chain(&e),
            }
        }
        if Instant::now() >= deadline {
            return Err(GuestError::NoAnswer { timeout, last });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
