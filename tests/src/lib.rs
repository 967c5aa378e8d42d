//! Helpers shared by husk's end-to-end tests and benchmarks: where the built
//! guest artifacts are, whether this host can run a guest, and a guest boot
//! with a console that can be waited on.
//!
//! Every wait has a timeout, and a failed wait reports the last console lines:
//! a guest that hangs (one boot here hung at 100% CPU after the i8042 probe)
//! must fail the test with something to read, not stall CI.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod agent;
pub mod cluster;
pub mod containerd;
pub mod hostile;
mod netns;
pub mod programs;
mod vm;
pub use containerd::Containerd;
pub use netns::NetNs;
pub use vm::{
    husk_agent_binary, husk_cli_binary, husk_shim_binary, husk_vmm_binary, vsock_connect, VmmClient,
};

/// The workspace root (tests/ is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn artifact(env: &str, default: &str, make_target: &str) -> Result<PathBuf> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default));
    if !p.exists() {
        bail!(
            "{} not found (set {env} or run `make {make_target}` first)",
            p.display()
        );
    }
    Ok(p)
}

/// The guest kernel (uncompressed vmlinux, PVH entry).
pub fn guest_kernel() -> Result<PathBuf> {
    artifact("HUSK_KERNEL", "target/guest/vmlinux", "kernel")
}

/// The runtime tests start sandboxes with: this build's VMM, kernel and
/// guest image. Templates go to the usual cache (`HUSK_CACHE`), so a test
/// run boots each template once, and later runs reuse it while its inputs
/// are unchanged; sandbox state goes to a directory of this process.
pub fn runtime() -> Result<husk_runtime::Runtime> {
    let mut rt = husk_runtime::Runtime::new(husk_vmm_binary()?, guest_kernel()?, guest_rootfs()?);
    rt.run_dir = std::env::temp_dir().join(format!("husk-test-{}", std::process::id()));
    Ok(rt)
}

/// The guest root image (read-only erofs).
pub fn guest_rootfs() -> Result<PathBuf> {
    artifact("HUSK_ROOTFS", "target/guest/rootfs.erofs", "guest")
}

/// The static guest init the root image was built from.
pub fn guest_init_binary() -> Result<PathBuf> {
    artifact(
        "HUSK_TEST_INIT",
        "target/x86_64-unknown-linux-gnu/guest/husk-test-init",
        "guest",
    )
}

/// The guest's agent as `make guest` builds it, with the test-only panic
/// requests of its `panic-test` feature.
pub fn guest_agent_panic_test_binary() -> Result<PathBuf> {
    artifact(
        "HUSK_AGENT_PANIC_TEST",
        "target/x86_64-unknown-linux-gnu/guest/husk-agent-panic-test",
        "guest",
    )
}

/// A sample OCI image built by `make images`: `name` is e.g. `busybox.oci.tar`.
pub fn sample_image(name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("HUSK_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/images"));
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found (set HUSK_IMAGES or run `make images` first)",
            p.display()
        );
    }
    Ok(p)
}

/// Why this host cannot run KVM guests, if it cannot. Tests skip (with this
/// reason printed) only when it returns Some.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable: {e}")),
    }
}

/// Why this process cannot do what needs root, if it cannot.
pub fn root_unavailable() -> Option<String> {
    // Reading our own status avoids an unsafe geteuid() call.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    (euid != "0").then(|| format!("needs root (euid is {euid})"))
}

/// Prints why a test is skipped, in a form CI logs make easy to find.
pub fn skip(test: &str, why: &str) {
    println!("SKIP {test}: {why}");
    eprintln!("SKIP {test}: {why}");
}

const KEEP_LINES: usize = 60;

#[derive(Default)]
struct ConsoleState {
    /// Every line so far (guest consoles here are small).
    lines: Vec<String>,
    eof: bool,
}

