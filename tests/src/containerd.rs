//! A real containerd for tests: its own root, state, sockets and config,
//! never the system one. Optionally with husk's shim on its PATH (and the
//! husk environment the shim needs), and with the CRI plugin on a CNI
//! configuration of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a test's containerd has besides the core.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// containerd-shim-husk-v2 on PATH, HUSK_* pointing at this build.
    pub husk: bool,
    /// The CRI plugin, with runtimes `runc` and `husk`, `sandbox_image`
    /// husk.local/pause:latest, and a bridge network (`subnet`) over
    /// Debian's CNI plugins.
    pub cri: Option<Cri>,
    /// containerd at debug level (the shim's own log lines show there).
    pub debug: bool,
}

#[derive(Clone, Debug)]
pub struct Cri {
    /// The CNI bridge's name and range; the bridge takes the first address.
    pub bridge: String,
    pub subnet: String,
}

/// A containerd started for one test. Killed (and its directories removed)
/// on drop.
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    /// HUSK_RUN of its shims: short, since CRI's sandbox ids are 64
    /// characters and a sandbox's sockets live in `<run>/<id>/`
    /// (a socket path has at most 107 bytes).
    run: PathBuf,
    pub socket: PathBuf,
    /// The namespace `ctr` calls use (k8s.io with CRI).
    pub namespace: String,
    cri: Option<Cri>,
}

impl Containerd {
    /// A plain containerd (no CRI, no husk).
    pub fn start() -> Result<Containerd> {
        Self::start_with(&Options::default())
    }

    pub fn start_with(o: &Options) -> Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("husk-containerd-")
            .tempdir()?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  level = \"{level}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            level = if o.debug { "debug" } else { "info" },
        );
        match &o.cri {
            None => config.insert_str(0, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"),
            Some(cri) => {
                let cni = d.join("cni");
                std::fs::create_dir_all(&cni)?;
                std::fs::write(
                    cni.join("10-husk-test.conflist"),
                    serde_json::to_vec_pretty(&serde_json::json!({
                        "cniVersion": "0.4.0",
                        "name": cri.bridge,
                        "plugins": [{
                            "type": "bridge",
                            "bridge": cri.bridge,
                            "isGateway": true,
                            "ipMasq": false,
                            "hairpinMode": true,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": cri.subnet}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": d.join("cni-ipam"),
                            }
                        }]
                    }))?,
                )?;
                config.push_str(&format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
                     \x20 sandbox_image = \"husk.local/pause:latest\"\n\
                     \x20 restrict_oom_score_adj = true\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                     \x20 default_runtime_name = \"runc\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
                     \x20 runtime_type = \"io.containerd.runc.v2\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n\
                     \x20 runtime_type = \"io.containerd.husk.v2\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
                     \x20 bin_dir = \"/usr/lib/cni\"\n\
                     \x20 conf_dir = \"{}\"\n",
                    cni.display()
                ));
            }
        }
        let cfg = d.join("config.toml");
        std::fs::write(&cfg, config)?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let run = PathBuf::from(format!(
            "/run/husk-t{}",
            d.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
                .trim_start_matches("husk-containerd-")
        ));
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if o.husk {
            // containerd finds a shim by its name on PATH.
            let shim_dir = crate::husk_shim_binary()?
                .parent()
                .context("shim path")?
                .to_path_buf();
            let path = format!(
                "{}:{}",
                shim_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cmd.env("PATH", path)
                .env("HUSK_ROOT", d.join("husk"))
                .env("HUSK_RUN", &run)
                .env("HUSK_VMM", crate::husk_vmm_binary()?)
                .env("HUSK_KERNEL", crate::guest_kernel()?)
                .env("HUSK_GUEST_IMAGE", crate::guest_rootfs()?);
        }
        let child = cmd
            .spawn()
            .context("starting containerd (apt-get install containerd)")?;
        let namespace = if o.cri.is_some() {
            "k8s.io"
        } else {
            "husk-test"
        };
        let mut c = Containerd {
            child,
            dir,
            run,
            socket,
            namespace: namespace.into(),
            cri: o.cri.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.socket.exists() && c.ctr(&["version"]).is_ok() {
                return Ok(c);
            }
            if let Some(st) = c.child.try_wait()? {
                bail!("containerd exited with {st}\n{}", c.log());
            }
            if Instant::now() > deadline {
                bail!("containerd not ready within 30 s\n{}", c.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where its husk shims keep their sandboxes (HUSK_RUN).
    pub fn husk_run(&self) -> &Path {
        &self.run
    }

    /// containerd's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The end of every live husk sandbox's guest console (the shim keeps
    /// one per sandbox while it runs), for failure messages: what the agent
    /// reported about a slow or failed call is there, not in containerd's
    /// log.
    pub fn consoles(&self, bytes: usize) -> String {
        let mut out = String::new();
        let dirs = match std::fs::read_dir(&self.run) {
            Ok(d) => d,
            Err(e) => return format!("(no sandboxes under {}: {e})\n", self.run.display()),
        };
        for d in dirs.flatten() {
            let path = d.path().join("console.log");
            let text = match std::fs::read(&path) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => format!("({e})"),
            };
            let end = crate::tail(&text, bytes);
            out.push_str(&format!(
                "--- {} (last {} of {} bytes) ---\n{end}\n",
                path.display(),
                end.len(),
                text.len(),
            ));
        }
        out
    }

    /// Runs `ctr` against this containerd in its namespace; returns
    /// stdout, or an error with stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr_output(args)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ctr` and returns what it did, whatever its status.
    pub fn ctr_output(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its shims outlive it by design (a restarted containerd finds them
        // again); a test's do not. Then what a shim would have cleaned up
        // (VMMs, virtiofsd, through their sandbox's cgroup), and CRI's pod
        // namespaces on the test's network (a test that failed half-way).
        let _ = Command::new("pkill")
            .args(["-9", "-f"])
            .arg(format!(
                "containerd-shim-.*-address {}",
                self.socket.display()
            ))
            .status();
        if let Ok(dirs) = std::fs::read_dir(&self.run) {
            for d in dirs.flatten() {
                husk_runtime::vmm::cgroup::kill_groups_of(&d.file_name().to_string_lossy());
            }
        }
        let _ = Command::new("pkill")
            .args(["-9", "-f"])
            .arg(self.run.display().to_string())
            .status();
        if let Some(cri) = &self.cri {
            let prefix = cri.subnet.rsplit_once('.').map_or("", |p| p.0).to_string();
            for ns in std::fs::read_dir("/var/run/netns")
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = ns.file_name().to_string_lossy().into_owned();
                let addrs = Command::new("ip")
                    .args(["netns", "exec", &name, "ip", "-4", "-o", "addr"])
                    .output();
                let ours = addrs.is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains(&format!("inet {prefix}."))
                });
                if name.starts_with("cni-") && ours {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["link", "del", &cri.bridge])
                .stderr(Stdio::null())
                .status();
        }
        // Unmount anything the snapshotter left mounted before the temp dir goes.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.run);
    }
}
