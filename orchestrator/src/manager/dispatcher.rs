//! What nodes call: their task reports, heartbeats and assignment sets
//! (swarmkit's dispatcher), and the managers' addresses they fail over to.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::ControlError;
use crate::store;

use super::*;

impl Manager {
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
                let mut w = me.store.watch_prefix(&store::tasks()).await?;
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
                        m = w.next() => {
                            m?;
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
