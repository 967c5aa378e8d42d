//! bench/cluster's measurements (a benchmark, not a test): a three-node
//! husk cluster on this machine (etcd, huskd per network namespace, the
//! test helpers' cluster), heartbeat 1 s, grace 4 s.
//!
//! 1. Placement throughput: a 50-replica service whose image no node has
//!    (each task is placed, assigned and rejected at once: no sandbox
//!    boot); from the service's creation to its last task's placement, by
//!    the leader's own timestamps. Median of 3 services.
//! 2. Rescheduling after node loss: a 3-replica service of real sandboxes;
//!    a node with one of its tasks dies (huskd and its sandboxes killed,
//!    its link cut); time until its task has a replacement on a live node,
//!    as `husk service ps` shows it. Five times (the node comes back
//!    between rounds); median.
//!
//! Last line: key=value pairs.

use std::time::Instant;

use husk_tests::cluster::{cluster_unavailable, Cluster};
use husk_tests::sample_image;
use serde_json::Value;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Some(why) = cluster_unavailable() {
        eprintln!("cluster_bench: {why}");
        std::process::exit(2);
    }
    let image = sample_image("busybox.oci.tar").expect("make images");
    let mut c = Cluster::new("bn", 3, &[image]).expect("cluster");
    let h1 = &c.hosts[0];
    h1.ok(&[
        "cluster",
        "init",
        "--heartbeat-period",
        "1s",
        "--heartbeat-grace",
        "4s",
    ]);
    let token = h1
        .ok(&["cluster", "join-token", "-q", "worker"])
        .trim()
        .to_string();
    let addr = h1.addr();
    for h in &c.hosts[1..] {
        h.ok(&["cluster", "join", "--token", &token, &addr]);
    }
    c.wait("nodes ready", 30, || {
        let n = c.hosts[0].json(&["node", "ls"]).unwrap();
        n.len() == 3 && n.iter().all(|r| r["state"] == "ready")
    });

    // 1. Placement throughput: as the client sees it (from `service
    // create` until `service ps` shows 50 placed tasks; an upper bound,
    // the CLI's own runs included), and by the leader's timestamps (from
    // the service's creation to the pass that placed its tasks).
    let mut walls = Vec::new();
    let mut leader = Vec::new();
    for round in 0..3 {
        let name = format!("burst{round}");
        let h1 = &c.hosts[0];
        let t = Instant::now();
        h1.ok(&[
            "service",
            "create",
            "--name",
            &name,
            "--replicas",
            "50",
            "--restart-condition",
            "none",
            "husk.local/not-on-any-node",
        ]);
        let tasks = loop {
            let tasks: Vec<Value> = h1.json(&["service", "ps", "-a", &name]).unwrap_or_default();
            if tasks.len() == 50 && tasks.iter().all(|t| t["node_id"] != "") {
                break tasks;
            }
            assert!(
                t.elapsed().as_secs() < 120,
                "50 tasks not placed\n{}",
                c.logs()
            );
        };
        let wall = t.elapsed().as_secs_f64();
        let svc: Value = serde_json::from_str(&h1.ok(&["service", "inspect", &name])).unwrap();
        let created = svc[0]["created_ms"].as_u64().unwrap();
        let last = tasks
            .iter()
            .filter_map(|t| t["created_ms"].as_u64())
            .max()
            .unwrap();
        let by_leader = last.saturating_sub(created) as f64 / 1000.0;
        println!(
            "round {round}: 50 tasks placed; seen by the client after {wall:.3} s, placed by the leader {by_leader:.3} s after the service was stored"
        );
        walls.push(wall);
        leader.push(by_leader);
        h1.ok(&["service", "rm", &name]);
        // A quiet cluster for the next round: its tasks gone.
        c.wait("the burst's tasks gone", 60, || {
            h1.json(&["node", "ps", "node1", "-a"])
                .unwrap_or_default()
                .is_empty()
                && h1
                    .json(&["node", "ps", "node2", "-a"])
                    .unwrap_or_default()
                    .is_empty()
                && h1
                    .json(&["node", "ps", "node3", "-a"])
                    .unwrap_or_default()
                    .is_empty()
        });
    }

    // 2. Rescheduling after node loss.
    let h1 = &c.hosts[0];
    h1.ok(&[
        "service",
        "create",
        "--name",
        "resched",
        "--replicas",
        "3",
        "--restart-delay",
        "1s",
        "husk.local/busybox",
        "sleep",
        "36000",
    ]);
    let mut times = Vec::new();
    for round in 0..5 {
        let h1 = &c.hosts[0];
        let live = |h: &husk_tests::cluster::Host| -> Vec<Value> {
            h.json(&["service", "ps", "resched"])
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t["desired_state"] == "running")
                .collect()
        };
        // A worker with a live task of the service.
        let mut victim = None;
        c.wait("a worker with a task", 300, || {
            victim = live(h1)
                .iter()
                .filter_map(|t| t["node"].as_str().map(String::from))
                .find(|n| n != "node1");
            victim.is_some() && live(h1).len() == 3
        });
        let victim = victim.unwrap();
        let vi = c.hosts.iter().position(|h| h.name == victim).unwrap();
        c.hosts[vi].kill();
        c.hosts[vi].unplug();
        let t = Instant::now();
        let h1 = &c.hosts[0];
        c.wait("a replacement", 60, || {
            let l = live(h1);
            l.len() == 3 && l.iter().all(|t| t["node"] != victim.as_str())
        });
        let s = t.elapsed().as_secs_f64();
        println!("round {round}: {victim}'s task rescheduled after {s:.2} s");
        times.push(s);
        // The node comes back (same identity; its old sandboxes cleaned).
        c.hosts[vi].plug();
        let mut h = c.hosts.remove(vi);
        c.start_huskd(&mut h).unwrap();
        c.hosts.insert(vi, h);
        let name = victim.clone();
        c.wait("the node back", 60, || {
            c.hosts[0]
                .json(&["node", "ls"])
                .unwrap_or_default()
                .iter()
                .any(|r| r["hostname"] == name.as_str() && r["state"] == "ready")
        });
    }
    let wall = median(walls);
    let by_leader = median(leader);
    let resched = median(times.clone());
    println!(
        "median of 3: 50 tasks placed in {wall:.3} s as the client sees it ({:.0} tasks/s), {by_leader:.3} s by the leader's clock; median of 5: rescheduled {resched:.2} s after node loss (heartbeat 1 s, grace 4 s)",
        50.0 / wall
    );
    println!(
        "placement-tasks-per-s={:.1} placement-wall-s={wall:.3} placement-leader-s={by_leader:.3} reschedule-median-s={resched:.2} reschedule-max-s={:.2} heartbeat-s=1 grace-s=4 rounds=5",
        50.0 / wall,
        times.iter().cloned().fold(0.0, f64::max)
    );
    drop(c);
}
