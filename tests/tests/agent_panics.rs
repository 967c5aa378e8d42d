//! What a panic does to the agent as the guest runs it: built with the
//! guest profile (unwinding, release, static) by `make guest`, with the
//! test-only requests of its `panic-test` feature. The agent runs on the
//! host over a Unix socket (no root needed: these requests touch nothing).
//!
//! A panic in a request handler must fail that request, INTERNAL, and
//! leave the agent serving; a panic outside any handler must be logged
//! and end the agent (in the guest, a reboot: the VM ends and the host
//! sees it) rather than leave it half working.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::agent::Empty;
use husk_tests::agent::{ctx, rpc_message, AgentConn, Endpoint};
use husk_tests::{guest_agent_panic_test_binary, wait_listening};

const T: Duration = Duration::from_secs(30);

fn start(dir: &Path) -> (Child, AgentConn) {
    let sock = dir.join("agent.sock");
    let child = Command::new(guest_agent_panic_test_binary().unwrap_or_else(|e| panic!("{e:#}")))
        .args(["--listen", &format!("unix://{}", sock.display())])
        .env("HUSK_AGENT_STATE", dir.join("state"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&sock, "the agent", Duration::from_secs(10));
    (child, AgentConn::connect(Endpoint::Unix(sock)).unwrap())
}

fn asking(key: &str) -> ttrpc::context::Context {
    let mut c = ctx(T);
    c.add(key.to_string(), "1".to_string());
    c
}

/// What the agent wrote on stderr, to its end (it has ended or been killed).
fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    let mut pipe = child.stderr.take().expect("stderr is piped");
    pipe.read_to_string(&mut err).unwrap();
    err
}

/// The panicking request `what` failed INTERNAL, naming the panic.
fn answered_internal(what: &str, r: ttrpc::Result<()>) {
    let e = r.expect_err("a panic-test request must fail");
    let msg = rpc_message(&e);
    assert!(
        msg.starts_with("INTERNAL") && msg.contains("panicked"),
        "{what}: {msg}"
    );
}

#[test]
fn a_panicking_request_fails_alone_and_the_agent_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, conn) = start(dir.path());
    // An inline handler (on the server's thread) and a pool one, each twice.
    for _ in 0..2 {
        let health = conn
            .sandbox
            .health(asking("husk-test-panic"), &Empty::new())
            .map(drop);
        answered_internal("Health", health);
        conn.health()
            .expect("the agent serves after a handler panic");
        let list = conn
            .containers
            .list_containers(asking("husk-test-panic"), &Empty::new())
            .map(drop);
        answered_internal("ListContainers", list);
        conn.containers
            .list_containers(ctx(T), &Empty::new())
            .expect("ListContainers after a handler panic");
    }
    let _ = child.kill();
    let err = stderr_of(&mut child);
    let _ = child.wait();
    assert!(
        err.contains("request handler panicked") && err.contains("husk-test-panic asked"),
        "the agent's log names the panic:\n{err}"
    );
}

#[test]
fn a_panic_outside_a_handler_is_logged_and_ends_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, conn) = start(dir.path());
    // The request itself succeeds; the thread it started panics.
    conn.sandbox
        .health(asking("husk-test-panic-outside"), &Empty::new())
        .expect("Health");
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = stderr_of(&mut child);
    assert!(!status.success(), "the agent ended with {status}:\n{err}");
    assert!(
        err.contains("panic outside a request handler")
            && err.contains("thread panic-test")
            && err.contains("cannot go on"),
        "the agent's log names the panic:\n{err}"
    );
}
