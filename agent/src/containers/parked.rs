//! Parked containers: created with everything the spec asks for applied
//! (namespaces, mounts, cgroup, user, capabilities, cwd), their init
//! waiting for its process. LaunchContainer gives it the args, the
//! environment and the stdio, and starts it (or, with `hold`, leaves it
//! created for StartContainer).
//!
//! Why: creating a container is most of a start in a guest whose kernel is
//! emulated (~4.4 s of libcontainer's create against ~0.2 s of start,
//! docs/warm-starts.md). A VM snapshotted with its container parked
//! restores to a container that only has to exec (container-ready
//! templates).
//!
//! How: libcontainer's init does all of its setup before it waits for
//! "start", then runs its executor. A parked container is started as soon
//! as it is made, before its template's snapshot, so its init is already
//! in its executor, `ParkedExecutor`: it reads one message from a socket
//! whose other end the agent holds (the args and environment as JSON, the
//! path of the program, the three stdio descriptors with SCM_RIGHTS), puts
//! the descriptors on 0-2 and execs. The socket is close-on-exec, so the
//! exec closes the init's end. A launch is then one message: nothing of
//! libcontainer's start is left for it. The program is looked up by the
//! agent in the parked container's root (before the snapshot, for the
//! names the template was warmed for), so a missing or non-executable one
//! is refused with Docker's 127/126 details as at create, and the init
//! execs that file once instead of trying each $PATH entry.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc;

use husk_protocol::agent::{Empty, LaunchContainerRequest};
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use nix::errno::Errno;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use oci_spec::runtime::Spec;
use serde_json::{json, Value};
use ttrpc::Code;

use super::{lock, stdio_names, valid_id, ContainersService, Invalid, ProcStdio};
use crate::rpc::{check_version, internal, status, Metadata};

/// The most bytes of args and environment a launch carries (one
/// SOCK_SEQPACKET message; the default socket buffer holds ~200 KiB). A
/// caller with more creates the container the usual way.
pub const MAX_LAUNCH: usize = husk_protocol::MAX_LAUNCH_BYTES;

/// What a LaunchContainer must be before anything is done for it.
pub fn check_launch(req: &LaunchContainerRequest) -> Result<(), Invalid> {
    if !valid_id(&req.container_id) {
        return Err(Invalid(format!(
            "container_id {:?} is not valid",
            req.container_id
        )));
    }
    if !req.new_id.is_empty() && !valid_id(&req.new_id) {
        return Err(Invalid(format!(
            "new_id {:?}: 1-128 of [A-Za-z0-9_+-.], not '.' or '..'",
            req.new_id
        )));
    }
    if req.args.first().is_none_or(String::is_empty) {
        return Err(Invalid("args: give the program as args[0]".into()));
    }
    if let Some(a) = req.args.iter().find(|a| a.contains('\0')) {
        return Err(Invalid(format!("arg {:?} holds a NUL byte", cut(a))));
    }
    for e in &req.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() && !e.contains('\0') => {}
            _ => {
                return Err(Invalid(format!(
                    "env {:?}: KEY=VALUE with a non-empty key and no NUL byte",
                    cut(e)
                )))
            }
        }
    }
    let bytes = message(req, None).len();
    if bytes > MAX_LAUNCH {
        return Err(Invalid(format!(
            "args and env encode to {bytes} bytes: a launch carries at most {MAX_LAUNCH}"
        )));
    }
    if !req.hostname.is_empty() && !crate::sandbox::valid_hostname(&req.hostname) {
        return Err(Invalid(format!(
            "hostname {:?} is not a valid host name",
            cut(&req.hostname)
        )));
    }
    stdio_names(&req.stdio.clone().unwrap_or_default(), false)
}

/// The most bytes of a message to the init: a launch and its program's
/// path (a resolved path is at most PATH_MAX, escaped at most six times).
const MAX_MESSAGE: usize = MAX_LAUNCH + 6 * 4096 + 16;

