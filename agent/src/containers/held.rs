//! A container's mount and IPC namespaces, held by the agent from its
//! create until its removal.
//!
//! Why: when a container's last process exits, the kernel drops the
//! namespaces it was the last user of in that exit, before the exit is
//! reported to its parent: for the mount namespace, every mount in it
//! unmounted (proc, sysfs, the /dev tmpfs, devpts, shm, mqueue, cgroup,
//! the sandbox files' binds, the rootfs) and the superblocks only it used
//! shut down. On this project's CI the guest kernel is emulated and that
//! work delays the exit status by a large part of a second; on hardware it
//! is still work on the path between a process's end and its waiter.
//! Held, the exit is reported at once and the namespaces go when the
//! container is removed (RemoveContainer), or with the whole VM
//! (DestroySandbox kills every process and syncs first: nothing is left to
//! unmount there).
//!
//! Nothing in the container sees the difference: the namespaces have no
//! process left in them, and the descriptors are the agent's own
//! (close-on-exec, never passed on).

use std::os::fd::OwnedFd;

/// The namespaces held, by their /proc/PID/ns names.
const HELD: [&str; 2] = ["mnt", "ipc"];

/// Handles on the namespaces of process `pid` (a container's init, just
/// created). One that cannot be opened is not held: the container works
/// the same, its exit only waits for that namespace's end.
pub(super) fn hold(pid: i32) -> Vec<OwnedFd> {
    HELD.iter()
        .filter_map(|ns| {
            let path = format!("/proc/{pid}/ns/{ns}");
            match std::fs::File::open(&path) {
                Ok(f) => Some(OwnedFd::from(f)),
                Err(e) => {
                    eprintln!("husk-agent: holding {path}: {e}");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_handles_are_namespaces_of_that_process() {
        let held = hold(std::process::id() as i32);
        assert_eq!(held.len(), HELD.len());
        for (fd, ns) in held.iter().zip(HELD) {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            let own = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_eq!(link, own);
        }
        // None for a process that is not there.
        assert!(hold(i32::MAX).is_empty());
    }
}
