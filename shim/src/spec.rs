//! containerd's OCI spec (the bundle's config.json, written for a host
//! runtime) made into the spec of a container in the guest: the rootfs and
//! every host bind mount become virtio-fs shares, host namespace paths and
//! host-side hooks go.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use husk_runtime::shared::{guest_source, HostShare};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

/// What a container needs from the host: its spec for the guest and the
/// paths to share (the rootfs first).
pub struct GuestSpec {
    pub spec: Spec,
    pub shares: Vec<HostShare>,
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// `rootfs`: the container's root on the host (containerd's snapshot,
/// mounted in the bundle).
pub fn for_guest(mut spec: Spec, rootfs: &Path) -> Result<GuestSpec> {
    let mut shares = vec![HostShare {
        source: rootfs.to_path_buf(),
        read_only: false,
    }];
    let root_ro = spec
        .root()
        .as_ref()
        .is_some_and(|r| r.readonly() == Some(true));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from(guest_source(0)));
    root.set_readonly(Some(root_ro));
    spec.set_root(Some(root));

    let mut mounts = Vec::new();
    for m in spec.mounts().clone().unwrap_or_default() {
        let Some(src) = m.source().clone().filter(|_| is_bind(&m)) else {
            mounts.push(m);
            continue;
        };
        if !src.is_absolute() {
            bail!(
                "mount {}: bind source {} is not absolute",
                m.destination().display(),
                src.display()
            );
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
                // the VM's own network: the container stays in the guest's.
                .filter(|n| !(n.typ() == LinuxNamespaceType::Network && n.path().is_some()))
                .map(|mut n| {
                    // Paths name host namespaces; in the guest the
                    // container gets namespaces of its own.
                    n.set_path(None);
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
        let g = for_guest(spec, Path::new("/bundle/rootfs")).unwrap();
        assert_eq!(g.shares.len(), 3);
        assert_eq!(g.shares[0].source, Path::new("/bundle/rootfs"));
        assert!(g.shares[1].read_only && !g.shares[2].read_only);
        let r = g.spec.root().as_ref().unwrap();
        assert_eq!(r.path(), Path::new("shared/b0"));
        let m = g.spec.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(m[1].source().as_deref(), Some(Path::new("shared/b1")));
        assert_eq!(m[2].source().as_deref(), Some(Path::new("shared/b2")));
        let ns = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert_eq!(ns.len(), 2);
        assert!(ns.iter().all(|n| n.path().is_none()));
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
    }

    #[test]
    fn a_relative_bind_source_is_refused() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]
        }))
        .unwrap();
        let e = for_guest(spec, Path::new("/r")).err().unwrap();
        assert!(e.to_string().contains("not absolute"), "{e}");
    }
}
