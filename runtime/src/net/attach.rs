//! The seam between a sandbox and its network: a driver attaches the
//! sandbox's NIC and says what the guest's interface is. Today's drivers
//! are the `husk0` bridge (an address lease, a tap on the bridge, NAT) and
//! a CNI pod namespace taken over (a tap with tc redirects to its veth);
//! `--network none` has a tap on nothing. Published ports ride on the
//! bridge's address.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::net::{NetError, Result};

use crate::net::bridge::{Lease, NetworkConfig};
use crate::net::identity::GuestNet;
use crate::net::mode::NetworkMode;
use crate::net::podnet::PodNet;
use crate::net::ports::{check_mappings, PortMapping, Publisher};
use crate::net::tap::Tap;

/// A sandbox's network, attached; released when dropped (the tap and the
/// lease also live as long as the VMM that inherited them).
pub struct Attachment {
    /// Backs the guest's NIC; None for a sandbox found again (its VMM
    /// holds the tap, and the lease).
    pub tap: Option<Tap>,
    /// The address of a sandbox found again, whose lease its VMM holds.
    found_ip: Option<Ipv4Addr>,
    /// Its address on the bridge (bridge driver only).
    pub lease: Option<Lease>,
    /// Its published ports, bound.
    pub publisher: Option<Publisher>,
    /// The pod network taken over (CRI), if any.
    pub pod: Option<PodNet>,
}

/// What a sandbox asks of its network.
pub struct Request<'a> {
    /// Names the lease's holder.
    pub id: &'a str,
    pub mode: NetworkMode,
    /// A pod's network namespace (CRI) to take over, instead of the bridge.
    pub netns: Option<&'a Path>,
    pub ports: &'a [PortMapping],
}

impl Attachment {
    /// Attaches with the driver `req` calls for. Ports are bound before any
    /// VM starts, so one that is taken fails the start early.
    pub fn attach(bridge: &NetworkConfig, req: &Request) -> Result<Attachment> {
        let bridged = req.mode == NetworkMode::Bridge && req.netns.is_none();
        let lease = if bridged {
            bridge.ensure_bridge()?;
            Some(bridge.lease(req.id)?)
        } else {
            None
        };
        check_mappings(req.ports)?;
        let publisher = match (&lease, req.ports.is_empty()) {
            (_, true) => None,
            (Some(l), false) => Some(Publisher::start(req.ports, l.ip)?),
            (None, false) => {
                return Err(NetError::Invalid(
                    "publishing ports needs the bridge network (not --network none)".into(),
                ))
            }
        };
        // A pod's namespace (CRI) brings its own tap; else one of ours.
        let (pod, tap) = match req.netns {
            Some(ns) => {
                let (p, tap) = PodNet::attach(ns).map_err(|e| NetError::Pod {
                    netns: ns.to_path_buf(),
                    source: Box::new(e),
                })?;
                (Some(p), tap)
            }
            None => (None, bridge.tap(bridged)?),
        };
        Ok(Attachment {
            tap: Some(tap),
            found_ip: None,
            lease,
            publisher,
            pod,
        })
    }

    /// The network of a sandbox found again (started by an earlier process
    /// of ours): its VMM still holds the tap and the address lease; the
    /// published ports, which lived in that process, are bound again.
    pub fn found(ip: Option<Ipv4Addr>, ports: &[PortMapping]) -> Result<Attachment> {
        let publisher = match (ip, ports.is_empty()) {
            (_, true) => None,
            (Some(ip), false) => Some(Publisher::start(ports, ip)?),
            (None, false) => {
                return Err(NetError::Invalid(
                    "publishing ports needs the bridge network (not --network none)".into(),
                ))
            }
        };
        Ok(Attachment {
            tap: None,
            found_ip: ip,
            lease: None,
            publisher,
            pod: None,
        })
    }

    /// The descriptors the VMM inherits: the tap, then the lease (so the
    /// address stays taken while the VM lives).
    pub fn inherited_fds(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = self.tap.iter().map(Tap::fd).collect();
        fds.extend(self.lease.as_ref().map(Lease::fd));
        fds
    }

    /// What the guest's interface becomes; None without a network.
    pub fn guest(&self, mtu: u32) -> Option<GuestNet> {
        match (&self.pod, &self.lease) {
            (Some(p), _) => Some(p.guest.clone()),
            (None, Some(l)) => Some(l.guest_net(mtu)),
            (None, None) => None,
        }
    }

    /// Its address: on the bridge, or the pod's (CNI's).
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.lease
            .as_ref()
            .map(|l| l.ip)
            .or(self.found_ip)
            .or_else(|| {
                self.pod
                    .as_ref()
                    .and_then(|p| p.guest.addresses.first().map(|a| a.0))
            })
    }
}
