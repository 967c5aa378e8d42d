//! Tier 3: husk-agent as PID 1 in husk-vmm guests, reached over hybrid
//! vsock with ttrpc. Every guest here is a sandbox restored from the
//! runtime's template (booted once per test run, or reused from the cache
//! while its inputs are unchanged): two sandboxes from one template are
//! checked for their own memory, randomness, clock and name, then the
//! containers group runs in one of them — busybox from an erofs image
//! handed to the restored VM as a drive: output and exit codes, exec,
//! limits with an OOM kill reported as OOM, stats, pause, update, remove
//! (what the host cannot test: its cgroup v2 has no memory, cpu or pids
//! controllers). One more sandbox boots cold: the off switch.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    CreateSandboxRequest, Empty, IPAddress, Interface, Storage, UpdateContainerRequest,
    UpdateInterfaceRequest,
};
use husk_runtime::{Boot, Runtime, Sandbox, SandboxConfig};
use husk_tests::agent::{
    busybox_guest, busybox_sandbox, busybox_spec, busybox_storage, container, ctx as actx,
    host_share_mount, process, read_all, Io,
};
use husk_tests::kvm_unavailable;

fn config(id: &str, busybox: &std::path::Path) -> SandboxConfig {
    let mut c = busybox_sandbox(id, busybox);
    c.dns_servers = vec!["10.0.2.3".into()];
    c
}

fn describe(sb: &Sandbox) {
    let t = &sb.times;
    println!(
        "sandbox {} ({:?}): template {:.2} s, to agent-ready {:.3} s, identity {:.3} s{}",
        sb.id,
        sb.boot,
        t.template.as_secs_f64(),
        t.agent_ready.as_secs_f64(),
        t.identity.as_secs_f64(),
        match &sb.template {
            Some(tp) if tp.built => format!(
                " (template {} built: cold boot {:.1} s)",
                tp.key,
                tp.boot_time.unwrap_or_default().as_secs_f64()
            ),
            Some(tp) => format!(" (template {} from the cache)", tp.key),
            None => String::new(),
        }
    );
}

/// The runtime and a busybox erofs image, or None (and a SKIP line)
/// without /dev/kvm.
fn setup(test: &str) -> Option<(Runtime, tempfile::TempDir, PathBuf)> {
    busybox_guest(test, kvm_unavailable())
}

#[test]
fn sandboxes_restored_from_one_template() {
    let Some((rt, _dir, busybox)) = setup("sandboxes_restored_from_one_template") else {
        return;
    };
    // Two sandboxes at once: the first to ask builds the template (if the
    // cache has none for these inputs), the other waits for it.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| rt.start_sandbox(&config("clone-a", &busybox)));
        let b = s.spawn(|| rt.start_sandbox(&config("clone-b", &busybox)));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (
        a.unwrap_or_else(|e| panic!("{e:#}")),
        b.unwrap_or_else(|e| panic!("{e:#}")),
    );
    describe(&a);
    describe(&b);
    assert_ne!(a.boot, Boot::Cold, "restored, not booted");
    let (ta, tb) = (a.template.as_ref().unwrap(), b.template.as_ref().unwrap());
    assert_eq!(ta.key, tb.key, "one template for one machine");
    assert!(!(ta.built && tb.built), "the template was built twice");
    assert_eq!(a.devices, ["/dev/vdb"]);

    // A bad request is refused and the agent (PID 1) stays up.
    let mut r = CreateSandboxRequest::new();
    r.hostname = "bad name".into();
    assert!(a
        .agent
        .sandbox
        .create_sandbox(actx(Duration::from_secs(30)), &r)
        .is_err());
    a.agent.health().unwrap();

    // Each took its own identity: randomness, clock, hostname; and each has
    // its own memory: a file one writes is not in the other (the scratch
    // tmpfs; and /etc/hostname, which the agent wrote into a tmpfs that
    // both clones got from the template).
    let (ia, ib) = std::thread::scope(|s| {
        let x = s.spawn(|| identity(&a, "echo a > /scratch/mark; ls /scratch"));
        let y = s.spawn(|| identity(&b, "ls /scratch"));
        (x.join().unwrap(), y.join().unwrap())
    });
    println!("clone a: {ia:?}\nclone b: {ib:?}");
    assert_eq!(ia.hostname, "clone-a");
    assert_eq!(ib.hostname, "clone-b");
    assert_ne!(ia.boot_id, ib.boot_id);
    assert_ne!(ia.random, ib.random);
    assert_eq!(ia.random.len(), 64, "{ia:?}");
    assert_eq!(ia.scratch, "mark", "{ia:?}");
    assert_eq!(ib.scratch, "", "{ib:?}");
    for i in [&ia, &ib] {
        assert!(
            i.clock_skew.abs() < 1.0,
            "guest clock {:.3} s off",
            i.clock_skew
        );
    }
    b.stop();

    containers_in_the_guest(&a);

    let status = a
        .shutdown(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "{status}");
}

