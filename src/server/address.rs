//! Client addresses as per-address budgets and rate limits count them (a leaf: it uses
//! nothing of the server).

/// The key of per-address budgets and rate limits: the address, or its /64 for IPv6 (one
/// subscriber usually holds a whole /64); IPv4-mapped IPv6 addresses count as IPv4.
pub(crate) fn address_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
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
