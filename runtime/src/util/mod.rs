//! Small helpers every part of the runtime uses: randomness for names,
//! file locks, log tails, errno checks.

pub mod child;

use std::path::Path;

/// A system call that failed, and what it was doing: the io part of every
/// module's error (each has an `Io` variant of this).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct IoError {
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

/// `.at(|| what)` on an io result: the error says what was being done.
pub trait IoContext<T> {
    fn at<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, IoError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, IoError> {
        self.map_err(|source| IoError {
            what: what().into(),
            source,
        })
    }
}

/// An error and its causes on one line, as anyhow's `{:#}` shows them:
/// for an error folded into another's text.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A path as an error's "what".
pub fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// `bytes` random bytes from the kernel's CSPRNG, as hex (unique names).
pub fn random_hex(bytes: usize) -> Result<String, IoError> {
    let mut b = vec![0u8; bytes];
    getrandom(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn getrandom(buf: &mut [u8]) -> Result<(), IoError> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most buf.len() - done bytes into buf[done..],
        // which this function borrows mutably.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).at(|| "getrandom");
        }
        done += n as usize;
    }
    Ok(())
}

/// The last `max` bytes of a log file, for error messages.
pub(crate) fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

/// A libc result as io::Result (errno when negative); async-signal-safe,
/// for code between fork and exec.
pub(crate) fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes an exclusive flock(2) on `f`, held until the file is closed; None
/// if another holds it and `wait` is false.
pub(crate) fn flock_exclusive(
    f: std::fs::File,
    wait: bool,
) -> std::io::Result<Option<std::fs::File>> {
    flock(f, libc::LOCK_EX, wait)
}

/// flock(2) `kind` (LOCK_EX or LOCK_SH) on `f`, held until the file is
/// closed; None if it conflicts with another's and `wait` is false.
fn flock(
    f: std::fs::File,
    kind: libc::c_int,
    wait: bool,
) -> std::io::Result<Option<std::fs::File>> {
    let op = kind | if wait { 0 } else { libc::LOCK_NB };
    // SAFETY: flock on a descriptor owned by `f`; no memory is passed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), op) } != 0 {
        let e = std::io::Error::last_os_error();
        if !wait && e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(f))
}

/// A lock on a file, exclusive or shared, released when dropped
/// (flock(2)): the lock lives as long as the open file.
#[derive(Debug)]
pub(crate) struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    /// The lock on `path` (created if missing); None if another holds it
    /// and `wait` is false.
    pub(crate) fn take(path: &Path, wait: bool) -> Result<Option<Lock>, IoError> {
        // A lock file removed (with its directory) by whoever held it
        // before: its lock guards nothing, so the file now at `path` is
        // locked instead. Bounded: each round means another removal won.
        for _ in 0..8 {
            let f = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .at(|| shown(path))?;
            let Some(f) = flock_exclusive(f, wait).at(|| format!("locking {}", path.display()))?
            else {
                return Ok(None);
            };
            if still_at(&f, path) {
                return Ok(Some(Lock(f)));
            }
            if !wait {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// A shared lock on the existing file `path`, without waiting: None if
    /// another holds it exclusively, or removed it meanwhile.
    pub(crate) fn share(path: &Path) -> Result<Option<Lock>, IoError> {
        let f = std::fs::File::open(path).at(|| shown(path))?;
        Ok(flock(f, libc::LOCK_SH, false)
            .at(|| format!("locking {}", path.display()))?
            .filter(|f| still_at(f, path))
            .map(Lock))
    }
}

/// Whether the open file `f` is still the one at `path`: a file unlinked
/// between its open and its lock (an eviction) is not.
fn still_at(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_on_a_removed_file_is_not_taken() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("lock");
        let held = Lock::take(&path, false).unwrap().unwrap();
        // Opened before the holder removes the file, locked after.
        let early = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(held);
        let early = flock(early, libc::LOCK_SH, false).unwrap().unwrap();
        assert!(!still_at(&early, &path), "a removed file's lock is stale");
        assert!(Lock::share(&path).is_err(), "no lock file: an error");
        // A new file at the path is another lock.
        let now = Lock::take(&path, false).unwrap().unwrap();
        assert!(Lock::share(&path).unwrap().is_none());
        drop(now);
        assert!(Lock::share(&path).unwrap().is_some());
    }
}
