//! `husk cluster|node|service`: Docker's swarm commands, sent to the local
//! huskd over its control socket (`HUSK_HOST`, default
//! /run/husk/huskd.sock).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use husk_cluster_api::pb as api;
use husk_cluster_api::pb::cluster_client::ClusterClient;
use husk_cluster_api::types::*;
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make a new cluster with this node as its first manager.
    Init {
        /// host:port other nodes reach this one at.
        #[arg(long)]
        advertise_addr: Option<String>,
        /// etcd endpoints (default: huskd's --etcd).
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// How often nodes heartbeat (e.g. 1s).
        #[arg(long)]
        heartbeat_period: Option<String>,
        /// Silence after which a node is down and its tasks move (e.g. 5s).
        #[arg(long)]
        heartbeat_grace: Option<String>,
    },
    /// Join a cluster as the token says (worker or manager).
    Join {
        #[arg(long)]
        token: String,
        #[arg(long)]
        advertise_addr: Option<String>,
        /// A manager's host:port.
        addr: String,
    },
    /// Print (or rotate) the token for joining as worker or manager.
    JoinToken {
        #[arg(long)]
        rotate: bool,
        #[arg(short, long)]
        quiet: bool,
        role: String,
    },
    /// This node's place in its cluster.
    Info,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List the cluster's nodes.
    Ls {
        #[arg(short, long)]
        quiet: bool,
        /// `json`: one object per line.
        #[arg(long)]
        format: Option<String>,
    },
    Inspect {
        nodes: Vec<String>,
    },
    /// Availability and labels.
    Update {
        #[arg(long)]
        availability: Option<String>,
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        node: String,
    },
    /// Tasks on a node.
    Ps {
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        format: Option<String>,
        node: String,
    },
    Rm {
        #[arg(short, long)]
        force: bool,
        nodes: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service.
    Create(Box<CreateArgs>),
    /// List services.
    Ls {
        #[arg(short, long)]
        quiet: bool,
        #[arg(long)]
        format: Option<String>,
    },
    /// A service's tasks.
    Ps {
        /// Finished tasks too (the history of each slot).
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        format: Option<String>,
        service: String,
    },
    Inspect {
        services: Vec<String>,
    },
    /// Set replica counts: `husk service scale web=5 db=1`.
    Scale {
        pairs: Vec<String>,
    },
    /// Change a service; the change rolls out as its update config says.
    Update(Box<UpdateArgs>),
    /// Back to the previous spec.
    Rollback {
        service: String,
    },
    /// Output of the service's tasks, gathered from their nodes.
    Logs {
        #[arg(short, long)]
        follow: bool,
        service: String,
    },
    Rm {
        services: Vec<String>,
    },
}

/// Flags `create` and `update` share (Swarm's names).
#[derive(Subcommand)]
pub enum StackCmd {
    /// Deploy a compose file (v3) as stack NAME: create or update its services.
    Deploy {
        #[arg(short = 'c', long = "compose-file")]
        compose_file: std::path::PathBuf,
        name: String,
    },
    /// List stacks.
    Ls,
    /// A stack's tasks.
    Ps {
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        format: Option<String>,
        name: String,
    },
    /// A stack's services.
    Services {
        #[arg(long)]
        format: Option<String>,
        name: String,
    },
    /// Remove stacks (their services; volumes stay, as Docker's).
    Rm { names: Vec<String> },
}

