//! Creating container processes from a small, single-threaded process.
//!
//! libcontainer was written for youki's single-threaded command line: it
//! makes a container's processes with a raw `clone3`, which runs none of
//! libc's fork handlers. Called from the agent, whose other threads serve
//! requests, relay streams and reap, each clone copied whatever locks
//! those threads held at that instant (the allocator's among them) into a
//! child that then waited on them forever, or worked on state caught
//! half-changed. In the guest, where every syscall is emulated and slow,
//! those windows are wide: six execs at once hung the agent, or their
//! processes died of SIGSEGV before writing a byte (tests/stream_races.rs).
//! Forking the agent itself per build fixed that but cost ~10–100 s a
//! build there: every page the big agent or the fork touched afterwards was
//! a copy-on-write fault, and those are emulated kernel work.
//!
//! So the agent forks one spawner at startup, before it has any thread
//! and while it is small. The spawner takes build requests over a
//! SOCK_SEQPACKET socketpair (the process's stdio passed with SCM_RIGHTS),
//! forks a builder per request (a copy of a single-threaded, small
//! process) and lets it run libcontainer. The builder answers on the same
//! socket and `_exit`s; the processes it made are then orphans and become
//! the agent's children (PID 1 in the guest, a subreaper on a host), which
//! reaps them as before. Kata's agent, multi-threaded too, creates
//! containers from a fresh process for the same reason.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{fork, ForkResult, Pid};
use serde_json::{json, Value};

use crate::rpc::causes;

/// The largest message either side sends (a request names paths; an
/// answer's error text is cut to fit).
const MESSAGE_MAX: usize = 16 * 1024;

/// What to build: a container's init (`exec` None) or a process in a
/// running container (`exec`: its process JSON file).
pub struct Build {
    pub id: String,
    /// libcontainer's state root.
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub exec: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    /// stdin, stdout, stderr; None for a process with a terminal.
    pub stdio: Option<[OwnedFd; 3]>,
    /// A parked container's init's end of its socket (parked.rs).
    pub parked: Option<OwnedFd>,
    /// Where libcontainer's events go, timed, while the host profiles
    /// (trace.rs).
    pub trace: Option<PathBuf>,
}

/// The agent's end of the spawner.
pub struct Spawner {
    /// One build at a time: the request and its answers pair up.
    sock: Mutex<(OwnedFd, u64)>,
}

/// A build that did not give a pid, on the agent's side of the spawner.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The socket to the spawner, or the fork of it, failed.
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("the spawner is gone")]
    Gone,
    #[error("the builder did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the spawner answered {0:?}")]
    BadAnswer(String),
    /// What the builder (libcontainer) said: text, as it crossed from
    /// another process.
    #[error("{0}")]
    Builder(String),
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> SpawnError {
    move |source| SpawnError::Sys { what, source }
}

