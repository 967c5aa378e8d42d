//! The Network service: the sandbox's interfaces and routes, over rtnetlink.
//!
//! Synchronous netlink (netlink-packet-route + netlink-sys, the crates and
//! versions libcontainer already links) rather than the async `rtnetlink`
//! crate: PID 1 has no async runtime and needs a handful of requests.
//!
//! An agent on a host changes nothing unless told it runs in a network
//! namespace of its own (`--own-netns`; tests use it): it must never
//! reconfigure the host's network. Where PID 1's namespace is readable, the
//! claim is checked too.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;

use husk_protocol::agent::{
    Empty, IPAddress, Interface, ListInterfacesResponse, Route, UpdateInterfaceRequest,
    UpdateRoutesRequest,
};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use ttrpc::Code;

use crate::rpc::{check_version, internal, invalid, status, Metadata};

/// A netlink route socket with request/acknowledge handling.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

/// A netlink request that failed: the kernel's errno, or the socket.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
    #[error("{what}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink reply: {0}")]
    Reply(String),
}

/// Configuring the sandbox's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The request is not valid (INVALID_ARGUMENT): a MAC, an address, a
    /// route, an interface name or MTU.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: NlError,
    },
    #[error("no interface {0:?}")]
    NoInterface(String),
    #[error("no lo in this network namespace")]
    NoLoopback,
    #[error("{what}")]
    Namespace {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the loopback thread panicked")]
    Thread,
    #[error("writing {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<NlError> for NetError {
    fn from(source: NlError) -> NetError {
        NetError::Netlink {
            what: "netlink".into(),
            source,
        }
    }
}

/// The one mapping to ttrpc codes: a request that is not valid is the
/// caller's; the rest is the agent's own failure.
impl From<NetError> for ttrpc::Error {
    fn from(e: NetError) -> ttrpc::Error {
        match e {
            NetError::Invalid(m) => invalid(m),
            e => internal(crate::rpc::causes(&e)),
        }
    }
}

fn failed(what: impl Into<String>) -> impl FnOnce(NlError) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn socket(what: &'static str) -> impl FnOnce(std::io::Error) -> NlError {
    move |source| NlError::Socket { what, source }
}

impl Netlink {
    pub fn new() -> Result<Self, NlError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(socket("netlink socket"))?;
        sock.bind_auto().map_err(socket("netlink bind"))?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(socket("netlink connect"))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends one request; returns the messages of a dump, or nothing once
    /// the kernel acknowledges. A kernel error comes back as Err naming it.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(socket("netlink send"))?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .sock
                .recv(&mut &mut rx[..], 0)
                .map_err(socket("netlink recv"))?;
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                    .map_err(|e| NlError::Reply(e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    match reply.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(c) => Err(NlError::Kernel(-c.get())),
                            }
                        }
                        NetlinkPayload::InnerMessage(m) => out.push(m),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// A dump request, keeping the replies `pick` takes.
    fn dump<T>(
        &mut self,
        req: RouteNetlinkMessage,
        pick: impl Fn(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Vec<T>, NlError> {
        Ok(self
            .request(req, NLM_F_DUMP)?
            .into_iter()
            .filter_map(pick)
            .collect())
    }

    pub fn links(&mut self) -> Result<Vec<LinkMessage>, NlError> {
        self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            |m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            },
        )
    }

    /// The link named `name`, if there is one: asked for by name, so the
    /// kernel describes that link only (a dump describes every link with
    /// its statistics and per-family settings, guest-kernel work that a
    /// start paid twice).
    pub fn link(&mut self, name: &str) -> Result<Option<LinkMessage>, NlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(m), NLM_F_ACK) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) if link_name(&l) == Some(name) => Some(l),
                _ => None,
            })),
            Err(NlError::Kernel(libc::ENODEV)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn addresses(&mut self) -> Result<Vec<AddressMessage>, NlError> {
        self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            |m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            },
        )
    }

    /// The main table's routes, IPv4 and IPv6.
    pub fn routes(&mut self) -> Result<Vec<RouteMessage>, NlError> {
        self.dump(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            |m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.table == RouteHeader::RT_TABLE_MAIN =>
                {
                    Some(r)
                }
                _ => None,
            },
        )
    }
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// "06:00:0a:58:00:02" → bytes; a unicast MAC only.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<_> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(NetError::Invalid(format!("mac {s:?} is not six hex bytes")));
    }
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(NetError::Invalid(format!("mac {s:?} is not six hex bytes")));
        }
        mac[i] = u8::from_str_radix(p, 16)
            .map_err(|_| NetError::Invalid(format!("mac {s:?} is not hex")))?;
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(NetError::Invalid(format!(
            "mac {s:?} is not a unicast address"
        )));
    }
    Ok(mac)
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// A checked address: the IP and a prefix that fits it.
pub fn parse_address(a: &IPAddress) -> Result<(IpAddr, u8), NetError> {
    let ip: IpAddr = a
        .address
        .parse()
        .map_err(|_| NetError::Invalid(format!("address {:?} is not an IP address", a.address)))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if a.prefix_len > max {
        return Err(NetError::Invalid(format!(
            "prefix_len {} is too long for {ip}",
            a.prefix_len
        )));
    }
    Ok((ip, a.prefix_len as u8))
}