#[derive(Args, Default)]
pub struct Policy {
    #[arg(long)]
    replicas_max_per_node: Option<u64>,
    #[arg(long)]
    reserve_cpu: Option<f64>,
    #[arg(long)]
    reserve_memory: Option<String>,
    #[arg(long)]
    limit_cpu: Option<f64>,
    #[arg(long)]
    limit_memory: Option<String>,
    /// none, on-failure or any.
    #[arg(long)]
    restart_condition: Option<String>,
    #[arg(long)]
    restart_delay: Option<String>,
    #[arg(long)]
    restart_max_attempts: Option<u64>,
    #[arg(long)]
    restart_window: Option<String>,
    #[arg(long)]
    update_parallelism: Option<u64>,
    #[arg(long)]
    update_delay: Option<String>,
    /// pause, continue or rollback.
    #[arg(long)]
    update_failure_action: Option<String>,
    #[arg(long)]
    update_monitor: Option<String>,
    #[arg(long)]
    update_max_failure_ratio: Option<f64>,
    /// stop-first or start-first.
    #[arg(long)]
    update_order: Option<String>,
    #[arg(long)]
    rollback_parallelism: Option<u64>,
    #[arg(long)]
    rollback_delay: Option<String>,
    #[arg(long)]
    rollback_failure_action: Option<String>,
    #[arg(long)]
    rollback_monitor: Option<String>,
    #[arg(long)]
    rollback_max_failure_ratio: Option<f64>,
    #[arg(long)]
    rollback_order: Option<String>,
    #[arg(long)]
    health_cmd: Option<String>,
    #[arg(long)]
    health_interval: Option<String>,
    #[arg(long)]
    health_timeout: Option<String>,
    #[arg(long)]
    health_retries: Option<u64>,
    #[arg(long)]
    health_start_period: Option<String>,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    replicas: Option<u64>,
    /// replicated or global.
    #[arg(long, default_value = "replicated")]
    mode: String,
    #[arg(long)]
    constraint: Vec<String>,
    #[arg(long)]
    placement_pref: Vec<String>,
    #[arg(short, long)]
    env: Vec<String>,
    /// type=volume,source=NAME,target=/PATH[,readonly] or type=tmpfs,target=/PATH.
    #[arg(long)]
    mount: Vec<String>,
    /// published=8080,target=80[,protocol=udp] or 8080:80[/udp].
    #[arg(short, long)]
    publish: Vec<String>,
    #[arg(short, long)]
    label: Vec<String>,
    /// Return at once (the default: huskd converges in the background).
    #[arg(short, long)]
    detach: bool,
    #[command(flatten)]
    policy: Policy,
    image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Args)]
pub struct UpdateArgs {
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    replicas: Option<u64>,
    /// New arguments (one string, split on spaces).
    #[arg(long)]
    args: Option<String>,
    #[arg(long)]
    env_add: Vec<String>,
    #[arg(long)]
    env_rm: Vec<String>,
    #[arg(long)]
    constraint_add: Vec<String>,
    #[arg(long)]
    constraint_rm: Vec<String>,
    /// Replace every task even if nothing changed.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    rollback: bool,
    #[arg(short, long)]
    detach: bool,
    #[command(flatten)]
    policy: Policy,
    service: String,
}

fn parse_port(p: &str) -> Result<PortSpec> {
    let bad = || {
        anyhow::anyhow!(
            "--publish {p:?}: published=8080,target=80[,protocol=tcp|udp] or 8080:80[/udp]"
        )
    };
    let mut spec = PortSpec {
        published: 0,
        target: 0,
        protocol: "tcp".into(),
    };
    if p.contains('=') {
        for kv in p.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            match k {
                "published" => spec.published = v.parse().map_err(|_| bad())?,
                "target" => spec.target = v.parse().map_err(|_| bad())?,
                "protocol" => spec.protocol = v.into(),
                "mode" if v == "host" || v == "ingress" => {}
                _ => return Err(bad()),
            }
        }
    } else {
        let (ports, proto) = p.split_once('/').unwrap_or((p, "tcp"));
        let (a, b) = ports.split_once(':').ok_or_else(bad)?;
        spec.published = a.parse().map_err(|_| bad())?;
        spec.target = b.parse().map_err(|_| bad())?;
        spec.protocol = proto.into();
    }
    Ok(spec)
}

fn parse_mount(m: &str) -> Result<MountSpec> {
    let mut spec = MountSpec {
        typ: "volume".into(),
        source: String::new(),
        target: String::new(),
        read_only: false,
    };
    for kv in m.split(',') {
        match kv.split_once('=') {
            Some(("type", v)) => spec.typ = v.into(),
            Some(("source" | "src", v)) => spec.source = v.into(),
            Some(("target" | "dst" | "destination", v)) => spec.target = v.into(),
            Some(("readonly" | "ro", v)) => spec.read_only = v != "false" && v != "0",
            None if kv == "readonly" || kv == "ro" => spec.read_only = true,
            _ => bail!("--mount {m:?}: unknown option {kv:?}"),
        }
    }
    if spec.target.is_empty() {
        bail!("--mount {m:?}: no target");
    }
    if spec.typ == "volume" && spec.source.is_empty() {
        bail!("--mount {m:?}: a volume needs source=NAME");
    }
    Ok(spec)
}

