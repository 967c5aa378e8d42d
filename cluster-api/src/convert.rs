//! The cluster's objects between their two forms: the serde types of
//! `types` (what etcd keeps, what the CLI prints as JSON) and the protobuf
//! messages of `pb` (what travels). Domain → wire cannot fail; wire →
//! domain refuses what a peer left out or sent from a version this build
//! does not know, naming the field, so a version skew is a clear error at
//! the edge rather than a wrong default deep inside.

use crate::pb;
use crate::types::*;

/// A message that does not make a valid object.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConvertError {
    /// An enum field left unspecified, or set to a value this build does
    /// not know (a newer peer).
    #[error("{field}: value {value} is not one this version of husk knows")]
    UnknownValue { field: &'static str, value: i32 },
    /// A required message field is absent.
    #[error("{0}: missing")]
    Missing(&'static str),
    /// A number out of its domain's range.
    #[error("{field}: {value} is out of range")]
    OutOfRange { field: &'static str, value: u64 },
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

/// Pairs a domain enum with its wire enum: `From` one way, `TryFrom` the
/// other (the wire's UNSPECIFIED, and values it does not list, refused),
/// and `decode` from the raw i32 prost keeps in a message.
macro_rules! enums {
    ($($dom:ident <=> $wire:ident, $field:literal { $($d:ident <=> $w:ident),+ $(,)? })+) => {$(
        impl From<$dom> for pb::$wire {
            fn from(v: $dom) -> pb::$wire {
                match v { $($dom::$d => pb::$wire::$w),+ }
            }
        }
        impl TryFrom<pb::$wire> for $dom {
            type Error = ConvertError;
            fn try_from(v: pb::$wire) -> Result<$dom> {
                match v {
                    $(pb::$wire::$w => Ok($dom::$d),)+
                    #[allow(unreachable_patterns)]
                    other => Err(ConvertError::UnknownValue { field: $field, value: other as i32 }),
                }
            }
        }
        impl Decode for $dom {
            fn decode(v: i32) -> Result<$dom> {
                pb::$wire::try_from(v)
                    .map_err(|_| ConvertError::UnknownValue { field: $field, value: v })?
                    .try_into()
            }
        }
    )+};
}

/// A domain enum from the i32 a prost message holds.
pub trait Decode: Sized {
    fn decode(v: i32) -> Result<Self>;
}

enums! {
    Role <=> Role, "role" { Manager <=> Manager, Worker <=> Worker }
    Availability <=> Availability, "availability" {
        Active <=> Active, Pause <=> Pause, Drain <=> Drain
    }
    NodeState <=> NodeState, "node state" {
        Unknown <=> Unknown, Ready <=> Ready, Down <=> Down
    }
    TaskState <=> TaskState, "task state" {
        New <=> New, Pending <=> Pending, Assigned <=> Assigned, Preparing <=> Preparing,
        Starting <=> Starting, Running <=> Running, Complete <=> Complete,
        Shutdown <=> Shutdown, Failed <=> Failed, Rejected <=> Rejected, Orphaned <=> Orphaned
    }
    RestartCondition <=> RestartCondition, "restart condition" {
        Any <=> Any, OnFailure <=> OnFailure, None <=> None
    }
    FailureAction <=> FailureAction, "failure action" {
        Pause <=> Pause, Continue <=> Continue, Rollback <=> Rollback
    }
    UpdateOrder <=> UpdateOrder, "update order" {
        StopFirst <=> StopFirst, StartFirst <=> StartFirst
    }
    UpdateState <=> UpdateState, "update state" {
        Updating <=> Updating, Paused <=> Paused, Completed <=> Completed,
        RollbackStarted <=> RollbackStarted, RollbackPaused <=> RollbackPaused,
        RollbackCompleted <=> RollbackCompleted
    }
    DependCondition <=> DependCondition, "dependency condition" {
        Started <=> Started, Healthy <=> Healthy, Completed <=> Completed
    }
    MountType <=> MountType, "mount type" { Volume <=> Volume, Tmpfs <=> Tmpfs }
    Protocol <=> Protocol, "port protocol" { Tcp <=> Tcp, Udp <=> Udp }
}

/// A task's health: none is the wire's HEALTH_NONE, not an error.
fn health_to_wire(h: Option<Health>) -> pb::Health {
    match h {
        None => pb::Health::None,
        Some(Health::Starting) => pb::Health::Starting,
        Some(Health::Healthy) => pb::Health::Healthy,
        Some(Health::Unhealthy) => pb::Health::Unhealthy,
    }
}

fn health_from_wire(v: i32) -> Result<Option<Health>> {
    match pb::Health::try_from(v) {
        Ok(pb::Health::None) => Ok(None),
        Ok(pb::Health::Starting) => Ok(Some(Health::Starting)),
        Ok(pb::Health::Healthy) => Ok(Some(Health::Healthy)),
        Ok(pb::Health::Unhealthy) => Ok(Some(Health::Unhealthy)),
        Err(_) => Err(ConvertError::UnknownValue {
            field: "health",
            value: v,
        }),
    }
}

fn port_number(field: &'static str, v: u32) -> Result<u16> {
    u16::try_from(v).map_err(|_| ConvertError::OutOfRange {
        field,
        value: v.into(),
    })
}

// ------------------------------------------------------------------ nodes

impl From<Resources> for pb::Resources {
    fn from(r: Resources) -> pb::Resources {
        pb::Resources {
            nano_cpus: r.nano_cpus,
            memory_bytes: r.memory_bytes,
        }
    }
}

impl From<pb::Resources> for Resources {
    fn from(r: pb::Resources) -> Resources {
        Resources {
            nano_cpus: r.nano_cpus,
            memory_bytes: r.memory_bytes,
        }
    }
}

impl From<Node> for pb::Node {
    fn from(n: Node) -> pb::Node {
        pb::Node {
            id: n.id,
            hostname: n.hostname,
            addr: n.addr,
            role: pb::Role::from(n.role).into(),
            availability: pb::Availability::from(n.availability).into(),
            labels: n.labels,
            state: pb::NodeState::from(n.state).into(),
            resources: Some(n.resources.into()),
            created_ms: n.created_ms,
            updated_ms: n.updated_ms,
        }
    }
}

impl TryFrom<pb::Node> for Node {
    type Error = ConvertError;
    fn try_from(n: pb::Node) -> Result<Node> {
        Ok(Node {
            id: n.id,
            hostname: n.hostname,
            addr: n.addr,
            role: Role::decode(n.role)?,
            availability: Availability::decode(n.availability)?,
            labels: n.labels,
            state: NodeState::decode(n.state)?,
            resources: n.resources.map(Into::into).unwrap_or_default(),
            created_ms: n.created_ms,
            updated_ms: n.updated_ms,
        })
    }
}

// ------------------------------------------------------------------ services

impl From<MountSpec> for pb::Mount {
    fn from(m: MountSpec) -> pb::Mount {
        pb::Mount {
            r#type: pb::MountType::from(m.typ).into(),
            source: m.source,
            target: m.target,
            read_only: m.read_only,
        }
    }
}

impl TryFrom<pb::Mount> for MountSpec {
    type Error = ConvertError;
    fn try_from(m: pb::Mount) -> Result<MountSpec> {
        Ok(MountSpec {
            typ: MountType::decode(m.r#type)?,
            source: m.source,
            target: m.target,
            read_only: m.read_only,
        })
    }
}

impl From<PortSpec> for pb::Port {
    fn from(p: PortSpec) -> pb::Port {
        pb::Port {
            published: p.published.into(),
            target: p.target.into(),
            protocol: pb::Protocol::from(p.protocol).into(),
        }
    }
}

impl TryFrom<pb::Port> for PortSpec {
    type Error = ConvertError;
    fn try_from(p: pb::Port) -> Result<PortSpec> {
        Ok(PortSpec {
            published: port_number("port published", p.published)?,
            target: port_number("port target", p.target)?,
            protocol: Protocol::decode(p.protocol)?,
        })
    }
}

impl From<Placement> for pb::Placement {
    fn from(p: Placement) -> pb::Placement {
        pb::Placement {
            constraints: p.constraints,
            preferences: p.preferences,
            max_replicas_per_node: p.max_replicas_per_node,
        }
    }
}

impl From<pb::Placement> for Placement {
    fn from(p: pb::Placement) -> Placement {
        Placement {
            constraints: p.constraints,
            preferences: p.preferences,
            max_replicas_per_node: p.max_replicas_per_node,
        }
    }
}

impl From<RestartPolicy> for pb::RestartPolicy {
    fn from(r: RestartPolicy) -> pb::RestartPolicy {
        pb::RestartPolicy {
            condition: pb::RestartCondition::from(r.condition).into(),
            delay_ms: r.delay_ms,
            max_attempts: r.max_attempts,
            window_ms: r.window_ms,
        }
    }
}

impl TryFrom<pb::RestartPolicy> for RestartPolicy {
    type Error = ConvertError;
    fn try_from(r: pb::RestartPolicy) -> Result<RestartPolicy> {
        Ok(RestartPolicy {
            condition: RestartCondition::decode(r.condition)?,
            delay_ms: r.delay_ms,
            max_attempts: r.max_attempts,
            window_ms: r.window_ms,
        })
    }
}

impl From<UpdateConfig> for pb::UpdateConfig {
    fn from(u: UpdateConfig) -> pb::UpdateConfig {
        pb::UpdateConfig {
            parallelism: u.parallelism,
            delay_ms: u.delay_ms,
            failure_action: pb::FailureAction::from(u.failure_action).into(),
            monitor_ms: u.monitor_ms,
            max_failure_ratio: u.max_failure_ratio,
            order: pb::UpdateOrder::from(u.order).into(),
        }
    }
}

impl TryFrom<pb::UpdateConfig> for UpdateConfig {
    type Error = ConvertError;
    fn try_from(u: pb::UpdateConfig) -> Result<UpdateConfig> {
        Ok(UpdateConfig {
            parallelism: u.parallelism,
            delay_ms: u.delay_ms,
            failure_action: FailureAction::decode(u.failure_action)?,
            monitor_ms: u.monitor_ms,
            max_failure_ratio: u.max_failure_ratio,
            order: UpdateOrder::decode(u.order)?,
        })
    }
}

impl From<Healthcheck> for pb::Healthcheck {
    fn from(h: Healthcheck) -> pb::Healthcheck {
        pb::Healthcheck {
            test: h.test,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            retries: h.retries,
            start_period_ms: h.start_period_ms,
        }
    }
}

impl From<pb::Healthcheck> for Healthcheck {
    fn from(h: pb::Healthcheck) -> Healthcheck {
        Healthcheck {
            test: h.test,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            retries: h.retries,
            start_period_ms: h.start_period_ms,
        }
    }
}

impl From<ServiceSpec> for pb::ServiceSpec {
    fn from(s: ServiceSpec) -> pb::ServiceSpec {
        pb::ServiceSpec {
            name: s.name,
            image: s.image,
            args: s.args,
            env: s.env,
            mounts: s.mounts.into_iter().map(Into::into).collect(),
            ports: s.ports.into_iter().map(Into::into).collect(),
            mode: Some(match s.mode {
                Mode::Replicated { replicas } => {
                    pb::service_spec::Mode::Replicated(pb::Replicated { replicas })
                }
                Mode::Global => pb::service_spec::Mode::Global(pb::Global {}),
            }),
            placement: Some(s.placement.into()),
            resources: Some(pb::ResourceSpec {
                reservations: Some(s.resources.reservations.into()),
                limits: Some(s.resources.limits.into()),
            }),
            restart_policy: Some(s.restart_policy.into()),
            update_config: Some(s.update_config.into()),
            rollback_config: Some(s.rollback_config.into()),
            healthcheck: s.healthcheck.map(Into::into),
            labels: s.labels,
            depends_on: s
                .depends_on
                .into_iter()
                .map(|d| pb::Dependency {
                    service: d.service,
                    condition: pb::DependCondition::from(d.condition).into(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::ServiceSpec> for ServiceSpec {
    type Error = ConvertError;
    fn try_from(s: pb::ServiceSpec) -> Result<ServiceSpec> {
        let mode = match s.mode.ok_or(ConvertError::Missing("service mode"))? {
            pb::service_spec::Mode::Replicated(r) => Mode::Replicated {
                replicas: r.replicas,
            },
            pb::service_spec::Mode::Global(_) => Mode::Global,
        };
        let resources = s.resources.unwrap_or_default();
        Ok(ServiceSpec {
            name: s.name,
            image: s.image,
            args: s.args,
            env: s.env,
            mounts: s
                .mounts
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            ports: s
                .ports
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            mode,
            placement: s.placement.map(Into::into).unwrap_or_default(),
            resources: ResourceSpec {
                reservations: resources.reservations.map(Into::into).unwrap_or_default(),
                limits: resources.limits.map(Into::into).unwrap_or_default(),
            },
            restart_policy: s
                .restart_policy
                .map(TryInto::try_into)
                .transpose()?
                .unwrap_or_default(),
            update_config: s
                .update_config
                .map(TryInto::try_into)
                .transpose()?
                .unwrap_or_default(),
            rollback_config: s
                .rollback_config
                .map(TryInto::try_into)
                .transpose()?
                .unwrap_or_default(),
            healthcheck: s.healthcheck.map(Into::into),
            labels: s.labels,
            depends_on: s
                .depends_on
                .into_iter()
                .map(|d| {
                    Ok(Dependency {
                        service: d.service,
                        condition: DependCondition::decode(d.condition)?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

impl From<UpdateStatus> for pb::UpdateStatus {
    fn from(u: UpdateStatus) -> pb::UpdateStatus {
        pb::UpdateStatus {
            state: pb::UpdateState::from(u.state).into(),
            started_ms: u.started_ms,
            completed_ms: u.completed_ms,
            message: u.message,
        }
    }
}

impl TryFrom<pb::UpdateStatus> for UpdateStatus {
    type Error = ConvertError;
    fn try_from(u: pb::UpdateStatus) -> Result<UpdateStatus> {
        Ok(UpdateStatus {
            state: UpdateState::decode(u.state)?,
            started_ms: u.started_ms,
            completed_ms: u.completed_ms,
            message: u.message,
        })
    }
}

impl From<Service> for pb::Service {
    fn from(s: Service) -> pb::Service {
        pb::Service {
            id: s.id,
            spec: Some(s.spec.into()),
            version: s.version,
            previous_spec: s.previous_spec.map(Into::into),
            created_ms: s.created_ms,
            updated_ms: s.updated_ms,
            update_status: s.update_status.map(Into::into),
        }
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ConvertError;
    fn try_from(s: pb::Service) -> Result<Service> {
        Ok(Service {
            id: s.id,
            spec: s
                .spec
                .ok_or(ConvertError::Missing("service spec"))?
                .try_into()?,
            version: s.version,
            previous_spec: s.previous_spec.map(TryInto::try_into).transpose()?,
            created_ms: s.created_ms,
            updated_ms: s.updated_ms,
            update_status: s.update_status.map(TryInto::try_into).transpose()?,
        })
    }
}

// ------------------------------------------------------------------ tasks

impl From<TaskStatus> for pb::TaskStatus {
    fn from(s: TaskStatus) -> pb::TaskStatus {
        pb::TaskStatus {
            state: pb::TaskState::from(s.state).into(),
            timestamp_ms: s.timestamp_ms,
            message: s.message,
            err: s.err,
            exit_code: s.exit_code,
            health: health_to_wire(s.health).into(),
        }
    }
}

impl TryFrom<pb::TaskStatus> for TaskStatus {
    type Error = ConvertError;
    fn try_from(s: pb::TaskStatus) -> Result<TaskStatus> {
        Ok(TaskStatus {
            state: TaskState::decode(s.state)?,
            timestamp_ms: s.timestamp_ms,
            message: s.message,
            err: s.err,
            exit_code: s.exit_code,
            health: health_from_wire(s.health)?,
        })
    }
}

impl From<Task> for pb::Task {
    fn from(t: Task) -> pb::Task {
        pb::Task {
            id: t.id,
            service_id: t.service_id,
            service_name: t.service_name,
            slot: t.slot,
            node_id: t.node_id,
            version: t.version,
            spec: Some(t.spec.into()),
            desired_state: pb::TaskState::from(t.desired_state).into(),
            status: Some(t.status.into()),
            created_ms: t.created_ms,
        }
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = ConvertError;
    fn try_from(t: pb::Task) -> Result<Task> {
        Ok(Task {
            id: t.id,
            service_id: t.service_id,
            service_name: t.service_name,
            slot: t.slot,
            node_id: t.node_id,
            version: t.version,
            spec: t
                .spec
                .ok_or(ConvertError::Missing("task spec"))?
                .try_into()?,
            desired_state: TaskState::decode(t.desired_state)?,
            status: t
                .status
                .ok_or(ConvertError::Missing("task status"))?
                .try_into()?,
            created_ms: t.created_ms,
        })
    }
}

/// Each element converted; the first that is not valid is the error.
pub fn all<W, D: TryFrom<W, Error = ConvertError>>(v: Vec<W>) -> Result<Vec<D>> {
    v.into_iter().map(D::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            image: "husk.local/busybox:latest".into(),
            args: vec!["httpd".into(), "-f".into()],
            env: vec!["A=1".into()],
            mounts: vec![
                MountSpec {
                    typ: MountType::Volume,
                    source: "data".into(),
                    target: "/data".into(),
                    read_only: true,
                },
                MountSpec {
                    typ: MountType::Tmpfs,
                    source: String::new(),
                    target: "/tmp".into(),
                    read_only: false,
                },
            ],
            ports: vec![PortSpec {
                published: 8080,
                target: 80,
                protocol: Protocol::Udp,
            }],
            mode: Mode::Global,
            placement: Placement {
                constraints: vec!["node.role==worker".into()],
                preferences: vec!["spread=node.labels.zone".into()],
                max_replicas_per_node: 2,
            },
            resources: ResourceSpec {
                reservations: Resources {
                    nano_cpus: 500_000_000,
                    memory_bytes: 64 << 20,
                },
                limits: Resources {
                    nano_cpus: 1_000_000_000,
                    memory_bytes: 128 << 20,
                },
            },
            restart_policy: RestartPolicy {
                condition: RestartCondition::OnFailure,
                delay_ms: 10,
                max_attempts: 3,
                window_ms: 60_000,
            },
            update_config: UpdateConfig {
                parallelism: 2,
                delay_ms: 5,
                failure_action: FailureAction::Rollback,
                monitor_ms: 1000,
                max_failure_ratio: 0.25,
                order: UpdateOrder::StartFirst,
            },
            rollback_config: UpdateConfig::default(),
            healthcheck: Some(Healthcheck {
                test: vec!["CMD".into(), "true".into()],
                interval_ms: 1000,
                timeout_ms: 500,
                retries: 3,
                start_period_ms: 0,
            }),
            labels: [("com.docker.stack.namespace".to_string(), "app".to_string())].into(),
            depends_on: vec![Dependency {
                service: "db".into(),
                condition: DependCondition::Healthy,
            }],
        }
    }

    #[test]
    fn every_object_makes_the_round_trip() {
        let s = Service {
            id: "s1".into(),
            spec: spec(),
            version: 4,
            previous_spec: Some(ServiceSpec {
                mode: Mode::Replicated { replicas: 3 },
                healthcheck: None,
                ..spec()
            }),
            created_ms: 1,
            updated_ms: 2,
            update_status: Some(UpdateStatus {
                state: UpdateState::RollbackPaused,
                started_ms: 3,
                completed_ms: 0,
                message: "paused".into(),
            }),
        };
        assert_eq!(Service::try_from(pb::Service::from(s.clone())), Ok(s));

        let t = Task {
            id: "t1".into(),
            service_id: "s1".into(),
            service_name: "web".into(),
            slot: 1,
            node_id: "n1".into(),
            version: 4,
            spec: spec(),
            desired_state: TaskState::Running,
            status: TaskStatus {
                state: TaskState::Failed,
                timestamp_ms: 9,
                message: "exited".into(),
                err: "code 1".into(),
                exit_code: Some(1),
                health: Some(Health::Unhealthy),
            },
            created_ms: 5,
        };
        assert_eq!(Task::try_from(pb::Task::from(t.clone())), Ok(t.clone()));
        let no_health = Task {
            status: TaskStatus {
                exit_code: None,
                health: None,
                ..t.status.clone()
            },
            ..t
        };
        assert_eq!(
            Task::try_from(pb::Task::from(no_health.clone())),
            Ok(no_health)
        );

        let n = Node {
            id: "n1".into(),
            hostname: "node1".into(),
            addr: "10.0.0.1:4243".into(),
            role: Role::Worker,
            availability: Availability::Drain,
            labels: [("zone".to_string(), "a".to_string())].into(),
            state: NodeState::Down,
            resources: Resources {
                nano_cpus: 2_000_000_000,
                memory_bytes: 1 << 30,
            },
            created_ms: 1,
            updated_ms: 2,
        };
        assert_eq!(Node::try_from(pb::Node::from(n.clone())), Ok(n));
    }

    #[test]
    fn what_a_peer_left_out_or_does_not_share_is_named() {
        let mut w = pb::Task::from(Task {
            id: "t".into(),
            service_id: "s".into(),
            service_name: "web".into(),
            slot: 1,
            node_id: String::new(),
            version: 1,
            spec: spec(),
            desired_state: TaskState::Running,
            status: TaskStatus {
                state: TaskState::New,
                timestamp_ms: 0,
                message: String::new(),
                err: String::new(),
                exit_code: None,
                health: None,
            },
            created_ms: 0,
        });
        w.desired_state = 0;
        assert_eq!(
            Task::try_from(w.clone()).unwrap_err().to_string(),
            "task state: value 0 is not one this version of husk knows"
        );
        w.desired_state = 99;
        assert!(matches!(
            Task::try_from(w.clone()),
            Err(ConvertError::UnknownValue { value: 99, .. })
        ));
        w.desired_state = pb::TaskState::Running.into();
        w.spec.as_mut().unwrap().mode = None;
        assert_eq!(
            Task::try_from(w.clone()),
            Err(ConvertError::Missing("service mode"))
        );
        w.spec = None;
        assert_eq!(Task::try_from(w), Err(ConvertError::Missing("task spec")));

        let p = pb::Port {
            published: 70_000,
            target: 80,
            protocol: pb::Protocol::Tcp.into(),
        };
        assert!(matches!(
            PortSpec::try_from(p),
            Err(ConvertError::OutOfRange { value: 70_000, .. })
        ));
        let m = pb::Mount {
            r#type: 0,
            source: "x".into(),
            target: "/x".into(),
            read_only: false,
        };
        assert!(MountSpec::try_from(m).is_err());
    }

    #[test]
    fn a_spec_without_optional_parts_takes_the_defaults() {
        let w = pb::ServiceSpec {
            name: "web".into(),
            image: "busybox".into(),
            mode: Some(pb::service_spec::Mode::Replicated(pb::Replicated {
                replicas: 2,
            })),
            ..Default::default()
        };
        let s = ServiceSpec::try_from(w).unwrap();
        assert_eq!(s.restart_policy, RestartPolicy::default());
        assert_eq!(s.update_config, UpdateConfig::default());
        assert_eq!(s.mode, Mode::Replicated { replicas: 2 });
        assert!(s.healthcheck.is_none());
    }
}
