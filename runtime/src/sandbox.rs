//! Sandboxes: one microVM each, started by restoring the template for their
//! machine (the default) or by a cold boot, then given their own identity:
//! fresh randomness, the host's clock, a hostname and DNS.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use husk_protocol::agent::{
    CreateSandboxRequest, IPAddress, Interface, ReseedRandomRequest, Route, SetTimeRequest,
};
use serde::{Deserialize, Serialize};

use crate::agent::{ctx, rpc_message, AgentConn, Endpoint};
use crate::jail::Share;
use crate::network::{dns_from_host, Lease, NetworkMode, Tap};
use crate::podnet::GuestNet;
use crate::ports::{check_mappings, PortMapping, Publisher};
use crate::template::{
    console_config, slot_device, slot_id, tail, vm_config, Machine, Template, VmmProcess,
    NET_IFACE, RO_SLOTS, RW_SLOTS,
};
use crate::vmm::api_request;
use crate::Runtime;

/// How a sandbox's VM starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    /// Restore the cached template for the machine (built on first use).
    #[default]
    Template,
    /// Boot the guest kernel.
    Cold,
}

/// A drive a sandbox gets: a container image (read-only) or a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub id: String,
    pub machine: Machine,
    pub drives: Vec<DriveSpec>,
    pub hostname: String,
    /// Name servers and search domains; empty: the host's (loopback
    /// resolvers left out).
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    pub network: NetworkMode,
    /// A network namespace set up by someone else (CRI's pod netns, with
    /// CNI's veth) whose interface the VM takes over; `network` is then
    /// not used.
    pub netns: Option<PathBuf>,
    /// Host ports relayed to the sandbox (bridge network only).
    pub ports: Vec<PortMapping>,
    /// Host paths shared over virtio-fs; share `i` is at
    /// `shared::guest_source(i)` under the agent's storage directory once
    /// the storage `Sandbox::shared_storage` names is mounted.
    pub shares: Vec<crate::shared::HostShare>,
    pub boot: Boot,
    /// Keep the guest console in `<sandbox dir>/console.log`.
    pub console_log: bool,
}

impl SandboxConfig {
    /// Sizes the microVM to hold what the container may use: its memory
    /// limit plus 128 MiB for the guest, if that is more than the default.
    pub fn fit_memory(&mut self, spec: &oci_spec::runtime::Spec) {
        let limit = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        if let Some(m) = limit.filter(|m| *m > 0) {
            self.machine.mem_mib = self.machine.mem_mib.max((m as u64 >> 20) + 128);
        }
    }

    pub fn new(id: &str) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            machine: Machine::default(),
            drives: Vec::new(),
            hostname: id.into(),
            dns_servers: Vec::new(),
            dns_search: Vec::new(),
            network: NetworkMode::default(),
            netns: None,
            ports: Vec::new(),
            shares: Vec::new(),
            boot: Boot::default(),
            console_log: false,
        }
    }
}

/// Where each phase of a start went.
#[derive(Clone, Debug, Default)]
pub struct StartTimes {
    /// Template lookup (or its build, on first use).
    pub template: Duration,
    /// VMM spawn until the agent answered Health.
    pub agent_ready: Duration,
    /// ReseedRandom, SetTime and CreateSandbox.
    pub identity: Duration,
}

/// A running sandbox. Dropping it kills its VM and removes its directory.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub agent: AgentConn,
    /// The guest device of each of the config's drives, in order.
    pub devices: Vec<String>,
    pub boot: Boot,
    pub times: StartTimes,
    /// The template restored from, for `Boot::Template`.
    pub template: Option<Template>,
    /// Its address on the bridge (None with `NetworkMode::None`).
    pub lease: Option<Lease>,
    pub tap: Tap,
    /// Its published ports, bound.
    pub publisher: Option<Publisher>,
    vmm: VmmProcess,
    /// virtiofsd, after the VMM (fields drop in order).
    shared: Option<crate::shared::SharedFs>,
    /// The pod network taken over (CRI), if any.
    pod_net: Option<crate::podnet::PodNet>,
}

