//! x86_64 specifics: memory layout, MP table, CPUID, boot registers.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
