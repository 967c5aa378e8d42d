//! What every started guest is told before it runs containers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_protocol::agent::{
    CreateSandboxRequest, IPAddress, Interface, ReseedRandomRequest, Route, SetTimeRequest,
};

use crate::guest::{ctx, AgentConn, GuestError, RpcError};
use crate::net::dns::dns_from_host;
use crate::net::GuestNet;
use crate::sandbox::machine::NET_IFACE;
use crate::sandbox::{Result, SandboxConfig, SandboxError};
use crate::util::getrandom;

/// What every started guest is told: new randomness (a restored one shares
/// its CRNG state with every other clone of its template until now), the
/// time, its name and DNS.
pub(super) fn give_identity(
    agent: &AgentConn,
    cfg: &SandboxConfig,
    net: Option<&GuestNet>,
) -> Result<()> {
    // CreateSandbox configures the network in the guest: slow when many
    // sandboxes start at once (see guest::SLOW_CALL).
    let timeout = crate::guest::SLOW_CALL;
    reseed_and_set_time(agent, timeout)?;
    agent
        .sandbox
        .create_sandbox(ctx(timeout), &sandbox_request(cfg, net))
        .map_err(|e| GuestError::from(RpcError::new("CreateSandbox", &e)))?;
    Ok(())
}

/// New randomness first (a restored guest shares its CRNG state with every
/// other clone of its template until then), then the time.
fn reseed_and_set_time(agent: &AgentConn, timeout: Duration) -> Result<()> {
    let mut seed = ReseedRandomRequest::new();
    seed.data = vec![0; 64];
    getrandom(&mut seed.data)?;
    let sent = std::time::Instant::now();
    agent
        .sandbox
        .reseed_random(ctx(timeout), &seed)
        .map_err(|e| GuestError::from(RpcError::new("ReseedRandom", &e)))?;
    // The time reaches the guest one trip after it is read: a busy guest
    // takes hundreds of milliseconds to take a request. The trip just made
    // (ReseedRandom does next to no work) measures it; half its round trip
    // is the one-way delay NTP assumes.
    let one_way = sent.elapsed() / 2;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| SandboxError::Clock)?
        + one_way;
    let mut t = SetTimeRequest::new();
    t.sec = now.as_secs() as i64;
    t.nsec = now.subsec_nanos();
    agent
        .sandbox
        .set_time(ctx(timeout), &t)
        .map_err(|e| GuestError::from(RpcError::new("SetTime", &e)))?;
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
    s
}
