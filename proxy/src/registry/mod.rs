//! Where registration tokens are checked and spent and connectors are recorded.
//!
//! - [`MemoryRegistry`]: tokens given at start-up, records kept in memory (tests and the
//!   standalone proxy).
//! - [`KubeRegistry`]: the registration token Secret of each ConnectorGroup, counted with
//!   optimistic concurrency so that several proxy replicas never spend one use twice,
//!   and one `Connector` object per registered connector.
//! - [`tunnel_status`]: in a cluster, each replica's tunnels reported on the `Connector`
//!   objects they belong to.

pub mod kube;
pub mod memory;
pub mod tunnel_status;

use futures::future::BoxFuture;
use rand::Rng;
use sallyport_tunnel::ConnectorIdentity;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

pub use self::kube::KubeRegistry;
pub use self::memory::{MemoryRegistry, StaticToken};

/// The longest connector name: a DNS-1123 label.
pub const MAX_NAME_LEN: usize = 63;

/// How many random characters end every connector name.
pub const NAME_SUFFIX_LEN: usize = 5;

/// Why a token was not accepted or a connector not recorded. [`Self::reason`] is the
/// stable string of the fleet API; [`Self::public_message`] is what the caller may see
/// (never which groups or Secrets exist), the `Display` text is for the logs.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationError {
    /// No such token for the group, or no such group (the caller is not told which).
    #[error("registration token for group {group} refused: {detail}")]
    TokenInvalid {
        /// The group id asked for.
        group: String,
        /// Why, for the logs only.
        detail: String,
    },
    /// The token is right but expired (or its expiry is unreadable).
    #[error("registration token of group {group} refused: it expired at {expired_at}")]
    TokenExpired {
        /// The group id.
        group: String,
        /// When it expired, as the Secret says.
        expired_at: String,
    },
    /// The token is right but every use it allows is spent.
    #[error("registration token of group {group} refused: all {max_uses} uses are spent")]
    TokenUsedUp {
        /// The group id.
        group: String,
        /// The uses it allowed.
        max_uses: u32,
    },
    /// A renewal for a connector whose `Connector` object is gone or being deleted.
    #[error("Connector {connector} does not exist or is being deleted: it was revoked")]
    ConnectorNotFound {
        /// The connector id, `namespace/name`.
        connector: String,
    },
    /// The store failed.
    #[error("{object}: {reason}")]
    Backend {
        /// The object concerned, e.g. `Secret infra/east-registration`.
        object: String,
        /// Why.
        reason: String,
    },
}

impl RegistrationError {
    /// The stable, machine-readable reason the fleet API reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TokenInvalid { .. } => "TokenInvalid",
            Self::TokenExpired { .. } => "TokenExpired",
            Self::TokenUsedUp { .. } => "TokenUsedUp",
            Self::ConnectorNotFound { .. } => "ConnectorRevoked",
            Self::Backend { .. } => "Backend",
        }
    }

    /// What the caller is told: enough to act on, nothing about other groups.
    pub fn public_message(&self) -> String {
        match self {
            Self::TokenInvalid { .. } => {
                "the registration token is not valid for this connector group; \
                 copy the current token from the group's registration Secret"
                    .to_owned()
            }
            Self::TokenExpired { .. } => {
                "the registration token expired; copy the new token from the \
                 group's registration Secret (the operator mints one when the old one expires)"
                    .to_owned()
            }
            Self::TokenUsedUp { max_uses, .. } => format!(
                "the registration token allowed {max_uses} registration(s) and all are spent; \
                 copy the new token from the group's registration Secret"
            ),
            Self::ConnectorNotFound { connector } => format!(
                "connector {connector} was revoked; register it again with the group's token"
            ),
            Self::Backend { .. } => {
                "the fleet could not reach its store; try again shortly".to_owned()
            }
        }
    }
}

/// What happened to the connector being recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEvent {
    /// A new connector: create its `Connector`.
    Registered,
    /// A known connector got a new certificate: its `Connector` must still exist (a
    /// deleted one is revoked and is not brought back).
    Renewed,
}

/// A connector and its newest certificate, as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRecord {
    /// Whether the connector is new or renewing.
    pub event: RecordEvent,
    /// Who the connector is.
    pub identity: ConnectorIdentity,
    /// The host name it reported at registration; `None` keeps the recorded one.
    pub hostname: Option<String>,
    /// Its software version.
    pub version: String,
    /// Its certificate's serial, hexadecimal.
    pub serial_hex: String,
    /// When the certificate was issued (also when the connector was last seen).
    pub issued_at: OffsetDateTime,
    /// When the certificate expires.
    pub not_after: OffsetDateTime,
}

/// The versions a connector reported when it pulled its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionReport {
    /// Who the connector is.
    pub identity: ConnectorIdentity,
    /// The version it runs.
    pub version: String,
    /// The version its group wants, as the configuration it was just served says.
    pub desired_version: Option<String>,
}

