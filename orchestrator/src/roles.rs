//! huskd's roles, started when a node has its identity (at startup, or
//! when `init`/`join` gives it one): a manager where the identity says so,
//! the node session with the managers on every node, and the cluster
//! endpoint on every node (managers serve nodes and joins; every node
//! serves task logs).

use std::sync::Arc;

use crate::manager::Manager;
use crate::node::{session, Daemon, Identity, NodeError, Roles, RolesFuture};
use crate::store::Store;
use crate::types::Role;
use crate::util::lock;

pub struct Huskd;

impl Roles for Huskd {
    fn start(&self, daemon: Arc<Daemon>, id: Identity) -> RolesFuture {
        Box::pin(async move {
            if id.role == Role::Manager {
                let store = Store::connect(&id.etcd).await?;
                let m = Manager::start(store, id.node_id.clone()).await?;
                *lock(&daemon.manager) = Some(m);
            }
            let ex = session::start(&daemon.cfg.state_dir, daemon.cfg.boot, id.clone());
            *lock(&daemon.executor) = Some(ex);
            crate::api::serve_cluster(daemon.clone(), &id)
                .await
                .map_err(|e| NodeError::Roles(Box::new(e)))
        })
    }
}
