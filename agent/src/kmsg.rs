//! The guest kernel's reports of processes it kills, on the console.
//!
//! The guest boots `quiet`, so the console shows warnings and worse; the
//! kernel reports a process killed by a fault (`segfault at …`, `traps:`,
//! `general protection`) at KERN_INFO, below that. A container process that
//! dies of SIGSEGV then leaves only an exit status of 139 behind. PID 1
//! reads the kernel log and copies exactly those reports to the console,
//! where the host's logs (and a failing test) show them.

use std::io::{BufRead, BufReader, Seek, SeekFrom};

/// Kernel log messages that report a process killed or a kernel fault.
const REPORTS: &[&str] = &[
    "segfault at",
    "traps:",
    "general protection",
    "invalid opcode",
    "Killed process",
    "BUG:",
    "WARNING:",
    "Oops",
];

/// A record of /dev/kmsg ("pri,seq,usec,flags;text") worth the console:
/// one below the console's level (warnings and worse are already there)
/// that reports a kill or a fault. Returns its text.
pub fn report(record: &str) -> Option<&str> {
    let (head, text) = record.split_once(';')?;
    let pri: u32 = head.split(',').next()?.parse().ok()?;
    let level = pri & 7;
    let below_console = level > 4;
    (below_console && REPORTS.iter().any(|r| text.contains(r))).then_some(text.trim_end())
}

/// Copies the reports from now on to stderr (the console), in a thread.
/// Earlier records were printed at boot if they mattered.
pub fn forward_reports() {
    let file = match std::fs::File::open("/dev/kmsg") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("husk-agent: /dev/kmsg: {e}; the kernel's fault reports stay in its log");
            return;
        }
    };
    std::thread::spawn(move || {
        let mut file = file;
        if let Err(e) = file.seek(SeekFrom::End(0)) {
            eprintln!("husk-agent: /dev/kmsg: seek: {e}");
        }
        // Each read of /dev/kmsg returns one record ending in a newline.
        let mut lines = BufReader::new(file);
        let mut record = String::new();
        loop {
            record.clear();
            match lines.read_line(&mut record) {
                Ok(0) => return,
                Ok(_) => {
                    if let Some(text) = report(&record) {
                        eprintln!("kernel: {text}");
                    }
                }
                // EPIPE: records were overwritten before we read them.
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EPIPE as i32) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("husk-agent: /dev/kmsg: {e}; fault reports no longer copied");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unprinted_fault_reports_are_copied() {
        let segv =
            "6,812,247434320,-;sh[60]: segfault at 0 ip 0000000000401000 sp 00007ffd error 4";
        assert_eq!(
            report(segv),
            Some("sh[60]: segfault at 0 ip 0000000000401000 sp 00007ffd error 4")
        );
        // Level 3 (error) is on the console already.
        assert_eq!(
            report("3,1,2,-;Memory cgroup out of memory: Killed process 60"),
            None
        );
        assert_eq!(report("6,1,2,-;virtio_net: eth0 up"), None);
        assert_eq!(report("garbage"), None);
        assert_eq!(report("x,1;segfault at"), None);
        // Facility bits above the level are ignored.
        assert_eq!(
            report("14,1,2,-;traps: a[1] trap int3"),
            Some("traps: a[1] trap int3")
        );
    }
}
