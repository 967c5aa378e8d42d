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
/// Images used this recently are kept beyond [`KEEP`].
const RECENT: std::time::Duration = std::time::Duration::from_secs(600);

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
    if out.exists() {
        used(&out);
        return Ok(out);
    }
    let lock_path = cache.join(format!("{key}.lock"));
    let lock = Lock::take(&lock_path, true)?.ok_or_else(|| {
        StorageError::Layers(format!("{} kept being removed", lock_path.display()))
    })?;
    let built = if out.exists() {
        Ok(())
    } else {
        build(cache, &key, lowers, userxattr, &out)
    };
    // Removed under the lock: a waiter that locked the old file takes the
    // path again (Lock::take).
    let _ = std::fs::remove_file(&lock_path);
    drop(lock);
    built?;
    used(&out);
    evict(cache, KEEP, RECENT);
    Ok(out)
}

/// Builds `out` (the caller holds the key's lock).
fn build(cache: &Path, key: &str, lowers: &[PathBuf], userxattr: bool, out: &Path) -> Result<()> {
    // A build killed midway left its directory (never a mount: those
    // live in the build's own mount namespace, see `mkfs`).
    if let Ok(dir) = std::fs::read_dir(cache) {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{key}-"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{key}-"))
        .tempdir_in(cache)
        .at(|| shown(cache))?;
    let img = tmp.path().join("layers.erofs");
    if let [one] = lowers {
        mkfs(one, &img, None)?;
    } else {
        let merged = tmp.path().join("merged");
        std::fs::create_dir(&merged).at(|| shown(&merged))?;
        mkfs(&merged, &img, Some(overlay_data(lowers, userxattr)?))?;
    }
    std::fs::File::open(&img)
        .and_then(|f| f.sync_all())
        .at(|| shown(&img))?;
    std::fs::rename(&img, out).at(|| shown(out))?;
    Ok(())
}

/// Makes `out`'s `.used` file's mtime now (the cache's use order; best
/// effort). Not the image's own mtime: a container template is keyed on
/// the image file's identity, mtime included.
fn used(out: &Path) {
    if let Ok(f) = std::fs::File::create(out.with_extension("used")) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
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

/// Runs mkfs.erofs of `dir` into `img`. With `overlay` (its mount data),
/// `dir` is first made that read-only overlay, in a mount namespace of the
/// mkfs process's own: the mount goes with it, however the build ends.
fn mkfs(dir: &Path, img: &Path, overlay: Option<std::ffi::CString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    // Whoever runs this may reap every child it has: a containerd shim
    // does on SIGCHLD, which leaves a Child's wait with ECHILD and no
    // status. So mkfs.erofs runs under sh, a child of ours whose own child
    // it is, and sh reports its status as the output's last line.
    let mut cmd = Command::new("sh");
    // Uncompressed (the file is local and page-cached, and 1.5's
    // compressors are single-threaded); no -T/-U: -T would rewrite every
    // file's mtime, which the container sees.
    cmd.arg("-c")
        .arg(format!("mkfs.erofs \"$@\" 2>&1; echo \"{EXIT_MARK}$?\""))
        .arg("sh")
        .arg("--quiet")
        .arg(img)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mounts = overlay.is_some();
    if let Some(data) = overlay {
        let c = |s: &[u8]| {
            std::ffi::CString::new(s).map_err(|_| StorageError::NulInPath(dir.to_path_buf()))
        };
        let target = c(dir.as_os_str().as_encoded_bytes())?;
        let (name, root) = (c(b"overlay")?, c(b"/")?);
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only system calls (async-signal-safe) on strings made
        // before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                use crate::util::check;
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    name.as_ptr(),
                    target.as_ptr(),
                    name.as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    data.as_ptr().cast(),
                ))
            })
        };
    }
    let mut child = cmd.spawn().map_err(|e| {
        let what = if mounts {
            "mounting the layers' overlay, then starting mkfs.erofs"
        } else {
            "starting mkfs.erofs"
        };
        StorageError::Layers(format!("{what}: {e}"))
    })?;
    let mut out = String::new();
    let read = match child.stdout.take() {
        Some(o) => {
            use std::io::Read;
            // mkfs.erofs --quiet prints a few lines; bounded all the same.
            o.take(1 << 20).read_to_string(&mut out).map(drop)
        }
        None => Ok(()),
    };
    // ECHILD when a reaper took it: the status is in the output.
    let _ = child.wait();
    read.map_err(|e| StorageError::Layers(format!("reading mkfs.erofs's output: {e}")))?;
    match mkfs_status(&out) {
        (_, Some(0)) => Ok(()),
        (text, code) => Err(StorageError::Layers(format!(
            "mkfs.erofs of {}{}: {}",
            dir.display(),
            match code {
                Some(127) => " (not found: apt install erofs-utils)".to_string(),
                Some(c) => format!(" (exit {c})"),
                None => " (ended without a status)".to_string(),
            },
            text.trim()
        ))),
    }
}

/// The last line sh prints after mkfs.erofs: its exit status.
const EXIT_MARK: &str = "husk-mkfs-exit=";

/// mkfs.erofs's output and exit status from what sh printed.
fn mkfs_status(out: &str) -> (&str, Option<i32>) {
    let out = out.trim_end();
    let (text, last) = out.rsplit_once('\n').unwrap_or(("", out));
    match last.strip_prefix(EXIT_MARK).and_then(|c| c.parse().ok()) {
        Some(code) => (text, Some(code)),
        None => (out, None),
    }
}

/// The mount data of a read-only overlay of `lowers` only.
fn overlay_data(lowers: &[PathBuf], userxattr: bool) -> Result<std::ffi::CString> {
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
    // One page: the kernel's limit for mount data.
    if data.len() >= 4096 {
        return Err(StorageError::Layers(format!(
            "{} layers: their paths exceed a mount's 4 KiB of options",
            lowers.len()
        )));
    }
    std::ffi::CString::new(data).map_err(|_| StorageError::Layers("a NUL in a layer path".into()))
}

/// Removes all but the `keep` most recently used images, sparing any used
/// within `recent` (a start that was just given one has yet to open it).
/// Best effort: a VM that has one open keeps reading it; a template keyed
/// on it is then not used again, its key being the file's identity.
fn evict(cache: &Path, keep: usize, recent: std::time::Duration) {
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
    let now = std::time::SystemTime::now();
    for (t, p) in images.into_iter().skip(keep) {
        if now.duration_since(t).unwrap_or_default() < recent {
            continue;
        }
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("used"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mkfs_status_is_the_last_line() {
        assert_eq!(mkfs_status("husk-mkfs-exit=0\n"), ("", Some(0)));
        assert_eq!(
            mkfs_status("bad dir\nmore\nhusk-mkfs-exit=1\n"),
            ("bad dir\nmore", Some(1))
        );
        // Killed before sh printed it.
        assert_eq!(mkfs_status("partial\n"), ("partial", None));
        assert_eq!(mkfs_status(""), ("", None));
    }

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
        used(&d.path().join("a.erofs"));
        evict(d.path(), 2, std::time::Duration::ZERO);
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a.erofs", "a.used", "c.erofs", "c.used"]);
        // Used within `recent`: kept beyond the count.
        used(&d.path().join("c.erofs"));
        evict(d.path(), 1, std::time::Duration::from_secs(600));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 4);
    }
}
