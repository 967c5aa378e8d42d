//! Sandboxes: one microVM each, started by restoring the template for their
//! machine (the default) or by a cold boot, then given their own identity:
//! fresh randomness, the host's clock, a hostname and DNS.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::guest::{ctx, AgentConn, Endpoint, GuestError, RpcError};
use crate::net::ports::PortMapping;
use crate::net::{Attachment, NetError, NetworkMode};
use crate::storage::shared::{HostShare, SharedFs};
use crate::storage::StorageError;
use crate::util::{tail, IoContext, IoError};
use crate::vmm::{VmmApiError, VmmError, VmmProcess};

/// Starting, changing and stopping a sandbox. Another module's error is
/// kept whole as the source, under the step it failed in.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("sandbox id {0:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'")]
    InvalidId(String),
    #[error("sandbox {id} exists ({})", .dir.display())]
    Exists { id: String, dir: PathBuf },
    #[error("sandbox {0} was started without shared host paths")]
    NoShares(String),
    /// Drives that do not fit the machine's slots, or are not files.
    #[error("{0}")]
    Drives(String),
    #[error("attaching the network")]
    Net(#[from] NetError),
    #[error("sharing host paths")]
    Share(#[from] StorageError),
    #[error("unsharing entry {entry}")]
    Unshare {
        entry: usize,
        #[source]
        source: StorageError,
    },
    #[error("and undoing the shares made before failed: {undo}")]
    SharesUndone {
        undo: String,
        #[source]
        source: Box<SandboxError>,
    },
    #[error("the VMM")]
    Vmm(#[from] VmmError),
    #[error("the agent")]
    Guest(#[from] GuestError),
    #[error("backing drive {drive} with an image")]
    Patch {
        drive: String,
        #[source]
        source: VmmApiError,
    },
    #[error("loading template {key}")]
    Load {
        key: String,
        #[source]
        source: VmmApiError,
    },
    #[error("restored from template {key}")]
    Restored {
        key: String,
        #[source]
        source: GuestError,
    },
    #[error("restore refused ({refused}); rebuilding")]
    Rebuild {
        refused: String,
        #[source]
        source: Box<SandboxError>,
    },
    #[error("after rebuilding template {key}")]
    AfterRebuild {
        key: String,
        #[source]
        source: Box<SandboxError>,
    },
    #[error("template {key}: the guest did not get to agent-ready; console: {console}")]
    TemplateBoot {
        key: String,
        console: String,
        #[source]
        source: GuestError,
    },
    #[error("encoding {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the VM did not stop within {0:?} of DestroySandbox")]
    StopTimeout(Duration),
    #[error("the host's clock is before 1970")]
    Clock,
    #[error("{}: {reason}", .path.display())]
    Record { path: PathBuf, reason: String },
    #[error("sandbox {id} cannot be found again")]
    NotFound {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SandboxError>;

mod found;
pub mod gate;
mod hot;
mod identity;
pub mod machine;
pub mod parked;
pub mod record;
mod start;
pub mod template;

pub use gate::{StartGate, StartSlot};
pub use machine::{
    slot_device, slot_id, DriveSpec, Machine, BOOT_ARGS, NET_IFACE, RO_SLOTS, RW_SLOTS,
};
pub use parked::{Park, Parked, PARKED_ID};
pub use record::SandboxRecord;
pub use template::Template;

/// How a sandbox's VM starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    /// Restore the cached template for the machine (built on first use).
    Template,
    /// Restore a template with the container already created and parked
    /// (parked.rs; built by the first start of the same image and spec);
    /// a container that cannot be parked starts as with `Template`. The
    /// default: the fast path for every front end.
    #[default]
    Parked,
    /// Boot the guest kernel.
    Cold,
}

impl Boot {
    /// Every way, by name (a command line's choices).
    pub const NAMES: [&'static str; 3] = ["parked", "template", "cold"];

    pub fn name(self) -> &'static str {
        match self {
            Boot::Parked => "parked",
            Boot::Template => "template",
            Boot::Cold => "cold",
        }
    }
}

impl std::str::FromStr for Boot {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Boot, String> {
        match s {
            "parked" => Ok(Boot::Parked),
            "template" => Ok(Boot::Template),
            "cold" => Ok(Boot::Cold),
            _ => Err(format!(
                "unknown boot {s:?}: one of {}",
                Boot::NAMES.join(", ")
            )),
        }
    }
}

impl std::fmt::Display for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub id: String,
    pub machine: Machine,
    pub drives: Vec<DriveSpec>,
    pub hostname: String,
    /// Name servers and search domains; empty: the host's (loopback
    /// resolvers left out).
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    /// resolv.conf options (with `dns_servers` only).
    pub dns_options: Vec<String>,
    /// /etc/hosts lines after localhost and the guest's own address.
    pub hosts: Vec<String>,
    pub network: NetworkMode,
    /// A network namespace set up by someone else (CRI's pod netns, with
    /// CNI's veth) whose interface the VM takes over; `network` is then
    /// not used.
    pub netns: Option<PathBuf>,
    /// Host ports relayed to the sandbox (bridge network only).
    pub ports: Vec<PortMapping>,
    /// Host paths shared over virtio-fs; share `i` is at
    /// `storage::shared::guest_source(i)` under the agent's storage directory once
    /// the storage `Sandbox::shared_storage` names is mounted.
    pub shares: Vec<HostShare>,
    pub boot: Boot,
    /// Keep the guest console in `<sandbox dir>/console.log`.
    pub console_log: bool,
    /// A container to park before the identity is given (restored from a
    /// template: `Boot::Template` or `Boot::Parked`; the container
    /// lifecycle sets it for `Boot::Parked` only).
    pub park: Option<Park>,
}

impl SandboxConfig {
    /// Sizes the microVM to hold what the container may use: its memory
    /// limit plus 128 MiB for the guest, if that is more than the default.
    pub fn fit_memory(&mut self, spec: &oci_spec::runtime::Spec) {
        let limit = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        if let Some(m) = limit.filter(|m| *m > 0) {
            self.machine.mem_mib = self.machine.mem_mib.max((m as u64 >> 20) + 128);
        }
    }

    /// Sizes the microVM's vCPUs for a CPU limit of `nano_cpus` billionths
    /// of a CPU: enough whole vCPUs (at least 1, at most 32).
    pub fn fit_cpus(&mut self, nano_cpus: i64) {
        if nano_cpus > 0 {
            self.machine.vcpus =
                (nano_cpus.saturating_add(999_999_999) / 1_000_000_000).clamp(1, 32) as u8;
        }
    }

    pub fn new(id: &str) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            machine: Machine::default(),
            drives: Vec::new(),
            hostname: id.into(),
            dns_servers: Vec::new(),
            dns_search: Vec::new(),
            dns_options: Vec::new(),
            hosts: Vec::new(),
            network: NetworkMode::default(),
            netns: None,
            ports: Vec::new(),
            shares: Vec::new(),
            boot: Boot::default(),
            console_log: false,
            park: None,
        }
    }
}

/// Where each phase of a start went.
#[derive(Clone, Debug, Default)]
pub struct StartTimes {
    /// Template lookup (or its build, on first use).
    pub template: Duration,
    /// VMM spawn until the agent answered Health.
    pub agent_ready: Duration,
    /// StartSandbox (randomness, clock, hostname and network).
    pub identity: Duration,
    /// Parking the container and snapshotting it (a container template's
    /// first start).
    pub park: Duration,
    /// Waiting at the host's start gate (`gate`) for a slot.
    pub gate: Duration,
}

/// A running sandbox. Dropping it kills its VM and removes its directory.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub agent: AgentConn,
    /// The guest device of each of the config's drives, in order.
    pub devices: Vec<String>,
    pub boot: Boot,
    pub times: StartTimes,
    /// The template restored from, for `Boot::Template`.
    pub template: Option<Template>,
    /// Its parked container, if it was asked for one (`SandboxConfig::park`).
    pub parked: Parked,
    /// The guest's steps up to its container template's snapshot (this
    /// start built it), read then: the agent's next Profile answer has
    /// only the steps after it.
    pub early_steps: Vec<husk_protocol::agent::Step>,
    /// Its network: tap, address lease, published ports, or a pod's
    /// namespace taken over.
    pub net: Attachment,
    /// Whether anything the guest writes outlives it (a writable drive,
    /// a share): ending it then asks the guest to sync first.
    keeps_writes: bool,
    vmm: VmmProcess,
    /// Images given to it while it runs (`attach_image`).
    hot: hot::HotDrives,
    /// virtiofsd, after the VMM (fields drop in order).
    shared: Option<SharedFs>,
    /// Its place through the host's start gate, until its first
    /// container is made (`started`).
    start_slot: Option<StartSlot>,
}

