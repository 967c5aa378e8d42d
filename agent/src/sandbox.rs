//! The Sandbox service: health, identity (hostname, DNS, hosts), clock and
//! entropy after a restore, and shutting the guest down.
//!
//! Every request is validated first; bad input gets INVALID_ARGUMENT naming
//! the field, never a panic (this runs in PID 1).

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use husk_protocol::agent::{
    CreateSandboxRequest, Empty, HealthResponse, ProfileRequest, ProfileResponse,
    ReseedRandomRequest, SetTimeRequest, StartSandboxRequest,
};

use crate::rpc::{check_version, internal, invalid, Metadata};

/// Largest ReseedRandom payload accepted.
pub const MAX_SEED: usize = 4096;

/// What the sandbox service needs to know about where it runs.
pub struct SandboxService {
    /// Where per-sandbox files (hostname, resolv.conf, hosts) are written;
    /// containers get them bind-mounted. /run/husk/sandbox in the guest.
    pub state_dir: PathBuf,
    /// PID 1 in a guest: may set the hostname and clock and reboot. On a host
    /// (tests) these are refused instead of touching the host.
    pub is_guest: bool,
    /// Applies CreateSandbox's interfaces and routes.
    pub network: Arc<crate::network::NetworkService>,
    /// Called after DestroySandbox has been answered.
    pub on_destroy: Arc<dyn Fn() + Send + Sync>,
    /// The cgroup v2 mount: DestroySandbox kills every process in the
    /// cgroups below it (the containers'; the agent is in the root).
    pub cgroup: PathBuf,
}

