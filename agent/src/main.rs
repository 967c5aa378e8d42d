//! husk-agent: PID 1 in the guest. Mounts what the guest needs, reaps
//! orphans, and serves the agent API over ttrpc on vsock port 1024.
//!
//! `--listen unix:///path` serves on a Unix socket instead, so tests can run
//! the agent on the host with the same code paths but vsock.
//!
//! PID 1 must never exit or panic: errors are reported and the agent serves
//! on; a failed server start reboots the guest so the host sees it die.

use std::path::PathBuf;
use std::sync::Arc;

use husk_agent::{init, sandbox};
use husk_protocol::agent_ttrpc::create_sandbox;
use husk_protocol::AGENT_VSOCK_PORT;

fn say(msg: &str) {
    eprintln!("husk-agent: {msg}");
}

fn reboot_guest() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    say(&format!("reboot failed: {e}"));
    init::reap_forever()
}

fn usage() -> ! {
    say("usage: husk-agent [--listen vsock://-1:PORT | unix:///PATH]");
    std::process::exit(2)
}

fn main() {
    let is_guest = std::process::id() == 1;
    let mut listen = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => match args.next() {
                Some(l) => listen = l,
                None if is_guest => say("--listen without an address; ignored"),
                None => usage(),
            },
            // The kernel hands init the command-line words it does not know;
            // PID 1 must not die of them.
            other if is_guest => say(&format!("ignoring argument {other:?}")),
            _ => usage(),
        }
    }
    if is_guest {
        for e in init::mount_filesystems() {
            say(&e);
        }
    }
    let state_dir = if is_guest {
        PathBuf::from("/run/husk/sandbox")
    } else {
        std::env::var_os("HUSK_AGENT_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("husk-agent"))
    };
    let on_destroy: Arc<dyn Fn() + Send + Sync> = if is_guest {
        Arc::new(|| reboot_guest())
    } else {
        Arc::new(|| std::process::exit(0))
    };
    let sandbox = Arc::new(sandbox::SandboxService {
        state_dir,
        is_guest,
        on_destroy,
    });
    let server = ttrpc::Server::new()
        .bind(&listen)
        .map(|s| s.register_service(create_sandbox(sandbox)));
    let mut server = match server {
        Ok(s) => s,
        Err(e) => {
            say(&format!("cannot listen on {listen}: {e}"));
            if is_guest {
                reboot_guest();
            }
            std::process::exit(1);
        }
    };
    if let Err(e) = server.start() {
        say(&format!("cannot serve on {listen}: {e}"));
        if is_guest {
            reboot_guest();
        }
        std::process::exit(1);
    }
    say(&format!(
        "serving agent API v{} on {listen}",
        husk_protocol::API_VERSION
    ));
    if is_guest {
        init::reap_forever();
    }
    // On a host the server threads do the work; wait to be stopped.
    loop {
        std::thread::park();
    }
}
