//! What the comparison measures: the backend straight, each peer in front of it, and
//! Sallyport (passthrough, and with authentication and policy), each as an [`Endpoint`]
//! that oha and the benchmark's own client can load, with the processes whose CPU time and
//! memory belong to it.

use std::net::SocketAddr;
use std::path::Path;

use serde::Serialize;

use crate::dataplane::DataplaneError;
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{self, Fleet};
use crate::peers::{PeerKind, RunningPeer};

/// One way to reach the backend.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// Plain HTTP straight to the backend: the limit.
    Direct,
    /// nginx as one reverse-proxy hop, plain HTTP on both sides.
    Nginx,
    /// nginx terminating user TLS, plain HTTP to the backend.
    NginxTls,
    /// rathole, a TCP tunnel, plain TCP on the tunnel hop; plain HTTP user side.
    RatholeTcp,
    /// rathole with TLS on the tunnel hop; plain HTTP user side.
    RatholeTls,
    /// frp, a TCP tunnel with TLS on the tunnel hop (its default); plain HTTP user side.
    Frp,
    /// Sallyport: user TLS, the reverse HTTP/2 tunnel over mTLS, a passthrough app.
    Sallyport,
    /// Sallyport with OpenID Connect pre-authentication (a signed-in session) and
    /// conditional access on.
    SallyportAuth,
}

impl TargetKind {
    /// Every target, in the order of each round.
    pub const ALL: [TargetKind; 8] = [
        TargetKind::Direct,
        TargetKind::Nginx,
        TargetKind::NginxTls,
        TargetKind::RatholeTcp,
        TargetKind::RatholeTls,
        TargetKind::Frp,
        TargetKind::Sallyport,
        TargetKind::SallyportAuth,
    ];

    /// The name in tables, plots and the JSON line.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nginx => "nginx",
            Self::NginxTls => "nginx-tls",
            Self::RatholeTcp => "rathole-tcp",
            Self::RatholeTls => "rathole-tls",
            Self::Frp => "frp",
            Self::Sallyport => "sallyport",
            Self::SallyportAuth => "sallyport-auth",
        }
    }

    /// Whether users speak TLS to it.
    pub fn user_tls(self) -> bool {
        matches!(self, Self::NginxTls | Self::Sallyport | Self::SallyportAuth)
    }

    /// The peer it is, if it is one.
    pub fn peer(self) -> Option<PeerKind> {
        match self {
            Self::Nginx => Some(PeerKind::Nginx),
            Self::NginxTls => Some(PeerKind::NginxTls),
            Self::RatholeTcp => Some(PeerKind::RatholeTcp),
            Self::RatholeTls => Some(PeerKind::RatholeTls),
            Self::Frp => Some(PeerKind::Frp),
            Self::Direct | Self::Sallyport | Self::SallyportAuth => None,
        }
    }

    /// Whether it is Sallyport's.
    pub fn ours(self) -> bool {
        matches!(self, Self::Sallyport | Self::SallyportAuth)
    }
}

/// A target, ready to load.
#[derive(Clone)]
pub struct Endpoint {
    /// Which.
    pub kind: TargetKind,
    /// The URL oha requests.
    pub url: String,
    /// oha's further arguments (trust, address, cookie).
    pub oha_args: Vec<String>,
    /// The benchmark's own client (S3).
    pub client: Target,
    /// The processes of the hop (not the backend): name and pid.
    pub processes: Vec<(String, u32)>,
}

impl Endpoint {
    /// Straight to the backend.
    pub fn direct(backend: SocketAddr) -> Self {
        Self {
            kind: TargetKind::Direct,
            url: format!("http://{backend}/"),
            oha_args: Vec::new(),
            client: Target::Direct { address: backend },
            processes: Vec::new(),
        }
    }

