//! A network namespace made by a test, deleted on drop: the test's own
//! "host" for traffic that must not leave this machine.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates namespace `husk-<tag>-<pid>` with loopback up.
    pub fn new(tag: &str) -> Result<NetNs> {
        let name = format!("husk-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace; fails with its stderr.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that will run inside the namespace when spawned.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A command that will run in the namespace's network only: unlike
    /// `ip netns exec`, which also mounts a sysfs of its own (hiding the
    /// host's cgroup hierarchies under /sys/fs/cgroup), it keeps the
    /// mounts — a daemon playing a host on this machine needs them.
    pub fn command_net_only(&self, program: &std::path::Path) -> Result<Command> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).with_context(|| path.clone())?;
        let mut c = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure only calls it
        // with a descriptor `ns` keeps open until the closure is dropped.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(c)
    }
}

fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
