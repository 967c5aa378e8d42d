//! A network namespace someone else set up — containerd's CRI pod netns,
//! where CNI put a veth (`eth0`) with the pod's address — handed to the VM
//! the way Kata's "tcfilter" model does it: a tap is made in that
//! namespace, and tc ingress filters redirect every frame from the veth to
//! the tap and back (`u32 match all, mirred egress redirect`). The guest's
//! interface takes the veth's MAC, MTU, addresses and routes, so the pod IP
//! CNI allocated is the VM's, and the namespace's own stack sees nothing.
//!
//! The veth keeps its address (CNI's DEL and CRI's status still find it).
//! The tap goes with the last descriptor of it (here and in the VMM); the
//! ingress qdisc on the veth is removed when the sandbox stops, and goes
//! with the veth when CNI deletes it after a crash.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use crate::net::{NetError, NlContext, Result};
use crate::util::{shown, IoContext};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::net::identity::GuestNet;
use crate::net::netlink::{link_index, netlink_in};
use crate::net::tap::{create_tap, Tap};

/// A pod namespace's veth taken over by a sandbox.
pub struct PodNet {
    pub netns: PathBuf,
    pub guest: GuestNet,
    ns: File,
    veth_index: u32,
}

/// ETH_P_ALL as tc's netlink wants it: in network byte order (rtnetlink
/// passes the value through, and 0x0003 as is matches protocol 0x0300,
/// i.e. nothing).
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS: u32 = 0xffff_0000;

impl PodNet {
    /// Takes over the one non-loopback interface of the namespace at
    /// `netns` (a bind-mounted namespace file, as CRI makes); returns it
    /// with the tap made there for the VMM.
    pub fn attach(netns: &Path) -> Result<(PodNet, Tap)> {
        let ns = File::open(netns).at(|| format!("opening network namespace {}", shown(netns)))?;
        let tap_name = format!("husk-{}", crate::util::random_hex(4)?);
        let (tap, guest, veth_index) = netlink_in(Some(&ns), |h| async move {
            let (veth_index, link) = the_veth(&h).await?;
            let guest = read_identity(&h, veth_index, &link).await?;
            // Made in this thread's namespace: the pod's.
            let file = create_tap(&tap_name)?;
            let tap = Tap {
                file,
                name: tap_name.clone(),
            };
            let tap_index = link_index(&h, &tap_name)
                .await?
                .ok_or_else(|| NetError::LinkGone(tap_name.clone()))?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(tap_index)
                        .mtu(guest.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .nl(|| format!("setting {tap_name} up"))?;
            redirect(&h, veth_index, tap_index)
                .await
                .nl(|| format!("redirecting {} to {tap_name}", guest.veth))?;
            redirect(&h, tap_index, veth_index)
                .await
                .nl(|| format!("redirecting {tap_name} to {}", guest.veth))?;
            Ok((tap, guest, veth_index))
        })?;
        let pod = PodNet {
            netns: netns.to_path_buf(),
            guest,
            ns,
            veth_index,
        };
        Ok((pod, tap))
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        // The tap's filters go with the tap; the veth's stay unless removed.
        let index = self.veth_index;
        let r = netlink_in(Some(&self.ns), |h| async move {
            let mut q = h.qdisc().del(index as i32);
            q.message_mut().header.parent = TcHandle::INGRESS;
            q.message_mut().header.handle = TcHandle::from(INGRESS);
            q.execute().await.nl(|| "removing the ingress qdisc")
        });
        // Fails when CNI already deleted the veth (or the namespace went):
        // then there is nothing left to remove.
        drop(r);
    }
}

/// Ingress qdisc on `from` and a match-all filter that redirects each
/// frame to `to`'s egress.
async fn redirect(h: &Handle, from: u32, to: u32) -> std::result::Result<(), rtnetlink::Error> {
    h.qdisc().add(from as i32).ingress().execute().await?;
    h.traffic_filter(from as i32)
        .add()
        .parent(INGRESS)
        .protocol(ETH_P_ALL_BE)
        .redirect(to)?
        .execute()
        .await
}

async fn the_veth(h: &Handle) -> Result<(u32, LinkMessage)> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .nl(|| "listing the pod's links")?;
    let mut found: Vec<(u32, LinkMessage)> = links
        .into_iter()
        .filter(|l| l.header.link_layer_type != LinkLayerType::Loopback)
        .map(|l| (l.header.index, l))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(NetError::PodInterfaces(
            "the pod's network namespace has no interface besides loopback (did CNI run?)".into(),
        )),
        n => Err(NetError::PodInterfaces(format!(
            "the pod's network namespace has {n} interfaces besides loopback ({}); husk hands exactly one to the VM",
            found
                .iter()
                .map(|(_, l)| link_name(l).unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn read_identity(h: &Handle, index: u32, link: &LinkMessage) -> Result<GuestNet> {
    let veth = link_name(link).unwrap_or("eth0").to_string();
    let mut mac = None;
    let mut mtu = 1500;
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(b) if b.len() == 6 => {
                mac = Some(
                    b.iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                )
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let mac =
        mac.ok_or_else(|| NetError::PodInterfaces(format!("{veth} has no Ethernet address")))?;
    let mut addresses = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs
        .try_next()
        .await
        .nl(|| format!("the addresses of {veth}"))?
    {
        for attr in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                addresses.push((*ip, a.header.prefix_len));
            }
        }
    }
    if addresses.is_empty() {
        return Err(NetError::PodInterfaces(format!(
            "{veth} in the pod's namespace has no IPv4 address (did CNI's IPAM run?)"
        )));
    }
    addresses.dedup();
    let mut routes = Vec::new();
    let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut rs = h.route().get(req).execute();
    while let Some(r) = rs.try_next().await.nl(|| "the pod's routes")? {
        // The kernel's own routes for connected subnets come back in the
        // guest from the addresses.
        if r.header.protocol == RouteProtocol::Kernel || r.header.scope == RouteScope::Host {
            continue;
        }
        if r.header.table != rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if oif.is_some_and(|o| o != index) {
            continue;
        }
        let dest = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        let gw = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        });
        let dest = dest.map(|d| (d, r.header.destination_prefix_length));
        routes.push((dest.filter(|(_, len)| *len > 0), gw));
    }
    Ok(GuestNet {
        veth,
        mac,
        mtu,
        addresses,
        routes,
    })
}