/// A request the builder could not carry out (sent to the agent as text).
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("a request without {0}")]
    Missing(&'static str),
    #[error("a request with {0} descriptors")]
    Descriptors(usize),
    #[error("{what}: {message}")]
    Libcontainer { what: &'static str, message: String },
    #[error("{}: {source}", .path.display())]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("libcontainer made the container but its state has no pid (status {status}) and its pid file gives none ({from_file}); state.json: {raw:?}")]
    NoPid {
        status: String,
        from_file: String,
        raw: String,
    },
}

impl Spawner {
    /// Forks the spawner. Call before the agent starts any thread: the
    /// spawner is a copy of this process as it is now.
    pub fn start() -> Result<Self, SpawnError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys("spawner socketpair"))?;
        // SAFETY: called while the process has one thread (see above), so
        // the child may run any code; it never returns from serve().
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(ours);
                serve(theirs)
            }
            Ok(ForkResult::Parent { .. }) => Ok(Self {
                sock: Mutex::new((ours, 0)),
            }),
            Err(e) => Err(sys("forking the spawner")(e)),
        }
    }

    /// Builds `b` and returns the pid of the process made (the container's
    /// init, or the exec'd process). Gives up after `timeout`, killing the
    /// builder. Call with the reaper's spawn lock held: the process becomes
    /// the agent's child when the builder exits, and must be watched before
    /// the reaper may take its status.
    pub fn build(&self, b: Build, timeout: Duration) -> Result<i32, SpawnError> {
        let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 += 1;
        let seq = guard.1;
        let sock = &guard.0;
        let id = b.id.clone();
        let req = json!({
            "seq": seq,
            "id": b.id,
            "root": b.root,
            "bundle": b.bundle,
            "exec": b.exec,
            "console_socket": b.console_socket,
            "trace": b.trace,
            "parked": b.parked.is_some(),
        })
        .to_string();
        let fds: Vec<RawFd> = b
            .stdio
            .iter()
            .flatten()
            .chain(&b.parked)
            .map(|f| f.as_raw_fd())
            .collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let iov = [std::io::IoSlice::new(req.as_bytes())];
        let sent = monotonic_ns();
        sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .map_err(sys("asking the spawner"))?;
        // Sent: the spawner has its own copies; ours close now, so the
        // streams end when the process does.
        drop(b.stdio);
        drop(b.parked);
        let start = Instant::now();
        let deadline = start + timeout;
        let mut builder = None;
        let mut reported = false;
        loop {
            let mut left = deadline.saturating_duration_since(Instant::now());
            if let (Some(p), false) = (builder, reported) {
                // Once, after a while: what a slow build's processes do.
                let silent = start.elapsed();
                if silent >= SILENT_REPORT {
                    reported = true;
                    eprintln!(
                        "husk-agent: builder {p} of {} silent for {:.0} s: {}",
                        id,
                        silent.as_secs_f64(),
                        describe_tree(p)
                    );
                } else {
                    left = left.min(SILENT_REPORT - silent);
                }
            }
            let msg = match recv_until(sock, left) {
                Ok(Some(m)) => m,
                Ok(None) if Instant::now() < deadline => continue,
                r => {
                    if let Some(p) = builder {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                    return Err(r.err().unwrap_or(SpawnError::Timeout(timeout)));
                }
            };
            let Ok(v) = serde_json::from_slice::<Value>(&msg) else {
                return Err(SpawnError::BadAnswer(
                    String::from_utf8_lossy(&msg).into_owned(),
                ));
            };
            // An answer to an earlier build that timed out: not ours.
            if v["seq"].as_u64() != Some(seq) {
                continue;
            }
            if let Some(p) = v["builder"].as_i64() {
                builder = i32::try_from(p).ok();
                continue;
            }
            // The build is over, whichever way: its trace is read (and
            // removed) either way.
            if let Some(t) = &b.trace {
                crate::trace::record(t);
            }
            if let Some(pid) = v["pid"].as_i64() {
                record_parts(sent, &v);
                return i32::try_from(pid).map_err(|_| SpawnError::BadAnswer(format!("pid {pid}")));
            }
            return Err(match v["error"].as_str() {
                Some(e) => SpawnError::Builder(e.to_string()),
                None => SpawnError::BadAnswer("neither a pid nor an error".into()),
            });
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the agent, the spawner
/// and its builders, so a build's parts can be told apart.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A build's parts in the agent's profile, from the builder's timestamps:
/// the spawner's fork of the builder, libcontainer's create (its
/// intermediate and init processes, the container's mounts, cgroup,
/// namespaces), and the answer's way back.
fn record_parts(sent: u64, answer: &Value) {
    let (Some(forked), Some(built)) = (answer["forked_ns"].as_u64(), answer["built_ns"].as_u64())
    else {
        return;
    };
    let now = monotonic_ns();
    let us = |a: u64, b: u64| b.saturating_sub(a) / 1000;
    let p = &crate::profile::PROFILE;
    p.record("build.fork-builder", us(sent, forked));
    p.record("build.libcontainer", us(forked, built));
    p.record("build.answer", us(built, now));
}

impl Spawner {
    /// One fork+exec of `args` in `root` outside any container (see
    /// `bare_exec`): its status and fork-to-reaped time in microseconds.
    pub fn bare(
        &self,
        root: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<(i32, u64), SpawnError> {
        let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 += 1;
        let seq = guard.1;
        let sock = &guard.0;
        let timeout = timeout.min(BARE_MAX);
        let req = json!({
            "seq": seq,
            "bare": {"root": root, "args": args, "timeout_ms": timeout.as_millis() as u64},
        })
        .to_string();
        let iov = [std::io::IoSlice::new(req.as_bytes())];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), None)
            .map_err(sys("asking the spawner"))?;
        // The spawner kills the process at `timeout`; a little more for
        // its answer.
        let deadline = Instant::now() + timeout + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = recv_until(sock, left)? else {
                return Err(SpawnError::Timeout(timeout));
            };
            let v: Value = serde_json::from_slice(&msg)
                .map_err(|_| SpawnError::BadAnswer(String::from_utf8_lossy(&msg).into_owned()))?;
            if v["seq"].as_u64() != Some(seq) {
                continue;
            }
            if let (Some(st), Some(us)) = (v["status"].as_i64(), v["micros"].as_u64()) {
                return Ok((st as i32, us));
            }
            return Err(match v["error"].as_str() {
                Some(e) => SpawnError::Builder(e.to_string()),
                None => SpawnError::BadAnswer("neither a status nor an error".into()),
            });
        }
    }
}

/// How long a build may be silent before what its processes are doing is
/// reported on the console.
const SILENT_REPORT: Duration = Duration::from_secs(20);

/// One line per process of the tree under `pid`: its state, wait channel
/// and system call (what a hung build waits on).
fn describe_tree(pid: i32) -> String {
    let read = |p: i32, f: &str| {
        std::fs::read_to_string(format!("/proc/{p}/{f}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("({e})"))
    };
    let mut out = String::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let state = stat_after_comm(p).and_then(|r| r.chars().next());
        out.push_str(&format!(
            "[{p} {} state {} wchan {} syscall {}] ",
            read(p, "comm"),
            state.unwrap_or('?'),
            read(p, "wchan"),
            read(p, "syscall")
        ));
        todo.extend(children_of(p));
        if out.len() > 2000 {
            break;
        }
    }
    out
}

/// The pids whose parent is `pid` (/proc/PID/stat's fourth field).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            stat_after_comm(*p).and_then(|rest| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

/// /proc/PID/stat after the command name (which may hold spaces and
/// parentheses): the state, then the parent's pid, ….
fn stat_after_comm(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(s.rsplit_once(") ")?.1.to_string())
}

/// The next message; None if none came within `left`.
fn recv_until(sock: &OwnedFd, left: Duration) -> Result<Option<Vec<u8>>, SpawnError> {
    let deadline = Instant::now() + left;
    loop {
        let ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(10_000);
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms as u16)) {
            Ok(0) if Instant::now() >= deadline => return Ok(None),
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(sys("waiting for the spawner")(e)),
        }
        let mut buf = vec![0u8; MESSAGE_MAX];
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, MsgFlags::MSG_DONTWAIT) {
            Ok(m) if m.bytes == 0 => return Err(SpawnError::Gone),
            Ok(m) => {
                let n = m.bytes;
                return Ok(Some(buf[..n].to_vec()));
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys("reading the spawner's answer")(e)),
        }
    }
}

