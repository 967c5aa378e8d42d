//! A container started in a sandbox that already runs: a CRI pod's member
//! (the pod's first container started the sandbox through `lifecycle`).
//! Its host paths join the sandbox's share, its spec is pointed at the
//! entries they got, and the (slow) create runs on a connection of its own,
//! so a front end can hold its lock over the first step only.

use oci_spec::runtime::Spec;

use crate::container::Result;
use crate::guest::{AgentConn, GuestError, Io, Streams};
use crate::sandbox::Sandbox;
use crate::storage::shared::{renumber, HostShare};

/// Shared into the sandbox, not created yet.
pub struct Joining {
    id: String,
    spec: Spec,
    entries: Vec<usize>,
    agent: AgentConn,
    storage: Vec<husk_protocol::agent::Storage>,
}

/// Created in the sandbox.
pub struct Member {
    pub pid: u32,
    /// The share entries its host paths took: unshared when it leaves
    /// (`Sandbox::remove_member`).
    pub entries: Vec<usize>,
    pub streams: Streams,
}

/// The create failed; its shares are still the sandbox's until the caller
/// unshares `entries` (under its lock).
#[derive(Debug, thiserror::Error)]
#[error("creating container {id} in its pod's sandbox")]
pub struct NotJoined {
    pub id: String,
    pub entries: Vec<usize>,
    #[source]
    pub error: GuestError,
}

/// Step 1: shares `shares` (a spec written for entries 0..n, as
/// `storage::shared::guest_source` names them) into `sandbox` and opens a
/// connection for the create. Nothing is left shared when it fails.
pub fn join(
    sandbox: &mut Sandbox,
    id: &str,
    mut spec: Spec,
    shares: &[HostShare],
) -> Result<Joining> {
    let entries = sandbox.add_shares(shares)?;
    renumber(&mut spec, &entries);
    let agent = match sandbox.connect() {
        Ok(a) => a,
        Err(e) => {
            let undo: Vec<String> = sandbox
                .remove_shares(&entries)
                .iter()
                .map(|u| crate::util::chain(u))
                .collect();
            if undo.is_empty() {
                return Err(e.into());
            }
            return Err(crate::sandbox::SandboxError::SharesUndone {
                undo: undo.join("; "),
                source: Box::new(e),
            }
            .into());
        }
    };
    Ok(Joining {
        id: id.to_string(),
        spec,
        entries,
        agent,
        storage: sandbox.shared_storage().into_iter().collect(),
    })
}

impl Joining {
    /// Step 2: CreateContainer (containerd starts it separately).
    pub fn create_only(self, io: Io) -> std::result::Result<Member, NotJoined> {
        match self
            .agent
            .create_only(&self.id, &self.spec, io, self.storage, false)
        {
            Ok((pid, streams)) => Ok(Member {
                pid,
                entries: self.entries,
                streams,
            }),
            Err(error) => Err(NotJoined {
                id: self.id,
                entries: self.entries,
                error,
            }),
        }
    }
}
