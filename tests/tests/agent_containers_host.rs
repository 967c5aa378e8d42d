//! husk-agent's Containers service on the host, over its Unix socket: the
//! same code paths as in the guest but vsock. The agent runs as root in its
//! own mount namespace, with a tmpfs state root, the busybox rootfs
//! bind-mounted read-only as its storage, and cgroup2 mounted at
//! /sys/fs/cgroup. (This host's cgroup v2 hierarchy has no memory, cpu or
//! pids controller — they are bound to v1 — so limits, OOM and memory stats
//! are tested in the guest, agent_guest.rs.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use husk_protocol::agent::{
    CreateContainerRequest, Empty, IPAddress, Interface, ProcessRequest, Route,
    SignalProcessRequest, Stdio, TtyWinResizeRequest, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use husk_runtime::guest::Launch;
use husk_tests::agent::{
    busybox_spec, container, ctx, process, read_all, rpc_message, unpack_busybox, AgentConn,
    Endpoint, Io,
};
use husk_tests::{husk_agent_binary, root_unavailable, skip, wait_listening};

const T: Duration = Duration::from_secs(30);

struct HostAgent {
    child: Child,
    conn: AgentConn,
    sock: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostAgent {
    /// Starts an agent, or says why it cannot here.
    fn start(test: &str) -> Option<HostAgent> {
        if let Some(why) = root_unavailable() {
            skip(test, &why);
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("busybox");
        unpack_busybox(&rootfs).unwrap_or_else(|e| panic!("{e:#}"));
        let state = dir.path().join("state");
        let sock = dir.path().join("agent.sock");
        std::fs::create_dir_all(&state).unwrap();
        let script = r#"set -e
            mount -t tmpfs tmpfs "$STATE"
            mkdir -p "$STATE/storage/busybox"
            mount --bind "$ROOTFS" "$STATE/storage/busybox"
            mount -o remount,bind,ro "$STATE/storage/busybox"
            mount -t cgroup2 cgroup2 /sys/fs/cgroup
            ip tuntap add dev eth0 mode tap
            exec "$AGENT" --listen "unix://$SOCK" --own-netns"#;
        // Its own network namespace too, with a tap as its eth0: the
        // Network service may change only a namespace that is not the host's.
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--net",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ])
            .env("STATE", &state)
            .env("ROOTFS", &rootfs)
            .env("SOCK", &sock)
            .env("AGENT", husk_agent_binary().unwrap())
            .env("HUSK_AGENT_STATE", &state)
            .spawn()
            .unwrap();
        wait_listening(&sock, "the agent", Duration::from_secs(10));
        let conn = AgentConn::connect(Endpoint::Unix(sock.clone())).unwrap();
        Some(HostAgent {
            child,
            conn,
            sock,
            state,
            _dir: dir,
        })
    }

    /// The agent's mounts, as it sees them.
    fn mounts(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.child.id())).unwrap()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container's cgroup, seen from this (the host's) mount namespace.
fn host_cgroup(id: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup/unified/husk").join(id)
}

fn unique(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

#[test]
fn output_streams_and_exit_code() {
    let Some(a) = HostAgent::start("output_streams_and_exit_code") else {
        return;
    };
    let id = unique("out");
    let spec = busybox_spec(
        "busybox",
        &["sh", "-c", "echo to-out; echo to-err >&2; hostname; exit 3"],
        false,
    );
    let mut s = a.conn.run(&id, &spec, Io::OUT_ERR, true).unwrap();
    assert_eq!(read_all(&mut s.stdout, T).unwrap(), "to-out\nc\n");
    assert_eq!(read_all(&mut s.stderr, T).unwrap(), "to-err\n");
    let w = a.conn.wait(&id, "").unwrap();
    assert_eq!(w.status, 3);
    assert!(!w.oom_killed);
    assert!(w.exited_at_unix_nano > 0);
    // A process without a terminal cannot be resized.
    let resize = TtyWinResizeRequest {
        container_id: id.clone(),
        rows: 1,
        cols: 1,
        ..Default::default()
    };
    let e = a
        .conn
        .containers
        .tty_win_resize(ctx(T), &resize)
        .unwrap_err();
    assert!(rpc_message(&e).contains("FAILED_PRECONDITION"), "{e:?}");
    a.conn.remove(&id).unwrap();

    // Large output streams through (no buffering limit in the agent).
    let id = unique("big");
    let spec = busybox_spec(
        "busybox",
        &["sh", "-c", "dd if=/dev/zero bs=64k count=64 2>/dev/null"],
        false,
    );
    let mut s = a.conn.run(&id, &spec, Io::OUT_ERR, true).unwrap();
    assert_eq!(read_all(&mut s.stdout, T).unwrap().len(), 4 << 20);
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0);
    a.conn.remove(&id).unwrap();
}

/// Execs at once, many rounds: each gets exactly its own output and exit
/// status. The agent serves them from several threads; the processes they
/// make must not inherit another thread's half-held state (agent/src/spawner.rs). On
/// the guest's main the same load hung the agent or killed execs with
/// SIGSEGV (stream_races.rs); here it runs at native speed, so more rounds.
#[test]
fn parallel_execs_each_get_their_output_and_status() {
    const PARALLEL: usize = 8;
    const ROUNDS: usize = 12;
    let Some(a) = HostAgent::start("parallel_execs_each_get_their_output_and_status") else {
        return;
    };
    let id = unique("par");
    let spec = busybox_spec("busybox", &["sh", "-c", "while :; do sleep 1; done"], false);
    a.conn.run(&id, &spec, Io::default(), true).unwrap();
    for round in 0..ROUNDS {
        std::thread::scope(|s| {
            for i in 0..PARALLEL {
                let (a, id) = (&a, &id);
                s.spawn(move || {
                    let conn = AgentConn::connect(Endpoint::Unix(a.sock.clone())).unwrap();
                    let exec = format!("r{round}-{i}");
                    let script = format!("echo {exec}-out; echo {exec}-err >&2; exit {i}");
                    let mut st = conn
                        .exec(id, &exec, &process(&["sh", "-c", &script]), Io::OUT_ERR)
                        .unwrap_or_else(|e| panic!("exec {exec}: {e:#}"));
                    let out = read_all(&mut st.stdout, T).unwrap();
                    let err = read_all(&mut st.stderr, T).unwrap();
                    let w = conn.wait(id, &exec).unwrap();
                    assert_eq!(
                        (out.as_str(), err.as_str(), w.status),
                        (
                            format!("{exec}-out\n").as_str(),
                            format!("{exec}-err\n").as_str(),
                            i as i32
                        ),
                        "exec {exec}"
                    );
                });
            }
        });
    }
    a.conn.remove(&id).unwrap();
}

#[test]
fn stdin_round_trip_and_close() {
    let Some(a) = HostAgent::start("stdin_round_trip_and_close") else {
        return;
    };
    let id = unique("in");
    let spec = busybox_spec("busybox", &["sh", "-c", "read l; echo got:$l; cat"], false);
    let mut s = a.conn.run(&id, &spec, Io::ALL, true).unwrap();
    let stdin = s.stdin.as_mut().unwrap();
    stdin.write_all(b"hello\nrest of it").unwrap();
    // CloseStdin ends `cat`'s input without the host closing its side.
    std::thread::sleep(Duration::from_millis(200));
    let req = ProcessRequest {
        container_id: id.clone(),
        ..Default::default()
    };
    a.conn.containers.close_stdin(ctx(T), &req).unwrap();
    assert_eq!(read_all(&mut s.stdout, T).unwrap(), "got:hello\nrest of it");
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0);
    a.conn.remove(&id).unwrap();
}

