//! Taps: made by the launcher and handed to husk-vmm as inherited
//! descriptors, never persistent, so a tap lives exactly as long as a
//! process holds it.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::net::Result;
use crate::util::{IoContext, IoError};

/// A tap this process created; it disappears when the last descriptor of
/// it (here and in the VMM that inherited it) is closed.
#[derive(Debug)]
pub struct Tap {
    pub file: File,
    pub name: String,
}

impl Tap {
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_TUN_EXCL: libc::c_short = -0x8000;

/// Creates the (non-persistent) tap `name`; refuses to attach to an
/// existing one.
pub(crate) fn create_tap(name: &str) -> Result<File> {
    let f = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .at(|| "opening /dev/net/tun (is the tun module available?)")?;
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is a buffer of
    // its size that outlives the call, and the descriptor is ours.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (creating a tap needs CAP_NET_ADMIN: run husk as root)"
        } else {
            ""
        };
        return Err(IoError {
            what: format!("creating tap {name}{hint}"),
            source: e,
        }
        .into());
    }
    Ok(f)
}
