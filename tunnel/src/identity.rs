//! A connector's identity, carried in its client certificate as one URI subject
//! alternative name:
//!
//! ```text
//! spiffe://sallyport.dev/ns/<namespace>/group/<group>/connector/<name>
//! ```
//!
//! The fleet writes it when it signs the connector's CSR (whatever the CSR asked for)
//! and reads it back from the verified certificate on every tunnel and API call. The
//! `Connector` object `<namespace>/<name>` records the connector; `<namespace>/<group>`
//! is its ConnectorGroup.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI prefix of every connector identity.
pub const URI_PREFIX: &str = "spiffe://sallyport.dev/ns/";

/// A connector identity could not be made or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// A part is not a DNS-1123 label (lower-case alphanumerics and `-`, at most 63).
    #[error("connector identity: {field} {value:?} is not a DNS-1123 label")]
    InvalidPart {
        /// `namespace`, `group` or `name`.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// The URI does not have the connector identity's shape.
    #[error(
        "connector identity: {uri:?} is not of the form {URI_PREFIX}<namespace>/group/<group>/connector/<name>"
    )]
    MalformedUri {
        /// The URI given.
        uri: String,
    },
    /// The certificate could not be parsed.
    #[error("connector identity: the certificate is not valid X.509 DER: {reason}")]
    BadCertificate {
        /// The parser's message.
        reason: String,
    },
    /// The certificate carries no connector identity, or more than one.
    #[error(
        "connector identity: the certificate carries {found} connector identity URIs; exactly one is required"
    )]
    NotExactlyOne {
        /// How many were found.
        found: usize,
    },
}

/// Who a connector is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectorIdentity {
    namespace: String,
    group: String,
    name: String,
}

fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

fn label(field: &'static str, value: &str) -> Result<String, IdentityError> {
    if is_dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err(IdentityError::InvalidPart {
            field,
            value: value.to_owned(),
        })
    }
}

impl ConnectorIdentity {
    /// The connector `name` of the ConnectorGroup `group`, both in `namespace`.
    pub fn new(namespace: &str, group: &str, name: &str) -> Result<Self, IdentityError> {
        Ok(Self {
            namespace: label("namespace", namespace)?,
            group: label("group", group)?,
            name: label("name", name)?,
        })
    }

    /// The namespace of the connector and its group.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The ConnectorGroup's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The Connector object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `namespace/name` of the Connector object, as the fleet configuration's
    /// `revokedConnectors` lists it.
    pub fn connector_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `namespace/name` of the ConnectorGroup, as the fleet configuration names groups.
    pub fn group_id(&self) -> String {
        format!("{}/{}", self.namespace, self.group)
    }

    /// The URI subject alternative name that carries this identity.
    pub fn uri(&self) -> String {
        format!(
            "{URI_PREFIX}{}/group/{}/connector/{}",
            self.namespace, self.group, self.name
        )
    }

    /// Reads an identity from its URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::MalformedUri {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [namespace, "group", group, "connector", name] => {
                Self::new(namespace, group, name).map_err(|_| malformed())
            }
            _ => Err(malformed()),
        }
    }

    /// Reads the identity from a DER certificate: exactly one URI SAN must start with
    /// [`URI_PREFIX`]. The caller must have verified the certificate's chain first.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, certificate) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate {
                reason: e.to_string(),
            })?;
        let san =
            certificate
                .subject_alternative_name()
                .map_err(|e| IdentityError::BadCertificate {
                    reason: e.to_string(),
                })?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] => Self::from_uri(uri),
            _ => Err(IdentityError::NotExactlyOne { found: uris.len() }),
        }
    }
}

impl std::fmt::Display for ConnectorIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connector {}/{} of group {}",
            self.namespace, self.name, self.group
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_uri() {
        let id = ConnectorIdentity::new("infra", "east", "vm-1-x7k2p");
        let id = id.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            id.uri(),
            "spiffe://sallyport.dev/ns/infra/group/east/connector/vm-1-x7k2p"
        );
        assert_eq!(ConnectorIdentity::from_uri(&id.uri()), Ok(id.clone()));
        assert_eq!(id.connector_id(), "infra/vm-1-x7k2p");
        assert_eq!(id.group_id(), "infra/east");
    }

    #[test]
    fn refuses_malformed_parts_and_uris() {
        assert!(matches!(
            ConnectorIdentity::new("Infra", "east", "a"),
            Err(IdentityError::InvalidPart {
                field: "namespace",
                ..
            })
        ));
        assert!(ConnectorIdentity::new("infra", "east/../west", "a").is_err());
        assert!(ConnectorIdentity::new("infra", "east", "").is_err());
        for uri in [
            "spiffe://sallyport.dev/ns/infra/group/east/connector/a/extra",
            "spiffe://evil.example/ns/infra/group/east/connector/a",
            "spiffe://sallyport.dev/ns/infra/group/east/connector/",
            "spiffe://sallyport.dev/ns/infra/grp/east/connector/a",
            "spiffe://sallyport.dev/ns/INFRA/group/east/connector/a",
        ] {
            assert!(
                matches!(
                    ConnectorIdentity::from_uri(uri),
                    Err(IdentityError::MalformedUri { .. })
                ),
                "{uri} accepted"
            );
        }
    }

    fn certificate_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| {
                rcgen::SanType::URI(
                    rcgen::string::Ia5String::try_from(*u).unwrap_or_else(|e| panic!("{e}")),
                )
            })
            .collect();
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        cert.der().to_vec()
    }

    #[test]
    fn reads_exactly_one_identity_from_a_certificate() {
        let uri = "spiffe://sallyport.dev/ns/infra/group/east/connector/vm-1";
        let der = certificate_with_uris(&[uri, "https://other.example/"]);
        let id = ConnectorIdentity::from_certificate_der(&der);
        assert_eq!(id.map(|i| i.connector_id()), Ok("infra/vm-1".to_owned()));

        let two = certificate_with_uris(&[
            uri,
            "spiffe://sallyport.dev/ns/infra/group/west/connector/vm-1",
        ]);
        assert_eq!(
            ConnectorIdentity::from_certificate_der(&two),
            Err(IdentityError::NotExactlyOne { found: 2 })
        );
        let none = certificate_with_uris(&[]);
        assert_eq!(
            ConnectorIdentity::from_certificate_der(&none),
            Err(IdentityError::NotExactlyOne { found: 0 })
        );
        assert!(matches!(
            ConnectorIdentity::from_certificate_der(b"not der"),
            Err(IdentityError::BadCertificate { .. })
        ));
    }
}
