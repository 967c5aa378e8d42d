//! virtio-blk on a raw file (virtio 1.2 spec, 5.2): read, write, flush,
//! device id; read-only drives refuse writes with IOERR.

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::metrics::{add, inc, METRICS};

use super::{
    drain_queue, read_config_bytes, GuestMemoryMmap, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Device id length the spec allows.
const ID_BYTES: usize = 20;
/// Segments per request we accept (advertised as seg_max).
const SEG_MAX: u32 = 126;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: size {size} is not a multiple of {SECTOR_SIZE} bytes")]
    Size { path: String, size: u64 },
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    acked: u64,
    config: Vec<u8>,
}

/// Why a request failed; turned into a status byte for the guest.
#[derive(Debug, thiserror::Error)]
enum ReqError {
    /// Malformed chain: the guest gets IOERR if a status byte can be written.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("I/O: {0}")]
    Io(std::io::Error),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("write to a read-only drive")]
    ReadOnly,
    #[error("request beyond the end of the drive")]
    OutOfRange,
}

/// Opens a drive's backing file: its size must be whole sectors.
fn open_backing(path: &std::path::Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let open_err = |source| BlockError::Open {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    if size % SECTOR_SIZE != 0 {
        return Err(BlockError::Size {
            path: path.display().to_string(),
            size,
        });
    }
    Ok((file, size / SECTOR_SIZE))
}

/// Config space: capacity (le64), size_max (le32), seg_max (le32).
fn config_space(capacity_sectors: u64) -> Vec<u8> {
    let mut config = Vec::with_capacity(16);
    config.extend_from_slice(&capacity_sectors.to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes());
    config.extend_from_slice(&SEG_MAX.to_le_bytes());
    config
}

impl Block {
    pub fn open(path: &std::path::Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let (file, capacity_sectors) = open_backing(path, read_only)?;
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            capacity_sectors,
            id: idb,
            acked: 0,
            config: config_space(capacity_sectors),
        })
    }

    /// Executes one request; returns (status, bytes written into guest memory
    /// excluding the status byte, status byte address if one was found).
    fn execute(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> (Result<u32, ReqError>, Option<GuestAddress>) {
        let descs: Vec<_> = chain.collect();
        // The last descriptor carries the status byte: it must be writable.
        let status_addr = descs
            .last()
            .filter(|d| d.is_write_only() && d.len() >= 1)
            .map(|d| d.addr());
        if descs.len() < 2 || status_addr.is_none() {
            return (
                Err(ReqError::Malformed("chain too short or no status")),
                status_addr,
            );
        }
        let header = &descs[0];
        if header.is_write_only() || header.len() < 16 {
            return (Err(ReqError::Malformed("bad request header")), status_addr);
        }
        let mut h = [0u8; 16];
        if mem.read_slice(&mut h, header.addr()).is_err() {
            return (
                Err(ReqError::Malformed("header outside guest memory")),
                status_addr,
            );
        }
        let req_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let data = &descs[1..descs.len() - 1];
        if data.len() > SEG_MAX as usize {
            return (Err(ReqError::Malformed("too many segments")), status_addr);
        }

        let r = match req_type {
            T_IN | T_OUT => {
                let writing = req_type == T_OUT;
                if writing && self.read_only {
                    Err(ReqError::ReadOnly)
                } else if data.iter().any(|d| d.is_write_only() == writing) {
                    Err(ReqError::Malformed("data descriptor direction"))
                } else {
                    self.rw(sector, data, writing, mem)
                }
            }
            T_FLUSH => {
                if self.acked & F_FLUSH == 0 {
                    Err(ReqError::Unsupported(req_type))
                } else {
                    inc(&METRICS.block.flushes);
                    self.file.sync_data().map(|_| 0).map_err(ReqError::Io)
                }
            }
            T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(ID_BYTES);
                    mem.write_slice(&self.id[..n], d.addr())
                        .map(|_| n as u32)
                        .map_err(|_| ReqError::Malformed("id buffer outside guest memory"))
                }
                _ => Err(ReqError::Malformed("no writable id buffer")),
            },
            t => Err(ReqError::Unsupported(t)),
        };
        (r, status_addr)
    }

    /// Reads or writes the data segments at `sector`, straight between the
    /// file and guest memory: no host buffer, whatever the guest asks for.
    /// The whole request is checked (length a multiple of the sector size,
    /// inside the drive) before any of it runs.
    fn rw(
        &mut self,
        sector: u64,
        segments: &[Descriptor],
        writing: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, ReqError> {
        let total: u64 = segments.iter().map(|d| u64::from(d.len())).sum();
        if !total.is_multiple_of(SECTOR_SIZE) {
            return Err(ReqError::Malformed("data length not a multiple of 512"));
        }
        let mut offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(ReqError::OutOfRange)?;
        let end = offset.checked_add(total).ok_or(ReqError::OutOfRange)?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            return Err(ReqError::OutOfRange);
        }
        for d in segments {
            for slice in mem.get_slices(d.addr(), d.len() as usize) {
                let slice =
                    slice.map_err(|_| ReqError::Malformed("buffer outside guest memory"))?;
                self.transfer(&slice, offset, writing)?;
                offset += slice.len() as u64;
            }
        }
        let counter = if writing {
            &METRICS.block.write_bytes
        } else {
            &METRICS.block.read_bytes
        };
        add(counter, total);
        // What the device wrote into guest memory: all of it for a read.
        Ok(if writing {
            0
        } else {
            u32::try_from(total).unwrap_or(u32::MAX)
        })
    }

    /// pread/pwrite between the file at `offset` and one guest memory slice.
    fn transfer(
        &self,
        slice: &VolatileSlice<'_, ()>,
        mut offset: u64,
        writing: bool,
    ) -> Result<(), ReqError> {
        let fd = self.file.as_raw_fd();
        let guard = slice.ptr_guard_mut();
        let mut done = 0usize;
        while done < slice.len() {
            let left = slice.len() - done;
            let at = i64::try_from(offset).map_err(|_| ReqError::OutOfRange)?;
            // SAFETY: the slice is guest memory mapped for the VM's life,
            // valid for `slice.len()` bytes from its pointer, and `done` is
            // below that; the kernel copies at most `left` bytes to or from
            // it. The guest may touch the same memory meanwhile: that is
            // its own data race, as with a real device's DMA.
            let n = unsafe {
                let p = guard.as_ptr().add(done);
                if writing {
                    libc::pwrite64(fd, p as *const libc::c_void, left, at)
                } else {
                    libc::pread64(fd, p as *mut libc::c_void, left, at)
                }
            };
            match n {
                n if n > 0 => {
                    done += n as usize;
                    offset += n as u64;
                }
                0 => {
                    return Err(ReqError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(ReqError::Io(e));
                    }
                }
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_FLUSH | F_SEG_MAX;
        if self.read_only {
            f |= F_RO;
        }
        f
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    /// Firecracker's `PATCH /drives` on a running VM: a cooperative guest
    /// (one that has not mounted the drive) sees the new capacity at the
    /// config-change interrupt. Read-only-ness and the serial stay the
    /// drive's; on an error the old file is kept.
    fn replace_backing(&mut self, path: &std::path::Path) -> Result<(), String> {
        let (file, capacity_sectors) =
            open_backing(path, self.read_only).map_err(|e| e.to_string())?;
        self.file = file;
        self.capacity_sectors = capacity_sectors;
        self.config = config_space(capacity_sectors);
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        drain_queue(queue, mem, "virtio-blk", |chain| {
            let (result, status_addr) = self.execute(chain, mem);
            inc(&METRICS.block.requests);
            let (status, written) = match result {
                Ok(n) => (S_OK, n),
                Err(ReqError::Unsupported(t)) => {
                    tracing::debug!("virtio-blk: unsupported request type {t}");
                    (S_UNSUPP, 0)
                }
                Err(e) => {
                    inc(&METRICS.block.errors);
                    tracing::debug!("virtio-blk: request failed: {e}");
                    (S_IOERR, 0)
                }
            };
            let mut len = written;
            if let Some(a) = status_addr {
                if mem.write_obj(status, a).is_ok() {
                    len = len.saturating_add(1);
                }
            }
            len
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn disk(bytes: &[u8], ro: bool) -> (tempfile::NamedTempFile, Block) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let b = Block::open(f.path(), ro, "husk-test-disk").unwrap();
        (f, b)
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Runs one request chain; returns (status byte, used len).
    fn run(block: &mut Block, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32) {
        let vq = MockSplitQueue::new(m, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(block.process_queue(0, std::slice::from_mut(&mut q), m));
        let used = vq.used();
        let elem = used.ring().ref_at(0).unwrap().load();
        let last = SplitDescriptor::from(*descs.last().unwrap());
        let status: u8 = m.read_obj(last.addr()).unwrap();
        (status, elem.len())
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;

    /// A request of type `t` at `sector` with one data buffer at `addr`:
    /// header at 0x1000, status byte at 0x3000.
    fn io(
        b: &mut Block,
        m: &GuestMemoryMmap,
        t: u32,
        sector: u64,
        addr: u64,
        len: u32,
        flags: u32,
    ) -> (u8, u32) {
        header(m, 0x1000, t, sector);
        run(
            b,
            m,
            &[
                desc(0x1000, 16, N, 1),
                desc(addr, len, N | flags, 2),
                desc(0x3000, 1, W, 0),
            ],
        )
    }

    #[test]
    fn reads_and_writes_sectors() {
        let mut content = vec![0u8; 4096];
        content[512..516].copy_from_slice(b"husk");
        let (f, mut b) = disk(&content, false);
        b.ack_features(b.features());
        let m = mem();
        let (st, len) = io(&mut b, &m, T_IN, 1, 0x2000, 512, W);
        assert_eq!((st, len), (S_OK, 513));
        let mut got = [0u8; 4];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"husk");

        m.write_slice(&[7u8; 512], GuestAddress(0x4000)).unwrap();
        let (st, _) = io(&mut b, &m, T_OUT, 7, 0x4000, 512, 0);
        assert_eq!(st, S_OK);
        assert_eq!(
            std::fs::read(f.path()).unwrap()[7 * 512..8 * 512],
            [7u8; 512]
        );

        header(&m, 0x1000, T_FLUSH, 0);
        let (st, _) = run(&mut b, &m, &[desc(0x1000, 16, N, 1), desc(0x3000, 1, W, 0)]);
        assert_eq!(st, S_OK);

        let (st, len) = io(&mut b, &m, T_GET_ID, 0, 0x2000, 20, W);
        assert_eq!((st, len), (S_OK, 21));
        let mut id = [0u8; 14];
        m.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"husk-test-disk");
    }

    #[test]
    fn bad_requests_get_error_statuses() {
        let (_f, mut b) = disk(&[0u8; 4096], true);
        b.ack_features(b.features());
        let m = mem();
        // Write to a read-only disk.
        let (st, _) = io(&mut b, &m, T_OUT, 0, 0x4000, 512, 0);
        assert_eq!(st, S_IOERR);
        // Past the end of the disk, and a sector number that overflows.
        for sector in [8, u64::MAX / 4] {
            let (st, _) = io(&mut b, &m, T_IN, sector, 0x2000, 512, W);
            assert_eq!(st, S_IOERR, "sector {sector}");
        }
        // Unknown request type.
        header(&m, 0x1000, 99, 0);
        let (st, _) = run(&mut b, &m, &[desc(0x1000, 16, N, 1), desc(0x3000, 1, W, 0)]);
        assert_eq!(st, S_UNSUPP);
        // Read into a read-only buffer (wrong direction).
        let (st, _) = io(&mut b, &m, T_IN, 0, 0x2000, 512, 0);
        assert_eq!(st, S_IOERR);
        // Header too short.
        let (st, _) = run(&mut b, &m, &[desc(0x1000, 8, N, 1), desc(0x3000, 1, W, 0)]);
        assert_eq!(st, S_IOERR);
        // Buffer outside guest memory.
        let (st, _) = io(&mut b, &m, T_IN, 0, 0xff_ff00, 512, W);
        assert_eq!(st, S_IOERR);
    }

    #[test]
    fn lengths_are_checked_before_any_io_and_never_buffered() {
        let (f, mut b) = disk(&[5u8; 4096], false);
        b.ack_features(b.features());
        let m = mem();
        // Not a multiple of the sector size: refused, nothing written.
        m.write_slice(&[9u8; 600], GuestAddress(0x4000)).unwrap();
        let (st, _) = io(&mut b, &m, T_OUT, 0, 0x4000, 600, 0);
        assert_eq!(st, S_IOERR);
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![5u8; 4096]);
        // Split over two segments, each odd but together whole sectors.
        header(&m, 0x1000, T_IN, 0);
        let (st, len) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, N, 1),
                desc(0x2000, 100, N | W, 2),
                desc(0x5000, 412, N | W, 3),
                desc(0x3000, 1, W, 0),
            ],
        );
        assert_eq!((st, len), (S_OK, 513));
        // A 4 GiB request: out of the drive, refused before a byte moves
        // (it was once a 4 GiB host buffer).
        let (st, _) = io(&mut b, &m, T_IN, 0, 0x2000, 0xffff_fe00, W);
        assert_eq!(st, S_IOERR);
    }

    #[test]
    fn a_huge_read_on_a_huge_drive_is_refused_at_guest_memory() {
        // A sparse 8 GiB drive: the request fits the drive but not the
        // guest's 1 MiB of memory.
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 << 30).unwrap();
        let mut b = Block::open(f.path(), false, "big").unwrap();
        b.ack_features(b.features());
        let m = mem();
        let (st, _) = io(&mut b, &m, T_IN, 0, 0x2000, 0xffff_fe00, W);
        assert_eq!(st, S_IOERR);
        // A read that fits memory still works.
        let (st, len) = io(&mut b, &m, T_IN, (8 << 30) / 512 - 1, 0x2000, 512, W);
        assert_eq!((st, len), (S_OK, 513));
    }

    #[test]
    fn a_descriptor_loop_ends_at_the_queue_size() {
        let (_f, mut b) = disk(&[0u8; 4096], false);
        b.ack_features(b.features());
        let m = mem();
        header(&m, 0x1000, T_IN, 0);
        // Descriptor 1 points back at 0: the chain never ends by itself.
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0x1000, 16, N, 1), desc(0x2000, 512, W, 0)])
            .unwrap();
        // (build_desc_chain links and ends chains itself.)
        vq.desc_table()
            .store(1, desc(0x2000, 512, N | W, 0))
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(b.process_queue(0, std::slice::from_mut(&mut q), &m));
        // The chain is cut at 16 descriptors (header, data, header, ...):
        // a request with read-only data descriptors in a read, refused.
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 1, "only the status byte");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), S_IOERR);
    }

    #[test]
    fn odd_sized_image_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), [0u8; 100]).unwrap();
        let e = Block::open(f.path(), true, "x").err().unwrap();
        assert!(e.to_string().contains("multiple of 512"), "{e}");
    }

    #[test]
    fn config_space_reads_capacity() {
        let (_f, b) = disk(&[0u8; 4096], true);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 8);
        let mut far = [1u8; 4];
        b.read_config(1000, &mut far);
        assert_eq!(far, [0; 4]);
        b.read_config(u64::MAX, &mut far);
    }

    #[test]
    fn a_new_backing_file_brings_its_capacity_and_contents() {
        let (_old, mut b) = disk(&[0u8; 0], true);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 0);
        let new = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(new.path(), [9u8; 1024]).unwrap();
        b.replace_backing(new.path()).unwrap();
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 2);
        b.ack_features(b.features());
        let m = mem();
        let (st, len) = io(&mut b, &m, T_IN, 1, 0x2000, 512, W);
        assert_eq!((st, len), (S_OK, 513));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 9);
        // A file that cannot back it is refused; the drive keeps its file.
        let odd = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(odd.path(), [0u8; 100]).unwrap();
        let e = b.replace_backing(odd.path()).unwrap_err();
        assert!(e.contains("multiple of 512"), "{e}");
        let e = b
            .replace_backing(std::path::Path::new("/nonexistent/x"))
            .unwrap_err();
        assert!(e.contains("/nonexistent/x"), "{e}");
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 2);
        // Still read-only: the new file was opened for reading only.
        assert!(b.features() & F_RO != 0);
    }
}
