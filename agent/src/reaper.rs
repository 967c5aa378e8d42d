//! Reaping children, and the exit statuses WaitProcess reports.
//!
//! libcontainer waits for its own helper process inside a container build; a
//! reaper calling `waitpid(-1)` at the same time could steal that status. So
//! children are reaped only under the spawn lock, which builds hold: the
//! reaper peeks at an exited child (`WNOWAIT`), takes the lock, and reaps the
//! child if it is still there. This also makes a watched pid safe to signal
//! under the lock: it cannot be reaped, and so reused, meanwhile.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a watched process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal number for a signal death (runc's
    /// convention).
    pub status: i32,
    pub at: SystemTime,
}

#[derive(Default)]
struct State {
    /// Watched pids: `None` while running.
    watched: HashMap<i32, Option<Exit>>,
    /// Bumped on every spawn, so a reaper with no children wakes up.
    spawns: u64,
}

#[derive(Default)]
pub struct Reaper {
    spawn: Mutex<()>,
    state: Mutex<State>,
    changed: Condvar,
}

/// `status` in runc's convention; `None` for stops and continues.
pub fn exit_status(ws: WaitStatus) -> Option<(i32, i32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking holder cannot leave the map inconsistent (single
        // inserts/updates), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held while creating processes, and while signalling watched ones.
    pub fn spawn_lock(&self) -> MutexGuard<'_, ()> {
        self.spawn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the exit of `pid` from now on. Call with the spawn lock held,
    /// right after the process was created.
    pub fn watch(&self, pid: i32) {
        let mut st = self.state();
        st.watched.insert(pid, None);
        st.spawns += 1;
        self.changed.notify_all();
    }

    /// Stops tracking `pid` (its container or exec is gone).
    pub fn forget(&self, pid: i32) {
        self.state().watched.remove(&pid);
    }

    /// Whether `pid` is watched and still running. Meaningful for signalling
    /// only with the spawn lock held.
    pub fn running(&self, pid: i32) -> bool {
        matches!(self.state().watched.get(&pid), Some(None))
    }

    /// Waits for `pid` to end; `None` on timeout or if it is not watched.
    pub fn wait(&self, pid: i32, timeout: Option<Duration>) -> Option<Exit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state();
        loop {
            match st.watched.get(&pid) {
                None => return None,
                Some(Some(e)) => return Some(*e),
                Some(None) => {}
            }
            st = match deadline {
                None => self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Reaps forever: watched processes' statuses are kept, orphans' dropped.
    pub fn run(&self) -> ! {
        loop {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::__WALL;
            match waitid(Id::All, flags) {
                Ok(ws) => {
                    if let Some(pid) = ws.pid() {
                        self.reap(pid);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => self.wait_for_spawn(),
                Err(e) => {
                    eprintln!("husk-agent: waitid: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn reap(&self, pid: Pid) {
        let _spawn = self.spawn_lock();
        // Gone already (libcontainer reaped its own helper): nothing to do.
        let Ok(ws) = waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) else {
            return;
        };
        let Some((pid, status)) = exit_status(ws) else {
            return;
        };
        let mut st = self.state();
        if let Some(slot) = st.watched.get_mut(&pid) {
            *slot = Some(Exit {
                status,
                at: SystemTime::now(),
            });
            self.changed.notify_all();
        }
    }

    /// No children: only a spawn of ours can create one (orphans are
    /// descendants, and there are none), so sleep until then.
    fn wait_for_spawn(&self) {
        let st = self.state();
        let seen = st.spawns;
        let _unused = self
            .changed
            .wait_timeout_while(st, Duration::from_secs(5), |s| s.spawns == seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn statuses_follow_runc() {
        let p = Pid::from_raw(7);
        assert_eq!(exit_status(WaitStatus::Exited(p, 3)), Some((7, 3)));
        assert_eq!(
            exit_status(WaitStatus::Signaled(p, nix::sys::signal::SIGKILL, false)),
            Some((7, 137))
        );
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn reaps_watched_children_with_their_status() {
        let r = Arc::new(Reaper::new());
        let bg = r.clone();
        std::thread::spawn(move || bg.run());
        let spawn = |args: &[&str]| {
            let _g = r.spawn_lock();
            // Reaped by the reaper, not by Child::wait.
            #[allow(clippy::zombie_processes)]
            let c = std::process::Command::new("sh").args(args).spawn().unwrap();
            r.watch(c.id() as i32);
            c.id() as i32
        };
        let a = spawn(&["-c", "exit 3"]);
        let b = spawn(&["-c", "kill -TERM $$"]);
        let t = Some(Duration::from_secs(10));
        assert_eq!(r.wait(a, t).map(|e| e.status), Some(3));
        assert_eq!(r.wait(b, t).map(|e| e.status), Some(128 + 15));
        assert!(!r.running(a));
        r.forget(a);
        assert_eq!(r.wait(a, t), None);
    }
}
