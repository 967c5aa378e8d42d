//! `husk service create|ls|ps|inspect|scale|update|logs|rollback|rm`.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use husk_cluster_api::pb as api;
use husk_cluster_api::types::*;

use crate::cluster::conn::{block_on, msg, Conn};
use crate::cluster::flags::{spec_from_create, CreateArgs, UpdateArgs};
use crate::cluster::output::{print_services, print_tasks};

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

pub fn service(cmd: ServiceCmd) -> Result<()> {
    block_on(async move {
        let mut conn = Conn::open().await?;
        match cmd {
            ServiceCmd::Create(a) => {
                let spec = spec_from_create(&a)?;
                let r = conn
                    .c
                    .service_create(api::ServiceSpec::from(spec))
                    .await
                    .map_err(msg)?
                    .into_inner();
                let s = Service::try_from(r)?;
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
                let hosts = conn.hostnames().await?;
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
                        if c.stream == api::LogStream::Stdout as i32 {
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
