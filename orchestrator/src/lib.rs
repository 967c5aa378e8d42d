//! huskd: a Swarm-style orchestrator whose tasks are husk microVM
//! sandboxes. Managers keep the desired state in etcd and one of them (an
//! etcd election) places tasks and reconciles; every node runs the tasks
//! given to it with husk-runtime and reports what they do.
//!
//! As swarmkit splits its manager: `api` serves the cluster API (control
//! socket and cluster endpoint), `manager` is the control operations and
//! the leader's loops over the `store` (etcd), `orchestrator` reconciles
//! services into tasks, `scheduler` places them, `node` is one huskd (its
//! identity, its roles, its session with the managers, the executor that
//! runs its tasks), `pki` the cluster's certificate authority.

pub use husk_cluster_api::pb;
pub mod api;
pub mod error;
pub mod manager;
pub mod node;
pub mod orchestrator;
pub mod pki;
pub mod roles;
pub mod scheduler;
pub mod store;
pub mod types;
pub mod util;
