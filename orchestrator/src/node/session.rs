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
    #[error("the heartbeat task ended")]
    Heartbeats(#[source] tokio::task::JoinError),
}

type Result<T> = std::result::Result<T, SessionError>;

impl SessionError {
    /// The manager no longer knows this node (`husk node rm`).
    fn node_removed(&self) -> bool {
        matches!(self, SessionError::Call { what, status }
            if what == "heartbeat" && status.code() == tonic::Code::NotFound)
    }
}

fn call(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> SessionError {
    let what = what.into();
    move |status| SessionError::Call { what, status }
}

/// Starts the session in the background; returns the executor that runs
/// the tasks it is given (its state, logs and sandboxes under `state_dir`).
pub fn start(state_dir: &std::path::Path, boot: husk_runtime::Boot, id: Identity) -> Arc<Executor> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rt = match husk_runtime::Runtime::locate() {
        Ok(mut rt) => {
            // Sandboxes an earlier huskd on this node left are kept until
            // the first assignment set says which tasks they serve.
            rt.run_dir = state_dir.join("run");
            Some(rt)
        }
        Err(e) => {
            tracing::warn!("this node cannot run tasks: {}", chain(&e));
            None
        }
    };
    let ex = Arc::new(Executor::new(rt, boot, state_dir, tx));
    // Assignment sets are applied on a thread of their own (apply blocks);
    // sessions only hand them over.
    match Applier::start(ex.clone()) {
        Ok(applier) => {
            tokio::spawn(run(id, applier, rx));
        }
        Err(e) => tracing::error!("starting the assignment thread: {e}; this node runs nothing"),
    }
    ex
}

async fn run(mut id: Identity, applier: Applier, mut reports: mpsc::UnboundedReceiver<Report>) {
    let mut i = 0usize;
    let mut removed = false;
    loop {
        let addrs = id.managers.clone();
        if addrs.is_empty() {
            tracing::error!("no manager known: this node cannot reach its cluster");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        let addr = addrs[i % addrs.len()].clone();
        match session(&addr, &mut id, &applier, &mut reports).await {
            Ok(()) => {}
            Err(e) if e.node_removed() => {
                // `husk node rm`: no manager will assign this node anything
                // again, and its tasks run elsewhere now. Nothing it runs
                // may go on without an owner.
                if !removed {
                    tracing::warn!(
                        "this node was removed from the cluster ({}): stopping its tasks",
                        chain(&e)
                    );
                    removed = true;
                }
                applier.apply(Vec::new());
            }
            Err(e) => tracing::warn!("session with manager {addr}: {}", chain(&e)),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn session(
    addr: &str,
    id: &mut Identity,
    applier: &Applier,
    reports: &mut mpsc::UnboundedReceiver<Report>,
) -> Result<()> {
    let ch = net::manager_channel(addr, &id.tls()).await?;
    let mut client = ClusterClient::new(ch).max_decoding_message_size(64 << 20);
    let node_id = id.node_id.clone();
    let (period, managers_now) = heartbeat(&mut client, &node_id).await?;
    if let Some(m) = managers_now {
        id.managers = m;
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
    for r in applier.ex.all_reports() {
        send(&mut client, &r).await?;
    }
    // Heartbeats go on a task of their own, so nothing this session waits
    // for (a report, an assignment set being applied) ever delays one: a
    // node busy with its tasks must not look dead to the managers.
    let (managers_tx, mut managers) = mpsc::unbounded_channel();
    let mut beats = AbortOnDrop(tokio::spawn(heartbeats(
        client.clone(),
        node_id.clone(),
        period,
        managers_tx,
    )));
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
                applier.apply(tasks);
            }
            r = reports.recv() => {
                let Some(r) = r else { return Err(SessionError::ExecutorGone) };
                send(&mut client, &r).await?;
            }
            m = managers.recv() => {
                if let Some(m) = m {
                    id.managers = m;
                }
            }
            ended = &mut beats.0 => {
                return match ended {
                    Ok(e) => Err(e),
                    Err(e) => Err(SessionError::Heartbeats(e)),
                };
            }
        }
    }
}

/// A task aborted when its handle goes (the session ended).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One heartbeat: the period the manager asks for, and the managers it
/// names (None when it names none).
async fn heartbeat(
    client: &mut ClusterClient<tonic::transport::Channel>,
    node_id: &str,
) -> Result<(Duration, Option<Vec<String>>)> {
    let hb = client
        .heartbeat(api::HeartbeatRequest {
            node_id: node_id.to_string(),
        })
        .await
        .map_err(call("heartbeat"))?
        .into_inner();
    let period = Duration::from_millis(hb.period_ms.max(100));
    Ok((period, (!hb.managers.is_empty()).then_some(hb.managers)))
}

/// Sends a heartbeat every `period` (the manager may change it) until one
/// fails; the managers it names go to `managers`.
async fn heartbeats(
    mut client: ClusterClient<tonic::transport::Channel>,
    node_id: String,
    mut period: Duration,
    managers: mpsc::UnboundedSender<Vec<String>>,
) -> SessionError {
    let mut beat = tokio::time::interval(period);
    beat.tick().await; // the first tick is now; the session just beat
    loop {
        beat.tick().await;
        let (p, named) = match heartbeat(&mut client, &node_id).await {
            Ok(hb) => hb,
            Err(e) => return e,
        };
        if let Some(m) = named {
            let _ = managers.send(m);
        }
        if p != period {
            period = p;
            beat = tokio::time::interval(period);
            beat.tick().await;
        }
    }
}

/// Applies assignment sets in the order they came, on one thread for the
/// node's life (sessions come and go; two appliers could undo each
/// other). Only the newest set waiting matters: each names everything the
/// node should run.
struct Applier {
    ex: Arc<Executor>,
    sets: std::sync::mpsc::Sender<Vec<Task>>,
}

impl Applier {
    fn start(ex: Arc<Executor>) -> std::io::Result<Applier> {
        let (sets, waiting) = std::sync::mpsc::channel::<Vec<Task>>();
        let runner = ex.clone();
        std::thread::Builder::new()
            .name("assignments".into())
            .spawn(move || {
                while let Ok(set) = waiting.recv() {
                    let newest = waiting.try_iter().last().unwrap_or(set);
                    runner.apply(newest);
                }
            })?;
        Ok(Applier { ex, sets })
    }

    fn apply(&self, tasks: Vec<Task>) {
        // The thread lives as long as the node; a send cannot fail.
        let _ = self.sets.send(tasks);
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
