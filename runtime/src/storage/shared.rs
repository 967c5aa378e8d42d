//! Host directories and files shared into a sandbox over virtio-fs (`-v
//! /host:/ctr`, `--mount type=bind`), as Kata does: one virtiofsd per
//! sandbox serves a directory holding a bind mount of each share (`b0`,
//! `b1`, ...); the agent mounts the tag once and binds each entry into the
//! container.
//!
//! The bind mounts are made in a mount namespace of virtiofsd's own
//! (entered between fork and exec), so they exist only while it runs and
//! nothing is left mounted on the host when a sandbox dies any way it can.
//! A read-only share is a read-only bind: writes fail in virtiofsd with
//! EROFS whatever the guest does. virtiofsd exits when the VMM's end of
//! the vhost-user socket closes.
//!
//! Shares can be added to a running sandbox (the containers of a pod
//! arrive one by one): the share is cloned as a detached mount tree
//! (`open_tree`) here, and a thread that has entered virtiofsd's own mount
//! namespace moves it under the served directory (`move_mount`); removal
//! unmounts it there. The host's mount table never sees them either.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::storage::{Result, StorageError};
use crate::util::{shown, IoContext, IoError};

use crate::util::check;

/// The VMM's virtio-fs device in templates and sandboxes.
pub const FS_ID: &str = "shared";
/// What the guest mounts.
pub const FS_TAG: &str = "husk-shared";
/// The agent's storage the shares appear under.
pub const MOUNT_POINT: &str = "shared";

/// Where virtiofsd is unless HUSK_VIRTIOFSD says: Debian's qemu ships it.
pub fn default_virtiofsd() -> PathBuf {
    std::env::var_os("HUSK_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/lib/qemu/virtiofsd".into())
}

/// A host path shared into a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostShare {
    pub source: PathBuf,
    pub read_only: bool,
}

/// The path, relative to the agent's storage directory, where share `i`
/// appears in the guest (the source of the container's bind mount).
pub fn guest_source(i: usize) -> String {
    format!("{MOUNT_POINT}/b{i}")
}

/// Points a spec written for shares 0..n (`guest_source(k)`) at the
/// entries they were given: share `k` became entry `entries[k]` (a
/// container joining a running sandbox gets the next free entries).
pub fn renumber(spec: &mut oci_spec::runtime::Spec, entries: &[usize]) {
    let prefix = format!("{MOUNT_POINT}/b");
    let map = |p: &Path| -> Option<PathBuf> {
        let k: usize = p.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
        entries.get(k).map(|e| PathBuf::from(guest_source(*e)))
    };
    if let Some(mut root) = spec.root().clone() {
        if let Some(p) = map(root.path()) {
            root.set_path(p);
        }
        spec.set_root(Some(root));
    }
    if let Some(mounts) = spec.mounts().clone() {
        let mounts = mounts
            .into_iter()
            .map(|mut m| {
                if let Some(p) = m.source().as_deref().and_then(map) {
                    m.set_source(Some(p));
                }
                m
            })
            .collect();
        spec.set_mounts(Some(mounts));
    }
}

/// A running virtiofsd for one sandbox and the connected socket the VMM
/// gets (inherited).
pub struct SharedFs {
    child: crate::util::child::Watched,
    stream: UnixStream,
    log: PathBuf,
    /// The served directory on the host.
    root: PathBuf,
    /// The index the next added share gets (never reused: the guest may
    /// still cache an old entry's name).
    next: usize,
}

/// One bind mount to make in virtiofsd's namespace, prepared before fork.
struct Bind {
    source: CString,
    target: CString,
    read_only: bool,
}

