//! containerd-shim-husk-v2 under a real containerd (Debian's 1.6), started
//! by the test with its own root, state, sockets and config: `ctr run` of
//! the busybox sample with `--runtime io.containerd.husk.v2`, side by side
//! with `io.containerd.runc.v2`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_tests::containerd::Options;
use husk_tests::{kvm_unavailable, root_unavailable, sample_image, skip};

const HUSK: &str = "io.containerd.husk.v2";
const RUNC: &str = "io.containerd.runc.v2";
const IMAGE: &str = "husk.local/busybox:latest";

/// A containerd of the test's own with husk's shim, the busybox sample
/// imported; stopped (and its shims with it) when dropped.
struct Containerd(husk_tests::Containerd);

impl Containerd {
    fn start(test: &str) -> Option<Containerd> {
        if let Some(why) = kvm_unavailable().or_else(root_unavailable) {
            skip(test, &why);
            return None;
        }
        husk_tests::programs::require("containerd").unwrap_or_else(|e| panic!("{e:#}"));
        let c = husk_tests::Containerd::start_with(&Options {
            husk: true,
            debug: true,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        let c = Containerd(c);
        let archive = sample_image("busybox.tar").unwrap();
        let out = c.ctr(&["image", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
        Some(c)
    }

    fn sock(&self) -> &Path {
        &self.0.socket
    }

    fn dir(&self) -> &Path {
        self.0.dir()
    }

    fn husk_run(&self) -> &Path {
        self.0.husk_run()
    }

    /// containerd's log and the live sandboxes' guest consoles.
    fn log(&self) -> String {
        format!("{}\n{}", self.0.log(), self.0.consoles(12000))
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let out = self.0.ctr_output(args).unwrap();
        println!(
            "ctr {}: {}\nstdout: {:?}\nstderr: {:?}",
            args.join(" "),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    /// Waits until `ctr task ls` shows `id` as `status`.
    fn wait_status(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let ls = text(&self.ctr(&["task", "ls"]).stdout);
            if ls.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&id) && f.get(2) == Some(&status)
            }) {
                return;
            }
            assert!(Instant::now() < deadline, "{id} never {status}: {ls}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(String::from)
        .collect()
}

#[test]
fn ctr_runs_a_task_in_a_husk_vm_as_runc_does() {
    let Some(c) = Containerd::start("ctr_runs_a_task_in_a_husk_vm_as_runc_does") else {
        return;
    };
    // Output, stderr and exit code as runc gives them; the kernel is the
    // guest's, not the host's.
    let script = "echo out; echo err >&2; uname -r; exit 3";
    let run = |runtime: &str, id: &str| {
        c.ctr(&[
            "run",
            "--runtime",
            runtime,
            "--rm",
            IMAGE,
            id,
            "sh",
            "-c",
            script,
        ])
    };
    let runc = run(RUNC, "with-runc");
    let husk = run(HUSK, "with-husk");
    assert_eq!(runc.status.code(), Some(3), "{}", c.log());
    assert_eq!(
        husk.status.code(),
        runc.status.code(),
        "stdout {:?} stderr {:?}\ncontainerd: {}",
        text(&husk.stdout),
        text(&husk.stderr),
        c.log()
    );
    let (ro, ho) = (text(&runc.stdout), text(&husk.stdout));
    let (rl, hl): (Vec<&str>, Vec<&str>) = (ro.lines().collect(), ho.lines().collect());
    assert_eq!(hl.first(), rl.first(), "{ho:?} vs {ro:?}");
    assert_eq!(text(&husk.stderr), text(&runc.stderr));
    let host_kernel = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_eq!(rl.get(1).copied(), Some(host_kernel.trim()));
    assert!(
        hl.get(1)
            .is_some_and(|k| *k != host_kernel.trim() && k.starts_with("6.12")),
        "{ho:?}"
    );

    // A terminal: the same bytes as under runc (ctr needs one of its own:
    // script(1) gives it a pty).
    let tty = |runtime: &str, id: &str| {
        let cmd = format!(
            "ctr -a {} -n {} run -t --runtime {runtime} --rm {IMAGE} {id} sh -c 'tty; exit 4'",
            c.sock().display(),
            c.0.namespace
        );
        let out = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        println!("{cmd}: {} {:?}", out.status, text(&out.stdout));
        out
    };
    let (rt, ht) = (tty(RUNC, "tty-runc"), tty(HUSK, "tty-husk"));
    assert_eq!(rt.status.code(), Some(4));
    assert_eq!(ht.status.code(), Some(4), "{}", c.log());
    assert!(text(&rt.stdout).contains("/dev/pts/0"));
    assert_eq!(text(&ht.stdout), text(&rt.stdout));

    // A task left running: exec into it (its own exit code and output),
    // metrics from its cgroup in the guest, pause and resume, then SIGKILL:
    // 137, as under runc.
    let out = c.ctr(&["run", "--runtime", HUSK, "-d", IMAGE, "bg", "sleep", "600"]);
    assert!(out.status.success(), "{}", c.log());
    c.wait_status("bg", "RUNNING");
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "bg",
        "sh",
        "-c",
        "echo exec ok; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(text(&out.stdout), "exec ok\n");
    let metrics = text(&c.ctr(&["task", "metrics", "bg"]).stdout);
    let value = |k: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(k).filter(|r| r.starts_with(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {metrics}"))
    };
    assert!(value("pids.current") >= 1, "{metrics}");
    assert!(value("memory.usage") > 0, "{metrics}");
    assert!(value("cpu.usage_usec") > 0, "{metrics}");
    assert!(c.ctr(&["task", "pause", "bg"]).status.success());
    c.wait_status("bg", "PAUSED");
    assert!(c.ctr(&["task", "resume", "bg"]).status.success());
    c.wait_status("bg", "RUNNING");
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "bg"]);
    assert!(out.status.success());
    c.wait_status("bg", "STOPPED");
    let out = c.ctr(&["task", "delete", "bg"]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("137") || text(&out.stdout).contains("137"));
    assert!(c.ctr(&["container", "rm", "bg"]).status.success());

    // A shim killed with SIGKILL: containerd runs `shim delete`, which
    // kills the VMM it left (through its cgroup) and cleans up.
    let out = c.ctr(&[
        "run",
        "--runtime",
        HUSK,
        "-d",
        IMAGE,
        "crash",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", c.log());
    c.wait_status("crash", "RUNNING");
    let ours = |comm: &str, what: &str| -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
                    && std::fs::read(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(what))
            })
            .collect()
    };
    let run_dir = c.husk_run().display().to_string();
    assert!(!ours("husk-vmm", &run_dir).is_empty(), "no VMM for crash");
    let shims = ours("containerd-shim", "crash");
    assert_eq!(shims.len(), 1, "{shims:?}");
    // SAFETY: kill(2) of the shim process found above.
    unsafe { libc::kill(shims[0], libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ours("husk-vmm", &run_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the dead shim's VMM still runs: {}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while text(&c.ctr(&["task", "ls"]).stdout).contains("crash") {
        assert!(Instant::now() < deadline, "the dead shim's task stays");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(c.ctr(&["container", "rm", "crash"]).status.success());

    // The shim's options file, named through containerd's runtime options
    // (what CRI's ConfigPath sends): read, and a bad one refused by name
    // before any VM starts.
    let conf = c.dir().join("shim.toml");
    std::fs::write(&conf, "kernel = \"/nonexistent/vmlinux\"\nvcpu = 2\n").unwrap();
    let out = c.ctr(&[
        "run",
        "--runtime",
        HUSK,
        "--runtime-config-path",
        conf.to_str().unwrap(),
        "--rm",
        IMAGE,
        "conf1",
        "true",
    ]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("shim.toml") && e.contains("vcpu"), "{e}");

    // Nothing left: no rootfs mounts, no sandbox directories, no VMM.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(mounts_under(c.dir()), Vec::<String>::new());
    let runs: Vec<_> = std::fs::read_dir(c.husk_run())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(runs.is_empty(), "{runs:?}");
}
