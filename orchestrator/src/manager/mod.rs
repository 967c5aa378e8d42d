//! The manager role: the control operations (any manager serves them,
//! straight from etcd), and — on the one manager that wins the etcd
//! election — the leader's loops: node liveness from heartbeats, and the
//! reconciler that creates, places and retires tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T, E = ControlError> = std::result::Result<T, E>;
use crate::store::ChangeKind;
use tokio::sync::{mpsc, watch};

use crate::error::ControlError;
use crate::orchestrator::{self as reconcile, Snapshot, Write};
use crate::store::{self, Store};
use crate::types::*;
use husk_runtime::util::chain;

mod control;
mod dispatcher;

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
        self.store.leader().await
    }

    /// Campaigns for leadership for ever: leads while the lease lives.
    async fn campaign(self: Arc<Self>) {
        loop {
            if let Err(e) = self.clone().campaign_once().await {
                tracing::warn!("leadership: {}", chain(&e));
            }
            self.leader.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn campaign_once(self: Arc<Self>) -> Result<()> {
        // No request timeout: a campaign waits as long as another leads.
        let store = Store::connect_with(&self.cluster.etcd_endpoints, None).await?;
        // Kept alive while campaigning and leading; when it cannot be,
        // leadership is lost.
        let lease = store.lease(LEADER_TTL_S).await?;
        let mut lost = lease.lost.clone();
        tokio::select! {
            r = store.campaign(self.node_id.clone(), &lease) => r?,
            _ = lost.changed() => {
                return Err(ControlError::Election {
                    what: "the election lease expired while campaigning",
                    source: None,
                });
            }
        };
        tracing::info!("node {} leads the cluster", self.node_id);
        self.leader.store(true, Ordering::SeqCst);
        let r = self.clone().lead(lease.lost.clone()).await;
        self.leader.store(false, Ordering::SeqCst);
        lease.revoke().await;
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
            match self.store.watch_prefix(&store::heartbeats()).await {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!("{}", chain(&e));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                m = stream.next() => {
                    let changes = match m {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!("heartbeat watch: {}", chain(&e));
                            return;
                        }
                    };
                    for c in changes.iter().filter(|c| c.kind != ChangeKind::Deleted) {
                        if let Some(id) = c.key.strip_prefix(&store::heartbeats()) {
                            seen.insert(id.to_string(), Instant::now());
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            let nodes = match self.store.list::<Node>(&store::nodes()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("{}", chain(&e));
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
                        tracing::warn!("{}", chain(&e));
                    }
                }
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let (wake_tx, mut wake) = mpsc::channel::<()>(1);
        let st = self.store.clone();
        // Any change to nodes, services or tasks wakes the reconciler (the
        // tick runs it anyway when the watch is gone).
        tokio::spawn(async move {
            let Ok(mut s) = st.watch_prefix(store::ROOT).await else {
                return;
            };
            while let Ok(changes) = s.next().await {
                let relevant = changes
                    .iter()
                    .any(|c| !c.key.starts_with(&store::heartbeats()));
                if relevant {
                    let _ = wake_tx.try_send(());
                }
            }
        });
        loop {
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!("reconcile: {}", chain(&e));
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
}
