//! The node role: a session with one manager at a time (any manager; the
//! next one in the list when it fails) carrying heartbeats, the node's
//! assignment set and its task reports.

use std::sync::Arc;
use std::time::Duration;

use husk_runtime::util::chain;
use tokio::sync::mpsc;

use crate::node::executor::{Executor, Report};
use crate::node::transport as net;
use crate::node::Identity;
use crate::pb::{self as api, cluster_client::ClusterClient};
use crate::types::{Task, TaskStatus};

/// Why a session with a manager ended (the node then tries the next).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Transport(#[from] net::TransportError),
    #[error("{what}: {}", .status.message())]
    Call { what: String, status: tonic::Status },
    #[error("the manager ended the assignment stream")]
    StreamEnded,
    #[error("the executor is gone")]
    ExecutorGone,
    #[error("applying the assignment set")]
    Apply(#[from] tokio::task::JoinError),
}

type Result<T> = std::result::Result<T, SessionError>;

fn call(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> SessionError {
    let what = what.into();
    move |status| SessionError::Call { what, status }
}

/// Starts the session in the background; returns the executor that runs
/// the tasks it is given (its state, logs and sandboxes under `state_dir`).
pub fn start(state_dir: &std::path::Path, id: Identity) -> Arc<Executor> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rt = match husk_runtime::Runtime::locate() {
        Ok(mut rt) => {
            rt.run_dir = state_dir.join("run");
            // Sandboxes of an earlier huskd on this node: their tasks were
            // failed or rescheduled meanwhile; nothing may keep running.
            if let Ok(dir) = std::fs::read_dir(&rt.run_dir) {
                for e in dir.flatten() {
                    if let Some(id) = e.file_name().to_str() {
                        tracing::info!("removing sandbox {id} left by an earlier huskd");
                        if let Err(e) = rt.clean_sandbox(id) {
                            tracing::warn!("sandbox {id}: {}", chain(&e));
                        }
                    }
                }
            }
            Some(rt)
        }
        Err(e) => {
            tracing::warn!("this node cannot run tasks: {}", chain(&e));
            None
        }
    };
    let ex = Arc::new(Executor::new(rt, state_dir, tx));
    tokio::spawn(run(id, ex.clone(), rx));
    ex
}

async fn run(mut id: Identity, ex: Arc<Executor>, mut reports: mpsc::UnboundedReceiver<Report>) {
    let mut i = 0usize;
    loop {
        let addrs = id.managers.clone();
        if addrs.is_empty() {
            tracing::error!("no manager known: this node cannot reach its cluster");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        let addr = addrs[i % addrs.len()].clone();
        match session(&addr, &mut id, &ex, &mut reports).await {
            Ok(()) => {}
            Err(e) => tracing::warn!("session with manager {addr}: {}", chain(&e)),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn session(
    addr: &str,
    id: &mut Identity,
    ex: &Arc<Executor>,
    reports: &mut mpsc::UnboundedReceiver<Report>,
) -> Result<()> {
    let ch = net::manager_channel(addr, &id.tls()).await?;
    let mut client = ClusterClient::new(ch).max_decoding_message_size(64 << 20);
    let node_id = id.node_id.clone();
    let hb = client
        .heartbeat(api::HeartbeatRequest {
            node_id: node_id.clone(),
        })
        .await
        .map_err(call("heartbeat"))?
        .into_inner();
    let mut period = Duration::from_millis(hb.period_ms.max(100));
    if !hb.managers.is_empty() {
        id.managers = hb.managers;
    }
    tracing::info!("node {node_id}: session with manager {addr}");
    let mut stream = client
        .assignments(api::AssignmentsRequest {
            node_id: node_id.clone(),
        })
        .await
        .map_err(call("assignments"))?
        .into_inner();
    // What the last manager may have missed.
    for r in ex.all_reports() {
        send(&mut client, &r).await?;
    }
    let mut beat = tokio::time::interval(period);
    loop {
        tokio::select! {
            m = stream.message() => {
                let set = match m {
                    Ok(Some(set)) => set,
                    Ok(None) => return Err(SessionError::StreamEnded),
                    Err(s) => return Err(call("assignments")(s)),
                };
                let mut tasks = Vec::with_capacity(set.tasks.len());
                for t in set.tasks {
                    match Task::try_from(t) {
                        Ok(t) => tasks.push(t),
                        Err(e) => tracing::warn!("an assigned task does not decode: {e}"),
                    }
                }
                let ex = ex.clone();
                // apply may signal containers (blocking RPCs).
                tokio::task::spawn_blocking(move || ex.apply(tasks)).await?;
            }
            r = reports.recv() => {
                let Some(r) = r else { return Err(SessionError::ExecutorGone) };
                send(&mut client, &r).await?;
            }
            _ = beat.tick() => {
                let hb = client
                    .heartbeat(api::HeartbeatRequest { node_id: node_id.clone() })
                    .await
                    .map_err(call("heartbeat"))?
                    .into_inner();
                if !hb.managers.is_empty() {
                    id.managers = hb.managers;
                }
                let p = Duration::from_millis(hb.period_ms.max(100));
                if p != period {
                    period = p;
                    beat = tokio::time::interval(period);
                }
            }
        }
    }
}

async fn send(
    client: &mut ClusterClient<tonic::transport::Channel>,
    report: &Report,
) -> Result<()> {
    let r = report;
    let r = client
        .report_status(api::StatusReport {
            task_id: r.task_id.clone(),
            // The manager stamps the time the report arrived.
            status: Some(
                TaskStatus {
                    state: r.state,
                    timestamp_ms: 0,
                    message: r.message.clone(),
                    err: r.err.clone(),
                    exit_code: r.exit_code,
                    health: r.health,
                }
                .into(),
            ),
        })
        .await;
    match r {
        Ok(_) => Ok(()),
        // The task is gone or no longer this node's: nothing to report.
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            tracing::debug!("report of task {}: {}", report.task_id, s.message());
            Ok(())
        }
        Err(s) => Err(call(format!("report of task {}", report.task_id))(s)),
    }
}
