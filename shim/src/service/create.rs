//! Creating a task: the sandbox with its first container, or a pod's
//! container joining the running sandbox (the runtime's lifecycle).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::api::{self};
use husk_runtime::container::{join, ContainerError, ContainerSpec, Net, NotCreated, Root};
use log::{info, warn};

use crate::error::ShimError;
use crate::io::{Copies, Stdio};
use husk_runtime::util::{shown, IoContext};

use super::*;

impl Service {
    pub(super) fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let bundle = PathBuf::from(&req.bundle);
        let spec: oci_spec::runtime::Spec =
            oci_spec::runtime::Spec::load(bundle.join("config.json"))?;
        let joins = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(CONTAINER_TYPE))
            .is_some_and(|t| t == "container");
        let netns = crate::spec::netns_path(&spec).filter(|p| !p.starts_with("/proc"));
        // A CRI pod's containers (the sandbox's too) keep the share: the
        // pod's members join a running VM, which takes no new drive.
        let cri = spec
            .annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(CONTAINER_TYPE));
        let conf = if joins {
            None
        } else {
            let (type_url, options) = req
                .options
                .as_ref()
                .map_or(("", &[][..]), |o| (o.type_url.as_str(), &o.value[..]));
            let conf = crate::config::ShimConfig::find(type_url, options)?;
            let rt = conf.runtime()?;
            Some((conf, rt))
        };
        let drive = match &conf {
            None => self.member_drive(&req.id, &req.rootfs),
            Some((c, rt)) if !cri && c.drive_root() => {
                let cache = rt.cache_dir.join("layers");
                let erofs = crate::rootfs::worth_a_drive(&spec)
                    .and_then(|()| crate::rootfs::erofs(&req.rootfs, &cache));
                match erofs {
                    Ok(erofs) => Some(erofs),
                    Err(why) => {
                        info!("{}: its root is shared over virtio-fs: {why}", req.id);
                        None
                    }
                }
            }
            _ => None,
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
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let r = match conf {
            None => self.join_sandbox(&req.id, spec, &rootfs, drive, &stdio),
            Some((conf, rt)) => guest_root(spec, drive, &rootfs)
                .and_then(|root| self.start_sandbox(&req.id, root, netns, &stdio, &conf, &rt)),
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
    pub(super) fn start_sandbox(
        &self,
        id: &str,
        root: Root,
        netns: Option<PathBuf>,
        stdio: &Stdio,
        conf: &crate::config::ShimConfig,
        rt: &husk_runtime::Runtime,
    ) -> Result<(u32, Vec<usize>, Copies), ShimError> {
        let mut g = self.lock();
        if g.sandbox.is_some() {
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
        let parked = container.timings().parked;
        let (sandbox, mut streams, _no_leases) = container.into_parts();
        let copies = Copies::start(stdio, &mut streams, &self.owner(id))?;
        info!(
            "{id}: created in sandbox (VMM pid {}, parked: {parked:?})",
            sandbox.vmm_pid()
        );
        if let Ok(conn) = sandbox.connect() {
            self.watch_oom(conn);
        }
        g.sandbox = Some(sandbox);
        g.layers = conf.drive_root().then(|| rt.cache_dir.join("layers"));
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
            let pids: Vec<u32> = g.containers.values().map(|c| c.init.pid).collect();
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
