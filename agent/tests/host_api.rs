//! husk-agent on the host over its Unix-socket transport: the same services
//! as in the guest, minus what would touch the host (clock, hostname).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use husk_protocol::agent::{CreateSandboxRequest, Empty, ReseedRandomRequest, SetTimeRequest};
use husk_protocol::agent_ttrpc::SandboxClient;
use husk_protocol::{API_VERSION, VERSION_KEY};

struct Agent {
    child: Child,
    sock: std::path::PathBuf,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let state = dir.path().join("state");
        let child = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .env("HUSK_AGENT_STATE", &state)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Listening, not just bound: the file appears a moment before listen().
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "agent did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent {
            child,
            sock,
            state,
            _dir: dir,
        }
    }

    fn client(&self) -> SandboxClient {
        let c = ttrpc::Client::connect(&format!("unix://{}", self.sock.display())).unwrap();
        SandboxClient::new(c)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctx(version: u32) -> ttrpc::context::Context {
    let mut c = ttrpc::context::with_timeout(5_000_000_000);
    c.add(VERSION_KEY.to_string(), version.to_string());
    c
}

fn message(e: ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => format!("{other:?}"),
    }
}

#[test]
fn health_and_version_handshake() {
    let a = Agent::start();
    let c = a.client();
    let h = c.health(ctx(API_VERSION), &Empty::new()).unwrap();
    assert_eq!(h.status, "SERVING");
    assert_eq!(h.api_version, API_VERSION);
    let e = message(c.health(ctx(API_VERSION + 6), &Empty::new()).unwrap_err());
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("version 7"),
        "{e}"
    );
    let e = message(
        c.health(ttrpc::context::with_timeout(5_000_000_000), &Empty::new())
            .unwrap_err(),
    );
    assert!(e.contains(VERSION_KEY), "{e}");
}

#[test]
fn sandbox_identity_is_validated_and_written() {
    let a = Agent::start();
    let c = a.client();
    let mut r = CreateSandboxRequest::new();
    r.hostname = "web-1".into();
    r.dns_servers = vec!["10.0.0.2".into()];
    c.create_sandbox(ctx(API_VERSION), &r).unwrap();
    assert_eq!(
        std::fs::read_to_string(a.state.join("sandbox/hostname")).unwrap(),
        "web-1\n"
    );
    assert_eq!(
        std::fs::read_to_string(a.state.join("sandbox/resolv.conf")).unwrap(),
        "nameserver 10.0.0.2\n"
    );

    // Bad input: a clear error, and the agent keeps serving.
    r.hostname = "bad host".into();
    let e = message(c.create_sandbox(ctx(API_VERSION), &r).unwrap_err());
    assert!(
        e.contains("INVALID_ARGUMENT") && e.contains("hostname"),
        "{e}"
    );
    let mut seed = ReseedRandomRequest::new();
    seed.data = vec![0; 5000];
    let e = message(c.reseed_random(ctx(API_VERSION), &seed).unwrap_err());
    assert!(e.contains("5000 bytes"), "{e}");
    seed.data = vec![7; 32];
    c.reseed_random(ctx(API_VERSION), &seed).unwrap();
    // On a host the agent must not touch the host clock.
    let mut t = SetTimeRequest::new();
    t.sec = 1;
    let e = message(c.set_time(ctx(API_VERSION), &t).unwrap_err());
    assert!(e.contains("outside a guest"), "{e}");
    assert!(c.health(ctx(API_VERSION), &Empty::new()).is_ok());
}

#[test]
fn garbage_on_the_socket_does_not_kill_the_agent() {
    use std::io::Write;
    let a = Agent::start();
    let mut s = std::os::unix::net::UnixStream::connect(&a.sock).unwrap();
    // A ttrpc frame header announcing an absurd length, then junk.
    let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 1, 0]);
    let _ = s.write_all(&[0x55; 64]);
    drop(s);
    std::thread::sleep(Duration::from_millis(100));
    let c = a.client();
    assert!(c.health(ctx(API_VERSION), &Empty::new()).is_ok());
}

#[test]
fn destroy_sandbox_stops_the_agent() {
    let mut a = Agent::start();
    let c = a.client();
    c.destroy_sandbox(ctx(API_VERSION), &Empty::new()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running after DestroySandbox"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn network_changes_are_refused_in_the_hosts_namespace() {
    let a = Agent::start();
    let c = ttrpc::Client::connect(&format!("unix://{}", a.sock.display())).unwrap();
    let net = husk_protocol::agent_ttrpc::NetworkClient::new(c);
    let mut i = husk_protocol::agent::Interface::new();
    i.name = "lo".into();
    i.mtu = 1500;
    let mut req = husk_protocol::agent::UpdateInterfaceRequest::new();
    req.interface = Some(i).into();
    let e = message(net.update_interface(ctx(API_VERSION), &req).unwrap_err());
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("host"),
        "{e}"
    );
    // Reading is fine.
    let list = net
        .list_interfaces(ctx(API_VERSION), &Empty::new())
        .unwrap();
    assert!(list.interfaces.iter().any(|i| i.name == "lo"));
}
