//! A husk cluster on this machine, for tests and benchmarks: etcd (the
//! real one, started here), and hosts that are network namespaces on a
//! bridge of the test's own, each with its own address and its own huskd.
//! Everything is removed on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{guest_kernel, guest_rootfs, husk_cli_binary, husk_vmm_binary, NetNs};

/// huskd (`HUSKD` overrides).
pub fn huskd_binary() -> Result<PathBuf> {
    crate::vm::workspace_binary("huskd", "husk-orchestrator", "HUSKD")
}

/// Why a cluster whose tasks run cannot be made here, if it cannot.
pub fn cluster_unavailable() -> Option<String> {
    crate::kvm_unavailable().or_else(control_plane_unavailable)
}

/// Why a cluster cannot be made here at all (tasks that never start a
/// sandbox need no /dev/kvm), if it cannot.
pub fn control_plane_unavailable() -> Option<String> {
    crate::root_unavailable()
}

/// A log for a failure's output ("" if unreadable): its last 30 warnings,
/// errors and broken connections (each marked "! "), then its last `n`
/// lines, a run of lines that differ only in their timestamp shown once
/// with its count, each ending in a newline.
fn last_lines(path: &std::path::Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    // A line's text without its timestamp: a loop that logs the same
    // thing every tick shows once instead of filling the tail.
    fn text(l: &str) -> &str {
        l.split_once(' ').map_or(l, |(_, t)| t)
    }
    let mut collapsed: Vec<(String, usize)> = Vec::new();
    for l in log.lines() {
        match collapsed.last_mut() {
            Some((last, count)) if text(last) == text(l) => *count += 1,
            _ => collapsed.push((l.to_string(), 1)),
        }
    }
    let mut out = String::new();
    // Warnings, errors and broken connections, wherever they are.
    let notable: Vec<&String> = collapsed
        .iter()
        .map(|(l, _)| l)
        .filter(|l| {
            [
                "WARN",
                "ERROR",
                "failed serving connection",
                "connection error",
            ]
            .iter()
            .any(|k| l.contains(k))
                // A GOAWAY with NO_ERROR is a connection's normal end.
                && !l.contains("NO_ERROR")
        })
        .collect();
    for l in &notable[notable.len().saturating_sub(30)..] {
        out.push_str(&format!("! {l}\n"));
    }
    for (l, count) in &collapsed[collapsed.len().saturating_sub(n)..] {
        match count {
            1 => out.push_str(&format!("{l}\n")),
            c => out.push_str(&format!("{l}   (this line {c} times in a row)\n")),
        }
    }
    out
}

/// One etcd member.
pub struct Member {
    child: Option<Child>,
    pub client_url: String,
    dir: tempfile::TempDir,
}

impl Member {
    /// Kills it (SIGKILL): a member lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first /24 in 10.231.20-219.0, from `first` on, that no route of
/// this host names: a second bridge on a subnet already routed (another
/// cluster's, or one a killed run left behind) would get the host's
/// replies sent out of the other bridge, and its hosts' connections time
/// out.
fn free_net(first: u8) -> Result<u8> {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "show"])
        .output()?;
    if !out.status.success() {
        bail!("ip route show: {}", String::from_utf8_lossy(&out.stderr));
    }
    let routes = String::from_utf8_lossy(&out.stdout);
    (0..200u16)
        .map(|i| 20 + ((u16::from(first) - 20 + i) % 200) as u8)
        .find(|n| !routes.contains(&format!("10.231.{n}.")))
        .ok_or_else(|| anyhow::anyhow!("no free 10.231.x.0/24 for a test cluster: {routes}"))
}

/// An etcd cluster of `n` members on `ip` (ports from `base`).
pub struct Etcd {
    pub members: Vec<Member>,
}

