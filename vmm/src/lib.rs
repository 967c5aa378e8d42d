//! husk-vmm: a KVM microVM monitor on rust-vmm crates.
//!
//! Layout follows Firecracker's `src/vmm`: `builder` assembles a VM from a
//! [`config::VmConfig`], `vstate` holds KVM state, `devices` the emulated
//! hardware, `arch` the x86_64 boot details.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod cpu_template;
pub mod devices;
pub mod logging;
pub mod metrics;
pub mod seccomp;
mod seccomp_table;
pub mod snapshot;
pub mod vstate;
