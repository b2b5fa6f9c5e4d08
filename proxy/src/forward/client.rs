//! Who sent a request: the TCP peer, or, behind trusted proxies, the client they name.
//!
//! A proxy in front of the fleet (a cloud load balancer, a CDN, an ingress) is trusted
//! only when its address is inside one of the operator's `--trusted-proxy` networks.
//! From such a peer the proxy believes `X-Forwarded-For` with the usual right-to-left
//! rule: walking the chain from its right end, every address that is itself a trusted
//! proxy is skipped, and the first one that is not is the client. When every address is
//! trusted, the left-most one is the client. A chain the proxy cannot read (an entry
//! that is not an IP address, with or without a port) is not believed at all: the client
//! is then the peer, as it would be without the header. From any other peer every
//! client-sent forwarding header is dropped and the client is the peer.
//!
//! [`ClientInfo::client_ip`] is the one address everything downstream (access logs,
//! rate limits, conditional access locations) uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Who sent a request, as the proxy's listener saw it and its trusted proxies say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo {
    /// The IP address of the TCP peer.
    pub peer_ip: IpAddr,
    /// The client's IP address: the peer's, or, when the peer is a trusted proxy, the
    /// right-most `X-Forwarded-For` address that is not a trusted proxy. The address to
    /// log, rate-limit and locate.
    pub client_ip: IpAddr,
    /// True when the peer is a proxy the fleet trusts (a load balancer in front of it):
    /// only then are the client's forwarding headers kept and extended.
    pub via_trusted_proxy: bool,
    /// True when a trusted peer sent an `X-Forwarded-For` chain the proxy could read:
    /// the chain is extended by the peer. False otherwise (no chain, an unreadable one,
    /// or an untrusted peer): `X-Forwarded-For` is then the peer alone.
    pub extends_chain: bool,
}

impl ClientInfo {
    /// A client connected straight to the proxy (or through a proxy it does not trust):
    /// the peer is the client and its forwarding headers count for nothing.
    pub fn direct(peer_ip: IpAddr) -> Self {
        let peer_ip = peer_ip.to_canonical();
        Self {
            peer_ip,
            client_ip: peer_ip,
            via_trusted_proxy: false,
            extends_chain: false,
        }
    }
}

/// A `--trusted-proxy` value is not an IP network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "trusted proxy {value:?} is not an IP network: expected ADDRESS/PREFIX (10.0.0.0/8, fd00::/8) or a single address"
)]
pub struct NetworkError {
    /// The value as given.
    pub value: String,
}

/// An IPv4 or IPv6 network in CIDR notation. Host bits below the prefix are ignored
/// (`10.1.2.3/8` is `10.0.0.0/8`); a bare address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    /// The network's address with the host bits cleared.
    network: IpAddr,
    /// How many leading bits must match.
    prefix_len: u8,
}

impl IpNetwork {
    /// True when `ip` is inside this network. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.1`) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => mask_v4(ip, self.prefix_len) == network,
            (IpAddr::V6(network), IpAddr::V6(ip)) => mask_v6(ip, self.prefix_len) == network,
            _ => false,
        }
    }
}

