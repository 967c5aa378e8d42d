//! The managers' leader election (etcd's): a lease kept alive in the
//! background, a campaign under it, and who leads now.

use std::time::Duration;

use tokio::sync::watch;

use super::{etcd, leader_key, Result, Store};

/// A lease kept alive until it is dropped or revoked. `lost` turns true
/// when it could not be kept (etcd unreachable past its TTL): whatever was
/// held under it (leadership) is gone.
pub struct Lease {
    store: Store,
    id: i64,
    pub lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Store {
    /// A lease of `ttl_s` seconds, renewed every third of it.
    pub async fn lease(&self, ttl_s: i64) -> Result<Lease> {
        let mut c = self.client.clone();
        let id = c
            .lease_grant(ttl_s, None)
            .await
            .map_err(etcd("granting the election lease"))?
            .id();
        let (mut keeper, mut acks) = c
            .lease_keep_alive(id)
            .await
            .map_err(etcd("keeping the election lease"))?;
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(async move {
            loop {
                let ok = keeper.keep_alive().await.is_ok()
                    && matches!(acks.message().await, Ok(Some(r)) if r.ttl() > 0);
                if !ok {
                    let _ = lost_tx.send(true);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(ttl_s as u64 * 1000 / 3)).await;
            }
        });
        Ok(Lease {
            store: self.clone(),
            id,
            lost,
            keeper,
        })
    }

    /// Campaigns for the managers' election as `value` under `lease`;
    /// returns once this one leads. Waits as long as another leads: call
    /// on a store whose requests have no timeout.
    pub async fn campaign(&self, value: String, lease: &Lease) -> Result<()> {
        self.client
            .clone()
            .campaign(leader_key(), value, lease.id)
            .await
            .map(drop)
            .map_err(etcd("campaigning"))
    }

    /// The value of the election's leader (its node id), if one leads.
    pub async fn leader(&self) -> Option<String> {
        let r = self.client.clone().leader(leader_key()).await.ok()?;
        r.kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }
}

impl Lease {
    /// Gives the lease up at once (leadership passes without waiting for
    /// its TTL).
    pub async fn revoke(self) {
        self.keeper.abort();
        let _ = self.store.client.clone().lease_revoke(self.id).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}
