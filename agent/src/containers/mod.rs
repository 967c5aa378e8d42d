//! The Containers service: OCI containers in the sandbox through youki's
//! libcontainer, with stdio on host-opened streams, exit statuses from the
//! reaper, stats and OOM events from cgroup v2 files.
//!
//! Layout under the agent's state root (/run/husk in the guest):
//! `storage/` (filesystems the host asks for; rootfs paths are relative to
//! it), `containers/<id>/` (config.json, overlay upper/work/rootfs, exec
//! process files), `libcontainer/` (libcontainer's own state).
//!
//! Every request is validated before anything is changed; a failed create
//! undoes what it did. Nothing here may panic: it runs in PID 1.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    ContainerInfo, ContainerRequest, CpuStats, CreateContainerRequest, CreateContainerResponse,
    Empty, ExecProcessRequest, ExecProcessResponse, ListContainersResponse, MemoryStats, OOMEvent,
    ProcessRequest, SignalProcessRequest, StatsContainerResponse, Storage, TtyWinResizeRequest,
    UpdateContainerRequest, WaitProcessResponse,
};
use libcontainer::container::Container;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, MountBuilder, Process, Spec};
use ttrpc::Code;

use crate::reaper::Reaper;
use crate::rpc::{causes, check_version, internal, invalid, status, time_left, Metadata};
use crate::spawner::{self, Spawner};
use crate::stream::Streams;

mod bare;
mod check;
mod held;
mod parked;
mod stats;
mod stdio;

pub use bare::check_bare;
pub use check::*;
pub use parked::{check_launch, ParkedExecutor};
use stats::*;
use stdio::*;

/// How long a create or exec waits for its stdio streams to connect, and
/// RemoveContainer for a killed container to exit, when the caller set no
/// deadline (with one, until just before it: `rpc::time_left`).
const STREAM_WAIT: Duration = Duration::from_secs(10);
const REMOVE_WAIT: Duration = Duration::from_secs(10);
/// A container's or exec's processes being made, without a deadline.
const BUILD_WAIT: Duration = Duration::from_secs(300);

/// A parked container's programs read into the page cache
/// (`CreateContainerRequest.warm`): at most this many, this many bytes.
const WARM_MAX: usize = 4;
pub(crate) const WARM_BUDGET: u64 = 64 << 20;

/// A parked container's programs, and what their first exec loads (their
/// interpreters and libraries: crate::warm), read into the page cache
/// before its template's snapshot (`CreateContainerRequest.warm`, a
/// hint): a clone's first exec maps pages already in memory, with no
/// drive reads. Returns where each program was found, for its launch.
fn warm_parked(req: &CreateContainerRequest, pid: i32, cwd: &Path) -> Option<LookedUp> {
    if req.warm.is_empty() {
        return None;
    }
    let _step = crate::profile::step("create.warm");
    let names = &req.warm[..req.warm.len().min(WARM_MAX)];
    let root = crate::executable::proc_root(pid)?;
    let found: Vec<(String, PathBuf)> = names
        .iter()
        .filter_map(|n| {
            crate::executable::find_program(&root, n, &req.warm_path, cwd).map(|p| (n.clone(), p))
        })
        .collect();
    let programs: Vec<PathBuf> = found.iter().map(|(_, p)| p.clone()).collect();
    crate::warm::warm(&root, &programs, &req.warm_path, WARM_BUDGET);
    Some(LookedUp {
        path: req.warm_path.clone(),
        found,
    })
}

/// Programs looked up in a parked container's root before its snapshot,
/// with the $PATH they were looked up with. Nothing has run in that root
/// since but its parked init (ours), so a launch of one of these names
/// with the same $PATH finds the same file: it is not looked up again.
struct LookedUp {
    path: String,
    found: Vec<(String, PathBuf)>,
}

impl LookedUp {
    /// Where `args[0]` was found, when it was looked up with `env`'s $PATH.
    fn get(&self, args: &[String], env: &[String]) -> Option<&Path> {
        let name = args.first()?;
        let path = crate::executable::path_of(env)?;
        if path != self.path {
            return None;
        }
        self.found
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_path())
    }
}

/// Where the agent keeps things.
#[derive(Clone, Debug)]
pub struct Dirs {
    pub root: PathBuf,
    /// The cgroup v2 mount (/sys/fs/cgroup).
    pub cgroup: PathBuf,
}

impl Dirs {
    pub fn storage(&self) -> PathBuf {
        self.root.join("storage")
    }
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
    pub fn libcontainer(&self) -> PathBuf {
        self.root.join("libcontainer")
    }
    pub fn sandbox(&self) -> PathBuf {
        self.root.join("sandbox")
    }
}

struct Proc {
    pid: i32,
    /// A handle on the stdin stream, for CloseStdin.
    stdin: Option<OwnedFd>,
    /// The terminal's master side, for TtyWinResize.
    tty: Option<Arc<OwnedFd>>,
}

