//! One huskd: its identity in the cluster (kept in its state directory),
//! the roles it plays (manager, node), and how it gets them — `init`
//! makes a new cluster, `join` enters one with a token.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use husk_runtime::util::{shown, IoContext, IoError};

use crate::error::ControlError;
use crate::manager::Manager;
use crate::pb as api;
use crate::pki;
use crate::pki::PkiError;
use crate::store::StoreError;
use crate::store::{self, Store};
use crate::types::*;
use crate::util::{lock, new_id};
use husk_cluster_api::convert::Decode;

pub mod executor;
pub mod identity;
pub mod session;
pub mod transport;

use executor::Executor;
pub use identity::Identity;
use transport::{self as net, Tls};

#[derive(Clone, Debug)]
pub struct Config {
    /// Identity, certificates, task logs.
    pub state_dir: PathBuf,
    /// The control socket (the CLI's way in).
    pub socket: PathBuf,
    /// Where the cluster endpoint listens (managers).
    pub listen: std::net::SocketAddr,
    /// host:port others reach this node at; default: `listen`.
    pub advertise: Option<String>,
    /// etcd, for `init` (joining managers learn it from the cluster).
    pub etcd: Vec<String>,
    pub hostname: String,
    /// How its tasks' sandboxes start (default: parked).
    pub boot: husk_runtime::Boot,
}

pub struct Daemon {
    pub cfg: Config,
    pub identity: Mutex<Option<Identity>>,
    pub manager: Mutex<Option<Arc<Manager>>>,
    pub executor: Mutex<Option<Arc<Executor>>>,
    roles: Box<dyn Roles>,
}

