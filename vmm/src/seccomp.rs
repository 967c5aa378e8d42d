//! seccomp filters per thread kind, built with seccompiler.
//!
//! The `vmm` filter is installed on the main thread before the API socket or
//! any device exists, so every thread inherits it; vCPU and device threads then
//! stack their own, narrower filter before their first guest-facing work (for a
//! vCPU: before its first KVM_RUN). A denied system call raises SIGSYS; the
//! handler names the call on stderr and ends the process, so a missing entry
//! shows up as a clear line, not a mystery.
//!
//! The lists were taken from strace of the test suite's VMs (boot with block,
//! vsock, rng; API configure/start/pause/resume) and trimmed by hand.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::seccomp_table::SYSCALLS;

/// Off only with `--no-seccomp` (debugging).
pub static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs the filter of `kind` on the calling thread if filtering is on.
/// A failure is fatal to the thread's caller: running unconfined silently is
/// what this exists to prevent.
pub fn confine(kind: ThreadKind) -> Result<(), String> {
    if ENABLED.load(std::sync::atomic::Ordering::SeqCst) {
        install(kind)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Main thread, API threads: building the VM, serving requests.
    Vmm,
    /// vCPU threads: KVM_RUN, and device emulation on exits (block I/O,
    /// vsock TX, rng, serial output).
    Vcpu,
    /// Device event loops: host-side vsock sockets.
    Device,
}

/// Calls every thread kind needs (memory, threads, signals, time, exit).
const COMMON: &[&str] = &[
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "futex",
    "sched_yield",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "gettid",
    "getpid",
    "exit",
    "exit_group",
    "write",
    "writev",
    "read",
    "close",
    "poll",
    "ppoll",
    "getrandom",
    "restart_syscall",
    // set at thread start by the C library
    "rseq",
    "set_robust_list",
    "sched_getaffinity",
    "prctl",
];

const VMM: &[&str] = &[
    // building the VM
    "openat",
    "open",
    "newfstatat",
    "fstat",
    "statx",
    "lseek",
    "pread64",
    "pwrite64",
    "memfd_create",
    "ftruncate",
    // snapshots: the state file (written, renamed into place) and memory
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    // memory pages a snapshot skips: never touched (no swap to hide them)
    "mincore",
    "sysinfo",
    "fcntl",
    "ioctl",
    "eventfd2",
    "readlink",
    "getcwd",
    "unlink",
    "unlinkat",
    "seccomp",
    "uname",
    "getpid",
    "dup",
    "dup2",
    "dup3",
    "prlimit64",
    "access",
    // threads
    "clone",
    "clone3",
    "tgkill",
    // the API socket and vsock listener
    "socket",
    "bind",
    "listen",
    "accept",
    "accept4",
    "connect",
    "shutdown",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "getsockname",
    "getsockopt",
    "setsockopt",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    // vsock's kill timer
    "timerfd_create",
];

/// Host sockets: vsock connections (both thread kinds touch them) and taps.
const SOCKETS: &[&str] = &[
    "socket",
    "connect",
    "accept4",
    "shutdown",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "fcntl",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    // vsock's kill timer
    "timerfd_settime",
];

const VCPU: &[&str] = &[
    // KVM_RUN, register reads for crash reports, irqfd signalling
    "ioctl",
    // block
    "pread64",
    "pwrite64",
    "fdatasync",
    "fsync",
    // pause: the kick signal
    "tgkill",
];

/// Device event loops: host sockets (SOCKETS), FIONBIO, and the queues
/// drivers notify (block I/O).
const DEVICE: &[&str] = &["ioctl", "pread64", "pwrite64", "fdatasync", "fsync"];

fn number(name: &str) -> Option<i64> {
    SYSCALLS.iter().find(|(_, n)| *n == name).map(|(nr, _)| *nr)
}

/// The name of system call `nr`, if it has one on x86_64.
pub fn name(nr: i64) -> &'static str {
    SYSCALLS
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, s)| *s)
        .unwrap_or("unknown")
}

/// The allowlist of a thread kind. Filters stack (a vCPU thread runs under
/// the inherited `Vmm` filter and its own), so `Vmm` is the union of all.
pub fn allowed(kind: ThreadKind) -> Vec<&'static str> {
    let extra: Vec<&str> = match kind {
        ThreadKind::Vmm => VMM
            .iter()
            .chain(VCPU)
            .chain(DEVICE)
            .chain(SOCKETS)
            .copied()
            .collect(),
        ThreadKind::Vcpu => VCPU.iter().chain(SOCKETS).copied().collect(),
        ThreadKind::Device => DEVICE.iter().chain(SOCKETS).copied().collect(),
    };
    let mut v: Vec<&str> = COMMON.iter().chain(extra.iter()).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Calls that open files. A thread whose kind may not open files gets
