//! One container lifecycle for every front end that runs an image from the
//! store: `husk run` and huskd's executor translate their input into a
//! [`ContainerSpec`] and go through the same phases; storage leases, drive
//! slots, the microVM's size, the container's mounts and the teardown exist
//! here once.
//!
//! Each phase is its own call, so a front end keeps its own steps between
//! them (the CLI writes its record before anything is leased; huskd checks
//! for a stop and reports progress) and can tell its errors apart by phase
//! (a plan refused is huskd's Rejected; a create refused is the CLI's 127):
//!
//! ```text
//! ContainerSpec --plan--> Plan --acquire--> Prepared --start--> Starting --create--> Container
//!   (pure: OCI spec,         (erofs root,       (the sandbox:     (CreateContainer    wait, remove
//!    mounts, sizing)          volume leases)     its VM)           + StartContainer)
//! ```

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_protocol::agent::WaitProcessResponse;
use oci_spec::runtime::{MountBuilder, Spec};

use crate::config::Runtime;
use crate::container::control::Control;
use crate::container::record::{LogWriter, NetInfo};
use crate::container::spec::{container_spec, ProcessOptions};
use crate::container::{ContainerError, Result};
use crate::guest::GuestError;
use crate::guest::{AgentConn, Io, Launch, Streams};
use crate::image::{ImageRecord, ImageStore};
use crate::net::ports::PortMapping;
use crate::net::NetworkMode;
use crate::sandbox::{
    check_id, Boot, DriveSpec, Machine, Park, Sandbox, SandboxConfig, StartTimes, PARKED_ID,
};
use crate::storage::shared::{guest_source, HostShare};
use crate::storage::volume::{VolumeLease, VolumeStore};

/// What a mount mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountSource {
    /// A named volume (created on first use): ext4 on a read-write slot.
    Volume(String),
    /// A host path, shared over virtio-fs.
    Host(PathBuf),
    Tmpfs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: MountSource,
    /// Absolute, not `/`, without `..`.
    pub target: String,
    pub read_only: bool,
}

/// Which network the container's sandbox joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Net {
    /// The bridge, with these host ports relayed to the container.
    Bridge(Vec<PortMapping>),
    /// None: the container has only loopback (a network namespace of its
    /// own in the guest).
    None,
    /// A network namespace someone else set up (CRI's pod namespace with
    /// CNI's veth), taken over by the VM; without one, loopback only (as
    /// runc under plain `ctr`).
    Pod(Option<PathBuf>),
}

/// What a container's root filesystem is.
#[derive(Clone, Debug)]
pub enum Root {
    /// An image from the store: its erofs on a read-only drive slot, with
    /// a tmpfs overlay in the guest.
    Image(ImageRecord),
    /// A complete OCI spec whose root and binds are host paths shared over
    /// virtio-fs and written in place: a containerd bundle, as the shim
    /// translates it (its `shares[i]` is `storage::shared::guest_source(i)`).
    Shared {
        spec: Box<Spec>,
        shares: Vec<HostShare>,
    },
    /// A complete OCI spec whose root is an erofs file (a containerd
    /// snapshot's layers, made one image by the shim) on a read-only drive
    /// slot with a tmpfs overlay in the guest, as an image's; its binds are
    /// shares (`shares[i]` is `guest_source(i)`). Writes to the root stay
    /// in the guest.
    Drive {
        spec: Box<Spec>,
        erofs: PathBuf,
        shares: Vec<HostShare>,
    },
}

/// What fills drive slot 0: the container's root, when it is a drive.
#[derive(Clone, Debug)]
enum RootDrive {
    /// An image from the store (its erofs built on first use).
    Image(ImageRecord),
    /// An erofs file made elsewhere.
    Erofs(PathBuf),
}

