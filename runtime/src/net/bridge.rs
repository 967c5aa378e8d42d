//! Sandbox networking on the host: the `husk0` bridge with its address
//! range and NAT, an address lease and a tap per sandbox.
//!
//! Taps are created here and handed to husk-vmm as inherited descriptors
//! (`tap_fd`), never made persistent: a tap exists exactly as long as a
//! process holds it, so a VMM killed with SIGKILL leaves none behind. An
//! address lease is a file under the lease directory held with flock(2);
//! the VMM inherits that descriptor too, so the address stays taken as long
//! as the VM lives, and a lease nobody holds is free for the next sandbox.
//!
//! Links and addresses are configured over rtnetlink; NAT and forwarding
//! with iptables (Debian's, on nf_tables), as Docker does.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::net::{NetError, NlContext, Result};
use crate::util::{shown, IoContext};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{LinkBridge, LinkUnspec};

use crate::net::identity::GuestNet;
use crate::net::netlink::{link_index, netlink};
use crate::net::tap::{create_tap, Tap};
use crate::util::Lock;

/// The bridge network: its name, range and where leases are kept.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub bridge: String,
    /// The range; the bridge (gateway) takes its first address.
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    pub mtu: u32,
    /// Address leases, one file per leased address.
    pub lease_dir: PathBuf,
}

impl Default for NetworkConfig {
    /// `husk0` on 10.89.0.0/16 (`$HUSK_BRIDGE` and `$HUSK_SUBNET`
    /// override), leases under /run/husk-net/<bridge> (host-wide, like the
    /// bridge, whatever the run dir).
    /// A malformed variable is ignored here; `from_env` reports it.
    fn default() -> Self {
        Self::from_env().unwrap_or_else(|_| Self::with("husk0", (Ipv4Addr::new(10, 89, 0, 0), 16)))
    }
}

impl NetworkConfig {
    fn with(bridge: &str, (subnet, prefix): (Ipv4Addr, u8)) -> Self {
        NetworkConfig {
            lease_dir: PathBuf::from("/run/husk-net").join(bridge),
            bridge: bridge.into(),
            subnet,
            prefix,
            mtu: 1500,
        }
    }

    /// The default network with `$HUSK_BRIDGE` / `$HUSK_SUBNET` applied.
    pub fn from_env() -> Result<Self> {
        let subnet = match std::env::var("HUSK_SUBNET") {
            Ok(s) => parse_cidr(&s).map_err(|e| NetError::Invalid(format!("HUSK_SUBNET: {e}")))?,
            Err(_) => (Ipv4Addr::new(10, 89, 0, 0), 16),
        };
        let bridge = std::env::var("HUSK_BRIDGE").unwrap_or_else(|_| "husk0".into());
        if bridge.is_empty() || bridge.len() > 15 || bridge.contains(['/', ' ', ':']) {
            return Err(NetError::Invalid(format!(
                "HUSK_BRIDGE {bridge:?} is not an interface name (1-15 characters)"
            )));
        }
        Ok(Self::with(&bridge, subnet))
    }
}

