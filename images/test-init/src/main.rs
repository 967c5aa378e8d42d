//! husk-test-init: the guest's /init until husk-agent exists.
//!
//! It proves the guest kernel reached user space: it prints a marker line, the
//! guest's own /proc/uptime (time since the kernel started, independent of how
//! long the VMM took to get there), then reboots. The guest kernel runs with
//! `reboot=k`, so the reboot is an i8042 reset that ends the VMM cleanly.
//!
//! Test hooks, from the kernel command line (the boot-group tests use them):
//! - `husk_test.sum=/dev/vdX`: print the SHA-256 of that block device;
//! - `husk_test.ip=A.B.C.D/N`: give eth0 that address and bring it up (the
//!   guest kernel then answers ARP and ping by itself);
//! - `husk_test.echo_port=N`: accept one AF_VSOCK connection on port N and
//!   echo everything back until the host closes its side.
//!
//! Each system call is expensive on an emulating KVM (~ms each), so this does
//! as few as it can. It never panics: PID 1 dying panics the guest kernel.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use sha2::{Digest, Sha256};

/// Printed as soon as init runs; boot checks wait for this line.
const MARKER: &str = "husk-test-init: reached init";
const VMADDR_CID_ANY: u32 = u32::MAX;

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    // A failed write to the console has nowhere to be reported; keep going.
    let _ = writeln!(out, "husk-test-init: {msg}");
    let _ = out.flush();
}

fn checksum(dev: &str) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(dev)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, total))
}

/// ifreq for `name` with a sockaddr_in or flags in its union.
fn ifreq(name: &str) -> [u8; 40] {
    let mut r = [0u8; 40];
    let n = name.len().min(15);
    r[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn set_sockaddr(r: &mut [u8; 40], ip: [u8; 4]) {
    r[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    r[20..24].copy_from_slice(&ip);
}

fn ioctl(fd: i32, req: libc::c_ulong, r: &mut [u8; 40]) -> std::io::Result<()> {
    // SAFETY: the SIOC* requests used here read/write a struct ifreq, which
    // `r` is (40 bytes) for the duration of the call.
    if unsafe { libc::ioctl(fd, req, r.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn configure_eth0(spec: &str) -> Result<(), String> {
    let (ip, prefix) = spec.split_once('/').ok_or("want ADDR/PREFIX")?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|e| format!("{e}"))?;
    let prefix: u32 = prefix.parse().map_err(|e| format!("{e}"))?;
    if prefix > 32 {
        return Err("prefix over 32".into());
    }
    let mask = (u32::MAX.checked_shl(32 - prefix).unwrap_or(0)).to_be_bytes();
    let s: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let fd = s.as_raw_fd();
    let mut r = ifreq("eth0");
    set_sockaddr(&mut r, ip.octets());
    ioctl(fd, libc::SIOCSIFADDR, &mut r).map_err(|e| format!("SIOCSIFADDR: {e}"))?;
    let mut r = ifreq("eth0");
    set_sockaddr(&mut r, mask);
    ioctl(fd, libc::SIOCSIFNETMASK, &mut r).map_err(|e| format!("SIOCSIFNETMASK: {e}"))?;
    let mut r = ifreq("eth0");
    ioctl(fd, libc::SIOCGIFFLAGS, &mut r).map_err(|e| format!("SIOCGIFFLAGS: {e}"))?;
    let flags = i16::from_ne_bytes([r[16], r[17]]) | libc::IFF_UP as i16;
    r[16..18].copy_from_slice(&flags.to_ne_bytes());
    ioctl(fd, libc::SIOCSIFFLAGS, &mut r).map_err(|e| format!("SIOCSIFFLAGS: {e}"))?;
    Ok(())
}

fn echo(port: u32) -> nix::Result<u64> {
    let s: OwnedFd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(s.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
    listen(&s, Backlog::new(1)?)?;
    say(&format!("vsock echo listening on port {port}"));
    let c = accept(s.as_raw_fd())?;
    // SAFETY: `accept` returned a new fd that nothing else owns.
    let mut conn: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(c) };
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(5))),
        };
        if conn.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

fn main() {
    say(MARKER.trim_start_matches("husk-test-init: "));

    let proc_ok = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    );
    let uptime = match &proc_ok {
        Ok(()) => std::fs::read_to_string("/proc/uptime")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unreadable ({e})")),
        Err(e) => format!("unavailable (mount /proc: {e})"),
    };
    say(&format!("uptime {uptime}"));

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for arg in cmdline.split_whitespace() {
        if let Some(dev) = arg.strip_prefix("husk_test.sum=") {
            match checksum(dev) {
                Ok((hex, n)) => say(&format!("sha256 {dev} {hex} {n}")),
                Err(e) => say(&format!("sha256 {dev} failed: {e}")),
            }
        }
    }
    for arg in cmdline.split_whitespace() {
        if let Some(spec) = arg.strip_prefix("husk_test.ip=") {
            match configure_eth0(spec) {
                Ok(()) => say(&format!("eth0 up {spec}")),
                Err(e) => say(&format!("eth0 config failed: {e}")),
            }
        }
    }
    for arg in cmdline.split_whitespace() {
        if let Some(p) = arg.strip_prefix("husk_test.echo_port=") {
            match p.parse::<u32>() {
                Ok(port) => match echo(port) {
                    Ok(n) => say(&format!("vsock echo done, {n} bytes")),
                    Err(e) => say(&format!("vsock echo failed: {e}")),
                },
                Err(_) => say(&format!("bad echo port {p:?}")),
            }
        }
    }

    say("rebooting");
    // Nothing was written to any disk: the root is read-only.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    say(&format!("reboot failed: {e}"));
    // PID 1 must not exit (the kernel would panic); wait to be killed.
    loop {
        std::thread::park();
    }
}
