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

use crate::util::{shown, IoContext};
use crate::vmm::{Result, VmmError};

use crate::util::check;
use crate::vmm::cgroup::Cgroup;

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
    CString::new(p.as_os_str().as_bytes()).map_err(|_| VmmError::NulInPath(p.to_path_buf()))
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
        std::fs::create_dir_all(root).at(|| shown(root))?;
        let mut all: Vec<Share> = shares.to_vec();
        // The VMM links glibc: its loader and libraries, read-only. /lib
        // and /lib64 are links into /usr on merged-/usr systems.
        for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
            let p = Path::new(lib);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p).at(|| shown(p))?;
                    let at = inside(root, p);
                    if std::fs::symlink_metadata(&at).is_err() {
                        std::os::unix::fs::symlink(&target, &at).at(|| shown(&at))?;
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
            s.path = std::path::absolute(&s.path).at(|| shown(&s.path))?;
        }
        for s in &all {
            let meta = std::fs::metadata(&s.path)
                .at(|| format!("{} (for the VMM's jail)", s.path.display()))?;
            let at = inside(root, &s.path);
            if meta.is_dir() {
                std::fs::create_dir_all(&at).at(|| shown(&at))?;
            } else {
                if let Some(parent) = at.parent() {
                    std::fs::create_dir_all(parent).at(|| shown(parent))?;
                }
                if !at.exists() {
                    File::create(&at).at(|| shown(&at))?;
                }
            }
            if s.writable {
                std::os::unix::fs::chown(&s.path, Some(uid), Some(uid))
                    .at(|| format!("giving {} to the VMM's uid", s.path.display()))?;
            }
            binds.push((cstr(&s.path)?, cstr(&at)?, s.writable));
        }
        let dev = root.join("dev");
        std::fs::create_dir_all(&dev).at(|| shown(&dev))?;
        let kvm_rdev = std::fs::metadata("/dev/kvm").at(|| "/dev/kvm")?.rdev();
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