impl SharedFs {
    /// Starts virtiofsd serving `<dir>/shared` with `shares` bound into it.
    pub fn start(virtiofsd: &Path, dir: &Path, shares: &[HostShare]) -> Result<SharedFs> {
        if !virtiofsd.exists() {
            return Err(StorageError::NoVirtiofsd(virtiofsd.to_path_buf()));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(StorageError::NeedsRoot);
        }
        let root = dir.join("shared");
        std::fs::create_dir_all(&root).at(|| shown(&root))?;
        let mut binds = Vec::new();
        for (i, s) in shares.iter().enumerate() {
            let target = root.join(format!("b{i}"));
            mount_point(&s.source, &target)?;
            binds.push(Bind {
                source: c_path(&s.source)?,
                target: c_path(&target)?,
                read_only: s.read_only,
            });
        }
        let sock = dir.join("virtiofsd.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).at(|| shown(&sock))?;
        let log = dir.join("virtiofsd.log");
        let out = File::create(&log).at(|| shown(&log))?;
        let lfd = listener.as_raw_fd();
        let mut cmd = Command::new(virtiofsd);
        cmd.arg(format!("--fd={lfd}"))
            .arg("-o")
            .arg(format!("source={}", root.display()))
            // The guest's page cache keeps what it read until the host
            // changes it (timeouts as virtiofsd's defaults for auto).
            .arg("-o")
            .arg("cache=auto")
            .arg("-o")
            .arg("log_level=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().at(|| shown(&log))?)
            .stderr(out);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (fcntl, unshare, mount) on data prepared before; no allocation.
        unsafe {
            cmd.pre_exec(move || {
                crate::util::child::keep_across_exec(lfd)?;
                enter_namespace(&binds)
            });
        }
        let child = cmd
            .spawn()
            .at(|| format!("starting {}", virtiofsd.display()))?;
        // Queued in the backlog until virtiofsd accepts it.
        let stream = UnixStream::connect(&sock);
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let mut fs = SharedFs {
            child: crate::util::child::Watched::new(child),
            stream: match stream {
                Ok(s) => s,
                Err(source) => {
                    return Err(IoError {
                        what: "connecting to virtiofsd".into(),
                        source,
                    }
                    .into())
                }
            },
            log,
            root,
            next: shares.len(),
        };
        fs.check_alive()?;
        Ok(fs)
    }

    /// Shares `share` while virtiofsd runs; returns its index (see
    /// `guest_source`).
    pub fn add(&mut self, share: &HostShare) -> Result<usize> {
        self.check_alive()?;
        let i = self.next;
        let name = format!("b{i}");
        let target = self.root.join(&name);
        mount_point(&share.source, &target)?;
        self.next += 1;
        let r = self.in_namespace(share, &name);
        if r.is_err() {
            let _ = remove_entry(&target);
        }
        r.map_err(|e| StorageError::Share {
            path: share.source.clone(),
            source: Box::new(e),
        })?;
        Ok(i)
    }

    /// Unshares entry `i` (its mount goes; open files in the guest get
    /// errors from then on).
    pub fn remove(&mut self, i: usize) -> Result<()> {
        let name = format!("b{i}");
        if self.check_alive().is_ok() {
            let ns = self.namespace()?;
            let path = c_path(Path::new(&format!("/{name}")))?;
            std::thread::scope(|s| {
                s.spawn(|| -> std::io::Result<()> {
                    enter(&ns)?;
                    // SAFETY: a NUL-terminated path; MNT_DETACH unmounts
                    // lazily whatever the guest still holds open.
                    check(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) })
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("unmount thread panicked")))
            })
            .at(|| format!("unmounting share {name} in virtiofsd's namespace"))?;
        }
        Ok(remove_entry(&self.root.join(&name)).at(|| format!("removing share {name}"))?)
    }

