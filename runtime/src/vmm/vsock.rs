//! The guest's vsock ports through husk-vmm's hybrid vsock socket
//! (Firecracker's protocol).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::IoContext;
use crate::vmm::{Result, VmmError};

/// Connects to guest vsock `port` through husk-vmm's hybrid vsock socket:
/// `CONNECT <port>\n`, `OK <host port>\n`, then the stream is the connection.
pub fn vsock_connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<std::os::unix::net::UnixStream> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> Result<std::os::unix::net::UnixStream> {
            let io = || format!("vsock port {port} through {}", uds.display());
            let mut s = std::os::unix::net::UnixStream::connect(uds).at(io)?;
            s.set_read_timeout(Some(Duration::from_secs(30))).at(io)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).at(io)?;
            // Byte by byte: what follows the line belongs to the connection.
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.len() < 64 {
                if s.read(&mut b).at(io)? == 0 {
                    return Err(VmmError::VsockClosed { port });
                }
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if !line.starts_with("OK ") {
                return Err(VmmError::VsockAnswer { port, answer: line });
            }
            s.set_read_timeout(None).at(io)?;
            Ok(s)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
