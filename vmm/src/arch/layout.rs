//! Guest physical memory layout (x86_64), Firecracker-compatible where it
//! matters to the guest.

/// Start of the boot GDT written for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const MEMMAP_START: u64 = 0x7000;
/// Linux zero page (bzImage boot).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for bzImage boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables for bzImage 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// EBDA: where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernel is loaded at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO hole: virtio-mmio devices, IOAPIC, LAPIC live above this.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows start here, one `MMIO_DEVICE_SIZE` page each.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The TSS KVM needs (three pages) just below the IOAPIC region.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// First GSI handed to devices (0-4 are PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin.
pub const IRQ_MAX: u32 = 23;
/// Serial console.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;

/// Guest RAM regions for `mem_size` bytes: below the MMIO gap, and the rest
/// above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, MMIO_GAP_END);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