/// What the parked init receives besides its stdio: the args and the
/// environment, and the program's container path when the agent found it
/// (else the init looks it up in $PATH).
fn message(req: &LaunchContainerRequest, path: Option<&Path>) -> String {
    let path = path.and_then(Path::to_str);
    match path {
        Some(p) => json!({"args": req.args, "env": req.env, "path": p}),
        None => json!({"args": req.args, "env": req.env}),
    }
    .to_string()
}

/// A launch given with `hold`: sent by StartContainer.
pub(super) struct HeldLaunch {
    sock: OwnedFd,
    message: String,
    stdio: ProcStdio,
}

fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The agent's end and the init's end of a parked container's socket.
pub(super) fn socket() -> ttrpc::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| internal(format!("a parked container's socket: {e}")))
}

/// The message to the parked init, with the stdio as SCM_RIGHTS.
fn send(sock: &OwnedFd, msg: &str, stdio: &ProcStdio) -> ttrpc::Result<()> {
    let fds = [
        stdio.stdin.as_raw_fd(),
        stdio.stdout.as_raw_fd(),
        stdio.stderr.as_raw_fd(),
    ];
    let iov = [std::io::IoSlice::new(msg.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            // The init died while parked (or was killed): its end is closed.
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    "the parked container's init is gone",
                ))
            }
            Err(e) => return Err(internal(format!("sending the process to its init: {e}"))),
            Ok(_) => return Ok(()),
        }
    }
}

/// `pid`'s UTS namespace, refused when it is the agent's: that name is the
/// sandbox's, set by StartSandbox.
fn uts_namespace_of(pid: i32) -> ttrpc::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let ns = format!("/proc/{pid}/ns/uts");
    let theirs = std::fs::metadata(&ns).map_err(|e| internal(format!("{ns}: {e}")))?;
    let ours = std::fs::metadata("/proc/self/ns/uts")
        .map_err(|e| internal(format!("/proc/self/ns/uts: {e}")))?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(status(
            Code::FAILED_PRECONDITION,
            "the container shares the sandbox's UTS namespace: its host name is the sandbox's",
        ));
    }
    std::fs::File::open(&ns).map_err(|e| internal(format!("{ns}: {e}")))
}

/// What a namer is asked: a host name, and where to answer.
type Naming = (String, mpsc::SyncSender<Result<(), String>>);

/// A thread of the agent's in a parked container's UTS namespace, made
/// when the container is parked (before its template's snapshot) and kept
/// until its launch, which has it set the run's host name: one
/// sethostname then, where a thread made at the launch to join the
/// namespace cost ~0.7 s of emulated guest time (its clone, stack and
/// setns). The agent's other threads keep their namespace. The thread
/// ends when its namer is dropped.
pub(super) struct Namer {
    ask: mpsc::SyncSender<Naming>,
}

impl Namer {
    /// A thread that joins `pid`'s UTS namespace and waits to name it.
    pub(super) fn join(pid: i32) -> ttrpc::Result<Namer> {
        let file = uts_namespace_of(pid)?;
        let (ask, asked) = mpsc::sync_channel::<Naming>(1);
        let (joined_tx, joined) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("namer".into())
            .spawn(move || {
                let r = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWUTS)
                    .map_err(|e| format!("joining its UTS namespace: {e}"));
                drop(file);
                let ok = r.is_ok();
                let _ = joined_tx.send(r);
                if !ok {
                    return;
                }
                for (name, answer) in asked {
                    let r =
                        nix::unistd::sethostname(&name).map_err(|e| format!("sethostname: {e}"));
                    let _ = answer.send(r);
                }
            })
            .map_err(|e| internal(format!("a thread for the host name: {e}")))?;
        match joined.recv() {
            Ok(Ok(())) => Ok(Namer { ask }),
            Ok(Err(e)) => Err(internal(format!("the container's host name: {e}"))),
            Err(_) => Err(internal("the host name's thread ended")),
        }
    }

    fn name(&self, name: &str) -> ttrpc::Result<()> {
        let (answer, answered) = mpsc::sync_channel(1);
        self.ask
            .send((name.to_string(), answer))
            .map_err(|_| internal("the host name's thread ended"))?;
        answered
            .recv()
            .map_err(|_| internal("the host name's thread ended"))?
            .map_err(|e| internal(format!("the container's host name: {e}")))
    }
}

