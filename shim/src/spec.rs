//! containerd's OCI spec (the bundle's config.json, written for a host
//! runtime) made into the spec of a container in the guest: the rootfs and
//! every host bind mount become virtio-fs shares, host namespace paths and
//! host-side hooks go.

use std::path::{Path, PathBuf};

use crate::error::{Result, ShimError};
use husk_runtime::storage::shared::{guest_source, HostShare};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

/// What a container needs from the host: its spec for the guest and the
/// paths to share (the rootfs first, when it is shared).
pub struct GuestSpec {
    pub spec: Spec,
    pub shares: Vec<HostShare>,
}

pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Whether `spec` has bind mounts (each is a share).
pub fn has_binds(spec: &Spec) -> bool {
    spec.mounts()
        .as_ref()
        .is_some_and(|m| m.iter().any(is_bind))
}

/// The network namespace containerd put the container in, if a path (CRI's
/// pod netns, set up by CNI).
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// Whether `path` is `/proc/<pid>/ns/<kind>` of one of `pids`: a namespace
/// of another container in the same guest (CRI joins a pod's containers to
/// the sandbox container's IPC and UTS namespaces by its pid, which is the
/// guest's).
fn in_guest(path: &Path, pids: &[u32]) -> bool {
    let mut c = path
        .components()
        .map(|c| c.as_os_str().to_str().unwrap_or(""));
    c.next() == Some("/")
        && c.next() == Some("proc")
        && c.next()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| pids.contains(&p))
        && c.next() == Some("ns")
        && c.next().is_some()
        && c.next().is_none()
}

/// `rootfs`: the container's root on the host (containerd's snapshot,
/// mounted in the bundle), shared first; None when the root is a drive
/// (the runtime's lifecycle points root.path at it). `guest_pids`: the
/// pids (in the guest) of the containers already in the sandbox.
pub fn for_guest(mut spec: Spec, rootfs: Option<&Path>, guest_pids: &[u32]) -> Result<GuestSpec> {
    let mut shares = Vec::new();
    if let Some(rootfs) = rootfs {
        shares.push(HostShare {
            source: rootfs.to_path_buf(),
            read_only: false,
        });
        let root_ro = spec
            .root()
            .as_ref()
            .is_some_and(|r| r.readonly() == Some(true));
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(PathBuf::from(guest_source(0)));
        root.set_readonly(Some(root_ro));
        spec.set_root(Some(root));
    }

    let mut mounts = Vec::new();
    for m in spec.mounts().clone().unwrap_or_default() {
        let Some(src) = m.source().clone().filter(|_| is_bind(&m)) else {
            mounts.push(m);
            continue;
        };
        if !src.is_absolute() {
            return Err(ShimError::Unsupported(format!(
                "mount {}: bind source {} is not absolute",
                m.destination().display(),
                src.display()
            )));
        }
        let read_only = m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "ro"));
        shares.push(HostShare {
            source: src,
            read_only,
        });
        let mut m = m;
        m.set_source(Some(PathBuf::from(guest_source(shares.len() - 1))));
        mounts.push(m);
    }
    spec.set_mounts(Some(mounts));

    // Hooks would run on the host's side of a runtime; there is none here.
    spec.set_hooks(None);
    if let Some(linux) = spec.linux().clone() {
        let mut linux = linux;
        if let Some(nss) = linux.namespaces().clone() {
            let nss = nss
                .into_iter()
                // A network namespace made on the host (CRI's pod netns) is
                // the VM's own network: the container stays in the guest's,
                // as do all of its pod.
                .filter(|n| !(n.typ() == LinuxNamespaceType::Network && n.path().is_some()))
                .map(|mut n| {
                    // Other paths name host namespaces, unless they are a
                    // pod member's in the guest; else the container gets
                    // namespaces of its own.
                    if !n.path().as_deref().is_some_and(|p| in_guest(p, guest_pids)) {
                        n.set_path(None);
                    }
                    n
                })
                .collect();
            linux.set_namespaces(Some(nss));
        }
        // The agent has no seccomp support (libcontainer without
        // libseccomp); the VM is the boundary.
        linux.set_seccomp(None);
        spec.set_linux(Some(linux));
    }
    if let Some(mut p) = spec.process().clone() {
        p.set_apparmor_profile(None);
        p.set_selinux_label(None);
        spec.set_process(Some(p));
    }
    Ok(GuestSpec { spec, shares })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root path and each mount's source.
    fn sources(g: &GuestSpec) -> (PathBuf, Vec<Option<PathBuf>>) {
        let root = g.spec.root().as_ref().unwrap().path().clone();
        let m = g.spec.mounts().clone().unwrap_or_default();
        (root, m.iter().map(|m| m.source().clone()).collect())
    }

    fn namespaces(g: &GuestSpec) -> Vec<oci_spec::runtime::LinuxNamespace> {
        g.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
    }

    #[test]
    fn binds_become_shares_and_host_namespaces_go() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": false},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"]}
            ],
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"}
            ]}
        }))
        .unwrap();
        let mut g = for_guest(spec, Some(Path::new("/bundle/rootfs")), &[]).unwrap();
        assert_eq!(g.shares.len(), 3);
        assert_eq!(g.shares[0].source, Path::new("/bundle/rootfs"));
        assert!(g.shares[1].read_only && !g.shares[2].read_only);
        let paths = |r: &str, m: [&str; 3]| {
            (
                PathBuf::from(r),
                m.iter().map(|p| Some(PathBuf::from(p))).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            sources(&g),
            paths("shared/b0", ["proc", "shared/b1", "shared/b2"])
        );
        let ns = namespaces(&g);
        assert_eq!(ns.len(), 2);
        assert!(ns.iter().all(|n| n.path().is_none()));
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        // Joining a running sandbox: its entries 4, 5, 6.
        husk_runtime::storage::shared::renumber(&mut g.spec, &[4, 5, 6]);
        assert_eq!(
            sources(&g),
            paths("shared/b4", ["proc", "shared/b5", "shared/b6"])
        );
    }

    #[test]
    fn a_pod_member_keeps_the_sandbox_containers_namespaces() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/proc/7/ns/net"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
                {"type": "mount"},
                {"type": "cgroup", "path": "/proc/8/ns/cgroup"}
            ]}
        }))
        .unwrap();
        assert_eq!(
            netns_path(&spec).as_deref(),
            Some(Path::new("/proc/7/ns/net"))
        );
        let g = for_guest(spec, Some(Path::new("/r")), &[7]).unwrap();
        let ns = namespaces(&g);
        let path = |t| ns.iter().find(|n| n.typ() == t).map(|n| n.path().clone());
        // The guest's network (no entry), the sandbox container's IPC and
        // UTS, new ones where the pid is not a pod member's.
        assert_eq!(path(LinuxNamespaceType::Network), None);
        assert_eq!(
            path(LinuxNamespaceType::Ipc),
            Some(Some("/proc/7/ns/ipc".into()))
        );
        assert_eq!(
            path(LinuxNamespaceType::Uts),
            Some(Some("/proc/7/ns/uts".into()))
        );
        assert_eq!(path(LinuxNamespaceType::Cgroup), Some(None));
        assert!(!in_guest(Path::new("/proc/7/ns/../../etc"), &[7]));
        assert!(!in_guest(Path::new("/var/run/netns/cni-1"), &[7]));
    }

    #[test]
    fn a_relative_bind_source_is_refused() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]
        }))
        .unwrap();
        let e = for_guest(spec, Some(Path::new("/r")), &[]).err().unwrap();
        assert!(e.to_string().contains("not absolute"), "{e}");
    }
}
