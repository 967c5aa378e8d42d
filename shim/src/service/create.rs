//! Creating a task: the sandbox with its first container, or a pod's
//! container joining the running sandbox (the runtime's lifecycle).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::api::{self};
use husk_runtime::container::{join, ContainerError, ContainerSpec, Net, NotCreated, Root};
use log::{info, warn};

use crate::error::ShimError;
use crate::io::{Copies, Stdio};
use crate::pod::Identity;
use husk_runtime::util::{shown, IoContext};

use super::*;

/// How long a created task keeps its VM's place through the host's start
/// gate when it is not started: containerd's clients (ctr, the CRI plugin)
/// start a task right after creating it.
const START_SLOT_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// The shim's configuration from a create's runtime options, and the
/// runtime it names.
fn configured(
    options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> Result<(crate::config::ShimConfig, husk_runtime::Runtime), ShimError> {
    let conf = shim_config(options)?;
    let rt = conf.runtime()?;
    Ok((conf, rt))
}

/// The shim's configuration a create's runtime options name.
fn shim_config(
    options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> Result<crate::config::ShimConfig, ShimError> {
    let (type_url, options) =
        options.map_or(("", &[][..]), |o| (o.type_url.as_str(), &o.value[..]));
    crate::config::ShimConfig::find(type_url, options)
}

/// How a task's container is created.
enum How {
    /// With a sandbox of its own (a container of its own, or a pod's
    /// sandbox container that must run).
    Sandbox(crate::config::ShimConfig, husk_runtime::Runtime),
    /// A pod's first container, starting the pod's VM.
    FirstOfPod(
        crate::config::ShimConfig,
        husk_runtime::Runtime,
        crate::pod::PodPlan,
    ),
    /// Joining the pod's running VM.
    Join,
}

impl Service {
    pub(super) fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let bundle = PathBuf::from(&req.bundle);
        let spec: oci_spec::runtime::Spec =
            oci_spec::runtime::Spec::load(bundle.join("config.json"))?;
        let kind = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(CONTAINER_TYPE))
            .cloned();
        let netns = crate::spec::netns_path(&spec).filter(|p| !p.starts_with("/proc"));
        if kind.as_deref() == Some("sandbox") {
            if let Some(pid) = self.keep_pause(req, &spec, netns.clone())? {
                return Ok(pid);
            }
        }
        // Held while this create may start the pod's VM (the pod's first
        // container); let go at once by a container that joins.
        let mut starting = None;
        let how = if kind.as_deref() == Some("container") {
            let guard = self.starting.lock().unwrap_or_else(|p| p.into_inner());
            let pod = {
                let g = self.lock();
                g.pod.clone().filter(|_| g.sandbox.is_none())
            };
            match pod {
                Some(pod) => {
                    starting = Some(guard);
                    let (conf, rt) = configured(pod.options.as_ref())?;
                    How::FirstOfPod(conf, rt, pod)
                }
                None => How::Join,
            }
        } else {
            starting = Some(self.starting.lock().unwrap_or_else(|p| p.into_inner()));
            let (conf, rt) = configured(req.options.as_ref())?;
            How::Sandbox(conf, rt)
        };
        // A CRI pod's sandbox container that runs keeps its root shared
        // (its members join a running VM).
        let drive = match &how {
            How::Join => self.member_drive(&req.id, &req.rootfs),
            How::FirstOfPod(c, rt, _) => c
                .drive_root()
                .then(|| layer_drive(&req.id, &req.rootfs, &rt.cache_dir))
                .flatten(),
            How::Sandbox(c, rt) if kind.is_none() && c.drive_root() => {
                match crate::rootfs::worth_a_drive(&spec) {
                    Ok(()) => layer_drive(&req.id, &req.rootfs, &rt.cache_dir),
                    Err(why) => {
                        info!("{}: its root is shared over virtio-fs: {why}", req.id);
                        None
                    }
                }
            }
            How::Sandbox(..) => None,
        };
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).at(|| shown(&rootfs))?;
        for m in req.rootfs.iter().filter(|_| drive.is_none()) {
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
        let mounted = !req.rootfs.is_empty() && drive.is_none();
        // Undone when the container is not created.
        let unmount = || {
            if mounted {
                let _ = containerd_shim::mount::umount_recursive(rootfs.to_str(), libc::MNT_DETACH);
            }
        };
        let stdio = stdio_of(req);
        let r = match how {
            How::Join => self.join_sandbox(&req.id, spec, &rootfs, drive, &stdio),
            How::Sandbox(conf, rt) => guest_root(spec, drive, &rootfs).and_then(|root| {
                let pod = Identity::default();
                self.start_sandbox(&req.id, root, netns, &stdio, &conf, &rt, pod)
            }),
            How::FirstOfPod(conf, rt, pod) => {
                self.start_pod(&req.id, spec, drive, &rootfs, &stdio, (&conf, &rt), &pod)
            }
        };
        if r.is_err() {
            unmount();
        }
        let (pid, shares, copies) = r?;
        self.lock().containers.insert(
            req.id.clone(),
            Container {
                pause: false,
                bundle,
                rootfs: mounted.then_some(rootfs),
                shares,
                init: Process::created(pid, stdio, None),
                execs: HashMap::new(),
            },
        );
        // A container joining next finds this one (the pod's anchor).
        drop(starting);
        self.watch(req.id.clone(), String::new(), copies);
        Ok(pid)
    }

    /// A CRI pod's sandbox container kept rather than run, when the
    /// configuration puts roots on drives and the pod allows (`pod::plan`):
    /// its task's pid; None when it must run.
    fn keep_pause(
        &self,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
        netns: Option<PathBuf>,
    ) -> Result<Option<u32>, ShimError> {
        // The configuration only: the runtime's files are located by the
        // create that starts the VM, not by this one.
        let conf = shim_config(req.options.as_ref())?;
        if !conf.drive_root() {
            return Ok(None);
        }
        let plan = match crate::pod::plan(&req.id, spec, netns, req.options.clone().into_option()) {
            Ok(p) => p,
            Err(why) => {
                info!("{}: the pod's sandbox container runs: {why}", req.id);
                return Ok(None);
            }
        };
        let mut g = self.lock();
        if g.sandbox.is_some() || g.pod.is_some() {
            return Err(ShimError::Pod(format!(
                "{}: this shim has a pod already; a pod has one sandbox container",
                req.id
            )));
        }
        let pid = plan.pid;
        info!(
            "{}: the pod's sandbox container runs no process; its VM starts with its first container",
            req.id
        );
        g.pod = Some(plan);
        g.containers.insert(
            req.id.clone(),
            Container {
                pause: true,
                bundle: PathBuf::from(&req.bundle),
                rootfs: None,
                shares: Vec::new(),
                init: Process::created(pid, stdio_of(req), None),
                execs: HashMap::new(),
            },
        );
        Ok(Some(pid))
    }

    /// Starts the pod's VM with its first container: its spec made the
    /// same in every pod (so a container template holds it), the pod's
    /// host name, DNS and hosts given to the guest at its start.
    #[allow(clippy::too_many_arguments)]
    fn start_pod(
        &self,
        id: &str,
        spec: oci_spec::runtime::Spec,
        drive: Option<PathBuf>,
        rootfs: &Path,
        stdio: &Stdio,
        (conf, rt): (&crate::config::ShimConfig, &husk_runtime::Runtime),
        pod: &crate::pod::PodPlan,
    ) -> Result<(u32, Vec<usize>, Copies), ShimError> {
        let (spec, mut identity) = crate::pod::member_spec(spec, pod, None)?;
        // Named after the pod's sandbox container: what the shim cleans up
        // by when it died (`delete`), and the pod's, not its first
        // container's.
        identity.sandbox = Some(pod.pause.clone());
        if identity.hostname.is_none() {
            // As Docker names a container's host: 12 characters of the id
            // (a host name label is at most 63).
            identity.hostname = Some(pod.pause.chars().take(12).collect());
        }
        let root = guest_root(spec, drive, rootfs)?;
        let r = self.start_sandbox(id, root, pod.netns.clone(), stdio, conf, rt, identity);
        if r.is_ok() {
            if let Some(p) = self.lock().pod.as_mut() {
                p.anchor = Some(id.to_string());
            }
        }
        r
    }

    /// Starts the sandbox with this container (a pod's sandbox container,
    /// or a container of its own) and creates it there, through the
    /// runtime's lifecycle with the bundle as a shared root.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_sandbox(
        &self,
        id: &str,
        root: Root,
        netns: Option<PathBuf>,
        stdio: &Stdio,
        conf: &crate::config::ShimConfig,
        rt: &husk_runtime::Runtime,
        pod: Identity,
    ) -> Result<(u32, Vec<usize>, Copies), ShimError> {
        // The caller holds `starting`: no other start runs meanwhile, and
        // the pod's other tasks answer while this one (slow) does.
        if self.lock().sandbox.is_some() {
            return Err(ShimError::Pod(format!(
                "this shim's sandbox already runs; only containers of its CRI pod ({CONTAINER_TYPE}=container) can join it"
            )));
        }
        let entries = match &root {
            Root::Shared { shares, .. } | Root::Drive { shares, .. } => (0..shares.len()).collect(),
            Root::Image(_) => Vec::new(),
        };
        let mut c = ContainerSpec::with_root(id, root);
        // Under CRI the VM takes over the pod's namespace CNI set up; under
        // plain ctr, like runc: loopback only.
        c.net = Net::Pod(netns);
        c.sandbox_id = pod.sandbox;
        c.hostname = pod.hostname;
        c.dns = pod.dns;
        c.hosts = pod.hosts;
        conf.apply(&mut c.machine);
        // Kept so that a container that cannot be created comes with what
        // the guest printed about it.
        c.console_log = true;
        let created = c
            .plan(None)?
            .acquire(None, None)?
            .start(rt)?
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
        let t = container.timings();
        let (mut sandbox, mut streams, _no_leases) = container.into_parts();
        let start_slot = sandbox.take_start_slot();
        let copies = Copies::start(stdio, &mut streams, &self.owner(id))?;
        let s = &t.sandbox;
        info!(
            "{id}: created in sandbox (VMM pid {}, parked: {:?}) in {:?}: start gate {:?}, \
             template {:?}, agent ready {:?}, identity {:?}, park {:?}, create {:?}",
            sandbox.vmm_pid(),
            t.parked,
            t.sandbox_total + t.create_start,
            s.gate,
            s.template,
            s.agent_ready,
            s.identity,
            s.park,
            t.create_start,
        );
        if let Ok(conn) = sandbox.connect() {
            self.watch_oom(conn);
        }
        let mut g = self.lock();
        g.sandbox = Some(sandbox);
        g.layers = conf.drive_root().then(|| rt.cache_dir.join("layers"));
        if start_slot.is_some() {
            g.start_slot = start_slot;
            // Given back at the task's start; bounded, for a client that
            // creates a task and never starts it (every other start on
            // the host would wait for it).
            let svc = self.clone();
            std::thread::spawn(move || {
                std::thread::sleep(START_SLOT_HOLD);
                drop(svc.lock().start_slot.take());
            });
        }
        Ok((pid, entries, copies))
    }

    /// The erofs of a joining container's layers, for a drive slot of the
    /// running sandbox; None (its root is shared) when the pod's
    /// configuration keeps roots shared or its root is not one overlay of
    /// layers.
    fn member_drive(
        &self,
        id: &str,
        mounts: &[containerd_shim::protos::types::mount::Mount],
    ) -> Option<PathBuf> {
        let cache = self.lock().layers.clone()?;
        match crate::rootfs::erofs(mounts, &cache) {
            Ok(erofs) => Some(erofs),
            Err(why) => {
                info!("{id}: its root is shared over virtio-fs: {why}");
                None
            }
        }
    }

    /// Creates a container of the pod in its running sandbox: its root
    /// (the erofs `drive` in a free drive slot, else `rootfs` shared) and
    /// binds are added to the sandbox first.
    pub(super) fn join_sandbox(
        &self,
        id: &str,
        spec: oci_spec::runtime::Spec,
        rootfs: &Path,
        drive: Option<PathBuf>,
        stdio: &Stdio,
    ) -> Result<(u32, Vec<usize>, Copies), ShimError> {
        // The shares are added under the lock; the (slow) create runs on a
        // connection of its own, so the pod's other tasks answer meanwhile.
        let joining = {
            let mut g = self.lock();
            let spec = match &g.pod {
                Some(pod) => {
                    // The pod's namespaces are its first container's while
                    // it runs; after it, a member gets its own.
                    let anchor = pod
                        .anchor
                        .as_ref()
                        .and_then(|a| g.containers.get(a))
                        .filter(|c| c.init.exit.is_none())
                        .map(|c| c.init.pid);
                    crate::pod::member_spec(spec, pod, anchor)?.0
                }
                None => spec,
            };
            let pids: Vec<u32> = g
                .containers
                .values()
                .filter(|c| !c.pause)
                .map(|c| c.init.pid)
                .collect();
            let guest = crate::spec::for_guest(spec, drive.is_none().then_some(rootfs), &pids)?;
            let sandbox = g.sandbox.as_mut().ok_or_else(|| {
                ShimError::Pod(format!(
                    "{id} is a pod's container but its pod's sandbox is not running"
                ))
            })?;
            join(sandbox, id, guest.spec, &guest.shares, drive.as_deref())?
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
}

/// A create's stdio.
fn stdio_of(req: &api::CreateTaskRequest) -> Stdio {
    Stdio {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    }
}

/// The erofs of a container's layers in the runtime's layer cache, or
/// None (logged why) when its root stays shared.
fn layer_drive(
    id: &str,
    mounts: &[containerd_shim::protos::types::mount::Mount],
    cache_dir: &Path,
) -> Option<PathBuf> {
    layer_erofs(id, mounts, &cache_dir.join("layers"))
}

fn layer_erofs(
    id: &str,
    mounts: &[containerd_shim::protos::types::mount::Mount],
    layers: &Path,
) -> Option<PathBuf> {
    match crate::rootfs::erofs(mounts, layers) {
        Ok(erofs) => Some(erofs),
        Err(why) => {
            info!("{id}: its root is shared over virtio-fs: {why}");
            None
        }
    }
}

/// A container's root for its own sandbox: the erofs of its layers on a
/// drive when there is one, else containerd's mount shared; its binds
/// shared either way.
fn guest_root(
    spec: oci_spec::runtime::Spec,
    drive: Option<PathBuf>,
    rootfs: &Path,
) -> Result<Root, ShimError> {
    let g = crate::spec::for_guest(spec, drive.is_none().then_some(rootfs), &[])?;
    Ok(match drive {
        Some(erofs) => {
            let mut spec = g.spec;
            // containerd's cgroupsPath names the container (/<ns>/<id>); in
            // a guest of its own the agent's default does as well, and the
            // spec, with it, is the same for every run of the image: what
            // a container template is keyed on.
            if let Some(mut linux) = spec.linux().clone() {
                linux.set_cgroups_path(None);
                spec.set_linux(Some(linux));
            }
            Root::Drive {
                spec: Box::new(spec),
                erofs,
                shares: g.shares,
            }
        }
        None => Root::Shared {
            spec: Box::new(g.spec),
            shares: g.shares,
        },
    })
}
