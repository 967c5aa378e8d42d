//! Placement: which node a new task goes to. Swarm's rules — constraints
//! filter, `max_replicas_per_node` and reservations filter, spread
//! preferences pick the group (by label value) with the fewest of the
//! service's tasks, then the node with the fewest of them, then the
//! node with the fewest tasks at all.

use std::collections::{BTreeMap, HashMap};

use crate::types::{Availability, Node, NodeState, ServiceSpec};
pub use husk_cluster_api::types::placement::{spread_key, Constraint};

/// Whether `n` may take new tasks of `spec` at all (ignoring counts).
pub fn eligible(n: &Node, spec: &ServiceSpec) -> Result<bool, String> {
    if n.state != NodeState::Ready {
        return Err(format!("node {} is {:?}", n.hostname, n.state).to_lowercase());
    }
    if n.availability != Availability::Active {
        return Err(format!("node {} is {:?}", n.hostname, n.availability).to_lowercase());
    }
    for c in &spec.placement.constraints {
        // Specs are validated when stored; a bad one places nowhere.
        let Ok(k) = Constraint::parse(c) else {
            return Ok(false);
        };
        if !k.matches(n) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What is already placed on each node: tasks of the service being
/// scheduled, all tasks, and the reservations they hold.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub service_tasks: HashMap<String, u64>,
    pub tasks: HashMap<String, u64>,
    pub reserved_cpus: HashMap<String, i64>,
    pub reserved_memory: HashMap<String, i64>,
}

impl Load {
    pub fn add(&mut self, node: &str, same_service: bool, spec: &ServiceSpec) {
        if same_service {
            *self.service_tasks.entry(node.to_string()).or_default() += 1;
        }
        *self.tasks.entry(node.to_string()).or_default() += 1;
        let r = spec.resources.reservations;
        *self.reserved_cpus.entry(node.to_string()).or_default() += r.nano_cpus;
        *self.reserved_memory.entry(node.to_string()).or_default() += r.memory_bytes;
    }
}

/// The node for one new task of `spec`, or why there is none (Swarm's
/// "no suitable node" message).
pub fn place<'a>(nodes: &'a [Node], spec: &ServiceSpec, load: &Load) -> Result<&'a Node, String> {
    let max = spec.placement.max_replicas_per_node;
    let want = spec.resources.reservations;
    let mut why = BTreeMap::<String, usize>::new();
    let mut fit: Vec<&Node> = Vec::new();
    for n in nodes {
        match eligible(n, spec) {
            Err(_) => {
                *why.entry("unavailable".into()).or_default() += 1;
                continue;
            }
            Ok(false) => {
                *why.entry("scheduling constraints not satisfied".into())
                    .or_default() += 1;
                continue;
            }
            Ok(true) => {}
        }
        let mine = load.service_tasks.get(&n.id).copied().unwrap_or(0);
        if max > 0 && mine >= max {
            *why.entry("max replicas per node limit exceed".into())
                .or_default() += 1;
            continue;
        }
        let cpus = load.reserved_cpus.get(&n.id).copied().unwrap_or(0);
        let mem = load.reserved_memory.get(&n.id).copied().unwrap_or(0);
        if (want.nano_cpus > 0 && cpus + want.nano_cpus > n.resources.nano_cpus)
            || (want.memory_bytes > 0 && mem + want.memory_bytes > n.resources.memory_bytes)
        {
            *why.entry("insufficient resources".into()).or_default() += 1;
            continue;
        }
        fit.push(n);
    }
    if fit.is_empty() {
        let reasons: Vec<String> = why
            .iter()
            .map(|(r, k)| format!("{r} on {k} node{}", if *k == 1 { "" } else { "s" }))
            .collect();
        return Err(format!(
            "no suitable node ({})",
            if reasons.is_empty() {
                "no nodes".to_string()
            } else {
                reasons.join("; ")
            }
        ));
    }
    // Spread preferences narrow the field, one label at a time: keep the
    // nodes of the value group holding fewest of this service's tasks
    // (nodes without the label form a group of their own).
    for pref in &spec.placement.preferences {
        let Ok(key) = spread_key(pref) else { continue };
        let mut groups: BTreeMap<Option<&str>, u64> = BTreeMap::new();
        for n in nodes {
            let g = n.labels.get(&key).map(String::as_str);
            *groups.entry(g).or_default() += load.service_tasks.get(&n.id).copied().unwrap_or(0);
        }
        let best = fit
            .iter()
            .map(|n| groups[&n.labels.get(&key).map(String::as_str)])
            .min()
            .unwrap_or(0);
        fit.retain(|n| groups[&n.labels.get(&key).map(String::as_str)] == best);
    }
    fit.sort_by_key(|n| {
        (
            load.service_tasks.get(&n.id).copied().unwrap_or(0),
            load.tasks.get(&n.id).copied().unwrap_or(0),
            n.id.clone(),
        )
    });
    Ok(fit[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Resources, Role};

    fn node(id: &str, role: Role, labels: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            hostname: format!("h-{id}"),
            addr: String::new(),
            role,
            availability: Availability::Active,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: NodeState::Ready,
            resources: Resources {
                nano_cpus: 2_000_000_000,
                memory_bytes: 4 << 30,
            },
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            image: "busybox".into(),
            ..Default::default()
        }
    }

    fn place_n(nodes: &[Node], s: &ServiceSpec, n: usize) -> Vec<String> {
        let mut load = Load::default();
        let mut got = Vec::new();
        for _ in 0..n {
            let p = place(nodes, s, &load).unwrap();
            load.add(&p.id, true, s);
            got.push(p.id.clone());
        }
        got
    }

    #[test]
    fn constraints_parse_and_match() {
        let m = node("a", Role::Manager, &[("zone", "x")]);
        let w = node("b", Role::Worker, &[]);
        let c = Constraint::parse("node.role==manager").unwrap();
        assert!(c.matches(&m) && !c.matches(&w));
        let c = Constraint::parse("node.labels.zone != x").unwrap();
        assert!(!c.matches(&m) && c.matches(&w));
        let c = Constraint::parse("node.hostname==h-b").unwrap();
        assert!(c.matches(&w));
        for bad in [
            "node.role==boss",
            "role==manager",
            "node.labels.==x",
            "node.id=",
            "x",
        ] {
            assert!(Constraint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replicas_spread_evenly() {
        let nodes = [
            node("a", Role::Manager, &[]),
            node("b", Role::Worker, &[]),
            node("c", Role::Worker, &[]),
        ];
        let got = place_n(&nodes, &spec(), 6);
        for id in ["a", "b", "c"] {
            assert_eq!(got.iter().filter(|x| *x == id).count(), 2);
        }
    }

    #[test]
    fn constraint_manager_and_unavailable_nodes() {
        let mut nodes = vec![
            node("a", Role::Manager, &[]),
            node("b", Role::Worker, &[]),
            node("c", Role::Worker, &[]),
        ];
        let mut s = spec();
        s.placement.constraints = vec!["node.role==manager".into()];
        assert_eq!(place_n(&nodes, &s, 3), ["a", "a", "a"]);
        nodes[0].availability = Availability::Drain;
        let e = place(&nodes, &s, &Load::default()).unwrap_err();
        assert!(e.contains("no suitable node"), "{e}");
        nodes[1].state = NodeState::Down;
        assert_eq!(place_n(&nodes, &spec(), 2), ["c", "c"]);
    }

    #[test]
    fn spread_by_label_then_max_per_node() {
        let nodes = [
            node("a", Role::Worker, &[("zone", "1")]),
            node("b", Role::Worker, &[("zone", "1")]),
            node("c", Role::Worker, &[("zone", "2")]),
        ];
        let mut s = spec();
        s.placement.preferences = vec!["spread=node.labels.zone".into()];
        let got = place_n(&nodes, &s, 4);
        // Zone 2's one node gets as many as zone 1's two together.
        assert_eq!(got.iter().filter(|x| *x == "c").count(), 2);
        s.placement.max_replicas_per_node = 1;
        let mut load = Load::default();
        for _ in 0..3 {
            let p = place(&nodes, &s, &load).unwrap();
            load.add(&p.id, true, &s);
        }
        let e = place(&nodes, &s, &load).unwrap_err();
        assert!(e.contains("max replicas per node"), "{e}");
    }

    #[test]
    fn reservations_fill_nodes() {
        let nodes = [node("a", Role::Worker, &[])];
        let mut s = spec();
        s.resources.reservations.memory_bytes = 3 << 30;
        let mut load = Load::default();
        let p = place(&nodes, &s, &load).unwrap();
        load.add(&p.id, true, &s);
        let e = place(&nodes, &s, &load).unwrap_err();
        assert!(e.contains("insufficient resources"), "{e}");
    }
}
