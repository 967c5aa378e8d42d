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

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

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

/// A running virtiofsd for one sandbox and the connected socket the VMM
/// gets (inherited).
pub struct SharedFs {
    child: crate::child::Watched,
    stream: UnixStream,
    log: PathBuf,
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
            bail!(
                "sharing host paths needs virtiofsd, not found at {} (Debian: qemu-system-common; or set HUSK_VIRTIOFSD)",
                virtiofsd.display()
            );
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("sharing host paths (virtio-fs) needs root: virtiofsd and its bind mounts do");
        }
        let root = dir.join("shared");
        std::fs::create_dir_all(&root).with_context(|| root.display().to_string())?;
        let mut binds = Vec::new();
        for (i, s) in shares.iter().enumerate() {
            let meta = std::fs::metadata(&s.source)
                .with_context(|| format!("shared path {}", s.source.display()))?;
            let target = root.join(format!("b{i}"));
            // The mount point is of the source's kind: a bind of a file
            // needs a file.
            if meta.is_dir() {
                std::fs::create_dir_all(&target)
            } else {
                File::create(&target).map(drop)
            }
            .with_context(|| target.display().to_string())?;
            binds.push(Bind {
                source: CString::new(s.source.as_os_str().as_bytes())?,
                target: CString::new(target.as_os_str().as_bytes())?,
                read_only: s.read_only,
            });
        }
        let sock = dir.join("virtiofsd.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).with_context(|| sock.display().to_string())?;
        let log = dir.join("virtiofsd.log");
        let out = File::create(&log).with_context(|| log.display().to_string())?;
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
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (fcntl, unshare, mount) on data prepared before; no allocation.
        unsafe {
            cmd.pre_exec(move || {
                crate::network::keep_across_exec(lfd)?;
                enter_namespace(&binds)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", virtiofsd.display()))?;
        // Queued in the backlog until virtiofsd accepts it.
        let stream = UnixStream::connect(&sock);
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let mut fs = SharedFs {
            child: crate::child::Watched::new(child),
            stream: match stream {
                Ok(s) => s,
                Err(e) => bail!("connecting to virtiofsd: {e}"),
            },
            log,
        };
        fs.check_alive()?;
        Ok(fs)
    }

    /// The connected socket, for the VMM to inherit.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Fails with what virtiofsd said if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "virtiofsd exited ({status}): {}",
                crate::template::tail(&self.log, 2000)
            );
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

/// Unshares the mount namespace (private from the host's) and makes the
/// bind mounts in it.
fn enter_namespace(binds: &[Bind]) -> std::io::Result<()> {
    use crate::jail::check;
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