impl Sandbox {
    /// What the agent mounts for a container started the way `husk run`
    /// and huskd start one: the image's erofs (drive 0) at `image`, each
    /// named volume's ext4 (the next drives, in order) at `vol-<name>`,
    /// and the shares, if any.
    pub fn container_storage(&self, volumes: &[String]) -> Vec<husk_protocol::agent::Storage> {
        use husk_protocol::agent::Storage;
        let mut storage = vec![Storage {
            source: self.devices[0].clone(),
            fstype: "erofs".into(),
            options: vec!["ro".into()],
            mount_point: "image".into(),
            ..Default::default()
        }];
        for (name, dev) in volumes.iter().zip(&self.devices[1..]) {
            storage.push(Storage {
                source: dev.clone(),
                fstype: "ext4".into(),
                mount_point: format!("vol-{name}"),
                ..Default::default()
            });
        }
        storage.extend(self.shared_storage());
        storage
    }

    /// The guest device of `image` (an erofs), given to the running VM in
    /// a read-only drive slot its start left empty, or the slot that has
    /// it already. A sandbox takes at most `RO_SLOTS` images in its life.
    pub fn attach_image(&mut self, image: &Path) -> Result<String> {
        self.hot.attach(&self.vmm.api, image)
    }

    /// The storage the agent mounts for the config's shares, if it has any.
    pub fn shared_storage(&self) -> Option<husk_protocol::agent::Storage> {
        self.shared.as_ref().map(|_| husk_protocol::agent::Storage {
            source: crate::storage::shared::FS_TAG.into(),
            fstype: "virtiofs".into(),
            mount_point: crate::storage::shared::MOUNT_POINT.into(),
            ..Default::default()
        })
    }