/// A container's resolv.conf: what its pod's is (CRI's DNS config).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Limits, which also size the microVM: memory plus room for the guest,
/// vCPUs enough for the CPU limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory: Option<i64>,
    /// Billionths of a CPU (Docker's NanoCPUs).
    pub nano_cpus: Option<i64>,
}

/// A container to run, in a sandbox of its own.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// The container's and (unless `sandbox_id`) its sandbox's id.
    pub id: String,
    /// Its sandbox's id, when not the container's (a CRI pod's VM is
    /// named after the pod's sandbox container, which its shim cleans up
    /// by).
    pub sandbox_id: Option<String>,
    /// Default: an image's container the id's first 12 characters (as
    /// Docker's), a shared root's its spec's hostname, else the id.
    pub hostname: Option<String>,
    pub root: Root,
    /// Command, entrypoint, env, workdir, user, tty of an image's
    /// container; its hostname, memory, cpus and network fields are set
    /// from this spec. A shared root's spec has its own process.
    pub process: ProcessOptions,
    /// In order; host paths are shared in this order. An image's only (a
    /// shared root brings its binds as shares).
    pub mounts: Vec<Mount>,
    pub net: Net,
    /// Name servers, search domains and options for its resolv.conf;
    /// None: the host's servers.
    pub dns: Option<Dns>,
    /// /etc/hosts lines besides localhost and its own address.
    pub hosts: Vec<String>,
    pub resources: Resources,
    /// The machine before sizing for `resources` (a shim's configured one).
    pub machine: Machine,
    pub boot: Boot,
    /// Keep the guest console in the sandbox's directory.
    pub console_log: bool,
}

impl ContainerSpec {
    pub fn new(id: &str, image: ImageRecord) -> ContainerSpec {
        ContainerSpec::with_root(id, Root::Image(image))
    }

    pub fn with_root(id: &str, root: Root) -> ContainerSpec {
        ContainerSpec {
            id: id.into(),
            sandbox_id: None,
            hostname: None,
            root,
            process: ProcessOptions::default(),
            mounts: Vec::new(),
            net: Net::Bridge(Vec::new()),
            dns: None,
            hosts: Vec::new(),
            resources: Resources::default(),
            machine: Machine::default(),
            boot: Boot::default(),
            console_log: false,
        }
    }

    /// Phase 1, no side effects: the OCI spec (image config, options,
    /// mounts) and the sandbox's configuration (network, shares, size). An
    /// image's container needs the store.
    pub fn plan(self, store: Option<&ImageStore>) -> Result<Plan> {
        check_id(&self.id)?;
        let (oci, drive, mounts) = match &self.root {
            Root::Image(image) => {
                let store = store.ok_or(ContainerError::NeedsStore(
                    "an image's container needs the image store",
                ))?;
                let hostname = self.hostname.clone();
                let hostname = hostname.unwrap_or_else(|| self.id.chars().take(12).collect());
                let mut opts = self.process.clone();
                opts.hostname = Some(hostname);
                opts.memory = self.resources.memory;
                opts.cpus = self.resources.nano_cpus.map(|n| n as f64 / 1e9);
                opts.own_network = self.net == Net::None;
                let mut oci = container_spec(&store.config(image)?, &opts, "image")?;
                let mounts = plan_mounts(&self.mounts)?;
                let mut specs = oci.mounts().clone().unwrap_or_default();
                specs.extend(mounts.oci.iter().cloned());
                oci.set_mounts(Some(specs));
                (oci, Some(RootDrive::Image(image.clone())), mounts)
            }
            Root::Shared { spec, shares } | Root::Drive { spec, shares, .. } => {
                if !self.mounts.is_empty() {
                    return Err(ContainerError::Invalid(
                        "a spec's container brings its binds as shares: mounts are an image's"
                            .into(),
                    ));
                }
                let mut mounts = plan_mounts(&[])?;
                mounts.shares = shares.clone();
                let mut oci = (**spec).clone();
                let drive = match &self.root {
                    Root::Drive { erofs, .. } => {
                        // Where the agent mounts drive 0 (container_storage).
                        let mut root = oci.root().clone().unwrap_or_default();
                        root.set_path(PathBuf::from("image"));
                        oci.set_root(Some(root));
                        Some(RootDrive::Erofs(erofs.clone()))
                    }
                    _ => None,
                };
                (oci, drive, mounts)
            }
        };
        let mut cfg = SandboxConfig::new(self.sandbox_id.as_deref().unwrap_or(&self.id));
        cfg.hostname = match (&self.hostname, &self.root) {
            (Some(h), _) => h.clone(),
            (None, Root::Image(_)) => self.id.chars().take(12).collect(),
            (None, Root::Shared { .. } | Root::Drive { .. }) => spec_hostname(&oci, &self.id),
        };
        cfg.machine = self.machine;
        cfg.boot = self.boot;
        cfg.console_log = self.console_log;
        cfg.shares = mounts.shares;
        if let Some(dns) = self.dns {
            cfg.dns_servers = dns.servers;
            cfg.dns_search = dns.search;
            cfg.dns_options = dns.options;
        }
        cfg.hosts = self.hosts;
        match self.net {
            Net::Bridge(ports) => cfg.ports = ports,
            Net::None => cfg.network = NetworkMode::None,
            Net::Pod(netns) => {
                cfg.network = NetworkMode::None;
                cfg.netns = netns;
            }
        }
        cfg.fit_memory(&oci);
        if let Some(n) = self.resources.nano_cpus {
            cfg.fit_cpus(n);
        }
        Ok(Plan {
            id: self.id,
            oci,
            config: cfg,
            drive,
            volumes: mounts.volumes,
            mounted: mounts.mounted,
        })
    }
}

