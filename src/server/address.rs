//! Client addresses as per-address budgets and rate limits count them (a leaf: it uses
//! nothing of the server): the key they count by, and the client behind a trusted proxy.

use std::net::IpAddr;

use ipnet::IpNet;

/// The key of per-address budgets and rate limits: the address, or its /64 for IPv6 (one
/// subscriber usually holds a whole /64); IPv4-mapped IPv6 addresses count as IPv4.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut bytes = v6.octets();
                bytes[8..].fill(0);
                IpAddr::V6(bytes.into())
            }
        },
    }
}

/// The proxies in front of the server (`SSE_TRUSTED_PROXIES`, CIDR blocks or addresses).
/// Behind one every client shares the proxy's address; from these peers, and from no
/// other, `X-Forwarded-For` names the client that per-address limits count. A trusted
/// peer is also spared the listener's per-address budgets of unfinished and request
/// connections (a proxy sends whole request heads; its clients are counted by the
/// forwarded address instead).
///
/// ```
/// use sse_notify::server::TrustedProxies;
///
/// let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.7").unwrap();
/// assert!(trusted.contains("10.1.2.3".parse().unwrap()));
/// assert!(!trusted.contains("192.168.1.8".parse().unwrap()));
/// assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Comma-separated CIDR blocks (`10.0.0.0/8`, `fd00::/8`) or single addresses.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{entry:?}: expected a CIDR block such as 10.0.0.0/8 or an address"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies (an IPv4-mapped IPv6 address as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: `peer` itself unless it is a trusted proxy; then the last
    /// address in `X-Forwarded-For` (every such header, in order) that is not a trusted
    /// proxy, as each proxy appends the address it heard from. A header that cannot be
    /// read leaves the peer's address: never a client's own claim.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut hops = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return peer;
            };
            for hop in value.split(',') {
                match hop.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip),
                    Err(_) => return peer,
                }
            }
        }
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            client = hop;
            if !self.contains(hop) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> axum::http::HeaderMap {
        let mut map = axum::http::HeaderMap::new();
        for v in values {
            map.append("x-forwarded-for", v.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_peer_names_the_client_and_only_past_trusted_hops() {
        let trusted = TrustedProxies::parse("10.0.0.0/8,::1").unwrap();
        let proxy = ip("10.0.0.2");
        // A client's own claim, relayed by the proxy, is left of what the proxy appended.
        let forwarded = headers(&["6.6.6.6, 203.0.113.9"]);
        assert_eq!(trusted.client_ip(proxy, &forwarded), ip("203.0.113.9"));
        // Two proxies of ours: the first hop that is not one of them.
        let chain = headers(&["203.0.113.9", "10.1.1.1"]);
        assert_eq!(trusted.client_ip(proxy, &chain), ip("203.0.113.9"));
        // Anyone else's header is ignored.
        assert_eq!(
            trusted.client_ip(ip("198.51.100.1"), &forwarded),
            ip("198.51.100.1")
        );
        // Nothing, or nothing readable: the proxy's own address.
        assert_eq!(trusted.client_ip(proxy, &headers(&[])), proxy);
        assert_eq!(trusted.client_ip(proxy, &headers(&["203.0.113.9, junk"])), proxy);
        // IPv4-mapped peers count as IPv4; IPv6 proxies work the same way.
        let mapped = ip("::ffff:10.0.0.2");
        assert_eq!(trusted.client_ip(mapped, &forwarded), ip("203.0.113.9"));
        assert_eq!(
            trusted.client_ip(ip("::1"), &headers(&["2001:db8::7"])),
            ip("2001:db8::7")
        );
        // Off by default.
        let none = TrustedProxies::default();
        assert_eq!(none.client_ip(proxy, &forwarded), proxy);
    }
}
