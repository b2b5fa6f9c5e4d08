//! The rustls settings of both ends of the tunnel and of the fleet API.
//!
//! - The fleet (proxy) serves the tunnel host name with the tunnel serving certificate
//!   and *asks* for a client certificate signed by the connector issuer: registration
//!   needs none, tunnels and every later API call need one (checked per request).
//! - A connector trusts only the fleet's root CA (never the system roots) and presents
//!   its client certificate once it has one.
//!
//! Every configuration names the `ring` provider explicitly; nothing depends on a
//! process-wide default provider.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::{ConnectorIdentity, IdentityError};
use crate::wire::TUNNEL_ALPN;

/// ALPN ids of the fleet API (registration, renewal, configuration).
pub const API_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// TLS material could not be read or combined.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM text holds no certificate, or a malformed one.
    #[error("{what}: no valid PEM certificate: {reason}")]
    Certificates {
        /// Which material, e.g. `fleet CA`.
        what: String,
        /// Why.
        reason: String,
    },
    /// PEM text holds no private key, or a malformed one.
    #[error("{what}: no valid PEM private key: {reason}")]
    PrivateKey {
        /// Which material.
        what: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("{what}: {source}")]
    Rustls {
        /// Which configuration.
        what: String,
        /// rustls's error.
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built.
    #[error("{what}: {reason}")]
    Verifier {
        /// Which configuration.
        what: String,
        /// Why.
        reason: String,
    },
}

/// The `ring` crypto provider every configuration here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in `pem`, in order; at least one.
pub fn certificates_from_pem(
    what: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificates {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Certificates {
            what: what.to_owned(),
            reason: "the text holds no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certificates)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in `pem`.
pub fn private_key_from_pem(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::PrivateKey {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Credentials {
    /// Reads a chain and key from PEM (`what` names them in errors).
    pub fn from_pem(what: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Ok(Self {
            chain: certificates_from_pem(what, chain_pem)?,
            key: private_key_from_pem(what, key_pem)?,
        })
    }
}

fn roots(what: &str, certificates: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for certificate in certificates {
        store
            .add(certificate.clone())
            .map_err(|source| TlsError::Rustls {
                what: what.to_owned(),
                source,
            })?;
    }
    Ok(store)
}

/// The fleet's side: serve `serving` (the tunnel certificate), accept client certificates
/// chaining to `connector_roots` (the fleet root CA) but do not require one, and offer
/// ALPN [`TUNNEL_ALPN`] and [`API_ALPN`].
pub fn fleet_server_config(
    serving: &Credentials,
    connector_roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let what = "fleet tunnel listener";
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(what, connector_roots)?),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Verifier {
        what: what.to_owned(),
        reason: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: what.to_owned(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(serving.chain.clone(), serving.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            what: what.to_owned(),
            source,
        })?;
    config.alpn_protocols = std::iter::once(TUNNEL_ALPN)
        .chain(API_ALPN)
        .map(<[u8]>::to_vec)
        .collect();
    Ok(Arc::new(config))
}

/// The connector's side: trust only `fleet_ca`, present `credentials` when given, and
/// offer `alpn` (`[TUNNEL_ALPN]` for tunnels, [`API_ALPN`] for the fleet API).
pub fn connector_client_config(
    credentials: Option<&Credentials>,
    fleet_ca: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let what = "connector TLS client";
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: what.to_owned(),
            source,
        })?
        .with_root_certificates(roots(what, fleet_ca)?);
    let mut config = match credentials {
        Some(credentials) => builder
            .with_client_auth_cert(credentials.chain.clone(), credentials.key.clone_key())
            .map_err(|source| TlsError::Rustls {
                what: what.to_owned(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The verified connector identity of a server-side TLS connection: `None` when the
/// client presented no certificate (rustls has already verified any it presented).
pub fn peer_identity(
    connection: &rustls::ServerConnection,
) -> Option<Result<ConnectorIdentity, IdentityError>> {
    let leaf = connection.peer_certificates()?.first()?;
    Some(ConnectorIdentity::from_certificate_der(leaf))
}
