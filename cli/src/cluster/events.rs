//! `husk events`.

use anyhow::Result;
use husk_cluster_api::pb::{self as api, event};
use husk_cluster_api::types::{Node, Task};
use serde_json::{json, Value};

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
        while let Some(e) = s.message().await.map_err(msg)? {
            let v = line_of(e);
            if format.as_deref() == Some("json") {
                println!("{v}");
                continue;
            }
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

/// An event as the flat object `husk events` prints (`docker events`'
/// fields: type, action, id, and the object's name and state). A kind,
/// action or object this build does not know is printed as far as it is
/// known: one odd event does not end the stream.
fn line_of(e: api::Event) -> Value {
    let kind = match event::Kind::try_from(e.kind) {
        Ok(event::Kind::Node) => "node",
        Ok(event::Kind::Service) => "service",
        Ok(event::Kind::Task) => "task",
        _ => "unknown",
    };
    let action = match event::Action::try_from(e.action) {
        Ok(event::Action::Create) => "create",
        Ok(event::Action::Update) => "update",
        Ok(event::Action::Remove) => "remove",
        _ => "unknown",
    };
    let mut v = json!({ "time_ms": e.time_ms, "type": kind, "action": action, "id": e.id });
    match e.object {
        Some(event::Object::Node(n)) => {
            if let Ok(n) = Node::try_from(n) {
                v["name"] = n.hostname.into();
                v["state"] = serde_json::to_value(n.state).unwrap_or_default();
                v["availability"] = serde_json::to_value(n.availability).unwrap_or_default();
            }
        }
        Some(event::Object::Service(s)) => {
            v["name"] = s.spec.map(|s| s.name).unwrap_or_default().into();
        }
        Some(event::Object::Task(t)) => {
            if let Ok(t) = Task::try_from(t) {
                v["name"] = t.name().into();
                v["state"] = t.status.state.as_str().into();
                v["desired"] = t.desired_state.as_str().into();
                v["node_id"] = t.node_id.into();
            }
        }
        // A removed node or service: its keys, empty (as before v2).
        None if kind == "node" => {
            for k in ["name", "state", "availability"] {
                v[k] = Value::Null;
            }
        }
        None if kind == "service" => v["name"] = Value::Null,
        None => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_cluster_api::types::{Availability, NodeState, Role};

    #[test]
    fn events_print_as_flat_objects() {
        let node = Node {
            id: "n1".into(),
            hostname: "node3".into(),
            addr: String::new(),
            role: Role::Worker,
            availability: Availability::Active,
            labels: Default::default(),
            state: NodeState::Down,
            resources: Default::default(),
            created_ms: 0,
            updated_ms: 0,
        };
        let e = api::Event {
            time_ms: 7,
            kind: event::Kind::Node.into(),
            action: event::Action::Update.into(),
            id: "n1".into(),
            object: Some(event::Object::Node(node.into())),
        };
        let v = line_of(e);
        assert_eq!(v["type"], "node");
        assert_eq!(v["action"], "update");
        assert_eq!(v["name"], "node3");
        assert_eq!(v["state"], "down");
        assert_eq!(v["availability"], "active");
        let gone = api::Event {
            time_ms: 8,
            kind: event::Kind::Task.into(),
            action: event::Action::Remove.into(),
            id: "t1".into(),
            object: None,
        };
        let v = line_of(gone);
        assert_eq!(
            (v["type"].as_str(), v["action"].as_str()),
            (Some("task"), Some("remove"))
        );
        assert!(v.get("name").is_none());
        // A removed node keeps its keys, empty.
        let node_gone = api::Event {
            kind: event::Kind::Node.into(),
            action: event::Action::Remove.into(),
            id: "n1".into(),
            ..api::Event::default()
        };
        let v = line_of(node_gone);
        assert!(v["name"].is_null() && v.get("availability").is_some());
        let unknown = api::Event {
            kind: 42,
            ..api::Event::default()
        };
        assert_eq!(line_of(unknown)["type"], "unknown");
    }
}
