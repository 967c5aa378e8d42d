//! Tier 3: husk-agent as PID 1 in a husk-vmm guest, reached over hybrid vsock
//! with ttrpc: one boot for the group.

use std::os::fd::IntoRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use husk_protocol::agent::{CreateSandboxRequest, Empty, ReseedRandomRequest, SetTimeRequest};
use husk_protocol::agent_ttrpc::SandboxClient;
use husk_protocol::{AGENT_VSOCK_PORT, API_VERSION, VERSION_KEY};
use husk_tests::{
    guest_kernel, guest_rootfs, husk_vmm_binary, kvm_unavailable, skip, vsock_connect, Guest,
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
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest_kernel().unwrap(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off rootfstype=erofs init=/sbin/husk-agent"
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [{"drive_id": "rootfs", "path_on_host": guest_rootfs().unwrap(),
                    "is_root_device": true, "is_read_only": true}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "entropy": {}
    });
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let mut cmd = Command::new(husk_vmm_binary().unwrap());
    cmd.arg("--config-file").arg(&cfg);
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

    client.destroy_sandbox(ctx(), &Empty::new()).unwrap();
    let status = guest
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "{status}\n{}", guest.tail());
    guest.assert_no_errors(&["husk-agent: mount"]);
}
