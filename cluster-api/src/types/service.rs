//! Services: the desired state of a set of tasks, and how it is updated.

use std::collections::BTreeMap;

use crate::types::{Invalid, Result};
use serde::{Deserialize, Serialize};

use crate::types::node::Resources;
use crate::types::placement::{spread_key, Constraint};

/// A mount of a task's container: a named volume (`volume`, created on
/// the node when missing) or a tmpfs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSpec {
    #[serde(rename = "type")]
    pub typ: MountType,
    #[serde(default)]
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A published port, host mode: bound on the node the task runs on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortSpec {
    pub published: u16,
    pub target: u16,
    pub protocol: Protocol,
}

/// What a service's mount is (the JSON's "volume" or "tmpfs").
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    #[default]
    Volume,
    Tmpfs,
}

impl MountType {
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Volume => "volume",
            MountType::Tmpfs => "tmpfs",
        }
    }
}

impl std::str::FromStr for MountType {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<MountType> {
        match s {
            "volume" => Ok(MountType::Volume),
            "tmpfs" => Ok(MountType::Tmpfs),
            _ => Err(Invalid(format!("mount type {s:?}: volume or tmpfs"))),
        }
    }
}

/// A published port's protocol: the runtime's, which runs it.
pub use husk_runtime::net::ports::Protocol;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Mode {
    Replicated { replicas: u64 },
    Global,
}

