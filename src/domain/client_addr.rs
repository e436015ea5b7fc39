//! The client's address: the TCP peer, or, only when the peer is a proxy the
//! operator declared (`trusted_proxies`), the address that proxy forwarded.
//!
//! A forwarding header from anyone else is ignored: it is text the caller
//! chose, and believing it would let a caller pick the address its failures
//! are counted under (someone else's, to lock them out) or escape its own
//! lockout. Behind trusted proxies the client is the right-most address of
//! the one header the operator names (`trusted_proxy_header`:
//! `X-Forwarded-For` by default, or `Forwarded`'s `for=` parameters, RFC 7239)
//! that is not itself a trusted proxy: each proxy appends the address it
//! received the request from, so entries further left were written by the
//! client and are not believed. Only one header is read, never "whichever is
//! present": a proxy that writes one passes the other through from the
//! client untouched, and reading that would let the client choose.

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

/// Which header the trusted proxies write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ForwardedHeader {
    /// Parses `x-forwarded-for` or `forwarded` (any case).
    pub fn parse(v: &str) -> Result<ForwardedHeader, String> {
        match v.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            _ => Err("must be `x-forwarded-for` or `forwarded`".into()),
        }
    }

    /// The header's name, lower case.
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

/// The proxies whose forwarding header is believed, and which header that
/// is. No proxy by default: no header is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    blocks: Vec<Cidr>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Parses a comma-separated list of CIDR blocks (empty: none), whose
    /// proxies write `header`.
    pub fn parse(list: &str, header: ForwardedHeader) -> Result<TrustedProxies, String> {
        let blocks = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Cidr::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { blocks, header })
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The header the proxies write, the only one read.
    pub fn header(&self) -> ForwardedHeader {
        self.header
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.blocks.iter().any(|c| c.contains(addr))
    }

    /// The client's address for a request from `peer` carrying these values
    /// of [`Self::header`].
    pub fn client_addr<'a>(
        &self,
        peer: IpAddr,
        values: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> IpAddr {
        if self.blocks.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let elements = values.rev().flat_map(|v| split_rev(v, b','));
        match self.header {
            ForwardedHeader::XForwardedFor => self.walk(peer, elements.map(parse_hop)),
            ForwardedHeader::Forwarded => {
                let hops = elements.filter_map(|element| {
                    // `for=...` among `;`-separated pairs; an element without
                    // one says nothing about the client and is skipped.
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
        }
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
        let (header, values) = if fwd.is_empty() {
            (ForwardedHeader::XForwardedFor, xff)
        } else {
            (ForwardedHeader::Forwarded, fwd)
        };
        let t = TrustedProxies::parse(proxies, header).unwrap();
        t.client_addr(ip(peer), values.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        assert_eq!(client("", "1.2.3.4", &["9.9.9.9"], &[]), ip("1.2.3.4"));
        assert_eq!(
            client("10.0.0.0/8", "1.2.3.4", &["9.9.9.9"], &[]),
            ip("1.2.3.4")
        );
        assert_eq!(
            client("10.0.0.0/8", "1.2.3.4", &[], &["for=9.9.9.9"]),
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
    fn only_the_declared_header_is_read() {
        // Proxies that write X-Forwarded-For pass a client's Forwarded
        // through untouched, and the other way round: it is never read.
        let xff = TrustedProxies::parse("10.0.0.0/8", ForwardedHeader::XForwardedFor).unwrap();
        assert_eq!(xff.header().name(), "x-forwarded-for");
        let fwd = TrustedProxies::parse("10.0.0.0/8", ForwardedHeader::Forwarded).unwrap();
        assert_eq!(fwd.header().name(), "forwarded");
        assert_eq!(
            fwd.client_addr(ip("10.0.0.5"), [b"6.6.6.6".as_slice()].into_iter()),
            ip("10.0.0.5"),
            "an X-Forwarded-For value is not a Forwarded element"
        );
        assert!(ForwardedHeader::parse("X-Real-IP").is_err());
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
        assert!(TrustedProxies::parse("", ForwardedHeader::default())
            .unwrap()
            .is_empty());
    }
}
