//! A container started in a sandbox that already runs: a CRI pod's member
//! (the pod's first container started the sandbox through `lifecycle`).
//! Its root is an image's erofs in a drive slot patched in now
//! (`Sandbox::attach_image`) under a tmpfs overlay, or a host path shared;
//! its host paths join the sandbox's share, its spec is pointed at the
//! entries they got, and the (slow) create runs on a connection of its own,
//! so a front end can hold its lock over the first step only.

use std::path::{Path, PathBuf};

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
    /// Its root is a drive's, overlaid with a tmpfs in the guest.
    overlay: bool,
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

/// Step 1: gives `sandbox` the root `image` (an erofs; the spec's root
/// then names its mount), shares `shares` (a spec written for entries
/// 0..n, as `storage::shared::guest_source` names them) into it and opens
/// a connection for the create. Nothing is left shared when it fails (a
/// drive slot keeps its image: a slot is never given another).
pub fn join(
    sandbox: &mut Sandbox,
    id: &str,
    mut spec: Spec,
    shares: &[HostShare],
    image: Option<&Path>,
) -> Result<Joining> {
    // Checked before a slot is given: a slot is never given back.
    if !shares.is_empty() && sandbox.shared_storage().is_none() {
        return Err(crate::sandbox::SandboxError::NoShares(sandbox.id.clone()).into());
    }
    let mut storage = Vec::new();
    if let Some(image) = image {
        let device = sandbox.attach_image(image)?;
        // One mount per slot, shared by the image's containers (the agent
        // counts its users).
        let point = format!("image-{}", device.trim_start_matches("/dev/"));
        storage.push(husk_protocol::agent::Storage {
            source: device,
            fstype: "erofs".into(),
            options: vec!["ro".into()],
            mount_point: point.clone(),
            ..Default::default()
        });
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(PathBuf::from(point));
        spec.set_root(Some(root));
    }
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
    storage.extend(sandbox.shared_storage());
    Ok(Joining {
        id: id.to_string(),
        spec,
        entries,
        agent,
        storage,
        overlay: image.is_some(),
    })
}

impl Joining {
    /// Step 2: CreateContainer (containerd starts it separately).
    pub fn create_only(self, io: Io) -> std::result::Result<Member, NotJoined> {
        match self
            .agent
            .create_only(&self.id, &self.spec, io, self.storage, self.overlay)
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
