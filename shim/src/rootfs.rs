//! Which containers' roots go to the guest as one erofs drive rather than
//! a virtio-fs share of containerd's mount, and their layers.
//!
//! A drive root is an image's root as `husk run` has it: the container can
//! be parked in a container template and started from it, and the VM needs
//! no virtiofsd. What it costs: the container's writes live in the guest's
//! memory (a tmpfs upper dir), not in containerd's snapshot, so `ctr
//! snapshot diff`/commit see none and they are gone when the task is; the
//! shim config's `rootfs = "virtiofs"` keeps the share (shim/README.md).
//!
//! Only what is known to be the whole root qualifies: one overlay mount
//! (containerd's overlayfs snapshotter) whose upper dir is still empty (a
//! new container's), over committed layers, with no option that changes
//! what the layers show (uidmap, metacopy, redirect_dir). Anything else (a
//! bind or native snapshot, a devmapper device, writes already made) is
//! shared. And only a container that can be parked gains from it: one
//! with bind mounts or a terminal keeps the share (`worth_a_drive`).

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;

/// The committed layers (top first) under a new container's overlay, and
/// whether they keep overlay's attributes as `user.overlay.*`; or why the
/// root is not one.
pub fn layers(mounts: &[Mount]) -> Result<(Vec<PathBuf>, bool), String> {
    let [m] = mounts else {
        return Err(format!("{} mounts, not one overlay", mounts.len()));
    };
    if m.type_ != "overlay" {
        return Err(format!("a {:?} mount, not an overlay", m.type_));
    }
    let (mut lowers, mut upper, mut userxattr) = (None, None, false);
    for o in &m.options {
        match o.split_once('=') {
            Some(("lowerdir", v)) => lowers = Some(v),
            Some(("upperdir", v)) => upper = Some(v),
            // About the upper dir, or harmless to a read-only merge.
            Some(("workdir", _)) | Some(("index", "off")) | Some(("volatile", _)) => {}
            None if o == "userxattr" => userxattr = true,
            None if ["ro", "rw", "volatile", "index=off"].contains(&o.as_str()) => {}
            // uidmap/gidmap, metacopy, redirect_dir, ...: the merge here
            // would not show what the container's mount does.
            _ => return Err(format!("overlay option {o:?}")),
        }
    }
    let lowers = lowers.ok_or("an overlay without lowerdir")?;
    if let Some(u) = upper {
        let empty = std::fs::read_dir(u)
            .map_err(|e| format!("upperdir {u}: {e}"))?
            .next()
            .is_none();
        if !empty {
            return Err(format!("upperdir {u} has the container's writes"));
        }
    }
    let lowers: Vec<PathBuf> = lowers.split(':').map(PathBuf::from).collect();
    if let Some(l) = lowers.iter().find(|l| !l.is_absolute() || !l.is_dir()) {
        return Err(format!("lowerdir {} is not a directory", l.display()));
    }
    Ok((lowers, userxattr))
}

/// Whether a container with `spec` would be parked with its root on a
/// drive: not with bind mounts (shares are a run's own) or a terminal.
/// Otherwise the drive only changes where its writes go.
pub fn worth_a_drive(spec: &oci_spec::runtime::Spec) -> Result<(), String> {
    if spec.process().as_ref().and_then(|p| p.terminal()) == Some(true) {
        return Err("a terminal's container is not parked".into());
    }
    if crate::spec::has_binds(spec) {
        return Err("a container with bind mounts is not parked".into());
    }
    Ok(())
}

/// The erofs of `mounts`'s layers under `cache` (built on first use), or
/// why there is none.
pub fn erofs(mounts: &[Mount], cache: &Path) -> Result<PathBuf, String> {
    let (lowers, userxattr) = layers(mounts)?;
    husk_runtime::storage::layers::erofs(cache, &lowers, userxattr)
        .map_err(|e| husk_runtime::util::chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[String]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_new_containers_overlay_is_its_layers() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| {
            let p = d.path().join(n);
            std::fs::create_dir_all(&p).unwrap();
            p.display().to_string()
        };
        let (l1, l2, up) = (p("1/fs"), p("2/fs"), p("3/fs"));
        let opts = |up: &str| {
            vec![
                "index=off".to_string(),
                format!("workdir={}", p("3/work")),
                format!("upperdir={up}"),
                format!("lowerdir={l2}:{l1}"),
            ]
        };
        let (lowers, userxattr) = layers(&[overlay(&opts(&up))]).unwrap();
        assert_eq!(lowers, [PathBuf::from(&l2), PathBuf::from(&l1)]);
        assert!(!userxattr);
        let mut rootless = opts(&up);
        rootless.push("userxattr".into());
        assert!(layers(&[overlay(&rootless)]).unwrap().1);

        std::fs::write(Path::new(&up).join("written"), "x").unwrap();
        let e = layers(&[overlay(&opts(&up))]).unwrap_err();
        assert!(e.contains("writes"), "{e}");
        let bind = Mount {
            type_: "bind".into(),
            source: l1.clone(),
            options: vec!["rbind".into()],
            ..Default::default()
        };
        assert!(layers(&[bind]).unwrap_err().contains("not an overlay"));
        assert!(layers(&[]).unwrap_err().contains("0 mounts"));
        let mut mapped = opts(&up);
        mapped.push("uidmap=0:1000:65536".into());
        assert!(layers(&[overlay(&mapped)]).unwrap_err().contains("uidmap"));
        let gone = vec![format!("lowerdir={l1}:/nonexistent/fs")];
        assert!(layers(&[overlay(&gone)])
            .unwrap_err()
            .contains("/nonexistent/fs"));
    }
}
