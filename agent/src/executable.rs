//! Whether a process's program is there to run, decided before libcontainer
//! is asked, so that the answer carries a code a caller can act on
//! (NOT_FOUND: Docker's exit 127; PERMISSION_DENIED: 126) instead of text
//! only. libcontainer makes the same check inside the container (its
//! `DefaultExecutor::validate`) and still does; its refusal is a string.
//!
//! The lookup follows libcontainer's: a name with a '/' is taken as a path,
//! then each `$PATH` entry joined with the name; the first that exists
//! decides, and it must be a regular file with the others-execute bit. It
//! is resolved inside the container's root (pathrs: symlinks cannot leave
//! it). The container's own mounts are not in place yet (create) or not in
//! this mount namespace (exec), so a candidate under one of them, or a
//! symlink that does not resolve, is left to libcontainer: this check only
//! answers where it is sure.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{fstat, SFlag};
use oci_spec::runtime::Process;
use pathrs::error::ErrorKind;
use pathrs::Root;
use ttrpc::Code;

use crate::rpc::status;

/// What the lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Runnable,
    NotFound,
    NotExecutable(PathBuf),
    /// Not decidable from the root alone: libcontainer decides.
    Unknown,
}

/// Fails with NOT_FOUND or PERMISSION_DENIED when `process`'s program is
/// surely missing or not executable in `rootfs`.
pub fn check(rootfs: &Path, process: &Process, mount_points: &[PathBuf]) -> ttrpc::Result<()> {
    let Some(name) = process.args().as_ref().and_then(|a| a.first()) else {
        return Ok(());
    };
    match lookup(rootfs, process, mount_points) {
        Verdict::NotFound => Err(status(
            Code::NOT_FOUND,
            format!("exec: {name:?}: executable file not found in $PATH"),
        )),
        Verdict::NotExecutable(p) => Err(status(
            Code::PERMISSION_DENIED,
            format!(
                "exec: {name:?}: {} is not executable: permission denied",
                p.display()
            ),
        )),
        Verdict::Runnable | Verdict::Unknown => Ok(()),
    }
}

/// The container paths libcontainer would try, in order.
fn candidates(process: &Process) -> Option<Vec<PathBuf>> {
    let name = process.args().as_ref()?.first()?;
    let env = process.env().as_ref()?;
    // No PATH: libcontainer refuses with its own reason.
    let path = env.iter().find_map(|e| e.strip_prefix("PATH="))?;
    let cwd = process.cwd();
    let mut c = Vec::new();
    if name.contains('/') {
        c.push(cwd.join(name));
    }
    for dir in path.split(':') {
        c.push(cwd.join(dir).join(name));
    }
    Some(c)
}

fn lookup(rootfs: &Path, process: &Process, mount_points: &[PathBuf]) -> Verdict {
    let Some(candidates) = candidates(process) else {
        return Verdict::Unknown;
    };
    let Ok(root) = Root::open(rootfs) else {
        return Verdict::Unknown;
    };
    for c in candidates {
        if under_any(&c, mount_points) {
            return Verdict::Unknown;
        }
        match examine(&root, &c) {
            Some(Found::Missing) => continue,
            Some(Found::Runnable) => return Verdict::Runnable,
            Some(Found::NotExecutable) => return Verdict::NotExecutable(c),
            None => return Verdict::Unknown,
        }
    }
    Verdict::NotFound
}

enum Found {
    Missing,
    Runnable,
    NotExecutable,
}

/// One candidate; None when it cannot be told from the root.
fn examine(root: &Root, path: &Path) -> Option<Found> {
    let missing = |e: &pathrs::error::Error| {
        matches!(
            e.kind(),
            ErrorKind::OsError(Some(libc::ENOENT | libc::ENOTDIR))
        )
    };
    // The entry itself first: a dangling symlink may point into a mount.
    match root.resolve_nofollow(path) {
        Ok(_) => {}
        Err(e) if missing(&e) => return Some(Found::Missing),
        Err(_) => return None,
    }
    let h = root.resolve(path).ok()?;
    let st = fstat(h.as_fd().as_raw_fd()).ok()?;
    let file = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
    // libcontainer's rule: a regular file, executable by others.
    if file && st.st_mode & 0o001 != 0 {
        Some(Found::Runnable)
    } else {
        Some(Found::NotExecutable)
    }
}

/// Whether container path `p` is at or below one of `mount_points`.
fn under_any(p: &Path, mount_points: &[PathBuf]) -> bool {
    let norm = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(s) => v.push(s.to_string_lossy().into_owned()),
                Component::ParentDir => {
                    v.pop();
                }
                _ => {}
            }
        }
        v
    };
    let p = norm(p);
    mount_points.iter().any(|m| {
        let m = norm(m);
        !m.is_empty() && p.starts_with(&m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn process(args: &[&str], path: Option<&str>) -> Process {
        let mut p = Process::default();
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        p.set_env(Some(
            path.map(|p| vec![format!("PATH={p}")]).unwrap_or_default(),
        ));
        p.set_cwd("/".into());
        p
    }

    #[test]
    fn programs_are_found_as_libcontainer_finds_them() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("data")).unwrap();
        std::fs::write(r.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(r.join("usr/bin/tool"), PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(r.join("usr/bin/plain"), "").unwrap();
        std::fs::set_permissions(r.join("usr/bin/plain"), PermissionsExt::from_mode(0o644))
            .unwrap();
        // /bin -> usr/bin, and an absolute link that must stay in the root.
        symlink("usr/bin", r.join("bin")).unwrap();
        symlink("/usr/bin/tool", r.join("usr/bin/alias")).unwrap();
        symlink("/data/gone", r.join("usr/bin/dangling")).unwrap();
        let path = Some("/usr/local/bin:/bin");
        let mounts = vec![PathBuf::from("/data")];
        let v = |args: &[&str], path| lookup(r, &process(args, path), &mounts);
        assert_eq!(v(&["tool"], path), Verdict::Runnable);
        assert_eq!(v(&["alias"], path), Verdict::Runnable);
        assert_eq!(v(&["/usr/bin/tool"], path), Verdict::Runnable);
        assert_eq!(v(&["no-such-command"], path), Verdict::NotFound);
        assert_eq!(
            v(&["plain"], path),
            Verdict::NotExecutable("/bin/plain".into())
        );
        // Under a mount, dangling, or without PATH: not ours to say.
        assert_eq!(v(&["/data/run.sh"], path), Verdict::Unknown);
        assert_eq!(v(&["dangling"], path), Verdict::Unknown);
        assert_eq!(v(&["tool"], None), Verdict::Unknown);
        // A directory is not a program.
        assert_eq!(
            v(&["usr"], Some("/")),
            Verdict::NotExecutable("/usr".into())
        );
        let e = check(r, &process(&["nope"], path), &mounts).unwrap_err();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(s.message().contains("\"nope\""), "{}", s.message());
            }
            other => panic!("{other:?}"),
        }
    }
}
