//! huskd's source of truth is etcd: the cluster's state survives an etcd
//! member lost (three members, real etcd) and a manager's huskd restarted
//! (it resumes with its identity). No sandbox boots here: the services'
//! image is on no node, so their tasks are placed and rejected — the
//! control plane alone, real processes all (etcd, huskd in network
//! namespaces, the CLI).

use husk_tests::cluster::{control_plane_unavailable, Cluster};
use husk_tests::skip;

fn services(c: &Cluster, host: usize) -> Vec<String> {
    c.hosts[host]
        .json(&["service", "ls"])
        .unwrap_or_default()
        .iter()
        .map(|s| s["spec"]["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Tasks of `svc` placed on a node (and, the image missing, rejected).
fn placed(c: &Cluster, host: usize, svc: &str) -> usize {
    c.hosts[host]
        .json(&["service", "ps", svc])
        .unwrap_or_default()
        .iter()
        .filter(|t| t["desired_state"] == "running" && t["node_id"] != "")
        .count()
}

#[test]
fn state_survives_an_etcd_member_and_a_manager_restart() {
    if let Some(why) = control_plane_unavailable() {
        skip("state_survives_an_etcd_member_and_a_manager_restart", &why);
        return;
    }
    let mut c = Cluster::with_etcd("cs", 3, &[], 3).unwrap();
    let h1 = &c.hosts[0];
    h1.ok(&[
        "cluster",
        "init",
        "--heartbeat-period",
        "1s",
        "--heartbeat-grace",
        "4s",
    ]);
    let manager = h1
        .ok(&["cluster", "join-token", "-q", "manager"])
        .trim()
        .to_string();
    let worker = h1
        .ok(&["cluster", "join-token", "-q", "worker"])
        .trim()
        .to_string();
    let addr = h1.addr();
    c.hosts[1].ok(&["cluster", "join", "--token", &manager, &addr]);
    c.hosts[2].ok(&["cluster", "join", "--token", &worker, &addr]);
    c.wait("three nodes ready", 30, || {
        let n = c.hosts[0].json(&["node", "ls"]).unwrap_or_default();
        n.len() == 3 && n.iter().all(|r| r["state"] == "ready")
    });
    let create = |host: usize, name: &str, replicas: &str| {
        c.hosts[host].ok(&[
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "--restart-condition",
            "none",
            "husk.local/on-no-node",
        ]);
    };
    create(0, "before", "3");
    c.wait("before: 3 tasks placed", 30, || {
        placed(&c, 0, "before") == 3
    });

    // An etcd member dies: the other two keep quorum, huskd carries on.
    c.etcd.members[0].kill();
    create(1, "after", "2");
    c.wait("after: 2 tasks placed", 60, || placed(&c, 0, "after") == 2);
    c.hosts[0].ok(&["service", "scale", "before=4"]);
    c.wait("before: 4 tasks placed", 60, || {
        placed(&c, 1, "before") == 4
    });

    // A manager's huskd restarts: same node, same role, same state.
    let id_before = c.hosts[0].ok(&["cluster", "info"]);
    c.hosts[0].kill();
    let mut h = c.hosts.remove(0);
    c.start_huskd(&mut h).unwrap();
    c.hosts.insert(0, h);
    c.wait("node1 back, services intact", 30, || {
        services(&c, 0) == ["after", "before"]
    });
    let id_after = c.hosts[0].ok(&["cluster", "info"]);
    let node_id = |s: &str| {
        s.lines()
            .find(|l| l.contains("NodeID"))
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert_eq!(node_id(&id_before), node_id(&id_after));
    c.wait("node1 ready again", 30, || {
        c.hosts[1]
            .json(&["node", "ls"])
            .unwrap_or_default()
            .iter()
            .all(|r| r["state"] == "ready")
    });
    assert_eq!(c.hosts[1].json(&["node", "ls"]).unwrap().len(), 3);
    // Removed while a member is still gone: both services go.
    c.hosts[0].ok(&["service", "rm", "before", "after"]);
    c.wait("no services, no tasks", 30, || {
        services(&c, 1).is_empty()
            && c.hosts[1]
                .json(&["node", "ps", "node3"])
                .unwrap_or_default()
                .is_empty()
    });
}
