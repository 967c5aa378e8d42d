//! KVM state: guest memory, the VM, vCPUs.

pub mod memory;
pub mod state;
pub mod vcpu;
pub mod vm;
