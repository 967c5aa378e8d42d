//! Test helpers around the agent client (husk_runtime::agent): the busybox
//! sample as a rootfs or erofs image, and a spec for it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
pub use husk_runtime::agent::*;
use oci_spec::runtime::Spec;

/// A runc-like default spec (oci-spec's) for the busybox rootfs at
/// `storage/<root>`, running `args`, in the sandbox's network.
pub fn busybox_spec(root: &str, args: &[&str], terminal: bool) -> Spec {
    let args = args.iter().map(|a| a.to_string()).collect();
    let mut spec = husk_runtime::spec::base_spec(root, args, terminal);
    spec.set_hostname(Some("c".into()));
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
