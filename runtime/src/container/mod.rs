//! Containers: one lifecycle for the front ends that run store images
//! (`lifecycle`), the OCI spec a container gets from its image and the
//! user's options (`spec`), and the records that outlive the process that
//! ran it (`record`).

pub mod control;
pub mod lifecycle;
pub mod member;
pub mod record;
pub mod spec;

pub use control::Control;
pub use lifecycle::{
    copy_to_log, Container, ContainerSpec, Mount, MountSource, Net, NotCreated, Plan, Resources,
    Root,
};
pub use member::{join, Joining, Member, NotJoined};
