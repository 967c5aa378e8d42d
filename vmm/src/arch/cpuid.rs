//! CPUID for a vCPU: KVM's supported set, normalised for this VM's topology,
//! then filtered by the CPU template; and a check of what the host kept.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::cpu_template::{CpuTemplate, CpuidRegister, FLAG_SIGNIFICANT_INDEX};

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

fn reg(e: &mut kvm_cpuid_entry2, r: CpuidRegister) -> &mut u32 {
    match r {
        CpuidRegister::Eax => &mut e.eax,
        CpuidRegister::Ebx => &mut e.ebx,
        CpuidRegister::Ecx => &mut e.ecx,
        CpuidRegister::Edx => &mut e.edx,
    }
}

fn bits_for(count: u32) -> u32 {
    // Bits needed to number `count` items: ceil(log2(count)).
    32 - count.saturating_sub(1).leading_zeros()
}

/// Fills in what KVM leaves to the VMM: APIC ids, topology (one thread per
/// core, all cores in one package), the hypervisor bit; hides the PMU.
pub fn normalize(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // APIC id, logical processor count, CLFLUSH size in 8-byte units.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; caches: L1/L2 per core,
                // L3 shared by all.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0x6 => {
                // No turbo, no power-management features to drive.
                e.eax = 0;
                e.ecx &= 1; // keep only the APERF/MPERF capability bit
            }
            0xa => {
                // No PMU: guest perf MSR accesses would be emulated, slowly.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: every vCPU is a core of one package.
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Applies the template's CPUID modifiers. Returns the leaves the template
/// names but KVM does not report (nothing to modify there).
pub fn apply_template(cpuid: &mut CpuId, template: &CpuTemplate) -> Vec<(u32, u32)> {
    let mut missing = Vec::new();
    for m in &template.cpuid_modifiers {
        let mut found = false;
        for e in cpuid.as_mut_slice() {
            let index_matters = m.flags & FLAG_SIGNIFICANT_INDEX != 0;
            if e.function == m.leaf && (!index_matters || e.index == m.subleaf) {
                found = true;
                for r in &m.modifiers {
                    let v = reg(e, r.register);
                    *v = r.bitmap.apply(u64::from(*v)) as u32;
                }
            }
        }
        if !found {
            missing.push((m.leaf, m.subleaf));
        }
    }
    missing
}

/// A register whose value read back from KVM differs from what was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: &'static str,
    pub wanted: u32,
    pub got: u32,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = self.got & !self.wanted;
        let off = self.wanted & !self.got;
        write!(
            f,
            "CPUID leaf {:#x}.{} {}: set {:#010x}, host kept {:#010x} (forced on {:#x}, forced off {:#x})",
            self.leaf, self.subleaf, self.register, self.wanted, self.got, on, off
        )
    }
}

/// Compares what was set with what KVM reports back.
pub fn refused(wanted: &CpuId, got: &CpuId) -> Vec<Refused> {
    let mut out = Vec::new();
    for w in wanted.as_slice() {
        let Some(g) = got
            .as_slice()
            .iter()
            .find(|g| g.function == w.function && g.index == w.index)
        else {
            continue;
        };
        for (name, a, b) in [
            ("eax", w.eax, g.eax),
            ("ebx", w.ebx, g.ebx),
            ("ecx", w.ecx, g.ecx),
            ("edx", w.edx, g.edx),
        ] {
            if a != b {
                out.push(Refused {
                    leaf: w.function,
                    subleaf: w.index,
                    register: name,
                    wanted: a,
                    got: b,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_template::CpuTemplate;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(7, 0)]).unwrap()
    }

    #[test]
    fn normalize_sets_topology() {
        let mut c = sample();
        normalize(&mut c, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(s[2].eax, 2); // log2(4)
        assert_eq!(s[2].ebx, 4);
        assert_eq!(s[1].edx, 3);
    }

    #[test]
    fn template_modifies_matching_leaves_and_reports_missing() {
        let t = CpuTemplate::from_json(
            "t",
            r#"{"cpuid_modifiers":[
                {"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0b0x"}]},
                {"leaf":"0x7","subleaf":"0x0","flags":1,"modifiers":[{"register":"ebx","bitmap":"0b10"}]},
                {"leaf":"0x8000001f","modifiers":[{"register":"eax","bitmap":"0b0"}]}
            ]}"#,
        )
        .unwrap();
        let mut c = sample();
        let missing = apply_template(&mut c, &t);
        assert_eq!(missing, vec![(0x8000_001f, 0)]);
        assert_eq!(c.as_slice()[0].ecx, 0xffff_fffd);
        assert_eq!(c.as_slice()[3].ebx & 0b11, 0b10);
    }

    #[test]
    fn refused_bits_are_reported() {
        let wanted = sample();
        let mut got = sample();
        got.as_mut_slice()[0].ecx = 0;
        let r = refused(&wanted, &got);
        assert_eq!(r.len(), 1);
        assert!(
            r[0].to_string().contains("forced off 0xffffffff"),
            "{}",
            r[0]
        );
    }
}