struct Ctr {
    lc: Container,
    bundle: PathBuf,
    /// The overlay mounted at bundle/rootfs, if any.
    overlay: bool,
    storages: Vec<String>,
    cgroup: PathBuf,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// Exec ids whose processes are being made (the container's lock is not
    /// held meanwhile: WaitProcess, stats and signals go on).
    starting: std::collections::HashSet<String>,
    started: bool,
    /// A parked container's end of its init's socket, until its launch.
    parked: Option<OwnedFd>,
    /// A parked container's programs as looked up before its snapshot.
    looked_up: Option<LookedUp>,
    /// A launch given with `hold`, sent to the init by StartContainer.
    held_launch: Option<parked::HeldLaunch>,
    /// A parked container's thread in its UTS namespace, until its launch.
    namer: Option<parked::Namer>,
    /// The process's working directory (a launch's program lookup).
    cwd: PathBuf,
    /// When StartContainer ran the init, until its exit is reported (the
    /// profile's "run" step).
    started_at: Option<Instant>,
    paused: bool,
    /// Its init's mount and IPC namespaces (held.rs), until its removal.
    namespaces: Vec<OwnedFd>,
}

impl Ctr {
    /// Whether container `id` may be started now: not yet, and by
    /// LaunchContainer if and only if it is parked.
    fn may_start(&self, id: &str, launch: bool) -> ttrpc::Result<()> {
        let refused = |why: String| Err(status(Code::FAILED_PRECONDITION, why));
        match (self.started, self.parked.is_some(), launch) {
            (true, ..) => refused(format!("container {id:?} was started already")),
            (false, true, false) => refused(format!(
                "container {id:?} is parked: LaunchContainer gives it its process"
            )),
            (false, false, true) => refused(format!(
                "container {id:?} is not parked: StartContainer starts it"
            )),
            _ => Ok(()),
        }
    }

    /// Tells the created init to go on (StartContainer, LaunchContainer).
    fn start_init(&mut self, id: &str) -> ttrpc::Result<()> {
        let step = crate::profile::step("start");
        self.lc
            .start()
            .map_err(|e| internal(format!("start {id:?}: {}", causes(&e))))?;
        step.end();
        self.mark_started();
        Ok(())
    }

    /// Started from now on (the profile's "run" step starts here too).
    fn mark_started(&mut self) {
        self.started = true;
        self.started_at = Some(Instant::now());
    }

    /// The container's init process ("") or an exec'd one.
    fn process(&self, exec_id: &str) -> ttrpc::Result<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| not_found("exec", exec_id))
    }

    fn process_mut(&mut self, exec_id: &str) -> ttrpc::Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| not_found("exec", exec_id))
    }
}

#[derive(Default)]
struct Oom {
    events: VecDeque<String>,
    /// memory.events watch → (container id, cgroup, oom_kill count seen).
    watched: HashMap<WatchDescriptor, (String, PathBuf, u64)>,
}

pub struct ContainersService {
    dirs: Dirs,
    reaper: Arc<Reaper>,
    /// Makes the containers' processes (spawner.rs).
    spawner: Spawner,
    streams: Arc<Streams>,
    containers: Mutex<HashMap<String, Arc<Mutex<Ctr>>>>,
    /// Serializes creates, so ids and storages are checked and taken at once.
    creating: Mutex<()>,
    /// The first ids of renamed containers (LaunchContainer's new_id):
    /// their bundles and libcontainer state keep those names, so a create
    /// may not take them.
    renamed: Mutex<std::collections::HashSet<String>>,
    /// mount point (relative to storage/) → containers using it.
    storages: Mutex<HashMap<String, usize>>,
    oom: Mutex<Oom>,
    oom_changed: Condvar,
    /// Watches memory.events files: the kernel notifies on every change, so
    /// no thread polls (polling is emulated kernel work on this host).
    inotify: Option<Inotify>,
}

/// Steps slower than this are reported on the console with their time:
/// where the guest kernel is emulated, the first sign of a stall.
const SLOW_STEP: Duration = Duration::from_secs(10);

fn slow(since: Instant, what: &str) {
    let took = since.elapsed();
    if took > SLOW_STEP {
        eprintln!("husk-agent: {what} took {:.1} s", took.as_secs_f64());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Handlers never leave these maps half-updated across a panic point.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("no {what} {id:?}"))
}

/// How long a block device may take to show its capacity.
const CAPACITY_WAIT: Duration = Duration::from_secs(10);