impl Etcd {
    pub fn start(ip: Ipv4Addr, base: u16, n: usize) -> Result<Etcd> {
        // A missing program fails here, naming it, not as a health check
        // that times out.
        let etcd = crate::programs::require("/usr/bin/etcd")?;
        let etcdctl = crate::programs::require("etcdctl")?;
        let peers: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://{ip}:{}", base + 2 * i as u16 + 1))
            .collect();
        let mut members = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir()?;
            let client_url = format!("http://{ip}:{}", base + 2 * i as u16);
            let peer = format!("http://{ip}:{}", base + 2 * i as u16 + 1);
            let log = std::fs::File::create(dir.path().join("etcd.log"))?;
            let child = Command::new(&etcd)
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &peers.join(",")])
                .args(["--initial-cluster-state", "new"])
                // Tests' fsyncs need not survive a power cut.
                .args(["--unsafe-no-fsync"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting etcd")?;
            members.push(Member {
                child: Some(child),
                client_url,
                dir,
            });
        }
        let e = Etcd { members };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = Command::new(&etcdctl)
                .args(["--endpoints", &e.endpoints(), "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .with_context(|| format!("running {}", etcdctl.display()))?;
            if out.status.success() {
                return Ok(e);
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        let logs: Vec<String> = e
            .members
            .iter()
            .map(|m| last_lines(&m.dir.path().join("etcd.log"), 20))
            .collect();
        bail!(
            "etcd at {} did not become healthy in 30 s; etcdctl said: {last}\netcd's log:\n{}",
            e.endpoints(),
            logs.join("\n---\n")
        )
    }

    /// Every member's client URL, comma-separated (huskd's --etcd).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One host: a network namespace on the cluster bridge, running huskd.
pub struct Host {
    pub name: String,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub socket: PathBuf,
    veth: String,
    huskd: Option<Child>,
}

impl Host {
    pub fn addr(&self) -> String {
        format!("{}:4377", self.ip)
    }

    /// The host dies: its huskd and everything it started (the jails'
    /// keepers and their VMMs) are killed, no goodbye to the cluster.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.huskd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Keepers are forks of huskd (its command line, so its state
        // directory); VMMs name their sockets under it.
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its huskd's pid, while it runs.
    pub fn huskd_pid(&self) -> Option<u32> {
        self.huskd.as_ref().map(Child::id)
    }

    /// The pids of every process of this host: its huskd and what it
    /// started (keepers, VMMs, log copiers: their command lines name its
    /// state directory).
    pub fn pids(&self) -> Vec<u32> {
        let mark = self.dir.join("state").to_string_lossy().into_owned();
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|p| {
                        std::fs::read(format!("/proc/{p}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&mark))
                    })
                    .collect()
            })
            .unwrap_or_default();
        pids.extend(self.huskd_pid());
        pids.sort();
        pids.dedup();
        pids
    }

    /// Only its huskd dies (SIGKILL): the sandboxes it started, their
    /// keepers and log copiers run on, for the next huskd to find.
    pub fn kill_huskd(&mut self) {
        if let Some(mut c) = self.huskd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The ids of the sandboxes in its run directory, sorted.
    pub fn sandboxes(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.dir.join("state/run"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    // Not a sandbox: the records' directory.
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Cuts its network (the host's link to the bridge goes down).
    pub fn unplug(&self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.veth, "down"])
            .status();
    }

    /// Reconnects it.
    pub fn plug(&self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.veth, "up"])
            .status();
    }

    /// husk-vmm processes of this host's sandboxes.
    pub fn vmms(&self) -> usize {
        self.vmm_pids().len()
    }

    /// The pids of those husk-vmm processes, sorted.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let run = self.dir.join("state/run");
        let run = run.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read(e.path().join("cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&run))
                    })
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.trim() == "husk-vmm")
                    })
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .map(|mut pids| {
                pids.sort();
                pids
            })
            .unwrap_or_default()
    }

    /// `husk ARGS` against this host's huskd.
    pub fn husk(&self, args: &[&str]) -> Output {
        let out = Command::new(husk_cli_binary().expect("husk built"))
            .args(args)
            .env("HUSK_HOST", &self.socket)
            .output()
            .expect("running husk");
        println!(
            "[{}] husk {}: {}\n{}{}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `husk ARGS`, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.husk(args);
        assert!(
            out.status.success(),
            "[{}] husk {} failed: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `husk ARGS --format json`, quietly: one object per line.
    pub fn json(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let out = Command::new(husk_cli_binary()?)
            .args(args)
            .args(["--format", "json"])
            .env("HUSK_HOST", &self.socket)
            .output()?;
        if !out.status.success() {
            bail!(
                "husk {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).context("husk --format json"))
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
    }
}

/// etcd, a bridge, hosts.
pub struct Cluster {
    pub etcd: Etcd,
    pub bridge: String,
    pub hosts: Vec<Host>,
    /// Images and volumes every host's huskd uses (HUSK_ROOT).
    pub root: tempfile::TempDir,
    net: u8,
    /// Given to every host's huskd after the helpers' own.
    huskd_args: Vec<String>,
}

impl Cluster {
    /// A bridge with etcd on it, and `n` hosts (huskd started, not yet in
    /// a cluster). `images` are imported into the shared image store.
    pub fn new(tag: &str, n: usize, images: &[PathBuf]) -> Result<Cluster> {
        Cluster::with_etcd(tag, n, images, 1)
    }

    /// The same with an etcd of `members` members.
    pub fn with_etcd(tag: &str, n: usize, images: &[PathBuf], members: usize) -> Result<Cluster> {
        Cluster::with_args(tag, n, images, members, &[])
    }

    /// The same with `huskd_args` given to every host's huskd.
    pub fn with_args(
        tag: &str,
        n: usize,
        images: &[PathBuf],
        members: usize,
        huskd_args: &[&str],
    ) -> Result<Cluster> {
        let pid = std::process::id();
        let net = free_net(20 + (pid % 200) as u8)?;
        let bridge = format!("hkb{}", pid % 100_000);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.231.{net}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let root = tempfile::tempdir()?;
        for img in images {
            let out = Command::new(husk_cli_binary()?)
                .args(["image", "import"])
                .arg(img)
                .env("HUSK_ROOT", root.path())
                .output()?;
            if !out.status.success() {
                bail!(
                    "importing {}: {}",
                    img.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let base = 20000 + (pid % 4000) as u16 * 8;
        let etcd = Etcd::start(Ipv4Addr::new(10, 231, net, 1), base, members);
        let etcd = match etcd {
            Ok(e) => e,
            Err(e) => {
                let _ = ip(&["link", "del", &bridge]);
                return Err(e);
            }
        };
        let mut c = Cluster {
            etcd,
            bridge,
            hosts: Vec::new(),
            root,
            net,
            huskd_args: huskd_args.iter().map(|a| a.to_string()).collect(),
        };
        for i in 0..n {
            c.add_host(tag, i)?;
        }
        Ok(c)
    }

    fn add_host(&mut self, tag: &str, i: usize) -> Result<()> {
        let name = format!("node{}", i + 1);
        let ns = NetNs::new(&format!("{tag}{i}"))?;
        let pid = std::process::id() % 100_000;
        let veth = format!("hkv{pid}{i}");
        let peer = format!("hkp{pid}{i}");
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&["link", "set", &veth, "master", &self.bridge])?;
        ip(&["link", "set", &veth, "up"])?;
        let host_ip = Ipv4Addr::new(10, 231, self.net, 10 + i as u8);
        ns.exec(&["ip", "addr", "add", &format!("{host_ip}/24"), "dev", &peer])?;
        ns.exec(&["ip", "link", "set", &peer, "up"])?;
        ns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.231.{}.1", self.net),
        ])?;
        let dir = self.root.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        let mut h = Host {
            name,
            ns,
            ip: host_ip,
            socket: dir.join("huskd.sock"),
            dir,
            veth,
            huskd: None,
        };
        self.start_huskd(&mut h)?;
        self.hosts.push(h);
        Ok(())
    }

    /// Starts (or restarts) a host's huskd.
    pub fn start_huskd(&self, h: &mut Host) -> Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(h.dir.join("huskd.log"))?;
        let mut cmd = h.ns.command_net_only(&huskd_binary()?)?;
        cmd.arg("--state-dir")
            .arg(h.dir.join("state"))
            .arg("--socket")
            .arg(&h.socket)
            .args(["--listen-addr", &h.addr(), "--hostname", &h.name])
            .args(["--etcd", &self.etcd.endpoints()])
            .args(&self.huskd_args)
            .env("HUSK_ROOT", self.root.path())
            .env("HUSK_VMM", husk_vmm_binary()?)
            .env("HUSK_KERNEL", guest_kernel()?)
            .env("HUSK_GUEST_IMAGE", guest_rootfs()?)
            // tonic and h2 name why a connection ended only at debug.
            .env(
                "HUSKD_LOG",
                "info,husk_orchestrator=debug,tonic::transport=debug,h2::proto::connection=debug",
            )
            .stdout(Stdio::null())
            .stderr(log);
        h.huskd = Some(cmd.spawn().context("starting huskd")?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.socket.exists() {
            if Instant::now() > deadline {
                bail!("huskd of {} did not open {}", h.name, h.socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Polls `f` until it holds, printing how long that took; panics
    /// with what the cluster thinks (services, tasks, nodes, huskd logs)
    /// if it does not within `secs`.
    pub fn wait(&self, what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
        let t = Instant::now();
        while !f() {
            if t.elapsed() > Duration::from_secs(secs) {
                // From any manager still answering.
                for h in &self.hosts {
                    if h.husk(&["service", "ls"]).status.success() {
                        for s in h.json(&["service", "ls"]).unwrap_or_default() {
                            let name = s["spec"]["name"].as_str().unwrap_or("");
                            h.husk(&["service", "ps", "-a", name]);
                        }
                        h.husk(&["node", "ls"]);
                        break;
                    }
                }
                for h in &self.hosts {
                    println!("{}: {} husk-vmm processes", h.name, h.vmms());
                }
                panic!(
                    "timed out after {secs} s waiting for {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        println!("{what}: {:.1} s", t.elapsed().as_secs_f64());
        t.elapsed()
    }

    /// Every huskd's log, for a failing test's output.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.hosts {
            s.push_str(&format!("---- {} huskd.log (last lines) ----\n", h.name));
            s.push_str(&last_lines(&h.dir.join("huskd.log"), 80));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.kill();
        }
        // Sandboxes die with their huskd; wait for them to be gone before
        // their namespaces go.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.hosts.iter().any(|h| h.vmms() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.hosts.clear();
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
