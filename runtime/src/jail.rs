//! VMM confinement, after Firecracker's jailer: husk-vmm runs in mount,
//! pid and IPC namespaces of its own, chrooted into a directory that holds
//! only what it needs (its kernel, images, template files and sockets,
//! each bind-mounted at the path it has on the host, so no configuration
//! is rewritten; the system libraries it links, read-only; a /dev with
//! only kvm), as an unprivileged uid/gid, in a cgroup that accounts its
//! memory and CPU. Its tap comes as an inherited descriptor, so no network
//! device is reachable either.
//!
//! The steps between fork and exec are plain syscalls on data prepared
//! beforehand (no allocation there). The process the runtime holds is the
//! jail's keeper: it waits for the VMM (PID 1 of the new pid namespace)
//! and exits with its status; killing the keeper kills the VMM
//! (PR_SET_PDEATHSIG), and with it the whole namespace.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// The uid/gid VMMs run as: `$HUSK_VMM_UID`, else 64000 (no account
/// needed; it owns nothing but what a sandbox gives it).
pub fn vmm_uid() -> u32 {
    std::env::var("HUSK_VMM_UID")
        .ok()
        .and_then(|u| u.parse().ok())
        .filter(|u| *u != 0)
        .unwrap_or(64_000)
}

/// Whether VMMs are confined: when husk runs as root (creating namespaces
/// and changing uid needs it), unless `$HUSK_CONFINE=0`.
pub fn enabled() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::env::var("HUSK_CONFINE").as_deref() != Ok("0")
}

/// A path the VMM sees in its jail, at the same place as on the host.
#[derive(Clone, Debug)]
pub struct Share {
    pub path: PathBuf,
    pub writable: bool,
}

impl Share {
    pub fn ro(p: impl Into<PathBuf>) -> Share {
        Share {
            path: p.into(),
            writable: false,
        }
    }
    pub fn rw(p: impl Into<PathBuf>) -> Share {
        Share {
            path: p.into(),
            writable: true,
        }
    }
}

/// A VMM's cgroup: v2 (`/sys/fs/cgroup/husk/<name>`) where the unified
/// hierarchy has the memory controller, else v1 memory and cpu
/// hierarchies (`.../memory/husk/<name>`, `.../cpu/husk/<name>`).
#[derive(Debug)]
pub struct Cgroup {
    pub dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, open for the child to join by writing "0".
    procs: Vec<File>,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Cgroup {
    /// A new group for `name` (a sandbox id), made unique: ids are unique
    /// per run directory only.
    pub fn create(name: &str) -> Result<Cgroup> {
        let name = format!("{name}-{}", crate::sandbox::random_hex(4)?);
        let name = name.as_str();
        let root = Path::new(CGROUP_ROOT);
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let parents: Vec<PathBuf> = if v2 {
            let husk = root.join("husk");
            std::fs::create_dir_all(&husk).with_context(|| format!("{}", husk.display()))?;
            // Controllers reach the sandboxes' groups through husk's.
            std::fs::write(husk.join("cgroup.subtree_control"), "+memory +cpu")
                .with_context(|| format!("enabling memory and cpu in {}", husk.display()))?;
            vec![husk]
        } else {
            ["memory", "cpu"]
                .iter()
                .map(|c| root.join(c).join("husk"))
                .collect()
        };
        let mut dirs = Vec::new();
        let mut procs = Vec::new();
        for p in &parents {
            sweep(p);
        }
        for p in parents {
            let d = p.join(name);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("creating cgroup {}", d.display()))?;
            let f = File::options()
                .write(true)
                .open(d.join("cgroup.procs"))
                .with_context(|| format!("{}", d.join("cgroup.procs").display()))?;
            dirs.push(d);
            procs.push(f);
        }
        Ok(Cgroup { dirs, procs })
    }

    /// Memory charged to the group (the VMM: guest RAM it touched, its own
    /// heap, page cache of its files), bytes.
    pub fn memory(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.current", "memory.usage_in_bytes"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
                .and_then(|s| s.trim().parse().ok())
        })
    }
}

/// Removes groups under `parent` that a husk killed before its cleanup
/// left: empty, and older than a minute (a group just made by a sandbox
/// that is starting is empty too, briefly).
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let d = e.path();
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 60);
        let empty =
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if d.is_dir() && old && empty {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.procs.clear();
        kill_and_remove(&self.dirs);
    }
}

/// Kills what runs in `dirs` (VMMs whose sandbox is gone) and removes them.
fn kill_and_remove(dirs: &[PathBuf]) {
    for d in dirs {
        for pid in std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for d in dirs {
        // Empty once the VMM and its keeper are reaped; give a dying VMM a
        // few seconds.
        for _ in 0..250 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Kills the VMMs of sandbox `name` that outlived the process holding
/// them (a shim killed with SIGKILL) and removes their cgroups: the groups
/// `<name>-<8 hex>` that `Cgroup::create` makes.
pub fn kill_groups_of(name: &str) {
    let root = Path::new(CGROUP_ROOT);
    let parents = [
        root.join("husk"),
        root.join("memory/husk"),
        root.join("cpu/husk"),
    ];
    let mut dirs = Vec::new();
    for p in parents {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let ours = n
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|r| r.len() == 8 && r.bytes().all(|b| b.is_ascii_hexdigit()));
            if ours {
                dirs.push(e.path());
            }
        }
    }
    kill_and_remove(&dirs);
}

/// Where a VMM is confined: its jail directory, what it sees there, and
/// the name of its cgroup.
#[derive(Clone, Debug)]
pub struct JailSpec {
    pub root: PathBuf,
    pub shares: Vec<Share>,
    pub cgroup: String,
}

/// Everything the child does, prepared: C strings and numbers only.
pub struct Plan {
    root: CString,
    binds: Vec<(CString, CString, bool)>,
    dev: CString,
    kvm: CString,
    kvm_rdev: libc::dev_t,
    uid: u32,
    gid: u32,
    cgroup_procs: Vec<i32>,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("{} has a NUL byte", p.display()))
}

