//! husk-vmm's control plane as Rust types. husk-vmm parses its config file
//! and API bodies into these (unknown fields denied); the runtime builds its
//! requests from them, so both sides agree by construction and a field
//! renamed on one side fails to compile on the other.
//!
//! The resources and field names follow Firecracker's API (`boot-source`,
//! `machine-config`, `drives`, `snapshot/load`, ...) so a Firecracker user
//! can read them; husk adds `host_profile`, `serial` and inherited fds.
//! Checks that need the VMM's limits (vCPU count, interrupt lines, tag
//! length) live in husk-vmm.

pub mod config;
pub mod control;
pub mod snapshot;

pub use config::{
    BootSource, Drive, EntropyConfig, FsConfig, MachineConfig, NetConfig, PartialDrive,
    SerialConfig, SerialOutput, VmConfig, VsockConfig, DEFAULT_BOOT_ARGS,
};
pub use control::{Action, ActionType, Fault, InstanceInfo, InstanceState, VmState, VmStateChange};
pub use snapshot::{CreateRequest, DriveBacking, FsBacking, LoadRequest, TapBacking};
