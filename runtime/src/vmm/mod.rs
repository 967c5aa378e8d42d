//! husk-vmm processes: starting one confined (jail, cgroup), its control
//! API (typed, husk-vmm-api's bodies over HTTP/1.1 on a Unix socket) and
//! the guest's vsock ports through its hybrid vsock socket.

pub mod cgroup;
pub mod client;
pub mod jail;
pub mod process;
pub mod vsock;

pub use client::{VmmApiError, VmmClient};

use std::path::PathBuf;

use crate::util::IoError;

/// Starting and reaching a husk-vmm process.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// It exited; `log` is the end of what it printed.
    #[error("husk-vmm exited ({status}): {log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    /// A jail path the kernel cannot take.
    #[error("{} has a NUL byte", .0.display())]
    NulInPath(PathBuf),
    /// The guest port's listener did not answer the hybrid vsock handshake.
    #[error("vsock port {port}: closed before OK (nothing listening?)")]
    VsockClosed { port: u32 },
    #[error("vsock port {port}: answer {answer:?}")]
    VsockAnswer { port: u32, answer: String },
    #[error(transparent)]
    Api(#[from] VmmApiError),
}

pub type Result<T> = std::result::Result<T, VmmError>;
pub use process::VmmProcess;
pub use vsock::vsock_connect;