/// EACCES for them instead of being killed: the C library opens files
/// lazily on its own (glibc's CPU count, read from
/// /sys/devices/system/cpu/online the first time some thread needs it),
/// and which thread comes first is a race — a vCPU was killed for it in a
/// template build under load.
const OPENS: &[&str] = &["open", "openat"];

/// The filter of `kind`: its calls allowed, others trapped (SIGSYS); for
/// kinds without file access the opens are let through here and refused
/// by `refuse_opens` installed on top (the stricter action wins).
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, String> {
    let mut rules = BTreeMap::new();
    let names = allowed(kind);
    for n in names
        .iter()
        .chain(if refuses_opens(kind) { OPENS } else { &[] })
    {
        // Names not on x86_64 (e.g. `open` on newer tables) are skipped.
        if let Some(nr) = number(n) {
            rules.insert(nr, vec![]);
        }
    }
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| format!("building the {kind:?} seccomp filter: {e}"))
}

/// Whether `kind` may not open files (its opens get EACCES, not SIGSYS).
fn refuses_opens(kind: ThreadKind) -> bool {
    !allowed(kind).contains(&"openat")
}

/// A filter that fails file opens with EACCES and allows the rest.
fn refuse_opens() -> Result<BpfProgram, String> {
    let rules = OPENS
        .iter()
        .filter_map(|n| number(n))
        .map(|nr| (nr, vec![]))
        .collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| format!("building the open-refusing seccomp filter: {e}"))
}

/// Installs the filter of `kind` on the calling thread (and what it spawns).
pub fn install(kind: ThreadKind) -> Result<(), String> {
    let prog = filter(kind)?;
    // The refusing filter first: once the main one is in, installing
    // another (seccomp(2)) must itself be allowed by it.
    if refuses_opens(kind) {
        seccompiler::apply_filter(&refuse_opens()?)
            .map_err(|e| format!("installing the {kind:?} open filter: {e}"))?;
    }
    seccompiler::apply_filter(&prog)
        .map_err(|e| format!("installing the {kind:?} seccomp filter: {e}"))
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo for SIGSYS: after si_signo, si_errno, si_code and padding (16
    // bytes) come the faulting address (8 bytes) and the syscall number.
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; we read an i32
    // at its documented offset inside that struct.
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) };
    let msg = format!(
        "husk-vmm: seccomp denied system call {} ({nr}) on thread {:?}; exiting\n",
        name(i64::from(nr)),
        std::thread::current().name().unwrap_or("?")
    );
    // SAFETY: write(2) on fd 2 with a valid buffer; _exit never returns. The
    // process is going down, so the allocation above is acceptable here.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(31);
    }
}

/// Reports denied calls by name (SIGSYS handler).
pub fn install_sigsys_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_name_calls() {
        for k in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Device] {
            filter(k).unwrap();
        }
        assert_eq!(name(0), "read");
        assert_eq!(name(16), "ioctl");
        assert_eq!(name(100_000), "unknown");
        // Narrower kinds allow less than the VMM thread.
        assert!(!allowed(ThreadKind::Vcpu).contains(&"openat"));
        assert!(!allowed(ThreadKind::Device).contains(&"memfd_create"));
    }

    #[test]
    fn a_denied_call_is_named_and_kills() {
        // In a child process: install the vCPU filter; an open fails with
        // EACCES (the C library's own lazy opens must not kill a vCPU),
        // then a call outside the list (mkdir) kills with 31.
        // SAFETY: fork in a test; the child only calls async-signal-safe-ish
        // code and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let _ = install_sigsys_handler();
            if install(ThreadKind::Vcpu).is_err() {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(2) };
            }
            match std::fs::File::open("/etc/hostname") {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
                // SAFETY: leaving the forked child.
                _ => unsafe { libc::_exit(3) },
            }
            // SAFETY: a NUL-terminated path; the filter traps the call.
            unsafe { libc::mkdir(c"/tmp/husk-seccomp-test".as_ptr(), 0o700) };
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            31,
            "exit {}",
            libc::WEXITSTATUS(status)
        );
    }
}
