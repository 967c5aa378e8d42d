//! Tier 2: husk-vmm runs hand-assembled guest code (milliseconds, no kernel).
//!
//! The guest is a minimal ELF with a Xen PVH note, entered in 32-bit protected
//! mode like a real kernel: it writes to the serial port, reads the first
//! virtio-mmio device's registers, and resets through the i8042.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;

fn kvm_unavailable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm is not usable: {e}"))
}

/// A 64-bit ELF with one loadable segment of `code` at 1 MiB and a PVH note
/// pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    // ELF header.
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
                                                    // PT_LOAD.
    let ph = |f: &mut Vec<u8>, at: usize, typ: u32, flags: u32, off: u64, addr: u64, size: u64| {
        f[at..at + 4].copy_from_slice(&typ.to_le_bytes());
        f[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        f[at + 48..at + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    };
    ph(&mut f, 64, 1, 5, 0x1000, LOAD_ADDR, code.len() as u64);
    // PT_NOTE: Xen PHYS32_ENTRY (type 18) = entry point.
    ph(&mut f, 120, 4, 4, 0x200, 0, 20);
    f[0x200..0x204].copy_from_slice(&4u32.to_le_bytes());
    f[0x204..0x208].copy_from_slice(&4u32.to_le_bytes());
    f[0x208..0x20c].copy_from_slice(&18u32.to_le_bytes());
    f[0x20c..0x210].copy_from_slice(b"Xen\0");
    f[0x210..0x214].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// 32-bit code that prints `s` on COM1.
fn print(code: &mut Vec<u8>, s: &[u8]) {
    code.extend_from_slice(&[0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
    for c in s {
        code.extend_from_slice(&[0xb0, *c, 0xee]); // mov al, c; out dx, al
    }
}

/// i8042 reset, then halt forever.
fn reset(code: &mut Vec<u8>) {
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
}

struct Run {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn run_vmm(dir: &Path, config: serde_json::Value) -> Run {
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--config-file")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A hung guest must fail the test, not hang it.
    let deadline = start + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
}

fn config(kernel: &Path, drives: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 32},
        "drives": drives,
    })
}

#[test]
fn tiny_guest_prints_reads_virtio_magic_and_resets() {
    if let Some(why) = kvm_unavailable() {
        println!("SKIP tiny_guest_prints_reads_virtio_magic_and_resets: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut code = Vec::new();
    print(&mut code, b"husk tiny guest\n");
    // mov eax, [0xd0000000]; cmp eax, "virt"; jne bad
    code.extend_from_slice(&[0xa1, 0x00, 0x00, 0x00, 0xd0]);
    code.extend_from_slice(&[0x3d, 0x76, 0x69, 0x72, 0x74]);
    let mut ok = Vec::new();
    print(&mut ok, b"virtio magic ok\n");
    reset(&mut ok);
    let mut bad = Vec::new();
    print(&mut bad, b"virtio magic bad\n");
    reset(&mut bad);
    code.extend_from_slice(&[0x0f, 0x85]); // jne rel32
    code.extend_from_slice(&(ok.len() as u32).to_le_bytes());
    code.extend_from_slice(&ok);
    code.extend_from_slice(&bad);

    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let r = run_vmm(
        dir.path(),
        config(
            &kernel,
            serde_json::json!([{"drive_id": "d", "path_on_host": disk, "is_read_only": true}]),
        ),
    );
    assert_eq!(
        r.stdout, "husk tiny guest\nvirtio magic ok\n",
        "stderr:\n{}",
        r.stderr
    );
    assert!(r.status.success(), "exit {}: {}", r.status, r.stderr);
    assert!(
        r.stderr.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        r.stderr
    );
    println!("tiny guest: start to exit in {:?}", r.took);
}

#[test]
fn bad_kernels_and_configs_fail_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"this is not a kernel at all").unwrap();
    let truncated = dir.path().join("truncated.elf");
    std::fs::write(&truncated, &pvh_elf(&[0xf4])[..100]).unwrap();
    let cases = [
        (dir.path().join("missing"), "missing"),
        (garbage, "garbage"),
        (truncated, "truncated.elf"),
    ];
    for (kernel, needle) in cases {
        let r = run_vmm(dir.path(), config(&kernel, serde_json::json!([])));
        assert_eq!(
            r.status.code(),
            Some(1),
            "{}: {}",
            kernel.display(),
            r.stderr
        );
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    let r = run_vmm(
        dir.path(),
        serde_json::json!({"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 99, "mem_size_mib": 64}}),
    );
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stderr.contains("vcpu_count 99"), "{}", r.stderr);
}

#[test]
fn crashing_guests_exit_non_zero_with_registers_logged() {
    if let Some(why) = kvm_unavailable() {
        println!("SKIP crashing_guests_exit_non_zero_with_registers_logged: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ud2 with no IDT: #UD -> #DF -> triple fault.
    let mut ud2 = Vec::new();
    print(&mut ud2, b"about to crash\n");
    ud2.extend_from_slice(&[0x0f, 0x0b]);
    // xrstor at CPL0: an emulating KVM (this machine's) cannot run it and
    // reports an internal error; hardware without OSXSAVE raises #UD, which
    // again ends in a triple fault. Either way: non-zero, registers logged.
    let mut xrstor = Vec::new();
    xrstor.extend_from_slice(&[0x31, 0xc0, 0x31, 0xd2]); // xor eax,eax; xor edx,edx
    xrstor.extend_from_slice(&[0x0f, 0xae, 0x2d, 0x00, 0x20, 0x00, 0x00]); // xrstor [0x2000]
    reset(&mut xrstor);
    for (name, code, want) in [("ud2", ud2, vec![2]), ("xrstor", xrstor, vec![2, 3])] {
        let kernel = dir.path().join(format!("{name}.elf"));
        std::fs::write(&kernel, pvh_elf(&code)).unwrap();
        let r = run_vmm(dir.path(), config(&kernel, serde_json::json!([])));
        let code = r.status.code();
        assert!(
            code.is_some_and(|c| want.contains(&c)),
            "{name}: exit {:?}, want one of {want:?}\n{}",
            r.status,
            r.stderr
        );
        assert!(
            r.stderr.contains("rip=0x"),
            "{name}: no registers in\n{}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        println!("{name}: exit {code:?}");
    }
}

/// One HTTP/1.1 request on the API socket; returns (status, body).
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    // The socket file appears at bind(), a moment before listen(): retry a
    // refused connection briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connecting to the API socket {}: {e}", sock.display()),
        }
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn api_configures_starts_pauses_and_resumes_a_vm() {
    if let Some(why) = kvm_unavailable() {
        println!("SKIP api_configures_starts_pauses_and_resumes_a_vm: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A guest that prints a dot, spins a little, forever.
    let mut code = Vec::new();
    code.extend_from_slice(&[0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
    code.extend_from_slice(&[0xb0, b'.', 0xee]); // loop: mov al,'.'; out dx,al
    code.extend_from_slice(&[0xb9, 0x00, 0x10, 0x00, 0x00]); // mov ecx, 0x1000
    code.extend_from_slice(&[0x49, 0x75, 0xfd]); // dec ecx; jnz -3
    code.extend_from_slice(&[0xeb, 0xf3]); // jmp loop
    let kernel = dir.path().join("dots.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let console = dir.path().join("console");
    let sock = dir.path().join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let size = || std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);

    assert!(http(&sock, "GET", "/", "").1.contains("Not started"));
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(http(&sock, "PUT", "/boot-source", &boot).0, 204);
    assert_eq!(
        http(
            &sock,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 32}"#
        )
        .0,
        204
    );
    let serial = format!(r#"{{"output": {{"file": "{}"}}}}"#, console.display());
    assert_eq!(http(&sock, "PUT", "/serial", &serial).0, 204);
    // A bad body is refused with Firecracker's error shape.
    let (st, body) = http(&sock, "PUT", "/machine-config", r#"{"vcpu_count": "x"}"#);
    assert_eq!(st, 400);
    assert!(body.contains("fault_message"), "{body}");

    assert_eq!(
        http(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        )
        .0,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while size() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(size() >= 3, "guest printed nothing");
    assert!(http(&sock, "GET", "/", "").1.contains("Running"));
    // No configuration after start.
    assert_eq!(http(&sock, "PUT", "/boot-source", &boot).0, 400);

    assert_eq!(
        http(&sock, "PUT", "/actions", r#"{"action_type": "Pause"}"#).0,
        204
    );
    assert!(http(&sock, "GET", "/", "").1.contains("Paused"));
    let at_pause = size();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(size(), at_pause, "guest ran while paused");

    assert_eq!(
        http(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#).0,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while size() == at_pause && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(size() > at_pause, "guest did not run after resume");

    let (st, m) = http(&sock, "GET", "/metrics", "");
    assert_eq!(st, 200);
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert!(m["vcpu"]["exits_io"].as_u64().unwrap() >= 3, "{m}");
    assert!(m["uptime_ms"].as_u64().is_some(), "{m}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Waits for the VMM to exit (at most `secs`); kills it if it does not.
fn wait_exit(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn api_vmm(sock: &Path) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--api-sock")
        .arg(sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn snapshot_restores_a_running_guest_where_it_was() {
    if let Some(why) = kvm_unavailable() {
        println!("SKIP snapshot_restores_a_running_guest_where_it_was: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A guest that counts in memory (at 0x2000), prints 'a' + (count & 15)
    // each time, and resets at 600: where it resumes shows that memory,
    // registers and the serial device all came back.
    let mut code = vec![0xba, 0xf8, 0x03, 0x00, 0x00]; // mov edx, 0x3f8
    code.extend_from_slice(&[0xff, 0x05, 0x00, 0x20, 0x00, 0x00]); // loop: inc dword [0x2000]
    code.extend_from_slice(&[0xa1, 0x00, 0x20, 0x00, 0x00]); // mov eax, [0x2000]
    code.extend_from_slice(&[0x3d, 0x58, 0x02, 0x00, 0x00]); // cmp eax, 600
    code.extend_from_slice(&[0x74, 0x0f]); // je done
    code.extend_from_slice(&[0x24, 0x0f, 0x04, b'a', 0xee]); // and al,15; add al,'a'; out dx,al
    code.extend_from_slice(&[0xb9, 0x00, 0x04, 0x00, 0x00]); // mov ecx, 0x400
    code.extend_from_slice(&[0x49, 0x75, 0xfd]); // dec ecx; jnz -3
    code.extend_from_slice(&[0xeb, 0xdf]); // jmp loop
    reset(&mut code); // done:
    let kernel = dir.path().join("counter.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let expected: String = (1..600u32)
        .map(|i| char::from(b'a' + (i & 15) as u8))
        .collect();

    let (console1, console2) = (dir.path().join("c1"), dir.path().join("c2"));
    let (snap, mem) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let sock = dir.path().join("a.sock");
    let mut vmm = api_vmm(&sock);
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(http(&sock, "PUT", "/boot-source", &boot).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 32}"#;
    assert_eq!(http(&sock, "PUT", "/machine-config", machine).0, 204);
    // A device too, so transport state goes through the snapshot.
    assert_eq!(http(&sock, "PUT", "/entropy", "{}").0, 204);
    let serial = format!(r#"{{"output": {{"file": "{}"}}}}"#, console1.display());
    assert_eq!(http(&sock, "PUT", "/serial", &serial).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(http(&sock, "PUT", "/actions", start).0, 204);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while size(&console1) < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // A running VM cannot be snapshotted.
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.display(),
        mem.display()
    );
    let (st, body) = http(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("paused"), "{body}");
    assert_eq!(http(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    let (st, body) = http(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(st, 204, "{body}");
    let _ = vmm.kill();
    let _ = vmm.wait();
    let before = std::fs::read_to_string(&console1).unwrap();
    assert!(before.len() >= 40 && before.len() < 599, "{}", before.len());
    assert_eq!(size(&mem), 32 << 20);

    // Restored in a new VMM, the guest goes on from the same count.
    let sock2 = dir.path().join("b.sock");
    let mut vmm2 = api_vmm(&sock2);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "resume_vm": true,
            "serial": {{"output": {{"file": "{}"}}}}}}"#,
        snap.display(),
        mem.display(),
        console2.display()
    );
    let restore_started = Instant::now();
    let (st, body) = http(&sock2, "PUT", "/snapshot/load", &load);
    assert_eq!(st, 204, "{body}");
    println!("snapshot load answered in {:?}", restore_started.elapsed());
    let status = wait_exit(&mut vmm2, 60).expect("restored guest did not finish");
    assert!(status.success(), "{status}");
    let after = std::fs::read_to_string(&console2).unwrap();
    assert_eq!(format!("{before}{after}"), expected);
    // The memory file is mapped private: the restored guest's writes did
    // not change it, so it restores again to the same point.
    assert_eq!(size(&mem), 32 << 20);

    // Bad snapshots are refused with a clear error, before any guest runs.
    let sock3 = dir.path().join("c.sock");
    let mut vmm3 = api_vmm(&sock3);
    let try_load = |snap: &Path, mem: &Path| {
        let load = format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.display(),
            mem.display()
        );
        http(&sock3, "PUT", "/snapshot/load", &load)
    };
    let short_mem = dir.path().join("short.mem");
    std::fs::write(&short_mem, vec![0u8; 4096]).unwrap();
    let (st, body) = try_load(&snap, &short_mem);
    assert_eq!(st, 400);
    assert!(body.contains("truncated"), "{body}");
    let text = std::fs::read_to_string(&snap).unwrap();
    let cut = dir.path().join("cut.snap");
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let (st, body) = try_load(&cut, &mem);
    assert_eq!(st, 400);
    assert!(body.contains("truncated or corrupt"), "{body}");
    let other = dir.path().join("other.snap");
    let version = format!(r#""vmm_version":"{}""#, env!("CARGO_PKG_VERSION"));
    assert!(text.contains(&version));
    std::fs::write(&other, text.replace(&version, r#""vmm_version":"0.0.1""#)).unwrap();
    let (st, body) = try_load(&other, &mem);
    assert_eq!(st, 400);
    assert!(body.contains("0.0.1"), "{body}");
    let template = dir.path().join("template.snap");
    let idx = text
        .find(r#""cpu_identity":"profile="#)
        .expect("cpu_identity");
    let mut t = text.clone();
    t.insert_str(idx + r#""cpu_identity":"profile="#.len(), "other-");
    std::fs::write(&template, t).unwrap();
    let (st, body) = try_load(&template, &mem);
    assert_eq!(st, 400);
    assert!(body.contains("CPU template"), "{body}");
    // A new backing file for a drive the snapshot does not have.
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}",
            "drives": [{{"drive_id": "data", "path_on_host": "/dev/null"}}]}}"#,
        snap.display(),
        mem.display()
    );
    let (st, body) = http(&sock3, "PUT", "/snapshot/load", &load);
    assert_eq!(st, 400);
    assert!(body.contains(r#"no drive \"data\""#), "{body}");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}",
            "network_interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap9"}}]}}"#,
        snap.display(),
        mem.display()
    );
    let (st, body) = http(&sock3, "PUT", "/snapshot/load", &load);
    assert_eq!(st, 400);
    assert!(body.contains(r#"no network interface \"eth0\""#), "{body}");
    // The VMM is still there, not started.
    assert!(http(&sock3, "GET", "/", "").1.contains("Not started"));
    let _ = vmm3.kill();
    let _ = vmm3.wait();
}
