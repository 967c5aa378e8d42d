//! The cluster and its nodes.

use std::collections::BTreeMap;

use crate::types::{Invalid, Result};
use serde::{Deserialize, Serialize};

/// The cluster itself: one per etcd keyspace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterInfo {
    pub id: String,
    pub created_ms: u64,
    /// How often nodes heartbeat.
    pub heartbeat_period_ms: u64,
    /// A node silent this long is down and its tasks are rescheduled.
    pub heartbeat_grace_ms: u64,
    /// Where managers reach the state store.
    pub etcd_endpoints: Vec<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            _ => Err(Invalid(format!("role {s:?}: manager or worker"))),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes new tasks.
    #[default]
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Its tasks move elsewhere.
    Drain,
}

impl std::str::FromStr for Availability {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Availability> {
        match s {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            _ => Err(Invalid(format!(
                "availability {s:?}: active, pause or drain"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    #[default]
    Unknown,
    Ready,
    Down,
}

/// CPUs in billionths (Docker's NanoCPUs) and memory in bytes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Resources {
    #[serde(default)]
    pub nano_cpus: i64,
    #[serde(default)]
    pub memory_bytes: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    /// host:port of its cluster endpoint.
    pub addr: String,
    pub role: Role,
    #[serde(default)]
    pub availability: Availability,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub state: NodeState,
    /// What it has to give tasks.
    #[serde(default)]
    pub resources: Resources,
    pub created_ms: u64,
    #[serde(default)]
    pub updated_ms: u64,
}
