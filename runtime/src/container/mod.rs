//! Containers: one lifecycle for the front ends that run store images
//! (`lifecycle`), the OCI spec a container gets from its image and the
//! user's options (`spec`), and the records that outlive the process that
//! ran it (`record`).

use crate::guest::GuestError;
use crate::image::ImageError;
use crate::sandbox::SandboxError;
use crate::storage::StorageError;
use crate::util::IoError;

/// A container's spec, start, life and records. Another module's error is
/// kept whole as the source, under the step it failed in.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// What the user asked for cannot be run (a mount, the environment,
    /// the user, the working directory, limits).
    #[error("{0}")]
    Invalid(String),
    /// A front end's mistake: the step needs a store it did not give.
    #[error("{0}")]
    NeedsStore(&'static str),
    #[error("the image")]
    Image(#[from] ImageError),
    #[error("the volumes")]
    Storage(#[from] StorageError),
    /// Boxed: a sandbox's error carries its steps' (and is rare).
    #[error("the sandbox")]
    Sandbox(#[source] Box<SandboxError>),
    #[error("the agent")]
    Guest(#[from] GuestError),
    #[error(transparent)]
    NotCreated(#[from] NotCreated),
    #[error("building the OCI spec")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("{0:?} names more than one container")]
    Ambiguous(String),
    #[error("the name {0:?} is in use by another container (husk rm {0})")]
    NameInUse(String),
    #[error("{what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, ContainerError>;

impl From<SandboxError> for ContainerError {
    fn from(e: SandboxError) -> ContainerError {
        ContainerError::Sandbox(Box::new(e))
    }
}

pub mod control;
pub mod lifecycle;
pub mod logcopy;
pub mod member;
pub mod record;
pub mod spec;

pub use control::Control;
pub use lifecycle::{
    copy_to_log, Container, ContainerSpec, Dns, Mount, MountSource, Net, NotCreated, Plan,
    Resources, Root,
};
pub use member::{join, Joining, Member, NotJoined};
