//! Tier 3: husk-agent as PID 1 in a husk-vmm guest, reached over hybrid vsock
//! with ttrpc: one boot for the group. The sandbox calls first, then
//! containers from the busybox image on a second (erofs) drive: output and
//! exit codes, exec, limits with an OOM kill reported as OOM, stats, pause,
//! update, remove — what the host cannot test (its cgroup v2 has no memory,
//! cpu or pids controllers).

use std::os::fd::IntoRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    CreateSandboxRequest, Empty, IPAddress, Interface, ReseedRandomRequest, SetTimeRequest,
    Storage, UpdateContainerRequest, UpdateInterfaceRequest,
};
use husk_protocol::agent_ttrpc::SandboxClient;
use husk_protocol::{AGENT_VSOCK_PORT, API_VERSION, VERSION_KEY};
use husk_tests::agent::{
    busybox_erofs, busybox_spec, container, ctx as actx, read_all, AgentConn, Endpoint, Io,
};
use husk_tests::{
    api_request, guest_kernel, guest_rootfs, husk_vmm_binary, kvm_unavailable, skip, vsock_connect,
    Guest,
};

fn ctx() -> ttrpc::context::Context {
    let mut c = ttrpc::context::with_timeout(60_000_000_000);
    c.add(VERSION_KEY.to_string(), API_VERSION.to_string());
    c
}

