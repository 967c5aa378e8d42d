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

/// An I/O error on the memory file at `path`.
fn file_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> MemoryError + '_ {
    move |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Opens a snapshot's memory file, which must hold `mem_size` bytes.
fn open_sized(path: &std::path::Path, mem_size: u64) -> Result<File, MemoryError> {
    let file = File::open(path).map_err(file_err(path))?;
    let got = file.metadata().map_err(file_err(path))?.len();
    if got != mem_size {
        return Err(MemoryError::Size {
            path: path.display().to_string(),
            got,
            want: mem_size,
        });
    }
    Ok(file)
}

/// Guest memory from a snapshot's memory file, mapped private: pages stay
/// shared with every other VM restored from the same file until written
/// (copy-on-write), and the file itself is never changed.
pub fn restore(
    path: &std::path::Path,
    mem_size: u64,
) -> Result<(GuestMemoryMmap, File), MemoryError> {
    use vm_memory::mmap::MmapRegionBuilder;
    let file = open_sized(path, mem_size)?;
    let mut regions = Vec::new();
    let mut file_off = 0u64;
    for (base, len) in ram_regions(mem_size) {
        let f = file.try_clone().map_err(file_err(path))?;
        let region = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(f, file_off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        // The guest's accesses are random: read-around would fill the page
        // cache with megabytes of the file's holes (zeros) per fault, which
        // every later snapshot of this VM would read as the guest's.
        // SAFETY: madvise on a mapping `region` owns; MADV_RANDOM only
        // changes readahead.
        let r = unsafe {
            libc::madvise(
                region.as_ptr() as *mut libc::c_void,
                region.size(),
                libc::MADV_RANDOM,
            )
        };
        if r != 0 {
            return Err(MemoryError::MapFile(format!(
                "madvise(MADV_RANDOM): {}",
                std::io::Error::last_os_error()
            )));
        }
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
/// memory file, freshly created). The VM must be paused and its devices
/// quiet. Pages of zeros are skipped, leaving holes: a booted guest has
/// touched a fraction of its RAM, and a restore that copies the file
/// copies only the rest.
///
/// Pages the guest never touched are not even read: reading them through
/// the mapping would fault every one in. For a VM restored from a sparse
/// file (mapped private) that maps a page-cache page of zeros per hole,
/// and the VMM, which goes on running the guest after a container
/// template's snapshot, kept all of its RAM resident (256 MiB of RSS for
/// a guest that uses ~25).
pub fn write_to(mem: &GuestMemoryMmap, out: &mut File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let swap = has_swap();
    let mut total = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`;
        // nothing writes it meanwhile (vCPUs parked, device threads held off
        // by the caller), so reading it as a byte slice is sound.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        // With swap, a page out of core may be the guest's, swapped out:
        // every page is read, as before.
        let touched = if swap {
            None
        } else {
            Some(touched_pages(region.as_ptr(), len, region.file_offset())?)
        };
        let zero_at = |at: usize| {
            touched
                .as_ref()
                .is_some_and(|t| !t.get(at / PAGE).copied().unwrap_or(true))
                || is_zero(&bytes[at..(at + PAGE).min(len)])
        };
        let mut at = 0;
        while at < len {
            let zero = zero_at(at);
            let mut end = at + PAGE;
            while end < len && zero_at(end) == zero {
                end += PAGE;
            }
            let end = end.min(len);
            if zero {
                out.seek(SeekFrom::Current((end - at) as i64))?;
            } else {
                out.write_all(&bytes[at..end])?;
            }
            at = end;
        }
        total += region.len();
    }
    // A trailing run of zeros is a hole the length must still cover.
    out.set_len(total)?;
    out.sync_all()
}

const PAGE: usize = 4096;

/// Whether the host has swap space: then a page out of core is not known
/// to be untouched.
fn has_swap() -> bool {
    // SAFETY: sysinfo fills the struct it is given; zeroed is a valid
    // starting value for its plain integer fields.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live, writable sysinfo struct.
    let r = unsafe { libc::sysinfo(&mut info) };
    r != 0 || info.totalswap != 0
}

/// Per page of the mapping at `ptr` (`len` bytes, page-aligned): whether
/// its content may be other than zero. Without swap, a page is either in
/// core (mincore: mapped, or in its file's page cache) or was never
/// touched, and then it is what its file holds there: zeros in a hole (a
/// sparse snapshot file, a memfd's unallocated pages), data elsewhere.
fn touched_pages(
    ptr: *mut u8,
    len: usize,
    file: Option<&FileOffset>,
) -> std::io::Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let pages = len.div_ceil(PAGE);
    let mut core = vec![0u8; pages];
    // SAFETY: `ptr..ptr+len` is one live mapping (a guest memory region),
    // page-aligned; `core` holds one byte per page of it. mincore only
    // writes `core`.
    let r = unsafe { libc::mincore(ptr as *mut libc::c_void, len, core.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut touched: Vec<bool> = core.iter().map(|c| c & 1 != 0).collect();
    let Some(f) = file else {
        return Ok(touched);
    };
    let fd = f.file().as_raw_fd();
    let start = f.start() as i64;
    let end = start + len as i64;
    let mut off = start;
    while off < end {
        // SAFETY: lseek on a descriptor the region owns; no memory involved.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `off`
            }
            return Err(e);
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        let first = (data - start) as usize / PAGE;
        let last = ((hole - start) as usize).div_ceil(PAGE);
        for t in &mut touched[first..last.min(pages)] {
            *t = true;
        }
        off = hole;
    }
    Ok(touched)
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to splits `b` into an
    // unaligned head and tail and an aligned middle of whole u64s.
    let (head, mid, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Guest memory from a snapshot's memory file, copied into a fresh memfd
/// (shared memory a vhost-user backend can map) rather than mapped private.
/// Only the file's data extents are copied: holes stay unallocated.
pub fn restore_copy(
    path: &std::path::Path,
    mem_size: u64,
) -> Result<(GuestMemoryMmap, File), MemoryError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let src = open_sized(path, mem_size)?;
    let (mem, memfd) = create(mem_size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0i64;
    while (off as u64) < mem_size {
        // SAFETY: lseek on an fd `src` owns; no memory is involved.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data past `off`.
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { mem_size as i64 } else { hole };
        let mut at = data as u64;
        while at < hole as u64 {
            let n = buf.len().min((hole as u64 - at) as usize);
            src.read_exact_at(&mut buf[..n], at)
                .map_err(file_err(path))?;
            memfd
                .write_all_at(&buf[..n], at)
                .map_err(MemoryError::Memfd)?;
            at += n as u64;
        }
        off = hole;
    }
    Ok((mem, memfd))
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
    fn a_snapshot_file_has_holes_for_zero_pages_and_copies_back() {
        let (mem, _f) = create(16 << 20).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress((16 << 20) - 8))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mut out = File::create(&path).unwrap();
        write_to(&mem, &mut out).unwrap();
        let meta = out.metadata().unwrap();
        assert_eq!(meta.len(), 16 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let (back, memfd) = restore_copy(&path, 16 << 20).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            back.read_obj::<u32>(GuestAddress((16 << 20) - 8)).unwrap(),
            0x5566_7788
        );
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0);
        // Shared with the memfd, as a backend mapping it would see it.
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&memfd, &mut b, 0x5000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1122_3344);
        assert!(restore_copy(&path, 32 << 20).is_err());
    }

    #[test]
    fn a_snapshot_of_a_restored_guest_reads_only_the_pages_it_has() {
        if has_swap() {
            eprintln!("skipped: this host has swap, so every page is read");
            return;
        }
        let size = 16u64 << 20;
        let (mem, _f) = create(size).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write_to(&mem, &mut File::create(&base).unwrap()).unwrap();
        // Restored private from the sparse file; the guest writes one page
        // and reads another out of the file's data.
        let (back, _file) = restore(&base, size).unwrap();
        back.write_obj(0x5566_7788u32, GuestAddress(0x9000))
            .unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        let next = dir.path().join("next");
        write_to(&back, &mut File::create(&next).unwrap()).unwrap();
        let region = back.iter().next().unwrap();
        use vm_memory::GuestMemoryRegion;
        let mut core = vec![0u8; region.len() as usize / PAGE];
        // SAFETY: the region is a live mapping of that many pages.
        let r = unsafe {
            libc::mincore(
                region.as_ptr() as *mut libc::c_void,
                region.len() as usize,
                core.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        let resident = core.iter().filter(|c| *c & 1 != 0).count();
        assert!(resident <= 4, "{resident} pages in core after the snapshot");
        let (again, _) = restore(&next, size).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x9000)).unwrap(),
            0x5566_7788
        );
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x20000)).unwrap(), 0);
    }

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