/// Forces the kernel's CRNG to reseed from its input pool.
fn reseed_crng(urandom: &std::fs::File) -> std::io::Result<()> {
    // _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is an open
    // /dev/urandom we own for the duration of the call.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(urandom), RNDRESEEDCRNG as _) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// RFC 1123 host name: 1-63 letters, digits, hyphens per label, 253 in all.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The files the sandbox request describes, validated.
pub fn sandbox_files(
    req: &CreateSandboxRequest,
) -> Result<Vec<(&'static str, String)>, crate::containers::Invalid> {
    if !valid_hostname(&req.hostname) {
        return Err(crate::containers::Invalid(format!(
            "hostname {:?} is not a valid host name",
            req.hostname
        )));
    }
    let mut resolv = String::new();
    for s in &req.dns_servers {
        s.parse::<IpAddr>().map_err(|_| {
            crate::containers::Invalid(format!("dns_servers: {s:?} is not an IP address"))
        })?;
        resolv.push_str(&format!("nameserver {s}\n"));
    }
    if !req.dns_search.is_empty() {
        for d in &req.dns_search {
            if !valid_hostname(d) {
                return Err(crate::containers::Invalid(format!(
                    "dns_search: {d:?} is not a valid domain"
                )));
            }
        }
        resolv.push_str(&format!("search {}\n", req.dns_search.join(" ")));
    }
    if !req.dns_options.is_empty() {
        for o in &req.dns_options {
            let ok = !o.is_empty()
                && o.len() <= 64
                && o.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !ok {
                return Err(crate::containers::Invalid(format!(
                    "dns_options: {o:?} is not a resolv.conf option"
                )));
            }
        }
        resolv.push_str(&format!("options {}\n", req.dns_options.join(" ")));
    }
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for line in &req.hosts {
        if line.contains(['\n', '\r', '\0']) || line.len() > 1024 {
            return Err(crate::containers::Invalid(format!(
                "hosts: line {line:?} is not a single hosts(5) line"
            )));
        }
        hosts.push_str(line);
        hosts.push('\n');
    }
    Ok(vec![
        ("hostname", format!("{}\n", req.hostname)),
        ("resolv.conf", resolv),
        ("hosts", hosts),
    ])
}

/// The RPCs, synchronous; `crate::server` serves them.
impl SandboxService {
    pub fn create_sandbox(
        &self,
        meta: &Metadata,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let _step = crate::profile::step("sandbox.create");
        let files = check_sandbox(&req)?;
        let files_step = crate::profile::step("sandbox.files");
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| internal(format!("creating {}: {e}", self.state_dir.display())))?;
        for (name, content) in files {
            // In place, not by rename, as Docker writes them: a container
            // created before (a template's parked one) has this file
            // bind-mounted, and would keep a renamed-over one.
            let path = self.state_dir.join(name);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(content.as_bytes()))
                .map_err(|e| internal(format!("writing {}: {e}", path.display())))?;
        }
        drop(files_step);
        if self.is_guest {
            let _step = crate::profile::step("sandbox.hostname");
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| internal(format!("sethostname: {e}")))?;
        }
        if !req.interfaces.is_empty() || !req.routes.is_empty() {
            if !self.network.may_change {
                return Err(invalid(
                    "interfaces and routes are refused: this agent runs in the host's network namespace",
                ));
            }
            self.network.apply_sandbox(&req.interfaces, &req.routes)?;
        }
        Ok(Empty::new())
    }

    pub fn destroy_sandbox(&self, meta: &Metadata, _: Empty) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let mut left = Ok(());
        if self.is_guest {
            // Nothing may write after the sync below: every container
            // process goes first. Then what they wrote reaches the drives
            // (the VMM writes a flushed request through before it
            // completes it), so the host may kill the VM on this answer
            // instead of waiting for the guest kernel's power-off path.
            left = kill_cgroups_below(&self.cgroup, KILL_WAIT);
            nix::unistd::sync();
        }
        // Answer, then go: the caller learns the request was taken. The
        // answer is written by the server after this returns; nothing
        // here can wait for that, so the power-off is timed. A caller that
        // kills the VM on the answer gets a wide margin (CI saw a 50 ms
        // power-off overtake the answer on a loaded, emulated guest).
        let wait = if meta.contains_key(husk_protocol::HOST_KILLS_KEY) {
            HOST_KILLS_FALLBACK
        } else {
            std::time::Duration::from_millis(50)
        };
        let f = self.on_destroy.clone();
        std::thread::spawn(move || {
            std::thread::sleep(wait);
            f();
        });
        left.map_err(|e| {
            internal(format!(
                "{e}: what they write after the sync is lost (the guest powers off all the same)"
            ))
        })?;
        Ok(Empty::new())
    }

    pub fn health(&self, meta: &Metadata, _: Empty) -> ttrpc::Result<HealthResponse> {
        check_version(meta)?;
        let mut r = HealthResponse::new();
        r.status = "SERVING".into();
        r.api_version = husk_protocol::API_VERSION;
        r.agent_version = env!("CARGO_PKG_VERSION").into();
        r.destroy_syncs = true;
        r.launch_holds = true;
        Ok(r)
    }

    pub fn set_time(&self, meta: &Metadata, req: SetTimeRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let _step = crate::profile::step("sandbox.set-time");
        check_time(&req)?;
        if !self.is_guest {
            return Err(invalid(
                "SetTime is refused outside a guest: it would set the host clock",
            ));
        }
        let ts = nix::sys::time::TimeSpec::new(req.sec, i64::from(req.nsec));
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| internal(format!("clock_settime: {e}")))?;
        Ok(Empty::new())
    }

    pub fn reseed_random(&self, meta: &Metadata, req: ReseedRandomRequest) -> ttrpc::Result<Empty> {
        check_version(meta)?;
        let _step = crate::profile::step("sandbox.reseed");
        check_seed(&req)?;
        // Writing mixes the bytes into the pool (without crediting entropy);
        // on a host it is harmless too.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .and_then(|mut f| f.write_all(&req.data).map(|_| f))
            .map_err(|e| internal(format!("/dev/urandom: {e}")))?;
        // Mixing alone changes nothing until the kernel next reseeds its
        // CRNG (up to a minute): a VM restored from a template would hand
        // out the template's random numbers meanwhile. In the guest, reseed
        // now (RNDRESEEDCRNG; the guest has no VM generation ID device to
        // do it on restore).
        if self.is_guest {
            reseed_crng(&f).map_err(|e| internal(format!("RNDRESEEDCRNG: {e}")))?;
        }
        Ok(Empty::new())
    }

    /// SetTime, ReseedRandom and CreateSandbox in one trip. The time goes
    /// first, moved on by how long this handler has had the request (the
    /// host read it just before sending); nothing in between draws random
    /// numbers. Every part is checked before any is applied.
    pub fn start_sandbox(&self, meta: &Metadata, req: StartSandboxRequest) -> ttrpc::Result<Empty> {
        let got = std::time::Instant::now();
        check_version(meta)?;
        let (Some(seed), Some(mut time), Some(sandbox)) = (
            req.seed.into_option(),
            req.time.into_option(),
            req.sandbox.into_option(),
        ) else {
            return Err(invalid("StartSandbox needs a seed, a time and a sandbox"));
        };
        check_seed(&seed)?;
        check_sandbox(&sandbox)?;
        check_time(&time)?;
        let held = got.elapsed();
        let nsec = u64::from(time.nsec) + u64::from(held.subsec_nanos());
        time.sec = time
            .sec
            .saturating_add(held.as_secs() as i64)
            .saturating_add((nsec / 1_000_000_000) as i64);
        time.nsec = (nsec % 1_000_000_000) as u32;
        self.set_time(meta, time)?;
        self.reseed_random(meta, seed)?;
        self.create_sandbox(meta, sandbox)
    }

    /// The steps recorded since the last call; counts from now on if asked.
    pub fn profile(&self, meta: &Metadata, req: ProfileRequest) -> ttrpc::Result<ProfileResponse> {
        check_version(meta)?;
        Ok(crate::profile::PROFILE.take(req.count))
    }
}

