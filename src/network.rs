//! IP allow-lists (SPEC §8), as plain functions: CIDR blocks, the client address a proxy header
//! names, and whether a list allows an address. IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`)
//! are IPv4 here, on both sides, so a dual-stack socket's addresses match IPv4 blocks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A network: its address (host bits cleared) and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// IPv4-mapped IPv6 addresses as IPv4; everything else as it is.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn mask(width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let all = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    let host = (1u128 << (width - prefix)) - 1;
    all & !host
}

fn from_bits(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

impl Cidr {
    /// `address/prefix` or a bare address (a single host), as PostgreSQL's cidr and inet print
    /// them. Host bits past the prefix are cleared (PostgreSQL's cidr refuses them earlier).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("\"{text}\" is not an IP network"))?;
        let (_, width) = bits(ip);
        let prefix = match prefix {
            None => width,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("\"{text}\" has a bad prefix length"))?,
        };
        // ::ffff:a.b.c.d/n (n ≥ 96) is the IPv4 network a.b.c.d/(n - 96).
        let (ip, prefix) = match (ip, normalize(ip)) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if prefix >= 96 => (v4, prefix - 96),
            _ => (ip, prefix),
        };
        let (value, width) = bits(ip);
        Ok(Cidr {
            network: from_bits(value & mask(width, prefix), width == 32),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (value, width) = bits(normalize(ip));
        let (network, network_width) = bits(self.network);
        width == network_width && value & mask(width, self.prefix) == network
    }
}

/// An address as PostgreSQL's inet prints it (`1.2.3.4`, `1.2.3.4/24`: the host is taken).
pub fn parse_inet(text: &str) -> Option<IpAddr> {
    let address = text.split_once('/').map_or(text, |(a, _)| a);
    address.trim().parse().ok().map(normalize)
}

/// The first address of a proxy header such as `X-Forwarded-For: client, proxy1, proxy2`, with
/// a port ignored (`1.2.3.4:5678`, `[::1]:443`). None when it is not an address.
pub fn first_address(header: &str) -> Option<IpAddr> {
    let first = header.split(',').next()?.trim();
    let host = if let Some(rest) = first.strip_prefix('[') {
        // [v6] or [v6]:port
        let (host, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        host
    } else if first.matches(':').count() == 1 {
        // v4:port (a bare IPv6 address has at least two colons)
        let (host, port) = first.split_once(':')?;
        if !is_port(port) {
            return None;
        }
        host
    } else {
        first
    };
    host.parse().ok().map(normalize)
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Whether an allow-list lets `client` in: no list allows everyone; a list allows only an
/// address given and inside one of its networks.
pub fn allows(list: Option<&[Cidr]>, client: Option<IpAddr>) -> bool {
    match list {
        None => true,
        Some(list) => client.is_some_and(|ip| list.iter().any(|c| c.contains(ip))),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn cidr(text: &str) -> Cidr {
        Cidr::parse(text).unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_of_both_families() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!cidr("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(!cidr("::/0").contains(ip("1.2.3.4")));
        assert!(cidr("::1/128").contains(ip("::1")));
        // Host bits past the prefix are ignored, as a network has none.
        assert!(cidr("10.1.2.3/8").contains(ip("10.9.9.9")));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_on_both_sides() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("::ffff:10.1.2.3")));
        assert_eq!(parse_inet("::ffff:1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(first_address("::ffff:1.2.3.4"), Some(ip("1.2.3.4")));
    }

    #[test]
    fn bad_networks_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/-1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_address_of_a_proxy_header() {
        assert_eq!(first_address("1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(first_address(" 1.2.3.4 , 10.0.0.1"), Some(ip("1.2.3.4")));
        assert_eq!(first_address("1.2.3.4:5678, 10.0.0.1"), Some(ip("1.2.3.4")));
        assert_eq!(
            first_address("2001:db8::1, 1.2.3.4"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(first_address("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(first_address("[::1]"), Some(ip("::1")));
        for malformed in [
            "",
            " , 1.2.3.4",
            "unknown",
            "1.2.3.4:",
            "1.2.3.4:http",
            "1.2.3.4:123456",
            "[::1",
            "[::1]x",
            "1.2.3",
            "300.1.1.1",
            "for=1.2.3.4",
            "fe80::1%eth0",
        ] {
            assert_eq!(first_address(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn a_list_allows_only_addresses_inside_it_and_no_list_allows_all() {
        let list = [cidr("10.0.0.0/8"), cidr("2001:db8::/32")];
        assert!(allows(None, None));
        assert!(allows(None, Some(ip("1.2.3.4"))));
        assert!(allows(Some(&list), Some(ip("10.0.0.1"))));
        assert!(allows(Some(&list), Some(ip("2001:db8::5"))));
        assert!(!allows(Some(&list), Some(ip("192.168.0.1"))));
        assert!(!allows(Some(&list), None));
        assert!(!allows(Some(&[]), Some(ip("10.0.0.1"))));
    }

    #[test]
    fn inet_text_gives_its_host() {
        assert_eq!(parse_inet("1.2.3.4/24"), Some(ip("1.2.3.4")));
        assert_eq!(parse_inet("::1"), Some(ip("::1")));
        assert_eq!(parse_inet("nope"), None);
    }
}