impl Sandbox {
    /// What the agent mounts for a container started the way `husk run`
    /// and huskd start one: the image's erofs (drive 0) at `image`, each
    /// named volume's ext4 (the next drives, in order) at `vol-<name>`,
    /// and the shares, if any.
    pub fn container_storage(&self, volumes: &[String]) -> Vec<husk_protocol::agent::Storage> {
        use husk_protocol::agent::Storage;
        let mut storage = vec![Storage {
            source: self.devices[0].clone(),
            fstype: "erofs".into(),
            options: vec!["ro".into()],
            mount_point: "image".into(),
            ..Default::default()
        }];
        for (name, dev) in volumes.iter().zip(&self.devices[1..]) {
            storage.push(Storage {
                source: dev.clone(),
                fstype: "ext4".into(),
                mount_point: format!("vol-{name}"),
                ..Default::default()
            });
        }
        storage.extend(self.shared_storage());
        storage
    }

    /// The storage the agent mounts for the config's shares, if it has any.
    pub fn shared_storage(&self) -> Option<husk_protocol::agent::Storage> {
        self.shared.as_ref().map(|_| husk_protocol::agent::Storage {
            source: crate::shared::FS_TAG.into(),
            fstype: "virtiofs".into(),
            mount_point: crate::shared::MOUNT_POINT.into(),
            ..Default::default()
        })
    }

    /// Shares `share` into the running sandbox; returns the index for
    /// `shared::guest_source`. Needs a sandbox started with shares.
    pub fn add_share(&mut self, share: &crate::shared::HostShare) -> Result<usize> {
        match self.shared.as_mut() {
            Some(fs) => fs.add(share),
            None => bail!("sandbox {} was started without shared host paths", self.id),
        }
    }

    /// Stops sharing entry `i`.
    pub fn remove_share(&mut self, i: usize) -> Result<()> {
        match self.shared.as_mut() {
            Some(fs) => fs.remove(i),
            None => Ok(()),
        }
    }

    /// The host pid of the VMM process the runtime holds (the jail's
    /// keeper when confined).
    pub fn vmm_pid(&self) -> u32 {
        self.vmm.child.id()
    }

    /// Its address: on the bridge, or the pod's (CNI's).
    pub fn ip(&self) -> Option<std::net::Ipv4Addr> {
        self.lease.as_ref().map(|l| l.ip).or_else(|| {
            self.pod_net
                .as_ref()
                .and_then(|p| p.guest.addresses.first().map(|a| a.0))
        })
    }

    /// Memory charged to the VMM's cgroup (confined VMMs), bytes.
    pub fn vmm_memory(&self) -> Option<u64> {
        self.vmm.cgroup.as_ref().and_then(|c| c.memory())
    }

    /// The VMM's cgroup directories (confined VMMs).
    pub fn vmm_cgroup(&self) -> Vec<PathBuf> {
        self.vmm
            .cgroup
            .as_ref()
            .map(|c| c.dirs.clone())
            .unwrap_or_default()
    }
}

/// The hybrid vsock socket in a sandbox's directory.
const VSOCK_SOCKET: &str = "v.sock";

/// The agent of a running sandbox `id` under `run_dir`, from another
/// process than the one that started it (`husk exec`, `stop`).
pub fn connect_running(run_dir: &Path, id: &str, timeout: Duration) -> Result<AgentConn> {
    check_id(id)?;
    let uds = run_dir.join(id).join(VSOCK_SOCKET);
    AgentConn::connect_within(Endpoint::Vsock(uds), timeout)
}

/// Sandbox ids name directories and sockets: kept short and plain.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        bail!(
            "sandbox id {id:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        );
    }
    Ok(())
}