impl FromStr for IpNetwork {
    type Err = NetworkError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = || NetworkError {
            value: value.to_owned(),
        };
        let text = value.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address = address.parse::<IpAddr>().map_err(|_| error())?;
        let max = match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix_len = match prefix {
            None => max,
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(error)?,
            Some(_) => return Err(error()),
        };
        let network = match address {
            IpAddr::V4(v4) => IpAddr::V4(mask_v4(v4, prefix_len)),
            IpAddr::V6(v6) => IpAddr::V6(mask_v6(v6, prefix_len)),
        };
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

impl std::fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

fn mask_v4(ip: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn mask_v6(ip: Ipv6Addr, prefix_len: u8) -> Ipv6Addr {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

/// The networks whose addresses are proxies the fleet trusts to tell the client's
/// address. Empty by default: nobody is trusted. Cheap to clone (shared).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Arc<[IpNetwork]>,
}

impl TrustedProxies {
    /// Trusts the peers inside `networks`.
    pub fn new(networks: impl IntoIterator<Item = IpNetwork>) -> Self {
        Self {
            networks: networks.into_iter().collect(),
        }
    }

    /// Parses each of `values` as an [`IpNetwork`]; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, NetworkError> {
        values
            .iter()
            .map(|value| value.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// True when no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// The trusted networks.
    pub fn networks(&self) -> &[IpNetwork] {
        &self.networks
    }

    /// True when `ip` is inside a trusted network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|network| network.contains(ip))
    }

    /// Who sent a request that arrived from `peer_ip` with `headers`: see the module
    /// documentation. Never fails: what cannot be believed falls back to the peer.
    pub fn client_info(&self, peer_ip: IpAddr, headers: &HeaderMap) -> ClientInfo {
        let direct = ClientInfo::direct(peer_ip);
        if !self.contains(direct.peer_ip) {
            return direct;
        }
        let (client_ip, extends_chain) = match self.forwarded_client(headers) {
            Chain::Client(ip) => (ip, true),
            Chain::Absent | Chain::Unreadable => (direct.peer_ip, false),
        };
        ClientInfo {
            client_ip,
            via_trusted_proxy: true,
            extends_chain,
            ..direct
        }
    }

    /// The client an `X-Forwarded-For` chain names: the right-most address that is not
    /// a trusted proxy, else the left-most.
    fn forwarded_client(&self, headers: &HeaderMap) -> Chain {
        let mut left_most = None;
        // Several header lines form one list, in order (RFC 9110 section 5.3).
        for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(text) = value.to_str() else {
                return Chain::Unreadable;
            };
            // Empty list elements are allowed and ignored (RFC 9110 section 5.6.1).
            for entry in text.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
                let Some(ip) = parse_forwarded_address(entry) else {
                    return Chain::Unreadable;
                };
                if !self.contains(ip) {
                    return Chain::Client(ip);
                }
                left_most = Some(ip);
            }
        }
        left_most.map_or(Chain::Absent, Chain::Client)
    }
}

/// What an `X-Forwarded-For` chain from a trusted peer says.
enum Chain {
    /// No address at all.
    Absent,
    /// An entry is not an address.
    Unreadable,
    /// The client's address.
    Client(IpAddr),
}