    /// Through Sallyport's proxy and connector: the passthrough app, or the authenticated
    /// one with its session cookie.
    pub fn sallyport(fleet: &Fleet, authenticated: bool) -> Result<Self, DataplaneError> {
        let port = fleet.proxy_address.port();
        let processes = vec![
            ("proxy".to_owned(), fleet.proxy.pid()),
            ("connector".to_owned(), fleet.connector.pid()),
        ];
        if !authenticated {
            return Ok(Self {
                kind: TargetKind::Sallyport,
                url: format!("https://{}:{port}/", fleet::APP_HOST),
                oha_args: tls_args(&fleet.app_ca_file, fleet::APP_HOST, fleet.proxy_address),
                client: fleet.via_proxy.clone(),
                processes,
            });
        }
        let app = fleet
            .authenticated
            .as_ref()
            .ok_or_else(|| DataplaneError::Client {
                what: "the authenticated target".to_owned(),
                message: "the fleet was started without the authenticated app".to_owned(),
            })?;
        let host = crate::dataplane::authenticated::APP_HOST;
        let mut oha_args = tls_args(&app.ca_file, host, fleet.proxy_address);
        oha_args.extend(["-H".to_owned(), format!("Cookie: {}", app.cookie)]);
        Ok(Self {
            kind: TargetKind::SallyportAuth,
            url: format!("https://{host}:{port}/"),
            oha_args,
            client: app.via_proxy.clone(),
            processes,
        })
    }

    /// Through a running peer (HTTPS to [`crate::peers::USER_HOST`] trusting only its
    /// certificate, for a peer with user TLS).
    pub fn peer(kind: TargetKind, peer: &RunningPeer) -> Result<Self, DataplaneError> {
        let processes = peer
            .pids()
            .into_iter()
            .map(|(name, pid)| (name.to_owned(), pid))
            .collect();
        let address = peer.address;
        match (&peer.ca_pem, &peer.ca_file) {
            (Some(ca_pem), Some(ca_file)) if kind.user_tls() => {
                let host = crate::peers::USER_HOST;
                Ok(Self {
                    kind,
                    url: format!("https://{host}:{}/", address.port()),
                    oha_args: tls_args(ca_file, host, address),
                    client: Target::proxy(address, host, address.port(), ca_pem.as_bytes())?,
                    processes,
                })
            }
            _ => Ok(Self {
                kind,
                url: format!("http://{address}/"),
                oha_args: Vec::new(),
                client: Target::Direct { address },
                processes,
            }),
        }
    }

    /// The hop's pids, in the order of [`Endpoint::processes`].
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|(_, pid)| *pid).collect()
    }
}

/// oha's arguments for HTTPS to `host` served at `address`, trusting only `ca_file`.
fn tls_args(ca_file: &Path, host: &str, address: SocketAddr) -> Vec<String> {
    let port = address.port();
    vec![
        "--cacert".to_owned(),
        ca_file.display().to_string(),
        "--connect-to".to_owned(),
        format!("{host}:{port}:{}:{port}", address.ip()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_only_tls_targets_say_so() {
        let mut labels: Vec<_> = TargetKind::ALL.iter().map(|k| k.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), TargetKind::ALL.len());
        let tls: Vec<_> = TargetKind::ALL
            .iter()
            .filter(|k| k.user_tls())
            .map(|k| k.label())
            .collect();
        assert_eq!(tls, ["nginx-tls", "sallyport", "sallyport-auth"]);
        assert!(
            TargetKind::ALL
                .iter()
                .all(|k| k.peer().is_some() != (k.ours() || *k == TargetKind::Direct))
        );
    }

    #[test]
    fn tls_arguments_point_oha_at_the_address_for_the_host() {
        let args = tls_args(
            Path::new("/tmp/ca.crt"),
            "app.bench.test",
            SocketAddr::from(([127, 0, 0, 1], 8443)),
        );
        assert_eq!(
            args,
            [
                "--cacert",
                "/tmp/ca.crt",
                "--connect-to",
                "app.bench.test:8443:127.0.0.1:8443"
            ]
        );
    }
}