fn labels(v: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    v.iter()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
            if k.is_empty() {
                bail!("label {l:?}: key=value");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

fn cpus(c: f64) -> Result<i64> {
    if !(c > 0.0 && c < 1024.0) {
        bail!("cpu {c}: a positive number of CPUs");
    }
    Ok((c * 1e9) as i64)
}

/// `--update-*` or `--rollback-*`: parallelism, delay, failure action,
/// monitor, max failure ratio, order.
type UpdateFlags<'a> = (
    Option<u64>,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    Option<f64>,
    &'a Option<String>,
);

impl Policy {
    fn apply(&self, s: &mut ServiceSpec) -> Result<()> {
        if let Some(n) = self.replicas_max_per_node {
            s.placement.max_replicas_per_node = n;
        }
        let mem = |m: &str| husk_runtime::container::spec::parse_memory(m);
        if let Some(c) = self.reserve_cpu {
            s.resources.reservations.nano_cpus = cpus(c)?;
        }
        if let Some(m) = &self.reserve_memory {
            s.resources.reservations.memory_bytes = mem(m)?;
        }
        if let Some(c) = self.limit_cpu {
            s.resources.limits.nano_cpus = cpus(c)?;
        }
        if let Some(m) = &self.limit_memory {
            s.resources.limits.memory_bytes = mem(m)?;
        }
        let r = &mut s.restart_policy;
        if let Some(c) = &self.restart_condition {
            r.condition = c.parse()?;
        }
        if let Some(d) = &self.restart_delay {
            r.delay_ms = parse_duration(d)?;
        }
        if let Some(n) = self.restart_max_attempts {
            r.max_attempts = n;
        }
        if let Some(w) = &self.restart_window {
            r.window_ms = parse_duration(w)?;
        }
        fn upd(
            u: &mut UpdateConfig,
            (par, delay, action, monitor, ratio, order): UpdateFlags,
        ) -> Result<()> {
            if let Some(p) = par {
                u.parallelism = p;
            }
            if let Some(d) = delay {
                u.delay_ms = parse_duration(d)?;
            }
            if let Some(a) = action {
                u.failure_action = a.parse()?;
            }
            if let Some(m) = monitor {
                u.monitor_ms = parse_duration(m)?;
            }
            if let Some(r) = ratio {
                u.max_failure_ratio = r;
            }
            if let Some(o) = order {
                u.order = o.parse()?;
            }
            Ok(())
        }
        upd(
            &mut s.update_config,
            (
                self.update_parallelism,
                &self.update_delay,
                &self.update_failure_action,
                &self.update_monitor,
                self.update_max_failure_ratio,
                &self.update_order,
            ),
        )?;
        upd(
            &mut s.rollback_config,
            (
                self.rollback_parallelism,
                &self.rollback_delay,
                &self.rollback_failure_action,
                &self.rollback_monitor,
                self.rollback_max_failure_ratio,
                &self.rollback_order,
            ),
        )?;
        if let Some(cmd) = &self.health_cmd {
            let h = s.healthcheck.get_or_insert_with(|| Healthcheck {
                interval_ms: 30_000,
                timeout_ms: 30_000,
                retries: 3,
                ..Default::default()
            });
            h.test = vec!["CMD-SHELL".into(), cmd.clone()];
        }
        if let Some(h) = s.healthcheck.as_mut() {
            if let Some(d) = &self.health_interval {
                h.interval_ms = parse_duration(d)?;
            }
            if let Some(d) = &self.health_timeout {
                h.timeout_ms = parse_duration(d)?;
            }
            if let Some(n) = self.health_retries {
                h.retries = n;
            }
            if let Some(d) = &self.health_start_period {
                h.start_period_ms = parse_duration(d)?;
            }
        }
        Ok(())
    }
}

pub fn spec_from_create(a: &CreateArgs) -> Result<ServiceSpec> {
    let mode = match (a.mode.as_str(), a.replicas) {
        ("replicated", r) => Mode::Replicated {
            replicas: r.unwrap_or(1),
        },
        ("global", None) => Mode::Global,
        ("global", Some(_)) => bail!("--replicas does not go with --mode global"),
        (m, _) => bail!("--mode {m:?}: replicated or global"),
    };
    let mut s = ServiceSpec {
        name: a.name.clone(),
        image: a.image.clone(),
        args: a.args.clone(),
        env: a.env.clone(),
        mounts: a
            .mount
            .iter()
            .map(|m| parse_mount(m))
            .collect::<Result<_>>()?,
        ports: a
            .publish
            .iter()
            .map(|p| parse_port(p))
            .collect::<Result<_>>()?,
        mode,
        placement: Placement {
            constraints: a.constraint.clone(),
            preferences: a.placement_pref.clone(),
            max_replicas_per_node: 0,
        },
        labels: labels(&a.label)?,
        ..Default::default()
    };
    a.policy.apply(&mut s)?;
    s.validate()?;
    Ok(s)
}

struct Conn {
    c: ClusterClient<Channel>,
}

/// The server's message; for a transport failure (the connection broke,
/// a stream was reset) also the causes below it, which name what happened.
fn msg(s: tonic::Status) -> anyhow::Error {
    let mut text = s.message().to_string();
    let mut cause = std::error::Error::source(&s);
    if cause.is_some() {
        // Which of reset, GOAWAY or a closed socket it was (tonic's codes
        // for h2's reasons).
        text.push_str(&format!(" ({:?})", s.code()));
    }
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    anyhow::anyhow!("{text}")
}

impl Conn {
    async fn open() -> Result<Conn> {
        let c = husk_cluster_api::client::local_client(&husk_cluster_api::client::default_socket())
            .await?;
        Ok(Conn { c })
    }

    async fn nodes(&mut self) -> Result<Vec<(Node, bool)>> {
        let r = self
            .c
            .node_list(api::Empty {})
            .await
            .map_err(msg)?
            .into_inner();
        r.json
            .iter()
            .map(|j| {
                let v: serde_json::Value = serde_json::from_str(j)?;
                let leader = v["leader"].as_bool().unwrap_or(false);
                Ok((serde_json::from_value(v)?, leader))
            })
            .collect()
    }

    async fn services(&mut self) -> Result<Vec<Service>> {
        let r = self
            .c
            .service_list(api::Empty {})
            .await
            .map_err(msg)?
            .into_inner();
        r.json
            .iter()
            .map(|j| serde_json::from_str(j).context("service"))
            .collect()
    }

    async fn service(&mut self, name: &str) -> Result<Service> {
        let r = self
            .c
            .service_inspect(api::Ref { name: name.into() })
            .await
            .map_err(msg)?
            .into_inner();
        serde_json::from_str(&r.json).context("service")
    }

    async fn tasks(&mut self, service: &str, node: &str, all: bool) -> Result<Vec<Task>> {
        let r = self
            .c
            .task_list(api::TaskFilter {
                service: service.into(),
                node: node.into(),
                all,
            })
            .await
            .map_err(msg)?
            .into_inner();
        r.json
            .iter()
            .map(|j| serde_json::from_str(j).context("task"))
            .collect()
    }

    async fn update(
        &mut self,
        service: &str,
        spec: Option<&ServiceSpec>,
        rollback: bool,
        force: bool,
    ) -> Result<Service> {
        let r = self
            .c
            .service_update(api::ServiceUpdateRequest {
                service: service.into(),
                spec_json: spec
                    .map(serde_json::to_string)
                    .transpose()?
                    .unwrap_or_default(),
                rollback,
                force,
            })
            .await
            .map_err(msg)?
            .into_inner();
        serde_json::from_str(&r.json).context("service")
    }
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=1 => "Less than a second ago".to_string(),
        2..=59 => format!("{s} seconds ago"),
        60..=3599 => format!("{} minutes ago", s / 60),
        _ => format!("{} hours ago", s / 3600),
    }
}