/// Sends one message, cut to MESSAGE_MAX.
fn send(sock: &OwnedFd, v: &Value) {
    let mut s = v.to_string();
    if s.len() > MESSAGE_MAX {
        // Cut the error text, keep the message JSON.
        let err: String = v["error"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(4000)
            .collect();
        s = json!({"seq": v["seq"], "error": err}).to_string();
    }
    let iov = [std::io::IoSlice::new(s.as_bytes())];
    if let Err(e) = sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), None) {
        eprintln!("husk-agent spawner: answering: {e}");
    }
}

/// The spawner: one request at a time, each built in a forked builder.
fn serve(sock: OwnedFd) -> ! {
    // On a host the agent can be killed; its spawner goes with it.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    loop {
        let (msg, fds) = match receive(sock.as_raw_fd(), MESSAGE_MAX) {
            Ok(Some(m)) => m,
            // The agent closed its end: nothing more to build.
            Ok(None) => unsafe_exit(0),
            Err(e) => {
                eprintln!("husk-agent spawner: reading a request: {e}");
                continue;
            }
        };
        let req: Value = serde_json::from_slice(&msg).unwrap_or(Value::Null);
        let seq = req["seq"].clone();
        if req.get("bare").is_some() {
            drop(fds);
            let answer = match bare_exec(&req["bare"]) {
                Ok((status, micros)) => json!({"seq": seq, "status": status, "micros": micros}),
                Err(e) => json!({"seq": seq, "error": e}),
            };
            send(&sock, &answer);
            continue;
        }
        // SAFETY: the spawner is single-threaded; the builder runs build()
        // and `_exit`s.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let forked = monotonic_ns();
                let answer = match build(&req, fds) {
                    Ok(pid) => json!({
                        "seq": seq,
                        "pid": pid,
                        "forked_ns": forked,
                        "built_ns": monotonic_ns(),
                    }),
                    Err(e) => json!({"seq": seq, "error": e.to_string()}),
                };
                send(&sock, &answer);
                unsafe_exit(0)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(fds);
                send(&sock, &json!({"seq": seq, "builder": child.as_raw()}));
                while let Err(Errno::EINTR) = waitpid(child, Some(WaitPidFlag::__WALL)) {}
            }
            Err(e) => send(&sock, &json!({"seq": seq, "error": format!("fork: {e}")})),
        }
    }
}

