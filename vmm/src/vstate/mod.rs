//! KVM state: guest memory, the VM, vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
