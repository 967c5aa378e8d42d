//! vCPU and VM state for snapshots: everything KVM holds that a restored VM
//! needs, read while the vCPUs are parked and written back before they run.
//!
//! The types are kvm-bindings' own (serde feature); a state file is untrusted
//! input on restore, so KVM's answers to the set ioctls are what validate it.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuError;

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Kvm(what, e)
}

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: CpuId,
    pub msrs: Msrs,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            regs: self.regs,
            sregs: self.sregs,
            // kvm_xsave is plain data with a zero-length tail, which keeps
            // it from deriving Clone.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debug_regs: self.debug_regs,
            lapic: self.lapic,
            mp_state: self.mp_state,
            events: self.events,
        }
    }
}

/// The MSRs KVM can save (KVM_GET_MSR_INDEX_LIST, read once per VM).
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(ioctl("get_msr_index_list"))?
        .as_slice()
        .to_vec())
}

/// Reads the listed MSRs; one the host lists but refuses to read is left
/// out (KVM_GET_MSRS stops at it).
fn read_msrs(list: &[u32], fd: &VcpuFd) -> Result<Msrs, VcpuError> {
    let mut indices: Vec<u32> = list.to_vec();
    let mut saved = Vec::new();
    while !indices.is_empty() {
        let chunk: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&chunk).map_err(|e| VcpuError::Cpuid(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("get_msrs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..n]);
        // The one at `n` failed: skip it and read on.
        indices.drain(..(n + 1).min(indices.len()));
    }
    Msrs::from_entries(&saved).map_err(|e| VcpuError::Cpuid(format!("MSR list: {e:?}")))
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn save(msr_list: &[u32], fd: &VcpuFd) -> Result<VcpuState, VcpuError> {
        Ok(VcpuState {
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(ioctl("get_cpuid2"))?,
            msrs: read_msrs(msr_list, fd)?,
            regs: fd.get_regs().map_err(ioctl("get_regs"))?,
            sregs: fd.get_sregs().map_err(ioctl("get_sregs"))?,
            xsave: fd.get_xsave().map_err(ioctl("get_xsave"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("get_xcrs"))?,
            debug_regs: fd.get_debug_regs().map_err(ioctl("get_debug_regs"))?,
            lapic: fd.get_lapic().map_err(ioctl("get_lapic"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("get_mp_state"))?,
            events: fd.get_vcpu_events().map_err(ioctl("get_vcpu_events"))?,
        })
    }

    /// Writes the state back, in the order KVM needs (CPUID first: it
    /// decides which MSRs and XSAVE parts are valid; events last).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuError> {
        fd.set_cpuid2(&self.cpuid).map_err(ioctl("set_cpuid2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("set_mp_state"))?;
        fd.set_regs(&self.regs).map_err(ioctl("set_regs"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("set_sregs"))?;
        // SAFETY: the buffer is a whole kvm_xsave as KVM_GET_XSAVE returned
        // it (KVM checks its header); no larger XSAVE area is in use.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("set_xsave"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("set_xcrs"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(ioctl("set_debug_regs"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("set_lapic"))?;
        let n = fd.set_msrs(&self.msrs).map_err(ioctl("set_msrs"))?;
        if n != self.msrs.as_slice().len() {
            let bad = self.msrs.as_slice().get(n).map(|m| m.index).unwrap_or(0);
            return Err(VcpuError::Cpuid(format!(
                "KVM refused MSR {bad:#x} ({n} of {} restored)",
                self.msrs.as_slice().len()
            )));
        }
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("set_vcpu_events"))?;
        Ok(())
    }
}

/// The VM-wide state: interrupt controllers, PIT, kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<VmState, VcpuError> {
        let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
        let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
        let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
        for c in [&mut pic_master, &mut pic_slave, &mut ioapic] {
            fd.get_irqchip(c).map_err(ioctl("get_irqchip"))?;
        }
        let mut clock = fd.get_clock().map_err(ioctl("get_clock"))?;
        // Only the clock value is restored; KVM rejects other flags on set.
        clock.flags = 0;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit: fd.get_pit2().map_err(ioctl("get_pit2"))?,
            clock,
        })
    }

    pub fn restore(&self, fd: &VmFd) -> Result<(), VcpuError> {
        for (c, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if c.chip_id != id {
                return Err(VcpuError::Cpuid(format!(
                    "irqchip state names chip {} where {id} belongs",
                    c.chip_id
                )));
            }
            fd.set_irqchip(c).map_err(ioctl("set_irqchip"))?;
        }
        fd.set_pit2(&self.pit).map_err(ioctl("set_pit2"))?;
        fd.set_clock(&self.clock).map_err(ioctl("set_clock"))?;
        Ok(())
    }
}
