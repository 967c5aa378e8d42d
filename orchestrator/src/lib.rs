//! huskd: a Swarm-style orchestrator whose tasks are husk microVM
//! sandboxes. Managers keep the desired state in etcd and one of them (an
//! etcd election) places tasks and reconciles; every node runs the tasks
//! given to it with husk-runtime and reports what they do.

pub use husk_cluster_api::pb as api;
pub mod agent;
pub mod daemon;
pub mod error;
pub mod executor;
pub mod manager;
pub mod net;
pub mod pki;
pub mod reconcile;
pub mod sched;
pub mod server;
pub mod store;
pub mod types;
