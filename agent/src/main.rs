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

use husk_agent::containers::{ContainersService, Dirs};
use husk_agent::reaper::Reaper;
use husk_agent::spawner::Spawner;
use husk_agent::stream::Streams;
use husk_agent::{init, kmsg, sandbox};
use husk_protocol::{AGENT_VSOCK_PORT, STREAM_VSOCK_PORT};

fn say(msg: &str) {
    eprintln!("husk-agent: {msg}");
}

fn reboot_guest() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    say(&format!("reboot failed: {e}"));
    init::reap_forever()
}

/// A host agent (tests) whose part panicked: gone, as a guest's would be.
fn exit_now() -> ! {
    std::process::abort()
}

fn usage() -> ! {
    say("usage: husk-agent [--listen vsock://-1:PORT | unix:///PATH] [--own-netns]");
    std::process::exit(2)
}

fn main() {
    let is_guest = std::process::id() == 1;
    husk_agent::panics::install(if is_guest { reboot_guest } else { exit_now });
    let mut listen = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let mut own_netns = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--own-netns" => own_netns = true,
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
    if !is_guest {
        // Orphans of a container's pid namespace come to us to be reaped,
        // as they come to PID 1 in the guest. Set before the spawner is
        // forked: the processes it makes become ours through it.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            say(&format!("PR_SET_CHILD_SUBREAPER: {e}"));
        }
    }
    // While this process has one thread (spawner.rs).
    let spawner = match Spawner::start() {
        Ok(s) => s,
        Err(e) => {
            say(&husk_agent::rpc::causes(&e));
            if is_guest {
                reboot_guest();
            }
            std::process::exit(1);
        }
    };
    if is_guest {
        for e in init::mount_filesystems() {
            say(&e);
        }
        kmsg::forward_reports();
        // Containers share the guest's network namespace: their localhost.
        if let Err(e) = husk_agent::network::loopback_up() {
            say(&husk_agent::rpc::causes(&e));
        }
        // Up before the template's snapshot: a clone's StartSandbox then
        // only names it (MAC, addresses, routes), without the driver's
        // receive-ring fill or IPv6's link-local setup in its guest time.
        if let Err(e) = husk_agent::network::uplink_ready() {
            say(&husk_agent::rpc::causes(&e));
        }
    }
    let root = if is_guest {
        PathBuf::from("/run/husk")
    } else {
        std::env::var_os("HUSK_AGENT_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("husk-agent"))
    };
    let dirs = Dirs {
        root,
        cgroup: PathBuf::from("/sys/fs/cgroup"),
    };
    let reaper = Arc::new(Reaper::new());
    let streams = Streams::new();
    let streams_up = match listen.strip_prefix("unix://") {
        Some(path) => streams.serve_unix(std::path::Path::new(&format!("{path}.stdio"))),
        None => streams.serve_vsock(STREAM_VSOCK_PORT),
    };
    if let Err(e) = streams_up {
        say(&format!("cannot serve stdio streams: {e}"));
    }
    let containers = ContainersService::new(dirs.clone(), reaper.clone(), streams, spawner);
    let on_destroy: Arc<dyn Fn() + Send + Sync> = if is_guest {
        Arc::new(|| reboot_guest())
    } else {
        Arc::new(|| std::process::exit(0))
    };
    let network = Arc::new(husk_agent::network::NetworkService::new(
        is_guest, own_netns,
    ));
    let sandbox = Arc::new(sandbox::SandboxService {
        network: network.clone(),
        state_dir: dirs.sandbox(),
        is_guest,
        on_destroy,
        cgroup: dirs.cgroup.clone(),
    });
    if let Err(e) = husk_agent::server::start(&listen, sandbox, containers, network) {
        say(&husk_agent::rpc::causes(&e));
        if is_guest {
            reboot_guest();
        }
        std::process::exit(1);
    }
    say(&format!(
        "serving agent API v{} on {listen}",
        husk_protocol::API_VERSION
    ));
    // Reaping is the main thread's work, as PID 1 in the guest and as a
    // subreaper on a host.
    reaper.run()
}