/// A ReseedRandom's payload: 1 to MAX_SEED bytes.
fn check_seed(req: &ReseedRandomRequest) -> ttrpc::Result<()> {
    if req.data.is_empty() || req.data.len() > MAX_SEED {
        return Err(invalid(format!(
            "seed of {} bytes; send 1 to {MAX_SEED}",
            req.data.len()
        )));
    }
    Ok(())
}

/// A SetTime's time: not before 1970, nanoseconds below a second.
fn check_time(req: &SetTimeRequest) -> ttrpc::Result<()> {
    if req.sec < 0 || req.nsec >= 1_000_000_000 {
        return Err(invalid(format!(
            "time {}.{:09} is out of range",
            req.sec, req.nsec
        )));
    }
    Ok(())
}

/// All of a CreateSandbox checked (files, interfaces, routes): the files
/// it writes.
fn check_sandbox(req: &CreateSandboxRequest) -> ttrpc::Result<Vec<(&'static str, String)>> {
    let files = sandbox_files(req)?;
    for i in &req.interfaces {
        crate::network::check_interface(i)?;
    }
    for r in &req.routes {
        crate::network::parse_route(r)?;
    }
    Ok(files)
}

/// When a guest whose caller kills it (HOST_KILLS_KEY) powers off on its
/// own: only if that caller is gone. Longer than any caller waits for the
/// answer.
const HOST_KILLS_FALLBACK: std::time::Duration = std::time::Duration::from_secs(60);

