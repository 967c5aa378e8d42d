//! A guest that attacks husk-vmm through its devices' registers and rings
//! (images/hostile-guest): every attack, a few seconds each, one VM each,
//! with a busybox sandbox beside it. husk-vmm must stay up, its RSS must
//! not grow past 16 MiB once the guest has touched all its memory, and the
//! neighbour must keep answering. bench/hostile runs the same for a
//! minute per attack.

use std::time::Duration;

use husk_tests::agent::{busybox_guest, busybox_sandbox};
use husk_tests::hostile::{header, run_attack, ATTACKS};
use husk_tests::{husk_vmm_binary, kvm_unavailable};

#[test]
fn every_attack_leaves_the_vmm_up_bounded_and_its_neighbour_answering() {
    let Some((rt, _dir, busybox)) = busybox_guest(
        "every_attack_leaves_the_vmm_up_bounded_and_its_neighbour_answering",
        kvm_unavailable(),
    ) else {
        return;
    };
    let vmm = husk_vmm_binary().unwrap();
    let neighbour = rt
        .start_sandbox(&busybox_sandbox("hostile-neighbour", &busybox))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let conn = neighbour.connect().unwrap_or_else(|e| panic!("{e:#}"));
    let answers = || conn.health().is_ok();
    let mut failures = Vec::new();
    println!("{}", header());
    for attack in ATTACKS {
        let o = run_attack(&vmm, attack, Duration::from_secs(4), &answers)
            .unwrap_or_else(|e| panic!("{attack}: {e:#}"));
        println!("{}", o.row());
        if !o.alive() {
            failures.push(format!(
                "{attack}: husk-vmm ended: {}",
                o.ended.as_deref().unwrap_or_default()
            ));
        }
        if o.growth_mib() > 16.0 {
            failures.push(format!("{attack}: RSS grew {:.1} MiB", o.growth_mib()));
        }
        if o.neighbour_failed > 0 || o.neighbour_ok == 0 {
            failures.push(format!(
                "{attack}: the neighbour answered {} times and failed {}",
                o.neighbour_ok, o.neighbour_failed
            ));
        }
        if o.rounds == 0 {
            failures.push(format!("{attack}: the guest never finished a round"));
        }
    }
    drop(conn);
    let _ = neighbour.shutdown(Duration::from_secs(20));
    assert!(failures.is_empty(), "{failures:#?}");
}
