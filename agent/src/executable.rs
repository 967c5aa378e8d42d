//! Whether a process's program is there to run, decided before libcontainer
//! is asked, so that the refusal carries a code and a detail a caller can
//! act on (NOT_FOUND + `ProgramNotFound`: Docker's exit 127;
//! PERMISSION_DENIED + `ProgramNotExecutable`: 126) instead of text only.
//! libcontainer makes the same check inside the container (its
//! `DefaultExecutor::validate`) and still does; its refusal is a string.
//!
//! The lookup follows libcontainer's: a name with a '/' is taken as a path,
//! then each `$PATH` entry joined with the name; the first that exists
//! decides, and it must be a regular file with the others-execute bit. Paths
//! resolve inside a root (pathrs; symlinks cannot leave it):
//! - an exec's: the container's own root (`/proc/<init>/root`), its mounts
//!   in place, so the answer is the container's;
//! - a create's: the rootfs, before the container's mounts exist. A path
//!   under a bind mount is looked up in the bind's source, one under a
//!   tmpfs is missing (a new tmpfs is empty); under any other mount, or
//!   through a symlink (which may lead into a mount), only "runnable" is
//!   decided here and the rest left to libcontainer.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Component, Path, PathBuf};

use husk_protocol::detail;
use nix::sys::stat::{fstat, SFlag};
use oci_spec::runtime::{Mount, Process};
use pathrs::error::ErrorKind;
use pathrs::flags::ResolverFlags;
use pathrs::{Handle, Root};
use ttrpc::Code;

/// What the lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The container path the exec runs (the first candidate there).
    Runnable(PathBuf),
    NotFound,
    NotExecutable(PathBuf),
    /// Not decidable here: libcontainer decides.
    Unknown,
}

/// Where the program is looked up.
pub enum Scope<'a> {
    /// A container being created: its rootfs and the mounts it will get.
    Create {
        rootfs: &'a Path,
        mounts: &'a [Mount],
    },
    /// A running container: its root as its init process sees it.
    Running { init_pid: i32 },
}

/// Fails with NOT_FOUND or PERMISSION_DENIED (each with its detail) when
/// `process`'s program is surely missing or not executable; else the
/// container path an exec of it runs, when that was decided here.
pub fn check(scope: &Scope, process: &Process) -> ttrpc::Result<Option<PathBuf>> {
    let Some(name) = process.args().as_ref().and_then(|a| a.first()) else {
        return Ok(None);
    };
    match lookup(scope, process) {
        Verdict::NotFound => Err(refusal(
            Code::NOT_FOUND,
            detail::PROGRAM_NOT_FOUND,
            format!("exec: {name:?}: executable file not found in $PATH"),
        )),
        Verdict::NotExecutable(p) => Err(refusal(
            Code::PERMISSION_DENIED,
            detail::PROGRAM_NOT_EXECUTABLE,
            format!(
                "exec: {name:?}: {} is not executable: permission denied",
                p.display()
            ),
        )),
        Verdict::Runnable(p) => Ok(Some(p)),
        Verdict::Unknown => Ok(None),
    }
}

fn refusal(code: Code, type_url: &str, message: String) -> ttrpc::Error {
    let mut s = ttrpc::get_status(code, message);
    let mut d = ttrpc::proto::Any::new();
    d.type_url = type_url.into();
    s.details.push(d);
    ttrpc::Error::RpcStatus(s)
}

/// Each of `names`' programs as a launch would find it ([`find_program`]).
/// Names not found are left out.
pub fn find_programs(root: &Root, names: &[String], path: &str, cwd: &Path) -> Vec<PathBuf> {
    names
        .iter()
        .filter_map(|n| find_program(root, n, path, cwd))
        .collect()
}

/// `name`'s program as a launch would find it (`path` as $PATH, from
/// `cwd`, in `root`): the container path of the first candidate that
/// resolves, when it is runnable.
pub fn find_program(root: &Root, name: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    let mut p = Process::default();
    p.set_args(Some(vec![name.to_string()]));
    p.set_env(Some(vec![format!("PATH={path}")]));
    p.set_cwd(cwd.to_path_buf());
    match decide(candidates(&p)?, |c| examine(root, c, true)) {
        Verdict::Runnable(c) => Some(c),
        _ => None,
    }
}

/// The $PATH a process gets from `env` (KEY=VALUE): the last one, as the
/// process's environment is built (libcontainer's map of it, and a parked
/// init's, keep the last of a key given twice).
pub fn path_of(env: &[String]) -> Option<&str> {
    env.iter().rev().find_map(|e| e.strip_prefix("PATH="))
}