/// Sets `name` as the host name of `pid`'s UTS namespace, from a thread
/// made for it (a container parked without a namer).
fn set_hostname_of(pid: i32, name: &str) -> ttrpc::Result<()> {
    Namer::join(pid)?.name(name)
}

impl ContainersService {
    pub fn launch_container(
        &self,
        meta: &Metadata,
        req: LaunchContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        check_launch(&req)?;
        let renamed = !req.new_id.is_empty() && req.new_id != req.container_id;
        // A rename is checked and done under the create lock, so no create
        // takes the new id meanwhile.
        let _one = renamed.then(|| lock(&self.creating));
        if renamed && lock(&self.containers).contains_key(&req.new_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {:?} exists", req.new_id),
            ));
        }
        let arc = self.get(&req.container_id)?;
        let mut c = lock(&arc);
        c.may_start(&req.container_id, true)?;
        // Its /proc entry is used below: the pid must still be its init.
        if !self.reaper.running(c.init.pid) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("the parked container {:?} has exited", req.container_id),
            ));
        }
        if c.parked.is_none() {
            return Err(internal("a parked container without its socket"));
        }
        let step = crate::profile::step("launch");
        let part = crate::profile::step("launch.lookup");
        // The program: where the template's lookup found it, else looked
        // up now in the root the init already has.
        let known = (c.looked_up.as_ref()).and_then(|l| l.get(&req.args, &req.env));
        let path = match known {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let mut process = oci_spec::runtime::Process::default();
                process.set_args(Some(req.args.clone()));
                process.set_env(Some(req.env.clone()));
                process.set_cwd(c.cwd.clone());
                let scope = crate::executable::Scope::Running {
                    init_pid: c.init.pid,
                };
                crate::executable::check(&scope, &process)?
            }
        };
        part.end();
        // The streams first: a launch whose streams never come fails here,
        // before the container's host name is changed.
        let part = crate::profile::step("launch.stdio");
        let stdio = ProcStdio::claim(&self.streams, &req.stdio.clone().unwrap_or_default())?;
        let stdin = stdio.stdin_handle();
        part.end();
        if !req.hostname.is_empty() {
            let _part = crate::profile::step("launch.hostname");
            // Used once: a launch that fails after this leaves the
            // container parked, and a later one makes its own thread.
            match c.namer.take() {
                Some(n) => n.name(&req.hostname)?,
                None => set_hostname_of(c.init.pid, &req.hostname)?,
            }
        }
        let mut message = message(&req, path.as_deref());
        if message.len() > MAX_MESSAGE {
            // A path that long: the init looks the program up itself.
            message = self::message(&req, None);
        }
        let Some(sock) = c.parked.take() else {
            return Err(internal("a parked container without its socket"));
        };
        let held = HeldLaunch {
            sock,
            message,
            stdio,
        };
        if req.hold {
            c.held_launch = Some(held);
        } else if let Err((e, held)) = c.send_launch(held) {
            // Still parked: a later launch may send again.
            c.parked = Some(held.sock);
            return Err(e);
        }
        c.init.stdin = stdin;
        step.end();
        if renamed {
            // Under the container's lock: a RemoveContainer of the first id
            // waiting for it then finds the id gone (remove checks).
            self.rename(&req.container_id, &req.new_id, &arc);
        }
        Ok(Empty::new())
    }

    /// Files container `arc` under `new` instead of `old` (its OOM watch
    /// too). The caller holds the create lock and checked `new` is free.
    fn rename(&self, old: &str, new: &str, arc: &std::sync::Arc<std::sync::Mutex<super::Ctr>>) {
        let mut all = lock(&self.containers);
        if !all.get(old).is_some_and(|a| std::sync::Arc::ptr_eq(a, arc)) {
            return;
        }
        all.remove(old);
        all.insert(new.to_string(), arc.clone());
        drop(all);
        lock(&self.renamed).insert(old.to_string());
        for (cid, ..) in lock(&self.oom).watched.values_mut() {
            if cid == old {
                *cid = new.to_string();
            }
        }
    }
}

