//! Where the guest's time goes: each step of the agent's work (a
//! container's create and its parts, start, its process's run, remove;
//! CreateSandbox) is timed, and, once the host asks (Profile with `count`),
//! the guest's work in it is counted from /proc: processes created,
//! context switches, page faults (where the kernel keeps event counters;
//! husk's guest kernel does not). The host reads and clears the steps with
//! Profile (bench/run prints them).
//!
//! Timing is a clock read per step and always on. Counting reads
//! /proc/stat and /proc/vmstat twice per step: hundreds of lines formatted
//! by the guest kernel, which on an emulated kernel is milliseconds of
//! work itself, so it is off until asked for. The counters are guest-wide:
//! steps that overlap count each other's work.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use husk_protocol::agent::{ProfileResponse, Step};

/// Steps kept between two Profile calls; older ones are dropped (and
/// counted), so a host that never asks costs a bounded amount of memory.
pub const MAX_STEPS: usize = 256;

/// Longest step name kept (names are the agent's own, plus ids).
const MAX_NAME: usize = 128;

struct State {
    count: bool,
    steps: VecDeque<Step>,
    dropped: u32,
}

/// The agent's record of steps.
pub struct Profile {
    state: Mutex<State>,
}

/// The whole agent's profile.
pub static PROFILE: Profile = Profile {
    state: Mutex::new(State {
        count: false,
        steps: VecDeque::new(),
        dropped: 0,
    }),
};

/// Guest-wide counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub forks: u64,
    pub context_switches: u64,
    /// None where the kernel keeps no event counters.
    pub page_faults: Option<u64>,
}

impl Counters {
    /// Now, from /proc; None if /proc cannot be read.
    pub fn read() -> Option<Counters> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        Counters::parse(&stat, &vmstat)
    }

    /// From the texts of /proc/stat and /proc/vmstat.
    pub fn parse(stat: &str, vmstat: &str) -> Option<Counters> {
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some(Counters {
            forks: field(stat, "processes")?,
            context_switches: field(stat, "ctxt")?,
            page_faults: field(vmstat, "pgfault"),
        })
    }
}

/// Cuts a step's name to MAX_NAME bytes, on a character boundary.
fn cut(name: &mut String) {
    if name.len() > MAX_NAME {
        let mut at = MAX_NAME;
        while !name.is_char_boundary(at) {
            at -= 1;
        }
        name.truncate(at);
    }
}

/// A step under way; recorded when dropped (or `end`ed).
pub struct Running<'a> {
    profile: &'a Profile,
    name: String,
    start: Instant,
    at: Option<Counters>,
}

impl Profile {
    /// Starts timing step `name`.
    pub fn step(&self, name: impl Into<String>) -> Running<'_> {
        let count = self.lock().count;
        let mut name = name.into();
        cut(&mut name);
        Running {
            profile: self,
            name,
            start: Instant::now(),
            at: if count { Counters::read() } else { None },
        }
    }

    /// Whether the host asked for guest work to be counted (and builds
    /// traced, trace.rs).
    pub fn counting(&self) -> bool {
        self.lock().count
    }

    /// Records a step timed elsewhere (the spawner's parts of a build).
    pub fn record(&self, name: &str, micros: u64) {
        let mut s = Step::new();
        s.name = name.to_string();
        cut(&mut s.name);
        s.micros = micros;
        self.push(s);
    }

    /// The steps so far (cleared), and from now on counting or not.
    pub fn take(&self, count: bool) -> ProfileResponse {
        let mut st = self.lock();
        st.count = count;
        let mut r = ProfileResponse::new();
        r.steps = st.steps.drain(..).collect();
        r.dropped = std::mem::take(&mut st.dropped);
        r
    }

    fn push(&self, s: Step) {
        let mut st = self.lock();
        if st.steps.len() >= MAX_STEPS {
            st.steps.pop_front();
            st.dropped = st.dropped.saturating_add(1);
        }
        st.steps.push_back(s);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Running<'_> {
    /// Ends the step now.
    pub fn end(self) {}
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut s = Step::new();
        s.name = std::mem::take(&mut self.name);
        s.micros = self.start.elapsed().as_micros() as u64;
        if let (Some(a), Some(b)) = (self.at, self.at.and_then(|_| Counters::read())) {
            s.counted = true;
            s.forks = b.forks.saturating_sub(a.forks);
            s.context_switches = b.context_switches.saturating_sub(a.context_switches);
            if let (Some(x), Some(y)) = (a.page_faults, b.page_faults) {
                s.page_faults = y.saturating_sub(x);
                s.page_faults_counted = true;
            }
        }
        self.profile.push(s);
    }
}

/// Starts timing step `name` in the agent's profile.
pub fn step(name: impl Into<String>) -> Running<'static> {
    PROFILE.step(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_proc_texts() {
        let stat = "cpu  1 2 3\nctxt 5000\nbtime 1\nprocesses 42\nprocs_running 1\n";
        let vmstat = "nr_free_pages 10\npgfault 777\npgmajfault 3\n";
        assert_eq!(
            Counters::parse(stat, vmstat),
            Some(Counters {
                forks: 42,
                context_switches: 5000,
                page_faults: Some(777)
            })
        );
        // A missing line is no counter, not a zero.
        assert_eq!(Counters::parse("ctxt 1\n", vmstat), None);
        assert_eq!(
            Counters::parse(stat, "pgfaults 1\n").map(|c| c.page_faults),
            Some(None)
        );
    }

    #[test]
    fn steps_are_bounded_and_taken_once() {
        let p = Profile {
            state: Mutex::new(State {
                count: false,
                steps: VecDeque::new(),
                dropped: 0,
            }),
        };
        for i in 0..MAX_STEPS + 5 {
            p.step(format!("s{i}")).end();
        }
        p.step("x".repeat(1000)).end();
        let r = p.take(true);
        assert_eq!(r.steps.len(), MAX_STEPS);
        assert_eq!(r.dropped, 6);
        assert_eq!(r.steps.last().unwrap().name.len(), MAX_NAME);
        assert!(!r.steps[0].counted);
        // Counting now (on a host /proc has the same lines).
        p.step("counted").end();
        let r = p.take(false);
        assert_eq!(r.steps.len(), 1);
        assert!(r.steps[0].counted, "{:?}", r.steps[0]);
        assert!(r.steps[0].page_faults < 1 << 40);
        assert_eq!(
            r.steps[0].page_faults_counted,
            Counters::read().unwrap().page_faults.is_some()
        );
        assert_eq!(p.take(false).steps.len(), 0);
    }
}
