//! A stack of overlay lower layers (containerd's committed snapshots) made
//! one read-only erofs image, cached: a container's root that a VM takes
//! as a drive instead of a virtio-fs share of the host's overlay.
//!
//! Why: a root on a drive is an image's root as `husk run` has it, so the
//! container can be parked in a container template and started from it
//! (sandbox/parked.rs); a guest with a virtio-fs root cannot be (FUSE state
//! does not survive a snapshot), and its memory must be a shared memfd,
//! copied per VM rather than mapped from the template's file.
//!
//! How: the layers are merged by the kernel, not by copying: a read-only
//! overlay of only the lower dirs (overlayfs.rst, "Multiple lower layers")
//! hides whiteouts and opaque dirs as the container would see them, and
//! mkfs.erofs (erofs-utils 1.5 reads one directory) writes what it shows.
//! One layer is its dir itself. Built under a per-key lock, renamed into
//! place; the cache keeps the most recently used [`KEEP`] images.
//!
//! The key is each layer's (path, device, inode, ctime): a committed
//! snapshot's dir is never changed and its number never reused, so the
//! same stack names the same content.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{Result, StorageError};
use crate::util::{shown, IoContext, Lock};

/// Bumped when what a key's image holds changes.
const FORMAT: u32 = 1;
/// Images kept, most recently used first (each is its image's size).
pub const KEEP: usize = 32;

/// The erofs of `lowers` (top first, as overlay's `lowerdir=` lists them)
/// under `cache`, built on first use. `userxattr`: the layers' overlay
/// attributes are `user.overlay.*` (a rootless snapshotter's).
pub fn erofs(cache: &Path, lowers: &[PathBuf], userxattr: bool) -> Result<PathBuf> {
    if lowers.is_empty() {
        return Err(StorageError::Layers("no lower layers".into()));
    }
    let key = key(lowers, userxattr)?;
    std::fs::create_dir_all(cache).at(|| shown(cache))?;
    let out = cache.join(format!("{key}.erofs"));
    if used(&out) {
        return Ok(out);
    }
    let lock_path = cache.join(format!("{key}.lock"));
    let _lock = Lock::take(&lock_path, true)?.ok_or_else(|| {
        StorageError::Layers(format!("{} kept being removed", lock_path.display()))
    })?;
    if used(&out) {
        return Ok(out);
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{key}-"))
        .tempdir_in(cache)
        .at(|| shown(cache))?;
    let img = tmp.path().join("layers.erofs");
    if let [one] = lowers {
        mkfs(one, &img)?;
    } else {
        let merged = tmp.path().join("merged");
        std::fs::create_dir(&merged).at(|| shown(&merged))?;
        let _m = Merged::mount(lowers, &merged, userxattr)?;
        mkfs(&merged, &img)?;
    }
    std::fs::File::open(&img)
        .and_then(|f| f.sync_all())
        .at(|| shown(&img))?;
    std::fs::rename(&img, &out).at(|| shown(&out))?;
    used(&out);
    let _ = std::fs::remove_file(&lock_path);
    evict(cache, KEEP);
    Ok(out)
}

/// Whether the image at `out` exists; its `.used` file's mtime is then
/// made now (the cache's use order). Not the image's own: a container
/// template is keyed on the image file's identity, mtime included.
fn used(out: &Path) -> bool {
    out.exists()
        && std::fs::File::create(out.with_extension("used"))
            .is_ok_and(|f| f.set_modified(std::time::SystemTime::now()).is_ok())
}

fn key(lowers: &[PathBuf], userxattr: bool) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("husk-layers {FORMAT} userxattr={userxattr}\n"));
    for l in lowers {
        let m = std::fs::metadata(l).at(|| shown(l))?;
        if !m.is_dir() {
            return Err(StorageError::Layers(format!(
                "{} is not a directory",
                l.display()
            )));
        }
        h.update(format!(
            "{}\0{} {} {}.{}\n",
            l.display(),
            m.dev(),
            m.ino(),
            m.ctime(),
            m.ctime_nsec()
        ));
    }
    Ok(format!("{:x}", h.finalize())[..32].to_string())
}

