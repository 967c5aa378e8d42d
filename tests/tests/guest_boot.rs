//! Tier 3: the real guest kernel and root image boot to init under KVM.
//!
//! One boot for the whole file (each costs over a minute of emulated guest
//! kernel time on this machine). Until husk-vmm exists the VMM is qemu microvm.

use std::time::Duration;

use husk_tests::{guest_kernel, guest_rootfs, kvm_unavailable, parse_uptime, skip, Guest};

/// Generous: ~80 s measured here, on a busy 2-core CI machine more.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

#[test]
fn guest_boots_to_init_and_reboots_cleanly() {
    if let Some(why) = kvm_unavailable() {
        skip("guest_boots_to_init_and_reboots_cleanly", &why);
        return;
    }
    let kernel = guest_kernel().unwrap();
    let rootfs = guest_rootfs().unwrap();
    let mut guest = Guest::boot_qemu(&kernel, &rootfs, &[]).unwrap();

    let (_, at_marker) = guest
        .wait_for_line("husk-test-init: reached init", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (uptime_line, _) = guest
        .wait_for_line("husk-test-init: uptime", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let uptime = parse_uptime(&uptime_line).unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
    println!(
        "boot: init marker after {:.1} s wall; guest uptime at init {uptime:.2} s",
        at_marker.as_secs_f64()
    );
    assert!(uptime > 0.0, "guest uptime {uptime} is not positive");

    // The root image must be the read-only erofs we built, mounted as root.
    guest.assert_line(
        "VFS: Mounted root (erofs filesystem) readonly",
        "root was not mounted read-only from erofs",
    );
    // No emulation failure, oops or panic on the way.
    guest.assert_no_errors(&[]);

    // reboot=k: the i8042 reset ends the VMM, with success.
    let status = guest
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        status.success(),
        "VMM exit status {status}\n{}",
        guest.tail()
    );
}