/// Under `root`, the place where host path `p` is mirrored.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

impl Plan {
    /// Builds the jail directory `root` for `shares` (plus the system
    /// libraries and /sys/module, read-only) and the plan to enter it.
    pub fn new(root: &Path, shares: &[Share], cgroup: Option<&Cgroup>) -> Result<Plan> {
        let uid = vmm_uid();
        std::fs::create_dir_all(root).with_context(|| format!("{}", root.display()))?;
        let mut all: Vec<Share> = shares.to_vec();
        // The VMM links glibc: its loader and libraries, read-only. /lib
        // and /lib64 are links into /usr on merged-/usr systems.
        for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
            let p = Path::new(lib);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p)?;
                    let at = inside(root, p);
                    if std::fs::symlink_metadata(&at).is_err() {
                        std::os::unix::fs::symlink(&target, &at)
                            .with_context(|| format!("{}", at.display()))?;
                    }
                }
                Ok(_) => all.push(Share::ro(p)),
                Err(_) => {}
            }
        }
        // husk-vmm's host profile detection looks at loaded modules.
        if Path::new("/sys/module").is_dir() {
            all.push(Share::ro("/sys/module"));
        }
        let mut binds = Vec::new();
        for s in &mut all {
            s.path =
                std::path::absolute(&s.path).with_context(|| format!("{}", s.path.display()))?;
        }
        for s in &all {
            let meta = std::fs::metadata(&s.path)
                .with_context(|| format!("{} (for the VMM's jail)", s.path.display()))?;
            let at = inside(root, &s.path);
            if meta.is_dir() {
                std::fs::create_dir_all(&at)?;
            } else {
                if let Some(parent) = at.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if !at.exists() {
                    File::create(&at).with_context(|| format!("{}", at.display()))?;
                }
            }
            if s.writable {
                std::os::unix::fs::chown(&s.path, Some(uid), Some(uid))
                    .with_context(|| format!("giving {} to the VMM's uid", s.path.display()))?;
            }
            binds.push((cstr(&s.path)?, cstr(&at)?, s.writable));
        }
        let dev = root.join("dev");
        std::fs::create_dir_all(&dev)?;
        let kvm_rdev = std::fs::metadata("/dev/kvm").context("/dev/kvm")?.rdev();
        Ok(Plan {
            root: cstr(root)?,
            binds,
            kvm: cstr(&dev.join("kvm"))?,
            dev: cstr(&dev)?,
            kvm_rdev,
            uid,
            gid: uid,
            cgroup_procs: cgroup
                .map(|c| c.procs.iter().map(|f| f.as_raw_fd()).collect())
                .unwrap_or_default(),
        })
    }

    /// Runs between fork and exec: joins the cgroup, enters new
    /// namespaces, forks the VMM (the caller stays behind as its keeper),
    /// builds the jail's mounts, chroots and drops to the VMM's uid.
    ///
    /// # Safety
    /// Only between fork and exec (Command::pre_exec): it forks, and the
    /// keeper never returns.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY: syscalls on C strings and descriptors prepared before
        // the fork and alive for the whole call; each result is checked.
        // The caller guarantees we are between fork and exec.
        unsafe {
            for fd in &self.cgroup_procs {
                let w = libc::write(*fd, b"0".as_ptr().cast(), 1);
                if w != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC,
            ))?;
            let pid = libc::fork();
            check(pid)?;
            if pid > 0 {
                // The keeper: waits for the VMM and exits as it did. It
                // never execs, so it closes what it inherited — among
                // them the pipe on which the spawning process waits for
                // the exec, and the VMM's tap and lease.
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                    for fd in 3..4096 {
                        libc::close(fd);
                    }
                }
                let mut status = 0;
                loop {
                    let r = libc::waitpid(pid, &mut status, 0);
                    if r == pid {
                        break;
                    }
                    if r < 0 && *libc::__errno_location() != libc::EINTR {
                        libc::_exit(125);
                    }
                }
                if libc::WIFEXITED(status) {
                    libc::_exit(libc::WEXITSTATUS(status));
                }
                libc::_exit(128 + libc::WTERMSIG(status));
            }
            let null = std::ptr::null();
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null.cast(),
            ))?;
            for (src, dst, writable) in &self.binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND,
                    null.cast(),
                ))?;
                if !writable {
                    check(libc::mount(
                        null,
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                        null.cast(),
                    ))?;
                }
            }
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.dev.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=755,size=64k".as_ptr().cast(),
            ))?;
            check(libc::mknod(
                self.kvm.as_ptr(),
                libc::S_IFCHR | 0o600,
                self.kvm_rdev,
            ))?;
            check(libc::chown(self.kvm.as_ptr(), self.uid, self.gid))?;
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
            // The VMM, PID 1 of its namespace, dies with its keeper. Set
            // last: a change of uid or gid clears it.
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
            ))?;
        }
        Ok(())
    }
}

/// A libc result as io::Result (errno when negative); async-signal-safe,
/// for code between fork and exec.
pub(crate) fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
