//! A throwaway certificate authority for the HTTPS servers a test runs (the OpenID
//! provider, relying parties, the proxy's public side) and the clients that must trust
//! them: Rust clients get its PEM, the [browser](crate::browser) gets it in its NSS
//! database.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate could not be made, written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TestCaError {
    /// rcgen refused.
    #[error("cannot make the {what}: {source}")]
    Generate {
        /// Which certificate or key.
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rustls refused the certificate or key.
    #[error("cannot build a TLS server configuration for {names:?}: {source}")]
    Tls {
        /// The certificate's names.
        names: Vec<String>,
        /// Why.
        source: rustls::Error,
    },
    /// The PEM just made does not parse (a bug).
    #[error("cannot parse the PEM of {what}: {source}")]
    Pem {
        /// Which certificate or key.
        what: &'static str,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
}

/// A test CA: a self-signed root (ECDSA P-256) that issues server certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    name: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("name", &self.name).finish()
    }
}

impl TestCa {
    /// A new CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> Result<Self, TestCaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(|source| TestCaError::Generate {
            what: "CA key",
            source,
        })?;
        let issuer =
            CertifiedIssuer::self_signed(params, key).map_err(|source| TestCaError::Generate {
                what: "CA certificate",
                source,
            })?;
        Ok(Self {
            issuer,
            name: name.to_owned(),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's common name (also its nickname in the browser's NSS database).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Issues a server certificate (serverAuth) for `names`: DNS names or IP addresses
    /// (e.g. `127.0.0.1`, `idp.sallyport.test`).
    pub fn issue_server(&self, names: &[&str]) -> Result<ServerCertificate, TestCaError> {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params =
            CertificateParams::new(names.clone()).map_err(|source| TestCaError::Generate {
                what: "server certificate",
                source,
            })?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(|source| TestCaError::Generate {
            what: "server key",
            source,
        })?;
        let certificate =
            params
                .signed_by(&key, &self.issuer)
                .map_err(|source| TestCaError::Generate {
                    what: "server certificate",
                    source,
                })?;
        Ok(ServerCertificate {
            names,
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A server certificate issued by a [`TestCa`], with its key.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The names it is valid for.
    pub names: Vec<String>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServerCertificate {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`; their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), TestCaError> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        for (path, pem) in [(&cert, &self.cert_pem), (&key, &self.key_pem)] {
            std::fs::write(path, pem).map_err(|source| TestCaError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok((cert, key))
    }

    /// A rustls server configuration presenting this certificate, offering `alpn`
    /// protocols (e.g. `[b"http/1.1"]`).
    pub fn rustls_server_config(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, TestCaError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TestCaError::Pem {
                what: "server certificate",
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|source| {
            TestCaError::Pem {
                what: "server key",
                source,
            }
        })?;
        let tls = |source| TestCaError::Tls {
            names: self.names.clone(),
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Arc::new(config))
    }
}