/// "10.89.0.0/16" → (network address, prefix); host bits must be zero and
/// the range must leave room for a gateway and a sandbox.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| NetError::Invalid(format!("{s:?}: not an IPv4 CIDR (a.b.c.d/len)")))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| NetError::Invalid(format!("{s:?}: {ip:?} is not an IPv4 address")))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| (8..=30).contains(l))
        .ok_or_else(|| NetError::Invalid(format!("{s:?}: prefix length must be 8 to 30")))?;
    if u32::from(ip) & !mask(len) != 0 {
        return Err(NetError::Invalid(format!(
            "{s:?}: host bits are set (the network is {}/{len})",
            Ipv4Addr::from(u32::from(ip) & mask(len))
        )));
    }
    Ok((ip, len))
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl NetworkConfig {
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 1)
    }

    /// Sandbox addresses: after the gateway, before the broadcast address.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.subnet);
        let last = base | !mask(self.prefix);
        (base + 2..last).map(Ipv4Addr::from)
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix)
    }

    /// The bridge up with the gateway address, forwarding on, NAT for the
    /// range. Idempotent; serialized with other husk processes.
    pub fn ensure_bridge(&self) -> Result<()> {
        std::fs::create_dir_all(&self.lease_dir).at(|| shown(&self.lease_dir))?;
        let _lock = lock(&self.lease_dir.join("lock"))?;
        let (bridge, gw, prefix, mtu) =
            (self.bridge.clone(), self.gateway(), self.prefix, self.mtu);
        netlink(move |h| async move {
            let index = match link_index(&h, &bridge).await? {
                Some(i) => i,
                None => {
                    h.link()
                        .add(LinkBridge::new(&bridge).mtu(mtu).build())
                        .execute()
                        .await
                        .nl(|| format!("creating bridge {bridge}"))?;
                    link_index(&h, &bridge)
                        .await?
                        .ok_or_else(|| NetError::LinkGone(bridge.clone()))?
                }
            };
            let mut addrs = h.address().get().set_link_index_filter(index).execute();
            let mut has = false;
            while let Some(a) = addrs
                .try_next()
                .await
                .nl(|| format!("the addresses of {bridge}"))?
            {
                has |= a.header.prefix_len == prefix
                    && a.attributes.iter().any(
                        |x| matches!(x, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == gw),
                    );
            }
            if !has {
                h.address()
                    .add(index, IpAddr::V4(gw), prefix)
                    .execute()
                    .await
                    .nl(|| format!("giving {bridge} the address {gw}/{prefix}"))?;
            }
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .nl(|| format!("bringing {bridge} up"))?;
            Ok(())
        })?;
        let fwd = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(fwd)
            .map(|s| s.trim() != "1")
            .unwrap_or(true)
        {
            std::fs::write(fwd, "1").at(|| format!("enabling forwarding ({fwd})"))?;
        }
        let cidr = self.cidr();
        let b = self.bridge.as_str();
        // Outbound traffic leaves with the host's address; replies and
        // traffic among sandboxes pass even where FORWARD's policy is DROP
        // (as it is once Docker is installed).
        ensure_rule(
            "nat",
            "POSTROUTING",
            &["-s", &cidr, "!", "-o", b, "-j", "MASQUERADE"],
        )?;
        ensure_rule("filter", "FORWARD", &["-i", b, "-j", "ACCEPT"])?;
        ensure_rule(
            "filter",
            "FORWARD",
            &[
                "-o",
                b,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        )?;
        Ok(())
    }

    /// Leases the lowest free address to `holder` (a sandbox id).
    pub fn lease(&self, holder: &str) -> Result<Lease> {
        std::fs::create_dir_all(&self.lease_dir).at(|| shown(&self.lease_dir))?;
        let _lock = lock(&self.lease_dir.join("lock"))?;
        for ip in self.hosts() {
            let path = self.lease_dir.join(ip.to_string());
            let f = File::options()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .at(|| shown(&path))?;
            // A lease file nobody holds is free, whoever wrote it.
            let Some(mut f) = crate::util::flock_exclusive(f, false)
                .at(|| format!("locking {}", path.display()))?
            else {
                continue;
            };
            f.set_len(0).at(|| shown(&path))?;
            writeln!(f, "{holder}").at(|| shown(&path))?;
            return Ok(Lease {
                file: f,
                ip,
                prefix: self.prefix,
                gateway: self.gateway(),
            });
        }
        Err(NetError::NoFreeAddress {
            network: self.bridge.clone(),
            cidr: self.cidr(),
        })
    }

    /// A new tap, attached to the bridge and up when `attach`, else left
    /// alone (a sandbox without network still needs its NIC backed).
    pub fn tap(&self, attach: bool) -> Result<Tap> {
        let name = format!("husk-{}", crate::util::random_hex(4)?);
        let file = create_tap(&name)?;
        let tap = Tap { file, name };
        if attach {
            let (bridge, name, mtu) = (self.bridge.clone(), tap.name.clone(), self.mtu);
            netlink(move |h| async move {
                let br = link_index(&h, &bridge)
                    .await?
                    .ok_or_else(|| NetError::LinkGone(bridge.clone()))?;
                let index = link_index(&h, &name)
                    .await?
                    .ok_or_else(|| NetError::LinkGone(name.clone()))?;
                h.link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .controller(br)
                            .mtu(mtu)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .nl(|| format!("attaching {name} to {bridge}"))?;
                Ok(())
            })?;
        }
        Ok(tap)
    }
}

