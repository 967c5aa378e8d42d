//! Placement constraints and preferences as Swarm writes them: parsed here
//! (a spec is checked where it is written, by the CLI, and where it is
//! kept, by huskd); the scheduler applies them.

use crate::types::{Invalid, Result};

use crate::types::node::Node;

/// One `node.<field>==|!=value` expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    field: Field,
    equal: bool,
    value: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Field {
    Id,
    Hostname,
    Role,
    Label(String),
}

impl Constraint {
    pub fn parse(s: &str) -> Result<Constraint> {
        let (lhs, value, equal) = if let Some((l, r)) = s.split_once("==") {
            (l, r, true)
        } else if let Some((l, r)) = s.split_once("!=") {
            (l, r, false)
        } else {
            return Err(Invalid(format!(
                "constraint {s:?}: expected node.<field>==<value> or !="
            )));
        };
        let lhs = lhs.trim();
        let value = value.trim();
        if value.is_empty() {
            return Err(Invalid(format!("constraint {s:?}: no value")));
        }
        let field = match lhs {
            "node.id" => Field::Id,
            "node.hostname" => Field::Hostname,
            "node.role" => {
                if value != "manager" && value != "worker" {
                    return Err(Invalid(format!("constraint {s:?}: node.role is manager or worker")));
                }
                Field::Role
            }
            l => match l.strip_prefix("node.labels.") {
                Some(k) if !k.is_empty() => Field::Label(k.to_string()),
                _ => return Err(Invalid(format!(
                    "constraint {s:?}: {l:?} is not node.id, node.hostname, node.role or node.labels.<key>"
                ))),
            },
        };
        Ok(Constraint {
            field,
            equal,
            value: value.to_string(),
        })
    }

    pub fn matches(&self, n: &Node) -> bool {
        let have = match &self.field {
            Field::Id => Some(n.id.as_str()),
            Field::Hostname => Some(n.hostname.as_str()),
            Field::Role => Some(n.role.as_str()),
            Field::Label(k) => n.labels.get(k).map(String::as_str),
        };
        // Swarm: a missing label never equals and always differs.
        (have == Some(self.value.as_str())) == self.equal
    }
}

/// The label key of a `spread=node.labels.<key>` preference.
pub fn spread_key(pref: &str) -> Result<String> {
    match pref
        .strip_prefix("spread=")
        .and_then(|d| d.strip_prefix("node.labels."))
    {
        Some(k) if !k.is_empty() => Ok(k.to_string()),
        _ => Err(Invalid(format!(
            "placement preference {pref:?}: expected spread=node.labels.<key>"
        ))),
    }
}
