//! A CRI pod whose sandbox container runs no process: its VM starts with
//! the pod's first container, restored from a container template that
//! holds that container parked.
//!
//! Why: containerd creates the pause container first, and a VM cannot be
//! restored into. Starting the VM for pause, as the first design did,
//! leaves every workload container to a full create in a running guest
//! (many seconds of emulated guest-kernel work here); starting it for the
//! first workload container lets that container come out of a template
//! keyed by its image and spec, not by its pod. Kata answers the same
//! question by reporting the VMM's pid for every task; here the pause's
//! task is the shim's own (shim/README.md has what changes for a kubelet
//! user).
//!
//! What the pause's spec gives the pod is kept here (its network
//! namespace, hostname, /dev/shm size, runtime options) and given to the
//! VM at the first container's create. What CRI binds into every
//! container from the pod's directory (/etc/hostname, /etc/hosts,
//! /etc/resolv.conf) is read on the host then, and written by the guest's
//! agent into the files it binds into the pod's containers; /dev/shm is a
//! tmpfs of the guest. A container's spec is then the same in every pod:
//! what a container template is keyed on.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use husk_runtime::container::Dns;
use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

use crate::error::ShimError;

/// CRI's /dev/shm size when the pause's mount does not say (containerd's
/// default, 64 MiB).
const DEFAULT_SHM: u64 = 64 << 20;

/// A pod's sandbox container, kept rather than run.
#[derive(Clone, Debug)]
pub struct PodPlan {
    /// The sandbox container's id.
    pub pause: String,
    /// The pid its task reports: the shim's own (no guest process is
    /// the pause).
    pub pid: u32,
    /// CNI's network namespace, which the VM takes over.
    pub netns: Option<PathBuf>,
    pub hostname: Option<String>,
    pub shm_bytes: u64,
    /// The runtime options of its create (the shim's configuration).
    pub options: Option<Any>,
    /// The first container: its guest pid anchors the pod's IPC, UTS and
    /// PID namespaces while it lives.
    pub anchor: Option<String>,
}

/// What the pod's guest is told at its start: host name, DNS, hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The VM's id, when not its first container's.
    pub sandbox: Option<String>,
    pub hostname: Option<String>,
    pub dns: Option<Dns>,
    pub hosts: Vec<String>,
}

/// The plan for a pause container with `spec`, or why it must run (the
/// shim then starts the VM with it, as before).
pub fn plan(
    id: &str,
    spec: &Spec,
    netns: Option<PathBuf>,
    options: Option<Any>,
) -> Result<PodPlan, String> {
    let linux = spec.linux().as_ref();
    if linux
        .and_then(|l| l.sysctl().as_ref())
        .is_some_and(|s| !s.is_empty())
    {
        // Applied by the pause's create to the pod's namespaces.
        return Err("the pod sets sysctls".into());
    }
    let shm_bytes = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| m.destination() == Path::new("/dev/shm"))
        .filter_map(|m| m.source().as_deref())
        .filter(|s| s.is_absolute())
        .filter_map(|s| nix::sys::statfs::statfs(s).ok())
        .map(|s| s.blocks() * s.block_size() as u64)
        .next_back()
        .filter(|b| *b > 0)
        .unwrap_or(DEFAULT_SHM);
    Ok(PodPlan {
        pause: id.into(),
        pid: std::process::id(),
        netns,
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        shm_bytes,
        options,
        anchor: None,
    })
}

