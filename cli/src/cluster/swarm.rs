//! `husk cluster init|join|join-token|info` (Docker's `swarm`).

use anyhow::Result;
use clap::Subcommand;
use husk_cluster_api::convert::Decode;
use husk_cluster_api::pb as api;
use husk_cluster_api::types::*;

use crate::cluster::conn::{block_on, msg, Conn};

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
                    Role::decode(r.role)?.as_str(),
                    r.node_id
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
                        role: api::Role::from(role.parse::<Role>()?).into(),
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
                // Unspecified: this daemon is in no cluster.
                if i.role == api::Role::Unspecified as i32 {
                    println!("Cluster: inactive");
                } else {
                    let role = Role::decode(i.role)?.as_str();
                    println!("Cluster: active\n NodeID: {}\n ClusterID: {}\n Role: {role}\n Is Leader: {}\n Managers: {}", i.node_id, i.cluster_id, i.leader, i.managers.join(", "));
                }
            }
        }
        Ok(())
    })
}