impl super::Ctr {
    /// Gives a parked container's init its process: it execs at once (it
    /// was started before its snapshot). The container is started from here.
    /// Not sent: the error, and the launch back.
    pub(super) fn send_launch(
        &mut self,
        held: HeldLaunch,
    ) -> Result<(), (ttrpc::Error, HeldLaunch)> {
        let _part = crate::profile::step("launch.send");
        if let Err(e) = send(&held.sock, &held.message, &held.stdio) {
            return Err((e, held));
        }
        // Sent: the init has its own copies of the stdio, and the message
        // is queued for it, so our end of the socket can go.
        drop(held);
        self.namer = None;
        self.mark_started();
        Ok(())
    }
}

/// The executor of a parked container's init (it runs there, after
/// libcontainer's setup and its wait for "start").
#[derive(Clone)]
pub struct ParkedExecutor {
    /// The init's end of the socket (inherited through the clones; closed
    /// by the exec).
    pub sock: RawFd,
}

impl Executor for ParkedExecutor {
    fn validate(&self, _: &Spec) -> Result<(), ExecutorValidationError> {
        // The spec's args are a placeholder; the launch's are checked by
        // the agent before it sends them.
        Ok(())
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        // Only HOME is kept (what libcontainer found for the user when the
        // spec had none): the launch's environment replaces the rest.
        let home = envs.get("HOME").cloned().unwrap_or_default();
        replace_environ(&[format!("HOME={home}")]);
        Ok(())
    }

    fn exec(&self, _: &Spec) -> Result<(), ExecutorError> {
        let Launch {
            args,
            env,
            path,
            fds,
        } = receive(self.sock).map_err(ExecutorError::Other)?;
        for (target, fd) in fds.iter().enumerate() {
            // Received descriptors are above 2: 0-2 are open (the parked
            // init's /dev/null), so none is overwritten before it is used.
            nix::unistd::dup2(fd.as_raw_fd(), target as RawFd)
                .map_err(|e| ExecutorError::Other(format!("stdio {target}: {e}")))?;
        }
        drop(fds);
        // libcontainer's rule: HOME from the user's passwd entry when the
        // environment has none (or an empty one).
        let found = std::env::var("HOME").ok().filter(|h| !h.is_empty());
        replace_environ(&env);
        let has_home = std::env::var_os("HOME").is_some_and(|h| !h.is_empty());
        if let (false, Some(h)) = (has_home, found) {
            // SAFETY: the container's init is single-threaded (a clone
            // of the single-threaded builder).
            unsafe { std::env::set_var("HOME", h) };
        }
        let c: Result<Vec<std::ffi::CString>, _> = args
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()))
            .collect();
        let c = c.map_err(|_| ExecutorError::Other("an arg with a NUL byte".into()))?;
        let Some(prog) = c.first() else {
            return Err(ExecutorError::Other("no args".into()));
        };
        // The agent's lookup found the program: exec that file once, as
        // runc does, rather than trying each $PATH entry again.
        let path = path
            .map(std::ffi::CString::new)
            .transpose()
            .map_err(|_| ExecutorError::Other("a path with a NUL byte".into()))?;
        let Err(e) = match &path {
            // A file that is no executable format (a script without
            // `#!`): execvp runs it with /bin/sh, as a container created
            // the usual way does (libcontainer's executor execvp's too).
            Some(p) => match nix::unistd::execv(p, &c) {
                Err(Errno::ENOEXEC) => nix::unistd::execvp(prog, &c),
                r => r,
            },
            None => nix::unistd::execvp(prog, &c),
        };
        // On the container's stderr: the agent's lookup passed, so the
        // program changed since, or its interpreter is missing.
        eprintln!("husk: exec {:?}: {e}", args[0]);
        Err(ExecutorError::Other(format!("exec {:?}: {e}", args[0])))
    }
}

/// Replaces the process's environment with `env` (KEY=VALUE; entries that
/// are not are skipped: set_var would panic on them).
fn replace_environ(env: &[String]) {
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        // SAFETY: the container's init is single-threaded (see above).
        unsafe { std::env::remove_var(k) };
    }
    for e in env {
        if let Some((k, v)) = e.split_once('=') {
            if !k.is_empty() && !e.contains('\0') {
                // SAFETY: as above.
                unsafe { std::env::set_var(k, v) };
            }
        }
    }
}