/// The off switch: a sandbox that boots its kernel instead.
#[test]
fn a_sandbox_boots_cold_when_asked() {
    let Some((rt, _dir, busybox)) = setup("a_sandbox_boots_cold_when_asked") else {
        return;
    };
    let mut cfg = config("cold", &busybox);
    cfg.boot = Boot::Cold;
    // A cold-booted guest's virtio-fs device is set up by its driver with
    // the backend already there (a restored one's gets it at load).
    let host = _dir.path().join("host-share");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("f"), "shared-ok\n").unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && rt.virtiofsd.exists() {
        cfg.shares = vec![husk_runtime::storage::shared::HostShare {
            source: host.clone(),
            read_only: false,
        }];
    } else {
        println!(
            "SKIP virtio-fs part: needs root and {}",
            rt.virtiofsd.display()
        );
    }
    let sb = rt.start_sandbox(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    describe(&sb);
    assert!(sb.template.is_none());
    let i = identity(&sb, "ls /scratch; cat /host/f 2>&1");
    if !cfg.shares.is_empty() {
        assert!(i.scratch.contains("shared-ok"), "{i:?}\n{}", sb.logs());
    }
    assert_eq!(i.hostname, "cold");
    assert!(
        i.clock_skew.abs() < 1.0,
        "guest clock {:.3} s off",
        i.clock_skew
    );
    // The same id twice is refused while the first runs.
    let e = rt
        .start_sandbox(&cfg)
        .err()
        .expect("a second sandbox \"cold\"");
    assert!(e.to_string().contains("exists"), "{e:#}");
    let status = sb.shutdown(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{status}");
}

/// Unwraps, or fails with the sandbox's VMM log and guest console: an
/// empty or missing result must say what the guest saw.
trait OrLogs<T> {
    fn or_logs(self, sb: &Sandbox) -> T;
}

impl<T, E: std::fmt::Debug> OrLogs<T> for Result<T, E> {
    fn or_logs(self, sb: &Sandbox) -> T {
        self.unwrap_or_else(|e| panic!("{e:?}\n{}", sb.logs()))
    }
}

impl<T> OrLogs<T> for Option<T> {
    fn or_logs(self, sb: &Sandbox) -> T {
        self.unwrap_or_else(|| panic!("None\n{}", sb.logs()))
    }
}

#[derive(Debug)]
struct Identity {
    hostname: String,
    boot_id: String,
    random: String,
    clock_skew: f64,
    /// What `script` printed (its last line).
    scratch: String,
}

/// What a container of a sandbox sees of its identity; `script` runs after
/// with the sandbox's scratch tmpfs (shared by its containers) at /scratch.
fn identity(sb: &Sandbox, script: &str) -> Identity {
    let t = Duration::from_secs(120);
    let a = sb
        .connect()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let mut storage = vec![
        busybox_storage(sb),
        Storage {
            source: "tmpfs".into(),
            fstype: "tmpfs".into(),
            mount_point: "scratch".into(),
            ..Default::default()
        },
    ];
    let mut spec = busybox_spec(
        "busybox",
        &[
            "sh",
            "-c",
            &format!(
                "cat /etc/hostname /proc/sys/kernel/random/boot_id; \
                 head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                 adjtimex; \
                 {script} | tr '\\n' ' '; echo"
            ),
        ],
        false,
    );
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        oci_spec::runtime::MountBuilder::default()
            .destination("/scratch")
            .typ("bind")
            .source("scratch")
            .options(vec!["rbind".to_string(), "rw".to_string()])
            .build()
            .or_logs(sb),
    );
    if let Some(shared) = sb.shared_storage() {
        storage.push(shared);
        mounts.push(host_share_mount("/host"));
    }
    spec.set_mounts(Some(mounts));
    let id = format!(
        "id-{}",
        std::process::id() ^ Instant::now().elapsed().subsec_nanos()
    );
    let mut s = a
        .create(&id, &spec, Io::OUT_ERR, storage, true)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    // Line by line, each stamped with the host's clock as it arrives: the
    // clock line's stamp is within the stream's delay of the guest's read.
    let stdout = s.stdout.take().or_logs(sb);
    stdout.set_read_timeout(Some(t)).or_logs(sb);
    let mut stamped = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .or_logs(sb);
        stamped.push((line.or_logs(sb), now.as_secs_f64()));
    }
    let out: String = stamped.iter().map(|(l, _)| format!("{l}\n")).collect();
    let err = read_all(&mut s.stderr, t).or_logs(sb);
    a.wait(&id, "").or_logs(sb);
    a.remove(&id).or_logs(sb);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() > 5, "{out:?} {err:?}\n{}", sb.logs());
    // busybox's adjtimex prints "time.tv_sec: S" and "time.tv_usec: U"
    // lines, at once as it exits.
    let field = |name: &str| -> (f64, f64) {
        stamped
            .iter()
            .find_map(|(l, at)| {
                let mut w = l.split_whitespace();
                if w.next() != Some(name) {
                    return None;
                }
                Some((w.next()?.parse().ok()?, *at))
            })
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
    };
    let (sec, _) = field("time.tv_sec:");
    let (usec, host_now) = field("time.tv_usec:");
    let guest_now = sec + usec / 1e6;
    Identity {
        hostname: lines[0].into(),
        boot_id: lines[1].into(),
        random: lines[2].into(),
        clock_skew: host_now - guest_now,
        scratch: lines.last().or_logs(sb).trim().into(),
    }
}

