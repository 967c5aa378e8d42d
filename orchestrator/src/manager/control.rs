//! The control operations: nodes, services and tasks as the API asks,
//! straight from etcd on any manager.

use crate::error::ControlError;
use crate::store;
use crate::util::new_id;

use super::*;

impl Manager {
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let mut v: Vec<Node> = self
            .store
            .list::<Node>(&store::nodes())
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        v.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    /// A node by id, unique id prefix or hostname.
    pub async fn find_node(&self, name: &str) -> Result<Node> {
        let nodes = self.nodes().await?;
        pick(nodes, name, |n| &n.id, |n| n.hostname == name, "node")
    }

    pub async fn update_node(
        &self,
        name: &str,
        availability: Option<Availability>,
        label_add: &[String],
        label_rm: &[String],
        role: Option<Role>,
    ) -> Result<Node> {
        let n = self.find_node(name).await?;
        if let Some(r) = role {
            if r != n.role {
                return Err(ControlError::Precondition(
                    "changing a node's role (promote/demote) is not supported yet: its certificate names its role".into(),
                ));
            }
        }
        for l in label_rm {
            if !n.labels.contains_key(l) {
                return Err(ControlError::Invalid(format!(
                    "label {l:?} is not on node {}",
                    n.hostname
                )));
            }
        }
        self.store
            .update::<Node, _, ControlError>(&store::node_key(&n.id), |n| {
                if let Some(a) = availability {
                    n.availability = a;
                }
                for l in label_add {
                    let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                    if k.is_empty() {
                        return Err(ControlError::Invalid(format!("label {l:?}: key=value")));
                    }
                    n.labels.insert(k.to_string(), v.to_string());
                }
                for l in label_rm {
                    n.labels.remove(l);
                }
                n.updated_ms = now_ms();
                Ok(true)
            })
            .await?
            .ok_or_else(|| ControlError::NotFound {
                kind: "node",
                name: name.into(),
            })
    }

    pub async fn remove_node(&self, name: &str, force: bool) -> Result<()> {
        let n = self.find_node(name).await?;
        if n.state != NodeState::Down && !force {
            return Err(ControlError::Precondition(format!(
                "node {} is not down and can't be removed (stop its huskd, or use --force)",
                n.hostname
            )));
        }
        if n.role == Role::Manager && self.node_id == n.id {
            return Err(ControlError::Precondition(format!(
                "node {} is this manager: it cannot remove itself",
                n.hostname
            )));
        }
        self.store.delete(&store::node_key(&n.id)).await?;
        Ok(self.store.delete(&store::heartbeat_key(&n.id)).await?)
    }

    pub async fn services(&self) -> Result<Vec<Service>> {
        let mut v: Vec<Service> = self
            .store
            .list::<Service>(&store::services())
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(v)
    }

    pub async fn find_service(&self, name: &str) -> Result<Service> {
        let v = self.services().await?;
        pick(v, name, |s| &s.id, |s| s.spec.name == name, "service")
    }

    pub async fn create_service(&self, spec: ServiceSpec) -> Result<Service> {
        invalid(spec.validate())?;
        let id = new_id();
        if !self
            .store
            .create_raw(&store::name_key(&spec.name), id.clone().into_bytes())
            .await?
        {
            return Err(ControlError::AlreadyExists(format!(
                "service {}",
                spec.name
            )));
        }
        let now = now_ms();
        let svc = Service {
            id: id.clone(),
            spec,
            version: 1,
            previous_spec: None,
            created_ms: now,
            updated_ms: now,
            update_status: None,
        };
        if let Err(e) = self.store.put(&store::service_key(&id), &svc).await {
            let _ = self.store.delete(&store::name_key(&svc.spec.name)).await;
            return Err(e.into());
        }
        Ok(svc)
    }

