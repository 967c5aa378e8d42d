//! Containers: the OCI spec a container gets from its image and the
//! user's options, and the records that outlive the process that ran it.

pub mod record;
pub mod spec;