/// How long DestroySandbox waits for killed containers to be gone.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Kills every process in the cgroups directly below `root` (and theirs):
/// the containers'. The agent and its spawner stay in the root cgroup.
/// Returns once none is populated (cgroup.events), listing them again each
/// time (a create under way may add one), or an error naming those still
/// populated after KILL_WAIT: a process in a write when it was killed may
/// finish it, and what it wrote must be there for the sync.
fn kill_cgroups_below(root: &std::path::Path, wait: std::time::Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let Ok(dir) = std::fs::read_dir(root) else {
            return Ok(());
        };
        let busy: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("cgroup.kill").exists() && populated(p))
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let names: Vec<String> = busy.iter().map(|g| g.display().to_string()).collect();
            return Err(format!(
                "processes still in {} {wait:?} after cgroup.kill",
                names.join(", ")
            ));
        }
        for g in &busy {
            if let Err(err) = std::fs::write(g.join("cgroup.kill"), "1") {
                eprintln!("husk-agent: {}/cgroup.kill: {err}", g.display());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether cgroup `g` or one below it has a process (a cgroup that cannot
/// be read has none that matter).
fn populated(g: &std::path::Path) -> bool {
    std::fs::read_to_string(g.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["a", "web-1", "pod.example.com", &"a".repeat(63)] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "a_b", &"a".repeat(64), "ü"] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn sandbox_files_validate_every_field() {
        let mut r = CreateSandboxRequest::new();
        r.hostname = "web".into();
        r.dns_servers = vec!["10.0.0.2".into(), "fd00::1".into()];
        r.dns_search = vec!["svc.local".into()];
        r.dns_options = vec!["ndots:5".into(), "edns0".into()];
        r.hosts = vec!["10.0.0.5\tdb".into()];
        let files = sandbox_files(&r).unwrap();
        assert_eq!(
            files[1].1,
            "nameserver 10.0.0.2\nnameserver fd00::1\nsearch svc.local\noptions ndots:5 edns0\n"
        );
        assert!(files[2].1.ends_with("10.0.0.5\tdb\n"));

        let mut bad = r.clone();
        bad.dns_servers = vec!["8.8.8".into()];
        assert!(sandbox_files(&bad).unwrap_err().0.contains("dns_servers"));
        let mut bad = r.clone();
        bad.hosts = vec!["1.2.3.4 a\n5.6.7.8 b".into()];
        assert!(sandbox_files(&bad).unwrap_err().0.contains("hosts"));
        let mut bad = r.clone();
        bad.dns_options = vec!["ndots:5\nnameserver 1.2.3.4".into()];
        assert!(sandbox_files(&bad).unwrap_err().0.contains("dns_options"));
        let mut bad = r;
        bad.hostname = "no spaces".into();
        assert!(sandbox_files(&bad).unwrap_err().0.contains("hostname"));
    }

    #[test]
    fn destroy_kills_every_populated_cgroup_and_names_those_left() {
        let dir = tempfile::tempdir().unwrap();
        for (name, events) in [
            ("idle", "populated 0\nfrozen 0\n"),
            ("busy", "populated 1\n"),
        ] {
            let g = dir.path().join(name);
            std::fs::create_dir(&g).unwrap();
            std::fs::write(g.join("cgroup.kill"), "").unwrap();
            std::fs::write(g.join("cgroup.events"), events).unwrap();
        }
        // Not a cgroup (no cgroup.kill): left alone.
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let wait = std::time::Duration::from_millis(50);
        let e = kill_cgroups_below(dir.path(), wait).unwrap_err();
        assert!(e.contains("busy") && !e.contains("idle"), "{e}");
        let kill = |n: &str| std::fs::read_to_string(dir.path().join(n).join("cgroup.kill"));
        assert_eq!(kill("busy").unwrap(), "1");
        assert_eq!(kill("idle").unwrap(), "");
        // Once it is empty, the kill is done.
        std::fs::write(dir.path().join("busy/cgroup.events"), "populated 0\n").unwrap();
        assert_eq!(kill_cgroups_below(dir.path(), wait), Ok(()));
    }

    #[test]
    fn a_caller_that_kills_the_vm_gets_its_answer_before_the_power_off() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let off = Arc::new(AtomicBool::new(false));
        let seen = off.clone();
        let svc = SandboxService {
            state_dir: dir.path().join("sandbox"),
            is_guest: false,
            network: Arc::new(crate::network::NetworkService::new(false, false)),
            on_destroy: Arc::new(move || seen.store(true, Ordering::SeqCst)),
            cgroup: dir.path().join("cgroup"),
        };
        let mut meta = Metadata::new();
        meta.insert(
            husk_protocol::VERSION_KEY.into(),
            vec![husk_protocol::API_VERSION.to_string()],
        );
        let mut kills = meta.clone();
        kills.insert(husk_protocol::HOST_KILLS_KEY.into(), vec!["1".into()]);
        svc.destroy_sandbox(&kills, Empty::new()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(
            !off.load(Ordering::SeqCst),
            "powered off under a caller that kills"
        );
        // A caller that waits for the VM's exit is not kept waiting.
        svc.destroy_sandbox(&meta, Empty::new()).unwrap();
        let t = std::time::Instant::now();
        while !off.load(Ordering::SeqCst) {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "never powered off"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn start_sandbox_checks_every_part_before_applying_any() {
        let dir = tempfile::tempdir().unwrap();
        let svc = SandboxService {
            state_dir: dir.path().join("sandbox"),
            is_guest: false,
            network: Arc::new(crate::network::NetworkService::new(false, false)),
            on_destroy: Arc::new(|| {}),
            cgroup: dir.path().join("cgroup"),
        };
        let mut meta = Metadata::new();
        // The version every request carries.
        meta.insert(
            husk_protocol::VERSION_KEY.into(),
            vec![husk_protocol::API_VERSION.to_string()],
        );
        let good = || {
            let mut r = StartSandboxRequest::new();
            let mut seed = ReseedRandomRequest::new();
            seed.data = vec![1; 64];
            r.seed = Some(seed).into();
            r.time = Some(SetTimeRequest::new()).into();
            let mut sb = CreateSandboxRequest::new();
            sb.hostname = "web".into();
            r.sandbox = Some(sb).into();
            r
        };
        let refused = |r: StartSandboxRequest| svc.start_sandbox(&meta, r).unwrap_err();
        let mut r = good();
        r.time = None.into();
        assert!(format!("{:?}", refused(r)).contains("needs a seed, a time and a sandbox"));
        let mut r = good();
        r.seed.as_mut().unwrap().data = vec![0; MAX_SEED + 1];
        assert!(format!("{:?}", refused(r)).contains("seed of"));
        let mut r = good();
        r.sandbox.as_mut().unwrap().hostname = "a b".into();
        assert!(format!("{:?}", refused(r)).contains("hostname"));
        let mut r = good();
        let mut route = husk_protocol::agent::Route::new();
        route.destination = "not-a-network".into();
        r.sandbox.as_mut().unwrap().routes = vec![route];
        assert!(format!("{:?}", refused(r)).contains("not-a-network"));
        let mut r = good();
        r.time.as_mut().unwrap().nsec = 2_000_000_000;
        assert!(format!("{:?}", refused(r)).contains("out of range"));
        // Nothing was written for any of them.
        assert!(!svc.state_dir.exists());
        // A good one reaches the clock, which a host's agent refuses.
        assert!(format!("{:?}", refused(good())).contains("refused outside a guest"));
        assert!(!svc.state_dir.exists());
    }
}