/// Assigns drives to slots: (slot paths for all slots, guest device of each
/// drive).
fn assign_slots(drives: &[DriveSpec], placeholder: &Path) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut slots = vec![placeholder.to_path_buf(); RO_SLOTS + RW_SLOTS];
    let (mut ro, mut rw) = (0, 0);
    let mut devices = Vec::new();
    for d in drives {
        let (n, limit, base) = if d.read_only {
            (&mut ro, RO_SLOTS, 0)
        } else {
            (&mut rw, RW_SLOTS, RO_SLOTS)
        };
        if *n == limit {
            bail!(
                "more than {limit} {} drives: a sandbox has {RO_SLOTS} read-only and {RW_SLOTS} read-write drive slots",
                if d.read_only { "read-only" } else { "read-write" }
            );
        }
        if !d.path.is_file() {
            bail!("drive {}: not a file", d.path.display());
        }
        slots[base + *n] = d.path.clone();
        devices.push(slot_device(d.read_only, *n));
        *n += 1;
    }
    Ok((slots, devices))
}

/// What a VMM's jail shows of a sandbox's drives.
fn drive_shares(drives: &[DriveSpec]) -> Vec<Share> {
    drives
        .iter()
        .map(|d| Share {
            path: d.path.clone(),
            writable: !d.read_only,
        })
        .collect()
}