fn title(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn table(rows: Vec<Vec<String>>) {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut w = vec![0; n];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<width$}   ", width = w[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn cluster(cmd: ClusterCmd) -> Result<()> {
    block_on(async move {
        let mut conn = Conn::open().await?;
        match cmd {
            ClusterCmd::Init {
                advertise_addr,
                etcd,
                heartbeat_period,
                heartbeat_grace,
            } => {
                let r = conn
                    .c
                    .init(api::InitRequest {
                        advertise_addr: advertise_addr.unwrap_or_default(),
                        etcd_endpoints: etcd,
                        heartbeat_period_ms: heartbeat_period
                            .as_deref()
                            .map(parse_duration)
                            .transpose()?
                            .unwrap_or(0),
                        heartbeat_grace_ms: heartbeat_grace
                            .as_deref()
                            .map(parse_duration)
                            .transpose()?
                            .unwrap_or(0),
                    })
                    .await
                    .map_err(msg)?
                    .into_inner();
                let info = conn.c.info(api::Empty {}).await.map_err(msg)?.into_inner();
                let addr = info.managers.first().cloned().unwrap_or_default();
                println!(
                    "Cluster initialized: current node ({}) is now a manager.\n",
                    r.node_id
                );
                println!("To add a worker to this cluster, run the following command:\n\n    husk cluster join --token {} {addr}\n", r.worker_token);
                println!("To add a manager to this cluster, run 'husk cluster join-token manager' and follow the instructions.");
            }
            ClusterCmd::Join {
                token,
                advertise_addr,
                addr,
            } => {
                let r = conn
                    .c
                    .join_cluster(api::JoinClusterRequest {
                        token,
                        remote_addr: addr,
                        advertise_addr: advertise_addr.unwrap_or_default(),
                    })
                    .await
                    .map_err(msg)?
                    .into_inner();
                println!(
                    "This node joined a cluster as a {} ({}).",
                    r.role, r.node_id
                );
            }
            ClusterCmd::JoinToken {
                rotate,
                quiet,
                role,
            } => {
                let r = conn
                    .c
                    .join_token(api::JoinTokenRequest {
                        role: role.clone(),
                        rotate,
                    })
                    .await
                    .map_err(msg)?
                    .into_inner();
                if quiet {
                    println!("{}", r.token);
                } else {
                    if rotate {
                        println!("Successfully rotated {role} join token.\n");
                    }
                    let info = conn.c.info(api::Empty {}).await.map_err(msg)?.into_inner();
                    let addr = info.managers.first().cloned().unwrap_or_default();
                    println!("To add a {role} to this cluster, run the following command:\n\n    husk cluster join --token {} {addr}", r.token);
                }
            }
            ClusterCmd::Info => {
                let i = conn.c.info(api::Empty {}).await.map_err(msg)?.into_inner();
                if i.role.is_empty() {
                    println!("Cluster: inactive");
                } else {
                    println!("Cluster: active\n NodeID: {}\n ClusterID: {}\n Role: {}\n Is Leader: {}\n Managers: {}", i.node_id, i.cluster_id, i.role, i.leader, i.managers.join(", "));
                }
            }
        }
        Ok(())
    })
}

