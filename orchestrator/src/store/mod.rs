//! The cluster's state in etcd. Every object is one JSON value under
//! `/husk/v1/`:
//!
//! ```text
//! /husk/v1/cluster                 ClusterInfo (created once, by init)
//! /husk/v1/ca/cert, /ca/key        the cluster CA (PEM)
//! /husk/v1/tokens/{worker,manager} the join secrets (kept, as Swarm keeps
//!                                  them, so `join-token` can print them)
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

/// The cluster's state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no etcd endpoints")]
    NoEndpoints,
    /// etcd refused or could not be reached (after retrying what is
    /// transient).
    #[error("{what}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("decoding {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} kept changing under this update")]
    Contended(String),
    /// A watch ended: etcd closed or canceled it (a compaction, a lost
    /// connection).
    #[error("{0}")]
    WatchEnded(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

mod election;
mod watch;

pub use election::Lease;
pub use watch::{Change, ChangeKind, Watch};

fn etcd(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Etcd { what, source }
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|source| StoreError::Encode {
        key: key.into(),
        source,
    })
}
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
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

/// How long a call is retried while etcd cannot answer (a member lost,
/// its leader being re-elected: ~1-2 s at etcd's defaults).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether `e` may pass by itself: etcd unavailable or between leaders,
/// a connection to a dead member.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        _ => false,
    }
}

/// Runs `f` again while it fails transiently, for up to RETRY_FOR.
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let start = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && start.elapsed() < RETRY_FOR => {
                tracing::debug!("{what}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            Err(source) => {
                return Err(StoreError::Etcd {
                    what: what.to_string(),
                    source,
                })
            }
        }
    }
}

/// Most puts one transaction carries (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// etcd, through this module only: its keys, retried reads and writes,
/// compare-and-swap, watches and the leader election.
#[derive(Clone)]
pub struct Store {
    client: Client,
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
            return Err(StoreError::NoEndpoints);
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
            .map_err(|source| StoreError::Etcd {
                what: format!("connecting to etcd at {}", endpoints.join(",")),
                source,
            })?;
        Ok(Store { client })
    }

    pub async fn get_raw(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let r = retrying(&format!("etcd get {key}"), || {
            let mut c = self.client.clone();
            async move { c.get(key, None).await }
        })
        .await?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some((v, rev)) => Ok(Some((
                serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                    key: key.into(),
                    source,
                })?,
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
        let r = retrying(&format!("etcd list {prefix}"), || {
            let mut c = self.client.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
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
        self.put_raw(key, encode(key, v)?).await
    }

    pub async fn put_raw(&self, key: &str, v: Vec<u8>) -> Result<()> {
        retrying(&format!("etcd put {key}"), || {
            let (mut c, v) = (self.client.clone(), v.clone());
            async move { c.put(key, v, None).await }
        })
        .await?;
        Ok(())
    }

    /// Writes `key` only if it does not exist; false if it did (with
    /// another value: a retried create that had landed is ours).
    pub async fn create_raw(&self, key: &str, v: Vec<u8>) -> Result<bool> {
        let txn = || {
            Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, v.clone(), None)])
        };
        let r = retrying(&format!("etcd create {key}"), || {
            let (mut c, t) = (self.client.clone(), txn());
            async move { c.txn(t).await }
        })
        .await?;
        if r.succeeded() {
            return Ok(true);
        }
        Ok(self.get_raw(key).await?.is_some_and(|(have, _)| have == v))
    }

    /// Writes `key` if its mod revision is still `rev`; false if not.
    pub async fn cas<T: Serialize>(&self, key: &str, v: &T, rev: i64) -> Result<bool> {
        let body = encode(key, v)?;
        let txn = || {
            Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key, body.clone(), None)])
        };
        // A write that landed before a retry fails the comparison: the
        // caller reads again and finds its change there.
        let r = retrying(&format!("etcd update {key}"), || {
            let (mut c, t) = (self.client.clone(), txn());
            async move { c.txn(t).await }
        })
        .await?;
        Ok(r.succeeded())
    }

    /// Reads, changes and writes `key` until no one else wrote between;
    /// `f` returns false to leave it as is. None if the key is gone.
    pub async fn update<T, F, E>(&self, key: &str, mut f: F) -> std::result::Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut T) -> std::result::Result<bool, E>,
        E: From<StoreError>,
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
        Err(StoreError::Contended(key.into()).into())
    }

    /// Puts many objects, a transaction per hundred.
    pub async fn put_many<T: Serialize>(&self, items: &[(String, T)]) -> Result<()> {
        for chunk in items.chunks(TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|(k, v)| Ok(TxnOp::put(k.as_str(), encode(k, v)?, None)))
                .collect::<Result<Vec<_>>>()?;
            retrying("etcd batch put", || {
                let (mut c, t) = (self.client.clone(), Txn::new().and_then(ops.clone()));
                async move { c.txn(t).await }
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes many keys, a transaction per hundred.
    pub async fn delete_many(&self, keys: &[String]) -> Result<()> {
        for chunk in keys.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(k.as_str(), None))
                .collect();
            retrying("etcd batch delete", || {
                let (mut c, t) = (self.client.clone(), Txn::new().and_then(ops.clone()));
                async move { c.txn(t).await }
            })
            .await?;
        }
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        retrying(&format!("etcd delete {key}"), || {
            let mut c = self.client.clone();
            async move { c.delete(key, None).await }
        })
        .await?;
        Ok(())
    }
}