    /// A new spec (an update, rolled out as its update config says), or
    /// back to the previous one.
    pub async fn update_service(
        &self,
        name: &str,
        spec: Option<ServiceSpec>,
        rollback: bool,
        force: bool,
    ) -> Result<Service> {
        let svc = self.find_service(name).await?;
        if let Some(s) = &spec {
            invalid(s.validate())?;
            if s.name != svc.spec.name {
                return Err(ControlError::Invalid(format!(
                    "a service cannot be renamed ({} → {})",
                    svc.spec.name, s.name
                )));
            }
        }
        if rollback && svc.previous_spec.is_none() {
            return Err(ControlError::Precondition(format!(
                "service {} has no previous spec to roll back to",
                svc.spec.name
            )));
        }
        self.store
            .update::<Service, _, ControlError>(&store::service_key(&svc.id), |s| {
                let now = now_ms();
                let new = if rollback {
                    s.previous_spec.clone().ok_or_else(|| {
                        ControlError::Precondition(format!(
                            "service {name} has no previous spec to roll back to"
                        ))
                    })?
                } else {
                    spec.clone()
                        .ok_or_else(|| ControlError::Invalid("an update needs a spec".into()))?
                };
                // Only replica count changed: a scale, not an update.
                let mut same = new.clone();
                same.mode = s.spec.mode.clone();
                let scale_only = same == s.spec && !rollback && !force;
                if scale_only {
                    s.spec = new;
                    s.updated_ms = now;
                    return Ok(true);
                }
                s.previous_spec = Some(std::mem::replace(&mut s.spec, new));
                s.version += 1;
                s.updated_ms = now;
                s.update_status = Some(UpdateStatus {
                    state: if rollback {
                        UpdateState::RollbackStarted
                    } else {
                        UpdateState::Updating
                    },
                    started_ms: now,
                    completed_ms: 0,
                    message: if rollback {
                        "manually requested rollback".into()
                    } else {
                        "update in progress".into()
                    },
                });
                Ok(true)
            })
            .await?
            .ok_or_else(|| ControlError::NotFound {
                kind: "service",
                name: name.into(),
            })
    }

    pub async fn remove_service(&self, name: &str) -> Result<()> {
        let svc = self.find_service(name).await?;
        self.store.delete(&store::service_key(&svc.id)).await?;
        Ok(self.store.delete(&store::name_key(&svc.spec.name)).await?)
    }

    pub async fn tasks(&self, service: Option<&str>, node: Option<&str>) -> Result<Vec<Task>> {
        let sid = match service {
            Some(s) => Some(self.find_service(s).await?.id),
            None => None,
        };
        let nid = match node {
            Some(n) => Some(self.find_node(n).await?.id),
            None => None,
        };
        let mut v: Vec<Task> = self
            .store
            .list::<Task>(&store::tasks())
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| sid.as_ref().is_none_or(|s| &t.service_id == s))
            .filter(|t| nid.as_ref().is_none_or(|n| &t.node_id == n))
            .collect();
        v.sort_by(|a, b| {
            (
                &a.service_name,
                a.slot,
                &a.node_id,
                std::cmp::Reverse(a.created_ms),
            )
                .cmp(&(
                    &b.service_name,
                    b.slot,
                    &b.node_id,
                    std::cmp::Reverse(b.created_ms),
                ))
        });
        Ok(v)
    }
}

/// One object by exact id, name, or unique id prefix; a clear error if
/// none or several match.
fn pick<T>(
    items: Vec<T>,
    name: &str,
    id: impl Fn(&T) -> &String,
    named: impl Fn(&T) -> bool,
    what: &'static str,
) -> Result<T, ControlError> {
    if name.is_empty() {
        return Err(ControlError::NoName(what));
    }
    let mut by_prefix = Vec::new();
    for it in items {
        if id(&it) == name || named(&it) {
            return Ok(it);
        }
        if id(&it).starts_with(name) {
            by_prefix.push(it);
        }
    }
    match by_prefix.len() {
        1 => Ok(by_prefix.remove(0)),
        0 => Err(ControlError::NotFound {
            kind: what,
            name: name.into(),
        }),
        n => Err(ControlError::Ambiguous {
            kind: what,
            name: name.into(),
            matches: n,
        }),
    }
}

/// A spec the API crate refuses is the caller's mistake.
fn invalid(r: Result<(), crate::types::Invalid>) -> Result<(), ControlError> {
    r.map_err(|e| ControlError::Invalid(e.0))
}