/// Waits until block device `source` (`/dev/vdX`) has a non-zero size. A
/// sandbox restored from a template gets its drives' backing files with the
/// restore; the guest kernel learns their size from a config-change
/// interrupt handled on a workqueue, which may still be pending when the
/// first CreateContainer arrives. Sources without a sysfs size (not a block
/// device) are not waited for.
/// A storage the host asked for that could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{source_dev} has no capacity after {CAPACITY_WAIT:?}: no drive backs it")]
    NoCapacity { source_dev: String },
    #[error("{}", .path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {source_dev} ({fstype}) on {}", .target.display())]
    Mount {
        source_dev: String,
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl From<StorageError> for ttrpc::Error {
    fn from(e: StorageError) -> ttrpc::Error {
        let code = match e {
            StorageError::Invalid(_) => Code::INVALID_ARGUMENT,
            _ => Code::INTERNAL,
        };
        status(code, causes(&e))
    }
}

fn wait_for_capacity(source: &str) -> Result<(), StorageError> {
    let Some(name) = source.strip_prefix("/dev/") else {
        return Ok(());
    };
    let size_file = format!("/sys/class/block/{name}/size");
    let deadline = Instant::now() + CAPACITY_WAIT;
    loop {
        match std::fs::read_to_string(&size_file) {
            Err(_) => return Ok(()),
            Ok(s) if s.trim() != "0" => return Ok(()),
            Ok(_) if Instant::now() >= deadline => {
                return Err(StorageError::NoCapacity {
                    source_dev: source.into(),
                })
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl ContainersService {
    pub fn new(
        dirs: Dirs,
        reaper: Arc<Reaper>,
        streams: Arc<Streams>,
        spawner: Spawner,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            dirs,
            reaper,
            spawner,
            streams,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
            renamed: Mutex::default(),
            storages: Mutex::new(HashMap::new()),
            oom: Mutex::new(Oom::default()),
            oom_changed: Condvar::new(),
            inotify: Inotify::init(InitFlags::IN_CLOEXEC)
                .map_err(|e| eprintln!("husk-agent: inotify: {e}; no OOM events"))
                .ok(),
        });
        if me.inotify.is_some() {
            let bg = me.clone();
            std::thread::spawn(move || bg.watch_oom());
        }
        me
    }

    fn get(&self, id: &str) -> ttrpc::Result<Arc<Mutex<Ctr>>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("container", id))
    }

    /// Mounts a storage, or counts one more user of it.
    fn take_storage(&self, s: &Storage) -> Result<(), StorageError> {
        let (flags, data) = check_storage(s)?;
        let mut st = lock(&self.storages);
        if let Some(n) = st.get_mut(&s.mount_point) {
            *n += 1;
            return Ok(());
        }
        let target = self.dirs.storage().join(&s.mount_point);
        std::fs::create_dir_all(&target).map_err(|source| StorageError::Dir {
            path: target.clone(),
            source,
        })?;
        wait_for_capacity(&s.source)?;
        mount(
            Some(s.source.as_str()),
            &target,
            Some(s.fstype.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|source| StorageError::Mount {
            source_dev: s.source.clone(),
            fstype: s.fstype.clone(),
            target: target.clone(),
            source,
        })?;
        st.insert(s.mount_point.clone(), 1);
        Ok(())
    }

    /// One user fewer; unmounts with the last.
    fn release_storage(&self, point: &str) {
        let mut st = lock(&self.storages);
        let Some(n) = st.get_mut(point) else { return };
        *n -= 1;
        if *n == 0 {
            st.remove(point);
            let target = self.dirs.storage().join(point);
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                eprintln!("husk-agent: unmount {}: {e}", target.display());
            }
        }
    }

    fn create(&self, req: &CreateContainerRequest) -> ttrpc::Result<CreateContainerResponse> {
        let _create = crate::profile::step("create");
        let mut spec = check_create(req)?;
        let _one = lock(&self.creating);
        let id = &req.container_id;
        if lock(&self.containers).contains_key(id) || lock(&self.renamed).contains(id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id:?} exists"),
            ));
        }
        let bundle = self.dirs.containers().join(id);
        let mut undo = Undo {
            svc: self,
            bundle: bundle.clone(),
            lc_state: self.dirs.libcontainer().join(id),
            overlay: false,
            storages: Vec::new(),
        };
        if bundle.exists() {
            // Left over by a failed remove: it belongs to nobody now.
            let _ = umount2(&bundle.join("rootfs"), MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir_all(&bundle);
        }
        let _ = std::fs::remove_dir_all(&undo.lc_state);
        std::fs::create_dir_all(&bundle).map_err(|e| internal(format!("bundle: {e}")))?;
        let step = crate::profile::step("create.storage");
        for s in &req.storages {
            self.take_storage(s)?;
            undo.storages.push(s.mount_point.clone());
        }
        step.end();
        let step = crate::profile::step("create.rootfs");
        let rootfs = self.prepare_rootfs(&mut spec, req.overlay_rootfs, &mut undo)?;
        step.end();
        let step = crate::profile::step("create.spec");
        let cwd = spec
            .process()
            .as_ref()
            .map(|p| p.cwd().clone())
            .unwrap_or_else(|| PathBuf::from("/"));
        let cgroup_rel = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .unwrap_or_else(|| PathBuf::from(format!("/husk/{id}")));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some(cgroup_rel.clone()));
        spec.set_linux(Some(linux));
        self.resolve_bind_sources(&mut spec)?;
        self.add_sandbox_mounts(&mut spec, &rootfs, req.overlay_rootfs);
        if let Some(p) = spec.process().as_ref().filter(|_| !req.parked) {
            let mounts = spec.mounts().clone().unwrap_or_default();
            let scope = crate::executable::Scope::Create {
                rootfs: &rootfs,
                mounts: &mounts,
            };
            crate::executable::check(&scope, p)?;
        }
        let config = serde_json::to_vec_pretty(&spec).map_err(|e| internal(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), config)
            .map_err(|e| internal(format!("config.json: {e}")))?;
        step.end();

        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let stdio_req = req.stdio.clone().unwrap_or_default();
        let step = crate::profile::step("create.streams");
        let stdio = ProcStdio::claim(&self.streams, &stdio_req)?;
        step.end();
        let step = crate::profile::step("create.build");
        let (parked, init_end) = match req.parked {
            true => parked::socket().map(|(a, b)| (Some(a), Some(b)))?,
            false => (None, None),
        };
        let (mut lc, init) = self.spawn(&bundle, id, None, stdio, terminal, init_end)?;
        step.end();
        let own_netns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
            });
        if own_netns {
            let _step = crate::profile::step("create.loopback");
            if let Err(e) = crate::network::loopback_up_in(init.pid) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init.pid), Signal::SIGKILL);
                return Err(internal(causes(&e)));
            }
        }
        let cgroup = self
            .dirs
            .cgroup
            .join(cgroup_rel.strip_prefix("/").unwrap_or(&cgroup_rel));
        self.watch_oom_of(id, &cgroup);
        let pid = init.pid;
        let looked_up = req.parked.then(|| warm_parked(req, pid, &cwd)).flatten();
        let namespaces = held::hold(pid);
        // Made before the snapshot, so a launch only asks it (parked.rs).
        // Without one (the container shares the sandbox's UTS namespace, or
        // no thread could be made) a launch's host name is set as before.
        let namer = req.parked.then(|| parked::Namer::join(pid).ok()).flatten();
        if req.parked {
            // Started now, before the snapshot: the init goes past
            // libcontainer's wait for "start" and waits for its process in
            // the executor instead, so a launch only sends it (parked.rs).
            let _step = crate::profile::step("create.prestart");
            if let Err(e) = lc.start() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                // Reaped before its state and bundle go (Undo).
                let _ = self.reaper.wait(pid, Some(REMOVE_WAIT));
                self.reaper.forget(pid);
                self.unwatch_oom_of(id);
                let _ = std::fs::remove_dir(&cgroup);
                return Err(internal(format!("start {id:?}: {}", causes(&e))));
            }
        }
        let ctr = Ctr {
            lc,
            bundle,
            overlay: undo.overlay,
            storages: std::mem::take(&mut undo.storages),
            cgroup,
            init,
            execs: HashMap::new(),
            starting: Default::default(),
            started: false,
            parked,
            looked_up,
            held_launch: None,
            namer,
            cwd,
            started_at: None,
            paused: false,
            namespaces,
        };
        undo.disarm();
        lock(&self.containers).insert(id.clone(), Arc::new(Mutex::new(ctr)));
        Ok(CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    /// Resolves root.path under storage/, overlays it if asked, and points
    /// the spec at the result.
    fn prepare_rootfs(
        &self,
        spec: &mut Spec,
        overlay: bool,
        undo: &mut Undo,
    ) -> ttrpc::Result<PathBuf> {
        let storage = self.dirs.storage();
        let mut root = spec.root().clone().unwrap_or_default();
        let lower = storage.join(root.path());
        let real = lower
            .canonicalize()
            .map_err(|e| invalid(format!("root.path {}: {e}", root.path().display())))?;
        let storage_real = storage.canonicalize().unwrap_or(storage);
        if !real.starts_with(&storage_real) || !real.is_dir() {
            return Err(invalid(format!(
                "root.path {} is not a directory inside the storage directory",
                root.path().display()
            )));
        }
        let rootfs = if overlay {
            let b = &undo.bundle;
            for d in ["upper", "work", "rootfs"] {
                std::fs::create_dir_all(b.join(d)).map_err(|e| internal(e.to_string()))?;
            }
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                real.display(),
                b.join("upper").display(),
                b.join("work").display()
            );
            if data.contains(',') && data.matches(',').count() != 2 {
                return Err(invalid("paths must not contain ','"));
            }
            mount(
                Some("overlay"),
                &b.join("rootfs"),
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .map_err(|e| internal(format!("overlay rootfs: {e}")))?;
            undo.overlay = true;
            b.join("rootfs")
        } else {
            real
        };
        root.set_path(rootfs.clone());
        spec.set_root(Some(root));
        Ok(rootfs)
    }

    /// Bind mount sources (volumes) are relative to the storage directory,
    /// like root.path, and must resolve inside it: a container cannot be
    /// given the agent's own files or another container's layers.
    fn resolve_bind_sources(&self, spec: &mut Spec) -> ttrpc::Result<()> {
        let storage = self.dirs.storage();
        let storage_real = storage.canonicalize().unwrap_or_else(|_| storage.clone());
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for m in mounts.iter_mut().filter(|m| is_bind(m)) {
            let rel = m.source().clone().unwrap_or_default();
            let real = storage.join(&rel).canonicalize().map_err(|e| {
                invalid(format!(
                    "bind mount on {}: source {}: {e}",
                    m.destination().display(),
                    rel.display()
                ))
            })?;
            if !real.starts_with(&storage_real) {
                return Err(invalid(format!(
                    "bind mount on {}: source {} leaves the storage directory",
                    m.destination().display(),
                    rel.display()
                )));
            }
            m.set_source(Some(real));
        }
        spec.set_mounts(Some(mounts));
        Ok(())
    }

    /// The sandbox's hostname, resolv.conf and hosts, bind-mounted unless the
    /// spec mounts something there itself (Docker and Kata do the same).
    fn add_sandbox_mounts(&self, spec: &mut Spec, rootfs: &Path, writable: bool) {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for name in ["hostname", "resolv.conf", "hosts"] {
            let src = self.dirs.sandbox().join(name);
            let dest = PathBuf::from("/etc").join(name);
            let taken = mounts.iter().any(|m| m.destination() == &dest);
            // A read-only rootfs cannot grow the mount point.
            let target_ok = writable || rootfs.join("etc").join(name).exists();
            if taken || !src.is_file() || !target_ok {
                continue;
            }
            if let Ok(m) = MountBuilder::default()
                .destination(dest)
                .typ("bind")
                .source(src)
                .options(vec!["rbind".to_string(), "rprivate".to_string()])
                .build()
            {
                mounts.push(m);
            }
        }
        spec.set_mounts(Some(mounts));
    }

    /// Creates the init process (`exec` None) or an exec'd one, with the
    /// spawn lock held so the reaper cannot take libcontainer's children.
    fn spawn(
        &self,
        bundle: &Path,
        id: &str,
        exec: Option<&Path>,
        stdio: ProcStdio,
        terminal: bool,
        parked: Option<OwnedFd>,
    ) -> ttrpc::Result<(Container, Proc)> {
        let stdin_handle = (!terminal).then(|| stdio.stdin_handle()).flatten();
        let console = if terminal {
            let name = match exec {
                None => "console.sock".to_string(),
                Some(p) => format!(
                    "{}.console.sock",
                    p.file_stem().unwrap_or_default().to_string_lossy()
                ),
            };
            Some(ConsoleSocket::listen(bundle.join(name))?)
        } else {
            None
        };
        // With a terminal, the streams are relayed to and from it instead.
        let (tty_out, tty_in, stdio) = if terminal {
            let input = stdio.has_stdin.then_some(stdio.stdin);
            (Some(stdio.stdout), input, None)
        } else {
            (None, None, Some([stdio.stdin, stdio.stdout, stdio.stderr]))
        };
        let build = spawner::Build {
            id: id.to_string(),
            root: self.dirs.libcontainer(),
            bundle: bundle.to_path_buf(),
            exec: exec.map(Path::to_path_buf),
            console_socket: console.as_ref().map(|c| c.path.clone()),
            stdio,
            parked,
            trace: crate::profile::PROFILE.counting().then(|| {
                bundle.join(match exec {
                    None => "init.trace".to_string(),
                    Some(p) => format!(
                        "{}.trace",
                        p.file_stem().unwrap_or_default().to_string_lossy()
                    ),
                })
            }),
        };
        let t = Instant::now();
        let spawn = self.reaper.spawn_lock();
        slow(t, &format!("{id}: waiting to create processes"));
        let built = self
            .spawner
            .build(build, time_left(BUILD_WAIT))
            .map_err(|e| causes(&e))
            .and_then(|pid| {
                Container::load(self.dirs.libcontainer().join(id))
                    .map(|c| (c, pid))
                    .map_err(|e| format!("loading its state: {}", causes(&e)))
            });
        let (lc, pid) = match built {
            Ok(v) => v,
            Err(e) => {
                drop(spawn);
                if let Some(c) = console {
                    c.abandon();
                }
                return Err(internal(format!("creating the process: {e}")));
            }
        };
        self.reaper.watch(pid);
        drop(spawn);
        let tty = match console {
            None => None,
            Some(c) => {
                let master = Arc::new(c.master()?);
                if let Some(out) = tty_out {
                    relay_tty(master.clone(), out, tty_in);
                }
                Some(master)
            }
        };
        Ok((
            lc,
            Proc {
                pid,
                stdin: stdin_handle,
                tty,
            },
        ))
    }

    fn watch_oom_of(&self, id: &str, cgroup: &Path) {
        let (Some(ino), events) = (&self.inotify, cgroup.join("memory.events")) else {
            return;
        };
        // No memory controller (an agent on a host): no OOM events.
        let Ok(wd) = ino.add_watch(&events, AddWatchFlags::IN_MODIFY) else {
            return;
        };
        lock(&self.oom).watched.insert(
            wd,
            (id.to_string(), cgroup.to_path_buf(), oom_kills(cgroup)),
        );
    }

    fn unwatch_oom_of(&self, id: &str) {
        let mut oom = lock(&self.oom);
        let gone: Vec<_> = oom
            .watched
            .iter()
            .filter(|(_, (cid, ..))| cid == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            oom.watched.remove(&wd);
            if let Some(ino) = &self.inotify {
                let _ = ino.rm_watch(wd);
            }
        }
    }

    /// Turns memory.events changes into OOM events.
    fn watch_oom(&self) {
        let Some(ino) = &self.inotify else { return };
        loop {
            let events = match ino.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("husk-agent: inotify: {e}; no more OOM events");
                    return;
                }
            };
            let mut oom = lock(&self.oom);
            let mut fired = Vec::new();
            for ev in events {
                if let Some((id, cgroup, seen)) = oom.watched.get_mut(&ev.wd) {
                    let n = oom_kills(cgroup);
                    if n > *seen {
                        *seen = n;
                        fired.push(id.clone());
                    }
                }
            }
            if !fired.is_empty() {
                oom.events.extend(fired);
                self.oom_changed.notify_all();
            }
        }
    }

    fn state(&self, c: &Ctr) -> &'static str {
        if !self.reaper.running(c.init.pid) {
            "stopped"
        } else if c.paused {
            "paused"
        } else if c.started {
            "running"
        } else {
            "created"
        }
    }

    fn remove(&self, id: &str) -> ttrpc::Result<()> {
        let _step = crate::profile::step("remove");
        let arc = self.get(id)?;
        let mut c = lock(&arc);
        // Renamed (LaunchContainer's new_id) while this waited for it: it is
        // not `id` any more.
        if !lock(&self.containers)
            .get(id)
            .is_some_and(|a| Arc::ptr_eq(a, &arc))
        {
            return Err(not_found("container", id));
        }
        // Kill whatever is left, frozen or not (SIGKILL ends frozen tasks).
        self.signal_cgroup(&c, Signal::SIGKILL);
        let wait = crate::rpc::time_left(REMOVE_WAIT);
        if self.reaper.wait(c.init.pid, Some(wait)).is_none() {
            return Err(internal(format!(
                "container {id:?} did not exit within {wait:?} of SIGKILL"
            )));
        }
        // The init is reaped: libcontainer must not signal its (reusable)
        // pid, and its kill-all only walks the cgroup.
        if let Err(e) = c.lc.delete(true) {
            eprintln!("husk-agent: libcontainer delete {id}: {e}");
            let _ = std::fs::remove_dir_all(self.dirs.libcontainer().join(c.lc.id()));
            let _ = std::fs::remove_dir(&c.cgroup);
        }
        // Its mounts go now, before the storages they bind are released.
        c.namespaces.clear();
        if c.overlay {
            if let Err(e) = umount2(&c.bundle.join("rootfs"), MntFlags::MNT_DETACH) {
                return Err(internal(format!("unmount rootfs of {id:?}: {e}")));
            }
            c.overlay = false;
        }
        let _ = std::fs::remove_dir_all(&c.bundle);
        for s in std::mem::take(&mut c.storages) {
            self.release_storage(&s);
        }
        self.reaper.forget(c.init.pid);
        for p in c.execs.values() {
            self.reaper.forget(p.pid);
        }
        self.unwatch_oom_of(id);
        lock(&self.renamed).remove(c.lc.id());
        drop(c);
        lock(&self.containers).remove(id);
        Ok(())
    }

    /// Pauses (cgroup.freeze) or resumes a container.
    fn freeze(&self, id: &str, pause: bool) -> ttrpc::Result<()> {
        let arc = self.get(id)?;
        let mut c = lock(&arc);
        if !c.started {
            // A parked container's init runs already (it waits for its
            // process); the container is not started until its launch.
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id:?} is not running"),
            ));
        }
        let (what, r) = if pause {
            ("pause", c.lc.pause())
        } else {
            ("resume", c.lc.resume())
        };
        r.map_err(|e| status(Code::FAILED_PRECONDITION, format!("{what} {id:?}: {e}")))?;
        c.paused = pause;
        Ok(())
    }

    /// Signals every process in the container's cgroup.
    fn signal_cgroup(&self, c: &Ctr, sig: Signal) {
        let _spawn = self.reaper.spawn_lock();
        let procs = std::fs::read_to_string(c.cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
        // The init may not be in the cgroup yet (created, not started).
        if self.reaper.running(c.init.pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.init.pid), sig);
        }
    }

    fn stats(&self, c: &Ctr) -> StatsContainerResponse {
        let cpu = read_keyed(&c.cgroup.join("cpu.stat"));
        let mem = read_keyed(&c.cgroup.join("memory.stat"));
        let g = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: g(&cpu, "usage_usec"),
                user_usec: g(&cpu, "user_usec"),
                system_usec: g(&cpu, "system_usec"),
                nr_throttled: g(&cpu, "nr_throttled"),
                throttled_usec: g(&cpu, "throttled_usec"),
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage: read_u64(&c.cgroup.join("memory.current")).unwrap_or(0),
                // "max" (no limit) reads as 0.
                limit: read_u64(&c.cgroup.join("memory.max")).unwrap_or(0),
                anon: g(&mem, "anon"),
                file: g(&mem, "file"),
                oom_kill: oom_kills(&c.cgroup),
                ..Default::default()
            })
            .into(),
            pids_current: read_u64(&c.cgroup.join("pids.current")).unwrap_or(0),
            pids_limit: read_u64(&c.cgroup.join("pids.max")).unwrap_or(0),
            ..Default::default()
        }
    }
}

