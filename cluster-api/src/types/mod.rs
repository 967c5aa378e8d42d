//! The cluster's objects, as kept in etcd (JSON) and carried by the API:
//! Swarm's model — nodes, services (desired state), tasks (one container
//! in one sandbox on one node, for one slot of a service).

pub mod node;
pub mod placement;
pub mod service;
pub mod task;
pub mod time;

/// A value the cluster's objects cannot take, and why (a spec, a flag, a
/// constraint): what the API answers INVALID_ARGUMENT with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

pub(crate) type Result<T> = std::result::Result<T, Invalid>;

pub use node::*;
pub use service::*;
pub use task::*;
pub use time::*;
