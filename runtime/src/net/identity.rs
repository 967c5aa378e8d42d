//! The identity of a guest's one interface, as a network driver (the
//! bridge, a CNI pod namespace) gives it; the agent configures eth0 from it.

use std::net::Ipv4Addr;

/// An IPv4 network: address and prefix length.
pub type Cidr4 = (Ipv4Addr, u8);

/// What the guest's interface becomes: the veth's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNet {
    /// The veth's name in the namespace (CNI's CNI_IFNAME, usually eth0).
    pub veth: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<Cidr4>,
    /// (destination, or None for the default route; gateway)
    pub routes: Vec<(Option<Cidr4>, Option<Ipv4Addr>)>,
}
