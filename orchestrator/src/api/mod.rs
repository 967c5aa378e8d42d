//! The cluster API served twice: on the control socket (the local CLI,
//! trusted as root is) and on the cluster endpoint (TLS; callers are who
//! their certificate says, and only a joining node may come without one).

use std::pin::Pin;
use std::sync::Arc;

use husk_runtime::util::{chain, shown, IoContext, IoError};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::error::status;
use crate::manager::Manager;
use crate::node::{Daemon, Identity};
use crate::pb::{self as api, cluster_server::ClusterServer};
use crate::pki;
use crate::types::*;
use husk_cluster_api::convert::{ConvertError, Decode};

#[derive(Clone)]
pub struct Api {
    daemon: Arc<Daemon>,
    /// Serving the control socket.
    local: bool,
}

enum Caller {
    Local,
    Node { id: String, role: Role },
    Anonymous,
}

impl Api {
    fn caller<T>(&self, req: &Request<T>) -> Caller {
        if self.local {
            return Caller::Local;
        }
        let Some(certs) = req.peer_certs() else {
            return Caller::Anonymous;
        };
        match certs.first().map(|c| pki::peer_identity(c.as_ref())) {
            Some(Ok((id, role))) => Caller::Node { id, role },
            _ => Caller::Anonymous,
        }
    }

    /// Control operations: the local CLI of a manager, or a manager.
    fn control<T>(&self, req: &Request<T>) -> Result<Arc<Manager>, Status> {
        match self.caller(req) {
            Caller::Local
            | Caller::Node {
                role: Role::Manager,
                ..
            } => {}
            _ => {
                return Err(Status::permission_denied(
                    "control needs a manager certificate",
                ))
            }
        }
        self.daemon.manager().ok_or_else(|| {
            Status::failed_precondition(if self.daemon.identity().is_some() {
                "this node is not a cluster manager: run this on a manager"
            } else {
                "this node is not part of a cluster: husk cluster init, or husk cluster join"
            })
        })
    }

    /// Node → manager calls: the node named must be the caller.
    fn node<T>(&self, req: &Request<T>, node_id: &str) -> Result<Arc<Manager>, Status> {
        match self.caller(req) {
            Caller::Node { id, .. } if id == node_id => {}
            _ => {
                return Err(Status::permission_denied(
                    "node calls need that node's certificate",
                ))
            }
        }
        self.daemon
            .manager()
            .ok_or_else(|| Status::failed_precondition("not a manager"))
    }

