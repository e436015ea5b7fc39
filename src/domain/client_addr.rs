//! The client's address: the TCP peer, or, only when the peer is a proxy the
//! operator declared (`trusted_proxies`), the address that proxy forwarded.
//!
//! A forwarding header from anyone else is ignored: it is text the caller
//! chose, and believing it would let a caller pick the address its failures
//! are counted under (someone else's, to lock them out) or escape its own
//! lockout. Behind trusted proxies the client is the right-most address of
//! `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends
//! the address it received the request from, so entries further left were
//! written by the client and are not believed), or, without that header, the
//! same walk over `Forwarded`'s `for=` parameters (RFC 7239).

use std::net::IpAddr;
use std::str::FromStr;

/// The client's address as [`TrustedProxies::client_addr`] found it, put in
/// each request's extensions by the edge when any proxy is trusted (otherwise
/// it is the peer's, `ConnectInfo`): what lockouts, rate limits and audit
/// records count and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// One CIDR block, e.g. `10.0.0.0/8` or `2001:db8::/32` (a bare address is a
/// block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `addr` is in the block (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, canonical(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR block"))?;
        let network = canonical(network);
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The proxies whose forwarding headers are believed. Empty by default: no
/// header is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses a comma-separated list of CIDR blocks (empty: none).
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Cidr::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(addr))
    }

    /// The client's address for a request from `peer` carrying these
    /// `X-Forwarded-For` and `Forwarded` header values.
    pub fn client_addr<'a>(
        &self,
        peer: IpAddr,
        x_forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
        forwarded: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut xff = x_forwarded_for.peekable();
        if xff.peek().is_some() {
            let hops = xff.rev().flat_map(|v| split_rev(v, b',')).map(parse_hop);
            return self.walk(peer, hops);
        }
        let hops = forwarded
            .rev()
            .flat_map(|v| split_rev(v, b','))
            .filter_map(|element| {
                // `for=...` among `;`-separated pairs; an element without one
                // says nothing about the client and is skipped.
                split_rev(element, b';').find_map(|pair| {
                    let pair = std::str::from_utf8(pair).ok()?.trim();
                    let (name, value) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_hop(value.trim().as_bytes()))
                })
            });
        self.walk(peer, hops)
    }

    /// Walks hops from the right: the first one that is not a trusted proxy
    /// is the client. A hop that is not an address (garbage, `unknown`, an
    /// obfuscated name) stops the walk at the last trusted hop: what is left
    /// of it cannot be believed.
    fn walk(&self, peer: IpAddr, hops: impl Iterator<Item = Option<IpAddr>>) -> IpAddr {
        let mut last = peer;
        for hop in hops {
            match hop {
                Some(addr) if self.trusts(addr) => last = addr,
                Some(addr) => return canonical(addr),
                None => return last,
            }
        }
        last
    }
}

/// The parts of `value` between `sep`, right to left.
fn split_rev(value: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    value.rsplit(move |b| *b == sep)
}

/// One hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`, any
/// of them in double quotes.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim().trim_matches('"');
    if let Ok(addr) = hop.parse::<IpAddr>() {
        return Some(addr);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(proxies: &str, peer: &str, xff: &[&str], fwd: &[&str]) -> IpAddr {
        let t = TrustedProxies::parse(proxies).unwrap();
        t.client_addr(
            ip(peer),
            xff.iter().map(|s| s.as_bytes()),
            fwd.iter().map(|s| s.as_bytes()),
        )
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        assert_eq!(client("", "1.2.3.4", &["9.9.9.9"], &[]), ip("1.2.3.4"));
        assert_eq!(
            client("10.0.0.0/8", "1.2.3.4", &["9.9.9.9"], &["for=9.9.9.9"]),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let p = "10.0.0.0/8, 192.168.1.1";
        // The client prepended a lie; the proxies appended the truth.
        assert_eq!(
            client(p, "10.0.0.5", &["6.6.6.6, 7.7.7.7", "192.168.1.1"], &[]),
            ip("7.7.7.7")
        );
        assert_eq!(client(p, "10.0.0.5", &["10.1.1.1"], &[]), ip("10.1.1.1"));
        assert_eq!(
            client(p, "10.0.0.5", &["garbage, 10.1.1.1"], &[]),
            ip("10.1.1.1")
        );
        assert_eq!(client(p, "10.0.0.5", &[], &[]), ip("10.0.0.5"));
        assert_eq!(
            client(
                p,
                "10.0.0.5",
                &[],
                &[r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https, for=10.2.2.2:80"#]
            ),
            ip("2001:db8::7")
        );
        assert_eq!(client(p, "10.0.0.5", &[], &["for=unknown"]), ip("10.0.0.5"));
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")) && !c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.0.0.1")));
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(ip("2001:db8:ffff::1")) && !c.contains(ip("2001:db9::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(TrustedProxies::parse("").unwrap().is_empty());
    }
}
