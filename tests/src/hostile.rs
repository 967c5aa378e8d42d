//! Runs the hostile guest (images/hostile-guest) against husk-vmm, one
//! attack per VM, and measures what the issue asks of the VMM: it stays up
//! (or ends that VM alone, saying why), its RSS stays bounded, and a
//! neighbour sandbox keeps answering. Shared by tests/tests/hostile_guest.rs
//! (short) and bench/hostile (a minute per attack).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{repo_root, Guest};

/// Every attack the guest knows (images/hostile-guest/src/main.rs).
pub const ATTACKS: &[&str] = &[
    "blk-loop",
    "blk-long-chain",
    "blk-outside-memory",
    "blk-4gib",
    "blk-wrong-direction",
    "kick-unready",
    "vsock-flood",
    "vsock-half-closed",
    "rng-4gib",
    "mmio-garbage",
];

/// The hostile VM's memory: the guest touches all of it before attacking,
/// so what the VMM's RSS grows by afterwards is the VMM's own.
pub const GUEST_MIB: u64 = 64;
/// The host port the guest connects to; its listener never reads.
const HOST_PORT: u32 = 5000;

/// The guest binary `make hostile-guest` builds.
pub fn hostile_guest_binary() -> Result<PathBuf> {
    let p = std::env::var_os("HUSK_HOSTILE_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest/hostile-guest"));
    if !p.exists() {
        bail!(
            "{} not found (run `make hostile-guest`, or set HUSK_HOSTILE_GUEST)",
            p.display()
        );
    }
    Ok(p)
}

#[derive(Debug)]
pub struct Outcome {
    pub attack: String,
    /// How husk-vmm ended, if it did before the attack's time was up, and
    /// its last log lines.
    pub ended: Option<String>,
    pub baseline_rss_kib: u64,
    pub peak_rss_kib: u64,
    /// Rounds the guest reported (it is making progress, not stuck).
    pub rounds: usize,
    /// Neighbour checks that passed and failed meanwhile.
    pub neighbour_ok: u64,
    pub neighbour_failed: u64,
}

impl Outcome {
    /// husk-vmm was still running when the attack's time was up.
    pub fn alive(&self) -> bool {
        self.ended.is_none()
    }

    pub fn growth_mib(&self) -> f64 {
        self.peak_rss_kib.saturating_sub(self.baseline_rss_kib) as f64 / 1024.0
    }

    /// One row of a table under `header()`.
    pub fn row(&self) -> String {
        format!(
            "{:<22} {:>6} {:>10} {:>10} {:>9.1} {:>8} {:>5} ok {:>2} bad",
            self.attack,
            self.alive(),
            self.baseline_rss_kib,
            self.peak_rss_kib,
            self.growth_mib(),
            self.rounds,
            self.neighbour_ok,
            self.neighbour_failed
        )
    }
}

/// The header of `Outcome::row`s.
pub fn header() -> String {
    format!(
        "{:<22} {:>6} {:>10} {:>10} {:>9} {:>8} {:>12}",
        "attack", "alive", "rss0-kib", "peak-kib", "grew-mib", "rounds", "neighbour"
    )
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A host program on `HOST_PORT` that accepts and never reads: guest data
/// piles up in the VMM, as far as the VMM lets it.
fn deaf_listener(uds: &Path, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let l = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display()))?;
    l.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let mut held: Vec<UnixStream> = Vec::new();
        let mut pruned = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(true);
                    held.push(s);
                    continue;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
            // Connections the VMM dropped are let go, now and then.
            if pruned.elapsed() > Duration::from_secs(1) {
                held.retain(|s| {
                    let mut b = [0u8; 1];
                    !matches!((&*s).read(&mut b), Ok(0))
                });
                pruned = Instant::now();
            }
        }
    }))
}

/// Runs `attack` for `time` against `vmm`; `neighbour` is called every
/// half second meanwhile and says whether the neighbour answered.
pub fn run_attack(
    vmm: &Path,
    attack: &str,
    time: Duration,
    neighbour: &(dyn Fn() -> bool + Sync),
) -> Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(1 << 20)?;
    let uds = dir.path().join("v.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let listener = deaf_listener(&uds, stop.clone())?;
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": hostile_guest_binary()?,
            "boot_args": format!("husk.attack={attack}"),
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": GUEST_MIB},
        "drives": [{"drive_id": "scratch", "path_on_host": disk,
                    "is_root_device": false, "is_read_only": false}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "entropy": {}
    });
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec(&config)?)?;
    let mut cmd = Command::new(vmm);
    cmd.arg("--config-file").arg(&cfg);
    let mut guest = Guest::spawn(&format!("hostile-{attack}"), cmd)?;
    let pid = guest.pid();
    guest
        .wait_for_line("hostile: attack", Duration::from_secs(60))
        .with_context(|| format!("the hostile guest did not start {attack}"))?;
    let baseline = rss_kib(pid).context("the VMM's RSS")?;
    let mut peak = baseline;
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let counter = if neighbour() { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let start = Instant::now();
        while start.elapsed() < time {
            if let Some(r) = rss_kib(pid) {
                peak = peak.max(r);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::Relaxed);
    });
    let ended = guest
        .try_wait()?
        .map(|st| format!("{st}: {}", guest.tail()));
    let rounds = guest
        .lines()
        .iter()
        .filter(|l| l.contains(" round "))
        .count();
    drop(guest);
    stop.store(true, Ordering::Relaxed);
    let _ = listener.join();
    Ok(Outcome {
        attack: attack.to_string(),
        ended,
        baseline_rss_kib: baseline,
        peak_rss_kib: peak,
        rounds,
        neighbour_ok: ok.into_inner(),
        neighbour_failed: failed.into_inner(),
    })
}
