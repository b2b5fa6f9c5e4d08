//! The three images Sallyport ships and what every one of them shares.
//!
//! `images/Dockerfile` states the same facts for people with a container engine; the
//! tests in `image/tests/dockerfile.rs` fail when the two disagree.

use clap::ValueEnum;

/// The user and group every image runs as: `nonroot` (65532), as in distroless images
/// and in the pods the operator makes (`NONROOT_UID`).
pub const NONROOT: u32 = 65532;

/// The image config's `User`: numeric, so Kubernetes' `runAsNonRoot` can check it.
pub const USER: &str = "65532:65532";

/// Where the binary goes in every image.
pub const BIN_DIR: &str = "/usr/local/bin";

/// Where the CA bundle goes in every image (Debian's path, which `rustls-native-certs`
/// reads).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The image config's `Env`, in this order.
pub const ENV: [&str; 2] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
];

/// `/etc/passwd` of every image: `root` and `nonroot`, neither with a shell or a home.
pub const PASSWD: &str = include_str!("../../images/rootfs/etc/passwd");

/// `/etc/group` of every image.
pub const GROUP: &str = include_str!("../../images/rootfs/etc/group");

/// The repository the images are published under by default, as the operator's
/// `--proxy-image` and `--connector-image` defaults expect.
pub const DEFAULT_REPOSITORY: &str = "ghcr.io/sallyport-dev";

/// Label keys of the OCI image-spec's pre-defined annotations.
pub mod label {
    /// The image's name.
    pub const TITLE: &str = "org.opencontainers.image.title";
    /// What the image does.
    pub const DESCRIPTION: &str = "org.opencontainers.image.description";
    /// Where the source lives.
    pub const SOURCE: &str = "org.opencontainers.image.source";
    /// The version of the packaged software.
    pub const VERSION: &str = "org.opencontainers.image.version";
    /// The source revision (commit) the image was built from.
    pub const REVISION: &str = "org.opencontainers.image.revision";
    /// The SPDX license expression of the packaged software.
    pub const LICENSES: &str = "org.opencontainers.image.licenses";
    /// When the image was built (RFC 3339); a manifest annotation only.
    pub const CREATED: &str = "org.opencontainers.image.created";
    /// The reference of a manifest in an image layout's `index.json`.
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
}

/// One of the images Sallyport ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Image {
    /// `sallyport-operator`: the controllers.
    Operator,
    /// `sallyport-proxy`: the public edge.
    Proxy,
    /// `sallyport-connector`: runs in the private network, outbound connections only.
    Connector,
}

impl Image {
    /// Every image, in a stable order.
    pub const ALL: [Image; 3] = [Image::Operator, Image::Proxy, Image::Connector];

    /// The image's (and its binary's) name.
    pub fn name(self) -> &'static str {
        match self {
            Image::Operator => "sallyport-operator",
            Image::Proxy => "sallyport-proxy",
            Image::Connector => "sallyport-connector",
        }
    }

    /// The short name `images/Dockerfile` uses as the build target.
    pub fn target(self) -> &'static str {
        match self {
            Image::Operator => "operator",
            Image::Proxy => "proxy",
            Image::Connector => "connector",
        }
    }

    /// The image's `org.opencontainers.image.description`.
    pub fn description(self) -> &'static str {
        match self {
            Image::Operator => {
                "Sallyport operator: reconciles PublishedApps, ConnectorGroups and ConditionalAccessPolicies into a proxy fleet, connectors, PKI and configuration"
            }
            Image::Proxy => {
                "Sallyport proxy: the public edge that signs users in, checks conditional access and routes requests onto connector tunnels"
            }
            Image::Connector => {
                "Sallyport connector: carries requests from the proxy fleet to internal apps over outbound-only mutual TLS"
            }
        }
    }

    /// The ports the binary listens on by default (`ExposedPorts`). The connector has
    /// none: it only dials out (its metrics port is opt-in, `--metrics-address`).
    pub fn exposed_ports(self) -> &'static [&'static str] {
        match self {
            // --probe-address: probes and metrics.
            Image::Operator => &["8080/tcp"],
            // --listen (users and connector tunnels), --probe-address.
            Image::Proxy => &["8080/tcp", "8443/tcp"],
            Image::Connector => &[],
        }
    }

    /// The binary's path in the image, which is also the `Entrypoint`.
    pub fn binary_path(self) -> String {
        format!("{BIN_DIR}/{}", self.name())
    }
}
