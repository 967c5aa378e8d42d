//! PID 1 duties: the filesystems every guest needs, and reaping orphans.

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

struct Fs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In mount order: later ones live under earlier ones.
const FILESYSTEMS: &[Fs] = &[
    Fs {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Fs {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Fs {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Fs {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Fs {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    Fs {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Fs {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Fs {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Mounts what the guest needs; returns the failures (already mounted is
/// fine), for the caller to report. Never panics.
pub fn mount_filesystems() -> Vec<String> {
    let mut errors = Vec::new();
    for fs in FILESYSTEMS {
        if let Err(e) = std::fs::create_dir_all(fs.target) {
            // The root is read-only: mount points must exist in the image.
            if !std::path::Path::new(fs.target).is_dir() {
                errors.push(format!("{}: {e}", fs.target));
                continue;
            }
        }
        match mount(
            Some(fs.source),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            fs.data,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => errors.push(format!("mount {} on {}: {e}", fs.fstype, fs.target)),
        }
    }
    errors
}

/// Reaps every child that exits; as PID 1 that includes orphans.
pub fn reap_forever() -> ! {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            // No children right now: nothing to wait for, look again later.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    }
}