/// The container group, in a sandbox restored from the template: a
/// restored VM must serve exactly as a booted one.
fn containers_in_the_guest(sb: &Sandbox) {
    let t = Duration::from_secs(120);
    let a = sb
        .connect()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let storage = || vec![busybox_storage(sb)];
    let fail = |e: anyhow::Error| -> ! { panic!("{e:#}\n{}", sb.logs()) };

    // Output, exit code, the sandbox's resolv.conf in the container, and
    // the spec's seccomp profile enforced (libseccomp is linked statically).
    let mut spec = busybox_spec(
        "busybox",
        &[
            "sh",
            "-c",
            "echo hi; cat /etc/resolv.conf; mkdir /x 2>/dev/null; echo mkdir=$?; echo oops >&2; exit 3",
        ],
        false,
    );
    let mut linux = spec.linux().clone().or_logs(sb);
    let seccomp = serde_json::from_value(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    }))
    .or_logs(sb);
    linux.set_seccomp(Some(seccomp));
    spec.set_linux(Some(linux));
    let start = Instant::now();
    let mut s = a
        .create("c1", &spec, Io::OUT_ERR, storage(), false)
        .unwrap_or_else(|e| fail(e.into()));
    let created = start.elapsed();
    a.containers
        .start_container(actx(t), &container("c1"))
        .or_logs(sb);
    let mut first = [0u8; 3];
    std::io::Read::read_exact(s.stdout.as_mut().or_logs(sb), &mut first).or_logs(sb);
    let started = start.elapsed();
    println!(
        "guest container: CreateContainer {:.2} s, StartContainer to first output {:.2} s",
        created.as_secs_f64(),
        (started - created).as_secs_f64()
    );
    assert_eq!(&first, b"hi\n");
    let out = read_all(&mut s.stdout, t).or_logs(sb);
    assert!(out.contains("nameserver 10.0.2.3"), "{out:?}");
    assert!(out.contains("mkdir=1\n"), "{out:?}");
    assert_eq!(read_all(&mut s.stderr, t).or_logs(sb), "oops\n");
    assert_eq!(a.wait("c1", "").or_logs(sb).status, 3);
    a.remove("c1").or_logs(sb);

    // A memory limit that the container exceeds: OOM-killed, reported as
    // OOM both by WaitProcess and GetOOMEvent. (The string doubles in user
    // space, so only page faults are emulated kernel work here.)
    let mut spec = busybox_spec(
        "busybox",
        &["sh", "-c", "x=a; while :; do x=$x$x; done"],
        false,
    );
    let mut linux = spec.linux().clone().or_logs(sb);
    let resources: oci_spec::runtime::LinuxResources = serde_json::from_value(
        serde_json::json!({"memory": {"limit": 8 << 20}, "pids": {"limit": 32}}),
    )
    .or_logs(sb);
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    let oom_waiter = {
        let a = sb.connect().or_logs(sb);
        // It waits through the create and the container's run: on a loaded
        // emulated host that is minutes.
        std::thread::spawn(move || {
            a.containers
                .get_oom_event(actx(Duration::from_secs(600)), &Empty::new())
        })
    };
    a.create("oom", &spec, Io::default(), storage(), true)
        .unwrap_or_else(|e| fail(e.into()));
    let w = a.wait("oom", "").or_logs(sb);
    assert_eq!((w.status, w.oom_killed), (137, true), "{w:?}");
    let ev = oom_waiter.join().or_logs(sb).or_logs(sb);
    assert_eq!(ev.container_id, "oom");
    let st = a
        .containers
        .stats_container(actx(t), &container("oom"))
        .or_logs(sb);
    assert_eq!(st.memory.limit, 8 << 20, "{st:?}");
    assert!(st.memory.oom_kill >= 1, "{st:?}");
    assert_eq!(st.pids_limit, 32, "{st:?}");
    a.remove("oom").or_logs(sb);

    // A long-running container: exec, stats, update, pause/resume, and the
    // agent's own memory (no pid namespace: /proc/1 is the agent).
    let mut spec = busybox_spec("busybox", &["sh", "-c", "while :; do sleep 1; done"], false);
    let mut linux = spec.linux().clone().or_logs(sb);
    let ns: Vec<_> = linux
        .namespaces()
        .clone()
        .or_logs(sb)
        .into_iter()
        .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Pid)
        .collect();
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    a.create("long", &spec, Io::default(), storage(), true)
        .unwrap_or_else(|e| fail(e.into()));
    let mut es = a
        .exec(
            "long",
            "e1",
            &process(&[
                "sh",
                "-c",
                "grep -E '^(Name|VmRSS|VmHWM)' /proc/1/status; exit 4",
            ]),
            Io::OUT_ERR,
        )
        .or_logs(sb);
    let status = read_all(&mut es.stdout, t).or_logs(sb);
    println!("agent (PID 1) after four containers:\n{status}");
    assert!(
        status.contains("husk-agent"),
        "exec e1 printed {status:?}, stderr {:?}\n{}",
        read_all(&mut es.stderr, t),
        sb.logs()
    );
    assert_eq!(a.wait("long", "e1").or_logs(sb).status, 4);
    let update = UpdateContainerRequest {
        container_id: "long".into(),
        resources: br#"{"pids": {"limit": 20}, "memory": {"limit": 33554432},
                        "cpu": {"quota": 50000, "period": 100000}}"#
            .to_vec(),
        ..Default::default()
    };
    a.containers.update_container(actx(t), &update).or_logs(sb);
    let st = a
        .containers
        .stats_container(actx(t), &container("long"))
        .or_logs(sb);
    assert!(st.cpu.usage_usec > 0 && st.memory.usage > 0, "{st:?}");
    assert_eq!((st.pids_limit, st.memory.limit), (20, 32 << 20), "{st:?}");
    assert!(st.pids_current >= 1, "{st:?}");
    // The container sees its own limits (cgroup namespace) after the update.
    let cat = [
        "cat",
        "/sys/fs/cgroup/cpu.max",
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/pids.max",
    ];
    let mut es = a
        .exec("long", "e2", &process(&cat), Io::OUT_ERR)
        .or_logs(sb);
    assert_eq!(
        read_all(&mut es.stdout, t).or_logs(sb),
        "50000 100000\n33554432\n20\n"
    );
    assert_eq!(a.wait("long", "e2").or_logs(sb).status, 0);
    a.containers
        .pause_container(actx(t), &container("long"))
        .or_logs(sb);
    let list = a
        .containers
        .list_containers(actx(t), &Empty::new())
        .or_logs(sb);
    assert_eq!(list.containers[0].status, "paused");
    a.containers
        .resume_container(actx(t), &container("long"))
        .or_logs(sb);
    a.remove("long").or_logs(sb);
    let list = a
        .containers
        .list_containers(actx(t), &Empty::new())
        .or_logs(sb);
    assert!(list.containers.is_empty());

    // Network: netlink in the guest (no NIC in this VM: lo stands in; the
    // host test configures a real eth0 and routes).
    let lo = Interface {
        name: "lo".into(),
        mtu: 16384,
        addresses: vec![IPAddress {
            address: "127.0.0.1".into(),
            prefix_len: 8,
            ..Default::default()
        }],
        ..Default::default()
    };
    let got = a
        .network
        .update_interface(
            actx(t),
            &UpdateInterfaceRequest {
                interface: Some(lo).into(),
                ..Default::default()
            },
        )
        .or_logs(sb);
    assert_eq!(got.mtu, 16384);
    let list = a
        .network
        .list_interfaces(actx(t), &Empty::new())
        .or_logs(sb);
    assert!(list
        .interfaces
        .iter()
        .any(|i| i.name == "lo" && i.mtu == 16384));
    a.health().or_logs(sb);
}