/// Waits until the agent behind `vmm` answers Health.
pub(crate) fn wait_for_agent(
    vmm: &mut VmmProcess,
    log: &Path,
    timeout: Duration,
) -> Result<AgentConn> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no vsock socket yet");
    loop {
        vmm.check_alive(log)?;
        if vmm.vsock.exists() {
            match AgentConn::connect_within(Endpoint::Vsock(vmm.vsock.clone()), Duration::ZERO)
                .and_then(|a| a.health().map(|_| a))
            {
                Ok(a) => return Ok(a),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if Instant::now() >= deadline {
            bail!("the agent did not answer within {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Runtime {
    /// Starts a sandbox: its VM restored from the template for its machine
    /// (or cold-booted), its agent ready, its identity set.
    pub fn start_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox> {
        check_id(&cfg.id)?;
        let dir = self.run_dir.join(&cfg.id);
        std::fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("{}", self.run_dir.display()))?;
        if let Err(e) = std::fs::create_dir(&dir) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                bail!("sandbox {} exists ({})", cfg.id, dir.display());
            }
            return Err(e).with_context(|| format!("{}", dir.display()));
        }
        let r = self.start_in(cfg, &dir);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        r
    }

    fn start_in(&self, cfg: &SandboxConfig, dir: &Path) -> Result<Sandbox> {
        let mut times = StartTimes::default();
        let bridged = cfg.network == NetworkMode::Bridge && cfg.netns.is_none();
        let lease = if bridged {
            self.network
                .ensure_bridge()
                .context("setting up the bridge network")?;
            Some(self.network.lease(&cfg.id)?)
        } else {
            None
        };
        check_mappings(&cfg.ports)?;
        // Ports first: one that is taken fails the start before a VM does.
        let publisher = match (&lease, cfg.ports.is_empty()) {
            (_, true) => None,
            (Some(l), false) => Some(Publisher::start(&cfg.ports, l.ip)?),
            (None, false) => {
                bail!("publishing ports needs the bridge network (not --network none)")
            }
        };
        // A pod's namespace (CRI) brings its own tap; else one of ours.
        let (pod_net, tap) = match &cfg.netns {
            Some(ns) => {
                let (p, tap) = crate::podnet::PodNet::attach(ns)
                    .with_context(|| format!("taking over the pod network {}", ns.display()))?;
                (Some(p), tap)
            }
            None => (None, self.network.tap(bridged)?),
        };
        let share = || -> Result<Option<crate::shared::SharedFs>> {
            if cfg.shares.is_empty() {
                return Ok(None);
            }
            crate::shared::SharedFs::start(&self.virtiofsd, dir, &cfg.shares)
                .map(Some)
                .context("sharing host paths")
        };
        // [tap, lease?, virtio-fs socket?]: the VMM config names tap and
        // socket by number.
        let inherit_with = |shared: &Option<crate::shared::SharedFs>| {
            let fs_fd = shared.as_ref().map(|s| s.fd());
            let mut fds = vec![tap.fd()];
            fds.extend(lease.as_ref().map(Lease::fd));
            fds.extend(fs_fd);
            (fds, fs_fd)
        };
        let mut shared = share()?;
        let (inherit, fs_fd) = inherit_with(&shared);
        let console = cfg.console_log.then(|| dir.join("console.log"));
        let log = dir.join("vmm.log");
        let (vmm, agent, devices, template) = match cfg.boot {
            Boot::Template => {
                let t0 = Instant::now();
                let mut t = Template::ensure(self, &cfg.machine)?;
                times.template = t0.elapsed();
                let t1 = Instant::now();
                let (vmm, agent, devices) =
                    match self.restore(&t, cfg, dir, console.as_deref(), &inherit, fs_fd) {
                        Ok(x) => x,
                        Err(e) => {
                            if let Some(s) = shared.as_mut() {
                                // The backend failed, not the template.
                                s.check_alive().context("sharing host paths")?;
                            }
                            // A template this VMM or host refuses (other VMM
                            // build, CPU template, a damaged file) is rebuilt
                            // once. The backend's session is not reused.
                            t.invalidate();
                            t = Template::ensure(self, &cfg.machine)
                                .with_context(|| format!("restore refused ({e:#}); rebuilding"))?;
                            drop(shared.take());
                            shared = share()?;
                            let (inherit, fs_fd) = inherit_with(&shared);
                            self.restore(&t, cfg, dir, console.as_deref(), &inherit, fs_fd)
                                .with_context(|| format!("after rebuilding template {}", t.key))?
                        }
                    };
                times.agent_ready = t1.elapsed();
                (vmm, agent, devices, Some(t))
            }
            Boot::Cold => {
                let t1 = Instant::now();
                let placeholder = dir.join("empty.img");
                std::fs::File::create(&placeholder)?;
                let (slots, devices) = assign_slots(&cfg.drives, &placeholder)?;
                let vsock = dir.join(VSOCK_SOCKET);
                let config = vm_config(
                    self,
                    &cfg.machine,
                    &slots,
                    &vsock,
                    console.as_deref(),
                    tap.fd(),
                    fs_fd,
                );
                let file = dir.join("vm.json");
                std::fs::write(&file, serde_json::to_vec_pretty(&config)?)?;
                let mut shares = drive_shares(&cfg.drives);
                shares.push(Share::rw(&placeholder));
                let jail = self.jail_for(dir, &cfg.id, shares, &cfg.machine);
                let mut vmm = VmmProcess::spawn(
                    self,
                    &["--config-file".as_ref(), file.as_os_str()],
                    dir.join("api.sock"),
                    vsock,
                    &log,
                    &inherit,
                    jail.as_ref(),
                )?;
                let agent = wait_for_agent(&mut vmm, &log, Duration::from_secs(900))?;
                times.agent_ready = t1.elapsed();
                (vmm, agent, devices, None)
            }
        };
        let t2 = Instant::now();
        let net = match (&pod_net, &lease) {
            (Some(p), _) => Some(p.guest.clone()),
            (None, Some(l)) => Some(l.guest_net(self.network.mtu)),
            (None, None) => None,
        };
        give_identity(&agent, cfg, net.as_ref())?;
        times.identity = t2.elapsed();
        Ok(Sandbox {
            lease,
            tap,
            publisher,
            id: cfg.id.clone(),
            dir: dir.to_path_buf(),
            agent,
            devices,
            boot: cfg.boot,
            times,
            template,
            vmm,
            shared,
            pod_net,
        })
    }

    /// Restores `t` for `cfg` and waits for its agent.
    fn restore(
        &self,
        t: &Template,
        cfg: &SandboxConfig,
        dir: &Path,
        console: Option<&Path>,
        inherit: &[i32],
        fs_fd: Option<i32>,
    ) -> Result<(VmmProcess, AgentConn, Vec<String>)> {
        let (slots, devices) = assign_slots(&cfg.drives, &t.placeholder)?;
        let vsock = dir.join(VSOCK_SOCKET);
        let api = dir.join("api.sock");
        let _ = std::fs::remove_file(&vsock);
        let _ = std::fs::remove_file(&api);
        let log = dir.join("vmm.log");
        let mut shares = drive_shares(&cfg.drives);
        shares.extend([
            Share::ro(&t.snapshot),
            Share::ro(&t.memory),
            // Writable slots open it read-write (it has no bytes to write).
            Share::rw(&t.placeholder),
        ]);
        let jail = self.jail_for(dir, &cfg.id, shares, &cfg.machine);
        let mut vmm = VmmProcess::spawn(
            self,
            &[],
            api.clone(),
            vsock.clone(),
            &log,
            inherit,
            jail.as_ref(),
        )?;
        let drives: Vec<_> = slots
            .iter()
            .enumerate()
            .filter(|(_, p)| **p != t.placeholder)
            .map(|(i, p)| {
                let ro = i < RO_SLOTS;
                let id = slot_id(ro, if ro { i } else { i - RO_SLOTS });
                serde_json::json!({"drive_id": id, "path_on_host": p})
            })
            .collect();
        let mut load = serde_json::json!({
            "snapshot_path": t.snapshot,
            "mem_file_path": t.memory,
            "resume_vm": true,
            "vsock_uds_path": vsock,
            "serial": console_config(console),
            "drives": drives,
            "network_interfaces": [{"iface_id": NET_IFACE, "tap_fd": inherit[0]}],
        });
        if let Some(fd) = fs_fd {
            load["filesystems"] =
                serde_json::json!([{"fs_id": crate::shared::FS_ID, "socket_fd": fd}]);
        }
        let (status, body) = match api_request(&api, "PUT", "/snapshot/load", &load.to_string()) {
            Ok(x) => x,
            Err(e) => {
                // A VMM that died says why in its log.
                vmm.check_alive(&log)?;
                return Err(e);
            }
        };
        if status >= 300 {
            bail!("loading template {}: {status} {body}", t.key);
        }
        // Restored guests answer in under a second alone; many restored at
        // once on few cores take longer, and a timeout here rebuilds the
        // template, so it is generous.
        let agent = wait_for_agent(&mut vmm, &log, Duration::from_secs(120))
            .with_context(|| format!("restored from template {}", t.key))?;
        Ok((vmm, agent, devices))
    }
}

/// What every started guest is told: new randomness (a restored one shares
/// its CRNG state with every other clone of its template until now), the
/// time, its name and DNS.
fn give_identity(agent: &AgentConn, cfg: &SandboxConfig, net: Option<&GuestNet>) -> Result<()> {
    // CreateSandbox configures the network in the guest: slow when many
    // sandboxes start at once (see agent::SLOW_CALL).
    let timeout = crate::agent::SLOW_CALL;
    let mut seed = ReseedRandomRequest::new();
    seed.data = vec![0; 64];
    getrandom(&mut seed.data)?;
    let sent = std::time::Instant::now();
    agent
        .sandbox
        .reseed_random(ctx(timeout), &seed)
        .map_err(|e| anyhow::anyhow!("ReseedRandom: {}", rpc_message(&e)))?;
    // The time reaches the guest one trip after it is read: a busy guest
    // takes hundreds of milliseconds to take a request. The trip just made
    // (ReseedRandom does next to no work) measures it; half its round trip
    // is the one-way delay NTP assumes.
    let one_way = sent.elapsed() / 2;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)? + one_way;
    let mut t = SetTimeRequest::new();
    t.sec = now.as_secs() as i64;
    t.nsec = now.subsec_nanos();
    agent
        .sandbox
        .set_time(ctx(timeout), &t)
        .map_err(|e| anyhow::anyhow!("SetTime: {}", rpc_message(&e)))?;
    let mut s = CreateSandboxRequest::new();
    s.hostname = cfg.hostname.clone();
    if cfg.dns_servers.is_empty() {
        let (servers, search) =
            dns_from_host(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        s.dns_servers = servers;
        s.dns_search = search;
    } else {
        s.dns_servers = cfg.dns_servers.clone();
        s.dns_search = cfg.dns_search.clone();
    }
    if let Some(n) = net {
        let mut i = Interface::new();
        i.name = NET_IFACE.into();
        i.mac = n.mac.clone();
        i.mtu = n.mtu;
        i.addresses = n
            .addresses
            .iter()
            .map(|(ip, len)| {
                let mut a = IPAddress::new();
                a.address = ip.to_string();
                a.prefix_len = (*len).into();
                a
            })
            .collect();
        s.interfaces = vec![i];
        s.routes = n
            .routes
            .iter()
            .map(|(dest, gw)| {
                let mut r = Route::new();
                r.destination = match dest {
                    None => "default".into(),
                    Some((d, len)) => format!("{d}/{len}"),
                };
                r.gateway = gw.map(|g| g.to_string()).unwrap_or_default();
                r.device = NET_IFACE.into();
                r
            })
            .collect();
        if let Some((ip, _)) = n.addresses.first() {
            s.hosts = vec![format!("{ip}\t{}", cfg.hostname)];
        }
    }
    agent
        .sandbox
        .create_sandbox(ctx(timeout), &s)
        .map_err(|e| anyhow::anyhow!("CreateSandbox: {}", rpc_message(&e)))?;
    Ok(())
}

/// `bytes` random bytes from the kernel's CSPRNG, as hex (unique names).
pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn getrandom(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most buf.len() - done bytes into buf[done..],
        // which this function borrows mutably.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        done += n as usize;
    }
    Ok(())
}