/// A destination network: address and prefix length.
pub type Cidr = (IpAddr, u8);

/// A checked route: destination (None = default) with prefix, gateway.
pub fn parse_route(r: &Route) -> Result<(Option<Cidr>, Option<IpAddr>), NetError> {
    let dest = match r.destination.as_str() {
        "" | "default" => None,
        d => {
            let (ip, len) = d.split_once('/').unwrap_or((d, ""));
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| NetError::Invalid(format!("route destination {d:?} is not a CIDR")))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = if len.is_empty() {
                max
            } else {
                len.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| {
                        NetError::Invalid(format!("route destination {d:?}: bad prefix length"))
                    })?
            };
            Some((ip, len))
        }
    };
    let gw =
        match r.gateway.as_str() {
            "" => None,
            g => Some(g.parse::<IpAddr>().map_err(|_| {
                NetError::Invalid(format!("route gateway {g:?} is not an IP address"))
            })?),
        };
    if dest.is_none() && gw.is_none() {
        return Err(NetError::Invalid("a default route needs a gateway".into()));
    }
    if !r.device.is_empty() && !valid_ifname(&r.device) {
        return Err(NetError::Invalid(format!(
            "route device {:?} is not an interface name",
            r.device
        )));
    }
    if let (Some((d, _)), Some(g)) = (dest, gw) {
        if d.is_ipv4() != g.is_ipv4() {
            return Err(NetError::Invalid(
                "route destination and gateway are of different families".into(),
            ));
        }
    }
    Ok((dest, gw))
}

/// Checks a whole interface request before anything is changed.
pub fn check_interface(i: &Interface) -> Result<(), NetError> {
    if !valid_ifname(&i.name) {
        return Err(NetError::Invalid(format!(
            "interface name {:?} is not valid",
            i.name
        )));
    }
    if !i.mac.is_empty() {
        parse_mac(&i.mac)?;
    }
    if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
        return Err(NetError::Invalid(format!(
            "mtu {} is out of range (68-65535)",
            i.mtu
        )));
    }
    for a in &i.addresses {
        parse_address(a)?;
    }
    Ok(())
}

/// Brings up loopback in the network namespace of process `pid` (a
/// container with a namespace of its own: the kernel creates it down, and
/// runtimes below Docker's network layer leave it so). Done from a thread
/// that enters the namespace and then ends.
pub fn loopback_up_in(pid: i32) -> Result<(), NetError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|source| {
        NetError::Namespace {
            what: format!("network namespace of {pid}"),
            source,
        }
    })?;
    std::thread::spawn(move || -> Result<(), NetError> {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace fd we hold; it changes only this
        // thread's network namespace, and the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetError::Namespace {
                what: format!("entering the network namespace of {pid}"),
                source: std::io::Error::last_os_error(),
            });
        }
        loopback_up()
    })
    .join()
    .map_err(|_| NetError::Thread)?
}

/// Brings up loopback in this thread's network namespace.
pub fn loopback_up() -> Result<(), NetError> {
    let mut nl = Netlink::new()?;
    let lo = nl.link("lo")?.ok_or(NetError::NoLoopback)?;
    nl.request(
        RouteNetlinkMessage::SetLink(up_message(lo.header.index)),
        NLM_F_ACK,
    )
    .map_err(failed("bringing lo up"))?;
    Ok(())
}

/// A SETLINK that brings link `index` up and changes nothing else (yet).
fn up_message(index: u32) -> LinkMessage {
    let mut set = LinkMessage::default();
    set.header.index = index;
    set.header.flags = LinkFlags::Up;
    set.header.change_mask = LinkFlags::Up;
    set
}

/// The guest's uplink (`eth0`, which StartSandbox configures).
const UPLINK: &str = "eth0";

