//! An app's external URL taken apart: the host (possibly a wildcard), port and path prefix
//! that route requests to it, and the certificate names that cover it.

/// Why an external URL cannot be routed. Admission rejects these already; the operator
/// checks again because it must never trust its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("externalUrl {url:?} {reason}")]
pub struct ExternalUrlError {
    /// The URL as written.
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The routing key of a published app: where on the fleet's listeners it lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalUrl {
    /// Lower-case host; a wildcard host starts with `*.`.
    pub host: String,
    /// The TCP port users connect to (443 unless the URL names another).
    pub port: u16,
    /// The path prefix, always starting and ending with `/`.
    pub path_prefix: String,
}

impl ExternalUrl {
    /// Parses `https://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Result<Self, ExternalUrlError> {
        let error = |reason| ExternalUrlError {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| error("must start with https://"))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        if path.contains(['?', '#']) {
            return Err(error("must not hold a query or a fragment"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse().map_err(|_| error("has an invalid port"))?,
            ),
            None => (authority, 443),
        };
        let host = host.to_ascii_lowercase();
        let labels: Vec<&str> = host.split('.').collect();
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        let (first, others) = labels.split_first().ok_or_else(|| error("has no host"))?;
        if others.is_empty()
            || !others.iter().all(|l| valid_label(l))
            || !(*first == "*" || valid_label(first))
        {
            return Err(error(
                "must have a DNS host of two or more labels, a wildcard only as the whole left-most label",
            ));
        }
        let mut path_prefix = path.to_owned();
        if !path_prefix.ends_with('/') {
            path_prefix.push('/');
        }
        Ok(Self {
            host,
            port,
            path_prefix,
        })
    }

    /// True for `*.example.com` hosts.
    pub fn is_wildcard(&self) -> bool {
        self.host.starts_with("*.")
    }

    /// The URL in canonical form (`https://host[:port]/prefix/`), as written to status.
    pub fn canonical(&self) -> String {
        match self.port {
            443 => format!("https://{}{}", self.host, self.path_prefix),
            port => format!("https://{}:{port}{}", self.host, self.path_prefix),
        }
    }

    /// Whether a certificate with these DNS names is valid for this app's host. A
    /// certificate wildcard covers exactly one left-most label; a wildcard app needs the
    /// same wildcard in its certificate.
    pub fn is_covered_by(&self, dns_names: &[String]) -> bool {
        dns_names.iter().any(|name| {
            let name = name.to_ascii_lowercase();
            if name == self.host {
                return true;
            }
            match (name.strip_prefix("*."), self.host.split_once('.')) {
                (Some(suffix), Some((first, rest))) => first != "*" && rest == suffix,
                _ => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> ExternalUrl {
        ExternalUrl::parse(url).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_host_port_and_path_prefix() {
        let url = parse("https://Wiki.Apps.example.com/");
        assert_eq!(
            (url.host.as_str(), url.port, url.path_prefix.as_str()),
            ("wiki.apps.example.com", 443, "/")
        );
        let url = parse("https://apps.example.com:8443/status");
        assert_eq!(
            (url.host.as_str(), url.port, url.path_prefix.as_str()),
            ("apps.example.com", 8443, "/status/")
        );
        assert_eq!(url.canonical(), "https://apps.example.com:8443/status/");
        assert_eq!(
            parse("https://apps.example.com").canonical(),
            "https://apps.example.com/"
        );
    }

    #[test]
    fn the_same_prefix_with_or_without_a_trailing_slash_is_one_route() {
        assert_eq!(
            parse("https://apps.example.com/status"),
            parse("https://apps.example.com/status/")
        );
    }

    #[test]
    fn refuses_what_admission_refuses() {
        for url in [
            "http://wiki.example.com/",
            "https://wiki/",
            "https://wiki.*.example.com/",
            "https://w*.example.com/",
            "https://wiki.example.com/?q=1",
            "https://wiki.example.com:http/",
            "https://-wiki.example.com/",
        ] {
            assert!(ExternalUrl::parse(url).is_err(), "{url} must be refused");
        }
    }

    #[test]
    fn certificate_names_cover_hosts_like_browsers_do() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let wiki = parse("https://wiki.apps.example.com/");
        assert!(wiki.is_covered_by(&names(&["wiki.apps.example.com"])));
        assert!(wiki.is_covered_by(&names(&["*.apps.example.com"])));
        assert!(!wiki.is_covered_by(&names(&["*.example.com"])));
        assert!(!wiki.is_covered_by(&names(&["apps.example.com"])));
        let wildcard = parse("https://*.apps.example.com/");
        assert!(wildcard.is_wildcard());
        assert!(wildcard.is_covered_by(&names(&["*.apps.example.com"])));
        assert!(!wildcard.is_covered_by(&names(&["wiki.apps.example.com"])));
    }
}
