//! bench/scale's measurements (a benchmark, not a test): huskd on one node
//! (etcd and one huskd in a network namespace, the test helpers' cluster),
//! a busybox service scaled from 1 to 20 replicas:
//!
//! - the time from `service scale` until `service ps` shows 20 running;
//! - the host CPU-seconds the node spent meanwhile: user + system time of
//!   huskd (the runtime is in it) and every process it started (keepers,
//!   VMMs, log copiers), from /proc, the difference between the two
//!   moments (a process that ended in between is not counted);
//! - the summed PSS of the 20 sandboxes' VMMs (smaps_rollup).
//!
//! Twice, in one run: huskd's default (`--boot parked`, container-ready
//! templates) and the path it replaced (`--boot template`).
//!
//! Last line: key=value pairs (`scale-*` the default's, `template-*` the
//! other's).

use std::time::{Duration, Instant};

use husk_tests::cluster::{cluster_unavailable, Cluster, Host};
use husk_tests::sample_image;
use serde_json::Value;

const REPLICAS: usize = 20;
/// How long a scale-up may take before it counts as failed.
const SCALE_WAIT: Duration = Duration::from_secs(1200);

/// utime + stime + cutime + cstime of `pid`, in seconds (0 if it is gone).
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command: state is field 3, utime 14 … cstime 17.
            let ticks: u64 = f
                .get(11..15)?
                .iter()
                .filter_map(|v| v.parse::<u64>().ok())
                .sum();
            Some(ticks as f64 / hz)
        })
        .unwrap_or(0.0)
}

/// Proportional set size of `pid`, bytes.
fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn running(h: &Host) -> usize {
    h.json(&["service", "ps", "scaled"])
        .unwrap_or_default()
        .iter()
        .filter(|t| t["status"]["state"] == "running" && t["desired_state"] == "running")
        .count()
}

/// What one scale-up cost.
struct Scaled {
    wall: f64,
    cpu: f64,
    pss_mib: f64,
}

/// A one-node cluster whose huskd starts sandboxes the `boot` way, a
/// busybox service scaled 1 -> REPLICAS on it; None if they were not all
/// running within `SCALE_WAIT` (the tasks' states are printed).
fn scale(boot: &str) -> Option<Scaled> {
    let image = sample_image("busybox.oci.tar").expect("make images");
    let c = Cluster::with_args("sc", 1, &[image], 1, &["--boot", boot]).expect("cluster");
    let h = &c.hosts[0];
    h.ok(&["cluster", "init"]);
    c.wait("the node ready", 30, || {
        let n = h.json(&["node", "ls"]).unwrap_or_default();
        n.len() == 1 && n[0]["state"] == "ready"
    });
    h.ok(&[
        "service",
        "create",
        "--name",
        "scaled",
        "--replicas",
        "1",
        "husk.local/busybox",
        "sleep",
        "36000",
    ]);
    let first = Instant::now();
    c.wait("1 task running", 300, || running(h) == 1);
    println!(
        "--boot {boot}: 1 replica running after {:.2} s (templates built if missing)",
        first.elapsed().as_secs_f64()
    );

    let before: f64 = h.pids().iter().map(|p| cpu_seconds(*p)).sum();
    let t = Instant::now();
    h.ok(&["service", "scale", &format!("scaled={REPLICAS}")]);
    while running(h) != REPLICAS {
        if t.elapsed() > SCALE_WAIT {
            println!(
                "--boot {boot}: not all {REPLICAS} running after {} s; the tasks:",
                SCALE_WAIT.as_secs()
            );
            h.husk(&["service", "ps", "-a", "scaled"]);
            return None;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let wall = t.elapsed().as_secs_f64();
    let after: f64 = h.pids().iter().map(|p| cpu_seconds(*p)).sum();
    let vmms = h.vmm_pids();
    let pss_total: u64 = vmms.iter().map(|p| pss(*p)).sum();
    let tasks: Vec<Value> = h.json(&["service", "ps", "scaled"]).unwrap_or_default();
    assert_eq!(
        vmms.len(),
        REPLICAS,
        "{} VMMs for {} tasks",
        vmms.len(),
        tasks.len()
    );
    let cpu = after - before;
    let pss_mib = pss_total as f64 / (1024.0 * 1024.0);
    println!(
        "--boot {boot}: scaled 1 -> {REPLICAS}: all running after {wall:.2} s; host CPU {cpu:.1} s (huskd, keepers, VMMs); PSS of the {REPLICAS} VMMs {pss_mib:.1} MiB ({:.1} MiB each)",
        pss_mib / REPLICAS as f64
    );
    h.ok(&["service", "rm", "scaled"]);
    drop(c);
    Some(Scaled { wall, cpu, pss_mib })
}

fn main() {
    if let Some(why) = cluster_unavailable() {
        eprintln!("scale_bench: {why}");
        std::process::exit(2);
    }
    // Today's default and the path it replaced, one after the other.
    let parked = scale("parked");
    let template = scale("template");
    let fields = |prefix: &str, s: &Option<Scaled>| {
        match s {
        Some(s) => format!(
            "{prefix}wall-s={:.2} {prefix}cpu-s={:.1} {prefix}pss-mib={:.1} {prefix}pss-per-sandbox-mib={:.1}",
            s.wall,
            s.cpu,
            s.pss_mib,
            s.pss_mib / REPLICAS as f64
        ),
        None => format!("{prefix}wall-s=failed"),
    }
    };
    println!(
        "{} {} replicas={REPLICAS}",
        fields("scale-", &parked),
        fields("template-", &template)
    );
    if parked.is_none() {
        std::process::exit(1);
    }
}