/// The container paths libcontainer would try, in order.
fn candidates(process: &Process) -> Option<Vec<PathBuf>> {
    let name = process.args().as_ref()?.first()?;
    let env = process.env().as_ref()?;
    // No PATH: libcontainer refuses with its own reason.
    let path = path_of(env)?;
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

fn lookup(scope: &Scope, process: &Process) -> Verdict {
    let Some(candidates) = candidates(process) else {
        return Verdict::Unknown;
    };
    // The root is opened once for all of $PATH's candidates (each open is
    // guest-kernel work); one that cannot be opened decides nothing.
    let root = match scope {
        Scope::Running { init_pid } => proc_root(*init_pid),
        Scope::Create { rootfs, .. } => Root::open(rootfs).ok(),
    };
    let Some(root) = root else {
        return Verdict::Unknown;
    };
    decide(candidates, |c| match scope {
        Scope::Running { .. } => examine(&root, c, true),
        Scope::Create { mounts, .. } => in_created(&root, mounts, c),
    })
}

/// The verdict on `candidates` in order, each examined by `found`: the
/// first that exists decides; one that cannot be told decides nothing.
fn decide(candidates: Vec<PathBuf>, found: impl Fn(&Path) -> Option<Found>) -> Verdict {
    for c in candidates {
        match found(&c) {
            Some(Found::Missing) => continue,
            Some(Found::Runnable) => return Verdict::Runnable(c),
            Some(Found::NotExecutable) => return Verdict::NotExecutable(c),
            None => return Verdict::Unknown,
        }
    }
    Verdict::NotFound
}

/// A process's root directory, through its magic link (which pathrs's
/// `Root::open` does not follow).
pub fn proc_root(pid: i32) -> Option<Root> {
    let dir = std::fs::File::open(format!("/proc/{pid}/root")).ok()?;
    Some(Root::from_fd(std::os::fd::OwnedFd::from(dir)))
}

/// A candidate of a container being created: in the rootfs, or in the
/// mount it will be under (the innermost, as the container will see it).
fn in_created(rootfs: &Root, mounts: &[Mount], c: &Path) -> Option<Found> {
    let inner = mounts
        .iter()
        .filter_map(|m| strip(c, m.destination()).map(|rest| (m, rest)))
        .max_by_key(|(m, _)| normal(m.destination()).len());
    let Some((m, rest)) = inner else {
        return examine(rootfs, c, false);
    };
    if rest.as_os_str().is_empty() {
        // The mount point itself: a directory.
        return None;
    }
    match m.typ().as_deref() {
        Some("tmpfs") => Some(Found::Missing),
        Some("bind") => {
            let source = m.source().as_ref()?;
            examine(&Root::open(source).ok()?, &Path::new("/").join(rest), false)
        }
        _ => None,
    }
}

enum Found {
    Missing,
    Runnable,
    NotExecutable,
}

/// One path under `root`; None when it cannot be told. With
/// `follow_decides`, a path through symlinks decides as well (the root
/// has its mounts in place).
fn examine(root: &Root, path: &Path, follow_decides: bool) -> Option<Found> {
    let missing = |e: &pathrs::error::Error| {
        matches!(
            e.kind(),
            ErrorKind::OsError(Some(libc::ENOENT | libc::ENOTDIR))
        )
    };
    if follow_decides {
        return match root.resolve(path) {
            Ok(h) => kind(&h),
            Err(e) if missing(&e) => Some(Found::Missing),
            Err(_) => None,
        };
    }
    // Without symlinks the lexical path is the path: its answer holds.
    let strict = root
        .try_clone()
        .ok()?
        .with_resolver_flags(ResolverFlags::NO_SYMLINKS);
    match strict.resolve(path) {
        Ok(h) => return kind(&h),
        Err(e) if missing(&e) => return Some(Found::Missing),
        Err(_) => {}
    }
    // Through a symlink: only a runnable program is certain.
    match root.resolve(path).ok().map(|h| kind(&h)) {
        Some(Some(Found::Runnable)) => Some(Found::Runnable),
        _ => None,
    }
}

/// libcontainer's rule: a regular file, executable by others.
fn kind(h: &Handle) -> Option<Found> {
    let st = fstat(h.as_fd().as_raw_fd()).ok()?;
    let file = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
    Some(if file && st.st_mode & 0o001 != 0 {
        Found::Runnable
    } else {
        Found::NotExecutable
    })
}

/// A path's normal components (`..` applied, `.` and `/` dropped).
fn normal(p: &Path) -> Vec<String> {
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
}

/// `p` relative to mount point `dest`, when `p` is at or below it.
fn strip(p: &Path, dest: &Path) -> Option<PathBuf> {
    let (p, d) = (normal(p), normal(dest));
    (!d.is_empty() && p.starts_with(&d)).then(|| p[d.len()..].iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::MountBuilder;
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

    fn file(p: &Path, mode: u32) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(p, PermissionsExt::from_mode(mode)).unwrap();
    }

    #[test]
    fn programs_are_found_as_libcontainer_finds_them() {
        let d = tempfile::tempdir().unwrap();
        let r = &d.path().join("root");
        let vol = &d.path().join("vol");
        file(&r.join("usr/bin/tool"), 0o755);
        file(&r.join("usr/bin/plain"), 0o644);
        file(&vol.join("run.sh"), 0o755);
        std::fs::create_dir_all(r.join("data")).unwrap();
        // /bin -> usr/bin, links that stay in the root, one into a mount.
        symlink("usr/bin", r.join("bin")).unwrap();
        symlink("/usr/bin/tool", r.join("usr/bin/alias")).unwrap();
        symlink("/usr/bin/plain", r.join("usr/bin/plainalias")).unwrap();
        symlink("/data", r.join("app")).unwrap();
        let mounts = vec![
            MountBuilder::default()
                .destination("/data")
                .typ("bind")
                .source(vol)
                .build()
                .unwrap(),
            MountBuilder::default()
                .destination("/tmp")
                .typ("tmpfs")
                .source("tmpfs")
                .build()
                .unwrap(),
            MountBuilder::default()
                .destination("/proc")
                .typ("proc")
                .source("proc")
                .build()
                .unwrap(),
        ];
        let scope = Scope::Create {
            rootfs: r,
            mounts: &mounts,
        };
        let path = Some("/usr/local/bin:/usr/bin");
        let v = |args: &[&str], path| lookup(&scope, &process(args, path));
        let runnable = |p: &str| Verdict::Runnable(p.into());
        // The path an exec takes: the first candidate that is there.
        assert_eq!(v(&["tool"], path), runnable("/usr/bin/tool"));
        assert_eq!(v(&["alias"], path), runnable("/usr/bin/alias"));
        assert_eq!(v(&["/bin/tool"], path), runnable("/bin/tool"));
        assert_eq!(v(&["no-such-command"], path), Verdict::NotFound);
        assert_eq!(
            v(&["plain"], path),
            Verdict::NotExecutable("/usr/bin/plain".into())
        );
        // Under a bind: its source decides.
        assert_eq!(v(&["/data/run.sh"], path), runnable("/data/run.sh"));
        assert_eq!(v(&["/data/missing.sh"], path), Verdict::NotFound);
        // Under a new tmpfs: nothing.
        assert_eq!(v(&["/tmp/x"], path), Verdict::NotFound);
        // Through a symlink, not runnable: may lead into a mount; not ours.
        assert_eq!(v(&["/app/run.sh"], path), Verdict::Unknown);
        assert_eq!(v(&["plainalias"], path), Verdict::Unknown);
        assert_eq!(v(&["/bin/nope"], path), Verdict::Unknown);
        // Another mount, or no PATH: not ours to say.
        assert_eq!(v(&["/proc/x"], path), Verdict::Unknown);
        assert_eq!(v(&["tool"], None), Verdict::Unknown);
        // A directory is not a program.
        assert_eq!(
            v(&["usr"], Some("/")),
            Verdict::NotExecutable("/usr".into())
        );
        match check(&scope, &process(&["nope"], path)).unwrap_err() {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(s.message().contains("\"nope\""), "{}", s.message());
                assert_eq!(s.details[0].type_url, detail::PROGRAM_NOT_FOUND);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_running_container_is_looked_at_through_its_root() {
        // This process's own root stands in for a container's.
        let pid = std::process::id() as i32;
        let scope = Scope::Running { init_pid: pid };
        let sh = lookup(&scope, &process(&["sh"], Some("/usr/bin:/bin")));
        let first = ["/usr/bin/sh", "/bin/sh"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap();
        assert_eq!(sh, Verdict::Runnable(first.into()));
        let nope = lookup(
            &scope,
            &process(&["no-such-command-x"], Some("/usr/bin:/bin")),
        );
        assert_eq!(nope, Verdict::NotFound);
    }
}
