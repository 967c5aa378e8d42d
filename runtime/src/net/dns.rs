//! The name servers a sandbox's guest is given.

use std::net::IpAddr;

/// Name servers for a sandbox: the host's, without loopback ones (a local
/// resolver is unreachable from the guest), else Google's, as Docker does.
pub fn dns_from_host(resolv_conf: &str) -> (Vec<String>, Vec<String>) {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for line in resolv_conf.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("nameserver") => {
                if let Some(ip) = w.next().and_then(|s| s.parse::<IpAddr>().ok()) {
                    if !ip.is_loopback() {
                        servers.push(ip.to_string());
                    }
                }
            }
            Some("search") | Some("domain") => search = w.map(String::from).collect(),
            _ => {}
        }
    }
    if servers.is_empty() {
        servers = vec!["8.8.8.8".into(), "8.8.4.4".into()];
    }
    (servers, search)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_skips_loopback_resolvers() {
        let (s, d) = dns_from_host("nameserver 127.0.0.53\nsearch a.example b\n");
        assert_eq!(s, ["8.8.8.8", "8.8.4.4"]);
        assert_eq!(d, ["a.example", "b"]);
        let (s, _) =
            dns_from_host("# x\nnameserver 192.0.2.1\nnameserver ::1\nnameserver 2001:db8::1\n");
        assert_eq!(s, ["192.0.2.1", "2001:db8::1"]);
    }
}