/// A bare exec's $PATH (Docker's default).
pub const BARE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Longest a bare exec may run before it is killed (the spawner waits for
/// it, and builds wait for the spawner).
pub const BARE_MAX: Duration = Duration::from_secs(60);

/// In the spawner: one fork+exec of `args` chrooted into `root`, stdio on
/// /dev/null, waited for (killed after `timeout_ms`, at most BARE_MAX).
/// Returns its status (runc's convention) and the time from fork to reaped.
fn bare_exec(v: &Value) -> Result<(i32, u64), String> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let root = v["root"].as_str().ok_or("a bare exec without a root")?;
    let root = std::ffi::CString::new(root).map_err(|_| "a root with a NUL byte")?;
    let args: Vec<&str> = v["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let (prog, rest) = args.split_first().ok_or("a bare exec without args")?;
    let timeout = Duration::from_millis(v["timeout_ms"].as_u64().unwrap_or(0)).min(BARE_MAX);
    let mut cmd = std::process::Command::new(prog);
    cmd.args(rest)
        .env_clear()
        .env("PATH", BARE_PATH)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: runs in the forked child before exec: chroot and chdir are
    // async-signal-safe system calls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{prog}: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = t + timeout;
    // A poll on a pidfd: no waking up to look (polling is guest-kernel
    // work, which this measures). Without a pidfd, a look every 10 ms.
    // Either way the process is killed at the deadline: the spawner must
    // not wait for ever (every build waits for it).
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    // SAFETY: a descriptor the kernel just gave us, when it gave one.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        let ended = match &pidfd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
            }
            None => {
                std::thread::sleep(left.min(Duration::from_millis(10)));
                matches!(child.try_wait(), Ok(Some(_)) | Err(_))
            }
        };
        if ended {
            break;
        }
    }
    let st = child
        .wait()
        .map_err(|e| format!("waiting for {prog}: {e}"))?;
    let micros = t.elapsed().as_micros() as u64;
    let status = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
    Ok((status, micros))
}

fn unsafe_exit(code: i32) -> ! {
    // SAFETY: ends this process at once: no atexit handlers, no
    // destructors of what it copied from the agent.
    unsafe { libc::_exit(code) }
}

/// A message's bytes and the descriptors that came with it.
type Message = (Vec<u8>, Vec<OwnedFd>);