/// What `plan_mounts` makes of a spec's mounts.
struct Planned {
    oci: Vec<oci_spec::runtime::Mount>,
    volumes: Vec<String>,
    shares: Vec<HostShare>,
    mounted: Vec<(String, String, bool)>,
}

/// The OCI mounts of `mounts`: a tmpfs as such; a volume bound from where
/// the agent mounts its drive (`vol-<name>`); a host path from its share.
fn plan_mounts(mounts: &[Mount]) -> Result<Planned> {
    let mut p = Planned {
        oci: Vec::new(),
        volumes: Vec::new(),
        shares: Vec::new(),
        mounted: Vec::new(),
    };
    for m in mounts {
        check_target(&m.target)?;
        let (typ, source, mut options) = match &m.source {
            MountSource::Tmpfs => ("tmpfs", "tmpfs".to_string(), vec!["nosuid", "nodev"]),
            MountSource::Volume(name) => {
                crate::storage::volume::check_name(name)?;
                if p.volumes.contains(name) {
                    return Err(ContainerError::Invalid(format!(
                        "volume {name} is mounted twice"
                    )));
                }
                p.volumes.push(name.clone());
                // Records name a volume by name, a host path by itself.
                p.mounted
                    .push((name.clone(), m.target.clone(), m.read_only));
                ("bind", format!("vol-{name}"), vec!["rbind"])
            }
            MountSource::Host(path) => {
                p.shares.push(HostShare {
                    source: path.clone(),
                    read_only: m.read_only,
                });
                p.mounted
                    .push((path.display().to_string(), m.target.clone(), m.read_only));
                ("bind", guest_source(p.shares.len() - 1), vec!["rbind"])
            }
        };
        if m.read_only {
            options.push("ro");
        } else if typ == "bind" {
            options.push("rw");
        }
        p.oci.push(
            MountBuilder::default()
                .destination(&m.target)
                .typ(typ)
                .source(source)
                .options(options.into_iter().map(String::from).collect::<Vec<_>>())
                .build()?,
        );
    }
    Ok(p)
}