#[test]
fn terminal_with_resize() {
    let Some(a) = HostAgent::start("terminal_with_resize") else {
        return;
    };
    let id = unique("tty");
    let spec = busybox_spec(
        "busybox",
        &["sh", "-c", "read l; tty; stty size; echo line:$l"],
        true,
    );
    let mut s = a.conn.run(&id, &spec, Io::TTY, false).unwrap();
    let resize = TtyWinResizeRequest {
        container_id: id.clone(),
        rows: 33,
        cols: 101,
        ..Default::default()
    };
    a.conn.containers.tty_win_resize(ctx(T), &resize).unwrap();
    a.conn
        .containers
        .start_container(ctx(T), &container(&id))
        .unwrap();
    s.stdin.as_mut().unwrap().write_all(b"typed\n").unwrap();
    let out = read_all(&mut s.stdout, T).unwrap();
    // The terminal echoes input and ends lines with \r\n.
    assert!(out.contains("typed\r\n"), "{out:?}");
    assert!(out.contains("/dev/pts/0\r\n"), "{out:?}");
    assert!(out.contains("33 101\r\n"), "{out:?}");
    assert!(out.contains("line:typed\r\n"), "{out:?}");
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0);
    a.conn.remove(&id).unwrap();
}

#[test]
fn exec_signals_and_remove_leave_nothing_behind() {
    let Some(a) = HostAgent::start("exec_signals_and_remove_leave_nothing_behind") else {
        return;
    };
    let id = unique("exec");
    let spec = busybox_spec(
        "busybox",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done",
        ],
        false,
    );
    let mut s = a.conn.run(&id, &spec, Io::OUT_ERR, true).unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(s.stdout.as_mut().unwrap(), &mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");

    // exec sees the container's pid namespace and rootfs, and has its own
    // streams and exit status.
    let process = process(&[
        "sh",
        "-c",
        "echo pid1=$(cat /proc/1/comm); ls /bin/busybox; exit 5",
    ]);
    let mut es = a.conn.exec(&id, "e1", &process, Io::OUT_ERR).unwrap();
    assert_eq!(
        read_all(&mut es.stdout, T).unwrap(),
        "pid1=sh\n/bin/busybox\n"
    );
    assert_eq!(a.conn.wait(&id, "e1").unwrap().status, 5);
    // The same exec id twice is refused.
    let e = a.conn.exec(&id, "e1", &process, Io::default()).unwrap_err();
    assert!(format!("{e:#}").contains("ALREADY_EXISTS"), "{e:#}");
    // A program that is not there: refused with its detail (what husk's
    // exit 127 is decided by), through ttrpc, before any process is made.
    let e = a
        .conn
        .exec(
            &id,
            "e2",
            &husk_tests::agent::process(&["no-such-program"]),
            Io::default(),
        )
        .unwrap_err();
    let husk_runtime::guest::GuestError::Rpc(refusal) = &e else {
        panic!("not the agent's refusal: {e:?}");
    };
    assert_eq!(refusal.code, Some(ttrpc::Code::NOT_FOUND), "{e:?}");
    assert!(
        refusal.is(husk_protocol::detail::PROGRAM_NOT_FOUND),
        "{e:?}"
    );

    // Killing an exec with all=true (how the CRI plugin ends a timed-out
    // ExecSync) kills that exec only, as with runc: the container runs on.
    let sleeper = husk_tests::agent::process(&["sleep", "1000"]);
    a.conn.exec(&id, "e3", &sleeper, Io::default()).unwrap();
    a.conn.signal(&id, "e3", 9, true).unwrap();
    assert_eq!(a.conn.wait(&id, "e3").unwrap().status, 137);
    let list = a
        .conn
        .containers
        .list_containers(ctx(T), &Empty::new())
        .unwrap();
    assert_eq!(list.containers[0].status, "running", "{list:?}");

    // Stats: this host's cgroup v2 has cpu.stat (core) but no memory
    // controller.
    let st = a
        .conn
        .containers
        .stats_container(ctx(T), &container(&id))
        .unwrap();
    assert!(st.cpu.usage_usec > 0, "{st:?}");

    // Pause freezes (cgroup.freeze), resume thaws.
    a.conn
        .containers
        .pause_container(ctx(T), &container(&id))
        .unwrap();
    let list = a
        .conn
        .containers
        .list_containers(ctx(T), &Empty::new())
        .unwrap();
    assert_eq!(list.containers[0].status, "paused");
    assert_eq!(
        std::fs::read_to_string(host_cgroup(&id).join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    a.conn
        .containers
        .resume_container(ctx(T), &container(&id))
        .unwrap();

    // SIGTERM runs the container's trap: 7, not a signal death.
    let sig = SignalProcessRequest {
        container_id: id.clone(),
        signal: 15,
        ..Default::default()
    };
    a.conn.containers.signal_process(ctx(T), &sig).unwrap();
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 7);
    assert_eq!(read_all(&mut s.stdout, T).unwrap(), "got-term\n");
    // Signalling an exited process is refused, not sent to a reused pid.
    let e = a.conn.containers.signal_process(ctx(T), &sig).unwrap_err();
    assert!(rpc_message(&e).contains("NOT_FOUND"), "{e:?}");

    // SIGKILL: 128 + 9, like runc.
    let id2 = unique("kill");
    let spec = busybox_spec("busybox", &["sleep", "1000"], false);
    a.conn.run(&id2, &spec, Io::default(), true).unwrap();
    let sig = SignalProcessRequest {
        container_id: id2.clone(),
        signal: 9,
        ..Default::default()
    };
    a.conn.containers.signal_process(ctx(T), &sig).unwrap();
    assert_eq!(a.conn.wait(&id2, "").unwrap().status, 137);

    // Remove leaves no mounts, cgroups or state behind; a running container
    // is killed first.
    let id3 = unique("running");
    a.conn.run(&id3, &spec, Io::default(), true).unwrap();
    for c in [&id, &id2, &id3] {
        assert!(a.mounts().contains(&format!("/containers/{c}/rootfs")));
        assert!(host_cgroup(c).exists(), "{c}");
        a.conn.remove(c).unwrap();
        assert!(!host_cgroup(c).exists(), "{c}: cgroup left behind");
        assert!(
            !a.mounts().contains(&format!("/containers/{c}/")),
            "{c}: mount left behind"
        );
    }
    let leftovers: Vec<_> = ["containers", "libcontainer"]
        .iter()
        .flat_map(|d| std::fs::read_dir(a.state.join(d)).into_iter().flatten())
        .collect();
    // The state root is the agent's private tmpfs: from here it is empty.
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let list = a
        .conn
        .containers
        .list_containers(ctx(T), &Empty::new())
        .unwrap();
    assert!(list.containers.is_empty());
}

#[test]
fn bad_requests_get_clear_errors_and_the_agent_stays_up() {
    let Some(a) = HostAgent::start("bad_requests_get_clear_errors_and_the_agent_stays_up") else {
        return;
    };
    let c = &a.conn.containers;
    let good = serde_json::to_vec(&busybox_spec("busybox", &["true"], false)).unwrap();
    let create = |id: &str, spec: &[u8]| {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec.to_vec(),
            overlay_rootfs: true,
            ..Default::default()
        };
        rpc_message(&c.create_container(ctx(T), &req).unwrap_err())
    };
    let cases: Vec<(String, &str)> = vec![
        (create("x", b"{\"ociVersion\": 1"), "oci_spec"),
        (create("../x", &good), "container_id"),
        (
            create(
                "x",
                &serde_json::to_vec(&busybox_spec("../../etc", &["true"], false)).unwrap(),
            ),
            "root.path",
        ),
        (
            create(
                "x",
                &serde_json::to_vec(&busybox_spec("nonexistent", &["true"], false)).unwrap(),
            ),
            "root.path",
        ),
        (
            create(
                "x",
                &serde_json::to_vec(&busybox_spec("busybox", &[], false)).unwrap(),
            ),
            "process.args",
        ),
        (
            rpc_message(&c.start_container(ctx(T), &container("nosuch")).unwrap_err()),
            "NOT_FOUND",
        ),
        (
            rpc_message(
                &c.wait_process(
                    ctx(T),
                    &ProcessRequest {
                        container_id: "nosuch".into(),
                        ..Default::default()
                    },
                )
                .unwrap_err(),
            ),
            "NOT_FOUND",
        ),
    ];
    for (got, want) in &cases {
        assert!(got.contains(want), "{got:?} should name {want:?}");
    }
    // A stream that never connects: a clear error, and nothing left behind.
    let req = CreateContainerRequest {
        container_id: "nostream".into(),
        oci_spec: good.clone(),
        overlay_rootfs: true,
        stdio: Some(Stdio {
            stdout: "never-opened".into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let e = rpc_message(&c.create_container(ctx(T), &req).unwrap_err());
    assert!(e.contains("never-opened"), "{e}");
    assert!(!a.mounts().contains("/containers/nostream"));

    // A process that cannot be executed: the error names it, and the id is
    // free again afterwards (nothing half-created is left).
    let id = unique("noexec");
    let e = a
        .conn
        .run(
            &id,
            &busybox_spec("busybox", &["/no/such/binary"], false),
            Io::default(),
            true,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("/no/such/binary"), "{e:#}");
    assert!(!a.mounts().contains(&format!("/containers/{id}/")));
    assert!(!host_cgroup(&id).exists());
    a.conn
        .run(
            &id,
            &busybox_spec("busybox", &["true"], false),
            Io::default(),
            true,
        )
        .unwrap();
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0);
    a.conn.remove(&id).unwrap();

    // Unknown ids, twice-started and twice-created containers.
    let id = unique("twice");
    a.conn
        .run(
            &id,
            &busybox_spec("busybox", &["sleep", "100"], false),
            Io::default(),
            true,
        )
        .unwrap();
    let e = rpc_message(&c.start_container(ctx(T), &container(&id)).unwrap_err());
    assert!(e.contains("FAILED_PRECONDITION"), "{e}");
    let e = create(&id, &good);
    assert!(e.contains("ALREADY_EXISTS"), "{e}");
    a.conn.remove(&id).unwrap();

    // Garbage on the stream port is dropped; the agent serves on.
    let mut g = a.conn.stream("ok-name").unwrap();
    g.write_all(&[0xff; 4096]).unwrap();
    a.conn.health().unwrap();
}

/// A parked container: created in full with a placeholder process, then
/// launched with its real args, environment, streams and host name. The
/// launch's program is looked up as a create's is (Docker's 127), a refused
/// launch leaves it parked, and StartContainer and LaunchContainer each
/// refuse the other's containers.
#[test]
fn a_parked_container_is_launched_with_its_process() {
    let Some(a) = HostAgent::start("a_parked_container_is_launched_with_its_process") else {
        return;
    };
    let c = &a.conn.containers;
    let id = unique("parked");
    let mut spec = busybox_spec("busybox", &["placeholder-never-run"], false);
    let mut p = spec.process().clone().unwrap();
    p.set_cwd("/etc".into());
    spec.set_process(Some(p));
    // Its program read into the page cache (a hint: `/nowhere` in its
    // $PATH is passed over, as a launch's lookup does).
    let warm = ("sh".to_string(), "/nowhere:/bin".to_string());
    let pid = a
        .conn
        .park(&id, &spec, Vec::new(), true, Some(&warm))
        .unwrap();
    assert!(pid > 0);
    // A parked container is not started with StartContainer, nor paused.
    let e = rpc_message(&c.start_container(ctx(T), &container(&id)).unwrap_err());
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("parked"),
        "{e}"
    );
    let e = rpc_message(&c.pause_container(ctx(T), &container(&id)).unwrap_err());
    assert!(e.contains("not running"), "{e}");
    // A `sh` put first in its $PATH after it was parked is not the one a
    // launch runs: the lookup made when it was parked is (nothing runs in
    // a template's root meanwhile; this test writes there from outside).
    let decoy = format!("/proc/{pid}/root/nowhere/sh");
    std::fs::create_dir_all(format!("/proc/{pid}/root/nowhere")).unwrap();
    std::fs::write(&decoy, "#!/bin/sh\necho decoy\n").unwrap();
    std::fs::set_permissions(&decoy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // A missing program is refused as at create, and it stays parked.
    let mut l = Launch {
        args: strings(&["no-such-program"]),
        env: strings(&["PATH=/bin:/usr/bin", "GREETING=hello"]),
        ..Default::default()
    };
    let e = a.conn.launch(&id, &l, Io::default()).unwrap_err();
    let refused = husk_runtime::guest::find_rpc(&e).expect("an RPC error");
    assert!(
        refused.is(husk_protocol::detail::PROGRAM_NOT_FOUND),
        "{e:#}"
    );
    // Launched under a new id (a template's container becoming a run's).
    l.args = strings(&[
        "sh",
        "-c",
        "echo $GREETING from $(hostname) in $(pwd) home=$HOME; echo to-err >&2; exit 4",
    ]);
    // With the $PATH its template was warmed with: the program is where
    // that lookup found it, not looked up again.
    l.env = strings(&["PATH=/nowhere:/bin", "GREETING=hello"]);
    l.hostname = "web-1".into();
    l.new_id = unique("launched");
    let mut s = a.conn.launch(&id, &l, Io::OUT_ERR).unwrap();
    assert_eq!(
        read_all(&mut s.stdout, T).unwrap(),
        "hello from web-1 in /etc home=/root\n"
    );
    assert_eq!(read_all(&mut s.stderr, T).unwrap(), "to-err\n");
    assert_eq!(a.conn.wait(&l.new_id, "").unwrap().status, 4);
    // The first id is gone, and not free while its state is in use.
    let e = rpc_message(&c.start_container(ctx(T), &container(&id)).unwrap_err());
    assert!(e.contains("NOT_FOUND"), "{e}");
    let e = a.conn.park(&id, &spec, Vec::new(), true, None).unwrap_err();
    assert!(format!("{e:#}").contains("ALREADY_EXISTS"), "{e:#}");
    // Launched once only.
    let e = a.conn.launch(&l.new_id, &l, Io::default()).unwrap_err();
    assert!(format!("{e:#}").contains("started already"), "{e:#}");
    a.conn.remove(&l.new_id).unwrap();
    assert!(!host_cgroup(&id).exists());
    // Removed, its first id is free again. Held (containerd's Create,
    // then Start): given its process, which runs only once StartContainer
    // comes, and not launched twice.
    a.conn.park(&id, &spec, Vec::new(), true, None).unwrap();
    l.args = strings(&["sh", "-c", "echo started"]);
    l.new_id.clear();
    l.hold = true;
    let mut s = a.conn.launch(&id, &l, Io::OUT_ERR).unwrap();
    // Nothing on its stdout for a second: not started.
    let out = s.stdout.as_ref().unwrap();
    out.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 16];
    let early = std::io::Read::read(&mut &*out, &mut b);
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "ran before StartContainer: {early:?} {:?}",
        String::from_utf8_lossy(&b)
    );
    out.set_read_timeout(None).unwrap();
    let e = a.conn.launch(&id, &l, Io::default()).unwrap_err();
    assert!(format!("{e:#}").contains("not parked"), "{e:#}");
    a.conn.start(&id).unwrap();
    assert_eq!(read_all(&mut s.stdout, T).unwrap(), "started\n");
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0);
    a.conn.remove(&id).unwrap();
    l.hold = false;

    // A container created the usual way is not launched.
    let id = unique("unparked");
    let sleep = busybox_spec("busybox", &["sleep", "100"], false);
    a.conn.run(&id, &sleep, Io::default(), false).unwrap();
    l.new_id.clear();
    let e = a.conn.launch(&id, &l, Io::default()).unwrap_err();
    assert!(format!("{e:#}").contains("not parked"), "{e:#}");
    a.conn.remove(&id).unwrap();

    // A parked container is created without stdio or a terminal.
    let req = CreateContainerRequest {
        container_id: "parked-tty".into(),
        oci_spec: serde_json::to_vec(&busybox_spec("busybox", &["sh"], true)).unwrap(),
        overlay_rootfs: true,
        parked: true,
        ..Default::default()
    };
    let e = rpc_message(&c.create_container(ctx(T), &req).unwrap_err());
    assert!(e.contains("terminal"), "{e}");
}