/// One message of at most `max` bytes on SOCK_SEQPACKET `sock` and the
/// descriptors that came with it (at most 4, close-on-exec); None at EOF.
/// A longer message is EMSGSIZE. The spawner's requests, a parked
/// container's launch (containers/parked.rs).
pub(crate) fn receive(sock: RawFd, max: usize) -> Result<Option<Message>, Errno> {
    // One byte more than a message may be: a longer one is seen cut.
    let mut buf = vec![0u8; max + 1];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let m = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    for c in m.cmsgs()? {
        if let ControlMessageOwned::ScmRights(rs) = c {
            // SAFETY: descriptors the kernel just installed for us.
            fds.extend(rs.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let n = m.bytes;
    if n == 0 {
        return Ok(None);
    }
    if n > max || m.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(Errno::EMSGSIZE);
    }
    Ok(Some((buf[..n].to_vec(), fds)))
}

/// In the builder: libcontainer makes the process; returns its pid.
fn build(req: &Value, mut fds: Vec<OwnedFd>) -> Result<i32, BuildError> {
    // The parked socket comes last, after the stdio; it stays open here
    // until the init (which inherits it) exists.
    let parked = match req["parked"].as_bool() {
        Some(true) => Some(fds.pop().ok_or(BuildError::Missing("a parked socket"))?),
        _ => None,
    };
    let text = |k: &str| req[k].as_str().map(str::to_string);
    let path = |k: &str| req[k].as_str().map(PathBuf::from);
    let id = text("id").ok_or(BuildError::Missing("an id"))?;
    let root = path("root").ok_or(BuildError::Missing("a state root"))?;
    let bundle = path("bundle").ok_or(BuildError::Missing("a bundle"))?;
    if let Some(t) = path("trace") {
        crate::trace::install(&t);
    }
    let base = ContainerBuilder::new(id, SyscallType::Linux);
    let base = match <[OwnedFd; 3]>::try_from(fds) {
        Ok([stdin, stdout, stderr]) => base
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr),
        Err(v) if v.is_empty() => base,
        Err(v) => return Err(BuildError::Descriptors(v.len())),
    };
    let base = match &parked {
        Some(s) => base.with_executor(crate::containers::ParkedExecutor {
            sock: s.as_raw_fd(),
        }),
        None => base,
    };
    let base = base
        .with_root_path(root)
        .map_err(|e| libcontainer("libcontainer root", &e))?
        .with_console_socket(path("console_socket"));
    // libcontainer's main process writes the init's pid here as soon as
    // it has it, apart from the container's state file (see init_pid).
    let pid_file = bundle.join(format!("{}.pid", req["seq"].as_u64().unwrap_or(0)));
    match path("exec") {
        None => base
            .with_pid_file(Some(&pid_file))
            .map_err(|e| libcontainer("pid file", &e))?
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| libcontainer("creating the container", &e))
            .and_then(|c| init_pid(c, &pid_file)),
        Some(process) => base
            .as_tenant()
            .with_detach(true)
            .with_process(Some(process))
            .build()
            .map(|pid| pid.as_raw())
            .map_err(|e| libcontainer("creating the process", &e)),
    }
}

fn libcontainer(what: &'static str, e: &dyn std::error::Error) -> BuildError {
    BuildError::Libcontainer {
        what,
        message: causes(e),
    }
}

/// The init's pid from the state libcontainer left. Seen in the guest
/// (the cause is not found yet): a state of status Created without the
/// pid the same call wrote with it. Then the pid comes from the pid file
/// (written from the same value), the state is mended if it can be, and
/// the console says what was found.
fn init_pid(mut c: Container, pid_file: &Path) -> Result<i32, BuildError> {
    let from_file = std::fs::read_to_string(pid_file)
        .map_err(|source| BuildError::PidFile {
            path: pid_file.to_path_buf(),
            source,
        })
        .map_err(|e| e.to_string())
        .and_then(|t| t.trim().parse::<i32>().map_err(|e| format!("{t:?}: {e}")));
    let _ = std::fs::remove_file(pid_file);
    if let Some(p) = c.pid() {
        return Ok(p.as_raw());
    }
    let status = c.status();
    // The file as it is: a damaged "pid" key parses (unknown keys are
    // ignored) to exactly this; a clean one points at another writer.
    let raw = std::fs::read(c.root.join("state.json"))
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(1024)]).into_owned())
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    match from_file {
        Ok(pid) if pid > 0 => {
            // Seen in the guest: the returned container's root is empty
            // (its state read relative to the cwd), so the mend may fail;
            // the pid file's pid stands either way.
            let mended = c.set_pid(pid).save().map_err(|e| causes(&e));
            eprintln!(
                "husk-agent: libcontainer's state of {} (root {:?}) had no pid after create \
                 (status {status:?}); {pid} from its pid file; state.json: {raw:?}; mended: {mended:?}",
                c.id(),
                c.root
            );
            Ok(pid)
        }
        r => Err(BuildError::NoPid {
            status: format!("{status:?}"),
            from_file: format!("{r:?}"),
            raw,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_less_request_fails_with_the_reason() {
        // A builder given nonsense answers with an error; nothing panics.
        let e = build(&json!({"seq": 1}), Vec::new()).unwrap_err();
        assert!(matches!(e, BuildError::Missing("an id")), "{e}");
        let (a, _b) = nix::unistd::pipe().unwrap();
        let e = build(&json!({"id": "x", "root": "/r", "bundle": "/b"}), vec![a]).unwrap_err();
        assert!(matches!(e, BuildError::Descriptors(1)), "{e}");
    }
}
