//! Anonymizing networks: a list of CIDRs, one per line.

use std::net::IpAddr;

use ipnet::IpNet;

/// A line of an anonymizer list is not a CIDR or an address.
#[derive(Debug, thiserror::Error)]
#[error("{source_name} line {line}: {text:?} is neither a CIDR (203.0.113.0/24) nor an IP address")]
pub struct AnonymizerError {
    /// Where the list came from (a file, a ConfigMap key).
    pub source_name: String,
    /// The 1-based line number.
    pub line: usize,
    /// The line's text.
    pub text: String,
}

/// The networks sign-ins are anonymized from (Tor exit nodes, VPN and proxy egress).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anonymizers {
    networks: Vec<IpNet>,
}

impl Anonymizers {
    /// Parses `text` read from `source_name`: one CIDR or bare address per line; blank
    /// lines and everything after `#` are ignored. Every bad line is reported, the first
    /// one as the error.
    pub fn parse(source_name: &str, text: &str) -> Result<Self, AnonymizerError> {
        let mut networks = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let entry = raw.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let network = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| AnonymizerError {
                    source_name: source_name.to_owned(),
                    line: index + 1,
                    text: entry.to_owned(),
                })?;
            networks.push(network.trunc());
        }
        networks.sort();
        networks.dedup();
        Ok(Self { networks })
    }

    /// The networks from a list of CIDRs (already parsed).
    pub fn from_networks(networks: impl IntoIterator<Item = IpNet>) -> Self {
        let mut networks: Vec<IpNet> = networks.into_iter().map(|n| n.trunc()).collect();
        networks.sort();
        networks.dedup();
        Self { networks }
    }

    /// How many networks are listed.
    pub fn len(&self) -> usize {
        self.networks.len()
    }

    /// Whether none is listed.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// The listed network `ip` is in, if any. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn matching(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = ip.to_canonical();
        self.networks.iter().copied().find(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn lists_parse_with_comments_and_bare_addresses() {
        let list = Anonymizers::parse(
            "test",
            "# Tor exits\n203.0.113.0/24\n\n198.51.100.7  # one host\n2001:db8:dead::/48\n203.0.113.9/24\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(list.len(), 3, "{list:?}");
        assert!(list.matching(ip("203.0.113.200")).is_some());
        assert!(list.matching(ip("198.51.100.7")).is_some());
        assert!(list.matching(ip("198.51.100.8")).is_none());
        assert!(list.matching(ip("2001:db8:dead::1")).is_some());
        assert!(
            list.matching(ip("::ffff:203.0.113.1")).is_some(),
            "an IPv4-mapped address counts as IPv4"
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let error = Anonymizers::parse("ConfigMap x/y key cidrs", "10.0.0.0/8\nnot-an-ip\n")
            .err()
            .unwrap_or_else(|| panic!("a bad line must fail"));
        assert_eq!(error.line, 2);
        assert!(error.to_string().contains("ConfigMap x/y key cidrs line 2"));
    }
}
