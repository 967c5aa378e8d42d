//! `husk` as a user runs it: images imported from the sample tarballs, then
//! `husk run` of busybox in microVMs restored from the runtime's template
//! (the one the agent-guest tests use: same VMM, kernel, image and machine,
//! so no boot of its own when they ran first). Output, exit codes like
//! Docker's, stdin, environment and working directory, and errors that
//! name the problem.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use husk_tests::NetNs;
use husk_tests::{
    guest_kernel, guest_rootfs, husk_cli_binary, husk_vmm_binary, kvm_unavailable,
    root_unavailable, sample_image, skip,
};

struct Husk {
    root: tempfile::TempDir,
    /// A bridge network of the test's own (HUSK_BRIDGE, HUSK_SUBNET),
    /// removed when the test ends; None: the default husk0.
    network: Option<(String, String)>,
}

impl Husk {
    /// A husk with its own store and run directory, or None (and a SKIP
    /// line) without /dev/kvm or root (sandboxes get taps on a bridge).
    fn for_test(test: &str) -> Option<Husk> {
        if let Some(why) = kvm_unavailable().or_else(root_unavailable) {
            skip(test, &why);
            return None;
        }
        Some(Husk {
            root: tempfile::tempdir().unwrap(),
            network: None,
        })
    }

    /// Links enslaved to this husk's own bridge (its sandboxes' taps).
    fn taps_on_bridge(&self) -> Vec<String> {
        let (bridge, _) = self.network.as_ref().expect("a bridge of its own");
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", bridge])
            .output()
            .unwrap();
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1).map(String::from))
            .collect()
    }

    /// husk-vmm processes whose command line names this husk's run
    /// directory (their sockets live there).
    fn vmm_pids(&self) -> Vec<i32> {
        let run = self.root.path().join("run");
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "husk-vmm")
            })
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(run.to_str().unwrap()))
            })
            .collect()
    }

    /// Sandbox directories left in the run directory.
    fn leftover_sandboxes(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(self.root.path().join("run"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(husk_cli_binary().unwrap());
        c.args(args)
            .env("HUSK_ROOT", self.root.path())
            .env("HUSK_RUN", self.root.path().join("run"))
            .env("HUSK_VMM", husk_vmm_binary().unwrap())
            .env("HUSK_KERNEL", guest_kernel().unwrap())
            .env("HUSK_GUEST_IMAGE", guest_rootfs().unwrap());
        if let Some((bridge, subnet)) = &self.network {
            c.env("HUSK_BRIDGE", bridge).env("HUSK_SUBNET", subnet);
        }
        c
    }

    fn run(&self, args: &[&str], stdin: &str) -> Output {
        self.run_env(args, stdin, &[])
    }

    /// `run` with more environment for husk.
    fn run_env(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
        let mut child = self
            .cmd(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        println!(
            "husk {}: {}\nstdout: {:?}\nstderr: {:?}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Husk {
    /// What a test left running goes with it, even when it failed half way:
    /// its containers (`husk rm -f`), then any VMM still up (a leaked VM
    /// keeps a `husk-*` tap that later tests trip over). Then the test's own
    /// bridge, with the NAT rules husk added.
    fn drop(&mut self) {
        if let Ok(out) = self.cmd(&["ps", "-a"]).output() {
            let ids: Vec<String> = text(&out.stdout)
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect();
            for id in ids {
                match self.cmd(&["rm", "-f", &id]).output() {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => eprintln!("cleanup: husk rm -f {id}: {}", text(&o.stderr)),
                    Err(e) => eprintln!("cleanup: husk rm -f {id}: {e}"),
                }
            }
        }
        for pid in self.vmm_pids() {
            eprintln!("cleanup: husk-vmm {pid} was left running; killing it");
            // SAFETY: kill(2) with a pid read from /proc and a signal
            // number; no memory is passed.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                eprintln!("cleanup: kill {pid}: {}", std::io::Error::last_os_error());
            }
        }
        let Some((bridge, subnet)) = &self.network else {
            return;
        };
        let _ = Command::new("ip").args(["link", "del", bridge]).status();
        for (table, rule) in [
            (
                "nat",
                format!("POSTROUTING -s {subnet} ! -o {bridge} -j MASQUERADE"),
            ),
            ("filter", format!("FORWARD -i {bridge} -j ACCEPT")),
            (
                "filter",
                format!("FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
            ),
        ] {
            let _ = Command::new("iptables")
                .args(["-w", "-t", table, "-D"])
                .args(rule.split(' '))
                .status();
        }
    }
}

/// A running VMM's counters (`GET /metrics` on its API socket).
fn vmm_metrics(api: &std::path::Path) -> serde_json::Value {
    use std::io::Read;
    let mut c = std::os::unix::net::UnixStream::connect(api)
        .unwrap_or_else(|e| panic!("{}: {e}", api.display()));
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: husk\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {r}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn husk_run_busybox_like_docker_run() {
    let Some(h) = Husk::for_test("husk_run_busybox_like_docker_run") else {
        return;
    };
    // Both tarball forms of the sample import as the same image.
    for f in ["busybox.oci.tar", "busybox.tar"] {
        let archive = sample_image(f).unwrap();
        let out = h.run(&["image", "import", archive.to_str().unwrap()], "");
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("husk.local/busybox:latest"));
    }
    let ls = text(&h.run(&["image", "ls"], "").stdout);
    assert_eq!(ls.lines().count(), 2, "{ls}");

    let img = "husk.local/busybox";
    let out = h.run(
        &[
            "run",
            "--rm",
            "-e",
            "GREETING=hello",
            "-w",
            "/etc",
            img,
            "sh",
            "-c",
            "echo $GREETING from $(uname -s) in $(pwd); echo to-stderr >&2; exit 3",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "hello from Linux in /etc\n");
    assert_eq!(text(&out.stderr), "to-stderr\n");

    // -i: stdin reaches the container, and its end is the container's EOF.
    let out = h.run(
        &["run", "-i", "--rm", img, "sh", "-c", "wc -l"],
        "a\nb\nc\n",
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "3");

    // -t: a terminal in the container (CRLF line ends, stderr merged into
    // it), even when this husk has none.
    let out = h.run(
        &[
            "run",
            "-t",
            "--rm",
            img,
            "sh",
            "-c",
            "tty; echo $TERM; echo e >&2; exit 4",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(4));
    let tty = text(&out.stdout);
    assert!(tty.starts_with("/dev/pts/"), "{tty:?}");
    assert!(tty.ends_with("\r\nxterm\r\ne\r\n"), "{tty:?}");

    // --memory and --cpus reach the container's cgroup (the microVM keeps
    // the template's size: 64 MiB + 128 fits in 256, 0.5 CPU in one vCPU).
    let out = h.run(
        &[
            "run",
            "--rm",
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            img,
            "cat",
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/cpu.max",
        ],
        "",
    );
    assert_eq!(text(&out.stdout), "67108864\n50000 100000\n");

    // A named volume keeps its data from one run (one microVM) to the next;
    // mounted :ro, it refuses writes.
    let out = h.run(
        &[
            "run",
            "--rm",
            "-v",
            "data:/data",
            img,
            "sh",
            "-c",
            "echo kept > /data/f",
        ],
        "",
    );
    assert!(out.status.success());
    let out = h.run(
        &[
            "run",
            "--rm",
            "--mount",
            "type=volume,source=data,target=/data,readonly",
            "--mount",
            "type=tmpfs,target=/scratch",
            img,
            "sh",
            "-c",
            "cat /data/f; touch /data/g 2>/dev/null || echo read-only; grep -c ' /scratch tmpfs' /proc/mounts",
        ],
        "",
    );
    assert_eq!(text(&out.stdout), "kept\nread-only\n1\n");
    let ls = text(&h.run(&["volume", "ls"], "").stdout);
    assert!(ls.contains("data"), "{ls}");

    // Host paths over virtio-fs: a directory read-write, one read-only
    // (refused in the guest, and read-only in virtiofsd's own mount
    // namespace, so not even the guest kernel could write it), a single
    // file. The container waits for the test's go-ahead while the test
    // looks at virtiofsd.
    let host = h.root.path().join("hostdir");
    let ro = h.root.path().join("rodir");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(host.join("in.txt"), "from the host\n").unwrap();
    std::fs::write(ro.join("k"), "keep\n").unwrap();
    let file = h.root.path().join("motd");
    std::fs::write(&file, "a single file\n").unwrap();
    let script = "cat /data/in.txt /hostfile; echo written > /data/out.txt; \
                  touch /ro/x 2>/dev/null || echo ro-refused; cat /ro/k; \
                  touch /data/ready; n=0; \
                  until [ -e /data/go ] || [ $n -ge 600 ]; do sleep 0.1; n=$((n+1)); done";
    let vols = [
        format!("{}:/data", host.display()),
        format!("{}:/ro:ro", ro.display()),
    ];
    let bind = format!(
        "type=bind,source={},target=/hostfile,readonly",
        file.display()
    );
    let child = h
        .cmd(&[
            "run", "--rm", "-v", &vols[0], "-v", &vols[1], "--mount", &bind, img, "sh", "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !host.join("ready").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let ours = |pid: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&*h.root.path().to_string_lossy()))
            .unwrap_or(false)
    };
    let virtiofsd: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "virtiofsd")
                && ours(p)
        })
        .collect();
    assert!(!virtiofsd.is_empty(), "no virtiofsd serving the sandbox");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", virtiofsd[0])).unwrap();
    let b1 = mounts
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| m.ends_with("/b1"))
        })
        .unwrap_or_else(|| panic!("no b1 mount in virtiofsd's namespace: {mounts}"));
    assert!(
        b1.split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{b1}"
    );
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains("/shared/b"),
        "share mounts leaked to the host: {host_mounts}"
    );
    std::fs::write(host.join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "from the host\na single file\nro-refused\nkeep\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("out.txt")).unwrap(),
        "written\n"
    );
    assert!(!ro.join("x").exists());
    // Gone, or exited and waiting for an init to reap it (its inner
    // process is orphaned when the outer one exits first).
    let running = |p: &String| {
        std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains("Z (zombie)"))
        })
    };
    assert!(
        !virtiofsd.iter().any(running),
        "virtiofsd outlived its sandbox"
    );
    // --mount type=bind wants an existing source, as Docker's does.
    let missing = format!(
        "type=bind,source={}/nope,target=/x",
        h.root.path().display()
    );
    let out = h.run(&["run", "--rm", "--mount", &missing, img, "true"], "");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("bind source path does not exist"));
    assert!(h.run(&["volume", "rm", "data"], "").status.success());

    // Docker's exit codes: 127 for a command not found, 125 for husk's own
    // errors, with the cause named.
    let out = h.run(&["run", "--rm", img, "no-such-command"], "");
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("no-such-command"));
    let out = h.run(&["run", "--rm", "husk.local/nothing", "true"], "");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("not found"));
    let out = h.run(&["run", "--rm", "--name", "bad/name", img, "true"], "");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("bad/name"));

    // -d: the container outlives this husk; ps, logs, exec, stop, rm.
    let out = h.run(
        &[
            "run",
            "-d",
            "--name",
            "web",
            "-v",
            "webdata:/d:ro",
            img,
            "sh",
            "-c",
            "echo started; trap 'echo got TERM; exit 7' TERM; while :; do sleep 1; done",
        ],
        "",
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "web\n");
    let ps = text(&h.run(&["ps"], "").stdout);
    assert!(ps.contains("web") && ps.contains("Up"), "{ps}");
    let out = h.run(
        &["exec", "web", "sh", "-c", "echo in exec; hostname; exit 5"],
        "",
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(text(&out.stdout), "in exec\nweb\n");
    // Its husk dies (SIGKILL): the next husk command adopts it. The same
    // VMM runs on, and what it prints still reaches its log (below).
    let owner_of = || -> i64 {
        let info: serde_json::Value =
            serde_json::from_slice(&h.run(&["inspect", "web"], "").stdout).unwrap();
        info[0]["State"]["Pid"].as_i64().unwrap_or(0)
    };
    let owner = owner_of();
    let vmms = h.vmm_pids();
    assert!(owner > 0 && vmms.len() == 1, "owner {owner}, VMMs {vmms:?}");
    // SAFETY: a signal to a process this test started (through husk).
    assert_eq!(unsafe { libc::kill(owner as i32, libc::SIGKILL) }, 0);
    // SAFETY: signal 0 only asks whether it exists.
    while unsafe { libc::kill(owner as i32, 0) } == 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ps = text(&h.run(&["ps"], "").stdout);
    assert!(ps.contains("web") && ps.contains("Up"), "adopted: {ps}");
    let adopter = owner_of();
    assert!(
        adopter > 0 && adopter != owner,
        "owner {owner}, then {adopter}"
    );
    assert_eq!(h.vmm_pids(), vmms, "the same VMM");
    let out = h.run(&["rm", "web"], "");
    assert_eq!(out.status.code(), Some(125), "rm of a running container");
    assert!(text(&out.stderr).contains("running"));
    assert!(h.run(&["stop", "-t", "30", "web"], "").status.success());
    let ps = text(&h.run(&["ps", "-a"], "").stdout);
    assert!(ps.contains("Exited (7)"), "{ps}");
    assert_eq!(
        text(&h.run(&["logs", "web"], "").stdout),
        "started\ngot TERM\n"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&h.run(&["inspect", "web"], "").stdout).unwrap();
    let state = &info[0]["State"];
    assert_eq!(state["Status"], "exited", "{info}");
    assert_eq!(state["ExitCode"], 7, "{info}");
    assert_eq!(state["OOMKilled"], false);
    assert_eq!(info[0]["Mounts"][0]["Name"], "webdata");
    assert_eq!(info[0]["Mounts"][0]["RW"], false);
    assert!(h.run(&["rm", "web"], "").status.success());
    assert_eq!(text(&h.run(&["ps", "-a"], "").stdout).lines().count(), 1);
    assert!(h.run(&["volume", "rm", "webdata"], "").status.success());

    // A VMM killed with SIGKILL: the container shows as exited, and its
    // sandbox is cleaned up.
    let out = h.run(&["run", "-d", "--name", "doomed", img, "sleep", "600"], "");
    assert!(out.status.success());
    let sandbox = h.root.path().join("run/doomed");
    let vmm = *h.vmm_pids().first().expect("the sandbox's husk-vmm");
    // SAFETY: a signal to a process this test started (through husk).
    assert_eq!(unsafe { libc::kill(vmm, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ps = text(&h.run(&["ps", "-a"], "").stdout);
        if ps.contains("Exited") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ps}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(!sandbox.exists(), "sandbox state left behind");
    assert!(h.run(&["rm", "doomed"], "").status.success());

    // Nothing is left behind: no sandbox state, no VMM.
    assert_eq!(h.leftover_sandboxes(), Vec::<std::path::PathBuf>::new());
    assert_eq!(h.vmm_pids(), Vec::<i32>::new());
}

#[test]
fn a_corrupt_image_is_refused_and_the_store_kept() {
    let h = Husk {
        root: tempfile::tempdir().unwrap(),
        network: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let good = sample_image("busybox.oci.tar").unwrap();
    // Flip a byte inside the layer blob: its digest no longer matches.
    let unpacked = dir.path().join("oci");
    std::fs::create_dir(&unpacked).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&good)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    let blobs = unpacked.join("blobs/sha256");
    let layer = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&layer).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&layer, &bytes).unwrap();
    let bad = dir.path().join("bad.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&bad)
        .arg("-C")
        .arg(&unpacked)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = h.run(&["image", "import", bad.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("corrupt"),
        "{}",
        text(&out.stderr)
    );
    // A truncated archive, too.
    let cut = dir.path().join("cut.tar");
    let whole = std::fs::read(&good).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let out = h.run(&["image", "import", cut.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("truncated"),
        "{}",
        text(&out.stderr)
    );
    // Nothing of either entered the store.
    let ls = text(&h.run(&["image", "ls"], "").stdout);
    assert_eq!(ls.lines().count(), 1, "{ls}");
    let blobs = h.root.path().join("images/blobs/sha256");
    assert_eq!(std::fs::read_dir(blobs).unwrap().count(), 0);
}

/// Twenty run/rm cycles leave nothing behind: no VMM process, no sandbox
/// or container state, no lease on a volume.
#[test]
fn run_rm_cycles_leave_nothing_behind() {
    let Some(mut h) = Husk::for_test("run_rm_cycles_leave_nothing_behind") else {
        return;
    };
    // A bridge of its own: what is left on it is this test's.
    h.network = Some((
        format!("hkc{}", std::process::id() % 100_000),
        "10.213.7.0/24".into(),
    ));
    let archive = sample_image("busybox.tar").unwrap();
    assert!(h
        .run(&["image", "import", archive.to_str().unwrap()], "")
        .status
        .success());
    let prefix = format!("cyc{}-", std::process::id());
    // Each cycle is a whole sandbox's life (~30 s of emulated guest kernel
    // here); what one cycle leaks shows after the first, so a few cycles
    // suffice (`make stress TESTS=cli_run` repeats the whole test).
    const CYCLES: usize = 6;
    for i in 0..CYCLES {
        let name = format!("{prefix}{i}");
        let out = h.run(
            &[
                "run",
                "--rm",
                "--name",
                &name,
                "-v",
                "cycle:/v",
                "husk.local/busybox",
                "sh",
                "-c",
                "echo $((1 + $(cat /v/n 2>/dev/null || echo 0))) > /v/n",
            ],
            "",
        );
        assert!(out.status.success(), "cycle {i}");
    }
    let out = h.run(
        &[
            "run",
            "--rm",
            "-v",
            "cycle:/v",
            "husk.local/busybox",
            "cat",
            "/v/n",
        ],
        "",
    );
    assert_eq!(
        text(&out.stdout),
        format!("{CYCLES}\n"),
        "every cycle's write reached the volume"
    );
    assert_eq!(h.vmm_pids(), Vec::<i32>::new(), "a husk-vmm still runs");
    assert_eq!(h.leftover_sandboxes(), Vec::<std::path::PathBuf>::new());
    assert_eq!(h.taps_on_bridge(), Vec::<String>::new(), "taps left");
    // Every address lease is free again (a lease file nobody holds).
    let (bridge, _) = h.network.clone().unwrap();
    for lease in std::fs::read_dir(format!("/run/husk-net/{bridge}"))
        .unwrap()
        .flatten()
    {
        let held = std::fs::File::open(lease.path()).is_ok_and(|f| {
            use std::os::fd::AsRawFd;
            // SAFETY: a non-blocking flock probe on a file we opened.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
        });
        assert!(!held, "{} is still leased", lease.path().display());
    }
    // No cgroup of a VMM is left (confined VMMs get one per sandbox).
    for hierarchy in ["", "memory", "cpu"] {
        let dir = std::path::Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join("husk");
        if let Ok(d) = std::fs::read_dir(&dir) {
            let left: Vec<_> = d
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect();
            assert!(
                left.is_empty(),
                "cgroups left in {}: {left:?}",
                dir.display()
            );
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(h.root.path().to_str().unwrap()),
        "mounts left under the test's directories"
    );
    let ps = text(&h.run(&["ps", "-a"], "").stdout);
    assert_eq!(ps.lines().count(), 1, "{ps}");
    assert!(
        h.run(&["volume", "rm", "cycle"], "").status.success(),
        "the volume is not held"
    );
}

/// Waits for `url` (via `get`) to answer with `want` in its body.
fn wait_for_page(get: impl Fn() -> String, want: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let body = get();
        if body.contains(want) || std::time::Instant::now() > deadline {
            return body;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Runs `f` on a thread inside `ns` (sockets it opens stay there).
fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns with a namespace fd we hold; it moves only
            // this thread, which ends with `f`.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

fn http_get(addr: &str) -> String {
    use std::io::Read;
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    // Generous: the guest's TCP stack runs in emulated kernel code, and
    // other tests' guests share the two host cores.
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let _ = c.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    if let Err(e) = c.read_to_string(&mut body) {
        body.push_str(&format!("[reading {addr}: {e}]"));
    }
    body
}

#[test]
fn bridge_network_ports_and_network_none() {
    let Some(h) = Husk::for_test("bridge_network_ports_and_network_none") else {
        return;
    };
    for f in ["busybox.oci.tar", "httpd.oci.tar"] {
        let archive = sample_image(f).unwrap();
        assert!(h
            .run(&["image", "import", archive.to_str().unwrap()], "")
            .status
            .success());
    }
    let page = "hello from a husk microVM";
    let out = h.run(
        &[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            "8080:80",
            "husk.local/httpd",
        ],
        "",
    );
    assert!(out.status.success());

    // From the host, through the published port.
    let body = wait_for_page(|| http_get("127.0.0.1:8080"), page);
    assert!(body.contains(page), "{body:?}");
    let info: serde_json::Value =
        serde_json::from_slice(&h.run(&["inspect", "web"], "").stdout).unwrap();
    let net = &info[0]["NetworkSettings"];
    let ip = net["IPAddress"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.89."), "{net}");
    assert_eq!(net["Ports"]["80/tcp"][0]["HostPort"], "8080", "{net}");
    let ps = text(&h.run(&["ps"], "").stdout);
    assert!(ps.contains("0.0.0.0:8080->80/tcp"), "{ps}");

    // Its husk-vmm is confined: an unprivileged uid, PID 1 of a pid
    // namespace of its own, its own mount and IPC namespaces, chrooted into
    // the sandbox's jail, its memory charged to a cgroup of its own.
    let vmm = *h.vmm_pids().first().expect("web's husk-vmm");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["64000"; 4], "{status}");
    assert_eq!(
        field("NSpid:").last().map(String::as_str),
        Some("1"),
        "{status}"
    );
    for ns in ["mnt", "pid", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the host");
    }
    let root = std::fs::read_link(format!("/proc/{vmm}/root")).unwrap();
    assert!(root.ends_with("web/jail"), "{}", root.display());
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let group = cgroups
        .lines()
        .find_map(|l| {
            let (ctrl, path) = l.split_once(':')?.1.split_once(':')?;
            (ctrl == "memory" || ctrl.is_empty()).then(|| (ctrl.to_string(), path.to_string()))
        })
        .filter(|(_, p)| p.contains("/husk/web-"))
        .unwrap_or_else(|| panic!("no husk cgroup: {cgroups}"));
    let base = std::path::Path::new("/sys/fs/cgroup").join(&group.0);
    let dir = base.join(group.1.trim_start_matches('/'));
    let used: u64 = ["memory.current", "memory.usage_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        used > 1 << 20,
        "the VMM's memory is accounted: {used} bytes in {}",
        dir.display()
    );

    // From another host: a network namespace joined to this one by a veth
    // pair, reaching the host's address on it.
    let other = NetNs::new("peer").unwrap();
    let tag = std::process::id() % 100_000;
    let (host_if, peer_if) = (format!("hkh{tag}"), format!("hkp{tag}"));
    let sh = |cmd: &str| {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    };
    sh(&format!(
        "ip link add {host_if} type veth peer name {peer_if} && ip link set {peer_if} netns {ns} && \
         ip addr add 192.168.251.1/30 dev {host_if} && ip link set {host_if} up && \
         ip netns exec {ns} ip addr add 192.168.251.2/30 dev {peer_if} && \
         ip netns exec {ns} ip link set {peer_if} up",
        ns = other.name
    ));
    let from_peer = in_netns(&other, || {
        wait_for_page(|| http_get("192.168.251.1:8080"), page)
    });
    assert!(from_peer.contains(page), "{from_peer}");

    // Sandbox to sandbox by address, and out through NAT to the other
    // host, which has no route back to the bridge's range: it sees the
    // host's address.
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = in_netns(&other, || {
        std::net::TcpListener::bind("192.168.251.2:9000").unwrap()
    });
    std::thread::spawn(move || {
        use std::io::Read;
        for mut c in listener.incoming().flatten() {
            let _ = tx.send(c.peer_addr().unwrap().ip().to_string());
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nfrom the other host\n");
        }
    });
    let script = format!(
        "wget -qO- http://{ip}/; timeout 20 wget -qO- http://192.168.251.2:9000/f; ping -c 1 -W 5 {ip} >/dev/null && echo ping ok"
    );
    let out = h.run(
        &["run", "--rm", "husk.local/busybox", "sh", "-c", &script],
        "",
    );
    let got = text(&out.stdout);
    assert!(got.contains(page), "{got}");
    assert!(got.contains("from the other host"), "{got}");
    assert!(got.ends_with("ping ok\n"), "{got}");
    assert_eq!(rx.try_recv().as_deref(), Ok("192.168.251.1"), "masqueraded");
    let _ = Command::new("ip").args(["link", "del", &host_if]).status();

    // A taken port fails the run, naming it; -p needs a network.
    let out = h.run(
        &["run", "--rm", "-p", "8080:80", "husk.local/busybox", "true"],
        "",
    );
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("8080") && err.contains("already in use"),
        "{err}"
    );
    let out = h.run(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "-p",
            "80",
            "husk.local/busybox",
            "true",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(125));

    // --network none: loopback only, and it is up.
    let out = h.run(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "husk.local/busybox",
            "sh",
            "-c",
            "ls /sys/class/net; ping -c 1 -W 5 127.0.0.1 >/dev/null && echo lo up; timeout 10 wget -qO- http://10.89.0.1/ 2>&1 | head -1",
        ],
        "",
    );
    let got = text(&out.stdout);
    assert!(got.starts_with("lo\nlo up\n"), "{got}");
    assert!(got.contains("unreachable"), "{got}");

    assert!(h.run(&["stop", "-t", "1", "web"], "").status.success());
    assert_eq!(http_get("127.0.0.1:8080"), "", "the port is released");
    let info: serde_json::Value =
        serde_json::from_slice(&h.run(&["inspect", "web"], "").stdout).unwrap();
    assert_eq!(info[0]["NetworkSettings"]["IPAddress"], "");
    assert!(h.run(&["rm", "web"], "").status.success());
    assert_eq!(h.vmm_pids(), Vec::<i32>::new());
}

/// Debian's docker-registry on a free loopback port, its storage in a
/// directory of its own; stopped when dropped.
struct Registry {
    child: std::process::Child,
    addr: String,
    storage: tempfile::TempDir,
}

impl Registry {
    fn start() -> Result<Registry, String> {
        let bin = std::path::Path::new("/usr/bin/docker-registry");
        if !bin.exists() {
            return Err("no /usr/bin/docker-registry (apt-get install docker-registry)".into());
        }
        let storage = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .args(["serve", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting docker-registry: {e}"))?;
        let r = Registry {
            child,
            addr,
            storage,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !http_get(&r.addr).starts_with("HTTP/") {
            if std::time::Instant::now() > deadline {
                return Err("docker-registry did not answer within 20 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(r)
    }

    /// Pushes a sample OCI archive as `name` with skopeo.
    fn push(&self, archive: &str, name: &str) {
        let src = format!("oci-archive:{}", sample_image(archive).unwrap().display());
        let dst = format!("docker://{}/{name}", self.addr);
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", &src, &dst])
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(out.status.success(), "skopeo: {}", text(&out.stderr));
    }

    /// The registry's stored file for blob `digest`.
    fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pull_from_a_registry_checks_every_digest() {
    let Some(h) = Husk::for_test("pull_from_a_registry_checks_every_digest") else {
        return;
    };
    let reg = match Registry::start() {
        Ok(r) => r,
        Err(why) => {
            skip("pull_from_a_registry_checks_every_digest", &why);
            return;
        }
    };
    reg.push("httpd.oci.tar", "demo/httpd:1.0");
    let name = format!("{}/demo/httpd:1.0", reg.addr);

    // A layer corrupted in the registry (same size, other bytes): the pull
    // fails naming the digest, and the store stays empty.
    let raw = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{name}"),
        ])
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let layer = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let file = reg.blob_file(&layer);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();
    let out = h.run(&["pull", &name], "");
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains(&layer) && err.to_lowercase().contains("digest"),
        "{err}"
    );
    let ls = text(&h.run(&["image", "ls"], "").stdout);
    assert_eq!(ls.lines().count(), 1, "nothing entered the store: {ls}");
    let store = h.root.path().join("images");
    for d in ["blobs/sha256", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(store.join(d))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{d}: {left:?}");
    }

    // Intact again: `run` pulls what it does not have, and runs it.
    std::fs::write(&file, &good).unwrap();
    let out = h.run(&["run", "--rm", &name, "cat", "/www/index.html"], "");
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("hello from a husk microVM"));
    assert!(text(&out.stderr).contains("Unable to find image"));
    // The stored image is the registry's: same manifest digest, same config.
    let digest = format!(
        "sha256:{}",
        text(
            &Command::new("sha256sum")
                .arg(
                    h.root.path().join("images/blobs/sha256").join(
                        manifest["config"]["digest"]
                            .as_str()
                            .unwrap()
                            .trim_start_matches("sha256:")
                    )
                )
                .output()
                .unwrap()
                .stdout
        )
        .split_whitespace()
        .next()
        .unwrap()
    );
    assert_eq!(digest, manifest["config"]["digest"].as_str().unwrap());
    let ls = text(&h.run(&["image", "ls"], "").stdout);
    assert!(ls.contains(&name), "{ls}");
    // A second pull fetches nothing new and succeeds.
    assert!(h.run(&["image", "pull", &name], "").status.success());
}

/// bench/run's instruments on the real path: a profiled run's guest steps
/// (counted, with libcontainer's own events), and the floor's bare
/// fork+exec with its status and a clear error for a missing program.
#[test]
fn the_guest_steps_and_the_floor_are_measured() {
    let Some(h) = Husk::for_test("the_guest_steps_and_the_floor_are_measured") else {
        return;
    };
    let archive = sample_image("busybox.oci.tar").unwrap();
    assert!(h
        .run(&["image", "import", archive.to_str().unwrap()], "")
        .status
        .success());
    let img = "husk.local/busybox";
    // The base template's path: its container is created in the run.
    let out = h
        .cmd(&["run", "--rm", "--boot", "template", img, "true"])
        .env("HUSK_TIMINGS", "1")
        .env("HUSK_PROFILE", "1")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps: std::collections::HashMap<&str, &str> = err
        .lines()
        .find_map(|l| l.strip_prefix("husk-guest-steps: "))
        .unwrap_or_else(|| panic!("no guest steps: {err}"))
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    // name=seconds/forks/context switches/page faults ("-": not kept).
    let build: Vec<&str> = steps["create.build"].split('/').collect();
    assert_eq!(build.len(), 4, "{steps:?}");
    assert!(build[0].parse::<f64>().unwrap() > 0.0, "{steps:?}");
    // The builder, the intermediate process and the container's init.
    assert!(build[1].parse::<u64>().unwrap() >= 3, "{steps:?}");
    for s in [
        "sandbox.create",
        "create",
        "start",
        "run",
        "build.libcontainer",
    ] {
        assert!(steps.contains_key(s), "no {s}: {steps:?}");
    }
    assert!(
        steps
            .keys()
            .any(|k| k.starts_with("lc.") && k.contains("mounting")),
        "libcontainer's events: {steps:?}"
    );
    assert!(err.contains("husk-timings: "), "{err}");

    let out = h.run(&["bare-exec", img, "sh", "-c", "exit 3"], "");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    let guest: f64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("guest-s="))
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    assert!(
        line.starts_with("bare-exec: status=3 ") && guest > 0.0,
        "{line}"
    );

    let out = h.run(&["bare-exec", img, "no-such-program"], "");
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no-such-program") && err.contains("No such file"),
        "{err}"
    );
    assert!(
        h.leftover_sandboxes().is_empty(),
        "{:?}",
        h.leftover_sandboxes()
    );
}

/// `--boot parked`: the first run of an image and its options builds a
/// template with the container already created and parked; the next runs
/// restore it and only launch their own process, with their own args,
/// environment, streams, working directory and host name. What a user sees
/// is what the usual path gives: output, exit status, Docker's 127 for a
/// missing program.
#[test]
fn a_parked_container_template_is_built_once_and_launched_after() {
    let Some(h) = Husk::for_test("a_parked_container_template_is_built_once_and_launched_after")
    else {
        return;
    };
    let archive = sample_image("busybox.oci.tar").unwrap();
    assert!(h
        .run(&["image", "import", archive.to_str().unwrap()], "")
        .status
        .success());
    let img = "husk.local/busybox";
    let run = |name: &str, args: &[&str], stdin: &str| {
        let mut all = vec!["run", "--rm", "-i", "--boot", "parked", "--hostname", name];
        all.extend(args);
        let out = h.run_env(&all, stdin, &[("HUSK_TIMINGS", "1")]);
        let err = text(&out.stderr);
        // A run whose container was refused prints no timings.
        let parked = err
            .lines()
            .find_map(|l| l.strip_prefix("husk-timings: parked="))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("none")
            .to_string();
        (out, parked, err)
    };
    let script = "read x; echo $GREETING $x from $(hostname) in $(pwd); echo to-stderr >&2; exit 3";
    let (out, parked, err) = run(
        "parked-a",
        &[
            "-e",
            "GREETING=hello",
            "-w",
            "/etc",
            img,
            "sh",
            "-c",
            script,
        ],
        "there\n",
    );
    assert_eq!(parked, "built", "{err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(text(&out.stdout), "hello there from parked-a in /etc\n");
    assert!(err.starts_with("to-stderr\n"), "{err}");
    // Another process, environment and name, the same template.
    let (out, parked, err) = run(
        "parked-b",
        &["-e", "GREETING=hi", "-w", "/etc", img, "sh", "-c", script],
        "again\n",
    );
    assert_eq!(parked, "restored", "{err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(text(&out.stdout), "hi again from parked-b in /etc\n");
    // The template holds its first run's program (busybox's sh, over a
    // MiB) in the guest's page cache, read before its snapshot: a run
    // restored from it reads next to nothing from the image's drive.
    let out = h.run(
        &[
            "run", "-d", "--boot", "parked", "--name", "parked-e", "-w", "/etc", img, "sh", "-c",
            "sleep 60",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // What a running container's VMM has read from its drives, 5 s after
    // its run returned.
    let read = |name: &str| -> u64 {
        std::thread::sleep(std::time::Duration::from_secs(5));
        let m = vmm_metrics(&h.root.path().join(format!("run/{name}/api.sock")));
        m["block"]["read_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{m}"))
    };
    // Its `sh` runs `sleep` once started: both are busybox.
    let bytes = read("parked-e");
    println!("parked-e read {bytes} bytes from its drives");
    assert!(
        bytes < 256 << 10,
        "a restored run read {bytes} bytes from its drives: its program was not in the template's page cache"
    );
    assert!(h.run(&["rm", "-f", "parked-e"], "").status.success());
    // A dynamically linked program: its loader and libc are read into the
    // template's page cache with it (agent/src/warm.rs follows PT_INTERP
    // and DT_NEEDED), so its restored run reads next to nothing either.
    let dash = sample_image("dash.oci.tar").unwrap();
    assert!(h
        .run(&["image", "import", dash.to_str().unwrap()], "")
        .status
        .success());
    let (out, parked, err) = run("parked-f", &["husk.local/dash", "dash", "-c", "exit 4"], "");
    assert_eq!(parked, "built", "{err}");
    assert_eq!(out.status.code(), Some(4), "{err}");
    let out = h.run(
        &[
            "run",
            "-d",
            "--boot",
            "parked",
            "--name",
            "parked-g",
            "husk.local/dash",
            "dash",
            "-c",
            "while :; do :; done",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = read("parked-g");
    println!("parked-g (dash, dynamic) read {bytes} bytes from its drives");
    assert!(
        bytes < 256 << 10,
        "a restored dynamic program's run read {bytes} bytes from its drives: its loader or libraries were not in the template's page cache"
    );
    assert!(h.run(&["rm", "-f", "parked-g"], "").status.success());
    // A missing program: Docker's 127 and its message, as without parking
    // (refused by the launch: the container was restored parked).
    let (out, _, err) = run("parked-c", &["-w", "/etc", img, "no-such-program"], "");
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(
        err.contains("LaunchContainer")
            && err.contains("\"no-such-program\": executable file not found"),
        "{err}"
    );
    // Another working directory is another template.
    let (out, parked, err) = run("parked-d", &["-w", "/tmp", img, "pwd"], "");
    assert_eq!(parked, "built", "{err}");
    assert_eq!(text(&out.stdout), "/tmp\n", "{err}");
    // Nothing is left running.
    let ps = text(&h.run(&["ps", "-a"], "").stdout);
    assert_eq!(ps.lines().count(), 1, "{ps}");
}
