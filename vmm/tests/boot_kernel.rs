//! Tier 3: husk-vmm boots the real guest kernel and root image to init, and
//! in the same boot: a second virtio-blk drive is read in the guest and its
//! checksum matches; the guest answers ping on virtio-net through a tap in a
//! namespace the test made (when run as root); and 16 MiB sent over hybrid
//! vsock echo back identical.
//! One boot (tens of seconds of emulated guest kernel here).

const ECHO_PORT: u32 = 1234;
const ECHO_BYTES: usize = 16 << 20;

/// Deterministic, incompressible test data.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use husk_tests::{
    guest_kernel, guest_rootfs, kvm_unavailable, parse_uptime, root_unavailable, skip, Guest, NetNs,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

#[test]
fn husk_vmm_boots_the_guest_to_init_and_exits_on_reboot() {
    if let Some(why) = kvm_unavailable() {
        skip("husk_vmm_boots_the_guest_to_init_and_exits_on_reboot", &why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_disk = dir.path().join("data.img");
    let disk_bytes = pattern(4 << 20, 7);
    std::fs::write(&data_disk, &disk_bytes).unwrap();
    let disk_sum = hex(&Sha256::digest(&disk_bytes));
    let vsock_path = dir.path().join("v.sock");
    // virtio-net needs a tap, so root; the namespace keeps the traffic ours.
    let netns = match root_unavailable() {
        Some(why) => {
            skip("virtio-net part of the boot group", &why);
            None
        }
        None => {
            let ns = NetNs::new("vmm").unwrap();
            ns.exec(&["ip", "tuntap", "add", "dev", "htap0", "mode", "tap"])
                .unwrap();
            ns.exec(&["ip", "addr", "add", "10.213.0.1/24", "dev", "htap0"])
                .unwrap();
            ns.exec(&["ip", "link", "set", "htap0", "up"]).unwrap();
            Some(ns)
        }
    };
    let net_args = if netns.is_some() {
        " husk_test.ip=10.213.0.2/24"
    } else {
        ""
    };
    let mut config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest_kernel().unwrap(),
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off rootfstype=erofs init=/init \
                                  husk_test.sum=/dev/vdb husk_test.echo_port={ECHO_PORT}{net_args}")
        },
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "drives": [{"drive_id": "rootfs", "path_on_host": guest_rootfs().unwrap(),
                    "is_root_device": true, "is_read_only": true},
                   {"drive_id": "data", "path_on_host": data_disk, "is_read_only": true}],
        "vsock": {"guest_cid": 3, "uds_path": vsock_path},
        "entropy": {}
    });
    if netns.is_some() {
        config["network-interfaces"] = serde_json::json!([
            {"iface_id": "eth0", "host_dev_name": "htap0", "guest_mac": "06:00:0a:d5:00:02"}
        ]);
    }
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let vmm = std::path::Path::new(env!("CARGO_BIN_EXE_husk-vmm"));
    let mut cmd = match &netns {
        Some(ns) => ns.command(vmm),
        None => Command::new(vmm),
    };
    cmd.arg("--config-file").arg(&cfg);
    let mut guest = Guest::spawn("husk-vmm", cmd).unwrap();

    let (_, at) = guest
        .wait_for_line("husk-test-init: reached init", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (line, _) = guest
        .wait_for_line("husk-test-init: uptime", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let uptime = parse_uptime(&line).unwrap();
    println!(
        "husk-vmm: init marker after {:.1} s wall, guest uptime {uptime:.2} s",
        at.as_secs_f64()
    );
    // Both vCPUs came up from the MP table.
    guest.assert_line(
        "smp: Brought up 1 node, 2 CPUs",
        "second vCPU did not come up",
    );
    guest.assert_line(
        "VFS: Mounted root (erofs filesystem) readonly",
        "root not mounted read-only from erofs",
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        guest.assert_line(
            "host profile kvm-pvm (module kvm_pvm is loaded)",
            "host profile not detected",
        );
    }
    guest.assert_no_errors(&[]);

    // The second drive, read by the guest, has the host's checksum.
    let (line, _) = guest
        .wait_for_line("husk-test-init: sha256 /dev/vdb", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        line.contains(&format!("{disk_sum} {}", disk_bytes.len())),
        "guest read /dev/vdb as {line:?}, host has {disk_sum}"
    );

    // The guest answers ping through virtio-net and the tap.
    if let Some(ns) = &netns {
        guest
            .wait_for_line("husk-test-init: eth0 up", Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let out = ns
            .exec(&["ping", "-c", "3", "-W", "10", "10.213.0.2"])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", guest.tail()));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("3 received"), "{text}");
        println!("virtio-net: {}", text.lines().last().unwrap_or(""));
    }

    // 16 MiB through hybrid vsock, echoed back byte for byte.
    guest
        .wait_for_line("vsock echo listening", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stream = UnixStream::connect(&vsock_path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    w.write_all(format!("CONNECT {ECHO_PORT}\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(stream);
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(
        ok.starts_with("OK "),
        "handshake answer {ok:?}\n{}",
        guest.tail()
    );
    let payload = pattern(ECHO_BYTES, 42);
    let want = Sha256::digest(&payload);
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        w.write_all(&payload).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Sha256::new();
    let mut n = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = r
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("echo read after {n} bytes: {e}\n{}", guest.tail()));
        if k == 0 {
            break;
        }
        got.update(&buf[..k]);
        n += k;
    }
    writer.join().unwrap();
    let took = start.elapsed();
    assert_eq!(
        n,
        ECHO_BYTES,
        "echoed {n} of {ECHO_BYTES} bytes\n{}",
        guest.tail()
    );
    assert_eq!(got.finalize(), want, "echoed bytes differ");
    println!(
        "vsock echo: {} MiB in {:.1} s ({:.1} MiB/s each way)",
        ECHO_BYTES >> 20,
        took.as_secs_f64(),
        (ECHO_BYTES >> 20) as f64 / took.as_secs_f64()
    );

    let status = guest
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "husk-vmm exit {status}\n{}", guest.tail());
}