/// A launch as the init receives it.
struct Launch {
    args: Vec<String>,
    env: Vec<String>,
    /// The program's container path, when the agent found it.
    path: Option<String>,
    fds: Vec<OwnedFd>,
}

/// The launch message, blocking until it comes.
fn receive(sock: RawFd) -> Result<Launch, String> {
    let (msg, fds) = match crate::spawner::receive(sock, MAX_MESSAGE) {
        Ok(Some(m)) => m,
        Ok(None) => return Err("the agent closed the socket without a launch".into()),
        Err(Errno::EMSGSIZE) => return Err(format!("a launch longer than {MAX_MESSAGE} bytes")),
        Err(e) => return Err(format!("waiting for the process: {e}")),
    };
    if fds.len() != 3 || fds.iter().any(|f| f.as_raw_fd() < 3) {
        return Err(format!("a launch with descriptors {fds:?}"));
    }
    let v: Value = serde_json::from_slice(&msg).map_err(|e| format!("the launch: {e}"))?;
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let args = strings("args");
    if args.is_empty() {
        return Err("a launch without args".into());
    }
    Ok(Launch {
        args,
        env: strings("env"),
        path: v["path"].as_str().map(String::from),
        fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> LaunchContainerRequest {
        LaunchContainerRequest {
            container_id: "c1".into(),
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin".into(), "A=b=c".into()],
            hostname: "web-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn launches_are_checked() {
        check_launch(&launch()).unwrap();
        let refused = |f: &dyn Fn(&mut LaunchContainerRequest)| {
            let mut r = launch();
            f(&mut r);
            check_launch(&r).unwrap_err().0
        };
        assert!(refused(&|r| r.container_id = "../x".into()).contains("container_id"));
        assert!(refused(&|r| r.args.clear()).contains("args[0]"));
        assert!(refused(&|r| r.args[0] = String::new()).contains("args[0]"));
        assert!(refused(&|r| r.args[1] = "a\0b".into()).contains("NUL"));
        assert!(refused(&|r| r.env.push("NOVALUE".into())).contains("KEY=VALUE"));
        assert!(refused(&|r| r.env.push("=x".into())).contains("KEY=VALUE"));
        assert!(refused(&|r| r.hostname = "a b".into()).contains("hostname"));
        assert!(
            refused(&|r| r.env.push(format!("BIG={}", "x".repeat(MAX_LAUNCH)))).contains("at most")
        );
        // Counted as sent: quotes are escaped, so this is over the limit.
        let quotes = "\"".repeat(MAX_LAUNCH / 2 + 8);
        assert!(refused(&|r| r.env.push(format!("Q={quotes}"))).contains("at most"));
        assert!(refused(&|r| {
            r.stdio = Some(husk_protocol::agent::Stdio {
                stdout: "a/b".into(),
                ..Default::default()
            })
            .into()
        })
        .contains("stdio.stdout"));
    }

    #[test]
    fn a_launch_crosses_the_socket_with_its_stdio() {
        let (ours, theirs) = socket().unwrap();
        let null = |w| super::super::dev_null(w).unwrap();
        let stdio = ProcStdio {
            stdin: null(false),
            stdout: null(true),
            stderr: null(true),
            has_stdin: false,
        };
        let msg = message(&launch(), Some(Path::new("/bin/sh")));
        send(&ours, &msg, &stdio).unwrap();
        let got = receive(theirs.as_raw_fd()).unwrap();
        assert_eq!(got.args, launch().args);
        assert_eq!(got.env, launch().env);
        assert_eq!(got.path.as_deref(), Some("/bin/sh"));
        assert_eq!(got.fds.len(), 3);
        // Without a path the init looks the program up itself.
        send(&ours, &message(&launch(), None), &stdio).unwrap();
        assert_eq!(receive(theirs.as_raw_fd()).unwrap().path, None);
        // The init gone: the agent is told so, by name.
        drop(theirs);
        let e = send(&ours, &msg, &stdio).unwrap_err();
        assert!(format!("{e:?}").contains("init is gone"), "{e:?}");
    }
}
