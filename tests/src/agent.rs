//! Test helpers around the agent client (husk_runtime::agent): the busybox
//! sample as a rootfs or erofs image, and a spec for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
pub use husk_runtime::agent::*;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// A runc-like default spec (oci-spec's) for the busybox rootfs at
/// `storage/<root>`, running `args`, in the sandbox's network.
pub fn busybox_spec(root: &str, args: &[&str], terminal: bool) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    process.set_terminal(Some(terminal));
    spec.set_process(Some(process));
    let mut r = spec.root().clone().unwrap_or_default();
    r.set_path(PathBuf::from(root));
    r.set_readonly(Some(false));
    spec.set_root(Some(r));
    spec.set_hostname(Some("c".into()));
    let mut linux = spec.linux().clone().unwrap_or_default();
    // Containers of a sandbox share its network, as in a pod.
    let ns: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .collect();
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    spec
}

/// Unpacks the busybox sample image (docker-archive) into `dest`.
pub fn unpack_busybox(dest: &Path) -> Result<()> {
    let archive = crate::sample_image("busybox.tar")?;
    let tmp = tempfile::tempdir()?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(tmp.path()))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("manifest.json"))?)?;
    let layers = manifest[0]["Layers"]
        .as_array()
        .context("manifest.json has no Layers")?;
    std::fs::create_dir_all(dest)?;
    for l in layers {
        let l = l.as_str().context("layer is not a path")?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(tmp.path().join(l))
            .arg("-C")
            .arg(dest))?;
    }
    Ok(())
}

/// The busybox rootfs as a read-only erofs image (the guest's second drive).
pub fn busybox_erofs(dest: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("rootfs");
    unpack_busybox(&root)?;
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(dest)
        .arg(&root))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
