//! The cluster's objects: husk-cluster-api's, shared with clients.

pub use husk_cluster_api::types::*;
