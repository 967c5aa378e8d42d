//! Every external program the tests, benchmarks and runtime start, and the
//! Debian package `scripts/setup.sh` installs it from.
//!
//! A developer's machine keeps what was once installed by hand, so a missing
//! install step hides there and shows on a fresh machine as a test that times
//! out (etcd's health check once waited 30 s for an `etcdctl` that was never
//! installed). The unit tests in `tests/tests/programs.rs` check this table
//! mechanically against the sources and setup.sh; `require` makes a test that
//! finds one missing fail naming it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// (program, Debian package). A program given as an absolute path is looked
/// up there, the rest on PATH. Packages marked Essential in Debian
/// (coreutils, tar, util-linux, bsdutils, dash) are on every Debian system;
/// setup.sh still lists what is not Essential.
pub const PROGRAMS: &[(&str, &str)] = &[
    // Essential: present on every Debian 12 system.
    ("sh", "dash"),
    ("tar", "tar"),
    ("true", "coreutils"),
    ("sleep", "coreutils"),
    ("sync", "coreutils"),
    ("uname", "coreutils"),
    ("sha256sum", "coreutils"),
    ("unshare", "util-linux"),
    ("umount", "mount"),
    ("mount", "mount"),
    ("script", "bsdutils"),
    // Installed by scripts/setup.sh.
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("iptables", "iptables"),
    ("pgrep", "procps"),
    ("pkill", "procps"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("mkfs.erofs", "erofs-utils"),
    ("dump.erofs", "erofs-utils"),
    ("mkfs.ext4", "e2fsprogs"),
    ("jq", "jq"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("crun", "crun"),
    ("/usr/bin/etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("docker-registry", "docker-registry"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/lib/qemu/virtiofsd", "qemu-system-common"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ("/usr/bin/python3", "python3"),
    ("strace", "strace"),
    ("nm", "binutils"),
];

/// Packages Debian marks Essential: never missing, so setup.sh need not list them.
pub const ESSENTIAL: &[&str] = &[
    "dash",
    "tar",
    "coreutils",
    "util-linux",
    "mount",
    "bsdutils",
];

/// Where `program` is, or an error naming it and the package that provides it.
pub fn require(program: &str) -> Result<PathBuf> {
    if let Some(found) = locate(program) {
        return Ok(found);
    }
    match PROGRAMS.iter().find(|(p, _)| *p == program) {
        Some((_, pkg)) => bail!(
            "{program} not found: it comes from Debian's {pkg} package, which scripts/setup.sh \
             installs (run `make setup`)"
        ),
        None => bail!("{program} not found, and tests/src/programs.rs does not list it"),
    }
}

fn locate(program: &str) -> Option<PathBuf> {
    if program.starts_with('/') {
        return Path::new(program).exists().then(|| program.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Root's PATH may lack the sbin directories (iptables, ip live there).
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
