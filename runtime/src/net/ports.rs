//! Published ports (`-p HOST:CONTAINER[/udp]`): the host port is bound by
//! the process that owns the sandbox and relayed to the sandbox's address,
//! as Docker's userland proxy does. It answers on every host address the
//! binding covers, so other hosts reach it as the host itself does.
//!
//! Binding happens before the VM starts: a port that is taken fails the
//! run at once, naming the port.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::net::{NetError, Result};
use crate::util::IoContext;
use serde::{Deserialize, Serialize};

/// A published port's protocol; the same type is huskd's services' (the
/// JSON's "tcp" or "udp").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl std::str::FromStr for Protocol {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Protocol> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(NetError::Invalid(format!(
                "port protocol {s:?}: tcp or udp"
            ))),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One `-p`: host address and port (0: any free one) to container port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// Docker's `-p` forms: `CPORT`, `HPORT:CPORT`, `IP:HPORT:CPORT`,
/// `IP::CPORT`, each with an optional `/tcp` or `/udp`.
pub fn parse_publish(s: &str) -> Result<PortMapping> {
    let bad = |why: &str| NetError::Invalid(format!("-p {s:?}: {why} (HOST:CONTAINER[/tcp|/udp])"));
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some((_, other)) => return Err(bad(&format!("protocol {other:?} is not tcp or udp"))),
        None => (s, Protocol::Tcp),
    };
    let port = |p: &str, zero_ok: bool| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(0) if !zero_ok => Err(bad("port 0")),
            Ok(n) => Ok(n),
            Err(_) => Err(bad(&format!("{p:?} is not a port number"))),
        }
    };
    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    let (ip, host, container) = match parts.as_slice() {
        [c] => (None, "0", *c),
        [c, h] => (None, *h, *c),
        [c, h, ip] => (Some(*ip), *h, *c),
        _ => return Err(bad("empty")),
    };
    let host_ip = match ip {
        None | Some("") => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(ip) => ip
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| bad(&format!("{ip:?} is not an IP address")))?,
    };
    Ok(PortMapping {
        host_ip,
        host_port: if host.is_empty() {
            0
        } else {
            port(host, true)?
        },
        container_port: port(container, false)?,
        protocol,
    })
}

/// Bound host ports relaying to a sandbox; stops when dropped.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The mappings with the host ports actually bound.
    pub bound: Vec<PortMapping>,
    wake: Vec<SocketAddr>,
}

impl Publisher {
    /// Binds every mapping's host port (all or none), then relays to
    /// `target`.
    pub fn start(mappings: &[PortMapping], target: Ipv4Addr) -> Result<Publisher> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut bound = Vec::new();
        for m in mappings {
            let addr = SocketAddr::new(m.host_ip, m.host_port);
            let taken = |e: std::io::Error| {
                if e.kind() == ErrorKind::AddrInUse {
                    NetError::PortTaken {
                        addr,
                        protocol: m.protocol,
                    }
                } else {
                    crate::util::IoError {
                        what: format!("publishing {addr}/{}", m.protocol),
                        source: e,
                    }
                    .into()
                }
            };
            let mut b = m.clone();
            match m.protocol {
                Protocol::Tcp => {
                    let l = TcpListener::bind(addr).map_err(taken)?;
                    b.host_port = l.local_addr().at(|| format!("publishing {addr}"))?.port();
                    tcp.push((l, m.container_port));
                }
                Protocol::Udp => {
                    let u = UdpSocket::bind(addr).map_err(taken)?;
                    b.host_port = u.local_addr().at(|| format!("publishing {addr}"))?.port();
                    udp.push((u, m.container_port));
                }
            }
            bound.push(b);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut wake = Vec::new();
        for (l, port) in tcp {
            let mut at = l.local_addr().at(|| "a published port's address")?;
            if at.ip().is_unspecified() {
                at.set_ip(if at.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                });
            }
            wake.push(at);
            let to = SocketAddr::new(IpAddr::V4(target), port);
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || accept_loop(l, to, &stop)));
        }
        for (u, port) in udp {
            u.set_read_timeout(Some(Duration::from_millis(200)))
                .at(|| "a published UDP port")?;
            let to = SocketAddr::new(IpAddr::V4(target), port);
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || udp_loop(u, to, &stop)));
        }
        Ok(Publisher {
            stop,
            threads,
            bound,
            wake,
        })
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A blocked accept returns once someone connects.
        for a in &self.wake {
            let _ = TcpStream::connect_timeout(a, Duration::from_millis(200));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(l: TcpListener, to: SocketAddr, stop: &AtomicBool) {
    for conn in l.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        std::thread::spawn(move || relay_tcp(client, to));
    }
}

