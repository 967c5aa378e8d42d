//! Sandbox networking on the host. Drivers attach a sandbox's NIC
//! ([`Attachment`]): the `husk0` bridge (an address lease and a tap, NAT
//! outbound) and a CNI pod namespace taken over (a tap with tc redirects to
//! the veth). Each yields a [`GuestNet`] for the guest. Published ports and
//! DNS sit beside them.

pub mod attach;
pub mod bridge;
pub mod dns;
pub mod identity;
pub mod mode;
pub(crate) mod netlink;
pub mod podnet;
pub mod ports;
pub mod tap;

pub use attach::Attachment;
pub use bridge::{Lease, NetworkConfig};
pub use identity::{Cidr4, GuestNet};
pub use mode::NetworkMode;
pub use tap::Tap;