#[test]
fn seccomp_profile_from_the_spec_is_enforced() {
    let Some(a) = HostAgent::start("seccomp_profile_from_the_spec_is_enforced") else {
        return;
    };
    // Everything allowed but mkdir/mkdirat, which fail with EPERM.
    let mut spec = busybox_spec(
        "busybox",
        &["sh", "-c", "mkdir /x 2>&1; echo rc=$?; ls -d /bin"],
        false,
    );
    let mut linux = spec.linux().clone().unwrap();
    let seccomp = serde_json::from_value(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    }))
    .unwrap();
    linux.set_seccomp(Some(seccomp));
    spec.set_linux(Some(linux));
    let id = unique("seccomp");
    let mut s = a.conn.run(&id, &spec, Io::OUT_ERR, true).unwrap();
    let out = read_all(&mut s.stdout, T).unwrap();
    assert!(out.contains("Operation not permitted"), "{out:?}");
    assert!(out.contains("rc=1\n/bin\n"), "{out:?}");
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0);
    a.conn.remove(&id).unwrap();
}

#[test]
fn network_interfaces_and_routes() {
    let Some(a) = HostAgent::start("network_interfaces_and_routes") else {
        return;
    };
    let net = &a.conn.network;
    let addr = |ip: &str, len| IPAddress {
        address: ip.into(),
        prefix_len: len,
        ..Default::default()
    };
    let mut eth0 = Interface {
        name: "eth0".into(),
        mac: "06:00:0a:58:00:02".into(),
        mtu: 1400,
        addresses: vec![addr("10.88.0.2", 16), addr("fd00:88::2", 64)],
        ..Default::default()
    };
    let req = |i: &Interface| UpdateInterfaceRequest {
        interface: Some(i.clone()).into(),
        ..Default::default()
    };
    let got = net.update_interface(ctx(T), &req(&eth0)).unwrap();
    assert_eq!((got.mac.as_str(), got.mtu), ("06:00:0a:58:00:02", 1400));
    let ips: Vec<_> = got.addresses.iter().map(|x| x.address.as_str()).collect();
    assert!(
        ips.contains(&"10.88.0.2") && ips.contains(&"fd00:88::2"),
        "{ips:?}"
    );
    // Exactly the addresses asked for: a second update replaces the first.
    eth0.addresses = vec![addr("10.88.0.3", 16)];
    let got = net.update_interface(ctx(T), &req(&eth0)).unwrap();
    let v4: Vec<_> = got
        .addresses
        .iter()
        .filter(|x| !x.address.contains(':'))
        .map(|x| x.address.as_str())
        .collect();
    assert_eq!(v4, ["10.88.0.3"]);

    let route = |d: &str, g: &str, dev: &str| Route {
        destination: d.into(),
        gateway: g.into(),
        device: dev.into(),
        ..Default::default()
    };
    let routes = UpdateRoutesRequest {
        routes: vec![
            route("default", "10.88.0.1", "eth0"),
            route("10.99.0.0/16", "", "eth0"),
        ],
        ..Default::default()
    };
    let got = net.update_routes(ctx(T), &routes).unwrap();
    let has = |d: &str, g: &str| {
        got.routes
            .iter()
            .any(|r| r.destination == d && r.gateway == g && r.device == "eth0")
    };
    assert!(has("default", "10.88.0.1"), "{:?}", got.routes);
    assert!(has("10.99.0.0/16", ""), "{:?}", got.routes);

    // A container of the sandbox sees it.
    let id = unique("net");
    let spec = busybox_spec(
        "busybox",
        &["sh", "-c", "ip route; ip addr show eth0"],
        false,
    );
    let mut s = a.conn.run(&id, &spec, Io::OUT_ERR, true).unwrap();
    let out = read_all(&mut s.stdout, T).unwrap();
    assert!(out.contains("default via 10.88.0.1 dev eth0"), "{out}");
    assert!(out.contains("inet 10.88.0.3/16"), "{out}");
    assert!(out.contains("mtu 1400"), "{out}");
    a.conn.remove(&id).unwrap();

    // Bad input: a clear error, nothing changed.
    for (bad, want) in [
        (
            Interface {
                name: "eth0".into(),
                mac: "01:00:5e:00:00:01".into(),
                ..Default::default()
            },
            "unicast",
        ),
        (
            Interface {
                name: "nosuch0".into(),
                ..Default::default()
            },
            "no interface",
        ),
    ] {
        let e = rpc_message(&net.update_interface(ctx(T), &req(&bad)).unwrap_err());
        assert!(e.contains(want), "{e}");
    }
    let bad = UpdateRoutesRequest {
        routes: vec![route("default", "", "")],
        ..Default::default()
    };
    let e = rpc_message(&net.update_routes(ctx(T), &bad).unwrap_err());
    assert!(e.contains("gateway"), "{e}");
    let list = net.list_interfaces(ctx(T), &Empty::new()).unwrap();
    let eth0 = list.interfaces.iter().find(|i| i.name == "eth0").unwrap();
    assert_eq!(eth0.mtu, 1400);
}