    /// virtiofsd's mount namespace, once it has made the served directory
    /// its root (it sets up its sandbox after starting).
    fn namespace(&mut self) -> Result<File> {
        use std::os::unix::fs::MetadataExt;
        let want = std::fs::metadata(&self.root).at(|| shown(&self.root))?;
        let pid = self.child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ns = File::open(format!("/proc/{pid}/ns/mnt"))
                .at(|| format!("virtiofsd (pid {pid})'s mount namespace"))?;
            let root = std::fs::metadata(format!("/proc/{pid}/root"))
                .at(|| format!("virtiofsd (pid {pid})'s root"))?;
            if (root.dev(), root.ino()) == (want.dev(), want.ino()) {
                return Ok(ns);
            }
            self.check_alive()?;
            if std::time::Instant::now() > deadline {
                return Err(StorageError::NotItsRoot {
                    pid,
                    root: self.root.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Clones `share` as a detached tree and moves it to `/<name>` in
    /// virtiofsd's namespace.
    fn in_namespace(&mut self, share: &HostShare, name: &str) -> Result<()> {
        let ns = self.namespace()?;
        let source = c_path(&share.source)?;
        let target = c_path(Path::new(&format!("/{name}")))?;
        let read_only = share.read_only;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                let tree = clone_tree(&source, read_only).at(|| "cloning the mount")?;
                enter(&ns).at(|| "entering virtiofsd's mount namespace")?;
                // SAFETY: a detached tree's fd, an empty path (F_EMPTY_PATH:
                // the fd itself) and a NUL-terminated target path.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_move_mount,
                        tree.as_raw_fd(),
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        target.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    )
                };
                if r < 0 {
                    return Err(IoError {
                        what: "move_mount".into(),
                        source: std::io::Error::last_os_error(),
                    }
                    .into());
                }
                Ok(())
            })
            .join()
            .unwrap_or(Err(StorageError::MountThread))
        })
    }

    /// virtiofsd's pid (its first process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The connected socket, for the VMM to inherit.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Fails with what virtiofsd said if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().at(|| "waiting for virtiofsd")? {
            return Err(StorageError::VirtiofsdExited {
                status,
                log: crate::util::tail(&self.log, 2000),
            });
        }
        Ok(())
    }
}

impl Drop for SharedFs {
    fn drop(&mut self) {
        // It exits when the VMM's end closes (the VMM is gone by now): its
        // first process waits for the one in its namespaces, so this wait
        // covers both. One whose VMM never connected is stopped: SIGTERM
        // first, since virtiofsd's inner process dies with its parent only
        // by the signal it asked for (PR_SET_PDEATHSIG).
        if matches!(self.child.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
            return;
        }
        self.child.signal(libc::SIGTERM);
        if matches!(self.child.wait_timeout(Duration::from_secs(2)), Ok(Some(_))) {
            return;
        }
        self.child.kill_and_wait();
    }
}

const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached recursive copy of the mount tree at `source`, read-only
/// throughout when asked.
fn clone_tree(source: &CString, read_only: bool) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: open_tree takes a NUL-terminated path and flags and returns
    // a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by no one.
    let tree = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    if read_only {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: the tree's fd with an empty path (AT_EMPTY_PATH), and a
        // mount_attr that outlives the call, with its size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(tree)
}

/// Moves the calling thread (only) into the mount namespace `ns`: a thread
/// must first stop sharing its filesystem context with the others.
fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: unshare(CLONE_FS) affects only this thread's root/cwd/umask;
    // setns takes an open namespace fd.
    unsafe {
        check(libc::unshare(libc::CLONE_FS))?;
        check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS))
    }
}

/// Makes `target`, the mount point for `source`, of the source's kind: a
/// bind of a file needs a file.
fn mount_point(source: &Path, target: &Path) -> Result<()> {
    let meta = std::fs::metadata(source).at(|| format!("shared path {}", source.display()))?;
    Ok(if meta.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        File::create(target).map(drop)
    }
    .at(|| shown(target))?)
}

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| StorageError::NulInPath(p.to_path_buf()))
}

fn remove_entry(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unshares the mount namespace (private from the host's) and makes the
/// bind mounts in it.
fn enter_namespace(binds: &[Bind]) -> std::io::Result<()> {
    // SAFETY: unshare and mount take only the NUL-terminated strings
    // prepared before fork (or null where the call allows it).
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for b in binds {
            check(libc::mount(
                b.source.as_ptr(),
                b.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            if b.read_only {
                check(libc::mount(
                    std::ptr::null(),
                    b.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
        }
    }
    Ok(())
}
