//! The manager role: the control operations (any manager serves them,
//! straight from etcd), and — on the one manager that wins the etcd
//! election — the leader's loops: node liveness from heartbeats, and the
//! reconciler that creates, places and retires tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T, E = ControlError> = std::result::Result<T, E>;
use etcd_client::{EventType, WatchOptions};
use tokio::sync::{mpsc, watch};

use crate::error::ControlError;
use crate::orchestrator::{self as reconcile, Snapshot, Write};
use crate::store::{self, Store};
use crate::types::*;
use crate::util::new_id;

/// The leader's etcd lease: a dead leader is replaced this long after.
const LEADER_TTL_S: i64 = 3;
/// The reconciler runs at least this often (restart delays, update
/// monitors and pending tasks are time-based).
const TICK: Duration = Duration::from_millis(250);

pub struct Manager {
    pub store: Store,
    pub node_id: String,
    pub cluster: ClusterInfo,
    leader: AtomicBool,
}

impl Manager {
    pub async fn start(store: Store, node_id: String) -> Result<Arc<Manager>> {
        let (cluster, _) = store
            .get::<ClusterInfo>(&store::cluster_key())
            .await?
            .ok_or(ControlError::NoCluster)?;
        let m = Arc::new(Manager {
            store,
            node_id,
            cluster,
            leader: AtomicBool::new(false),
        });
        tokio::spawn(m.clone().campaign());
        Ok(m)
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The leader's node id, as etcd's election says.
    pub async fn leader_id(&self) -> Option<String> {
        let r = self
            .store
            .client
            .clone()
            .leader(store::leader_key())
            .await
            .ok()?;
        r.kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Campaigns for leadership for ever: leads while the lease lives.
    async fn campaign(self: Arc<Self>) {
        loop {
            if let Err(e) = self.clone().campaign_once().await {
                tracing::warn!("leadership: {e:#}");
            }
            self.leader.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn campaign_once(self: Arc<Self>) -> Result<()> {
        // No request timeout: a campaign waits as long as another leads.
        let mut c = Store::connect_with(&self.cluster.etcd_endpoints, None)
            .await?
            .client;
        let election = |what| {
            move |e| ControlError::Election {
                what,
                source: Some(e),
            }
        };
        let lease = c
            .lease_grant(LEADER_TTL_S, None)
            .await
            .map_err(election("granting the election lease"))?
            .id();
        let (mut keeper, mut acks) = c
            .lease_keep_alive(lease)
            .await
            .map_err(election("keeping the election lease"))?;
        let (lost_tx, lost) = watch::channel(false);
        // Keep the lease alive while campaigning and leading; when it
        // cannot be, leadership is lost.
        let ka = tokio::spawn(async move {
            loop {
                let ok = keeper.keep_alive().await.is_ok()
                    && matches!(acks.message().await, Ok(Some(r)) if r.ttl() > 0);
                if !ok {
                    let _ = lost_tx.send(true);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(LEADER_TTL_S as u64 * 1000 / 3)).await;
            }
        });
        let mut lost_c = lost.clone();
        let won = tokio::select! {
            r = c.campaign(store::leader_key(), self.node_id.clone(), lease) => r,
            _ = lost_c.changed() => {
                ka.abort();
                return Err(ControlError::Election {
                    what: "the election lease expired while campaigning",
                    source: None,
                });
            }
        };
        if let Err(e) = won {
            ka.abort();
            return Err(election("campaigning")(e));
        }
        tracing::info!("node {} leads the cluster", self.node_id);
        self.leader.store(true, Ordering::SeqCst);
        let r = self.clone().lead(lost).await;
        self.leader.store(false, Ordering::SeqCst);
        ka.abort();
        let _ = c.lease_revoke(lease).await;
        r
    }

    /// The leader's work until leadership is lost.
    async fn lead(self: Arc<Self>, mut lost: watch::Receiver<bool>) -> Result<()> {
        let mon = tokio::spawn(self.clone().monitor_nodes());
        let rec = tokio::spawn(self.clone().reconcile_loop());
        let _ = lost.changed().await;
        mon.abort();
        rec.abort();
        Err(ControlError::Election {
            what: "lost the leader lease",
            source: None,
        })
    }

    /// Node liveness: a heartbeat (a put the leader watches, timed by the
    /// leader's own clock) makes a node ready; silence past the grace
    /// period makes it down.
    async fn monitor_nodes(self: Arc<Self>) {
        let grace = Duration::from_millis(self.cluster.heartbeat_grace_ms);
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let start = Instant::now();
        let mut stream = loop {
            match self
                .store
                .client
                .clone()
                .watch(store::heartbeats(), Some(WatchOptions::new().with_prefix()))
                .await
            {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!("watching heartbeats: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                m = stream.message() => {
                    let Ok(Some(m)) = m else {
                        tracing::warn!("heartbeat watch ended");
                        return;
                    };
                    for e in m.events() {
                        if e.event_type() != EventType::Put {
                            continue;
                        }
                        if let Some(kv) = e.kv() {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            if let Some(id) = key.strip_prefix(&store::heartbeats()) {
                                seen.insert(id.to_string(), Instant::now());
                            }
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            let nodes = match self.store.list::<Node>(&store::nodes()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("{e:#}");
                    continue;
                }
            };
            for (n, _) in nodes {
                // A node not heard from since this leader took over gets
                // the grace period from then.
                let last = seen.get(&n.id).copied();
                let alive = last.is_some_and(|t| t.elapsed() < grace);
                let want = if alive {
                    NodeState::Ready
                } else if last.is_some() || start.elapsed() >= grace {
                    NodeState::Down
                } else {
                    continue;
                };
                if n.state != want {
                    tracing::info!("node {} ({}) is {:?}", n.id, n.hostname, want);
                    let r = self
                        .store
                        .update::<Node, _, ControlError>(&store::node_key(&n.id), |n| {
                            n.state = want;
                            n.updated_ms = now_ms();
                            Ok(true)
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::warn!("{e:#}");
                    }
                }
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let (wake_tx, mut wake) = mpsc::channel::<()>(1);
        let client = self.store.client.clone();
        // Any change to nodes, services or tasks wakes the reconciler.
        tokio::spawn(async move {
            let mut c = client;
            let Ok(mut s) = c
                .watch(store::ROOT, Some(WatchOptions::new().with_prefix()))
                .await
            else {
                return;
            };
            while let Ok(Some(m)) = s.message().await {
                let relevant = m.events().iter().any(|e| {
                    e.kv()
                        .is_some_and(|kv| !kv.key().starts_with(store::heartbeats().as_bytes()))
                });
                if relevant {
                    let _ = wake_tx.try_send(());
                }
            }
        });
        loop {
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!("reconcile: {e:#}");
            }
            tokio::select! {
                _ = wake.recv() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    pub async fn reconcile_once(&self) -> Result<usize> {
        let nodes = self.store.list::<Node>(&store::nodes()).await?;
        let services = self.store.list::<Service>(&store::services()).await?;
        let tasks = self.store.list::<Task>(&store::tasks()).await?;
        let revs: HashMap<String, i64> = tasks.iter().map(|(t, r)| (t.id.clone(), *r)).collect();
        let svc_revs: HashMap<String, i64> =
            services.iter().map(|(s, r)| (s.id.clone(), *r)).collect();
        let nodes: Vec<Node> = nodes.into_iter().map(|(n, _)| n).collect();
        let services: Vec<Service> = services.into_iter().map(|(s, _)| s).collect();
        let tasks: Vec<Task> = tasks.into_iter().map(|(t, _)| t).collect();
        let writes = reconcile::reconcile(&Snapshot {
            nodes: &nodes,
            services: &services,
            tasks: &tasks,
            now_ms: now_ms(),
        });
        let n = writes.len();
        let mut created = Vec::new();
        let mut deleted = Vec::new();
        for w in writes {
            match w {
                Write::Task(t) => match revs.get(&t.id) {
                    // Lost to a node's report: the next pass sees it.
                    Some(rev) => {
                        self.store.cas(&store::task_key(&t.id), &t, *rev).await?;
                    }
                    None => created.push((store::task_key(&t.id), *t)),
                },
                Write::DeleteTask(id) => deleted.push(store::task_key(&id)),
                Write::Service(s) => {
                    if let Some(rev) = svc_revs.get(&s.id) {
                        self.store.cas(&store::service_key(&s.id), &s, *rev).await?;
                    }
                }
            }
        }
        // New tasks first: placing work beats clearing history.
        self.store.put_many(&created).await?;
        self.store.delete_many(&deleted).await?;
        Ok(n)
    }

    // ---- control operations ----

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

    /// A node's report of one of its tasks. Only the task's node may
    /// report it, states only move forward, and a finished task stays so.
    pub async fn report(&self, node_id: &str, task_id: &str, st: TaskStatus) -> Result<()> {
        self.store
            .update::<Task, _, ControlError>(&store::task_key(task_id), |t| {
                if t.node_id != node_id {
                    return Err(ControlError::NotAssigned {
                        task: task_id.into(),
                        node: node_id.into(),
                    });
                }
                if t.status.state.is_terminal() || st.state < t.status.state {
                    return Ok(false);
                }
                if t.status.state == st.state
                    && t.status.message == st.message
                    && t.status.health == st.health
                {
                    return Ok(false);
                }
                t.status = st.clone();
                Ok(true)
            })
            .await?;
        Ok(())
    }

    pub async fn heartbeat(&self, node_id: &str) -> Result<()> {
        if self
            .store
            .get_raw(&store::node_key(node_id))
            .await?
            .is_none()
        {
            return Err(ControlError::NodeRemoved(node_id.into()));
        }
        Ok(self
            .store
            .put_raw(
                &store::heartbeat_key(node_id),
                now_ms().to_string().into_bytes(),
            )
            .await?)
    }

    /// The cluster endpoints of the managers, for nodes to fail over to.
    pub async fn manager_addrs(&self) -> Result<Vec<String>> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.role == Role::Manager && !n.addr.is_empty())
            .map(|n| n.addr)
            .collect())
    }

    /// The tasks a node should know about, sent again whenever they change.
    pub fn assignments(self: &Arc<Self>, node_id: String) -> mpsc::Receiver<Result<Vec<Task>>> {
        let (tx, rx) = mpsc::channel(4);
        let me = self.clone();
        tokio::spawn(async move {
            let r = async {
                let mut w = me
                    .store
                    .client
                    .clone()
                    .watch(store::tasks(), Some(WatchOptions::new().with_prefix()))
                    .await
                    .map_err(|e| ControlError::Election {
                        what: "watching tasks",
                        source: Some(e),
                    })?;
                let mut last: Option<Vec<Task>> = None;
                loop {
                    let mut mine: Vec<Task> = me
                        .store
                        .list::<Task>(&store::tasks())
                        .await?
                        .into_iter()
                        .map(|(t, _)| t)
                        .filter(|t| t.node_id == node_id)
                        .collect();
                    mine.sort_by(|a, b| a.id.cmp(&b.id));
                    if last.as_ref() != Some(&mine) {
                        if tx.send(Ok(mine.clone())).await.is_err() {
                            return Ok(());
                        }
                        last = Some(mine);
                    }
                    tokio::select! {
                        m = w.message() => {
                            match m {
                                Ok(Some(_)) => {}
                                Ok(None) => {
                                    return Err(ControlError::Election {
                                        what: "the task watch ended",
                                        source: None,
                                    })
                                }
                                Err(e) => {
                                    return Err(ControlError::Election {
                                        what: "watching tasks",
                                        source: Some(e),
                                    })
                                }
                            }
                        }
                        _ = tx.closed() => return Ok(()),
                        // A resend now and then: a lost update heals.
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    }
                }
            }
            .await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
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