/// An `X-Forwarded-For` entry: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`. IPv4-mapped IPv6 addresses become IPv4.
fn parse_forwarded_address(entry: &str) -> Option<IpAddr> {
    let address = if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || is_port(after.strip_prefix(':')?)) {
            return None;
        }
        IpAddr::V6(inside.parse().ok()?)
    } else if let Ok(ip) = entry.parse::<IpAddr>() {
        ip
    } else {
        // IPv4 with a port; a bare IPv6 address has parsed above.
        let (host, port) = entry.rsplit_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(host.parse().ok()?)
    };
    Some(address.to_canonical())
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn trusted(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(networks).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                "x-forwarded-for",
                HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        headers
    }

    #[test]
    fn networks_parse_in_cidr_notation_and_match_their_addresses() {
        let net: IpNetwork = "10.1.2.3/8".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains(ip("10.255.0.1")));
        assert!(net.contains(ip("::ffff:10.0.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::a00:1")));

        let one: IpNetwork = "192.0.2.7".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains(ip("192.0.2.7")));
        assert!(!one.contains(ip("192.0.2.8")));

        let v6: IpNetwork = "2001:db8::/32".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));

        let all: IpNetwork = "0.0.0.0/0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(all.contains(ip("203.0.113.1")));
        let all6: IpNetwork = "::/0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(all6.contains(ip("2001:db8::1")));

        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "lb",
            "10.0.0.0/8/8",
            "fe80::1%eth0/64",
        ] {
            let error = bad.parse::<IpNetwork>().err();
            assert!(
                error
                    .as_ref()
                    .is_some_and(|e| e.to_string().contains("trusted proxy")),
                "{bad:?}: {error:?}"
            );
        }
    }

    #[test]
    fn an_untrusted_peers_forwarding_is_ignored() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let spoofed = xff(&["198.51.100.1"]);
        let client = proxies.client_info(ip("203.0.113.9"), &spoofed);
        assert_eq!(client, ClientInfo::direct(ip("203.0.113.9")));
        assert_eq!(client.client_ip, ip("203.0.113.9"));
        assert!(!client.via_trusted_proxy);

        // Nobody is trusted by default.
        let none = TrustedProxies::default();
        assert!(none.is_empty());
        let client = none.client_info(ip("10.0.0.1"), &spoofed);
        assert_eq!(client.client_ip, ip("10.0.0.1"));
        assert!(!client.via_trusted_proxy);
    }

    #[test]
    fn a_trusted_peers_chain_names_the_right_most_untrusted_address() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.0/24"]);
        // A client that forged a left part of the chain: the right-most untrusted
        // address is the one the trusted proxies saw.
        let headers = xff(&["6.6.6.6, 203.0.113.9", "10.1.1.1, 192.0.2.5"]);
        let client = proxies.client_info(ip("10.0.0.2"), &headers);
        assert_eq!(client.client_ip, ip("203.0.113.9"));
        assert_eq!(client.peer_ip, ip("10.0.0.2"));
        assert!(client.via_trusted_proxy);
        assert!(client.extends_chain);

        // Ports and brackets, as some load balancers write them.
        let headers = xff(&["203.0.113.9:51234, [10::1]:443"]);
        let client = trusted(&["10.0.0.0/8", "10::/16"]).client_info(ip("10.0.0.2"), &headers);
        assert_eq!(client.client_ip, ip("203.0.113.9"));

        // A trusted peer without the header: the peer is the client.
        let client = proxies.client_info(ip("10.0.0.2"), &HeaderMap::new());
        assert_eq!(client.client_ip, ip("10.0.0.2"));
        assert!(client.via_trusted_proxy);
        assert!(!client.extends_chain);
        let client = proxies.client_info(ip("10.0.0.2"), &xff(&[" , "]));
        assert_eq!(client.client_ip, ip("10.0.0.2"));
        assert!(!client.extends_chain);
    }

    #[test]
    fn an_all_trusted_chain_names_its_left_most_address() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let headers = xff(&["10.9.9.9, 10.1.1.1", "10.2.2.2"]);
        let client = proxies.client_info(ip("10.0.0.2"), &headers);
        assert_eq!(client.client_ip, ip("10.9.9.9"));
        assert!(client.extends_chain);
    }

    #[test]
    fn ipv6_peers_and_chains() {
        let proxies = trusted(&["fd00::/8"]);
        let headers = xff(&["2001:db8::7, fd00::3"]);
        let client = proxies.client_info(ip("fd00::1"), &headers);
        assert_eq!(client.client_ip, ip("2001:db8::7"));
        assert!(client.via_trusted_proxy);

        // An IPv4 peer on a dual-stack socket is matched as IPv4, and mapped entries too.
        let proxies = trusted(&["10.0.0.0/8"]);
        let headers = xff(&["[::ffff:203.0.113.9]:80"]);
        let client = proxies.client_info(ip("::ffff:10.0.0.2"), &headers);
        assert_eq!(client.peer_ip, ip("10.0.0.2"));
        assert_eq!(client.client_ip, ip("203.0.113.9"));
    }

    #[test]
    fn an_unreadable_chain_falls_back_to_the_peer() {
        let proxies = trusted(&["10.0.0.0/8"]);
        for garbage in [
            "unknown",
            "203.0.113.9, evil",
            "203.0.113.9:http",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "1.2.3",
            "203.0.113.9:99999999",
            "fe80::1%eth0",
            "<script>",
        ] {
            let client = proxies.client_info(ip("10.0.0.2"), &xff(&[garbage]));
            assert_eq!(client.client_ip, ip("10.0.0.2"), "{garbage}");
            assert!(client.via_trusted_proxy, "{garbage}");
            assert!(!client.extends_chain, "{garbage}");
        }
        // Garbage left of the client is the client's own business.
        let client = proxies.client_info(ip("10.0.0.2"), &xff(&["junk, 203.0.113.9"]));
        assert_eq!(client.client_ip, ip("203.0.113.9"));
        // Bytes that are not UTF-8.
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.9\xff").unwrap_or_else(|e| panic!("{e}")),
        );
        let client = proxies.client_info(ip("10.0.0.2"), &headers);
        assert_eq!(client.client_ip, ip("10.0.0.2"));
    }
}
