//! The certificates the proxy serves to users, chosen by the TLS ClientHello's SNI.
//!
//! A [`CertificateStore`] maps host names to certificates: exact names and wildcards
//! (`*.apps.example.com` serves exactly one more left-most label; an exact name wins),
//! plus an optional fallback served when the client sends no SNI or a name the store
//! does not hold. The map is swapped atomically ([`CertificateStore::replace`]) when
//! TLS Secrets change, so handshakes in flight keep the snapshot they started with and
//! a lookup never takes a lock or allocates.
//!
//! Certificates come from `kubernetes.io/tls` Secrets: [`certified_key_from_pem`] reads
//! one, [`hosts_of`] lists the names it is valid for so it can be indexed by them, and
//! [`not_after_of`] tells when it expires (for the metrics).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use sallyport_tunnel::tls::{TlsError, certificates_from_pem, private_key_from_pem};
use x509_parser::extensions::GeneralName;

use crate::router::HostKey;

/// A certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The PEM text holds no certificate or no private key.
    #[error(transparent)]
    Pem(#[from] TlsError),
    /// The private key is of a type or size the ring provider cannot sign with.
    #[error("TLS private key: unsupported key: {0}")]
    UnsupportedKey(#[source] rustls::Error),
    /// The private key does not belong to the leaf certificate.
    #[error("TLS private key: does not match the leaf certificate of the chain: {0}")]
    KeyMismatch(#[source] rustls::Error),
    /// The leaf certificate cannot be parsed.
    #[error("TLS certificate chain: the leaf certificate cannot be parsed: {reason}")]
    Parse {
        /// Why.
        reason: String,
    },
    /// The chain is empty.
    #[error("TLS certificate chain: no certificate")]
    EmptyChain,
}

/// A PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or
/// SEC1) as rustls serves them, signing with the ring provider. The key must match the
/// leaf certificate.
pub fn certified_key_from_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = certificates_from_pem("TLS certificate chain", chain_pem)?;
    let key = private_key_from_pem("TLS private key", key_pem)?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::UnsupportedKey)?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Some key types cannot tell their public key; rustls itself accepts those.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(error) => Err(CertError::KeyMismatch(error)),
    }
}

/// When the leaf certificate of `key` expires (notAfter), in Unix seconds; `None` when
/// it cannot be parsed.
pub fn not_after_of(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(certificate.validity().not_after.timestamp())
}

/// The DNS names (subject alternative names) the leaf of `chain` is valid for, lower
/// case, wildcards as written (`*.apps.example.com`). The subject's common name is not
/// read: browsers ignore it.
pub fn hosts_of(chain: &[CertificateDer<'_>]) -> Result<Vec<String>, CertError> {
    let leaf = chain.first().ok_or(CertError::EmptyChain)?;
    let (_, certificate) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::Parse {
            reason: e.to_string(),
        })?;
    let names = certificate
        .subject_alternative_name()
        .map_err(|e| CertError::Parse {
            reason: e.to_string(),
        })?;
    Ok(names
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect())
}

/// Certificates by host name, resolved by SNI; see the module documentation.
pub struct CertificateStore {
    hosts: ArcSwap<HostCertificates>,
    fallback: ArcSwapOption<CertifiedKey>,
}

/// One snapshot of the host map.
#[derive(Default)]
struct HostCertificates {
    /// Exact host names.
    exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// Wildcards, keyed by what follows `*.`.
    wildcard: HashMap<Box<str>, Arc<CertifiedKey>>,
}

impl CertificateStore {
    /// An empty store serving `fallback`, if any, to every client.
    pub fn new(fallback: Option<Arc<CertifiedKey>>) -> Self {
        Self {
            hosts: ArcSwap::from_pointee(HostCertificates::default()),
            fallback: ArcSwapOption::new(fallback),
        }
    }

    /// Replaces every host entry at once. Each entry is a host pattern (an exact name or
    /// `*.parent`; case and a trailing dot do not matter) and its certificate. When a
    /// pattern appears twice the first entry wins, so list preferred certificates
    /// first. Patterns that are no host name are skipped with a warning.
    pub fn replace(&self, entries: Vec<(String, Arc<CertifiedKey>)>) {
        let mut hosts = HostCertificates::default();
        for (pattern, key) in entries {
            let (table, name) = match pattern.strip_prefix("*.") {
                Some(parent) => (&mut hosts.wildcard, parent),
                None => (&mut hosts.exact, pattern.as_str()),
            };
            match HostKey::new(name).filter(|host| !host.as_str().contains('*')) {
                Some(host) => {
                    table.entry(host.as_str().into()).or_insert(key);
                }
                None => tracing::warn!(
                    pattern = pattern.as_str(),
                    "a TLS certificate's host pattern is no host name; it is not served"
                ),
            }
        }
        self.hosts.store(Arc::new(hosts));
    }

