//! Tables and times as Docker prints them.

use anyhow::Result;
use husk_cluster_api::types::*;

use crate::cluster::conn::Conn;

pub(crate) fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=1 => "Less than a second ago".to_string(),
        2..=59 => format!("{s} seconds ago"),
        60..=3599 => format!("{} minutes ago", s / 60),
        _ => format!("{} hours ago", s / 3600),
    }
}

pub(crate) fn title(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

pub(crate) fn table(rows: Vec<Vec<String>>) {
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

pub(crate) async fn print_tasks(
    conn: &mut Conn,
    tasks: Vec<Task>,
    format: Option<&str>,
) -> Result<()> {
    let hosts = conn.hostnames().await?;
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

pub(crate) fn print_services(
    services: Vec<Service>,
    tasks: &[Task],
    format: Option<&str>,
) -> Result<()> {
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