/// One connection: to the container's port, bytes both ways, each
/// direction's end passed on as a half-close.
fn relay_tcp(client: TcpStream, to: SocketAddr) {
    let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        // Nothing listens there (yet): the client sees the connection close.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || pipe(u2, c2));
    pipe(client, upstream);
    let _ = back.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Datagrams from each client go out from a socket of that client's own,
/// whose replies are sent back; a client quiet for a minute is forgotten.
fn udp_loop(sock: UdpSocket, to: SocketAddr, stop: &AtomicBool) {
    type Flows = Arc<Mutex<Vec<(SocketAddr, Arc<UdpSocket>, Instant)>>>;
    let flows: Flows = Arc::default();
    let Ok(reply_sock) = sock.try_clone().map(Arc::new) else {
        return;
    };
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let now = Instant::now();
                if let Ok(mut f) = flows.lock() {
                    f.retain(|(_, _, seen)| now.duration_since(*seen) < Duration::from_secs(60));
                }
                continue;
            }
            Err(_) => continue,
        };
        let up = {
            let Ok(mut f) = flows.lock() else { return };
            match f.iter_mut().find(|(a, _, _)| *a == from) {
                Some(flow) => {
                    flow.2 = Instant::now();
                    flow.1.clone()
                }
                None => {
                    let Ok(u) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                        continue;
                    };
                    if u.connect(to).is_err() {
                        continue;
                    }
                    let _ = u.set_read_timeout(Some(Duration::from_secs(60)));
                    let u = Arc::new(u);
                    f.push((from, u.clone(), Instant::now()));
                    let (u2, back) = (u.clone(), reply_sock.clone());
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 65536];
                        while let Ok(n) = u2.recv(&mut b) {
                            if back.send_to(&b[..n], from).is_err() {
                                break;
                            }
                        }
                    });
                    u
                }
            }
        };
        let _ = up.send(&buf[..n]);
    }
}

/// Docker's `NetworkSettings.Ports` shape: `{"80/tcp": [{"HostIp", "HostPort"}]}`.
pub fn docker_ports(bound: &[PortMapping]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for b in bound {
        let key = format!("{}/{}", b.container_port, b.protocol);
        let entry = serde_json::json!({"HostIp": b.host_ip.to_string(), "HostPort": b.host_port.to_string()});
        match m.get_mut(&key) {
            Some(serde_json::Value::Array(a)) => a.push(entry),
            _ => {
                m.insert(key, serde_json::json!([entry]));
            }
        }
    }
    serde_json::Value::Object(m)
}

/// Checks mappings before anything starts: no host port given twice.
pub fn check_mappings(maps: &[PortMapping]) -> Result<()> {
    for (i, a) in maps.iter().enumerate() {
        if a.host_port != 0
            && maps[..i].iter().any(|b| {
                b.host_port == a.host_port
                    && b.protocol == a.protocol
                    && (b.host_ip == a.host_ip
                        || b.host_ip.is_unspecified()
                        || a.host_ip.is_unspecified())
            })
        {
            return Err(NetError::Invalid(format!(
                "host port {}/{} is published twice",
                a.host_port, a.protocol
            )));
        }
    }
    Ok(())
}

/// Whether `addr` answers TCP, for callers waiting on a published port.
pub fn tcp_answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn publish_forms() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (8080, 80, Protocol::Tcp)
        );
        assert!(p.host_ip.is_unspecified());
        let p = parse_publish("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(p.host_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (5353, 53, Protocol::Udp)
        );
        assert_eq!(parse_publish("80").unwrap().host_port, 0);
        assert_eq!(parse_publish("127.0.0.1::80").unwrap().host_port, 0);
        for (bad, why) in [
            ("8080:80/sctp", "sctp"),
            ("x:80", "not a port"),
            ("8080:0", "port 0"),
            ("nope:1:2", "not an IP"),
            ("70000:80", "not a port"),
        ] {
            let e = parse_publish(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let twice = [
            parse_publish("8080:80").unwrap(),
            parse_publish("127.0.0.1:8080:81").unwrap(),
        ];
        assert!(check_mappings(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn relays_tcp_and_udp_and_names_a_taken_port() {
        // The "container": an echo server on loopback.
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in echo.incoming().flatten() {
                let mut r = c.try_clone().unwrap();
                let mut w = c;
                let _ = std::io::copy(&mut r, &mut w);
            }
        });
        let uecho = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 100];
            while let Ok((n, a)) = uecho.recv_from(&mut b) {
                let _ = uecho.send_to(&b[..n], a);
            }
        });
        let maps = [
            parse_publish(&format!("127.0.0.1::{port}")).unwrap(),
            parse_publish(&format!("127.0.0.1::{port}/udp")).unwrap(),
        ];
        let p = Publisher::start(&maps, Ipv4Addr::LOCALHOST).unwrap();
        let tcp_port = p.bound[0].host_port;
        let mut c = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(got, "ping");
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        u.send_to(b"dgram", ("127.0.0.1", p.bound[1].host_port))
            .unwrap();
        let mut b = [0u8; 16];
        let n = u.recv(&mut b).unwrap();
        assert_eq!(&b[..n], b"dgram");
        let again = parse_publish(&format!("127.0.0.1:{tcp_port}:80")).unwrap();
        let e = Publisher::start(&[again], Ipv4Addr::LOCALHOST)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("already in use") && e.contains(&tcp_port.to_string()),
            "{e}"
        );
        let t0 = Instant::now();
        drop(p);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "stopping took {:?}",
            t0.elapsed()
        );
        assert!(!tcp_answers(SocketAddr::from(([127, 0, 0, 1], tcp_port))));
        let ports = docker_ports(&maps);
        assert!(ports.get(format!("{port}/udp")).is_some());
    }
}
