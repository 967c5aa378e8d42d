//! Watches on a prefix, as changes of keys: what the leader's loops wake
//! on and `husk events` reports.

use etcd_client::{EventType, WatchOptions, WatchStream};

use super::{etcd, Result, Store, StoreError};

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One change under a watched prefix; `value` is empty for a deletion.
#[derive(Clone, Debug)]
pub struct Change {
    pub kind: ChangeKind,
    pub key: String,
    pub value: Vec<u8>,
}

/// A watch on a prefix; it ends only with an error saying why.
pub struct Watch {
    stream: WatchStream,
}

impl Store {
    pub async fn watch_prefix(&self, prefix: &str) -> Result<Watch> {
        let stream = self
            .client
            .clone()
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(etcd(format!("watching {prefix}")))?;
        Ok(Watch { stream })
    }
}

impl Watch {
    /// The next batch of changes (one etcd revision's).
    pub async fn next(&mut self) -> Result<Vec<Change>> {
        let resp = match self.stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(StoreError::WatchEnded("etcd closed the watch".into())),
            Err(e) => return Err(etcd("etcd watch")(e)),
        };
        if resp.canceled() {
            return Err(StoreError::WatchEnded(format!(
                "etcd canceled the watch: {}",
                resp.cancel_reason()
            )));
        }
        Ok(resp
            .events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                let kind = match e.event_type() {
                    EventType::Delete => ChangeKind::Deleted,
                    _ if kv.create_revision() == kv.mod_revision() => ChangeKind::Created,
                    _ => ChangeKind::Updated,
                };
                Some(Change {
                    kind,
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: kv.value().to_vec(),
                })
            })
            .collect())
    }
}
