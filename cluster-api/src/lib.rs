//! huskd's cluster API as its clients see it: the gRPC service
//! (`husk.cluster.v2`, tonic), the cluster's objects it carries (nodes,
//! services, tasks) and a client of the local control socket. huskd builds
//! its server on the same crate (feature `server`).

pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("husk.cluster.v2");
}
pub mod client;
pub mod convert;
pub mod types;
