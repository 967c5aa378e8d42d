//! bench/hostile's body: every attack of the hostile guest for SECONDS
//! each (default 60) against husk-vmm (HUSK_VMM, else target/release),
//! with a restored busybox sandbox beside it answering Health twice a
//! second. Prints a row per attack and, last, `vmm-alive=<0|1>
//! rss-growth-mib=<largest> neighbour-ok=<0|1> attacks=<n>`.
//!
//! Usage: hostile [SECONDS]

use std::time::Duration;

use husk_tests::agent::{busybox_guest, busybox_sandbox};
use husk_tests::hostile::{header, run_attack, ATTACKS, GUEST_MIB};
use husk_tests::kvm_unavailable;

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS is a number"))
        .unwrap_or(60);
    if std::env::var_os("HUSK_VMM").is_none() {
        let release = husk_tests::repo_root().join("target/release/husk-vmm");
        std::env::set_var("HUSK_VMM", release);
    }
    let Some((rt, _dir, busybox)) = busybox_guest("hostile", kvm_unavailable()) else {
        std::process::exit(1);
    };
    let vmm = husk_tests::husk_vmm_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let neighbour = rt
        .start_sandbox(&busybox_sandbox("hostile-neighbour", &busybox))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let conn = neighbour.connect().unwrap_or_else(|e| panic!("{e:#}"));
    let answers = || conn.health().is_ok();
    println!("{}", header());
    let (mut alive, mut neighbour_ok, mut worst) = (true, true, 0.0f64);
    for attack in ATTACKS {
        let o = run_attack(&vmm, attack, Duration::from_secs(secs), &answers)
            .unwrap_or_else(|e| panic!("{attack}: {e:#}"));
        println!("{}", o.row());
        if let Some(e) = &o.ended {
            println!("  husk-vmm ended: {e}");
        }
        alive &= o.alive();
        neighbour_ok &= o.neighbour_failed == 0 && o.neighbour_ok > 0;
        worst = worst.max(o.growth_mib());
    }
    drop(conn);
    let _ = neighbour.shutdown(Duration::from_secs(20));
    println!(
        "guest RAM {GUEST_MIB} MiB (all touched before each attack); {secs} s per attack; \
         rounds = the guest's progress lines (one per 1000 rounds)"
    );
    println!(
        "vmm-alive={} rss-growth-mib={worst:.1} neighbour-ok={} attacks={}",
        u8::from(alive),
        u8::from(neighbour_ok),
        ATTACKS.len()
    );
}
