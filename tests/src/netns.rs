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
