//! The connection to the local huskd and the calls the commands share.

use std::collections::HashMap;

use anyhow::Result;
use husk_cluster_api::convert::{self, ConvertError};
use husk_cluster_api::pb as api;
use husk_cluster_api::pb::cluster_client::ClusterClient;
use husk_cluster_api::types::*;
use tonic::transport::Channel;

pub(crate) struct Conn {
    pub(crate) c: ClusterClient<Channel>,
}

/// The server's message; for a transport failure (the connection broke,
/// a stream was reset) also the causes below it, which name what happened.
pub(crate) fn msg(s: tonic::Status) -> anyhow::Error {
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
    pub(crate) async fn open() -> Result<Conn> {
        let c = husk_cluster_api::client::local_client(&husk_cluster_api::client::default_socket())
            .await?;
        Ok(Conn { c })
    }

    pub(crate) async fn nodes(&mut self) -> Result<Vec<(Node, bool)>> {
        let r = self
            .c
            .node_list(api::Empty {})
            .await
            .map_err(msg)?
            .into_inner();
        r.nodes
            .into_iter()
            .map(|e| {
                let n = e.node.ok_or(ConvertError::Missing("node"))?;
                Ok((n.try_into()?, e.leader))
            })
            .collect()
    }

    /// Node id → hostname, for tables.
    pub(crate) async fn hostnames(&mut self) -> Result<HashMap<String, String>> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .map(|(n, _)| (n.id, n.hostname))
            .collect())
    }

    pub(crate) async fn services(&mut self) -> Result<Vec<Service>> {
        let r = self
            .c
            .service_list(api::Empty {})
            .await
            .map_err(msg)?
            .into_inner();
        Ok(convert::all(r.services)?)
    }

    pub(crate) async fn service(&mut self, name: &str) -> Result<Service> {
        let r = self
            .c
            .service_inspect(api::Ref { name: name.into() })
            .await
            .map_err(msg)?
            .into_inner();
        Ok(r.try_into()?)
    }

    pub(crate) async fn tasks(
        &mut self,
        service: &str,
        node: &str,
        all: bool,
    ) -> Result<Vec<Task>> {
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
        Ok(convert::all(r.tasks)?)
    }

    pub(crate) async fn update(
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
                spec: spec.cloned().map(Into::into),
                rollback,
                force,
            })
            .await
            .map_err(msg)?
            .into_inner();
        Ok(r.try_into()?)
    }
}

pub(crate) fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}
