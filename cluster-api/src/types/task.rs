//! Tasks: one container in one sandbox on one node, for one slot of a
//! service, and the states it goes through.

use crate::types::{Invalid, Result};
use serde::{Deserialize, Serialize};

use crate::types::service::ServiceSpec;

/// Swarm's task states, in the order a task goes through them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Preparing,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Orphaned,
}

impl TaskState {
    /// It will not run again.
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Preparing => "preparing",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Orphaned => "orphaned",
        }
    }
}

impl std::str::FromStr for TaskState {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<TaskState> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| Invalid(format!("task state {s:?} unknown")))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskStatus {
    pub state: TaskState,
    pub timestamp_ms: u64,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub err: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Its healthcheck's verdict, for services that have one.
    #[serde(default)]
    pub health: Option<Health>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl std::str::FromStr for Health {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Health> {
        match s {
            "starting" => Ok(Health::Starting),
            "healthy" => Ok(Health::Healthy),
            "unhealthy" => Ok(Health::Unhealthy),
            _ => Err(Invalid(format!(
                "health {s:?}: starting, healthy or unhealthy"
            ))),
        }
    }
}

/// One container of a service in one sandbox: created by the leader,
/// run by its node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub service_name: String,
    /// 1.. for replicated services; 0 for global ones (one per node).
    pub slot: u64,
    /// Empty while pending.
    #[serde(default)]
    pub node_id: String,
    /// The service version (and spec) it runs.
    pub version: u64,
    pub spec: ServiceSpec,
    /// What the leader wants: Running, or Shutdown to stop it.
    pub desired_state: TaskState,
    pub status: TaskStatus,
    pub created_ms: u64,
}

impl Task {
    /// Swarm's task name: `service.slot`, or `service.node` when global.
    pub fn name(&self) -> String {
        if self.slot > 0 {
            format!("{}.{}", self.service_name, self.slot)
        } else {
            format!("{}.{}", self.service_name, self.node_id)
        }
    }

    /// Wanted and not finished: what counts towards a service's replicas.
    pub fn is_live(&self) -> bool {
        self.desired_state == TaskState::Running && !self.status.state.is_terminal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_states_order_and_parse() {
        assert!(TaskState::Running < TaskState::Complete);
        assert!(TaskState::Failed.is_terminal());
        assert!(!TaskState::Running.is_terminal());
        assert_eq!(
            "orphaned".parse::<TaskState>().unwrap(),
            TaskState::Orphaned
        );
        assert!("sleepy".parse::<TaskState>().is_err());
    }
}
