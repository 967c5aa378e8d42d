//! Test helpers around the agent client (husk_runtime::guest): the busybox
//! sample as a rootfs or erofs image, a spec for it, and a sandbox that
//! carries it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use husk_protocol::agent::Storage;
pub use husk_runtime::guest::{
    container, ctx, find_rpc, read_all, rpc_message, AgentConn, Endpoint, GuestError, Io, RpcError,
    Streams, SLOW_CALL,
};
use husk_runtime::{DriveSpec, Runtime, Sandbox, SandboxConfig};
use oci_spec::runtime::Spec;

/// The runtime and a busybox erofs image in a directory of the test's, or
/// None (and a SKIP line) when `unavailable` says why this host cannot.
pub fn busybox_guest(
    test: &str,
    unavailable: Option<String>,
) -> Option<(Runtime, tempfile::TempDir, PathBuf)> {
    if let Some(why) = unavailable {
        crate::skip(test, &why);
        return None;
    }
    let rt = crate::runtime().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e:#}"));
    let busybox = dir.path().join("busybox.erofs");
    busybox_erofs(&busybox).unwrap_or_else(|e| panic!("{e:#}"));
    Some((rt, dir, busybox))
}

/// A sandbox `id` with the busybox image in its first drive slot and its
/// guest console kept (failures print it).
pub fn busybox_sandbox(id: &str, busybox: &Path) -> SandboxConfig {
    let mut c = SandboxConfig::new(id);
    c.drives = vec![DriveSpec {
        path: busybox.to_path_buf(),
        read_only: true,
    }];
    c.console_log = true;
    c
}

/// The busybox image of a `busybox_sandbox`, mounted at `busybox` (the
/// root `busybox_spec("busybox", ..)` names).
pub fn busybox_storage(sb: &Sandbox) -> Storage {
    Storage {
        source: sb.devices[0].clone(),
        fstype: "erofs".into(),
        options: vec!["ro".into()],
        mount_point: "busybox".into(),
        ..Default::default()
    }
}

/// A bind of the sandbox's first host share at `dest` in the container.
pub fn host_share_mount(dest: &str) -> oci_spec::runtime::Mount {
    oci_spec::runtime::MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(husk_runtime::storage::shared::guest_source(0))
        .options(vec!["rbind".to_string(), "rw".to_string()])
        .build()
        .expect("a complete mount")
}

/// An exec's OCI process: `args` as root in `/`.
pub fn process(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "args": args, "cwd": "/", "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/bin:/usr/bin"]
    })
}

/// A runc-like default spec (oci-spec's) for the busybox rootfs at
/// `storage/<root>`, running `args`, in the sandbox's network.
pub fn busybox_spec(root: &str, args: &[&str], terminal: bool) -> Spec {
    let args = args.iter().map(|a| a.to_string()).collect();
    let mut spec = husk_runtime::container::spec::base_spec(root, args, terminal);
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