/// An address held for a sandbox while this file (or a VMM that inherited
/// it) stays open.
#[derive(Debug)]
pub struct Lease {
    file: File,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl Lease {
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The guest's interface on the bridge: this address, the gateway.
    pub fn guest_net(&self, mtu: u32) -> GuestNet {
        GuestNet {
            veth: String::new(),
            mac: self.mac(),
            mtu,
            addresses: vec![(self.ip, self.prefix)],
            routes: vec![(None, Some(self.gateway))],
        }
    }

    /// A MAC derived from the address (locally administered, unicast), so
    /// a reused address does not meet a stale neighbour entry of another MAC.
    pub fn mac(&self) -> String {
        let o = self.ip.octets();
        format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Only the holder empties the file; the lock goes with the last
        // descriptor (a VMM still running keeps the address).
        let _ = self.file.set_len(0);
    }
}

/// Appends an iptables rule unless it is there.
fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<()> {
    let run = |op: &str| {
        Command::new("iptables")
            .args(["-w", "-t", table, op, chain])
            .args(rule)
            .output()
    };
    let check = run("-C").at(|| {
        "running iptables (install the iptables package; husk uses it for NAT like Docker)"
    })?;
    if check.status.success() {
        return Ok(());
    }
    let add = run("-A").at(|| "running iptables")?;
    if !add.status.success() {
        return Err(NetError::Iptables {
            rule: format!("-t {table} -A {chain} {}", rule.join(" ")),
            stderr: String::from_utf8_lossy(&add.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn lock(path: &Path) -> Result<Lock> {
    Lock::take(path, true)?.ok_or_else(|| {
        crate::util::IoError {
            what: format!("locking {}", path.display()),
            source: std::io::ErrorKind::WouldBlock.into(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(
            parse_cidr("10.89.0.0/16").unwrap(),
            (Ipv4Addr::new(10, 89, 0, 0), 16)
        );
        for (bad, why) in [
            ("10.89.0.0", "not an IPv4 CIDR"),
            ("10.89.0.1/16", "host bits"),
            ("10.89.0.0/31", "prefix length"),
            ("x/16", "not an IPv4 address"),
        ] {
            let e = parse_cidr(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn addresses_skip_gateway_and_broadcast() {
        let c = NetworkConfig {
            subnet: Ipv4Addr::new(10, 1, 2, 0),
            prefix: 29,
            ..NetworkConfig::default()
        };
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        let hosts: Vec<_> = c.hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 1, 2, 2)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 1, 2, 6)));
    }

    #[test]
    fn leases_are_exclusive_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let c = NetworkConfig {
            subnet: Ipv4Addr::new(10, 1, 2, 0),
            prefix: 30,
            lease_dir: d.path().into(),
            ..NetworkConfig::default()
        };
        let a = c.lease("a").unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 1, 2, 2));
        assert_eq!(a.mac(), "06:00:0a:01:02:02");
        let e = c.lease("b").unwrap_err().to_string();
        assert!(e.contains("no free address"), "{e}");
        drop(a);
        assert_eq!(c.lease("b").unwrap().ip, Ipv4Addr::new(10, 1, 2, 2));
    }
}
