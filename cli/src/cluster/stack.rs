//! `husk stack deploy|ls|ps|services|rm`: compose files read here, as
//! `docker stack deploy` reads them, and sent as services.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use husk_cluster_api::pb as api;
use husk_cluster_api::types::*;

use crate::cluster::conn::{block_on, msg, Conn};
use crate::cluster::output::{print_services, print_tasks, table};

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

pub(crate) fn in_stack(s: &Service, stack: &str) -> bool {
    s.spec
        .labels
        .get(crate::cluster::compose::STACK_LABEL)
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
                let stack = crate::cluster::compose::parse(&text, &name)
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
                                .service_create(api::ServiceSpec::from(spec.clone()))
                                .await
                                .map_err(msg)?;
                        }
                    }
                }
            }
            StackCmd::Ls => {
                let mut stacks: std::collections::BTreeMap<String, usize> = Default::default();
                for s in conn.services().await? {
                    if let Some(n) = s.spec.labels.get(crate::cluster::compose::STACK_LABEL) {
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