/// Undoes a half-done create when dropped armed.
struct Undo<'a> {
    svc: &'a ContainersService,
    bundle: PathBuf,
    /// libcontainer's state dir for the id (it cleans up after a failed
    /// build itself; this covers failures before it gets that far).
    lc_state: PathBuf,
    overlay: bool,
    storages: Vec<String>,
}

impl Undo<'_> {
    fn disarm(&mut self) {
        self.overlay = false;
        self.storages.clear();
        self.bundle = PathBuf::new();
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if self.bundle.as_os_str().is_empty() {
            return;
        }
        if self.overlay {
            let _ = umount2(&self.bundle.join("rootfs"), MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
        let _ = std::fs::remove_dir_all(&self.lc_state);
        for s in std::mem::take(&mut self.storages) {
            self.svc.release_storage(&s);
        }
    }
}

/// The RPCs, synchronous; `crate::server` serves them.
impl ContainersService {
    pub fn create_container(
        &self,
        meta: &Metadata,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        check_version(meta)?;
        self.create(&req)
    }

    pub fn start_container(&self, meta: &Metadata, req: ContainerRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let arc = self.get(&req.container_id)?;
        let mut c = lock(&arc);
        c.may_start(&req.container_id, false)?;
        match c.held_launch.take() {
            // A parked container launched with `hold`: its init is past
            // libcontainer's start already and waits for its process.
            Some(held) => {
                if let Err((e, held)) = c.send_launch(held) {
                    c.held_launch = Some(held);
                    return Err(e);
                }
            }
            None => c.start_init(&req.container_id)?,
        }
        Ok(Empty::new())
    }

    pub fn remove_container(&self, meta: &Metadata, req: ContainerRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        self.remove(&req.container_id)?;
        Ok(Empty::new())
    }

    pub fn exec_process(
        &self,
        meta: &Metadata,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        check_version(meta)?;
        let process = check_exec(&req)?;
        let arc = self.get(&req.container_id)?;
        let (bundle, init_pid, lc_id) = {
            let mut c = lock(&arc);
            if !c.started || !self.reaper.running(c.init.pid) {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {:?} is not running", req.container_id),
                ));
            }
            if c.execs.contains_key(&req.exec_id) || !c.starting.insert(req.exec_id.clone()) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} exists", req.exec_id),
                ));
            }
            (c.bundle.clone(), c.init.pid, c.lc.id().to_string())
        };
        let scope = crate::executable::Scope::Running { init_pid };
        let made = crate::executable::check(&scope, &process)
            .and_then(|_| self.make_exec(&bundle, &lc_id, &req, &process));
        let mut c = lock(&arc);
        c.starting.remove(&req.exec_id);
        let proc_ = made?;
        let pid = proc_.pid;
        c.execs.insert(req.exec_id.clone(), proc_);
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    /// An exec's streams and process, made without the container's lock.
    fn make_exec(
        &self,
        bundle: &Path,
        lc_id: &str,
        req: &ExecProcessRequest,
        process: &Process,
    ) -> ttrpc::Result<Proc> {
        let path = bundle.join(format!("exec-{}.json", req.exec_id));
        let json = serde_json::to_vec(process).map_err(|e| internal(e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| internal(format!("{}: {e}", path.display())))?;
        let terminal = process.terminal().unwrap_or(false);
        let t = Instant::now();
        let stdio = ProcStdio::claim(&self.streams, &req.stdio.clone().unwrap_or_default())
            .map_err(ttrpc::Error::from);
        slow(t, &format!("exec {}: its streams", req.exec_id));
        let t = Instant::now();
        let r =
            stdio.and_then(|stdio| self.spawn(bundle, lc_id, Some(&path), stdio, terminal, None));
        slow(t, &format!("exec {}: its process", req.exec_id));
        let _ = std::fs::remove_file(&path);
        r.map(|(_, p)| p)
    }

    pub fn signal_process(
        &self,
        meta: &Metadata,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let sig = i32::try_from(req.signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| invalid(format!("signal {} is not a signal", req.signal)))?;
        let arc = self.get(&req.container_id)?;
        let c = lock(&arc);
        // `all` is the container's every process; for an exec it means
        // only that exec, as runc's shim reads it: a timed-out ExecSync is
        // killed with all=true and must not take the container with it.
        if req.all && req.exec_id.is_empty() {
            self.signal_cgroup(&c, sig);
            return Ok(Empty::new());
        }
        let pid = c.process(&req.exec_id)?.pid;
        let _spawn = self.reaper.spawn_lock();
        if !self.reaper.running(pid) {
            return Err(status(Code::NOT_FOUND, format!("process {pid} has exited")));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| internal(format!("kill {pid}: {e}")))?;
        Ok(Empty::new())
    }

    pub fn wait_process(
        &self,
        meta: &Metadata,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        check_version(meta)?;
        let arc = self.get(&req.container_id)?;
        let (pid, cgroup) = {
            let c = lock(&arc);
            (c.process(&req.exec_id)?.pid, c.cgroup.clone())
        };
        let exit = self
            .reaper
            .wait(pid, None)
            .ok_or_else(|| not_found("process of", &req.container_id))?;
        if req.exec_id.is_empty() {
            if let Some(at) = lock(&arc).started_at.take() {
                // Start to exit as this handler learned it.
                crate::profile::PROFILE.record("run", at.elapsed().as_micros() as u64);
            }
        }
        Ok(WaitProcessResponse {
            status: exit.status,
            oom_killed: exit.status == 128 + libc::SIGKILL && oom_kills(&cgroup) > 0,
            exited_at_unix_nano: unix_nanos(exit.at),
            ..Default::default()
        })
    }

    pub fn stats_container(
        &self,
        meta: &Metadata,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        check_version(meta)?;
        let arc = self.get(&req.container_id)?;
        let c = lock(&arc);
        Ok(self.stats(&c))
    }

    pub fn update_container(
        &self,
        meta: &Metadata,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let resources: LinuxResources = serde_json::from_slice(&req.resources)
            .map_err(|e| invalid(format!("resources: {e}")))?;
        let arc = self.get(&req.container_id)?;
        let c = lock(&arc);
        let cgroup_path =
            c.lc.spec()
                .map_err(|e| internal(e.to_string()))?
                .cgroup_path;
        let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path,
            systemd_cgroup: false,
            container_name: req.container_id.clone(),
        })
        .map_err(|e| internal(format!("cgroup: {e}")))?;
        use libcgroups::common::CgroupManager;
        manager
            .apply(&libcgroups::common::ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| internal(format!("update {:?}: {e}", req.container_id)))?;
        Ok(Empty::new())
    }

    pub fn pause_container(&self, meta: &Metadata, req: ContainerRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        self.freeze(&req.container_id, true)?;
        Ok(Empty::new())
    }

    pub fn resume_container(&self, meta: &Metadata, req: ContainerRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        self.freeze(&req.container_id, false)?;
        Ok(Empty::new())
    }

    pub fn tty_win_resize(
        &self,
        meta: &Metadata,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let (rows, cols) = match (u16::try_from(req.rows), u16::try_from(req.cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => return Err(invalid("rows and cols must fit in 16 bits")),
        };
        let arc = self.get(&req.container_id)?;
        let c = lock(&arc);
        let p = c.process(&req.exec_id)?;
        let tty = p
            .tty
            .as_ref()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the process has no terminal"))?;
        set_winsize(tty, rows, cols)?;
        Ok(Empty::new())
    }

    pub fn close_stdin(&self, meta: &Metadata, req: ProcessRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let arc = self.get(&req.container_id)?;
        let mut c = lock(&arc);
        let p = c.process_mut(&req.exec_id)?;
        if let Some(fd) = p.stdin.take() {
            // Reads of the process now see end of file.
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read);
        }
        Ok(Empty::new())
    }

    pub fn get_oom_event(&self, meta: &Metadata, _req: Empty) -> ttrpc::Result<OOMEvent> {
        check_version(meta)?;
        let mut oom = lock(&self.oom);
        loop {
            if let Some(id) = oom.events.pop_front() {
                return Ok(OOMEvent {
                    container_id: id,
                    ..Default::default()
                });
            }
            oom = self
                .oom_changed
                .wait(oom)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn list_containers(
        &self,
        meta: &Metadata,
        _req: Empty,
    ) -> ttrpc::Result<ListContainersResponse> {
        check_version(meta)?;
        let all: Vec<_> = lock(&self.containers)
            .iter()
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        let mut containers: Vec<ContainerInfo> = all
            .into_iter()
            .map(|(id, arc)| {
                let c = lock(&arc);
                ContainerInfo {
                    container_id: id,
                    status: self.state(&c).to_string(),
                    pid: c.init.pid as u32,
                    ..Default::default()
                }
            })
            .collect();
        containers.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Ok(ListContainersResponse {
            containers,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_uses_the_templates_lookup_only_for_the_same_name_and_path() {
        let l = LookedUp {
            path: "/usr/bin:/bin".into(),
            found: vec![("sh".into(), "/bin/sh".into())],
        };
        let args = |a: &str| vec![a.to_string(), "-c".to_string()];
        let env = |p: &str| vec!["A=1".to_string(), format!("PATH={p}")];
        assert_eq!(
            l.get(&args("sh"), &env("/usr/bin:/bin")),
            Some(Path::new("/bin/sh"))
        );
        // Another name, another $PATH, or none: looked up again.
        assert_eq!(l.get(&args("ls"), &env("/usr/bin:/bin")), None);
        assert_eq!(l.get(&args("sh"), &env("/opt/bin:/bin")), None);
        assert_eq!(l.get(&args("sh"), &["A=1".to_string()]), None);
        assert_eq!(l.get(&[], &env("/usr/bin:/bin")), None);
        // The last PATH counts: it is the one the process gets.
        let two = |a: &str, b: &str| vec![format!("PATH={a}"), format!("PATH={b}")];
        assert_eq!(
            l.get(&args("sh"), &two("/opt/bin", "/usr/bin:/bin")),
            Some(Path::new("/bin/sh"))
        );
        assert_eq!(l.get(&args("sh"), &two("/usr/bin:/bin", "/opt/bin")), None);
    }
}