    /// Sets or clears the certificate served without SNI or for unknown names.
    pub fn set_fallback(&self, fallback: Option<Arc<CertifiedKey>>) {
        self.fallback.store(fallback);
    }

    /// The certificate for `server_name` (the SNI): its exact entry, else the wildcard
    /// covering it, else the fallback. `None` aborts the handshake.
    pub fn certificate_for(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        server_name
            .and_then(HostKey::new)
            .and_then(|host| self.host_certificate(&host))
            .or_else(|| self.fallback.load_full())
    }

    fn host_certificate(&self, host: &HostKey) -> Option<Arc<CertifiedKey>> {
        let hosts = self.hosts.load();
        hosts
            .exact
            .get(host.as_str())
            .or_else(|| hosts.wildcard.get(host.wildcard_parent()?))
            .cloned()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certificate_for(client_hello.server_name())
    }
}

impl std::fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and counts only: certificates are long and keys are secret.
        let hosts = self.hosts.load();
        f.debug_struct("CertificateStore")
            .field("exact", &hosts.exact.len())
            .field("wildcard", &hosts.wildcard.len())
            .field("fallback", &self.fallback.load().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A self-signed certificate for `names`: its DER and its [`CertifiedKey`].
    fn self_signed(names: &[&str]) -> (CertificateDer<'static>, Arc<CertifiedKey>) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let generated =
            rcgen::generate_simple_self_signed(names).unwrap_or_else(|e| panic!("rcgen: {e}"));
        let key = certified_key_from_pem(
            generated.cert.pem().as_bytes(),
            generated.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (generated.cert.der().clone(), key)
    }

    fn entries(keys: &[&Arc<CertifiedKey>]) -> Vec<(String, Arc<CertifiedKey>)> {
        keys.iter()
            .flat_map(|key| {
                hosts_of(&key.cert)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .into_iter()
                    .map(|host| (host, Arc::clone(key)))
            })
            .collect()
    }

    fn same(a: Option<Arc<CertifiedKey>>, b: &Arc<CertifiedKey>) -> bool {
        a.is_some_and(|a| Arc::ptr_eq(&a, b))
    }

    #[test]
    fn pem_is_read_and_mismatched_keys_are_refused() {
        let one = rcgen::generate_simple_self_signed(vec!["one.example.com".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        let two = rcgen::generate_simple_self_signed(vec!["two.example.com".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        let chain = one.cert.pem();
        let mismatch =
            certified_key_from_pem(chain.as_bytes(), two.signing_key.serialize_pem().as_bytes());
        assert!(matches!(mismatch, Err(CertError::KeyMismatch(_))));
        let no_key = certified_key_from_pem(chain.as_bytes(), b"nothing");
        assert!(matches!(
            no_key,
            Err(CertError::Pem(TlsError::PrivateKey { .. }))
        ));
        let no_chain = certified_key_from_pem(b"", one.signing_key.serialize_pem().as_bytes());
        assert!(matches!(
            no_chain,
            Err(CertError::Pem(TlsError::Certificates { .. }))
        ));
        assert!(no_chain.is_err_and(|e| e.to_string().contains("TLS certificate chain")));
    }

    #[test]
    fn the_leafs_expiry_is_read() {
        let (_, key) = self_signed(&["app.example.com"]);
        let not_after = not_after_of(&key).unwrap_or_else(|| panic!("no notAfter"));
        // rcgen's default validity runs to 4096.
        assert!(not_after > 4_000_000_000, "{not_after}");
    }

    #[test]
    fn hosts_are_the_leafs_dns_names() {
        let (_, key) = self_signed(&["Wiki.Example.com", "*.apps.example.com", "127.0.0.1"]);
        let hosts = hosts_of(&key.cert).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hosts, ["wiki.example.com", "*.apps.example.com"]);
        assert!(matches!(hosts_of(&[]), Err(CertError::EmptyChain)));
        let garbage = [CertificateDer::from(vec![1u8, 2, 3])];
        assert!(matches!(hosts_of(&garbage), Err(CertError::Parse { .. })));
    }

    #[test]
    fn exact_names_beat_wildcards_which_cover_one_label() {
        let (_, exact) = self_signed(&["wiki.apps.example.com"]);
        let (_, wildcard) = self_signed(&["*.apps.example.com"]);
        let (_, fallback) = self_signed(&["fallback.example.com"]);
        let store = CertificateStore::new(None);
        store.replace(entries(&[&wildcard, &exact]));
        assert!(same(
            store.certificate_for(Some("wiki.apps.example.com")),
            &exact
        ));
        assert!(same(
            store.certificate_for(Some("WIKI.apps.example.com.")),
            &exact
        ));
        assert!(same(
            store.certificate_for(Some("chat.apps.example.com")),
            &wildcard
        ));
        assert!(
            store
                .certificate_for(Some("a.chat.apps.example.com"))
                .is_none()
        );
        assert!(store.certificate_for(Some("apps.example.com")).is_none());
        assert!(store.certificate_for(None).is_none());

        store.set_fallback(Some(Arc::clone(&fallback)));
        assert!(same(store.certificate_for(None), &fallback));
        assert!(same(
            store.certificate_for(Some("other.example.net")),
            &fallback
        ));

        store.replace(vec![
            ("*.apps.example.com".to_owned(), Arc::clone(&exact)),
            ("*.apps.example.com".to_owned(), Arc::clone(&wildcard)),
            ("*".to_owned(), Arc::clone(&wildcard)),
            ("*.*.example.com".to_owned(), Arc::clone(&wildcard)),
        ]);
        assert!(
            same(store.certificate_for(Some("wiki.apps.example.com")), &exact),
            "first wins"
        );
        assert!(same(
            store.certificate_for(Some("x.y.example.com")),
            &fallback
        ));
        assert_eq!(
            format!("{store:?}"),
            "CertificateStore { exact: 0, wildcard: 1, fallback: true }"
        );
    }

    /// The certificate a client verifying `roots` receives when it connects to
    /// `store` with `server_name` (SNI sent only when `send_sni`); `None` when the
    /// handshake fails.
    async fn served_certificate(
        store: &Arc<CertificateStore>,
        roots: &[&CertificateDer<'static>],
        server_name: &str,
        send_sni: bool,
    ) -> Option<CertificateDer<'static>> {
        let provider = sallyport_tunnel::tls::provider();
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(store) as Arc<dyn ResolvesServerCert>);
        let mut trusted = RootCertStore::empty();
        for root in roots {
            trusted
                .add((*root).clone())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(trusted)
            .with_no_client_auth();
        client.enable_sni = send_sni;

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(server_name.to_owned()).unwrap_or_else(|e| panic!("{e}"));
        let accept = async {
            let mut tls = TlsAcceptor::from(Arc::new(server))
                .accept(server_io)
                .await
                .ok()?;
            tls.write_all(b"hello").await.ok()?;
            tls.shutdown().await.ok()
        };
        let connect = async {
            let mut tls = TlsConnector::from(Arc::new(client))
                .connect(name, client_io)
                .await
                .ok()?;
            let mut greeting = [0u8; 5];
            tls.read_exact(&mut greeting).await.ok()?;
            assert_eq!(&greeting, b"hello");
            tls.get_ref().1.peer_certificates()?.first().cloned()
        };
        let (_, served) = tokio::join!(accept, connect);
        served
    }

    #[tokio::test]
    async fn handshakes_get_the_certificate_their_sni_names() {
        let (a_der, a) = self_signed(&["a.example.com"]);
        let (b_der, b) = self_signed(&["*.b.example.com"]);
        let (fallback_der, fallback) = self_signed(&["fallback.example.com"]);
        let store = Arc::new(CertificateStore::new(None));
        store.replace(entries(&[&a, &b]));
        let roots = [&a_der, &b_der, &fallback_der];

        let served = served_certificate(&store, &roots, "a.example.com", true).await;
        assert_eq!(served.as_ref(), Some(&a_der));
        let served = served_certificate(&store, &roots, "x.b.example.com", true).await;
        assert_eq!(served.as_ref(), Some(&b_der));

        // Without SNI, or for an unknown name, only a fallback can answer.
        assert!(
            served_certificate(&store, &roots, "fallback.example.com", false)
                .await
                .is_none()
        );
        store.set_fallback(Some(fallback));
        let served = served_certificate(&store, &roots, "fallback.example.com", false).await;
        assert_eq!(served.as_ref(), Some(&fallback_der));

        // A swap takes effect for the next handshake: a.example.com now gets b's
        // certificate, which its client refuses, and x.b.example.com the fallback.
        store.replace(vec![("a.example.com".to_owned(), Arc::clone(&b))]);
        assert!(same(store.certificate_for(Some("a.example.com")), &b));
        assert!(
            served_certificate(&store, &roots, "a.example.com", true)
                .await
                .is_none()
        );
        assert!(
            served_certificate(&store, &roots, "x.b.example.com", true)
                .await
                .is_none()
        );
    }
}