#[test]
fn volumes_and_the_specs_security_settings() {
    let Some(a) = HostAgent::start("volumes_and_the_specs_security_settings") else {
        return;
    };
    // A volume: a bind mount whose source is relative to the storage
    // directory (the runtime puts volumes there).
    let mut spec = busybox_spec(
        "busybox",
        &[
            "sh",
            "-c",
            "ls /data/passwd; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; ulimit -n; \
             cat /proc/kcore | wc -c; echo x > /proc/sys/kernel/hostname 2>/dev/null; echo sys=$?",
        ],
        false,
    );
    let mut mounts = spec.mounts().clone().unwrap();
    let volume = |src: &str| {
        oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source(src)
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap()
    };
    mounts.push(volume("busybox/etc"));
    spec.set_mounts(Some(mounts.clone()));
    let id = unique("vol");
    let mut s = a.conn.run(&id, &spec, Io::OUT_ERR, true).unwrap();
    let out = read_all(&mut s.stdout, T).unwrap();
    assert_eq!(a.conn.wait(&id, "").unwrap().status, 0, "{out}");
    a.conn.remove(&id).unwrap();
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines[0], "/data/passwd", "{out}");
    // The default spec's capabilities (far from all 41), no_new_privs,
    // RLIMIT_NOFILE, a masked /proc/kcore and a read-only /proc/sys.
    let cap_eff = lines[1].trim_start_matches("CapEff:").trim();
    assert_ne!(cap_eff, "000001ffffffffff", "{out}");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["NoNewPrivs:", "1"]
    );
    assert_eq!(lines[3], "1024", "{out}");
    assert_eq!(lines[4].trim(), "0", "{out}");
    assert_eq!(lines[5], "sys=1", "{out}");

    // Volume sources outside the storage directory are refused.
    for (src, want) in [
        ("/etc", "relative path"),
        ("busybox/../../..", "relative path"),
    ] {
        let mut bad = mounts.clone();
        bad.pop();
        bad.push(volume(src));
        spec.set_mounts(Some(bad));
        let e = a
            .conn
            .run(&unique("badvol"), &spec, Io::default(), false)
            .unwrap_err();
        assert!(format!("{e:#}").contains(want), "{src}: {e:#}");
    }
}