pub fn node(cmd: NodeCmd) -> Result<()> {
    block_on(async move {
        let mut conn = Conn::open().await?;
        let me = conn
            .c
            .info(api::Empty {})
            .await
            .map_err(msg)?
            .into_inner()
            .node_id;
        match cmd {
            NodeCmd::Ls { quiet, format } => {
                let nodes = conn.nodes().await?;
                if quiet {
                    nodes.iter().for_each(|(n, _)| println!("{}", n.id));
                    return Ok(());
                }
                if format.as_deref() == Some("json") {
                    for (n, leader) in &nodes {
                        let mut v = serde_json::to_value(n)?;
                        v["leader"] = (*leader).into();
                        v["self"] = (n.id == me).into();
                        println!("{v}");
                    }
                    return Ok(());
                }
                let mut rows = vec![vec![
                    "ID".into(),
                    "HOSTNAME".into(),
                    "STATUS".into(),
                    "AVAILABILITY".into(),
                    "MANAGER STATUS".into(),
                ]];
                for (n, leader) in nodes {
                    let ms = match (n.role, leader, n.state) {
                        (Role::Worker, _, _) => "",
                        (_, true, _) => "Leader",
                        (_, _, NodeState::Ready) => "Reachable",
                        _ => "Unreachable",
                    };
                    let id = if n.id == me {
                        format!("{} *", n.id)
                    } else {
                        n.id.clone()
                    };
                    rows.push(vec![
                        id,
                        n.hostname,
                        title(&format!("{:?}", n.state).to_lowercase()),
                        title(&format!("{:?}", n.availability).to_lowercase()),
                        ms.into(),
                    ]);
                }
                table(rows);
            }
            NodeCmd::Inspect { nodes } => {
                let mut out = Vec::new();
                for n in &nodes {
                    let r = conn
                        .c
                        .node_inspect(api::Ref { name: n.clone() })
                        .await
                        .map_err(msg)?
                        .into_inner();
                    out.push(serde_json::from_str::<serde_json::Value>(&r.json)?);
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            NodeCmd::Update {
                availability,
                label_add,
                label_rm,
                node,
            } => {
                conn.c
                    .node_update(api::NodeUpdateRequest {
                        node: node.clone(),
                        availability: availability.unwrap_or_default(),
                        label_add,
                        label_rm,
                        role: String::new(),
                    })
                    .await
                    .map_err(msg)?;
                println!("{node}");
            }
            NodeCmd::Ps { all, format, node } => {
                let tasks = conn.tasks("", &node, all).await?;
                print_tasks(&mut conn, tasks, format.as_deref()).await?;
            }
            NodeCmd::Rm { force, nodes } => {
                for n in nodes {
                    conn.c
                        .node_remove(api::RemoveRequest {
                            name: n.clone(),
                            force,
                        })
                        .await
                        .map_err(msg)?;
                    println!("{n}");
                }
            }
        }
        Ok(())
    })
}

async fn print_tasks(conn: &mut Conn, tasks: Vec<Task>, format: Option<&str>) -> Result<()> {
    let hosts: HashMap<String, String> = conn
        .nodes()
        .await?
        .into_iter()
        .map(|(n, _)| (n.id, n.hostname))
        .collect();
    if format == Some("json") {
        for t in &tasks {
            let mut v = serde_json::to_value(t)?;
            v["name"] = t.name().into();
            v["node"] = hosts.get(&t.node_id).cloned().unwrap_or_default().into();
            println!("{v}");
        }
        return Ok(());
    }
    let mut rows = vec![vec![
        "ID".into(),
        "NAME".into(),
        "IMAGE".into(),
        "NODE".into(),
        "DESIRED STATE".into(),
        "CURRENT STATE".into(),
        "ERROR".into(),
    ]];
    for t in tasks {
        rows.push(vec![
            t.id.chars().take(12).collect(),
            t.name(),
            t.spec.image.clone(),
            hosts.get(&t.node_id).cloned().unwrap_or_default(),
            title(t.desired_state.as_str()),
            format!(
                "{} {}",
                title(t.status.state.as_str()),
                ago(t.status.timestamp_ms)
            ),
            t.status.err.clone(),
        ]);
    }
    table(rows);
    Ok(())
}

/// `husk events`: cluster changes as they happen, one line each (JSON
/// with `--format json`).
pub fn events(format: Option<String>) -> Result<()> {
    block_on(async move {
        let mut conn = Conn::open().await?;
        let mut s = conn
            .c
            .events(api::Empty {})
            .await
            .map_err(msg)?
            .into_inner();
        while let Some(o) = s.message().await.map_err(msg)? {
            if format.as_deref() == Some("json") {
                println!("{}", o.json);
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&o.json)?;
            let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
            let mut line = format!("{} {} {}", text("type"), text("action"), text("id"));
            for k in ["name", "state", "desired", "availability"] {
                if !text(k).is_empty() {
                    line.push_str(&format!(" {k}={}", text(k)));
                }
            }
            println!("{line}");
        }
        Ok(())
    })
}

fn in_stack(s: &Service, stack: &str) -> bool {
    s.spec
        .labels
        .get(crate::compose::STACK_LABEL)
        .map(String::as_str)
        == Some(stack)
}

pub fn stack(cmd: StackCmd) -> Result<()> {
    block_on(async move {
        let mut conn = Conn::open().await?;
        match cmd {
            StackCmd::Deploy { compose_file, name } => {
                let text = std::fs::read_to_string(&compose_file)
                    .with_context(|| format!("{}", compose_file.display()))?;
                let stack = crate::compose::parse(&text, &name)
                    .with_context(|| format!("{}", compose_file.display()))?;
                if !stack.ignored.is_empty() {
                    eprintln!("Ignoring unsupported options: {}", stack.ignored.join(", "));
                }
                for n in &stack.notes {
                    eprintln!("Note: {n}");
                }
                let existing: HashMap<String, Service> = conn
                    .services()
                    .await?
                    .into_iter()
                    .map(|s| (s.spec.name.clone(), s))
                    .collect();
                // Dependencies first: the order parse gives.
                for spec in &stack.services {
                    match existing.get(&spec.name) {
                        Some(s) => {
                            println!("Updating service {} (id: {})", spec.name, s.id);
                            conn.update(&spec.name, Some(spec), false, false).await?;
                        }
                        None => {
                            println!("Creating service {}", spec.name);
                            conn.c
                                .service_create(api::Object {
                                    json: serde_json::to_string(spec)?,
                                })
                                .await
                                .map_err(msg)?;
                        }
                    }
                }
            }
            StackCmd::Ls => {
                let mut stacks: std::collections::BTreeMap<String, usize> = Default::default();
                for s in conn.services().await? {
                    if let Some(n) = s.spec.labels.get(crate::compose::STACK_LABEL) {
                        *stacks.entry(n.clone()).or_default() += 1;
                    }
                }
                let mut rows = vec![vec!["NAME".to_string(), "SERVICES".to_string()]];
                rows.extend(stacks.into_iter().map(|(n, c)| vec![n, c.to_string()]));
                table(rows);
            }
            StackCmd::Ps { all, format, name } => {
                let ids: Vec<String> = conn
                    .services()
                    .await?
                    .into_iter()
                    .filter(|s| in_stack(s, &name))
                    .map(|s| s.id)
                    .collect();
                if ids.is_empty() {
                    bail!("nothing found in stack: {name}");
                }
                let tasks = conn
                    .tasks("", "", all)
                    .await?
                    .into_iter()
                    .filter(|t| ids.contains(&t.service_id))
                    .collect();
                print_tasks(&mut conn, tasks, format.as_deref()).await?;
            }
            StackCmd::Services { format, name } => {
                let svcs: Vec<Service> = conn
                    .services()
                    .await?
                    .into_iter()
                    .filter(|s| in_stack(s, &name))
                    .collect();
                if svcs.is_empty() {
                    bail!("nothing found in stack: {name}");
                }
                let tasks = conn.tasks("", "", false).await?;
                print_services(svcs, &tasks, format.as_deref())?;
            }
            StackCmd::Rm { names } => {
                let all = conn.services().await?;
                for name in names {
                    let mine: Vec<&Service> = all.iter().filter(|s| in_stack(s, &name)).collect();
                    if mine.is_empty() {
                        bail!("nothing found in stack: {name}");
                    }
                    for s in mine {
                        println!("Removing service {}", s.spec.name);
                        conn.c
                            .service_remove(api::Ref { name: s.id.clone() })
                            .await
                            .map_err(msg)?;
                    }
                }
            }
        }
        Ok(())
    })
}

fn print_services(services: Vec<Service>, tasks: &[Task], format: Option<&str>) -> Result<()> {
    let mut rows = vec![vec![
        "ID".into(),
        "NAME".into(),
        "MODE".into(),
        "REPLICAS".into(),
        "IMAGE".into(),
        "PORTS".into(),
    ]];
    for s in services {
        let running = tasks
            .iter()
            .filter(|t| t.service_id == s.id && t.is_live() && t.status.state == TaskState::Running)
            .count();
        let (mode, want) = match s.spec.mode {
            Mode::Replicated { replicas } => ("replicated", replicas as usize),
            // One per eligible node: as many as the leader keeps live.
            Mode::Global => (
                "global",
                tasks
                    .iter()
                    .filter(|t| t.service_id == s.id && t.is_live())
                    .count(),
            ),
        };
        if format == Some("json") {
            let mut v = serde_json::to_value(&s)?;
            v["running"] = running.into();
            v["desired"] = want.into();
            println!("{v}");
            continue;
        }
        let ports: Vec<String> = s
            .spec
            .ports
            .iter()
            .map(|p| format!("*:{}->{}/{}", p.published, p.target, p.protocol))
            .collect();
        rows.push(vec![
            s.id.chars().take(12).collect(),
            s.spec.name.clone(),
            mode.into(),
            format!("{running}/{want}"),
            s.spec.image.clone(),
            ports.join(", "),
        ]);
    }
    if format != Some("json") {
        table(rows);
    }
    Ok(())
}

pub fn service(cmd: ServiceCmd) -> Result<()> {
    block_on(async move {
        let mut conn = Conn::open().await?;
        match cmd {
            ServiceCmd::Create(a) => {
                let spec = spec_from_create(&a)?;
                let r = conn
                    .c
                    .service_create(api::Object {
                        json: serde_json::to_string(&spec)?,
                    })
                    .await
                    .map_err(msg)?
                    .into_inner();
                let s: Service = serde_json::from_str(&r.json)?;
                println!("{}", s.id);
            }
            ServiceCmd::Ls { quiet, format } => {
                let services = conn.services().await?;
                if quiet {
                    services.iter().for_each(|s| println!("{}", s.id));
                    return Ok(());
                }
                let tasks = conn.tasks("", "", false).await?;
                print_services(services, &tasks, format.as_deref())?;
            }
            ServiceCmd::Ps {
                all,
                format,
                service,
            } => {
                let tasks = conn.tasks(&service, "", all).await?;
                print_tasks(&mut conn, tasks, format.as_deref()).await?;
            }
            ServiceCmd::Inspect { services } => {
                let mut out = Vec::new();
                for s in &services {
                    out.push(serde_json::to_value(conn.service(s).await?)?);
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            ServiceCmd::Scale { pairs } => {
                for p in pairs {
                    let (name, n) = p
                        .split_once('=')
                        .with_context(|| format!("{p:?}: SERVICE=REPLICAS"))?;
                    let n: u64 = n
                        .parse()
                        .with_context(|| format!("{p:?}: REPLICAS is a number"))?;
                    let mut spec = conn.service(name).await?.spec;
                    if spec.mode == Mode::Global {
                        bail!("{name}: scale can only be used with replicated mode");
                    }
                    spec.mode = Mode::Replicated { replicas: n };
                    conn.update(name, Some(&spec), false, false).await?;
                    println!("{name} scaled to {n}");
                }
            }
            ServiceCmd::Update(a) => {
                let s = if a.rollback {
                    conn.update(&a.service, None, true, false).await?
                } else {
                    let mut spec = conn.service(&a.service).await?.spec;
                    if let Some(i) = &a.image {
                        spec.image = i.clone();
                    }
                    if let Some(n) = a.replicas {
                        if spec.mode == Mode::Global {
                            bail!("--replicas does not go with a global service");
                        }
                        spec.mode = Mode::Replicated { replicas: n };
                    }
                    if let Some(args) = &a.args {
                        spec.args = args.split_whitespace().map(String::from).collect();
                    }
                    for k in &a.env_rm {
                        spec.env
                            .retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != k);
                    }
                    for e in &a.env_add {
                        let k = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
                        spec.env
                            .retain(|x| x.split_once('=').map_or(x.as_str(), |(k, _)| k) != k);
                        spec.env.push(e.clone());
                    }
                    spec.placement
                        .constraints
                        .retain(|c| !a.constraint_rm.contains(c));
                    spec.placement
                        .constraints
                        .extend(a.constraint_add.iter().cloned());
                    a.policy.apply(&mut spec)?;
                    spec.validate()?;
                    conn.update(&a.service, Some(&spec), false, a.force).await?
                };
                println!("{}", s.spec.name);
            }
            ServiceCmd::Logs { follow, service } => {
                let hosts: HashMap<String, String> = conn
                    .nodes()
                    .await?
                    .into_iter()
                    .map(|(n, _)| (n.id, n.hostname))
                    .collect();
                let names: HashMap<String, String> = conn
                    .tasks(&service, "", true)
                    .await?
                    .into_iter()
                    .map(|t| {
                        let host = hosts.get(&t.node_id).cloned().unwrap_or_default();
                        let short: String = t.id.chars().take(12).collect();
                        (t.id.clone(), format!("{}.{short}@{host}", t.name()))
                    })
                    .collect();
                let mut s = conn
                    .c
                    .service_logs(api::LogsRequest { service, follow })
                    .await
                    .map_err(msg)?
                    .into_inner();
                while let Some(c) = s.message().await.map_err(msg)? {
                    let who = names
                        .get(&c.task_id)
                        .cloned()
                        .unwrap_or_else(|| c.task_id.clone());
                    let text = String::from_utf8_lossy(&c.data);
                    for line in text.lines() {
                        if c.stream == "stdout" {
                            println!("{who}    | {line}");
                        } else {
                            eprintln!("{who}    | {line}");
                        }
                    }
                }
            }
            ServiceCmd::Rollback { service } => {
                let s = conn.update(&service, None, true, false).await?;
                println!("{}", s.spec.name);
            }
            ServiceCmd::Rm { services } => {
                for s in services {
                    conn.c
                        .service_remove(api::Ref { name: s.clone() })
                        .await
                        .map_err(msg)?;
                    println!("{s}");
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_docker() {
        assert_eq!(parse_duration("10s").unwrap(), 10_000);
        assert_eq!(parse_duration("1m30s").unwrap(), 90_000);
        assert_eq!(parse_duration("500ms").unwrap(), 500);
        assert_eq!(parse_duration("2").unwrap(), 2000);
        assert_eq!(parse_duration("1.5s").unwrap(), 1500);
        for bad in ["", "s", "10x", "10s5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_and_mounts() {
        assert_eq!(parse_port("8080:80").unwrap().published, 8080);
        assert_eq!(
            parse_port("published=53,target=53,protocol=udp")
                .unwrap()
                .protocol,
            "udp"
        );
        assert!(parse_port("8080").is_err());
        let m = parse_mount("type=volume,source=db,target=/var/lib/db,readonly").unwrap();
        assert!(m.read_only && m.source == "db");
        assert!(parse_mount("type=volume,target=/x").is_err());
        assert!(parse_mount("type=tmpfs,target=/t").is_ok());
    }
}
