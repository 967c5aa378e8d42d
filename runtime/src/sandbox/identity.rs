//! What every started guest is told before it runs containers.

use std::time::{SystemTime, UNIX_EPOCH};

use husk_protocol::agent::{
    CreateSandboxRequest, IPAddress, Interface, ReseedRandomRequest, Route, SetTimeRequest,
    StartSandboxRequest,
};

use crate::guest::{ctx, AgentConn, GuestError, RpcError};
use crate::net::dns::dns_from_host;
use crate::net::GuestNet;
use crate::sandbox::machine::NET_IFACE;
use crate::sandbox::{Result, SandboxConfig, SandboxError};
use crate::util::getrandom;

/// What every started guest is told, in one trip (StartSandbox): new
/// randomness (a restored one shares its CRNG state with every other clone
/// of its template until now), the time, its name, DNS and network.
pub(super) fn give_identity(
    agent: &AgentConn,
    cfg: &SandboxConfig,
    net: Option<&GuestNet>,
) -> Result<()> {
    let mut seed = ReseedRandomRequest::new();
    seed.data = vec![0; 64];
    getrandom(&mut seed.data)?;
    // The time is read last and reaches the guest one way later: half the
    // round trip of the Health call that found the agent ready (a busy
    // guest takes hundreds of milliseconds to take a request; half a
    // round trip is the one-way delay NTP assumes). The agent adds its own
    // delay in handling the request.
    let sandbox = sandbox_request(cfg, net);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| SandboxError::Clock)?
        + agent.health_rtt() / 2;
    let mut t = SetTimeRequest::new();
    t.sec = now.as_secs() as i64;
    t.nsec = now.subsec_nanos();
    let req = StartSandboxRequest {
        seed: Some(seed).into(),
        time: Some(t).into(),
        sandbox: Some(sandbox).into(),
        ..Default::default()
    };
    // CreateSandbox configures the network in the guest: slow when many
    // sandboxes start at once (see guest::SLOW_CALL).
    agent
        .sandbox
        .start_sandbox(ctx(crate::guest::SLOW_CALL), &req)
        .map_err(|e| GuestError::from(RpcError::new("StartSandbox", &e)))?;
    Ok(())
}

/// CreateSandbox: the guest's name, DNS, and its interface and routes.
fn sandbox_request(cfg: &SandboxConfig, net: Option<&GuestNet>) -> CreateSandboxRequest {
    let mut s = CreateSandboxRequest::new();
    s.hostname = cfg.hostname.clone();
    if cfg.dns_servers.is_empty() {
        let (servers, search) =
            dns_from_host(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        s.dns_servers = servers;
        s.dns_search = search;
    } else {
        s.dns_servers = cfg.dns_servers.clone();
        s.dns_search = cfg.dns_search.clone();
        s.dns_options = cfg.dns_options.clone();
    }
    if let Some(n) = net {
        let mut i = Interface::new();
        i.name = NET_IFACE.into();
        i.mac = n.mac.clone();
        i.mtu = n.mtu;
        i.addresses = n
            .addresses
            .iter()
            .map(|(ip, len)| {
                let mut a = IPAddress::new();
                a.address = ip.to_string();
                a.prefix_len = (*len).into();
                a
            })
            .collect();
        s.interfaces = vec![i];
        s.routes = n
            .routes
            .iter()
            .map(|(dest, gw)| {
                let mut r = Route::new();
                r.destination = match dest {
                    None => "default".into(),
                    Some((d, len)) => format!("{d}/{len}"),
                };
                r.gateway = gw.map(|g| g.to_string()).unwrap_or_default();
                r.device = NET_IFACE.into();
                r
            })
            .collect();
        if let Some((ip, _)) = n.addresses.first() {
            s.hosts = vec![format!("{ip}\t{}", cfg.hostname)];
        }
    }
    s.hosts.extend(cfg.hosts.iter().cloned());
    s
}
