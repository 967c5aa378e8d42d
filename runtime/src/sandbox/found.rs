//! Finding a sandbox again: the process that started it is gone (huskd
//! restarted) and its VM runs on. Its record names the VMM process, which
//! is checked to still be that process and watched through a pidfd; its
//! agent is connected again and must answer; its published ports are
//! bound again. What cannot be found whole is removed, never left running.

use std::time::Duration;

use crate::config::Runtime;
use crate::guest::{AgentConn, Endpoint};
use crate::net::attach::Attachment;
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
        let rec = SandboxRecord::load(&dir)?;
        if rec.id != id {
            return Err(SandboxError::Record {
                path: dir.join("sandbox.json"),
                reason: format!("it names sandbox {:?}", rec.id),
            });
        }
        if rec.shared {
            return Err(SandboxError::Record {
                path: dir.join("sandbox.json"),
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
            net,
            vmm,
            shared: None,
        })
    }

    /// Removes sandbox `id` that no one holds any more: its VMM killed (by
    /// its record's pid, checked, and by its cgroup) and its directory
    /// removed.
    pub fn remove_left(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let dir = self.run_dir.join(id);
        if let Ok(rec) = SandboxRecord::load(&dir) {
            if let Ok(mut vmm) = Watched::find(rec.vmm_pid, rec.vmm_start_ticks) {
                vmm.kill_and_wait();
            }
            drop(Cgroup::existing(rec.cgroup));
        }
        self.clean_sandbox(id)
    }
}
