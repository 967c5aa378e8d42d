//! Starting a sandbox, in steps: its directory, its network attached, its
//! host paths shared, its VM restored from a template (rebuilt once if
//! refused) or cold-booted, its agent told who it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sandbox::{Result, SandboxError};
use crate::util::{shown, IoContext};
use husk_vmm_api::{DriveBacking, FsBacking, LoadRequest, SerialConfig, TapBacking};

use crate::config::Runtime;
use crate::guest::{wait_for_agent, AgentConn};
use crate::net::attach::{Attachment, Request};
use crate::sandbox::hot::HotDrives;
use crate::sandbox::identity::give_identity;
use crate::sandbox::machine::{
    assign_slots, drive_shares, slot_id, vm_config, NET_IFACE, RO_SLOTS,
};
use crate::sandbox::parked::{self, Park, Parked};
use crate::sandbox::template::{Template, SNAPSHOT_TIMEOUT};
use crate::sandbox::{
    check_id, Boot, Sandbox, SandboxConfig, SandboxRecord, StartTimes, VSOCK_SOCKET,
};
use crate::storage::shared::{SharedFs, FS_ID};
use crate::vmm::jail::Share;
use crate::vmm::{VmmClient, VmmProcess};

/// A cold boot's time to agent-ready (emulated guest kernels take tens of
/// seconds).
const COLD_BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// A VM running with its agent answering.
struct Started {
    vmm: VmmProcess,
    agent: AgentConn,
    /// The guest device of each of the config's drives.
    devices: Vec<String>,
    template: Option<Template>,
    parked: Parked,
    /// The guest's steps read before a container template's snapshot.
    early_steps: Vec<husk_protocol::agent::Step>,
}

/// Where a sandbox's VMM writes and what it inherits.
struct Plumbing<'a> {
    dir: &'a Path,
    /// Where images given to it while it runs are linked (`hot`): its
    /// jail shows it.
    hot: &'a Path,
    console: Option<PathBuf>,
    log: PathBuf,
    net: &'a Attachment,
}

impl Plumbing<'_> {
    /// [tap, lease?, virtio-fs socket?]: the VMM's config names tap and
    /// socket by number.
    fn inherit(&self, shared: &Option<SharedFs>) -> (Vec<i32>, Option<i32>) {
        let fs_fd = shared.as_ref().map(|s| s.fd());
        let mut fds = self.net.inherited_fds();
        fds.extend(fs_fd);
        (fds, fs_fd)
    }
}