    /// Shares `share` into the running sandbox; returns the index for
    /// `storage::shared::guest_source`. Needs a sandbox started with shares.
    pub fn add_share(&mut self, share: &HostShare) -> Result<usize> {
        match self.shared.as_mut() {
            Some(fs) => Ok(fs.add(share)?),
            None => Err(SandboxError::NoShares(self.id.clone())),
        }
    }

    /// Stops sharing entry `i`.
    pub fn remove_share(&mut self, i: usize) -> Result<()> {
        match self.shared.as_mut() {
            Some(fs) => Ok(fs.remove(i)?),
            None => Ok(()),
        }
    }

    /// Shares a joining container's host paths, all or none; the entries
    /// name them (`storage::shared::guest_source`).
    pub fn add_shares(&mut self, shares: &[HostShare]) -> Result<Vec<usize>> {
        let mut entries = Vec::with_capacity(shares.len());
        for share in shares {
            match self.add_share(share) {
                Ok(e) => entries.push(e),
                Err(e) => {
                    let undo = self.remove_shares(&entries);
                    if undo.is_empty() {
                        return Err(e);
                    }
                    let undo: Vec<String> = undo.iter().map(|u| crate::util::chain(u)).collect();
                    return Err(SandboxError::SharesUndone {
                        undo: undo.join("; "),
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(entries)
    }

    /// Stops sharing `entries`, every one even when one fails; the
    /// failures.
    pub fn remove_shares(&mut self, entries: &[usize]) -> Vec<SandboxError> {
        entries
            .iter()
            .filter_map(|&entry| match self.shared.as_mut() {
                Some(fs) => fs
                    .remove(entry)
                    .map_err(|source| SandboxError::Unshare { entry, source })
                    .err(),
                None => None,
            })
            .collect()
    }

    /// A pod's container leaves and the pod goes on: RemoveContainer, then
    /// its host paths leave the share. The failures (each step is tried).
    pub fn remove_member(&mut self, id: &str, entries: &[usize]) -> Vec<SandboxError> {
        let mut errors: Vec<SandboxError> = self
            .agent
            .remove(id)
            .err()
            .into_iter()
            .map(SandboxError::Guest)
            .collect();
        errors.extend(self.remove_shares(entries));
        errors
    }

    /// Ends the sandbox (its last container with it: a RemoveContainer
    /// first would only tidy a guest about to go; the container's writable
    /// layer is in guest memory) without waiting for the guest kernel's power-off:
    /// DestroySandbox (answered once every container process is gone and
    /// the guest's file systems are synced), then the VMM is killed. A
    /// guest that does not answer within `timeout` is killed as well, and
    /// the error says so: what it had not synced is lost. A guest with
    /// nothing that outlives it (no writable drive, no share) is killed
    /// at once: its processes, its memory and its disks' copies all go
    /// with the VM, so asking it first would only add guest work.
    pub fn end(mut self, timeout: Duration) -> Result<()> {
        if !self.keeps_writes {
            self.vmm.child.kill_and_wait();
            return Ok(());
        }
        if !self.agent.destroy_syncs() {
            // An older guest image's agent (a sandbox started before an
            // upgrade, found again): it syncs only as it powers off.
            return self.shutdown(timeout).map(drop);
        }
        // The VM is killed here on the answer: the guest must not power
        // off first, or the answer (the proof of the sync) is lost.
        let mut c = ctx(timeout);
        c.add(husk_protocol::HOST_KILLS_KEY.to_string(), "1".to_string());
        let asked = self
            .agent
            .sandbox
            .destroy_sandbox(c, &husk_protocol::agent::Empty::new())
            .map_err(|e| SandboxError::Guest(RpcError::new("DestroySandbox", &e).into()));
        // Whatever the answer, the VM goes now (dropping does the rest).
        self.vmm.child.kill_and_wait();
        asked.map(drop)
    }

    /// Forgets the container template this sandbox was restored from (its
    /// launch failed): the next start of the same container builds it
    /// again.
    pub fn forget_parked_template(&self) {
        if let (Parked::Restored { .. }, Some(t)) = (&self.parked, &self.template) {
            parked::invalidate(t);
        }
    }

    /// Its start's guest work is done: the host's start gate lets the
    /// next start through.
    pub fn started(&mut self) {
        self.start_slot = None;
    }

    /// Its place through the start gate, for a caller that ends its start
    /// later (the shim: at the container's task start).
    pub fn take_start_slot(&mut self) -> Option<StartSlot> {
        self.start_slot.take()
    }

    /// The host pid of the VMM process the runtime holds (the jail's
    /// keeper when confined).
    pub fn vmm_pid(&self) -> u32 {
        self.vmm.child.id()
    }

    /// Its address: on the bridge, or the pod's (CNI's).
    pub fn ip(&self) -> Option<std::net::Ipv4Addr> {
        self.net.ip()
    }

    /// Memory charged to the VMM's cgroup (confined VMMs), bytes.
    pub fn vmm_memory(&self) -> Option<u64> {
        self.vmm.cgroup.as_ref().and_then(|c| c.memory())
    }

    /// The VMM's cgroup directories (confined VMMs).
    pub fn vmm_cgroup(&self) -> Vec<PathBuf> {
        self.vmm
            .cgroup
            .as_ref()
            .map(|c| c.dirs.clone())
            .unwrap_or_default()
    }
}

/// The hybrid vsock socket in a sandbox's directory.
pub(crate) const VSOCK_SOCKET: &str = "v.sock";

/// The agent of a running sandbox `id` under `run_dir`, from another
/// process than the one that started it (`husk exec`, `stop`).
pub fn connect_running(run_dir: &Path, id: &str, timeout: Duration) -> Result<AgentConn> {
    check_id(id)?;
    let uds = run_dir.join(id).join(VSOCK_SOCKET);
    Ok(AgentConn::connect_within(Endpoint::Vsock(uds), timeout)?)
}

/// Sandbox ids name directories and sockets: kept short and plain.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(SandboxError::InvalidId(id.into()));
    }
    Ok(())
}

impl Sandbox {
    /// A new connection to the agent (the first one is `agent`).
    pub fn connect(&self) -> Result<AgentConn> {
        Ok(AgentConn::connect(Endpoint::Vsock(self.vmm.vsock.clone()))?)
    }

    /// What the VMM logged and, with `console_log`, the guest console.
    pub fn logs(&self) -> String {
        format!(
            "vmm: {}\nconsole: {}",
            tail(&self.dir.join("vmm.log"), 2000),
            tail(&self.dir.join("console.log"), 4000)
        )
    }

    /// Asks the guest to shut down (DestroySandbox) and waits up to
    /// `timeout` for the VMM to exit; then it is killed. Returns the VMM's
    /// exit status if it exited on its own.
    pub fn shutdown(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // The agent answers, then powers off; on a slow guest the power-off
        // can overtake the answer. A lost answer followed by the VM's exit
        // is a shutdown.
        let asked = self
            .agent
            .sandbox
            .destroy_sandbox(
                ctx(Duration::from_secs(30)),
                &husk_protocol::agent::Empty::new(),
            )
            .map_err(|e| SandboxError::Guest(RpcError::new("DestroySandbox", &e).into()));
        let deadline = Instant::now()
            + if asked.is_ok() {
                timeout
            } else {
                Duration::from_secs(5)
            };
        loop {
            if let Some(status) = self.vmm.child.try_wait().at(|| "waiting for the VMM")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                asked?;
                return Err(SandboxError::StopTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the VM and removes the sandbox's files (as dropping it does).
    pub fn stop(self) {}
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.vmm.child.kill_and_wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.hot.remove();
        if let Some(run_dir) = self.dir.parent() {
            SandboxRecord::remove(run_dir, &self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("web-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