/// What a node's daemon refuses or fails at: joining, initializing,
/// admitting, its identity file. A control refusal rides inside as itself
/// (`crate::error::find` finds it for the API's status).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("identity.json")]
    Identity(#[source] serde_json::Error),
    #[error("encoding the cluster's record")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error(transparent)]
    Convert(#[from] husk_cluster_api::convert::ConvertError),
    /// The manager asked to admit this node said no.
    #[error("the manager refused the join: {0}")]
    JoinRefused(String),
    /// The cluster's state in etcd lacks what it must have.
    #[error("{0}")]
    Missing(&'static str),
    #[error("starting this node's roles")]
    Roles(#[source] Box<dyn std::error::Error + Send + Sync>),
}

type Result<T, E = NodeError> = std::result::Result<T, E>;

/// A future of starting roles.
pub type RolesFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// What starts a node's roles once it has an identity (the manager, the
/// node session, the cluster endpoint): huskd's `crate::roles::Huskd`. A seam,
/// so the daemon (which the API serves) does not depend on the API server
/// that a role starts.
pub trait Roles: Send + Sync {
    fn start(&self, daemon: Arc<Daemon>, id: Identity) -> RolesFuture;
}

impl Daemon {
    pub fn new(cfg: Config, roles: Box<dyn Roles>) -> Result<Arc<Daemon>> {
        std::fs::create_dir_all(&cfg.state_dir).at(|| shown(&cfg.state_dir))?;
        let identity = match std::fs::read(cfg.state_dir.join("identity.json")) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(NodeError::Identity)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).at(|| "identity.json")?,
        };
        Ok(Arc::new(Daemon {
            cfg,
            identity: Mutex::new(identity),
            manager: Mutex::new(None),
            executor: Mutex::new(None),
            roles,
        }))
    }

    pub fn identity(&self) -> Option<Identity> {
        lock(&self.identity).clone()
    }

    pub fn manager(&self) -> Option<Arc<Manager>> {
        lock(&self.manager).clone()
    }

    fn advertise(&self) -> String {
        self.cfg
            .advertise
            .clone()
            .unwrap_or_else(|| self.cfg.listen.to_string())
    }

    fn save(&self, id: &Identity) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.cfg.state_dir.join("identity.json");
        let tmp = path.with_extension("new");
        let mut f = std::fs::File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .at(|| shown(&tmp))?;
        let json = serde_json::to_vec_pretty(id).map_err(NodeError::Identity)?;
        std::io::Write::write_all(&mut f, &json)
            .and_then(|()| f.sync_all())
            .at(|| shown(&tmp))?;
        std::fs::rename(&tmp, &path).at(|| shown(&path))?;
        *lock(&self.identity) = Some(id.clone());
        Ok(())
    }

    /// Starts what the identity says this node is.
    pub async fn start_roles(self: &Arc<Self>) -> Result<()> {
        let Some(id) = self.identity() else {
            return Ok(());
        };
        self.roles.start(self.clone(), id).await
    }

    /// `husk cluster init`: a new cluster in etcd, this node its first
    /// manager.
    pub async fn init(self: &Arc<Self>, req: api::InitRequest) -> Result<api::InitResponse> {
        if self.identity().is_some() {
            return Err(ControlError::Precondition(
                "this node is already part of a cluster: leave it first".into(),
            )
            .into());
        }
        let etcd = if req.etcd_endpoints.is_empty() {
            self.cfg.etcd.clone()
        } else {
            req.etcd_endpoints.clone()
        };
        if etcd.is_empty() {
            return Err(ControlError::Invalid(
                "no etcd endpoints: start huskd with --etcd or pass --etcd to init".into(),
            )
            .into());
        }
        let store = Store::connect(&etcd).await?;
        let cluster_id = new_id();
        let period = if req.heartbeat_period_ms == 0 {
            1000
        } else {
            req.heartbeat_period_ms
        };
        let grace = if req.heartbeat_grace_ms == 0 {
            period * 5
        } else {
            req.heartbeat_grace_ms
        };
        if grace <= period {
            return Err(ControlError::Invalid(format!(
                "heartbeat grace ({grace} ms) must be longer than the period ({period} ms)"
            ))
            .into());
        }
        let info = ClusterInfo {
            id: cluster_id.clone(),
            created_ms: now_ms(),
            heartbeat_period_ms: period,
            heartbeat_grace_ms: grace,
            etcd_endpoints: etcd.clone(),
        };
        if !store
            .create_raw(
                &store::cluster_key(),
                serde_json::to_vec(&info).map_err(NodeError::Encode)?,
            )
            .await?
        {
            let (other, _) = store
                .get::<ClusterInfo>(&store::cluster_key())
                .await?
                .ok_or(NodeError::Missing("the cluster key vanished from etcd"))?;
            return Err(ControlError::Precondition(format!(
                "etcd at {} already holds cluster {}: join it (husk cluster join) instead",
                etcd.join(","),
                other.id
            ))
            .into());
        }
        let (ca, ca_key) = pki::new_ca(&cluster_id)?;
        store
            .put_raw(&store::ca_cert_key(), ca.clone().into_bytes())
            .await?;
        store
            .put_raw(&store::ca_key_key(), ca_key.clone().into_bytes())
            .await?;
        let digest = pki::cert_digest(&ca)?;
        let mut tokens = Vec::new();
        for role in [Role::Worker, Role::Manager] {
            let secret = pki::new_secret()?;
            store
                .put_raw(&store::token_key(role), secret.clone().into_bytes())
                .await?;
            tokens.push(pki::token(&digest, &secret));
        }
        let node_id = new_id();
        let (key, csr) = pki::new_key_and_csr()?;
        let cert = pki::sign_node(&ca, &ca_key, &csr, &node_id, &cluster_id, Role::Manager)?;
        let advertise = if req.advertise_addr.is_empty() {
            self.advertise()
        } else {
            req.advertise_addr.clone()
        };
        let node = self.node_record(&node_id, Role::Manager, &advertise);
        store.put(&store::node_key(&node_id), &node).await?;
        self.save(&Identity {
            node_id: node_id.clone(),
            cluster_id: cluster_id.clone(),
            role: Role::Manager,
            ca_pem: ca,
            cert_pem: cert,
            key_pem: key,
            managers: vec![advertise.clone()],
            etcd,
            advertise,
        })?;
        self.start_roles().await?;
        Ok(api::InitResponse {
            node_id,
            cluster_id,
            worker_token: tokens[0].clone(),
            manager_token: tokens[1].clone(),
        })
    }

    fn node_record(&self, id: &str, role: Role, addr: &str) -> Node {
        let r = host_resources();
        Node {
            id: id.to_string(),
            hostname: self.cfg.hostname.clone(),
            addr: addr.to_string(),
            role,
            availability: Availability::Active,
            labels: Default::default(),
            state: NodeState::Unknown,
            resources: r,
            created_ms: now_ms(),
            updated_ms: now_ms(),
        }
    }

    /// `husk cluster join --token T ADDR`.
    pub async fn join(
        self: &Arc<Self>,
        req: api::JoinClusterRequest,
    ) -> Result<api::JoinClusterResponse> {
        if self.identity().is_some() {
            return Err(ControlError::Precondition(
                "this node is already part of a cluster: leave it first".into(),
            )
            .into());
        }
        let (digest, secret) = pki::parse_token(&req.token)?;
        let ca = net::fetch_ca(&req.remote_addr, &digest).await?;
        let (key, csr) = pki::new_key_and_csr()?;
        let ch = net::manager_channel(
            &req.remote_addr,
            &Tls {
                ca_pem: ca.clone(),
                identity: None,
            },
        )
        .await?;
        let advertise = if req.advertise_addr.is_empty() {
            self.advertise()
        } else {
            req.advertise_addr.clone()
        };
        let r = host_resources();
        let resp = api::cluster_client::ClusterClient::new(ch)
            .join(api::JoinRequest {
                secret,
                csr_pem: csr.into_bytes(),
                hostname: self.cfg.hostname.clone(),
                advertise_addr: advertise.clone(),
                resources: Some(r.into()),
            })
            .await
            .map_err(|s| NodeError::JoinRefused(s.message().to_string()))?
            .into_inner();
        let role = Role::decode(resp.role)?;
        let cert = String::from_utf8(resp.cert_pem).map_err(|_| {
            NodeError::Missing("the manager's certificate for this node is not text")
        })?;
        self.save(&Identity {
            node_id: resp.node_id.clone(),
            cluster_id: resp.cluster_id,
            role,
            ca_pem: ca,
            cert_pem: cert,
            key_pem: key,
            managers: resp.managers,
            etcd: resp.etcd_endpoints,
            advertise,
        })?;
        self.start_roles().await?;
        Ok(api::JoinClusterResponse {
            node_id: resp.node_id,
            role: api::Role::from(role).into(),
        })
    }

    /// The manager side of a join: checks the token's secret, signs the
    /// node's key, records the node.
    pub async fn admit(&self, req: api::JoinRequest) -> Result<api::JoinResponse> {
        let m = self.manager().ok_or(ControlError::NotManager)?;
        let id = self.identity().ok_or(ControlError::NotManager)?;
        let store = &m.store;
        let mut role = None;
        for r in [Role::Worker, Role::Manager] {
            let want = store.get_string(&store::token_key(r)).await?;
            if want.is_some_and(|w| constant_time_eq(w.as_bytes(), req.secret.as_bytes())) {
                role = Some(r);
            }
        }
        let Some(role) = role else {
            return Err(ControlError::InvalidJoinToken.into());
        };
        check_hostname(&req.hostname)?;
        let ca_key = store
            .get_string(&store::ca_key_key())
            .await?
            .ok_or(NodeError::Missing("the CA key is missing from etcd"))?;
        let csr =
            String::from_utf8(req.csr_pem).map_err(|_| PkiError::BadCsr("not UTF-8".into()))?;
        let node_id = new_id();
        let cert = pki::sign_node(&id.ca_pem, &ca_key, &csr, &node_id, &id.cluster_id, role)?;
        let node = Node {
            id: node_id.clone(),
            hostname: req.hostname,
            addr: req.advertise_addr,
            role,
            availability: Availability::Active,
            labels: Default::default(),
            state: NodeState::Unknown,
            resources: {
                let r = req.resources.unwrap_or_default();
                Resources {
                    nano_cpus: r.nano_cpus.max(0),
                    memory_bytes: r.memory_bytes.max(0),
                }
            },
            created_ms: now_ms(),
            updated_ms: now_ms(),
        };
        store.put(&store::node_key(&node_id), &node).await?;
        tracing::info!(
            "node {} ({}) joined as {}",
            node.id,
            node.hostname,
            role.as_str()
        );
        Ok(api::JoinResponse {
            node_id,
            role: api::Role::from(role).into(),
            cert_pem: cert.into_bytes(),
            managers: m.manager_addrs().await?,
            etcd_endpoints: if role == Role::Manager {
                m.cluster.etcd_endpoints.clone()
            } else {
                Vec::new()
            },
            cluster_id: id.cluster_id,
        })
    }

    /// A join token, the secret rotated first when asked (old tokens stop
    /// working at once; nodes already in keep their certificates).
    pub async fn join_token(&self, role: Role, rotate: bool) -> Result<String> {
        let m = self.manager().ok_or(ControlError::NotManager)?;
        let id = self.identity().ok_or(ControlError::NotManager)?;
        let key = store::token_key(role);
        if rotate {
            m.store
                .put_raw(&key, pki::new_secret()?.into_bytes())
                .await?;
        }
        let secret = m
            .store
            .get_string(&key)
            .await?
            .ok_or(NodeError::Missing("no join token in etcd"))?;
        Ok(pki::token(&pki::cert_digest(&id.ca_pem)?, &secret))
    }
}

fn check_hostname(h: &str) -> Result<()> {
    if h.is_empty() || h.len() > 253 || h.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ControlError::Invalid(format!("hostname {h:?} is not a hostname")).into());
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What this host offers tasks: its CPUs and memory.
pub fn host_resources() -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<i64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    Resources {
        nano_cpus: cpus * 1_000_000_000,
        memory_bytes: mem,
    }
}