fn mkfs(dir: &Path, img: &Path) -> Result<()> {
    // Uncompressed (the file is local and page-cached, and 1.5's
    // compressors are single-threaded); no -T/-U: -T would rewrite every
    // file's mtime, which the container sees.
    let o = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(img)
        .arg(dir)
        .output()
        .at(|| "running mkfs.erofs (apt install erofs-utils)")?;
    if !o.status.success() {
        return Err(StorageError::Layers(format!(
            "mkfs.erofs of {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// A read-only overlay of lower dirs only, unmounted when dropped.
struct Merged<'a>(&'a Path);

impl<'a> Merged<'a> {
    fn mount(lowers: &[PathBuf], at: &'a Path, userxattr: bool) -> Result<Merged<'a>> {
        let mut data = String::from("lowerdir=");
        for (i, l) in lowers.iter().enumerate() {
            let s = l.to_str().filter(|s| !s.contains([',', ':', '\0']));
            let s = s.ok_or_else(|| {
                StorageError::Layers(format!("{}: a layer path overlay cannot name", l.display()))
            })?;
            if i > 0 {
                data.push(':');
            }
            data.push_str(s);
        }
        if userxattr {
            data.push_str(",userxattr");
        }
        let c = |s: &str| std::ffi::CString::new(s).map_err(|_| StorageError::NulInPath(s.into()));
        let (src, target, fstype, opts) = (
            c("overlay")?,
            c(at.to_str().unwrap_or_default())?,
            c("overlay")?,
            c(&data)?,
        );
        // SAFETY: all four are valid NUL-terminated strings that outlive
        // the call; the kernel copies them.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY,
                opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(StorageError::Layers(format!(
                "mounting the layers' overlay at {}: {}",
                at.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(Merged(at))
    }
}

impl Drop for Merged<'_> {
    fn drop(&mut self) {
        if let Ok(p) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path; MNT_DETACH cannot fail
            // on a mount that is still there.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Removes all but the `keep` most recently used images (best effort: a
/// VM that has one open keeps reading it; a template keyed on it is then
/// not used again, its key being the file's identity).
fn evict(cache: &Path, keep: usize) {
    let Ok(dir) = std::fs::read_dir(cache) else {
        return;
    };
    let last_use = |p: &Path| {
        let m = std::fs::metadata(p.with_extension("used")).or_else(|_| std::fs::metadata(p));
        m.and_then(|m| m.modified()).ok()
    };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .filter_map(|p| Some((last_use(&p)?, p)))
        .collect();
    images.sort_by_key(|i| std::cmp::Reverse(i.0));
    for (_, p) in images.into_iter().skip(keep) {
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("used"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: mounting an overlay needs root");
        }
        root
    }

    fn mkfs_present() -> bool {
        let ok = Command::new("mkfs.erofs").arg("--help").output().is_ok();
        if !ok {
            eprintln!("skipped: no mkfs.erofs (apt install erofs-utils)");
        }
        ok
    }

    /// The files of the erofs at `img`, as `dump.erofs` lists them.
    fn listed(img: &Path, path: &str) -> String {
        let o = Command::new("dump.erofs")
            .args(["--ls", "--path", path])
            .arg(img)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    #[test]
    fn layers_are_merged_with_their_whiteouts_applied_and_cached_by_identity() {
        if !root() || !mkfs_present() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (base, top) = (d.path().join("1/fs"), d.path().join("2/fs"));
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(&top).unwrap();
        std::fs::write(base.join("etc/kept"), "base").unwrap();
        std::fs::write(base.join("etc/gone"), "base").unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(top.join("etc/kept"), "top").unwrap();
        // A whiteout: a 0:0 character device.
        let wh = std::ffi::CString::new(top.join("etc/gone").to_str().unwrap()).unwrap();
        assert_eq!(
            // SAFETY: a valid path; mknod makes a device node there.
            unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0
        );
        let cache = d.path().join("cache");
        let lowers = vec![top.clone(), base.clone()];
        let img = erofs(&cache, &lowers, false).unwrap();
        let ls = listed(&img, "/etc");
        assert!(ls.contains("kept") && !ls.contains("gone"), "{ls}");
        // The same stack: the cached image; another: another image.
        assert_eq!(erofs(&cache, &lowers, false).unwrap(), img);
        let one = erofs(&cache, std::slice::from_ref(&base), false).unwrap();
        assert_ne!(one, img);
        assert!(listed(&one, "/etc").contains("gone"));
        // Nothing mounted or left behind but the images.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&*cache.to_string_lossy()), "{mounts}");
        let mut left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert!(
            left.iter()
                .all(|n| n.ends_with(".erofs") || n.ends_with(".used")),
            "{left:?}"
        );
        assert_eq!(left.len(), 4);
        // A use changes nothing of the image (templates are keyed on it).
        let before = std::fs::metadata(&img).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        erofs(&cache, &lowers, false).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), before);
        assert!(erofs(&cache, &[d.path().join("missing")], false).is_err());
    }

    #[test]
    fn the_least_recently_used_images_go_first() {
        let d = tempfile::tempdir().unwrap();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            let p = d.path().join(format!("{n}.erofs"));
            std::fs::File::create(&p).unwrap();
            let f = std::fs::File::create(p.with_extension("used")).unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(i as u64);
            f.set_modified(t).unwrap();
        }
        // "a" used now: the newest.
        assert!(used(&d.path().join("a.erofs")));
        evict(d.path(), 2);
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a.erofs", "a.used", "c.erofs", "c.used"]);
    }
}
