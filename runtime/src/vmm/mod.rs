//! husk-vmm processes: starting one confined (jail, cgroup), its control
//! API (typed, husk-vmm-api's bodies over HTTP/1.1 on a Unix socket) and
//! the guest's vsock ports through its hybrid vsock socket.

pub mod cgroup;
pub mod client;
pub mod jail;
pub mod process;
pub mod vsock;

pub use client::{VmmApiError, VmmClient};
pub use process::VmmProcess;
pub use vsock::vsock_connect;