/// Waits until something listens on the Unix socket `sock` (not just
/// bound: the file appears a moment before listen()); panics after
/// `timeout` naming `what`.
pub fn wait_listening(sock: &Path, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running VMM whose stdout is the guest's serial console.
pub struct Guest {
    child: Child,
    started: Instant,
    console: Arc<(Mutex<ConsoleState>, Condvar)>,
    name: String,
}

impl Guest {
    /// Spawns `cmd` with its stdout captured as the console. Stderr (VMM logs)
    /// is captured into the same line stream, prefixed, so failures show both.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Guest> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let console = Arc::new((Mutex::new(ConsoleState::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let echo = std::env::var_os("HUSK_TEST_ECHO_CONSOLE").is_some();
        for (stream, prefix) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, ""),
            (Box::new(stderr), "[vmm] "),
        ] {
            let console = console.clone();
            let is_stdout = prefix.is_empty();
            std::thread::spawn(move || {
                let reader = BufReader::new(stream);
                for line in reader.split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    if echo {
                        eprintln!("{prefix}{line}");
                    }
                    let (m, cv) = &*console;
                    m.lock().unwrap().lines.push(format!("{prefix}{line}"));
                    cv.notify_all();
                }
                if is_stdout {
                    let (m, cv) = &*console;
                    m.lock().unwrap().eof = true;
                    cv.notify_all();
                }
            });
        }
        Ok(Guest {
            child,
            started,
            console,
            name: name.to_string(),
        })
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the VMM ended, if it has.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The last console lines, for error messages.
    pub fn tail(&self) -> String {
        let st = self.console.0.lock().unwrap();
        let n = st.lines.len();
        let from = n.saturating_sub(KEEP_LINES);
        let lines: VecDeque<&String> = st.lines[from..].iter().collect();
        let mut s = format!(
            "--- last {} console lines of {} ---\n",
            lines.len(),
            self.name
        );
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Panics (with the console tail) if any line so far shows a guest or
    /// VMM failure: a kernel panic, oops, BUG or WARNING, an emulation
    /// failure, a denied system call, a Rust panic; or one of `extra`.
    pub fn assert_no_errors(&self, extra: &[&str]) {
        const ERRORS: &[&str] = &[
            "Kernel panic",
            "Oops",
            "BUG:",
            "WARNING:",
            "KVM internal error",
            "seccomp denied",
            "panicked",
        ];
        let lines = self.lines();
        for bad in ERRORS.iter().chain(extra) {
            if let Some(l) = lines.iter().find(|l| l.contains(bad)) {
                panic!("console shows {bad:?}: {l}\n{}", self.tail());
            }
        }
    }

    /// Panics with `why` and the console tail unless some line so far
    /// contains `needle`.
    pub fn assert_line(&self, needle: &str, why: &str) {
        if !self.lines().iter().any(|l| l.contains(needle)) {
            panic!(
                "{why}: no console line contains {needle:?}\n{}",
                self.tail()
            );
        }
    }

    /// All console lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.console.0.lock().unwrap().lines.clone()
    }

    /// Waits for a console line containing `needle`; returns that line and the
    /// time since spawn. Fails on timeout or when the VMM ends first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<(String, Duration)> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let (m, cv) = &*self.console;
                let st = m.lock().unwrap();
                if let Some(l) = st.lines[seen..].iter().find(|l| l.contains(needle)) {
                    return Ok((l.clone(), self.started.elapsed()));
                }
                seen = st.lines.len();
                if st.eof {
                    drop(st);
                    let status = self.child.wait().ok();
                    bail!(
                        "{} ended before {needle:?} appeared (status {status:?})\n{}",
                        self.name,
                        self.tail()
                    );
                }
                let now = Instant::now();
                if now >= deadline {
                    drop(st);
                    bail!(
                        "timed out after {:.0?} waiting for {needle:?} from {}\n{}",
                        timeout,
                        self.name,
                        self.tail()
                    );
                }
                let _ = cv.wait_timeout(st, deadline - now).unwrap();
            }
        }
    }

    /// Waits for the VMM process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {:.0?}\n{}",
                    self.name,
                    timeout,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses the guest's `/proc/uptime` line printed by husk-test-init.
/// The last `n` bytes of `s` (fewer where that would split a character),
/// for failure messages.
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

pub fn parse_uptime(line: &str) -> Result<f64> {
    let rest = line
        .split("uptime ")
        .nth(1)
        .ok_or_else(|| anyhow!("no uptime in {line:?}"))?;
    rest.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad uptime in {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_lines_and_reports_timeouts_with_the_console() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo one; echo two >&2; sleep 5");
        let mut g = Guest::spawn("sh", cmd).unwrap();
        let (l, _) = g.wait_for_line("one", Duration::from_secs(5)).unwrap();
        assert_eq!(l, "one");
        let err = g
            .wait_for_line("never", Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(err.contains("one"), "console tail missing: {err}");
    }

    #[test]
    fn reports_an_early_exit() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo bye; exit 3");
        let mut g = Guest::spawn("sh", cmd).unwrap();
        let err = g
            .wait_for_line("marker", Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ended before"), "{err}");
        assert!(err.contains("bye"), "{err}");
    }

    #[test]
    fn uptime_parsing() {
        assert_eq!(
            parse_uptime("husk-test-init: uptime 76.54 70.12").unwrap(),
            76.54
        );
        assert!(parse_uptime("husk-test-init: uptime").is_err());
    }
}
