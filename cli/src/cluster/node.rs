//! `husk node ls|inspect|update|ps|rm`.

use anyhow::Result;
use clap::Subcommand;
use husk_cluster_api::pb as api;
use husk_cluster_api::types::*;

use crate::cluster::conn::{block_on, msg, Conn};
use crate::cluster::output::{print_tasks, table, title};

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
                    out.push(serde_json::to_value(Node::try_from(r)?)?);
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
                        availability: availability
                            .map(|a| a.parse::<Availability>())
                            .transpose()?
                            .map(|a| api::Availability::from(a).into()),
                        label_add,
                        label_rm,
                        role: None,
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