/// Sets `name`'s IPv6 `disable_ipv6`: Docker's default for an IPv4-only
/// network's interface is off (no link-local address, no DAD or router
/// solicitations), and every address husk hands out is IPv4.
/// Written only when it differs: a host-mode agent's /proc/sys may be
/// read-only.
fn set_ipv6(name: &str, on: bool) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    let want = if on { "0" } else { "1" };
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == want) {
        return Ok(());
    }
    std::fs::write(&path, want).map_err(|source| NetError::Sysctl {
        path: path.clone(),
        source,
    })
}

/// Brings the uplink up with IPv6 off, when the guest has one: done at
/// boot, so a template's snapshot holds it up with its receive ring
/// filled.
pub fn uplink_ready() -> Result<(), NetError> {
    let mut nl = Netlink::new()?;
    let Some(link) = nl.link(UPLINK)? else {
        return Ok(());
    };
    // A kernel without IPv6 has nothing to turn off; the link comes up
    // either way.
    let ipv6 = set_ipv6(UPLINK, false);
    nl.request(
        RouteNetlinkMessage::SetLink(up_message(link.header.index)),
        NLM_F_ACK,
    )
    .map_err(failed(format!("bringing {UPLINK} up")))?;
    match ipv6 {
        Err(NetError::Sysctl { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        r => r,
    }
}

/// The SETLINK that makes `link` what `i` asks for (up, its MAC and MTU),
/// with only what differs: the kernel runs its address-change work for a
/// MAC set again unchanged. None when nothing does.
fn link_changes(link: &LinkMessage, i: &Interface) -> Result<Option<LinkMessage>, NetError> {
    let mut set = up_message(link.header.index);
    let has = |want: &LinkAttribute| link.attributes.iter().any(|a| a == want);
    if !i.mac.is_empty() {
        let mac = LinkAttribute::Address(parse_mac(&i.mac)?.to_vec());
        if !has(&mac) {
            set.attributes.push(mac);
        }
    }
    if i.mtu != 0 && !has(&LinkAttribute::Mtu(i.mtu)) {
        set.attributes.push(LinkAttribute::Mtu(i.mtu));
    }
    let up = link.header.flags.contains(LinkFlags::Up);
    Ok((!up || !set.attributes.is_empty()).then_some(set))
}

pub struct NetworkService {
    /// In the guest, or on a host in a network namespace of its own.
    pub may_change: bool,
}

impl NetworkService {
    /// `own_netns`: the caller says this (host) agent has a network
    /// namespace of its own.
    pub fn new(is_guest: bool, own_netns: bool) -> Self {
        let shares_pid1s = || -> Option<bool> {
            let me = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
            let init = std::fs::metadata("/proc/1/ns/net").ok()?.ino();
            Some(me == init)
        };
        Self {
            may_change: is_guest || (own_netns && shares_pid1s() != Some(true)),
        }
    }

    fn guard(&self) -> ttrpc::Result<()> {
        if self.may_change {
            Ok(())
        } else {
            Err(status(
                Code::FAILED_PRECONDITION,
                "refused: this agent runs in the host's network namespace",
            ))
        }
    }

    /// Configures one interface: MAC, MTU, exactly these addresses, up.
    pub fn apply_interface(&self, i: &Interface) -> Result<(), NetError> {
        self.apply_interface_on(&mut Netlink::new()?, i)
    }

    /// A sandbox's interfaces, then its routes, on one netlink socket.
    pub fn apply_sandbox(
        &self,
        interfaces: &[Interface],
        routes: &[Route],
    ) -> Result<(), NetError> {
        let mut nl = Netlink::new()?;
        for i in interfaces {
            let _step = crate::profile::step("sandbox.interface");
            self.apply_interface_on(&mut nl, i)?;
        }
        let _step = crate::profile::step("sandbox.routes");
        self.apply_routes_on(&mut nl, routes)
    }

    fn apply_interface_on(&self, nl: &mut Netlink, i: &Interface) -> Result<(), NetError> {
        check_interface(i)?;
        let link = nl
            .link(&i.name)?
            .ok_or_else(|| NetError::NoInterface(i.name.clone()))?;
        let index = link.header.index;
        if let Some(set) = link_changes(&link, i)? {
            nl.request(RouteNetlinkMessage::SetLink(set), NLM_F_ACK)
                .map_err(failed(format!("configuring {}", i.name)))?;
        }
        let want: Vec<(IpAddr, u8)> = i
            .addresses
            .iter()
            .map(parse_address)
            .collect::<Result<_, _>>()?;
        if want.iter().any(|(ip, _)| ip.is_ipv6()) {
            // The uplink came up with IPv6 off (`uplink_ready`).
            set_ipv6(&i.name, true)?;
        }
        let have: Vec<AddressMessage> = nl
            .addresses()?
            .into_iter()
            .filter(|a| a.header.index == index)
            .collect();
        for a in &have {
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let keep = match ip {
                Some(ip) => {
                    want.contains(&(ip, a.header.prefix_len))
                        // The kernel's own IPv6 link-local address stays.
                        || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
                }
                None => true,
            };
            if !keep {
                nl.request(RouteNetlinkMessage::DelAddress(a.clone()), NLM_F_ACK)
                    .map_err(failed(format!("removing an address of {}", i.name)))?;
            }
        }
        for (ip, len) in want {
            let mut m = AddressMessage::default();
            m.header.family = if ip.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            m.header.prefix_len = len;
            m.header.index = index;
            m.attributes.push(AddressAttribute::Local(ip));
            m.attributes.push(AddressAttribute::Address(ip));
            match nl.request(
                RouteNetlinkMessage::NewAddress(m),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(_) => {}
                // Already there: what was asked for holds.
                Err(NlError::Kernel(libc::EEXIST)) => {}
                Err(e) => return Err(failed(format!("adding {ip}/{len} to {}", i.name))(e)),
            }
        }
        Ok(())
    }

    /// Replaces the main table's static routes with `routes` (the kernel's
    /// own routes for connected subnets stay).
    pub fn apply_routes(&self, routes: &[Route]) -> Result<(), NetError> {
        self.apply_routes_on(&mut Netlink::new()?, routes)
    }

    fn apply_routes_on(&self, nl: &mut Netlink, routes: &[Route]) -> Result<(), NetError> {
        let parsed: Vec<_> = routes.iter().map(parse_route).collect::<Result<_, _>>()?;
        // Each device named, looked up once by name.
        let mut indexes: Vec<(String, u32)> = Vec::new();
        let mut index_of = |nl: &mut Netlink, name: &str| -> Result<u32, NetError> {
            if let Some((_, i)) = indexes.iter().find(|(n, _)| n == name) {
                return Ok(*i);
            }
            let i = nl
                .link(name)?
                .map(|l| l.header.index)
                .ok_or_else(|| NetError::NoInterface(name.to_string()))?;
            indexes.push((name.to_string(), i));
            Ok(i)
        };
        let mut add = Vec::new();
        for (r, (dest, gw)) in routes.iter().zip(parsed) {
            let oif = if r.device.is_empty() {
                None
            } else {
                Some(index_of(nl, &r.device)?)
            };
            let mut m = RouteMessage::default();
            let v4 = dest.map(|d| d.0.is_ipv4()).or(gw.map(|g| g.is_ipv4())) == Some(true);
            m.header.address_family = if v4 {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            m.header.table = RouteHeader::RT_TABLE_MAIN;
            m.header.protocol = RouteProtocol::Boot;
            m.header.kind = RouteType::Unicast;
            m.header.scope = if gw.is_some() {
                RouteScope::Universe
            } else {
                RouteScope::Link
            };
            if let Some((d, len)) = dest {
                m.header.destination_prefix_length = len;
                m.attributes
                    .push(RouteAttribute::Destination(RouteAddress::from(d)));
            }
            if let Some(g) = gw {
                m.attributes
                    .push(RouteAttribute::Gateway(RouteAddress::from(g)));
            }
            if let Some(i) = oif {
                m.attributes.push(RouteAttribute::Oif(i));
            }
            add.push(m);
        }
        for r in nl.routes()? {
            if r.header.protocol != RouteProtocol::Kernel {
                nl.request(RouteNetlinkMessage::DelRoute(r), NLM_F_ACK)
                    .map_err(failed("removing a route"))?;
            }
        }
        // Routes through a gateway need the gateway's subnet first: add
        // link-scope ones before the rest.
        add.sort_by_key(|m| m.header.scope != RouteScope::Link);
        for m in add {
            nl.request(RouteNetlinkMessage::NewRoute(m), NLM_F_ACK | NLM_F_CREATE)
                .map_err(failed("adding a route"))?;
        }
        Ok(())
    }

    pub fn interfaces(&self) -> Result<Vec<Interface>, NetError> {
        let mut nl = Netlink::new()?;
        let addrs = nl.addresses()?;
        Ok(nl
            .links()?
            .into_iter()
            .map(|l| {
                let mut i = Interface::new();
                for a in &l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => i.name = n.clone(),
                        LinkAttribute::Mtu(m) => i.mtu = *m,
                        LinkAttribute::Address(b) => i.mac = format_mac(b),
                        _ => {}
                    }
                }
                i.addresses = addrs
                    .iter()
                    .filter(|a| a.header.index == l.header.index)
                    .filter_map(|a| {
                        a.attributes.iter().find_map(|x| match x {
                            AddressAttribute::Address(ip) => Some(IPAddress {
                                address: ip.to_string(),
                                prefix_len: u32::from(a.header.prefix_len),
                                ..Default::default()
                            }),
                            _ => None,
                        })
                    })
                    .collect();
                i
            })
            .collect())
    }

    pub fn list_routes(&self) -> Result<Vec<Route>, NetError> {
        let mut nl = Netlink::new()?;
        let links = nl.links()?;
        Ok(nl
            .routes()?
            .into_iter()
            .map(|r| {
                let mut out = Route::new();
                let addr = |a: &RouteAddress| match a {
                    RouteAddress::Inet(v4) => v4.to_string(),
                    RouteAddress::Inet6(v6) => v6.to_string(),
                    _ => String::new(),
                };
                out.destination = "default".into();
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => {
                            out.destination =
                                format!("{}/{}", addr(d), r.header.destination_prefix_length)
                        }
                        RouteAttribute::Gateway(g) => out.gateway = addr(g),
                        RouteAttribute::Oif(i) => {
                            out.device = links
                                .iter()
                                .find(|l| l.header.index == *i)
                                .and_then(link_name)
                                .unwrap_or_default()
                                .to_string()
                        }
                        _ => {}
                    }
                }
                out
            })
            .collect())
    }
}

