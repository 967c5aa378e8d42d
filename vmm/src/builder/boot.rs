//! Booting a new VM: the kernel and initrd loaded, the command line, the
//! boot structures (PVH start info or the Linux zero page, the MP table),
//! the vCPUs set to enter the kernel.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::Vmm;
use crate::arch::layout::*;
use crate::arch::mptable;
use crate::arch::regs::BootProtocol;
use crate::config::{VmConfig, DEFAULT_BOOT_ARGS};
use crate::cpu_template::CpuTemplate;
use crate::devices::virtio::GuestMemoryMmap;
use crate::vstate::state::{self};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

pub(super) const E820_RAM: u32 = 1;

pub(super) const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

pub(super) struct LoadedKernel {
    pub(super) protocol: BootProtocol,
    pub(super) entry: u64,
    pub(super) result: KernelLoaderResult,
}

pub(super) fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut f = File::open(path).with_context(|| format!("opening kernel {}", path.display()))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .with_context(|| format!("reading kernel {}", path.display()))?;
    f.seek(SeekFrom::Start(0))?;
    if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .with_context(|| format!("loading ELF kernel {}", path.display()))?;
        match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                protocol: BootProtocol::Pvh,
                entry: entry.0,
                result: r,
            }),
            _ => Ok(LoadedKernel {
                protocol: BootProtocol::Linux64,
                entry: r.kernel_load.0,
                result: r,
            }),
        }
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .with_context(|| format!("loading bzImage {} (not ELF either)", path.display()))?;
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        Ok(LoadedKernel {
            protocol: BootProtocol::Linux64,
            entry: r.kernel_load.0 + 0x200,
            result: r,
        })
    }
}

/// Loads the initrd page-aligned at the top of low memory; returns (addr, size).
pub(super) fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64)> {
    let data = std::fs::read(path).with_context(|| format!("reading initrd {}", path.display()))?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .with_context(|| format!("initrd of {size} bytes does not fit in guest memory"))?;
    mem.write_slice(&data, GuestAddress(addr))
        .context("writing initrd")?;
    Ok((addr, size))
}

pub(super) fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.start_addr().0 + r.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

pub(super) fn write_pvh(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>) -> Result<()> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = MODLIST_START;
    }
    let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    bp.set_sections::<hvm_memmap_table_entry>(&map, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .context("writing PVH start info")?;
    Ok(())
}

pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &KernelLoaderResult,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(mem);
    if map.len() > params.e820_table.len() {
        bail!(
            "memory map has {} entries, the zero page holds {}",
            map.len(),
            params.e820_table.len()
        );
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .context("writing the zero page")?;
    Ok(())
}

/// The boot args, then the host profile's.
pub(super) fn kernel_cmdline(config: &VmConfig, kernel_args: &[String]) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).context("command line")?;
    cmdline
        .insert_str(
            config
                .boot_source
                .boot_args
                .as_deref()
                .unwrap_or(DEFAULT_BOOT_ARGS),
        )
        .context("boot_args")?;
    for a in kernel_args {
        cmdline.insert_str(a).context("host profile kernel args")?;
    }
    Ok(cmdline)
}

/// A booting VM's setup: the command line and boot parameters in memory,
/// the MP table, and its vCPUs configured to enter the kernel.
pub(super) fn configure_system_for_boot(
    vmm: &mut Vmm,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
    cmdline: &Cmdline,
    template: &CpuTemplate,
) -> Result<()> {
    let m = &vmm.config.machine_config;
    let mem = &vmm.mem;
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).context("writing command line")?;
    let cmdline_str = cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::info!("kernel command line: {cmdline_str}");
    match kernel.protocol {
        BootProtocol::Pvh => write_pvh(mem, initrd)?,
        BootProtocol::Linux64 => {
            write_zero_page(mem, &kernel.result, cmdline_str.len() + 1, initrd)?
        }
    }
    mptable::setup(mem, m.vcpu_count)?;
    vmm.vcpus = create_vcpus(&vmm.vm, mem, m.vcpu_count, template, kernel)?;
    tracing::info!(
        "boot: {:?} entry {:#x}, {} vCPU(s), {} MiB",
        kernel.protocol,
        kernel.entry,
        m.vcpu_count,
        m.mem_size_mib
    );
    Ok(())
}

/// The vCPUs, their CPUID from `template` (what the host refused of it
/// said once), their registers set to enter the kernel.
pub(super) fn create_vcpus(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    count: u8,
    template: &CpuTemplate,
    kernel: &LoadedKernel,
) -> Result<Vec<Vcpu>> {
    let msr_list = Arc::new(state::msr_indices(&vm.kvm)?);
    let mut vcpus = Vec::new();
    for i in 0..count {
        let mut v = Vcpu::new(&vm.fd, i)?;
        v.msr_list = msr_list.clone();
        let refused = v.configure_cpuid(&vm.kvm, count, template)?;
        if i == 0 {
            warn_refused(template, &refused);
        }
        v.configure_boot(mem, template, kernel.protocol, kernel.entry)?;
        vcpus.push(v);
    }
    Ok(vcpus)
}

/// What the template asked for and did not get matters (warn); KVM
/// recomputing other registers (XSAVE sizes, ...) is detail.
pub(super) fn warn_refused(template: &CpuTemplate, refused: &[crate::arch::cpuid::Refused]) {
    for r in refused {
        let masked = template.cpuid_modifiers.iter().any(|m| {
            m.leaf == r.leaf
                && m.modifiers.iter().any(|x| {
                    let bits = x.bitmap.mask as u32;
                    format!("{:?}", x.register).eq_ignore_ascii_case(r.register)
                        && (r.got ^ r.wanted) & bits != 0
                })
        });
        if masked {
            tracing::warn!("host refused template bits: {r}");
        } else {
            tracing::debug!("host changed: {r}");
        }
    }
}