    fn local_only<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.caller(req) {
            Caller::Local => Ok(()),
            _ => Err(Status::permission_denied(
                "only on the local control socket",
            )),
        }
    }
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl api::cluster_server::Cluster for Api {
    async fn init(
        &self,
        req: Request<api::InitRequest>,
    ) -> Result<Response<api::InitResponse>, Status> {
        self.local_only(&req)?;
        self.daemon
            .init(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn join_cluster(
        &self,
        req: Request<api::JoinClusterRequest>,
    ) -> Result<Response<api::JoinClusterResponse>, Status> {
        self.local_only(&req)?;
        self.daemon
            .join(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn info(&self, req: Request<api::Empty>) -> Result<Response<api::InfoResponse>, Status> {
        self.local_only(&req)?;
        let Some(id) = self.daemon.identity() else {
            return Ok(Response::new(api::InfoResponse::default()));
        };
        let m = self.daemon.manager();
        Ok(Response::new(api::InfoResponse {
            node_id: id.node_id,
            cluster_id: id.cluster_id,
            role: api::Role::from(id.role).into(),
            leader: m.as_ref().is_some_and(|m| m.is_leader()),
            managers: id.managers,
        }))
    }

    async fn join(
        &self,
        req: Request<api::JoinRequest>,
    ) -> Result<Response<api::JoinResponse>, Status> {
        if self.local {
            return Err(Status::permission_denied(
                "join through the cluster endpoint",
            ));
        }
        self.daemon
            .admit(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn heartbeat(
        &self,
        req: Request<api::HeartbeatRequest>,
    ) -> Result<Response<api::HeartbeatResponse>, Status> {
        let node_id = req.get_ref().node_id.clone();
        let m = self.node(&req, &node_id)?;
        m.heartbeat(&node_id).await.map_err(status)?;
        Ok(Response::new(api::HeartbeatResponse {
            period_ms: m.cluster.heartbeat_period_ms,
            managers: m.manager_addrs().await.map_err(status)?,
        }))
    }

    type AssignmentsStream = Stream2<api::AssignmentSet>;

    async fn assignments(
        &self,
        req: Request<api::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let node_id = req.get_ref().node_id.clone();
        let m = self.node(&req, &node_id)?;
        let rx = m.assignments(node_id);
        let s = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| match r {
            Ok(tasks) => Ok(api::AssignmentSet {
                tasks: tasks.into_iter().map(Into::into).collect(),
            }),
            Err(e) => Err(Status::unavailable(chain(&e))),
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn report_status(
        &self,
        req: Request<api::StatusReport>,
    ) -> Result<Response<api::Empty>, Status> {
        let node_id = match self.caller(&req) {
            Caller::Node { id, .. } => id,
            _ => return Err(Status::permission_denied("reports need a node certificate")),
        };
        let m = self.node(&req, &node_id)?;
        let r = req.into_inner();
        let mut st = TaskStatus::try_from(r.status.ok_or(ConvertError::Missing("task status"))?)?;
        // When it arrived is the manager's clock, as every status's is.
        st.timestamp_ms = now_ms();
        m.report(&node_id, &r.task_id, st).await.map_err(status)?;
        Ok(Response::new(api::Empty {}))
    }

    async fn join_token(
        &self,
        req: Request<api::JoinTokenRequest>,
    ) -> Result<Response<api::JoinTokenResponse>, Status> {
        self.control(&req)?;
        let r = req.into_inner();
        let role = Role::decode(r.role)?;
        let token = self
            .daemon
            .join_token(role, r.rotate)
            .await
            .map_err(status)?;
        Ok(Response::new(api::JoinTokenResponse { token }))
    }

    async fn node_list(&self, req: Request<api::Empty>) -> Result<Response<api::Nodes>, Status> {
        let m = self.control(&req)?;
        let nodes = m.nodes().await.map_err(status)?;
        let leader = m.leader_id().await.unwrap_or_default();
        // The leader is marked the way `docker node ls` shows it.
        let nodes = nodes
            .into_iter()
            .map(|n| api::NodeEntry {
                leader: n.id == leader,
                node: Some(n.into()),
            })
            .collect();
        Ok(Response::new(api::Nodes { nodes }))
    }

    async fn node_inspect(&self, req: Request<api::Ref>) -> Result<Response<api::Node>, Status> {
        let m = self.control(&req)?;
        let n = m.find_node(&req.get_ref().name).await.map_err(status)?;
        Ok(Response::new(n.into()))
    }

    async fn node_update(
        &self,
        req: Request<api::NodeUpdateRequest>,
    ) -> Result<Response<api::Node>, Status> {
        let m = self.control(&req)?;
        let r = req.into_inner();
        let availability = r.availability.map(Availability::decode).transpose()?;
        let role = r.role.map(Role::decode).transpose()?;
        let n = m
            .update_node(&r.node, availability, &r.label_add, &r.label_rm, role)
            .await
            .map_err(status)?;
        Ok(Response::new(n.into()))
    }

    async fn node_remove(
        &self,
        req: Request<api::RemoveRequest>,
    ) -> Result<Response<api::Empty>, Status> {
        let m = self.control(&req)?;
        let r = req.into_inner();
        m.remove_node(&r.name, r.force).await.map_err(status)?;
        Ok(Response::new(api::Empty {}))
    }

    async fn service_create(
        &self,
        req: Request<api::ServiceSpec>,
    ) -> Result<Response<api::Service>, Status> {
        let m = self.control(&req)?;
        let spec = ServiceSpec::try_from(req.into_inner())?;
        let s = m.create_service(spec).await.map_err(status)?;
        Ok(Response::new(s.into()))
    }

    async fn service_list(
        &self,
        req: Request<api::Empty>,
    ) -> Result<Response<api::Services>, Status> {
        let m = self.control(&req)?;
        let v = m.services().await.map_err(status)?;
        Ok(Response::new(api::Services {
            services: v.into_iter().map(Into::into).collect(),
        }))
    }

    async fn service_inspect(
        &self,
        req: Request<api::Ref>,
    ) -> Result<Response<api::Service>, Status> {
        let m = self.control(&req)?;
        let s = m.find_service(&req.get_ref().name).await.map_err(status)?;
        Ok(Response::new(s.into()))
    }

    async fn service_update(
        &self,
        req: Request<api::ServiceUpdateRequest>,
    ) -> Result<Response<api::Service>, Status> {
        let m = self.control(&req)?;
        let r = req.into_inner();
        let spec = r.spec.map(ServiceSpec::try_from).transpose()?;
        let s = m
            .update_service(&r.service, spec, r.rollback, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(s.into()))
    }

    async fn service_remove(&self, req: Request<api::Ref>) -> Result<Response<api::Empty>, Status> {
        let m = self.control(&req)?;
        m.remove_service(&req.get_ref().name)
            .await
            .map_err(status)?;
        Ok(Response::new(api::Empty {}))
    }

    async fn task_list(
        &self,
        req: Request<api::TaskFilter>,
    ) -> Result<Response<api::Tasks>, Status> {
        let m = self.control(&req)?;
        let r = req.into_inner();
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let (svc, node) = (opt(&r.service), opt(&r.node));
        let tasks = m
            .tasks(svc.as_deref(), node.as_deref())
            .await
            .map_err(status)?;
        let tasks = tasks.into_iter().filter(|t| {
            r.all || t.desired_state == TaskState::Running || !t.status.state.is_terminal()
        });
        Ok(Response::new(api::Tasks {
            tasks: tasks.map(Into::into).collect(),
        }))
    }

    type ServiceLogsStream = Stream2<api::LogChunk>;

    async fn service_logs(
        &self,
        req: Request<api::LogsRequest>,
    ) -> Result<Response<Self::ServiceLogsStream>, Status> {
        let m = self.control(&req)?;
        let r = req.into_inner();
        let tasks = m.tasks(Some(&r.service), None).await.map_err(status)?;
        let nodes = m.nodes().await.map_err(status)?;
        let tls = self
            .daemon
            .identity()
            .ok_or_else(|| Status::failed_precondition("no identity"))?
            .tls();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<api::LogChunk, Status>>(64);
        for t in tasks.into_iter().filter(|t| !t.node_id.is_empty()) {
            let Some(n) = nodes.iter().find(|n| n.id == t.node_id).cloned() else {
                continue;
            };
            let (tx, tls, follow) = (tx.clone(), tls.clone(), r.follow);
            tokio::spawn(async move {
                // Why this node's logs stopped, as the line the client sees.
                let r: Result<(), String> = async {
                    let ch = crate::node::transport::node_channel(&n.addr, &n.id, &tls)
                        .await
                        .map_err(|e| chain(&e))?;
                    let mut s = api::cluster_client::ClusterClient::new(ch)
                        .task_logs(api::TaskLogsRequest {
                            task_id: t.id.clone(),
                            follow,
                        })
                        .await
                        .map_err(|s| s.message().to_string())?
                        .into_inner();
                    while let Some(c) = s.message().await.map_err(|s| s.message().to_string())? {
                        if tx.send(Ok(c)).await.is_err() {
                            break;
                        }
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    let _ = tx
                        .send(Ok(api::LogChunk {
                            task_id: t.id.clone(),
                            stream: api::LogStream::Error.into(),
                            data: format!("logs of task {} from node {}: {e}\n", t.id, n.hostname)
                                .into_bytes(),
                        }))
                        .await;
                }
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type EventsStream = Stream2<api::Event>;

    async fn events(
        &self,
        req: Request<api::Empty>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let m = self.control(&req)?;
        let mut w = m
            .store
            .watch_prefix(crate::store::ROOT)
            .await
            .map_err(|e| Status::unavailable(chain(&e)))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<api::Event, Status>>(64);
        tokio::spawn(async move {
            // The watch ends only with an error: the client is told why
            // rather than seeing the stream end as if all were said.
            let why = loop {
                let changes = match w.next().await {
                    Ok(c) => c,
                    Err(e) => break chain(&e),
                };
                for c in &changes {
                    if let Some(ev) = event_of(c) {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                }
            };
            tracing::warn!("events stream ended: {why}");
            let _ = tx.send(Err(Status::unavailable(why))).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type TaskLogsStream = Stream2<api::LogChunk>;

    async fn task_logs(
        &self,
        req: Request<api::TaskLogsRequest>,
    ) -> Result<Response<Self::TaskLogsStream>, Status> {
        match self.caller(&req) {
            Caller::Node {
                role: Role::Manager,
                ..
            } => {}
            _ => return Err(Status::permission_denied("task logs are for managers")),
        }
        let r = req.into_inner();
        check_task_id(&r.task_id)?;
        let ex = crate::util::lock(&self.daemon.executor)
            .clone()
            .ok_or_else(|| Status::failed_precondition("this node runs no tasks yet"))?;
        let path = ex.log_path(&r.task_id);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<api::LogChunk, Status>>(64);
        std::thread::spawn(move || {
            let mut offset = 0;
            loop {
                let (mut out, mut err) = (Vec::new(), Vec::new());
                match husk_runtime::container::record::replay(&path, offset, &mut out, &mut err) {
                    Ok(o) => offset = o,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(chain(&e))));
                        return;
                    }
                }
                for (stream, data) in [(api::LogStream::Stdout, out), (api::LogStream::Stderr, err)]
                {
                    if data.is_empty() {
                        continue;
                    }
                    let c = api::LogChunk {
                        task_id: r.task_id.clone(),
                        stream: stream.into(),
                        data,
                    };
                    if tx.blocking_send(Ok(c)).is_err() {
                        return;
                    }
                }
                if !r.follow || tx.is_closed() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// One change in etcd as a cluster event: what changed and, unless it
/// was removed, the object as it is now.
fn event_of(c: &crate::store::Change) -> Option<api::Event> {
    use crate::store::ChangeKind;
    use api::event::{Action, Kind, Object};
    let rest = c.key.strip_prefix(crate::store::ROOT)?;
    let (kind, id) = rest.split_once('/')?;
    let kind = match kind {
        "nodes" => Kind::Node,
        "services" => Kind::Service,
        "tasks" => Kind::Task,
        _ => return None,
    };
    let action = match c.kind {
        ChangeKind::Deleted => Action::Remove,
        ChangeKind::Created => Action::Create,
        ChangeKind::Updated => Action::Update,
    };
    // A value that is not the object its key says (none on a removal) is
    // an event without one; the change itself is still told.
    let object = match kind {
        Kind::Node => serde_json::from_slice::<Node>(&c.value)
            .ok()
            .map(|n| Object::Node(n.into())),
        Kind::Service => serde_json::from_slice::<Service>(&c.value)
            .ok()
            .map(|s| Object::Service(s.into())),
        _ => serde_json::from_slice::<Task>(&c.value)
            .ok()
            .map(|t| Object::Task(t.into())),
    };
    Some(api::Event {
        time_ms: now_ms(),
        kind: kind.into(),
        action: action.into(),
        id: id.to_string(),
        object,
    })
}

/// Task ids name log files: plain, or refused.
fn check_task_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(Status::invalid_argument(format!("task id {id:?}")));
    }
    Ok(())
}

/// Serving the API.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("TLS configuration")]
    Tls(#[from] tonic::transport::Error),
}

/// The control socket, served until the process ends.
pub async fn serve_local(daemon: Arc<Daemon>) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let path = daemon.cfg.socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(|| shown(dir))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).at(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).at(|| shown(&path))?;
    let api = Api {
        daemon,
        local: true,
    };
    tokio::spawn(async move {
        let r = Server::builder()
            .add_service(ClusterServer::new(api))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
        if let Err(e) = r {
            tracing::error!("control socket: {e}");
        }
    });
    Ok(())
}

/// The cluster endpoint (managers): TLS with this node's certificate and
/// the CA behind it (a joining node checks that CA against its token);
/// client certificates optional, and checked per call.
pub async fn serve_cluster(daemon: Arc<Daemon>, id: &Identity) -> Result<(), ServeError> {
    let chain = format!("{}{}", id.cert_pem, id.ca_pem);
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(chain, &id.key_pem))
        .client_ca_root(Certificate::from_pem(&id.ca_pem))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind(daemon.cfg.listen)
        .await
        .at(|| format!("listening on {}", daemon.cfg.listen))?;
    let api = Api {
        daemon,
        local: false,
    };
    let server = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(3)))
        .add_service(ClusterServer::new(api).max_decoding_message_size(64 << 20));
    tokio::spawn(async move {
        let r = server
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
        if let Err(e) = r {
            tracing::error!("cluster endpoint: {e}");
        }
    });
    Ok(())
}
