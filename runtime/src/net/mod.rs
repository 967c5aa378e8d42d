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

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::util::IoError;

/// Attaching a sandbox to a network, publishing its ports.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// A netlink request the kernel refused.
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A network setting that husk cannot take (`--network`, `-p`,
    /// `HUSK_SUBNET`, `HUSK_BRIDGE`).
    #[error("{0}")]
    Invalid(String),
    #[error("network {network} ({cidr}) has no free address: every one is leased")]
    NoFreeAddress { network: String, cidr: String },
    /// A link husk made or looked up went away while it was set up.
    #[error("link {0} is gone (removed while husk set it up)")]
    LinkGone(String),
    #[error("iptables {rule}: {stderr}")]
    Iptables { rule: String, stderr: String },
    /// A host port another process holds.
    #[error("publishing {addr}/{protocol}: the port is already in use")]
    PortTaken {
        addr: SocketAddr,
        protocol: ports::Protocol,
    },
    /// The pod's namespace is not one husk can hand to a VM (CNI made no
    /// interface, several, or one without an address).
    #[error("{0}")]
    PodInterfaces(String),
    #[error("taking over the pod network {}", netns.display())]
    Pod {
        netns: PathBuf,
        #[source]
        source: Box<NetError>,
    },
    #[error("the netlink thread panicked")]
    NetlinkThread,
}

pub type Result<T> = std::result::Result<T, NetError>;

/// `.nl(|| what)` on a netlink result: the error says what was asked.
pub(crate) trait NlContext<T> {
    fn nl<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> NlContext<T> for std::result::Result<T, rtnetlink::Error> {
    fn nl<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| NetError::Netlink {
            what: what().into(),
            source,
        })
    }
}
