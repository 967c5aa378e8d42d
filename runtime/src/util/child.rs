//! Child processes (husk-vmm, virtiofsd) watched through a pidfd, so they
//! can be waited for and signalled even when another part of the process
//! reaps children: a containerd shim reaps every child on SIGCHLD, which
//! leaves `std::process::Child` with ECHILD and a pid that may be reused.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

pub struct Watched {
    /// None for a process found again (started by an earlier process of
    /// ours that is gone): not our child, watched through its pidfd only.
    child: Option<Child>,
    pid: u32,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

/// When process `pid` started (clock ticks after boot, field 22 of
/// /proc/<pid>/stat): with the pid, it names one process for the boot.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, field 2, is in parentheses and may hold anything;
    // the fields after its last ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by no one.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Watched {
    pub fn new(child: Child) -> Watched {
        // The pid is our unreaped child, so it names that process.
        let pidfd = pidfd_open(child.id()).ok();
        Watched {
            pid: child.id(),
            child: Some(child),
            pidfd,
            status: None,
        }
    }

    /// Process `pid`, not our child, if it is still the one that started
    /// at `ticks` (see [`start_ticks`]); an error names why not. Its exit
    /// status is not ours to learn: it reads as 0.
    pub fn find(pid: u32, ticks: u64) -> std::io::Result<Watched> {
        let pidfd = pidfd_open(pid)?;
        // Checked after the pidfd is open: had the pid been reused before,
        // the start time differs; after, the pidfd still names the first.
        match start_ticks(pid) {
            Some(t) if t == ticks => Ok(Watched {
                child: None,
                pid,
                pidfd: Some(pidfd),
                status: None,
            }),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("process {pid} is not the one recorded (started at tick {ticks})"),
            )),
        }
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The exit status if it has exited. Reaped by someone else, it
    /// reports a status of 0: the real one went to that reaper.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        let Some(child) = self.child.as_mut() else {
            if self.pidfd.as_ref().is_none_or(readable) {
                self.status = Some(ExitStatus::from_raw(0));
            }
            return Ok(self.status);
        };
        match child.try_wait() {
            Ok(s) => self.status = s,
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                if self.pidfd.as_ref().is_none_or(readable) {
                    self.status = Some(ExitStatus::from_raw(0));
                }
            }
            Err(e) => return Err(e),
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` unless it has exited (through the pidfd: never to a
    /// process that reused its pid).
    pub fn signal(&mut self, signal: i32) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        match &self.pidfd {
            // SAFETY: pidfd_send_signal with our pidfd, no siginfo, no flags.
            Some(p) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    p.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            },
            // SAFETY: kill on our child's pid, not reaped (try_wait above);
            // a process found again always has a pidfd.
            None => unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            },
        }
    }

    /// Kills it and waits for it to go.
    pub fn kill_and_wait(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_timeout(Duration::from_secs(10));
    }
}

fn readable(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, no timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

/// Makes an inherited descriptor usable by a child: clears FD_CLOEXEC in
/// the child only (called between fork and exec).
pub(crate) fn keep_across_exec(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl(F_SETFD) on a descriptor number; async-signal-safe, as
    // code between fork and exec must be.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_reaped_by_another_counts_as_exited() {
        let c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as libc::pid_t;
        let mut w = Watched::new(c);
        // Someone else reaps it, as a shim's SIGCHLD handler would.
        let mut st = 0;
        // SAFETY: waitpid on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        assert!(w.try_wait().unwrap().is_some());
        w.signal(libc::SIGKILL); // no-op, not a stray kill
    }

    #[test]
    fn a_running_child_is_waited_for_and_killed() {
        let c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut w = Watched::new(c);
        assert!(w.try_wait().unwrap().is_none());
        assert!(w.wait_timeout(Duration::from_millis(50)).unwrap().is_none());
        w.kill_and_wait();
        assert_eq!(w.try_wait().unwrap().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_process_is_found_again_only_with_its_start_time() {
        let c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut own = Watched::new(c);
        let ticks = start_ticks(own.id()).unwrap();
        assert!(Watched::find(own.id(), ticks + 1).is_err());
        let mut found = Watched::find(own.id(), ticks).unwrap();
        assert!(found.try_wait().unwrap().is_none());
        found.signal(libc::SIGKILL);
        own.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(found
            .wait_timeout(Duration::from_secs(1))
            .unwrap()
            .is_some());
    }

    #[test]
    fn start_ticks_reads_past_a_name_with_parentheses() {
        let me = start_ticks(std::process::id()).unwrap();
        assert!(me > 0);
        assert!(start_ticks(u32::MAX >> 2).is_none());
    }
}