/// The RPCs, synchronous; `crate::server` serves them.
impl NetworkService {
    pub fn update_interface(
        &self,
        meta: &Metadata,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        check_version(meta)?;
        let i = req
            .interface
            .into_option()
            .ok_or_else(|| invalid("interface is missing"))?;
        check_interface(&i)?;
        self.guard()?;
        self.apply_interface(&i)?;
        self.interfaces()?
            .into_iter()
            .find(|x| x.name == i.name)
            .ok_or_else(|| internal(format!("interface {:?} vanished", i.name)))
    }

    pub fn update_routes(
        &self,
        meta: &Metadata,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<UpdateRoutesRequest> {
        check_version(meta)?;
        for r in &req.routes {
            parse_route(r)?;
        }
        self.guard()?;
        self.apply_routes(&req.routes)?;
        Ok(UpdateRoutesRequest {
            routes: self.list_routes()?,
            ..Default::default()
        })
    }

    pub fn list_interfaces(
        &self,
        meta: &Metadata,
        _req: Empty,
    ) -> ttrpc::Result<ListInterfacesResponse> {
        check_version(meta)?;
        Ok(ListInterfacesResponse {
            interfaces: self.interfaces()?,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked() {
        assert_eq!(parse_mac("06:00:0a:58:00:02").unwrap()[2], 0x0a);
        for bad in [
            "",
            "06:00:0a:58:00",
            "01:00:00:00:00:01",
            "zz:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let a = |s: &str, p| IPAddress {
            address: s.into(),
            prefix_len: p,
            ..Default::default()
        };
        assert!(parse_address(&a("10.0.0.2", 24)).is_ok());
        assert!(parse_address(&a("10.0.0.2", 33)).is_err());
        assert!(parse_address(&a("fd00::2", 64)).is_ok());
        assert!(parse_address(&a("10.0.0", 8)).is_err());
        let r = |d: &str, g: &str| Route {
            destination: d.into(),
            gateway: g.into(),
            ..Default::default()
        };
        assert!(parse_route(&r("default", "10.0.0.1")).is_ok());
        assert!(parse_route(&r("default", "")).is_err());
        assert!(parse_route(&r("10.1.0.0/16", "")).is_ok());
        assert!(parse_route(&r("10.1.0.0/40", "")).is_err());
        assert!(parse_route(&r("10.1.0.0/16", "fd00::1")).is_err());
        let mut i = Interface {
            name: "eth0".into(),
            mtu: 1500,
            ..Default::default()
        };
        assert!(check_interface(&i).is_ok());
        i.mtu = 10;
        assert!(check_interface(&i).unwrap_err().to_string().contains("mtu"));
        i.mtu = 0;
        i.name = "a/b".into();
        assert!(check_interface(&i).is_err());
    }
}