/// The files CRI binds from the pod's directory: read, not shared.
const POD_FILES: [&str; 3] = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// A pod member's spec made the same in every pod: CRI's pod files and
/// /dev/shm taken out (their contents returned, for the guest's start),
/// cgroupsPath and annotations dropped, and its namespaces pointed at the
/// anchor's (guest pid `anchor`) instead of the pause's, or made its own
/// when there is no anchor.
pub fn member_spec(
    mut spec: Spec,
    pod: &PodPlan,
    anchor: Option<u32>,
) -> Result<(Spec, Identity), ShimError> {
    let mut identity = Identity {
        hostname: pod.hostname.clone(),
        ..Default::default()
    };
    let mut mounts = Vec::new();
    for m in spec.mounts().clone().unwrap_or_default() {
        let dest = m.destination().to_string_lossy().into_owned();
        let bind = crate::spec::is_bind(&m);
        match m.source().as_deref() {
            // CRI's own (`<cri root>/sandboxes/<pod>/hosts`...), not a
            // user's bind onto the same path, which stays a bind.
            Some(src)
                if bind
                    && POD_FILES.contains(&dest.as_str())
                    && src.parent().and_then(|d| d.file_name()) == Some(pod.pause.as_ref()) =>
            {
                let text = read_small(src)?;
                read_pod_file(&dest, &text, &mut identity);
            }
            Some(_) if bind && dest == "/dev/shm" => mounts.push(shm(pod.shm_bytes)?),
            _ => mounts.push(m),
        }
    }
    spec.set_mounts(Some(mounts));
    spec.set_annotations(None);
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_cgroups_path(None);
        if let Some(nss) = linux.namespaces().clone() {
            let pause = format!("/proc/{}/", pod.pid);
            let nss = nss
                .into_iter()
                // CRI names the pod's network by the pause's too: it is
                // the VM's own, which its containers stay in.
                .filter(|n| n.typ() != LinuxNamespaceType::Network || n.path().is_none())
                .map(|mut n| {
                    let rest = n
                        .path()
                        .as_deref()
                        .and_then(|p| p.to_str())
                        .and_then(|p| p.strip_prefix(&pause))
                        .map(String::from);
                    if let Some(rest) = rest {
                        n.set_path(anchor.map(|a| PathBuf::from(format!("/proc/{a}/{rest}"))));
                    }
                    n
                })
                .collect();
            linux.set_namespaces(Some(nss));
        }
        spec.set_linux(Some(linux));
    }
    Ok((spec, identity))
}

