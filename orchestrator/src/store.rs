//! The cluster's state in etcd. Every object is one JSON value under
//! `/husk/v1/`:
//!
//! ```text
//! /husk/v1/cluster                 ClusterInfo (created once, by init)
//! /husk/v1/ca/cert, /ca/key        the cluster CA (PEM)
//! /husk/v1/tokens/{worker,manager} SHA-256 of the join secrets
//! /husk/v1/nodes/<node id>         Node
//! /husk/v1/heartbeats/<node id>    a counter each heartbeat bumps (the
//!                                  leader times the puts it watches)
//! /husk/v1/services/<service id>   Service (desired state)
//! /husk/v1/names/<service name>    its id: names are unique (txn create)
//! /husk/v1/tasks/<task id>         Task (desired by the leader, observed
//!                                  state reported by its node)
//! /husk/v1/leader                  etcd election: one manager leads
//! ```
//!
//! Writes that may race (two managers, a node's report and the leader)
//! compare the key's mod revision and retry.

use anyhow::{bail, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp,
};
use serde::{de::DeserializeOwned, Serialize};

pub const ROOT: &str = "/husk/v1/";

pub fn cluster_key() -> String {
    format!("{ROOT}cluster")
}
pub fn ca_cert_key() -> String {
    format!("{ROOT}ca/cert")
}
pub fn ca_key_key() -> String {
    format!("{ROOT}ca/key")
}
pub fn token_key(role: crate::types::Role) -> String {
    format!("{ROOT}tokens/{}", role.as_str())
}
pub fn nodes() -> String {
    format!("{ROOT}nodes/")
}
pub fn node_key(id: &str) -> String {
    format!("{ROOT}nodes/{id}")
}
pub fn heartbeats() -> String {
    format!("{ROOT}heartbeats/")
}
pub fn heartbeat_key(id: &str) -> String {
    format!("{ROOT}heartbeats/{id}")
}
pub fn services() -> String {
    format!("{ROOT}services/")
}
pub fn service_key(id: &str) -> String {
    format!("{ROOT}services/{id}")
}
pub fn name_key(name: &str) -> String {
    format!("{ROOT}names/{name}")
}
pub fn tasks() -> String {
    format!("{ROOT}tasks/")
}
pub fn task_key(id: &str) -> String {
    format!("{ROOT}tasks/{id}")
}
pub fn leader_key() -> String {
    format!("{ROOT}leader")
}

/// Most puts one transaction carries (etcd's default limit is 128).
const TXN_OPS: usize = 100;

#[derive(Clone)]
pub struct Store {
    pub client: Client,
}

impl Store {
    pub async fn connect(endpoints: &[String]) -> Result<Store> {
        Store::connect_with(endpoints, Some(std::time::Duration::from_secs(10))).await
    }

    /// `timeout` bounds every request; None for a client whose calls may
    /// rightly wait long (an election campaign waits until it wins).
    pub async fn connect_with(
        endpoints: &[String],
        timeout: Option<std::time::Duration>,
    ) -> Result<Store> {
        if endpoints.is_empty() {
            bail!("no etcd endpoints");
        }
        let mut opts =
            ConnectOptions::new().with_connect_timeout(std::time::Duration::from_secs(5));
        if let Some(t) = timeout {
            opts = opts.with_timeout(t);
        }
        let opts = opts.with_keep_alive(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(3),
        );
        let client = Client::connect(endpoints, Some(opts))
            .await
            .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
        Ok(Store { client })
    }

    pub async fn get_raw(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let r = self
            .client
            .clone()
            .get(key, None)
            .await
            .with_context(|| format!("etcd get {key}"))?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some((v, rev)) => Ok(Some((
                serde_json::from_slice(&v).with_context(|| format!("decoding {key}"))?,
                rev,
            ))),
        }
    }

    pub async fn get_string(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .get_raw(key)
            .await?
            .map(|(v, _)| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Every object under `prefix`, with its mod revision; entries that do
    /// not decode are skipped with a warning (one bad value must not stop
    /// the cluster).
    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(T, i64)>> {
        let r = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| format!("etcd list {prefix}"))?;
        let mut out = Vec::with_capacity(r.kvs().len());
        for kv in r.kvs() {
            match serde_json::from_slice(kv.value()) {
                Ok(v) => out.push((v, kv.mod_revision())),
                Err(e) => tracing::warn!("skipping {}: {e}", String::from_utf8_lossy(kv.key())),
            }
        }
        Ok(out)
    }

    pub async fn put<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        self.put_raw(key, serde_json::to_vec(v)?).await
    }

    pub async fn put_raw(&self, key: &str, v: Vec<u8>) -> Result<()> {
        self.client
            .clone()
            .put(key, v, None)
            .await
            .with_context(|| format!("etcd put {key}"))?;
        Ok(())
    }

    /// Writes `key` only if it does not exist; false if it did.
    pub async fn create_raw(&self, key: &str, v: Vec<u8>) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, v, None)]);
        let r = self
            .client
            .clone()
            .txn(txn)
            .await
            .with_context(|| format!("etcd create {key}"))?;
        Ok(r.succeeded())
    }

    /// Writes `key` if its mod revision is still `rev`; false if not.
    pub async fn cas<T: Serialize>(&self, key: &str, v: &T, rev: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key, serde_json::to_vec(v)?, None)]);
        let r = self
            .client
            .clone()
            .txn(txn)
            .await
            .with_context(|| format!("etcd update {key}"))?;
        Ok(r.succeeded())
    }

    /// Reads, changes and writes `key` until no one else wrote between;
    /// `f` returns false to leave it as is. None if the key is gone.
    pub async fn update<T, F>(&self, key: &str, mut f: F) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut T) -> Result<bool>,
    {
        for _ in 0..50 {
            let Some((mut v, rev)) = self.get::<T>(key).await? else {
                return Ok(None);
            };
            if !f(&mut v)? {
                return Ok(Some(v));
            }
            if self.cas(key, &v, rev).await? {
                return Ok(Some(v));
            }
        }
        bail!("{key} kept changing under this update")
    }

    /// Puts many objects, a transaction per hundred.
    pub async fn put_many<T: Serialize>(&self, items: &[(String, T)]) -> Result<()> {
        for chunk in items.chunks(TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|(k, v)| Ok(TxnOp::put(k.as_str(), serde_json::to_vec(v)?, None)))
                .collect::<Result<Vec<_>>>()?;
            self.client
                .clone()
                .txn(Txn::new().and_then(ops))
                .await
                .context("etcd batch put")?;
        }
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .clone()
            .delete(key, None)
            .await
            .with_context(|| format!("etcd delete {key}"))?;
        Ok(())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.client
            .clone()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .with_context(|| format!("etcd delete {prefix}*"))?;
        Ok(())
    }
}
