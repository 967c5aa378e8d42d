//! The KVM VM: in-kernel irqchip and PIT, guest memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::devices::virtio::GuestMemoryMmap;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM API version {0}, need 12")]
    ApiVersion(i32),
    #[error("KVM {0}: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("the memory registration thread died")]
    Thread,
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::ApiVersion(v));
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("create_vm", e))?;
        if kvm.check_extension_raw(kvm_bindings::KVM_CAP_HALT_POLL.into()) > 0 {
            // A halted vCPU sleeps at once instead of spinning up to the
            // host's halt_poll_ns (200 µs by default) for a wake-up: many
            // small guests on few cores spend that spinning on each other's
            // time.
            let cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_HALT_POLL,
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(|e| VmError::Ioctl("enable_cap(HALT_POLL)", e))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Ioctl("set_tss_address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("create_irq_chip", e))?;
        let pit = kvm_pit_config {
            // The speaker port (0x61) is answered in the kernel.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("create_pit2", e))?;
        Ok(Vm { kvm, fd })
    }

    /// Hands every region of `mem` to KVM as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned
            // by `mem`, which the VMM keeps alive for as long as the VM runs.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Ioctl("set_user_memory_region", e))?;
        }
        Ok(())
    }
}