/// A mount's path in the container: absolute, not `/`, without `..`.
pub fn check_target(target: &str) -> Result<()> {
    if !target.starts_with('/') || target == "/" || target.split('/').any(|c| c == "..") {
        return Err(ContainerError::Invalid(format!(
            "mount target {target:?}: the container path must be absolute, not / and without .."
        )));
    }
    Ok(())
}

/// A container planned: nothing on the host touched yet.
pub struct Plan {
    pub id: String,
    /// The container's OCI spec.
    pub oci: Spec,
    /// Its sandbox's configuration (drives are added by `acquire`).
    pub config: SandboxConfig,
    /// A root on a drive: what fills drive slot 0.
    drive: Option<RootDrive>,
    volumes: Vec<String>,
    /// (volume name or host path, target, read-only) of its volumes and
    /// binds, in order: what records and `inspect` show.
    pub mounted: Vec<(String, String, bool)>,
}

impl Plan {
    /// Phase 2: the image's erofs root (built on first use) and a lease on
    /// each volume (created if missing), in the sandbox's drive slots. A
    /// shared root needs neither store.
    pub fn acquire(
        mut self,
        store: Option<&ImageStore>,
        volumes: Option<&VolumeStore>,
    ) -> Result<Prepared> {
        self.config.drives.clear();
        if let Some(drive) = &self.drive {
            let rootfs = match drive {
                RootDrive::Image(image) => store
                    .ok_or(ContainerError::NeedsStore(
                        "an image's container needs the image store",
                    ))?
                    .rootfs(image)?,
                RootDrive::Erofs(path) => path.clone(),
            };
            self.config.park = self.parkable().then(|| Park::new(&self.oci, &rootfs));
            self.config.drives.push(DriveSpec {
                path: rootfs,
                read_only: true,
            });
        }
        let leases = self.lease_volumes(volumes)?;
        self.config.drives.extend(leases.iter().map(|l| DriveSpec {
            path: l.volume.disk.clone(),
            read_only: false,
        }));
        Ok(Prepared { plan: self, leases })
    }

