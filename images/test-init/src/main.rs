//! husk-test-init: the guest's /init until husk-agent exists.
//!
//! It proves the guest kernel reached user space: it prints a marker line, the
//! guest's own /proc/uptime (time since the kernel started, independent of how
//! long the VMM took to get there), then reboots. The guest kernel runs with
//! `reboot=k`, so the reboot is an i8042 reset that ends the VMM cleanly.
//!
//! Each system call is expensive on an emulating KVM (~ms each), so this does
//! as few as it can. It never panics: PID 1 dying panics the guest kernel.

use std::io::Write;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

/// Printed as soon as init runs; boot checks wait for this line.
const MARKER: &str = "husk-test-init: reached init";

fn main() {
    let mut out = std::io::stdout().lock();
    // A failed write to the console has nowhere to be reported; keep going.
    let _ = writeln!(out, "{MARKER}");

    let uptime = match mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) => std::fs::read_to_string("/proc/uptime")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unreadable ({e})")),
        Err(e) => format!("unavailable (mount /proc: {e})"),
    };
    let _ = writeln!(out, "husk-test-init: uptime {uptime}");
    let _ = writeln!(out, "husk-test-init: rebooting");
    let _ = out.flush();
    drop(out);

    // Nothing was written to any disk: the root is read-only.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("husk-test-init: reboot failed: {e}");
    // PID 1 must not exit (the kernel would panic); wait to be killed.
    loop {
        std::thread::park();
    }
}
