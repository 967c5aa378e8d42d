//! Guest RAM backed by a memfd, so it can later be shared with vhost-user
//! backends and written out or mapped for snapshots.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress};

use crate::arch::layout::ram_regions;
use crate::devices::virtio::GuestMemoryMmap;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("memfd_create: {0}")]
    Memfd(std::io::Error),
    #[error("sizing guest memory to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("mapping guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error("memory file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} holds {got} bytes; the snapshot's guest has {want} (truncated, or another snapshot's)")]
    Size { path: String, got: u64, want: u64 },
    #[error("mapping the memory file: {0}")]
    MapFile(String),
}

/// Guest memory from a snapshot's memory file, mapped private: pages stay
/// shared with every other VM restored from the same file until written
/// (copy-on-write), and the file itself is never changed.
pub fn restore(
    path: &std::path::Path,
    mem_size: u64,
) -> Result<(GuestMemoryMmap, File), MemoryError> {
    use vm_memory::mmap::MmapRegionBuilder;
    let file_err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(file_err)?;
    let got = file.metadata().map_err(file_err)?.len();
    if got != mem_size {
        return Err(MemoryError::Size {
            path: path.display().to_string(),
            got,
            want: mem_size,
        });
    }
    let mut regions = Vec::new();
    let mut file_off = 0u64;
    for (base, len) in ram_regions(mem_size) {
        let f = file.try_clone().map_err(file_err)?;
        let region = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(f, file_off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(base))
            .ok_or_else(|| MemoryError::MapFile("region overflows the address space".into()))?;
        regions.push(region);
        file_off += len;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::MapFile(e.to_string()))?;
    Ok((mem, file))
}

/// Writes guest memory, region after region, to `out` (the snapshot's
/// memory file). The VM must be paused and its devices quiet.
pub fn write_to(mem: &GuestMemoryMmap, out: &mut File) -> std::io::Result<()> {
    use std::io::Write;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`;
        // nothing writes it meanwhile (vCPUs parked, device threads held off
        // by the caller), so reading it as a byte slice is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(region.as_ptr() as *const u8, region.len() as usize)
        };
        out.write_all(bytes)?;
    }
    out.sync_all()
}

/// Creates the guest memory and returns it with its backing file.
pub fn create(mem_size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    let name = CString::new("husk-guest-ram").expect("no interior NUL");
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no
    // other memory-safety preconditions. The result is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by no one else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size)
        .map_err(|source| MemoryError::Truncate {
            size: mem_size,
            source,
        })?;
    let mut ranges = Vec::new();
    let mut file_off = 0u64;
    for (base, len) in ram_regions(mem_size) {
        let f = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((
            GuestAddress(base),
            len as usize,
            Some(FileOffset::new(f, file_off)),
        ));
        file_off += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges)?;
    Ok((mem, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_backed_by_the_memfd() {
        let (mem, file) = create(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    }
}