    /// Whether its container can be parked (`Boot::Parked`): a root on a
    /// drive, without volumes or host paths (drives and shares are the
    /// run's own), a terminal, a seccomp filter, OCI hooks (a parked
    /// container is started before its template's snapshot, so its start
    /// hooks would run once per template, not per run), or more args and
    /// environment than a launch carries, and with a UTS namespace of its
    /// own (the parked container's host name is the template's until the
    /// launch sets the run's). Resource limits are applied at create, and
    /// are part of the template's key like the rest of the spec.
    fn parkable(&self) -> bool {
        let Some(p) = self.oci.process() else {
            return false;
        };
        // Measured as the agent does: the message to the parked init.
        let launch = serde_json::json!({"args": p.args(), "env": p.env()})
            .to_string()
            .len();
        let linux = self.oci.linux().as_ref();
        let own_uts = linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| {
                n.iter().any(|n| {
                    n.typ() == oci_spec::runtime::LinuxNamespaceType::Uts && n.path().is_none()
                })
            });
        self.config.boot == Boot::Parked
            && self.drive.is_some()
            && own_uts
            && self.volumes.is_empty()
            && self.config.shares.is_empty()
            && !p.terminal().unwrap_or(false)
            && linux.is_none_or(|l| l.seccomp().is_none())
            && self.oci.hooks().is_none()
            && launch <= husk_protocol::MAX_LAUNCH_BYTES
    }

    /// A lease on each of the plan's named volumes, in order.
    fn lease_volumes(&self, volumes: Option<&VolumeStore>) -> Result<Vec<VolumeLease>> {
        if self.volumes.is_empty() {
            return Ok(Vec::new());
        }
        let volumes = volumes.ok_or(ContainerError::NeedsStore("volumes need the volume store"))?;
        Ok(self
            .volumes
            .iter()
            .map(|name| volumes.lease(name))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// The container this plan started, found again after the process
    /// that started it went (huskd restarted): its sandbox held again
    /// ([`Runtime::find_sandbox`]) and its volumes leased again. It has no
    /// streams: its output goes where its start sent it. On an error the
    /// sandbox is left for [`Runtime::remove_left`].
    pub fn find(self, rt: &Runtime, volumes: Option<&VolumeStore>) -> Result<Container> {
        let leases = self.lease_volumes(volumes)?;
        Container::find(rt, &self.id, leases)
    }
}

/// A container's storage held: its sandbox can start.
pub struct Prepared {
    plan: Plan,
    leases: Vec<VolumeLease>,
}

impl Prepared {
    /// Phase 3: the sandbox (its VM restored or booted, its agent ready),
    /// holding its place through the host's start gate until its container
    /// is made (`Starting::create`; after `create_only`, the caller's
    /// `Sandbox::take_start_slot`).
    pub fn start(self, rt: &Runtime) -> Result<Starting> {
        let t = Instant::now();
        let sandbox = rt.start_sandbox_held(&self.plan.config)?;
        Ok(Starting {
            sandbox,
            leases: self.leases,
            started: t.elapsed(),
            plan: self.plan,
        })
    }
}

/// A container's sandbox running, the container not created yet.
pub struct Starting {
    // The sandbox first: fields drop in order, and a volume's lease must
    // outlive the VM that writes it.
    sandbox: Sandbox,
    leases: Vec<VolumeLease>,
    plan: Plan,
    started: Duration,
}

/// What [`Starting::bare_exec`] measured.
#[derive(Debug, Clone, Copy)]
pub struct BareExec {
    /// As WaitProcess reports it.
    pub status: i32,
    /// The host's time for the call, less `setup`.
    pub host: Duration,
    /// The guest's fork-to-reaped time.
    pub guest: Duration,
    /// The guest's time mounting the image, reading the program into its
    /// page cache and unmounting: a parked start has those done before.
    pub setup: Duration,
}

impl Starting {
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The container's control handle before it exists, for a stop that
    /// may come while it is created (its signals are refused until then).
    pub fn control(&self) -> Result<Control> {
        Ok(Control::new(self.sandbox.connect()?, &self.plan.id))
    }

    /// One fork+exec of `args` in the image's root, outside any container
    /// (no namespaces, cgroup, overlay, seccomp): the floor bench/run
    /// measures a container's start against. The program and what it loads
    /// are read into the page cache first with `warm`, as a container
    /// template's are.
    pub fn bare_exec(&mut self, args: &[String], warm: bool) -> Result<BareExec> {
        // Its command is not a start: the next start may go.
        self.sandbox.started();
        if self.plan.drive.is_none() {
            return Err(ContainerError::Invalid(
                "a bare exec needs a root on a drive".into(),
            ));
        }
        let root = self
            .plan
            .oci
            .root()
            .as_ref()
            .map(|r| r.path().display().to_string())
            .unwrap_or_default();
        let t = Instant::now();
        let (status, guest, setup) =
            self.sandbox
                .agent
                .bare_exec(self.sandbox.container_storage(&[]), &root, args, warm)?;
        // The image's mount and the warm read are a parked container's
        // template build's work, not its start's.
        Ok(BareExec {
            status,
            host: t.elapsed().saturating_sub(setup),
            guest,
            setup,
        })
    }

    /// A stop that came before the container did: the guest shuts down.
    pub fn abandon(mut self, timeout: Duration) -> Result<()> {
        self.sandbox.started();
        Ok(self.sandbox.end(timeout)?)
    }

    /// Phase 4: CreateContainer and StartContainer, with `io`'s streams
    /// (a parked container: LaunchContainer). A refusal is the agent's
    /// [`crate::guest::RpcError`], with its code.
    pub fn create(self, io: Io) -> Result<Container> {
        let mut c = if let Some(pid) = self.sandbox.parked.pid() {
            self.launch(pid, io, false)?
        } else {
            let t = Instant::now();
            let mut c = self.create_only(io)?;
            c.sandbox.agent.start(&c.id)?;
            c.created = t.elapsed();
            c
        };
        c.sandbox.started();
        Ok(c)
    }

    /// The parked container's process given and started (with `hold`,
    /// given only: StartContainer starts it), and its id made the plan's.
    fn launch(self, pid: u32, io: Io, hold: bool) -> Result<Container> {
        let process = self.plan.oci.process().clone().unwrap_or_default();
        let launch = Launch {
            args: process.args().clone().unwrap_or_default(),
            env: process.env().clone().unwrap_or_default(),
            // A spec without one has the sandbox's, as a container created
            // in it would (its UTS namespace starts as a copy of the guest's).
            hostname: match self.plan.oci.hostname().as_deref() {
                Some(h) if !h.is_empty() => h.to_owned(),
                _ => self.plan.config.hostname.clone(),
            },
            new_id: self.plan.id.clone(),
            hold,
        };
        let t = Instant::now();
        let made = self.sandbox.agent.launch(PARKED_ID, &launch, io);
        if let Err(e) = &made {
            // The run's own program missing or not executable says nothing
            // of the template; anything else may be the template's, and
            // would fail every run restored from it.
            let program = crate::guest::find_rpc(e).is_some_and(|r| {
                r.is(husk_protocol::detail::PROGRAM_NOT_FOUND)
                    || r.is(husk_protocol::detail::PROGRAM_NOT_EXECUTABLE)
            });
            if !program {
                self.sandbox.forget_parked_template();
            }
        }
        self.made(t, made.map(|streams| (pid, streams)))
    }

    /// CreateContainer only (containerd starts a task separately): a root
    /// on a drive with an overlay, a shared root written in place; a parked
    /// container is given its process, held until StartContainer. A
    /// refusal is a [`NotCreated`] (with the guest's console when the spec
    /// kept it), around the agent's [`crate::guest::RpcError`].
    pub fn create_only(self, io: Io) -> Result<Container> {
        // An agent of an older guest image would start the process at
        // once: its parked container is left idle and this one created.
        if let Some(pid) = self.sandbox.parked.pid() {
            if self.sandbox.agent.launch_holds() {
                return self.launch(pid, io, true);
            }
        }
        let (storage, overlay) = match self.plan.drive {
            Some(_) => (self.sandbox.container_storage(&self.plan.volumes), true),
            None => (self.sandbox.shared_storage().into_iter().collect(), false),
        };
        let t = Instant::now();
        let created =
            self.sandbox
                .agent
                .create_only(&self.plan.id, &self.plan.oci, io, storage, overlay);
        self.made(t, created)
    }

    /// The container the agent made since `t` (its init's pid and its
    /// streams), or a [`NotCreated`] with the logs the spec kept.
    fn made(
        self,
        t: Instant,
        made: std::result::Result<(u32, Streams), GuestError>,
    ) -> Result<Container> {
        let (pid, streams) = match made {
            Ok(x) => x,
            Err(error) => {
                let logs = self.plan.config.console_log.then(|| self.sandbox.logs());
                return Err(NotCreated { error, logs }.into());
            }
        };
        Ok(Container {
            created: t.elapsed(),
            sandbox: self.sandbox,
            leases: self.leases,
            id: self.plan.id,
            pid,
            streams,
            started: self.started,
        })
    }
}

/// The agent did not create the container. `logs` has what the VMM and
/// (with `console_log`) the guest printed, read before the sandbox went.
#[derive(Debug, thiserror::Error)]
#[error("creating the container")]
pub struct NotCreated {
    #[source]
    pub error: GuestError,
    pub logs: Option<String>,
}

/// A running container and its sandbox. Dropping it kills the VM; `remove`
/// stops it cleanly.
pub struct Container {
    sandbox: Sandbox,
    leases: Vec<VolumeLease>,
    id: String,
    /// Its init process in the guest.
    pid: u32,
    streams: Streams,
    started: Duration,
    created: Duration,
}

/// Where a container's start went: the sandbox's phases, the sandbox as a
/// whole, and the create.
#[derive(Clone, Debug)]
pub struct Timings {
    pub sandbox: StartTimes,
    /// Whether its container was parked, and how.
    pub parked: crate::sandbox::Parked,
    pub sandbox_total: Duration,
    pub create_start: Duration,
}

impl Container {
    /// Container `id` in its sandbox of the same id, started by an earlier
    /// process of ours that is gone (`husk run -d`'s owner, huskd), held
    /// again with its volumes' `leases` taken anew ([`Plan::find`] takes
    /// them from the plan). No streams; its pid reads 0.
    pub fn find(rt: &Runtime, id: &str, leases: Vec<VolumeLease>) -> Result<Container> {
        let sandbox = rt.find_sandbox(id)?;
        Ok(Container {
            sandbox,
            leases,
            id: id.into(),
            pid: 0,
            streams: Streams::default(),
            started: Duration::ZERO,
            created: Duration::ZERO,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// A handle to signal, exec in and stop it from other threads.
    pub fn control(&self) -> Result<Control> {
        Ok(Control::new(self.sandbox.connect()?, &self.id))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The sandbox and the container's streams, for a front end that keeps
    /// the sandbox past this container (a pod's, in the shim). The volume
    /// leases go with the sandbox's holder: none for a shared root.
    pub fn into_parts(self) -> (Sandbox, Streams, Vec<VolumeLease>) {
        (self.sandbox, self.streams, self.leases)
    }

    /// The first connection to its agent.
    pub fn agent(&self) -> &AgentConn {
        &self.sandbox.agent
    }

    /// The streams `create` opened (taken once).
    pub fn take_streams(&mut self) -> Streams {
        std::mem::take(&mut self.streams)
    }

    pub fn timings(&self) -> Timings {
        Timings {
            sandbox: self.sandbox.times.clone(),
            parked: self.sandbox.parked.clone(),
            sandbox_total: self.started,
            create_start: self.created,
        }
    }

    /// The agent's steps since the sandbox started (see
    /// `Runtime::profile`), read and cleared; a start that built its
    /// container template has that build's steps first.
    pub fn guest_profile(&self) -> Result<husk_protocol::agent::ProfileResponse> {
        let mut p = self.sandbox.agent.profile(false)?;
        p.steps
            .splice(0..0, self.sandbox.early_steps.iter().cloned());
        Ok(p)
    }

    /// Its address and published ports on the bridge.
    pub fn net_info(&self) -> Option<NetInfo> {
        let net = &self.sandbox.net;
        net.lease.as_ref().map(|l| NetInfo {
            ip: l.ip.to_string(),
            prefix: l.prefix,
            gateway: l.gateway.to_string(),
            mac: l.mac(),
            ports: net
                .publisher
                .as_ref()
                .map(|p| p.bound.clone())
                .unwrap_or_default(),
        })
    }

    /// Until the container's process exits (no deadline: a VM that dies
    /// ends the call).
    pub fn wait(&self) -> Result<WaitProcessResponse> {
        Ok(self.sandbox.agent.wait(&self.id, "")?)
    }

    /// The container and its sandbox end ([`Sandbox::end`]: the guest
    /// kills what is left and syncs what was written to volumes before it
    /// answers, within `timeout`), then the volumes' leases go.
    pub fn remove(self, timeout: Duration) -> Result<()> {
        let ended = self.sandbox.end(timeout);
        drop(self.leases);
        Ok(ended?)
    }
}

/// Copies a container's output stream to its log, and to `tee` (a
/// terminal) when given; the thread ends with the stream.
pub fn copy_to_log(
    from: Option<UnixStream>,
    stream: &'static str,
    log: LogWriter,
    mut tee: Option<Box<dyn std::io::Write + Send>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut from) = from else { return };
        let mut buf = vec![0u8; 32 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            let _ = log.write(stream, &buf[..n]);
            if let Some(t) = tee.as_mut() {
                let _ = t.write_all(&buf[..n]).and_then(|_| t.flush());
            }
        }
    })
}

/// A bundle's guest hostname: its spec's when set, else (as Docker names
/// a container's host) the id's first 12 characters. CRI pods without a
/// hostname come with an empty one and a 64-character id, and a host name
/// label is at most 63 characters, so the whole id would be refused.
fn spec_hostname(oci: &Spec, id: &str) -> String {
    if let Some(h) = oci.hostname().as_deref().filter(|h| !h.is_empty()) {
        return h.to_owned();
    }
    // An id may hold what a host name may not ('_', '+', '.' at the end).
    let short: String = id
        .chars()
        .take(12)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let short = short.trim_matches('-');
    if short.is_empty() {
        "husk".to_string()
    } else {
        short.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_without_a_hostname_gets_a_valid_short_one() {
        let id = "a".repeat(64);
        let mut oci = Spec::default();
        oci.set_hostname(None);
        assert_eq!(spec_hostname(&oci, &id), "a".repeat(12));
        oci.set_hostname(Some(String::new()));
        assert_eq!(spec_hostname(&oci, &id), "a".repeat(12));
        oci.set_hostname(Some("web".into()));
        assert_eq!(spec_hostname(&oci, &id), "web");
        // An id's characters a host name may not hold are replaced.
        oci.set_hostname(None);
        assert_eq!(spec_hostname(&oci, "my_app.1+x."), "my-app-1-x");
        assert_eq!(spec_hostname(&oci, "__"), "husk");
    }

    fn mount(source: MountSource, target: &str, read_only: bool) -> Mount {
        Mount {
            source,
            target: target.into(),
            read_only,
        }
    }

    #[test]
    fn mounts_become_binds_tmpfs_and_shares_in_order() {
        let p = plan_mounts(&[
            mount(MountSource::Host("/srv/a".into()), "/a", false),
            mount(MountSource::Volume("data".into()), "/data", true),
            mount(MountSource::Tmpfs, "/tmp", false),
            mount(MountSource::Host("/srv/b".into()), "/b", true),
        ])
        .unwrap();
        assert_eq!(p.volumes, ["data"]);
        assert_eq!(p.shares.len(), 2);
        assert!(p.shares[1].read_only);
        let src: Vec<_> = p.oci.iter().map(|m| m.source().clone().unwrap()).collect();
        assert_eq!(
            src,
            [
                PathBuf::from(guest_source(0)),
                "vol-data".into(),
                "tmpfs".into(),
                PathBuf::from(guest_source(1))
            ]
        );
        let opts = |i: usize| p.oci[i].options().clone().unwrap().join(",");
        assert_eq!(opts(1), "rbind,ro");
        assert_eq!(opts(2), "nosuid,nodev");
        assert_eq!(p.mounted[0], ("/srv/a".into(), "/a".into(), false));
        assert_eq!(p.mounted[1], ("data".into(), "/data".into(), true));
    }

    #[test]
    fn bad_mounts_are_named() {
        for (m, want) in [
            (mount(MountSource::Tmpfs, "rel", false), "absolute"),
            (mount(MountSource::Tmpfs, "/", false), "absolute"),
            (mount(MountSource::Tmpfs, "/a/../b", false), "without .."),
            (
                mount(MountSource::Volume("x".into()), "/x", false),
                "volume name",
            ),
        ] {
            let e = crate::util::chain(&plan_mounts(&[m]).err().expect("refused"));
            assert!(e.contains(want), "{e}");
        }
        let twice = [
            mount(MountSource::Volume("data".into()), "/a", false),
            mount(MountSource::Volume("data".into()), "/b", false),
        ];
        let e = plan_mounts(&twice).err().expect("refused").to_string();
        assert!(e.contains("mounted twice"), "{e}");
    }
}