#[test]
fn agent_serves_in_the_guest_over_vsock() {
    if let Some(why) = kvm_unavailable() {
        skip("agent_serves_in_the_guest_over_vsock", &why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let busybox = dir.path().join("busybox.erofs");
    busybox_erofs(&busybox).unwrap_or_else(|e| panic!("{e:#}"));
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest_kernel().unwrap(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off rootfstype=erofs init=/sbin/husk-agent"
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [{"drive_id": "rootfs", "path_on_host": guest_rootfs().unwrap(),
                    "is_root_device": true, "is_read_only": true},
                   {"drive_id": "busybox", "path_on_host": busybox,
                    "is_root_device": false, "is_read_only": true}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "entropy": {}
    });
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let api = dir.path().join("api.sock");
    let mut cmd = Command::new(husk_vmm_binary().unwrap());
    cmd.arg("--config-file")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(&api);
    let mut guest = Guest::spawn("husk-vmm", cmd).unwrap();
    let (_, at) = guest
        .wait_for_line("husk-agent: serving agent API", Duration::from_secs(420))
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!("agent serving {:.1} s after VMM start", at.as_secs_f64());

    let stream = vsock_connect(&uds, AGENT_VSOCK_PORT, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
    let client = SandboxClient::new(ttrpc::Client::new(stream.into_raw_fd()).unwrap());
    let start = Instant::now();
    let h = client.health(ctx(), &Empty::new()).unwrap();
    println!("Health round trip in the guest: {:?}", start.elapsed());
    assert_eq!(h.status, "SERVING");

    let mut r = CreateSandboxRequest::new();
    r.hostname = "husk-guest".into();
    r.dns_servers = vec!["10.0.2.3".into()];
    client.create_sandbox(ctx(), &r).unwrap();
    let mut t = SetTimeRequest::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.sec = now.as_secs() as i64;
    t.nsec = now.subsec_nanos();
    client.set_time(ctx(), &t).unwrap();
    let mut seed = ReseedRandomRequest::new();
    seed.data = vec![42; 64];
    client.reseed_random(ctx(), &seed).unwrap();
    // A bad request is refused and the agent (PID 1) stays up.
    r.hostname = String::new();
    assert!(client.create_sandbox(ctx(), &r).is_err());
    assert!(client.health(ctx(), &Empty::new()).is_ok());

    // Snapshot the booted sandbox and run the containers in a VM restored
    // from it: a restored VM must serve exactly as a booted one.
    let (snap, mem) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let t = Instant::now();
    let (st, body) = api_request(&api, "PATCH", "/vm", r#"{"state": "Paused"}"#).unwrap();
    assert_eq!(st, 204, "{body}");
    let create = serde_json::json!({"snapshot_path": snap, "mem_file_path": mem}).to_string();
    let (st, body) = api_request(&api, "PUT", "/snapshot/create", &create).unwrap();
    assert_eq!(st, 204, "{body}");
    println!("pause + snapshot of the booted sandbox: {:?}", t.elapsed());
    drop(client);
    drop(guest);
    // Two sandboxes from the one snapshot, side by side.
    let (mut guest, client, uds2) = restore(dir.path(), "a", &snap, &mem);
    let (guest_b, client_b, uds3) = restore(dir.path(), "b", &snap, &mem);
    // Each takes its own identity: randomness, clock, hostname.
    for (c, name) in [(&client, "clone-a"), (&client_b, "clone-b")] {
        let mut seed = ReseedRandomRequest::new();
        let mut f = std::fs::File::open("/dev/urandom").unwrap();
        seed.data = vec![0; 64];
        std::io::Read::read_exact(&mut f, &mut seed.data).unwrap();
        c.reseed_random(ctx(), &seed).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let mut t = SetTimeRequest::new();
        t.sec = now.as_secs() as i64;
        t.nsec = now.subsec_nanos();
        c.set_time(ctx(), &t).unwrap();
        let mut r = CreateSandboxRequest::new();
        r.hostname = name.into();
        r.dns_servers = vec!["10.0.2.3".into()];
        c.create_sandbox(ctx(), &r).unwrap();
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| identity(&uds2, &guest));
        let b = s.spawn(|| identity(&uds3, &guest_b));
        (a.join().unwrap(), b.join().unwrap())
    });
    println!("clone a: {a:?}\nclone b: {b:?}");
    assert_eq!(a.hostname, "clone-a");
    assert_eq!(b.hostname, "clone-b");
    assert_ne!(a.boot_id, b.boot_id);
    assert_ne!(a.random, b.random);
    assert_eq!(a.random.len(), 64, "{a:?}");
    for c in [&a, &b] {
        assert!(
            c.clock_skew.abs() < 1.5,
            "guest clock {:.2} s off",
            c.clock_skew
        );
    }
    client_b.destroy_sandbox(ctx(), &Empty::new()).unwrap();
    drop(guest_b);

    containers_in_the_guest(&uds2, &guest);

    client.destroy_sandbox(ctx(), &Empty::new()).unwrap();
    let status = guest
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "{status}\n{}", guest.tail());
    guest.assert_no_errors(&["husk-agent: mount"]);
}

/// A VM restored from the snapshot, its agent answering Health.
fn restore(
    dir: &std::path::Path,
    tag: &str,
    snap: &std::path::Path,
    mem: &std::path::Path,
) -> (Guest, SandboxClient, std::path::PathBuf) {
    let (api, uds) = (
        dir.join(format!("api-{tag}.sock")),
        dir.join(format!("v-{tag}.sock")),
    );
    let mut cmd = Command::new(husk_vmm_binary().unwrap());
    cmd.arg("--api-sock").arg(&api);
    let guest = Guest::spawn(&format!("husk-vmm (restored {tag})"), cmd).unwrap();
    let t = Instant::now();
    let load = serde_json::json!({"snapshot_path": snap, "mem_file_path": mem,
                                  "resume_vm": true, "vsock_uds_path": uds})
    .to_string();
    let (st, body) = api_request(&api, "PUT", "/snapshot/load", &load).unwrap();
    assert_eq!(st, 204, "{body}\n{}", guest.tail());
    let loaded = t.elapsed();
    let stream = vsock_connect(&uds, AGENT_VSOCK_PORT, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
    let client = SandboxClient::new(ttrpc::Client::new(stream.into_raw_fd()).unwrap());
    let h = client.health(ctx(), &Empty::new()).unwrap();
    assert_eq!(h.status, "SERVING");
    println!(
        "restored {tag}: load answered in {loaded:?}, first Health {:?} after load began",
        t.elapsed()
    );
    (guest, client, uds)
}

#[derive(Debug)]
struct Identity {
    hostname: String,
    boot_id: String,
    random: String,
    clock_skew: f64,
}

/// What a container of a restored sandbox sees of its identity.
fn identity(uds: &std::path::Path, guest: &Guest) -> Identity {
    let t = Duration::from_secs(120);
    let a = AgentConn::connect(Endpoint::Vsock(uds.to_path_buf()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
    let storage = vec![Storage {
        source: "/dev/vdb".into(),
        fstype: "erofs".into(),
        options: vec!["ro".into()],
        mount_point: "busybox".into(),
        ..Default::default()
    }];
    let spec = busybox_spec(
        "busybox",
        &[
            "sh",
            "-c",
            "cat /etc/hostname /proc/sys/kernel/random/boot_id; \
             head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s",
        ],
        false,
    );
    let mut s = a
        .create("id", &spec, Io::OUT_ERR, storage, true)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
    let out = read_all(&mut s.stdout, t).unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    a.wait("id", "").unwrap();
    a.remove("id").unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    let guest_now: f64 = lines[3].trim().parse().unwrap();
    Identity {
        hostname: lines[0].into(),
        boot_id: lines[1].into(),
        random: lines[2].into(),
        // The guest prints whole seconds: its clock lags by < 1 s of that.
        clock_skew: host_now - guest_now - 0.5,
    }
}

/// The container group, against the agent booted above.
fn containers_in_the_guest(uds: &std::path::Path, guest: &Guest) {
    let t = Duration::from_secs(120);
    let a = AgentConn::connect(Endpoint::Vsock(uds.to_path_buf()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
    let storage = || {
        vec![Storage {
            source: "/dev/vdb".into(),
            fstype: "erofs".into(),
            options: vec!["ro".into()],
            mount_point: "busybox".into(),
            ..Default::default()
        }]
    };
    let fail = |e: anyhow::Error| -> ! { panic!("{e:#}\n{}", guest.tail()) };

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
    let mut linux = spec.linux().clone().unwrap();
    let seccomp = serde_json::from_value(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    }))
    .unwrap();
    linux.set_seccomp(Some(seccomp));
    spec.set_linux(Some(linux));
    let start = Instant::now();
    let mut s = a
        .create("c1", &spec, Io::OUT_ERR, storage(), false)
        .unwrap_or_else(|e| fail(e));
    let created = start.elapsed();
    a.containers
        .start_container(actx(t), &container("c1"))
        .unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(s.stdout.as_mut().unwrap(), &mut first).unwrap();
    let started = start.elapsed();
    println!(
        "guest container: CreateContainer {:.2} s, StartContainer to first output {:.2} s",
        created.as_secs_f64(),
        (started - created).as_secs_f64()
    );
    assert_eq!(&first, b"hi\n");
    let out = read_all(&mut s.stdout, t).unwrap();
    assert!(out.contains("nameserver 10.0.2.3"), "{out:?}");
    assert!(out.contains("mkdir=1\n"), "{out:?}");
    assert_eq!(read_all(&mut s.stderr, t).unwrap(), "oops\n");
    assert_eq!(a.wait("c1", "").unwrap().status, 3);
    a.remove("c1").unwrap();

    // A memory limit that the container exceeds: OOM-killed, reported as
    // OOM both by WaitProcess and GetOOMEvent. (The string doubles in user
    // space, so only page faults are emulated kernel work here.)
    let mut spec = busybox_spec(
        "busybox",
        &["sh", "-c", "x=a; while :; do x=$x$x; done"],
        false,
    );
    let mut linux = spec.linux().clone().unwrap();
    let resources: oci_spec::runtime::LinuxResources = serde_json::from_value(
        serde_json::json!({"memory": {"limit": 8 << 20}, "pids": {"limit": 32}}),
    )
    .unwrap();
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    let oom_waiter = {
        let a = AgentConn::connect(Endpoint::Vsock(uds.to_path_buf())).unwrap();
        std::thread::spawn(move || a.containers.get_oom_event(actx(t), &Empty::new()))
    };
    a.create("oom", &spec, Io::default(), storage(), true)
        .unwrap_or_else(|e| fail(e));
    let w = a.wait("oom", "").unwrap();
    assert_eq!((w.status, w.oom_killed), (137, true), "{w:?}");
    let ev = oom_waiter.join().unwrap().unwrap();
    assert_eq!(ev.container_id, "oom");
    let st = a
        .containers
        .stats_container(actx(t), &container("oom"))
        .unwrap();
    assert_eq!(st.memory.limit, 8 << 20, "{st:?}");
    assert!(st.memory.oom_kill >= 1, "{st:?}");
    assert_eq!(st.pids_limit, 32, "{st:?}");
    a.remove("oom").unwrap();

    // A long-running container: exec, stats, update, pause/resume, and the
    // agent's own memory (no pid namespace: /proc/1 is the agent).
    let mut spec = busybox_spec("busybox", &["sh", "-c", "while :; do sleep 1; done"], false);
    let mut linux = spec.linux().clone().unwrap();
    let ns: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Pid)
        .collect();
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    a.create("long", &spec, Io::default(), storage(), true)
        .unwrap_or_else(|e| fail(e));
    let process = |args: &[&str]| {
        serde_json::json!({
            "args": args, "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin:/usr/bin"]
        })
    };
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
        .unwrap();
    let status = read_all(&mut es.stdout, t).unwrap();
    println!("agent (PID 1) after four containers:\n{status}");
    assert!(status.contains("husk-agent"), "{status:?}");
    assert_eq!(a.wait("long", "e1").unwrap().status, 4);
    let update = UpdateContainerRequest {
        container_id: "long".into(),
        resources: br#"{"pids": {"limit": 20}, "memory": {"limit": 33554432},
                        "cpu": {"quota": 50000, "period": 100000}}"#
            .to_vec(),
        ..Default::default()
    };
    a.containers.update_container(actx(t), &update).unwrap();
    let st = a
        .containers
        .stats_container(actx(t), &container("long"))
        .unwrap();
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
    let mut es = a.exec("long", "e2", &process(&cat), Io::OUT_ERR).unwrap();
    assert_eq!(
        read_all(&mut es.stdout, t).unwrap(),
        "50000 100000\n33554432\n20\n"
    );
    assert_eq!(a.wait("long", "e2").unwrap().status, 0);
    a.containers
        .pause_container(actx(t), &container("long"))
        .unwrap();
    let list = a
        .containers
        .list_containers(actx(t), &Empty::new())
        .unwrap();
    assert_eq!(list.containers[0].status, "paused");
    a.containers
        .resume_container(actx(t), &container("long"))
        .unwrap();
    a.remove("long").unwrap();
    let list = a
        .containers
        .list_containers(actx(t), &Empty::new())
        .unwrap();
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
        .unwrap();
    assert_eq!(got.mtu, 16384);
    let list = a.network.list_interfaces(actx(t), &Empty::new()).unwrap();
    assert!(list
        .interfaces
        .iter()
        .any(|i| i.name == "lo" && i.mtu == 16384));
    a.health().unwrap();
}