impl Sandbox {
    /// A new connection to the agent (the first one is `agent`).
    pub fn connect(&self) -> Result<AgentConn> {
        AgentConn::connect(Endpoint::Vsock(self.vmm.vsock.clone()))
    }

    /// What the VMM logged and, with `console_log`, the guest console.
    pub fn logs(&self) -> String {
        format!(
            "vmm: {}\nconsole: {}",
            tail(&self.dir.join("vmm.log"), 2000),
            tail(&self.dir.join("console.log"), 4000)
        )
    }

    /// Asks the guest to shut down (DestroySandbox) and waits up to
    /// `timeout` for the VMM to exit; then it is killed. Returns the VMM's
    /// exit status if it exited on its own.
    pub fn shutdown(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // The agent answers, then powers off; on a slow guest the power-off
        // can overtake the answer. A lost answer followed by the VM's exit
        // is a shutdown.
        let asked = self
            .agent
            .sandbox
            .destroy_sandbox(
                ctx(Duration::from_secs(30)),
                &husk_protocol::agent::Empty::new(),
            )
            .map_err(|e| anyhow::anyhow!("DestroySandbox: {}", rpc_message(&e)));
        let deadline = Instant::now()
            + if asked.is_ok() {
                timeout
            } else {
                Duration::from_secs(5)
            };
        loop {
            if let Some(status) = self.vmm.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                asked?;
                bail!("the VM did not stop within {timeout:?} of DestroySandbox");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the VM and removes the sandbox's files (as dropping it does).
    pub fn stop(self) {}
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.vmm.child.kill_and_wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("web-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn drives_fill_slots_in_order() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, v) = (d.path().join("a"), d.path().join("b"), d.path().join("v"));
        for p in [&a, &b, &v] {
            std::fs::write(p, "").unwrap();
        }
        let ph = d.path().join("empty");
        let ro = |p: &Path| DriveSpec {
            path: p.into(),
            read_only: true,
        };
        let drives = vec![
            ro(&a),
            DriveSpec {
                path: v.clone(),
                read_only: false,
            },
            ro(&b),
        ];
        let (slots, devices) = assign_slots(&drives, &ph).unwrap();
        assert_eq!(devices, ["/dev/vdb", "/dev/vdf", "/dev/vdc"]);
        assert_eq!(slots[0], a);
        assert_eq!(slots[1], b);
        assert_eq!(slots[2], ph);
        assert_eq!(slots[RO_SLOTS], v);
        let too_many = vec![ro(&a); RO_SLOTS + 1];
        let e = assign_slots(&too_many, &ph).unwrap_err().to_string();
        assert!(e.contains("more than 4 read-only drives"), "{e}");
        let e = assign_slots(&[ro(&d.path().join("nope"))], &ph).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
