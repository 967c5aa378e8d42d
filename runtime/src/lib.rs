//! husk-runtime: the host side of husk. Starts sandboxes (one microVM
//! each, restored from a cached template snapshot by default) and talks to
//! their agents. The CLI, the containerd shim and the orchestrator build on
//! it; it launches husk-vmm as a separate, confined process.

pub mod config;
pub mod container;
pub mod guest;
pub mod image;
pub mod net;
pub mod sandbox;
pub mod storage;
pub mod util;
pub mod vmm;

pub use config::{default_cache_dir, default_data_dir, default_run_dir, Runtime};
pub use net::NetworkMode;
pub use sandbox::{Boot, DriveSpec, Machine, Sandbox, SandboxConfig, StartTimes, Template};