/// Where registration tokens are checked and connectors recorded. Dyn-compatible:
/// the fleet API holds an `Arc<dyn Registry>`.
pub trait Registry: Send + Sync {
    /// Checks `presented_token` against the token of the group `group_id`
    /// (`namespace/name`): it must exist (an unknown group is [`RegistrationError::TokenInvalid`]
    /// too), match, not be expired and have uses left; then one use is counted,
    /// atomically with the check.
    fn redeem<'a>(
        &'a self,
        group_id: &'a str,
        presented_token: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistrationError>>;

    /// Checks `presented_token` as [`Registry::redeem`] does (exists, matches, not
    /// expired, uses left) *without* counting a use: whether a registration with it would
    /// be accepted now. For a group the fleet configuration does not hold yet, so that a
    /// connector holding a valid token can be told to come back.
    fn check<'a>(
        &'a self,
        group_id: &'a str,
        presented_token: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistrationError>>;

    /// Records a connector and its newest certificate.
    fn record(&self, record: ConnectorRecord) -> BoxFuture<'_, Result<(), RegistrationError>>;

    /// Records the version a connector runs and the one its group wants (its Connector
    /// status `version` and `desiredVersion`).
    fn report_version(&self, report: VersionReport)
    -> BoxFuture<'_, Result<(), RegistrationError>>;

    /// A fresh connector name for a host: see [`connector_name`].
    fn new_connector_name(&self, hostname: &str) -> String {
        let mut rng = rand::rng();
        let suffix: String = (0..NAME_SUFFIX_LEN)
            .map(|_| {
                let index = rng.random_range(0..NAME_ALPHABET.len());
                NAME_ALPHABET.get(index).map_or('x', |b| char::from(*b))
            })
            .collect();
        connector_name(hostname, &suffix)
    }
}

const NAME_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `hostname` as a DNS label (lower case, every run of other characters one `-`,
/// trimmed to leave room for the suffix; `connector` when nothing is left), then `-`
/// and `suffix`: at most [`MAX_NAME_LEN`] characters.
pub fn connector_name(hostname: &str, suffix: &str) -> String {
    let mut base = String::new();
    for c in hostname.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            base.push(c);
        } else if !base.is_empty() && !base.ends_with('-') {
            base.push('-');
        }
    }
    let room = MAX_NAME_LEN.saturating_sub(suffix.len() + 1);
    base.truncate(room);
    let base = base.trim_end_matches('-');
    let base = if base.is_empty() { "connector" } else { base };
    format!("{base}-{suffix}")
}

/// Whether two tokens are equal, in time independent of where they differ and of
/// their lengths (both are hashed first).
pub fn tokens_equal(presented: &str, expected: &str) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    presented.as_slice().ct_eq(expected.as_slice()).into()
}

/// Splits a group id `namespace/name`.
pub fn split_group_id(group_id: &str) -> Option<(&str, &str)> {
    let (namespace, name) = group_id.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then_some((namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_names_are_dns_labels_from_the_host_name() {
        assert_eq!(
            connector_name("VM-1.corp.example.com", "x7k2p"),
            "vm-1-corp-example-com-x7k2p"
        );
        assert_eq!(
            connector_name("--weird__host--", "abcde"),
            "weird-host-abcde"
        );
        assert_eq!(connector_name("", "abcde"), "connector-abcde");
        assert_eq!(connector_name("日本", "abcde"), "connector-abcde");
        let long = connector_name(&"a".repeat(100), "abcde");
        assert_eq!(long.len(), MAX_NAME_LEN);
        assert!(long.ends_with("a-abcde"));
        let dash_at_cut = connector_name(&format!("{}-b", "a".repeat(56)), "abcde");
        assert_eq!(dash_at_cut, format!("{}-abcde", "a".repeat(56)));
    }

    struct Nothing;
    impl Registry for Nothing {
        fn redeem<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<(), RegistrationError>> {
            Box::pin(async { Ok(()) })
        }
        fn check<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<(), RegistrationError>> {
            Box::pin(async { Ok(()) })
        }
        fn record(&self, _: ConnectorRecord) -> BoxFuture<'_, Result<(), RegistrationError>> {
            Box::pin(async { Ok(()) })
        }
        fn report_version(&self, _: VersionReport) -> BoxFuture<'_, Result<(), RegistrationError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn new_names_are_random_and_valid_identities() {
        let registry: &dyn Registry = &Nothing;
        let a = registry.new_connector_name("vm-1");
        let b = registry.new_connector_name("vm-1");
        assert_ne!(a, b);
        assert!(a.starts_with("vm-1-") && a.len() == 10, "{a}");
        assert!(ConnectorIdentity::new("infra", "east", &a).is_ok());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("abc", "abcd"));
        assert!(!tokens_equal("", "abc"));
    }

    #[test]
    fn group_ids_split_in_two() {
        assert_eq!(split_group_id("infra/east"), Some(("infra", "east")));
        assert_eq!(split_group_id("infra"), None);
        assert_eq!(split_group_id("/east"), None);
        assert_eq!(split_group_id("a/b/c"), None);
    }
}
