//! The cluster's objects, as kept in etcd (JSON) and carried by the API:
//! Swarm's model — nodes, services (desired state), tasks (one container
//! in one sandbox on one node, for one slot of a service).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Docker's (and compose's) durations: 300ms, 10s, 1m30s, 1h; a bare number is
/// seconds.
pub fn parse_duration(t: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("duration {t:?}: e.g. 500ms, 10s, 1m30s");
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n * 1000);
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = t.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next().unwrap_or('s'));
        }
        let v: f64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total += v * match unit.as_str() {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(bad());
    }
    Ok(total as u64)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            _ => bail!("role {s:?}: manager or worker"),
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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Availability> {
        match s {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            _ => bail!("availability {s:?}: active, pause or drain"),
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

/// A mount of a task's container: a named volume (`volume`, created on
/// the node when missing) or a tmpfs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSpec {
    /// "volume" or "tmpfs".
    #[serde(rename = "type")]
    pub typ: String,
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
    /// "tcp" or "udp".
    pub protocol: String,
}

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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<RestartCondition> {
        match s {
            "any" => Ok(RestartCondition::Any),
            "on-failure" => Ok(RestartCondition::OnFailure),
            "none" => Ok(RestartCondition::None),
            _ => bail!("restart condition {s:?}: none, on-failure or any"),
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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<FailureAction> {
        match s {
            "pause" => Ok(FailureAction::Pause),
            "continue" => Ok(FailureAction::Continue),
            "rollback" => Ok(FailureAction::Rollback),
            _ => bail!("failure action {s:?}: pause, continue or rollback"),
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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<UpdateOrder> {
        match s {
            "stop-first" => Ok(UpdateOrder::StopFirst),
            "start-first" => Ok(UpdateOrder::StartFirst),
            _ => bail!("update order {s:?}: stop-first or start-first"),
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
            bail!("service {}: no image", self.name);
        }
        for c in &self.placement.constraints {
            crate::sched::Constraint::parse(c)?;
        }
        for p in &self.placement.preferences {
            crate::sched::spread_key(p)?;
        }
        for m in &self.mounts {
            match m.typ.as_str() {
                "volume" => husk_runtime::volume::check_name(&m.source)?,
                "tmpfs" => {}
                t => bail!("mount type {t:?}: volume or tmpfs"),
            }
            if !m.target.starts_with('/') {
                bail!("mount target {:?}: an absolute path", m.target);
            }
        }
        for p in &self.ports {
            if p.published == 0 || p.target == 0 {
                bail!("port {}:{}: both must be 1-65535", p.published, p.target);
            }
            if p.protocol != "tcp" && p.protocol != "udp" {
                bail!("port protocol {:?}: tcp or udp", p.protocol);
            }
        }
        for u in [&self.update_config, &self.rollback_config] {
            if !(0.0..=1.0).contains(&u.max_failure_ratio) {
                bail!("max failure ratio {}: 0 to 1", u.max_failure_ratio);
            }
        }
        if let Some(h) = &self.healthcheck {
            let kind = h.test.first().map(String::as_str);
            if !matches!(kind, Some("CMD" | "CMD-SHELL")) || h.test.len() < 2 {
                bail!(
                    "healthcheck test {:?}: [\"CMD\", args...] or [\"CMD-SHELL\", command]",
                    h.test
                );
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 {
                bail!("healthcheck interval and timeout must be more than 0");
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
        bail!("name {name:?}: 1-63 of [a-zA-Z0-9_.-], starting with a letter or digit");
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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<TaskState> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| anyhow::anyhow!("task state {s:?} unknown"))
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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Health> {
        match s {
            "starting" => Ok(Health::Starting),
            "healthy" => Ok(Health::Healthy),
            "unhealthy" => Ok(Health::Unhealthy),
            _ => bail!("health {s:?}: starting, healthy or unhealthy"),
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

/// A random id: 25 lowercase base-36 characters, as Swarm's.
pub fn new_id() -> String {
    let mut b = [0u8; 25];
    // getrandom(2) does not fail for 25 bytes once the pool is ready.
    let _ = husk_runtime::sandbox::getrandom(&mut b);
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    b.iter().map(|x| A[(*x as usize) % 36] as char).collect()
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

    #[test]
    fn ids_are_swarm_shaped() {
        let a = new_id();
        assert_eq!(a.len(), 25);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, new_id());
    }

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
        s.name = "-x".into();
        assert!(s.validate().is_err());
    }
}