/// A pod file: a regular file (not a FIFO or device: opened without
/// following a link or blocking), small (CRI writes a few lines); a
/// larger one is refused rather than cut.
fn read_small(path: &Path) -> Result<String, ShimError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const MAX: u64 = 64 << 10;
    let bad = |why: String| ShimError::Unsupported(format!("pod file {}: {why}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut text = String::new();
    f.take(MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX {
        return Err(bad(format!("over {MAX} bytes")));
    }
    Ok(text)
}

fn read_pod_file(dest: &str, text: &str, id: &mut Identity) {
    match dest {
        "/etc/hostname" => {
            if id.hostname.is_none() {
                id.hostname = text
                    .lines()
                    .next()
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(String::from);
            }
        }
        "/etc/hosts" => {
            // The agent writes localhost itself.
            id.hosts = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter(|l| {
                    l.split_whitespace()
                        .next()
                        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
                        .is_some_and(|ip| !ip.is_loopback())
                })
                .map(String::from)
                .collect();
        }
        _ => {
            let (servers, search) = husk_runtime::net::dns::dns_from_host(text);
            let options = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("options"))
                .flat_map(|o| o.split_whitespace())
                .map(String::from)
                .collect();
            id.dns = Some(Dns {
                servers,
                search,
                options,
            });
        }
    }
}

/// The pod's /dev/shm as a guest tmpfs of the pause's size.
fn shm(bytes: u64) -> Result<Mount, ShimError> {
    MountBuilder::default()
        .destination("/dev/shm")
        .typ("tmpfs")
        .source("shm")
        .options(vec![
            "nosuid".to_string(),
            "noexec".to_string(),
            "nodev".to_string(),
            "mode=1777".to_string(),
            format!("size={bytes}"),
        ])
        .build()
        .map_err(|e| ShimError::Unsupported(format!("/dev/shm: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(pid: u32) -> PodPlan {
        PodPlan {
            pause: "p".into(),
            pid,
            netns: None,
            hostname: None,
            shm_bytes: 1 << 20,
            options: None,
            anchor: None,
        }
    }

    fn member(dir: &Path, pause: u32) -> Spec {
        for (f, text) in [
            ("hostname", "web\n"),
            (
                "hosts",
                "127.0.0.1 localhost\n# x\n10.1.2.3 node\n::1 localhost6\n",
            ),
            (
                "resolv.conf",
                "nameserver 10.96.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n",
            ),
        ] {
            std::fs::write(dir.join(f), text).unwrap();
        }
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": {"io.kubernetes.cri.sandbox-id": "p"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hostname", "type": "bind", "source": dir.join("hostname"), "options": ["rbind", "rw"]},
                {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "rw"]},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": dir.join("resolv.conf"), "options": ["rbind", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/shm", "options": ["rbind", "rw"]},
                {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]},
            ],
            "linux": {
                "cgroupsPath": "/k8s.io/abc",
                "namespaces": [
                    {"type": "pid", "path": format!("/proc/{pause}/ns/pid")},
                    {"type": "ipc", "path": format!("/proc/{pause}/ns/ipc")},
                    {"type": "uts", "path": format!("/proc/{pause}/ns/uts")},
                    {"type": "mount"},
                    {"type": "network", "path": format!("/proc/{pause}/ns/net")},
                ]
            }
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_members_spec_loses_what_names_its_pod() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p");
        std::fs::create_dir(&dir).unwrap();
        let dir = &dir;
        let p = pod(4242);
        let spec = member(dir, 4242);
        let (s, id) = member_spec(spec.clone(), &p, None).unwrap();
        assert_eq!(id.hostname.as_deref(), Some("web"));
        assert_eq!(id.hosts, ["10.1.2.3 node"]);
        let dns = id.dns.unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.search, ["ns.svc.cluster.local", "svc.cluster.local"]);
        assert_eq!(dns.options, ["ndots:5"]);
        let dests: Vec<String> = s
            .mounts()
            .iter()
            .flatten()
            .map(|m| format!("{}:{}", m.destination().display(), m.typ().clone().unwrap()))
            .collect();
        assert_eq!(dests, ["/proc:proc", "/dev/shm:tmpfs", "/data:bind"]);
        assert!(s.annotations().is_none());
        let linux = s.linux().clone().unwrap();
        assert!(linux.cgroups_path().is_none());
        let nss = linux.namespaces().clone().unwrap();
        // Its own pid, ipc and uts namespaces; the pod's network is the
        // VM's.
        assert!(nss[..3].iter().all(|n| n.path().is_none()));
        assert_eq!(nss.len(), 4);
        // A later member: the anchor's namespaces.
        let (s, _) = member_spec(spec, &p, Some(7)).unwrap();
        let nss = s.linux().clone().unwrap().namespaces().clone().unwrap();
        assert_eq!(nss[1].path().as_deref(), Some(Path::new("/proc/7/ns/ipc")));
        // The same member in another pod (other files, other pause pid)
        // gets the same spec: what a template is keyed on.
        let other = tempfile::tempdir().unwrap();
        let other = other.path().join("p");
        std::fs::create_dir(&other).unwrap();
        let (a, _) = member_spec(member(dir, 4242), &p, None).unwrap();
        let (b, _) = member_spec(member(&other, 99), &pod(99), None).unwrap();
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
        // A bind of the user's onto /etc/hosts stays a bind; a pod file
        // that is not a regular file is refused, not read.
        let mut spec = member(dir, 4242);
        let mut mounts = spec.mounts().clone().unwrap();
        mounts[2].set_source(Some("/etc/hosts".into()));
        spec.set_mounts(Some(mounts.clone()));
        let (s, id) = member_spec(spec.clone(), &p, None).unwrap();
        assert!(id.hosts.is_empty());
        assert!(s
            .mounts()
            .iter()
            .flatten()
            .any(|m| m.destination() == Path::new("/etc/hosts")));
        std::fs::remove_file(dir.join("hosts")).unwrap();
        nix::unistd::mkfifo(&dir.join("hosts"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        mounts[2].set_source(Some(dir.join("hosts")));
        spec.set_mounts(Some(mounts));
        let e = member_spec(spec, &p, None).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_pod_with_sysctls_keeps_its_pause() {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_sysctl(Some(
            [("net.core.somaxconn".to_string(), "1024".to_string())].into(),
        ));
        spec.set_linux(Some(linux));
        let e = plan("p", &spec, None, None).unwrap_err();
        assert!(e.contains("sysctls"), "{e}");
        spec.set_linux(None);
        spec.set_hostname(Some("web".into()));
        let p = plan("p", &spec, None, None).unwrap();
        assert_eq!(p.hostname.as_deref(), Some("web"));
        assert_eq!(p.shm_bytes, DEFAULT_SHM);
    }
}
