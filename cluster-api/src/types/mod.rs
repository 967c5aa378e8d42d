//! The cluster's objects, as kept in etcd (JSON) and carried by the API:
//! Swarm's model — nodes, services (desired state), tasks (one container
//! in one sandbox on one node, for one slot of a service).

pub mod node;
pub mod placement;
pub mod service;
pub mod task;
pub mod time;

pub use node::*;
pub use service::*;
pub use task::*;
pub use time::*;
