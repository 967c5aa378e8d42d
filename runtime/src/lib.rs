//! husk-runtime: the host side of husk. Starts sandboxes (one microVM
//! each, restored from a cached template snapshot by default) and talks to
//! their agents. The CLI, the containerd shim and the orchestrator build on
//! it; it launches husk-vmm as a separate, confined process.

use std::path::PathBuf;

pub mod agent;
pub mod child;
pub mod image;
pub mod jail;
pub mod network;
pub mod podnet;
pub mod ports;
pub mod pull;
pub mod record;
pub mod sandbox;
pub mod shared;
pub mod spec;
pub mod template;
pub mod vmm;
pub mod volume;

pub use network::NetworkMode;
pub use sandbox::{Boot, DriveSpec, Sandbox, SandboxConfig, StartTimes};
pub use template::{Machine, Template};

/// Where husk's parts are and where it keeps its files.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// The husk-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The guest root image (erofs, husk-agent as /sbin/husk-agent).
    pub guest_image: PathBuf,
    /// Templates live under `<cache_dir>/templates`.
    pub cache_dir: PathBuf,
    /// Each sandbox's state under `<run_dir>/<id>` (sockets, logs).
    pub run_dir: PathBuf,
    /// The bridge network sandboxes join.
    pub network: network::NetworkConfig,
    /// Run each husk-vmm confined (namespaces, chroot, its own uid, a
    /// cgroup); on by default as root.
    pub confine: bool,
    /// The virtio-fs backend for shared host paths.
    pub virtiofsd: PathBuf,
}

impl Runtime {
    /// A runtime whose artifacts are found the way husk's binaries find
    /// them: `HUSK_VMM`, `HUSK_KERNEL`, `HUSK_GUEST_IMAGE`, else beside the
    /// running binary (a build tree: `husk-vmm`, `../guest/vmlinux`,
    /// `../guest/rootfs.erofs`), else installed under /usr/lib/husk.
    pub fn locate() -> anyhow::Result<Runtime> {
        use anyhow::Context;
        let exe = std::env::current_exe().context("finding the running binary")?;
        let dir = exe.parent().unwrap_or(std::path::Path::new("/"));
        let find = |env: &str, beside: PathBuf, installed: &str| -> anyhow::Result<PathBuf> {
            if let Some(p) = std::env::var_os(env) {
                return Ok(PathBuf::from(p));
            }
            for p in [beside, PathBuf::from(installed)] {
                if p.exists() {
                    return Ok(p);
                }
            }
            anyhow::bail!("{installed} not found (build it with `make guest kernel`, or set {env})")
        };
        let mut rt = Runtime::new(
            find("HUSK_VMM", dir.join("husk-vmm"), "/usr/lib/husk/husk-vmm")?,
            find(
                "HUSK_KERNEL",
                dir.join("../guest/vmlinux"),
                "/usr/lib/husk/vmlinux",
            )?,
            find(
                "HUSK_GUEST_IMAGE",
                dir.join("../guest/rootfs.erofs"),
                "/usr/lib/husk/rootfs.erofs",
            )?,
        );
        rt.network = network::NetworkConfig::from_env()?;
        Ok(rt)
    }

    /// Cleans up after sandbox `id` whose holder died without doing so (a
    /// containerd shim killed with SIGKILL): kills its VMM through its
    /// cgroup (virtiofsd follows, its socket closed) and removes its
    /// directory.
    pub fn clean_sandbox(&self, id: &str) -> anyhow::Result<()> {
        sandbox::check_id(id)?;
        jail::kill_groups_of(id);
        let dir = self.run_dir.join(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// A runtime with the given artifacts and the default directories.
    pub fn new(vmm: PathBuf, kernel: PathBuf, guest_image: PathBuf) -> Runtime {
        Runtime {
            vmm,
            kernel,
            guest_image,
            cache_dir: default_cache_dir(),
            run_dir: default_run_dir(),
            network: network::NetworkConfig::default(),
            confine: jail::enabled(),
            virtiofsd: shared::default_virtiofsd(),
        }
    }
}

/// A per-user directory: `$env`, else `for_root` when running as root,
/// else `$xdg/husk`, else `~/<home_rel>/husk`.
fn user_dir(env: &str, for_root: Option<&str>, xdg: &str, home_rel: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(env) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    if let (Some(d), 0) = (for_root, unsafe { libc::geteuid() }) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os(xdg) {
        return PathBuf::from(d).join("husk");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(home_rel).join("husk")
}

/// Kernels and templates: `$HUSK_CACHE`, else `$XDG_CACHE_HOME/husk`, else
/// `~/.cache/husk` (the guest kernel build caches there too).
pub fn default_cache_dir() -> PathBuf {
    user_dir("HUSK_CACHE", None, "XDG_CACHE_HOME", ".cache")
}

/// Images, volumes, container records: `$HUSK_ROOT`, else /var/lib/husk for
/// root, else `$XDG_DATA_HOME/husk` or `~/.local/share/husk`.
pub fn default_data_dir() -> PathBuf {
    user_dir(
        "HUSK_ROOT",
        Some("/var/lib/husk"),
        "XDG_DATA_HOME",
        ".local/share",
    )
}

/// Sandboxes' sockets and logs: `$HUSK_RUN`, else /run/husk for root, else
/// `$XDG_RUNTIME_DIR/husk`, else `~/.husk-run/husk`. Kept short: it holds
/// Unix sockets (108-byte paths).
pub fn default_run_dir() -> PathBuf {
    user_dir(
        "HUSK_RUN",
        Some("/run/husk"),
        "XDG_RUNTIME_DIR",
        ".husk-run",
    )
}

/// Takes an exclusive flock(2) on `f`, held until the file is closed; None
/// if another holds it and `wait` is false.
pub(crate) fn flock_exclusive(
    f: std::fs::File,
    wait: bool,
) -> std::io::Result<Option<std::fs::File>> {
    let op = libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB };
    // SAFETY: flock on a descriptor owned by `f`; no memory is passed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), op) } != 0 {
        let e = std::io::Error::last_os_error();
        if !wait && e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(f))
}

/// An exclusive lock on a file, released when dropped (flock(2)): the
/// lock lives as long as the open file.
pub(crate) struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    /// The lock on `path` (created if missing); None if another holds it
    /// and `wait` is false.
    pub(crate) fn take(path: &std::path::Path, wait: bool) -> anyhow::Result<Option<Lock>> {
        use anyhow::Context;
        let f = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("{}", path.display()))?;
        Ok(flock_exclusive(f, wait)
            .with_context(|| format!("locking {}", path.display()))?
            .map(Lock))
    }
}