impl Default for Mode {
    fn default() -> Mode {
        Mode::Replicated { replicas: 1 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Placement {
    /// `node.role==manager`, `node.labels.zone!=a`, ...
    #[serde(default)]
    pub constraints: Vec<String>,
    /// `spread=node.labels.zone`, in order of precedence.
    #[serde(default)]
    pub preferences: Vec<String>,
    /// 0 = no limit.
    #[serde(default)]
    pub max_replicas_per_node: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    #[default]
    Any,
    OnFailure,
    None,
}

impl std::str::FromStr for RestartCondition {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<RestartCondition> {
        match s {
            "any" => Ok(RestartCondition::Any),
            "on-failure" => Ok(RestartCondition::OnFailure),
            "none" => Ok(RestartCondition::None),
            _ => Err(Invalid(format!(
                "restart condition {s:?}: none, on-failure or any"
            ))),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestartPolicy {
    #[serde(default)]
    pub condition: RestartCondition,
    /// Between a task ending and its replacement (Swarm: 5 s).
    pub delay_ms: u64,
    /// Restarts within `window_ms` before giving up; 0 = unlimited.
    #[serde(default)]
    pub max_attempts: u64,
    /// 0 = for ever.
    #[serde(default)]
    pub window_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay_ms: 5000,
            max_attempts: 0,
            window_ms: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

impl std::str::FromStr for FailureAction {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<FailureAction> {
        match s {
            "pause" => Ok(FailureAction::Pause),
            "continue" => Ok(FailureAction::Continue),
            "rollback" => Ok(FailureAction::Rollback),
            _ => Err(Invalid(format!(
                "failure action {s:?}: pause, continue or rollback"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    #[default]
    StopFirst,
    StartFirst,
}

impl std::str::FromStr for UpdateOrder {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<UpdateOrder> {
        match s {
            "stop-first" => Ok(UpdateOrder::StopFirst),
            "start-first" => Ok(UpdateOrder::StartFirst),
            _ => Err(Invalid(format!(
                "update order {s:?}: stop-first or start-first"
            ))),
        }
    }
}

/// Rolling updates (and rollbacks), with Swarm's defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0 = all.
    pub parallelism: u64,
    pub delay_ms: u64,
    #[serde(default)]
    pub failure_action: FailureAction,
    /// How long a new task must keep running to count as updated.
    pub monitor_ms: u64,
    /// Failed fraction tolerated before the failure action.
    #[serde(default)]
    pub max_failure_ratio: f64,
    #[serde(default)]
    pub order: UpdateOrder,
}

impl Default for UpdateConfig {
    fn default() -> UpdateConfig {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            failure_action: FailureAction::Pause,
            monitor_ms: 5000,
            max_failure_ratio: 0.0,
            order: UpdateOrder::StopFirst,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Healthcheck {
    /// The command, run in the container (`CMD-SHELL` form when one string).
    pub test: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u64,
    pub start_period_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct ResourceSpec {
    #[serde(default)]
    pub reservations: Resources,
    #[serde(default)]
    pub limits: Resources,
}

/// When a dependency counts as up (compose's depends_on conditions).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DependCondition {
    /// A task of it runs.
    #[default]
    Started,
    /// A task of it runs and passes its healthcheck.
    Healthy,
    /// A task of it exited 0.
    Completed,
}

/// A service that must be up before this one's tasks start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dependency {
    pub service: String,
    #[serde(default)]
    pub condition: DependCondition,
}

/// What a service should be: Swarm's ServiceSpec, flattened.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct ServiceSpec {
    pub name: String,
    pub image: String,
    /// Replaces the image's Cmd when not empty.
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub resources: ResourceSpec,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub update_config: UpdateConfig,
    #[serde(default)]
    pub rollback_config: UpdateConfig,
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Started first (stacks' depends_on).
    #[serde(default)]
    pub depends_on: Vec<Dependency>,
}

impl ServiceSpec {
    /// Refuses what cannot run: a clear message naming the field.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        if self.image.trim().is_empty() {
            return Err(Invalid(format!("service {}: no image", self.name)));
        }
        for c in &self.placement.constraints {
            Constraint::parse(c)?;
        }
        for p in &self.placement.preferences {
            spread_key(p)?;
        }
        let mut volumes = std::collections::HashSet::new();
        for m in &self.mounts {
            match m.typ {
                MountType::Volume => {
                    husk_runtime::storage::volume::check_name(&m.source)
                        .map_err(|e| Invalid(e.to_string()))?;
                    // A volume is leased to one sandbox, once.
                    if !volumes.insert(m.source.as_str()) {
                        return Err(Invalid(format!("volume {} is mounted twice", m.source)));
                    }
                }
                MountType::Tmpfs => {}
            }
            // The node refuses what the runtime's lifecycle refuses: say so here.
            husk_runtime::container::lifecycle::check_target(&m.target)
                .map_err(|e| Invalid(e.to_string()))?;
        }
        for p in &self.ports {
            if p.published == 0 || p.target == 0 {
                return Err(Invalid(format!(
                    "port {}:{}: both must be 1-65535",
                    p.published, p.target
                )));
            }
        }
        for u in [&self.update_config, &self.rollback_config] {
            if !(0.0..=1.0).contains(&u.max_failure_ratio) {
                return Err(Invalid(format!(
                    "max failure ratio {}: 0 to 1",
                    u.max_failure_ratio
                )));
            }
        }
        if let Some(h) = &self.healthcheck {
            let kind = h.test.first().map(String::as_str);
            if !matches!(kind, Some("CMD" | "CMD-SHELL")) || h.test.len() < 2 {
                return Err(Invalid(format!(
                    "healthcheck test {:?}: [\"CMD\", args...] or [\"CMD-SHELL\", command]",
                    h.test
                )));
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 {
                return Err(Invalid(
                    "healthcheck interval and timeout must be more than 0".to_string(),
                ));
            }
        }
        Ok(())
    }
}

/// Service, stack and volume names: Docker's rule.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(Invalid(format!(
            "name {name:?}: 1-63 of [a-zA-Z0-9_.-], starting with a letter or digit"
        )));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub started_ms: u64,
    #[serde(default)]
    pub completed_ms: u64,
    #[serde(default)]
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub id: String,
    pub spec: ServiceSpec,
    /// Bumped by every update: tasks record the one they run.
    pub version: u64,
    /// The spec before the last update, for rollback.
    #[serde(default)]
    pub previous_spec: Option<ServiceSpec>,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default)]
    pub update_status: Option<UpdateStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_specs_are_named() {
        let mut s = ServiceSpec {
            name: "web".into(),
            image: "busybox".into(),
            ..Default::default()
        };
        s.validate().unwrap();
        s.placement.constraints = vec!["node.rol==manager".into()];
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("node.rol"));
        s.placement.constraints.clear();
        s.healthcheck = Some(Healthcheck {
            test: vec!["CMD".into()],
            interval_ms: 1000,
            timeout_ms: 1000,
            ..Default::default()
        });
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("healthcheck"));
        s.healthcheck = None;
        let vol = |target: &str| MountSpec {
            typ: MountType::Volume,
            source: "data".into(),
            target: target.into(),
            read_only: false,
        };
        s.mounts = vec![vol("/a"), vol("/b")];
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("mounted twice"));
        s.mounts = vec![vol("/a/../b")];
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("without .."));
        s.mounts.clear();
        s.name = "-x".into();
        assert!(s.validate().is_err());
    }
}
