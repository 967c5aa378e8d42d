//! huskd as an operator runs it: etcd started here, three hosts (network
//! namespaces on a bridge, each with its own address and huskd), joined
//! with tokens; services whose tasks are real microVM sandboxes, placed,
//! scaled, constrained, updated and rolled back, moved off a drained node,
//! rescheduled when a node dies, and kept when the leading manager dies.
//! One cluster for the whole story: every sandbox boot costs here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use husk_tests::cluster::{cluster_unavailable, Cluster, Host};
use husk_tests::{sample_image, skip};
use serde_json::Value;

const IMAGE: &str = "husk.local/busybox";

/// The tasks `husk service ps` lists (live ones, and those still wanted).
fn tasks(h: &Host, svc: &str) -> Vec<Value> {
    h.json(&["service", "ps", svc]).unwrap_or_default()
}

/// Running tasks of `svc`: (task name, node hostname).
fn running(h: &Host, svc: &str) -> Vec<(String, String)> {
    tasks(h, svc)
        .into_iter()
        .filter(|t| t["desired_state"] == "running" && t["status"]["state"] == "running")
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("").to_string(),
                t["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn per_node(r: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, n) in r {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse() else {
        return String::new();
    };
    let Ok(mut c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return String::new();
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = c.write_all(b"GET /hostname HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    body
}

fn node_rows(h: &Host) -> Vec<Value> {
    h.json(&["node", "ls"]).unwrap()
}

#[test]
fn a_three_node_cluster_runs_services_in_sandboxes() {
    if let Some(why) = cluster_unavailable() {
        skip("a_three_node_cluster_runs_services_in_sandboxes", &why);
        return;
    }
    let image = sample_image("busybox.oci.tar").unwrap();
    let mut c = Cluster::new("cl", 3, &[image]).unwrap();

    // ---- joining ----
    let h1 = &c.hosts[0];
    let out = h1.ok(&[
        "cluster",
        "init",
        "--heartbeat-period",
        "1s",
        "--heartbeat-grace",
        "4s",
    ]);
    assert!(
        out.contains("husk cluster join --token HUSKTKN-1-"),
        "{out}"
    );
    let worker = h1
        .ok(&["cluster", "join-token", "-q", "worker"])
        .trim()
        .to_string();
    let manager = h1
        .ok(&["cluster", "join-token", "-q", "manager"])
        .trim()
        .to_string();
    assert_ne!(worker, manager);
    let leader_addr = h1.addr();

    // A token whose secret is wrong is refused; so is one naming another
    // cluster's CA (the joining node stops before sending anything).
    let (prefix, secret) = worker.rsplit_once('-').unwrap();
    let flipped: String = secret
        .chars()
        .map(|ch| if ch == '0' { '1' } else { '0' })
        .collect();
    let bad = format!("{prefix}-{flipped}");
    let out = c.hosts[2].husk(&["cluster", "join", "--token", &bad, &leader_addr]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid join token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other_ca = format!("HUSKTKN-1-{}-{secret}", "ab".repeat(32));
    let out = c.hosts[2].husk(&["cluster", "join", "--token", &other_ca, &leader_addr]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("another cluster"));

    // Rotation: the old worker token stops working at once.
    let h1 = &c.hosts[0];
    let rotated = h1
        .ok(&["cluster", "join-token", "--rotate", "-q", "worker"])
        .trim()
        .to_string();
    assert_ne!(rotated, worker);
    let out = c.hosts[2].husk(&["cluster", "join", "--token", &worker, &leader_addr]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid join token"));
    c.hosts[1].ok(&["cluster", "join", "--token", &manager, &leader_addr]);
    c.hosts[2].ok(&["cluster", "join", "--token", &rotated, &leader_addr]);
    c.wait("three nodes ready", 30, || {
        let n = node_rows(&c.hosts[0]);
        n.len() == 3 && n.iter().all(|r| r["state"] == "ready")
    });
    let table = c.hosts[0].ok(&["node", "ls"]);
    let rows = node_rows(&c.hosts[0]);
    let role = |name: &str| {
        rows.iter()
            .find(|r| r["hostname"] == name)
            .map(|r| r["role"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(
        (role("node1"), role("node2"), role("node3")),
        ("manager".into(), "manager".into(), "worker".into())
    );
    assert!(
        table.contains("Leader") && table.contains("Reachable"),
        "{table}"
    );
    // Only managers take control commands.
    let out = c.hosts[2].husk(&["service", "ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a cluster manager"));

    // `husk events` from the leader, read on the side.
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let mut ev_child = std::process::Command::new(husk_tests::husk_cli_binary().unwrap())
        .args(["events", "--format", "json"])
        .env("HUSK_HOST", &c.hosts[0].socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ev_out = ev_child.stdout.take().unwrap();
    let ev_store = events.clone();
    let ev_start = Instant::now();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(ev_out)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line) {
                ev_store.lock().unwrap().push(v);
            }
        }
        // Shown with the events when an assertion on them fails: a stream
        // that ended early explains missing ones (its error is on stderr).
        let ended = serde_json::json!({ "stream_ended_after_s": ev_start.elapsed().as_secs() });
        ev_store.lock().unwrap().push(ended);
    });
    // The stream is up once it shows a change made after it started (its
    // watch begins some time after the process does): a label on node1,
    // set again with another value until it shows. Only then is the rest
    // of the test's history certain to be in it.
    let mut probe = 0;
    c.wait("husk events streaming", 120, || {
        probe += 1;
        h1.ok(&[
            "node",
            "update",
            "--label-add",
            &format!("husk-test.events={probe}"),
            "node1",
        ]);
        std::thread::sleep(Duration::from_millis(500));
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "node" && e["name"] == "node1")
    });

    // ---- replicas: spread, scale up and down ----
    let h1 = &c.hosts[0];
    h1.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--update-parallelism",
        "1",
        "--update-delay",
        "2s",
        "--update-monitor",
        "2s",
        "--restart-delay",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    c.wait("web: 3 running", 300, || running(h1, "web").len() == 3);
    let spread = per_node(&running(h1, "web"));
    assert_eq!(spread.len(), 3, "one replica per node: {spread:?}");
    h1.ok(&["service", "scale", "web=5"]);
    c.wait("web: 5 running", 300, || running(h1, "web").len() == 5);
    let spread = per_node(&running(h1, "web"));
    assert!(spread.values().all(|n| *n <= 2), "{spread:?}");
    h1.ok(&["service", "scale", "web=2"]);
    c.wait("web: 2 running, 3 sandboxes gone", 120, || {
        running(h1, "web").len() == 2 && c.hosts.iter().map(Host::vmms).sum::<usize>() == 2
    });

    // ---- constraints and global mode ----
    h1.ok(&[
        "service",
        "create",
        "--name",
        "mgr",
        "--replicas",
        "2",
        "--constraint",
        "node.role==manager",
        "--restart-delay",
        "1s",
        IMAGE,
        "sleep",
        "3600",
    ]);
    h1.ok(&[
        "service",
        "create",
        "--name",
        "agent",
        "--mode",
        "global",
        "--restart-delay",
        "1s",
        IMAGE,
        "sh",
        "-c",
        "echo agent on $(hostname); exec sleep 3600",
    ]);
    c.wait("mgr: 2 running, agent: 3 running", 400, || {
        running(h1, "mgr").len() == 2 && running(h1, "agent").len() == 3
    });
    let mgr = per_node(&running(h1, "mgr"));
    assert!(
        mgr.keys().all(|n| n == "node1" || n == "node2"),
        "constraint node.role==manager: {mgr:?}"
    );
    let agent = per_node(&running(h1, "agent"));
    assert_eq!(
        agent.values().copied().collect::<Vec<_>>(),
        [1, 1, 1],
        "{agent:?}"
    );
    // Their output, gathered from the three nodes.
    let mut logs = String::new();
    c.wait("agent's output from three nodes", 60, || {
        logs = h1.ok(&["service", "logs", "agent"]);
        logs.matches("| agent on ").count() == 3
    });
    for n in ["node1", "node2", "node3"] {
        assert!(logs.contains(&format!("@{n}    | agent on ")), "{logs}");
    }
    h1.ok(&["service", "rm", "mgr", "agent"]);
    c.wait("mgr and agent gone", 120, || {
        c.hosts.iter().map(Host::vmms).sum::<usize>() == 2
    });

    // ---- rolling update: never fewer than N-1 running ----
    h1.ok(&["service", "update", "--args", "sleep 3601", "web"]);
    let mut fewest = usize::MAX;
    c.wait("web updated", 400, || {
        let r = running(h1, "web");
        fewest = fewest.min(r.len());
        let s = h1.json(&["service", "ls"]).unwrap_or_default();
        let web = s.iter().find(|s| s["spec"]["name"] == "web").cloned();
        web.is_some_and(|w| w["update_status"]["state"] == "completed")
    });
    assert!(fewest >= 1, "a rolling update of 2 kept {fewest} running");
    let live = tasks(h1, "web");
    assert!(live
        .iter()
        .filter(|t| t["desired_state"] == "running")
        .all(|t| t["spec"]["args"][1] == "3601"));

    // A failing update rolls back when asked to.
    h1.ok(&[
        "service",
        "update",
        "--image",
        "husk.local/no-such-image",
        "--update-failure-action",
        "rollback",
        "web",
    ]);
    c.wait("web rolled back", 300, || {
        let s = h1.json(&["service", "ls"]).unwrap_or_default();
        s.iter().any(|s| {
            s["spec"]["name"] == "web" && s["update_status"]["state"] == "rollback_completed"
        }) && running(h1, "web").len() == 2
    });
    let inspect: Value = serde_json::from_str(&h1.ok(&["service", "inspect", "web"])).unwrap();
    assert_eq!(inspect[0]["spec"]["image"], IMAGE);

    // ---- a stack: the voting app's shape, dependencies first ----
    let file = husk_tests::repo_root().join("cli/examples/voting-stack.yml");
    let out = h1.husk(&["stack", "deploy", "-c", file.to_str().unwrap(), "vote"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Ignoring unsupported options: services.worker.stop_grace_period"),
        "{err}"
    );
    let mut first_task: BTreeMap<String, Instant> = BTreeMap::new();
    let mut first_run: BTreeMap<String, Instant> = BTreeMap::new();
    let svc_of = |t: &Value| {
        t["name"]
            .as_str()
            .and_then(|n| n.split('.').next())
            .unwrap_or("")
            .to_string()
    };
    c.wait("vote stack: 5 services running", 400, || {
        let ts = h1.json(&["stack", "ps", "vote"]).unwrap_or_default();
        for t in &ts {
            let s = svc_of(t);
            first_task.entry(s.clone()).or_insert_with(Instant::now);
            if t["status"]["state"] == "running" {
                first_run.entry(s).or_insert_with(Instant::now);
            }
        }
        first_run.len() == 5
    });
    // A dependent's first task came only once its dependencies ran (and
    // for the worker, once db's healthcheck passed).
    for (dependent, dependency) in [
        ("vote_vote", "vote_redis"),
        ("vote_result", "vote_db"),
        ("vote_worker", "vote_db"),
        ("vote_worker", "vote_redis"),
    ] {
        assert!(
            first_task[dependent] >= first_run[dependency],
            "{dependent} started before {dependency} ran"
        );
    }
    let ts = h1.json(&["stack", "ps", "vote"]).unwrap();
    let db = ts.iter().find(|t| svc_of(t) == "vote_db").unwrap();
    assert_eq!(db["status"]["health"], "healthy");
    assert!(
        db["node"] == "node1" || db["node"] == "node2",
        "db pinned to managers: {db}"
    );
    // The published port answers on the node its task runs on.
    let vote = ts.iter().find(|t| svc_of(t) == "vote_vote").unwrap();
    let host = c
        .hosts
        .iter()
        .find(|h| vote["node"] == h.name.as_str())
        .unwrap();
    let addr = format!("{}:5000", host.ip);
    let mut body = String::new();
    let t = Instant::now();
    while !body.contains("HTTP/1.") && t.elapsed() < Duration::from_secs(60) {
        body = http_get(&addr);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(body.contains("HTTP/1."), "{addr} answered {body:?}");
    assert!(h1.ok(&["stack", "ls"]).contains("vote"));
    h1.ok(&["stack", "rm", "vote"]);
    c.wait("the stack's sandboxes gone", 120, || {
        h1.json(&["service", "ls"]).unwrap_or_default().len() == 1
            && c.hosts.iter().map(Host::vmms).sum::<usize>() == 2
    });

    // ---- a task that ignores SIGTERM: stopping it takes the whole grace
    // period (10 s), and its node stays ready throughout (heartbeats
    // never wait behind task work; the grace here is 4 s) ----
    h1.ok(&[
        "service",
        "create",
        "--name",
        "stubborn",
        IMAGE,
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 1; done",
    ]);
    c.wait("stubborn running", 300, || {
        running(h1, "stubborn").len() == 1
    });
    let before = c.hosts.iter().map(Host::vmms).sum::<usize>();
    h1.ok(&["service", "rm", "stubborn"]);
    let stopping = Instant::now();
    let mut not_ready = Vec::new();
    while c.hosts.iter().map(Host::vmms).sum::<usize>() == before {
        assert!(
            stopping.elapsed() < Duration::from_secs(90),
            "stubborn's sandbox is still there"
        );
        for r in node_rows(h1) {
            if r["state"] != "ready" {
                not_ready.push(format!("{:?}: {r}", stopping.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        stopping.elapsed() >= Duration::from_secs(9),
        "stubborn stopped in {:?}: SIGTERM was not ignored, or no grace was given",
        stopping.elapsed()
    );
    assert!(
        not_ready.is_empty(),
        "nodes not ready while stubborn stopped: {not_ready:#?}"
    );

    // ---- drain: every task leaves the node ----
    // Three replicas: one on each node (the new one goes where web has none).
    h1.ok(&["service", "scale", "web=3"]);
    c.wait("web: 3 running", 300, || running(h1, "web").len() == 3);
    assert_eq!(per_node(&running(h1, "web")).len(), 3);
    h1.ok(&["node", "update", "--availability", "drain", "node2"]);
    c.wait("node2 drained", 300, || {
        let r = running(h1, "web");
        r.len() == 3 && r.iter().all(|(_, n)| n != "node2") && c.hosts[1].vmms() == 0
    });
    h1.ok(&["node", "update", "--availability", "active", "node2"]);

    // ---- huskd restarts on a node: its tasks go on in the same
    // sandboxes (same VMM processes), their output still logged ----
    h1.ok(&[
        "service",
        "create",
        "--name",
        "ticker",
        "--constraint",
        "node.hostname==node3",
        IMAGE,
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done",
    ]);
    c.wait("ticker running", 300, || running(h1, "ticker").len() == 1);
    let ticks = |h: &Host| -> Vec<u64> {
        h.ok(&["service", "logs", "ticker"])
            .lines()
            .filter_map(|l| l.rsplit_once("| tick ")?.1.trim().parse().ok())
            .collect()
    };
    c.wait("ticker ticking", 60, || ticks(h1).len() >= 2);
    let on_node3 = |h: &Host| -> Vec<String> {
        let mut ids: Vec<String> = ["web", "ticker"]
            .iter()
            .flat_map(|s| tasks(h, s))
            .filter(|t| {
                t["node"] == "node3"
                    && t["desired_state"] == "running"
                    && t["status"]["state"] == "running"
            })
            .map(|t| t["id"].as_str().unwrap_or("").to_string())
            .collect();
        ids.sort();
        ids
    };
    let tasks_before = on_node3(h1);
    let sandboxes_before = c.hosts[2].sandboxes();
    let vmms_before = c.hosts[2].vmm_pids();
    // ticker, and web's replicas there (one or two after the drain).
    assert!(
        tasks_before.len() >= 2,
        "web and ticker on node3: {tasks_before:?}"
    );
    assert_eq!(
        sandboxes_before, tasks_before,
        "a sandbox per task, named by it"
    );
    let ticked = ticks(h1).into_iter().max().unwrap_or(0);
    let restarted = Instant::now();
    c.hosts[2].kill_huskd();
    let mut h3 = c.hosts.remove(2);
    c.start_huskd(&mut h3).unwrap();
    c.hosts.insert(2, h3);
    let h1 = &c.hosts[0];
    c.wait("ticker logged past the restart", 60, || {
        ticks(h1).into_iter().max().unwrap_or(0) >= ticked + 5
    });
    eprintln!(
        "node3's huskd restarted; its tasks {tasks_before:?} in sandboxes \
         {sandboxes_before:?} (VMMs {vmms_before:?}); ticking again after {:?}",
        restarted.elapsed()
    );
    assert_eq!(
        on_node3(h1),
        tasks_before,
        "node3's tasks after the restart"
    );
    assert_eq!(c.hosts[2].sandboxes(), sandboxes_before);
    assert_eq!(c.hosts[2].vmm_pids(), vmms_before, "the same VMM processes");
    // One process from the start: its count never began again.
    let all = ticks(h1);
    assert_eq!(all.iter().filter(|t| **t == 1).count(), 1, "{all:?}");
    assert!(
        node_rows(h1).iter().all(|r| r["state"] == "ready"),
        "{:?}",
        node_rows(h1)
    );
    // Removed while node3's huskd is down: the next one stops it, since
    // no task assigned there owns it any more.
    c.hosts[2].kill_huskd();
    c.hosts[0].ok(&["service", "rm", "ticker"]);
    let mut h3 = c.hosts.remove(2);
    c.start_huskd(&mut h3).unwrap();
    c.hosts.insert(2, h3);
    let webs = tasks_before.len() - 1;
    c.wait("ticker's sandbox gone after the restart", 60, || {
        c.hosts[2].vmms() == webs && c.hosts[2].sandboxes().len() == webs
    });
    let h1 = &c.hosts[0];

    // ---- node loss: its tasks are rescheduled within 10 s ----
    // node3, the worker: after the drain web runs on node1 and node3.
    let victim = "node3".to_string();
    assert!(per_node(&running(h1, "web")).contains_key("node3"));
    let vi = 2;
    c.hosts[vi].kill();
    c.hosts[vi].unplug();
    let h1 = &c.hosts[0];
    let took = c.wait("web's lost task placed on a live node", 30, || {
        tasks(h1, "web")
            .iter()
            .filter(|t| t["desired_state"] == "running")
            .all(|t| t["node"] != victim.as_str())
    });
    assert!(took < Duration::from_secs(10), "rescheduled after {took:?}");
    c.wait("web: 3 running again", 300, || {
        running(h1, "web").len() == 3
    });
    assert!(node_rows(h1)
        .iter()
        .any(|r| r["hostname"] == victim.as_str() && r["state"] == "down"));

    // The leader's event stream saw it all.
    {
        let ev = events.lock().unwrap();
        let saw = |typ: &str, action: &str, name: &str, state: Option<&str>| {
            ev.iter().any(|e| {
                e["type"] == typ
                    && e["action"] == action
                    && e["name"] == name
                    && state.is_none_or(|s| e["state"] == s)
            })
        };
        // A stream that ended early shows why in node1's log (tonic and
        // h2 at debug).
        let why = || format!("{ev:?}\n{}", c.logs());
        assert!(saw("service", "create", "web", None), "{}", why());
        assert!(saw("node", "update", "node3", Some("down")), "{}", why());
        assert!(saw("task", "update", "web.1", Some("running")), "{}", why());
    }

    // ---- the leading manager dies: the other one leads, state intact ----
    c.hosts[0].kill();
    let h2 = &c.hosts[1];
    c.wait("node2 leads", 30, || {
        h2.ok(&["cluster", "info"]).contains("Is Leader: true")
    });
    let svcs = h2.json(&["service", "ls"]).unwrap();
    assert_eq!(svcs.len(), 1);
    assert_eq!(svcs[0]["spec"]["name"], "web");
    c.wait("web: 3 running on the survivor", 300, || {
        let r = running(h2, "web");
        r.len() == 3 && r.iter().all(|(_, n)| n == "node2")
    });

    // ---- a node removed from the cluster stops what it runs ----
    // node3 comes back (its link, a new huskd: the sandboxes of the one
    // killed with it are removed) and takes a replica.
    c.hosts[2].plug();
    let mut h3 = c.hosts.remove(2);
    c.start_huskd(&mut h3).unwrap();
    c.hosts.insert(2, h3);
    let h2 = &c.hosts[1];
    c.wait("node3 ready again", 90, || {
        node_rows(h2)
            .iter()
            .any(|r| r["hostname"] == "node3" && r["state"] == "ready")
    });
    h2.ok(&["service", "scale", "web=4"]);
    c.wait("web: a replica on node3", 300, || {
        running(h2, "web").iter().any(|(_, n)| n == "node3") && c.hosts[2].vmms() == 1
    });
    h2.ok(&["node", "rm", "--force", "node3"]);
    c.wait("node3's sandbox stopped", 60, || {
        c.hosts[2].vmms() == 0 && c.hosts[2].sandboxes().is_empty()
    });
    c.wait("web: 4 running on node2", 300, || {
        let r = running(h2, "web");
        r.len() == 4 && r.iter().all(|(_, n)| n == "node2")
    });
    let _ = ev_child.kill();
    let _ = ev_child.wait();
    h2.ok(&["service", "rm", "web"]);
    c.wait("every sandbox gone", 120, || {
        c.hosts.iter().map(Host::vmms).sum::<usize>() == 0
    });
    drop(c);
}
