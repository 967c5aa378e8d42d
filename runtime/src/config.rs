//! Where husk's parts are (VMM, guest kernel and image, virtiofsd) and
//! where it keeps its files (cache, data, run directories).

use std::path::PathBuf;

use crate::net;
use crate::storage;
use crate::vmm;

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
    pub network: net::NetworkConfig,
    /// Run each husk-vmm confined (namespaces, chroot, its own uid, a
    /// cgroup); on by default as root.
    pub confine: bool,
    /// The virtio-fs backend for shared host paths.
    pub virtiofsd: PathBuf,
    /// Have each sandbox's agent count guest work per step from its start
    /// (`HUSK_PROFILE=1`): counting is guest work itself, so it is off by
    /// default; the steps' times are kept either way.
    pub profile: bool,
    /// How many sandboxes do their start's guest work at once, host-wide
    /// (`sandbox::gate`).
    pub start_gate: crate::sandbox::StartGate,
}

/// Finding what a runtime runs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Io(#[from] crate::util::IoError),
    #[error("{what} not found (build it with `make guest kernel`, or set {env})")]
    NotFound { what: String, env: String },
    #[error("the network settings")]
    Net(#[from] net::NetError),
}

impl Runtime {
    /// A runtime whose artifacts are found the way husk's binaries find
    /// them: `HUSK_VMM`, `HUSK_KERNEL`, `HUSK_GUEST_IMAGE`, else beside the
    /// running binary (a build tree: `husk-vmm`, `../guest/vmlinux`,
    /// `../guest/rootfs.erofs`), else installed under /usr/lib/husk.
    pub fn locate() -> Result<Runtime, ConfigError> {
        use crate::util::IoContext;
        let exe = std::env::current_exe().at(|| "finding the running binary")?;
        let dir = exe.parent().unwrap_or(std::path::Path::new("/"));
        let find = |env: &str, beside: PathBuf, installed: &str| -> Result<PathBuf, ConfigError> {
            if let Some(p) = std::env::var_os(env) {
                return Ok(PathBuf::from(p));
            }
            for p in [beside, PathBuf::from(installed)] {
                if p.exists() {
                    return Ok(p);
                }
            }
            Err(ConfigError::NotFound {
                what: installed.into(),
                env: env.into(),
            })
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
        rt.network = net::NetworkConfig::from_env()?;
        rt.profile = std::env::var_os("HUSK_PROFILE").is_some_and(|v| !v.is_empty() && v != "0");
        Ok(rt)
    }

    /// A runtime with the given artifacts and the default directories.
    pub fn new(vmm: PathBuf, kernel: PathBuf, guest_image: PathBuf) -> Runtime {
        let run_dir = default_run_dir();
        Runtime {
            start_gate: crate::sandbox::StartGate::host(&run_dir),
            vmm,
            kernel,
            guest_image,
            cache_dir: default_cache_dir(),
            run_dir,
            network: net::NetworkConfig::default(),
            confine: vmm::jail::enabled(),
            virtiofsd: storage::shared::default_virtiofsd(),
            profile: false,
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