impl Runtime {
    /// Cleans up after sandbox `id` whose holder died without doing so (a
    /// containerd shim killed with SIGKILL): kills its VMM through its
    /// cgroup (virtiofsd follows, its socket closed) and removes its
    /// directory.
    pub fn clean_sandbox(&self, id: &str) -> Result<()> {
        check_id(id)?;
        crate::vmm::cgroup::kill_groups_of(id);
        let dir = self.run_dir.join(id);
        SandboxRecord::remove(&self.run_dir, id);
        let _ = std::fs::remove_dir_all(HotDrives::dir_of(&self.cache_dir, id));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).at(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Starts a sandbox: its VM restored from the template for its machine
    /// (or cold-booted), its agent ready, its identity set; through the
    /// host's start gate, whose slot it gives back when it returns.
    pub fn start_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox> {
        let mut s = self.start_sandbox_held(cfg)?;
        s.started();
        Ok(s)
    }

    /// `start_sandbox`, its gate's slot kept in the sandbox until its
    /// `started` (its first container made): a caller must not start
    /// another sandbox before, or it may wait for a slot it holds.
    pub fn start_sandbox_held(&self, cfg: &SandboxConfig) -> Result<Sandbox> {
        check_id(&cfg.id)?;
        let dir = self.run_dir.join(&cfg.id);
        std::fs::create_dir_all(&self.run_dir).at(|| shown(&self.run_dir))?;
        if let Err(e) = std::fs::create_dir(&dir) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return Err(SandboxError::Exists {
                    id: cfg.id.clone(),
                    dir,
                });
            }
            return Err(Err::<(), _>(e).at(|| shown(&dir)).unwrap_err().into());
        }
        let r = self.start_in(cfg, &dir);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(HotDrives::dir_of(&self.cache_dir, &cfg.id));
        }
        r
    }

    fn start_in(&self, cfg: &SandboxConfig, dir: &Path) -> Result<Sandbox> {
        let mut times = StartTimes::default();
        let start_slot = self.start_gate.enter()?;
        times.gate = start_slot.as_ref().map_or(Duration::ZERO, |s| s.waited);
        let net = Attachment::attach(
            &self.network,
            &Request {
                id: &cfg.id,
                mode: cfg.network,
                netns: cfg.netns.as_deref(),
                ports: &cfg.ports,
            },
        )?;
        let mut shared = self.share(cfg, dir)?;
        let taken = cfg.drives.iter().filter(|d| d.read_only).count();
        let hot = HotDrives::prepare(&self.cache_dir, &cfg.id, taken)?;
        let p = Plumbing {
            dir,
            hot: hot.dir(),
            console: cfg.console_log.then(|| dir.join("console.log")),
            log: dir.join("vmm.log"),
            net: &net,
        };
        let t1 = Instant::now();
        let mut started = match cfg.boot {
            Boot::Template | Boot::Parked => {
                self.start_restored(cfg, &p, &mut shared, &mut times)?
            }
            Boot::Cold => self.start_cold(cfg, &p, &shared)?,
        };
        times.agent_ready = t1.elapsed() - times.template - times.park;
        if self.profile {
            // Steps from here on, counted (the template's own and a
            // container template build's are dropped).
            started.early_steps.clear();
            started.agent.profile(true)?;
        }
        let t2 = Instant::now();
        give_identity(&started.agent, cfg, net.guest(self.network.mtu).as_ref())?;
        times.identity = t2.elapsed();
        let pid = started.vmm.child.id();
        SandboxRecord {
            id: cfg.id.clone(),
            vmm_pid: pid,
            // The VMM was just spawned and is ours; 0 only if /proc is gone,
            // and then the sandbox cannot be found again (it is refused).
            vmm_start_ticks: crate::util::child::start_ticks(pid).unwrap_or(0),
            cgroup: started
                .vmm
                .cgroup
                .as_ref()
                .map(|c| c.dirs.clone())
                .unwrap_or_default(),
            devices: started.devices.clone(),
            ip: net.ip(),
            ports: net
                .publisher
                .as_ref()
                .map(|p| p.bound.clone())
                .unwrap_or_default(),
            shared: shared.is_some(),
        }
        .save(&self.run_dir)?;
        Ok(Sandbox {
            id: cfg.id.clone(),
            dir: dir.to_path_buf(),
            agent: started.agent,
            devices: started.devices,
            boot: cfg.boot,
            times,
            template: started.template,
            parked: started.parked,
            early_steps: started.early_steps,
            net,
            keeps_writes: !cfg.shares.is_empty() || cfg.drives.iter().any(|d| !d.read_only),
            vmm: started.vmm,
            hot,
            shared,
            start_slot,
        })
    }

    /// virtiofsd for the config's shares, if it has any.
    fn share(&self, cfg: &SandboxConfig, dir: &Path) -> Result<Option<SharedFs>> {
        if cfg.shares.is_empty() {
            return Ok(None);
        }
        Ok(SharedFs::start(&self.virtiofsd, dir, &cfg.shares).map(Some)?)
    }

    /// Restores the machine's template; one this VMM or host refuses is
    /// rebuilt once.
    fn start_restored(
        &self,
        cfg: &SandboxConfig,
        p: &Plumbing,
        shared: &mut Option<SharedFs>,
        times: &mut StartTimes,
    ) -> Result<Started> {
        let t0 = Instant::now();
        let mut t = Template::ensure(self, &cfg.machine)?;
        times.template = t0.elapsed();
        let park = match &cfg.park {
            Some(park) => Some((park, park.key(&t)?)),
            None => None,
        };
        if let Some((_, key)) = &park {
            if let Some(found) = parked::find(&t, key) {
                let (inherit, fs_fd) = p.inherit(shared);
                let (ct, pid) = (found.template, found.pid);
                match self.restore(&ct, Some(found.lock), cfg, p, &inherit, fs_fd) {
                    Ok((vmm, agent, devices)) => {
                        return Ok(Started {
                            vmm,
                            agent,
                            devices,
                            template: Some(ct),
                            parked: Parked::Restored { pid },
                            early_steps: Vec::new(),
                        })
                    }
                    // Refused (a damaged file, another VMM build): built
                    // again below, from the base.
                    Err(_) => parked::invalidate(&ct),
                }
            }
        }
        let (inherit, fs_fd) = p.inherit(shared);
        let (vmm, agent, devices) = match self.restore(&t, None, cfg, p, &inherit, fs_fd) {
            Ok(x) => x,
            Err(e) => {
                if let Some(s) = shared.as_mut() {
                    // The backend failed, not the template.
                    s.check_alive()?;
                }
                // A template this VMM or host refuses (other VMM build, CPU
                // template, a damaged file) is rebuilt once. The backend's
                // session is not reused.
                t.invalidate();
                t = Template::ensure(self, &cfg.machine).map_err(|source| {
                    SandboxError::Rebuild {
                        refused: crate::util::chain(&e),
                        source: Box::new(source),
                    }
                })?;
                drop(shared.take());
                *shared = self.share(cfg, p.dir)?;
                let (inherit, fs_fd) = p.inherit(shared);
                self.restore(&t, None, cfg, p, &inherit, fs_fd)
                    .map_err(|source| SandboxError::AfterRebuild {
                        key: t.key.clone(),
                        source: Box::new(source),
                    })?
            }
        };
        let mut early_steps = Vec::new();
        let parked = match park {
            Some((park, key)) => {
                let t1 = Instant::now();
                let parked = park_in(
                    &t,
                    &key,
                    park,
                    (&vmm, &agent),
                    &devices,
                    p.dir,
                    &mut early_steps,
                );
                times.park = t1.elapsed();
                parked
            }
            None => Parked::No,
        };
        Ok(Started {
            vmm,
            agent,
            devices,
            template: Some(t),
            parked,
            early_steps,
        })
    }

    /// Boots the guest kernel with the config's drives in their slots.
    fn start_cold(
        &self,
        cfg: &SandboxConfig,
        p: &Plumbing,
        shared: &Option<SharedFs>,
    ) -> Result<Started> {
        let placeholder = p.dir.join("empty.img");
        std::fs::File::create(&placeholder).at(|| shown(&placeholder))?;
        let (slots, devices) = assign_slots(&cfg.drives, &placeholder)?;
        let vsock = p.dir.join(VSOCK_SOCKET);
        let (inherit, fs_fd) = p.inherit(shared);
        let config = vm_config(
            self,
            &cfg.machine,
            &slots,
            &vsock,
            p.console.as_deref(),
            inherit[0],
            fs_fd,
        );
        let file = p.dir.join("vm.json");
        let json = serde_json::to_vec_pretty(&config).map_err(|source| SandboxError::Encode {
            what: "the VM config",
            source,
        })?;
        std::fs::write(&file, json).at(|| shown(&file))?;
        let mut shares = drive_shares(&cfg.drives);
        shares.push(Share::rw(&placeholder));
        shares.push(Share::ro(p.hot));
        let jail = self.jail_for(p.dir, &cfg.id, shares, &cfg.machine);
        let mut vmm = VmmProcess::spawn(
            &self.vmm,
            &["--config-file".as_ref(), file.as_os_str()],
            p.dir.join("api.sock"),
            vsock,
            &p.log,
            &inherit,
            jail.as_ref(),
        )?;
        let agent = wait_for_agent(&mut vmm, &p.log, COLD_BOOT_TIMEOUT)?;
        Ok(Started {
            vmm,
            agent,
            devices,
            template: None,
            parked: Parked::No,
            early_steps: Vec::new(),
        })
    }

    /// Restores `t` for `cfg` and waits for its agent.
    /// `reading`, the container template's shared lock, is let go as soon
    /// as the VMM has loaded (or refused) the files: the restored VM has
    /// its own mapping.
    fn restore(
        &self,
        t: &Template,
        reading: Option<crate::util::Lock>,
        cfg: &SandboxConfig,
        p: &Plumbing,
        inherit: &[i32],
        fs_fd: Option<i32>,
    ) -> Result<(VmmProcess, AgentConn, Vec<String>)> {
        let (dir, log) = (p.dir, &p.log);
        let (slots, devices) = assign_slots(&cfg.drives, &t.placeholder)?;
        let vsock = dir.join(VSOCK_SOCKET);
        let api = dir.join("api.sock");
        let _ = std::fs::remove_file(&vsock);
        let _ = std::fs::remove_file(&api);
        let mut shares = drive_shares(&cfg.drives);
        shares.extend([
            Share::ro(&t.snapshot),
            Share::ro(&t.memory),
            // Writable slots open it read-write (it has no bytes to write).
            Share::rw(&t.placeholder),
            Share::ro(p.hot),
        ]);
        let jail = self.jail_for(dir, &cfg.id, shares, &cfg.machine);
        let mut vmm = VmmProcess::spawn(
            &self.vmm,
            &[],
            api.clone(),
            vsock.clone(),
            log,
            inherit,
            jail.as_ref(),
        )?;
        let drives: Vec<_> = slots
            .iter()
            .enumerate()
            .filter(|(_, p)| **p != t.placeholder)
            .map(|(i, p)| {
                let ro = i < RO_SLOTS;
                let id = slot_id(ro, if ro { i } else { i - RO_SLOTS });
                DriveBacking {
                    drive_id: id,
                    path_on_host: p.clone(),
                }
            })
            .collect();
        let load = LoadRequest {
            snapshot_path: t.snapshot.clone(),
            mem_file_path: t.memory.clone(),
            resume_vm: true,
            vsock_uds_path: Some(vsock.clone()),
            serial: Some(SerialConfig::to_file(p.console.clone())),
            drives,
            network_interfaces: vec![TapBacking {
                iface_id: NET_IFACE.into(),
                host_dev_name: String::new(),
                tap_fd: Some(inherit[0]),
            }],
            filesystems: fs_fd
                .map(|fd| FsBacking {
                    fs_id: FS_ID.into(),
                    socket_path: None,
                    socket_fd: Some(fd),
                })
                .into_iter()
                .collect(),
        };
        let loaded = VmmClient::new(&api, SNAPSHOT_TIMEOUT).load_snapshot(&load);
        drop(reading);
        if let Err(e) = loaded {
            // A VMM that died says why in its log.
            vmm.check_alive(log)?;
            return Err(SandboxError::Load {
                key: t.key.clone(),
                source: e,
            });
        }
        // Restored guests answer in under a second alone; many restored at
        // once on few cores take longer, and a timeout here rebuilds the
        // template, so it is generous.
        let agent = wait_for_agent(&mut vmm, log, Duration::from_secs(120)).map_err(|source| {
            SandboxError::Restored {
                key: t.key.clone(),
                source,
            }
        })?;
        Ok((vmm, agent, devices))
    }
}

/// Parks `park` in the VM restored from base template `t` and snapshots
/// it as container template `key` (parked.rs). A container that could not
/// be parked is created the usual way later, which reports the problem if
/// it is the spec's.
fn park_in(
    t: &Template,
    key: &str,
    park: &Park,
    (vmm, agent): (&VmmProcess, &AgentConn),
    devices: &[String],
    staging: &Path,
    early_steps: &mut Vec<husk_protocol::agent::Step>,
) -> Parked {
    let Some(image) = devices.first() else {
        return Parked::Failed("no image drive".into());
    };
    let pid = match parked::park(agent, park, image) {
        Ok(pid) => pid,
        Err(e) => return Parked::Failed(crate::util::chain(&e)),
    };
    // Read before the snapshot, or every start restored from it would
    // report this build's steps as its own.
    if let Ok(p) = agent.profile(false) {
        *early_steps = p.steps;
    }
    match parked::snapshot(t, key, vmm, staging, pid) {
        Ok(true) => Parked::Built { pid },
        Ok(false) => Parked::NotSnapshotted {
            pid,
            why: "another start is building it".into(),
        },
        Err(e) => Parked::NotSnapshotted {
            pid,
            why: crate::util::chain(&e),
        },
    }
}
