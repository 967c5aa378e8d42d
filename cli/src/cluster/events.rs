//! `husk events`.

use anyhow::Result;
use husk_cluster_api::pb as api;

use crate::cluster::conn::{block_on, msg, Conn};

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
