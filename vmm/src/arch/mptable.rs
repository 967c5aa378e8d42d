//! Intel MultiProcessor Specification 1.4 table: without ACPI it is how an SMP
//! guest learns its CPUs, its IOAPIC and how ISA IRQs are routed.
//!
//! Built as plain little-endian bytes (no packed structs, no unsafe).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

/// Most vCPUs: the table must fit in the 1 KiB EBDA below 640 KiB (as in
/// Firecracker, which also caps at 32); the guest kernel is built for 32.
pub const MAX_VCPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
// Family 6, model 0: only informative; Linux takes the real values from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

#[derive(Debug, Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `num_cpus` CPUs, to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0u8); // processor
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ i -> IOAPIC pin i, bus-default polarity and trigger.
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT, LINT1: NMI, on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"husk-vmm    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table: none
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision 1.4
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // features: the config table is present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` CPUs at the start of the EBDA.
pub fn setup<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 8, MAX_VCPUS] {
            let t = build(n, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes(cfg[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "config table checksum");
            let entries = u16::from_le_bytes(cfg[34..36].try_into().unwrap()) as usize;
            assert_eq!(entries, n as usize + 1 + 1 + (IRQ_MAX as usize + 1) + 2);
            // The table must end below the 640 KiB boundary.
            assert!(EBDA_START + t.len() as u64 <= 0xa0000);
        }
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(MAX_VCPUS + 1, EBDA_START).is_err());
    }
}
