//! What a sandbox's containers store and see: named volumes (ext4 images
//! on the read-write drive slots), host paths shared over virtio-fs, and
//! layer stacks made one erofs root.

pub mod layers;
pub mod shared;
pub mod volume;

use std::path::PathBuf;

use crate::util::IoError;

/// Volumes and virtio-fs shares.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("volume name {0:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-], 2-64 characters")]
    InvalidName(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    /// Its lock is held: a running sandbox has it (one writer per ext4).
    #[error("volume {0} is in use by another sandbox")]
    InUse(String),
    #[error("{}: not a volume's record", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Making a layer stack one erofs image.
    #[error("layers: {0}")]
    Layers(String),
    #[error("mkfs.ext4 for volume {name}: {stderr}")]
    Mkfs { name: String, stderr: String },
    #[error("sharing host paths needs virtiofsd, not found at {} (Debian: qemu-system-common; or set HUSK_VIRTIOFSD)", .0.display())]
    NoVirtiofsd(PathBuf),
    #[error("sharing host paths (virtio-fs) needs root: virtiofsd and its bind mounts do")]
    NeedsRoot,
    #[error("{} has a NUL byte", .0.display())]
    NulInPath(PathBuf),
    #[error("virtiofsd exited ({status}): {log}")]
    VirtiofsdExited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("virtiofsd (pid {pid}) has not made {} its root: is it one that sandboxes itself in a mount namespace?", .root.display())]
    NotItsRoot { pid: u32, root: PathBuf },
    #[error("the mount thread panicked")]
    MountThread,
    #[error("sharing {} into the running sandbox", .path.display())]
    Share {
        path: PathBuf,
        #[source]
        source: Box<StorageError>,
    },
}

pub type Result<T> = std::result::Result<T, StorageError>;
