//! Talking to a husk-vmm process: its HTTP API on a Unix socket, and the
//! guest's vsock ports through its hybrid vsock socket.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// One HTTP/1.1 request on husk-vmm's API socket; (status, body). The
/// socket file appears at bind(), a moment before listen(): a refused
/// connection is retried for a few seconds.
pub fn api_request(sock: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => bail!("API socket {}: {e}", sock.display()),
        }
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

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
            let mut s = std::os::unix::net::UnixStream::connect(uds)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            // Byte by byte: what follows the line belongs to the connection.
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.len() < 64 {
                if s.read(&mut b)? == 0 {
                    bail!("vsock port {port}: closed before OK (nothing listening?)");
                }
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if !line.starts_with("OK ") {
                bail!("vsock port {port}: answer {line:?}");
            }
            s.set_read_timeout(None)?;
            Ok(s)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
