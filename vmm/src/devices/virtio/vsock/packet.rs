//! virtio-vsock packet header (virtio 1.2 spec, 5.10.6) and moving packets
//! between descriptor chains and host buffers.
//!
//! Everything here parses guest-controlled memory: lengths are bounded before
//! anything is allocated, and a chain too short for what it claims is an error.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory};

pub const HDR_SIZE: usize = 44;
/// Largest payload we accept from or send to the guest in one packet (the
/// Linux driver's own maximum).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain shorter than a vsock header")]
    ShortHeader,
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte maximum")]
    TooLong(u32),
    #[error("payload length {0} exceeds what the chain holds")]
    ShortPayload(u32),
    #[error("descriptor outside guest memory")]
    Memory,
    #[error("a TX chain must not have device-writable descriptors")]
    WritableTx,
    #[error("RX chain not device-writable, outside guest memory, or too small")]
    RxBuffer,
}

/// Reads one TX packet (header and payload) from a driver-readable chain.
pub fn read_tx<M, T>(chain: DescriptorChain<M>) -> Result<(Header, Vec<u8>), PacketError>
where
    M: std::ops::Deref<Target = T> + Clone,
    T: GuestMemory + ?Sized,
{
    let mem = chain.memory();
    let mut hdr = [0u8; HDR_SIZE];
    let mut got_hdr = 0usize;
    let mut payload: Vec<u8> = Vec::new();
    let mut want: Option<usize> = None;
    for d in chain.clone() {
        if d.is_write_only() {
            return Err(PacketError::WritableTx);
        }
        let mut addr = d.addr();
        let mut left = d.len() as usize;
        if got_hdr < HDR_SIZE {
            let n = left.min(HDR_SIZE - got_hdr);
            mem.read_slice(&mut hdr[got_hdr..got_hdr + n], addr)
                .map_err(|_| PacketError::Memory)?;
            got_hdr += n;
            left -= n;
            addr = addr.checked_add(n as u64).ok_or(PacketError::Memory)?;
            if got_hdr == HDR_SIZE {
                let h = Header::from_bytes(&hdr);
                if h.len > MAX_PAYLOAD {
                    return Err(PacketError::TooLong(h.len));
                }
                want = Some(h.len as usize);
                payload.reserve_exact(h.len as usize);
            }
        }
        if let Some(w) = want {
            let n = left.min(w - payload.len());
            if n > 0 {
                let at = payload.len();
                payload.resize(at + n, 0);
                mem.read_slice(&mut payload[at..], addr)
                    .map_err(|_| PacketError::Memory)?;
            }
            if payload.len() == w {
                break;
            }
        }
    }
    if got_hdr < HDR_SIZE {
        return Err(PacketError::ShortHeader);
    }
    let h = Header::from_bytes(&hdr);
    if payload.len() != h.len as usize {
        return Err(PacketError::ShortPayload(h.len));
    }
    Ok((h, payload))
}

/// Room for payload in an RX chain after the header (0 if the chain cannot
/// even hold a header or is not device-writable).
pub fn rx_capacity<M, T>(chain: &DescriptorChain<M>) -> usize
where
    M: std::ops::Deref<Target = T> + Clone,
    T: GuestMemory + ?Sized,
{
    let mut total: usize = 0;
    for d in chain.clone() {
        if !d.is_write_only() {
            return 0;
        }
        total = total.saturating_add(d.len() as usize);
    }
    total.saturating_sub(HDR_SIZE).min(MAX_PAYLOAD as usize)
}

/// Writes header + payload into a device-writable RX chain; returns the
/// number of bytes written.
pub fn write_rx<M, T>(
    chain: &DescriptorChain<M>,
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, PacketError>
where
    M: std::ops::Deref<Target = T> + Clone,
    T: GuestMemory + ?Sized,
{
    crate::devices::virtio::write_chain(chain, &[&hdr.to_bytes(), payload])
        .ok_or(PacketError::RxBuffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 5000,
            len: 10,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 1 << 18,
            fwd_cnt: 77,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }
}
