//! Finding a sandbox again: the process that started it is gone (huskd
//! restarted) and its VM runs on. Its record names the VMM process, which
//! is checked to still be that process and watched through a pidfd; its
//! agent is connected again and must answer; its published ports are
//! bound again. What cannot be found whole is removed, never left running.

use std::time::Duration;

use crate::config::Runtime;
use crate::guest::{AgentConn, Endpoint};
use crate::net::attach::Attachment;
use crate::net::ports::check_mappings;
use crate::sandbox::{
    check_id, Boot, Result, Sandbox, SandboxError, SandboxRecord, StartTimes, VSOCK_SOCKET,
};
use crate::util::child::Watched;
use crate::vmm::cgroup::Cgroup;
use crate::vmm::VmmProcess;

/// How long a found sandbox's agent has to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

impl Runtime {
    /// The sandboxes under the run directory, running or not (the ids of
    /// their directories).
    pub fn sandbox_ids(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.run_dir) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|id| check_id(id).is_ok())
            .collect()
    }

    /// Sandbox `id`, started by an earlier process of ours, held again: its
    /// VMM (checked by pid and start time), its agent (answering), its
    /// published ports (bound again). On an error whatever was found of its
    /// VMM is killed; [`Runtime::remove_left`] cleans the rest.
    pub fn find_sandbox(&self, id: &str) -> Result<Sandbox> {
        check_id(id)?;
        let dir = self.run_dir.join(id);
        let rec = SandboxRecord::load(&self.run_dir, id)?;
        self.check_record(&rec)?;
        if rec.shared {
            return Err(SandboxError::Record {
                path: dir.clone(),
                reason: "it shared host paths, and their virtio-fs daemon went with the \
                         process that started it"
                    .into(),
            });
        }
        let child = Watched::find(rec.vmm_pid, rec.vmm_start_ticks).map_err(|source| {
            SandboxError::NotFound {
                id: id.into(),
                source,
            }
        })?;
        let vmm = VmmProcess {
            child,
            api: dir.join("api.sock"),
            vsock: dir.join(VSOCK_SOCKET),
            cgroup: (!rec.cgroup.is_empty()).then(|| Cgroup::existing(rec.cgroup.clone())),
        };
        let agent = AgentConn::connect_within(Endpoint::Vsock(vmm.vsock.clone()), AGENT_TIMEOUT)?;
        agent.health()?;
        let net = Attachment::found(rec.ip, &rec.ports)?;
        Ok(Sandbox {
            id: id.into(),
            dir,
            agent,
            devices: rec.devices,
            boot: Boot::Template,
            times: StartTimes::default(),
            template: None,
            parked: crate::sandbox::Parked::No,
            early_steps: Vec::new(),
            net,
            // Not worked out from the record (its devices and shares):
            // syncing is always safe.
            keeps_writes: true,
            vmm,
            hot: super::hot::HotDrives::found(&self.cache_dir, id),
            shared: None,
            start_slot: None,
        })
    }

    /// Removes sandbox `id` that no one holds any more: its VMM killed (by
    /// its record's pid, checked, and by its cgroup) and its directory
    /// removed.
    pub fn remove_left(&self, id: &str) -> Result<()> {
        check_id(id)?;
        if let Ok(rec) = SandboxRecord::load(&self.run_dir, id) {
            if self.check_record(&rec).is_ok() {
                if let Ok(mut vmm) = Watched::find(rec.vmm_pid, rec.vmm_start_ticks) {
                    vmm.kill_and_wait();
                }
                drop(Cgroup::existing(rec.cgroup));
            }
        }
        self.clean_sandbox(id)
    }

    /// What a record names must be what a sandbox of ours could have: its
    /// own cgroups (`husk/<id>-<8 hex>`), a real start time, ports that can
    /// be published, an address on the bridge. The record is root's, but
    /// a check costs little against acting on a wrong one as root.
    fn check_record(&self, rec: &SandboxRecord) -> Result<()> {
        let bad = |reason: String| SandboxError::Record {
            path: self.run_dir.join(".records"),
            reason: format!("sandbox {}: {reason}", rec.id),
        };
        if rec.vmm_start_ticks == 0 {
            return Err(bad("no start time for its VMM".into()));
        }
        let root = std::path::Path::new("/sys/fs/cgroup");
        let parents = [
            root.join("husk"),
            root.join("memory/husk"),
            root.join("cpu/husk"),
        ];
        for g in &rec.cgroup {
            let ours = parents.iter().any(|p| g.parent() == Some(p.as_path()))
                && g.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(rec.id.as_str()))
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(|r| r.len() == 8 && r.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ours {
                return Err(bad(format!("cgroup {} is not one of its own", g.display())));
            }
        }
        check_mappings(&rec.ports).map_err(|e| bad(crate::util::chain(&e)))?;
        if let Some(ip) = rec.ip {
            let net = &self.network;
            let mask = u32::MAX
                .checked_shl(32 - u32::from(net.prefix))
                .unwrap_or(0);
            if u32::from(ip) & mask != u32::from(net.subnet) & mask {
                return Err(bad(format!(
                    "address {ip} is not on the bridge's {}/{}",
                    net.subnet, net.prefix
                )));
            }
        }
        Ok(())
    }
}
