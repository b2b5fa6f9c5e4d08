//! Backend CA bundles: the CA certificates an app names in
//! `spec.backend.tls.caSecretRef`, read from their Secret in the app's namespace, checked,
//! and handed to the compiled fleet configuration.
//!
//! CA certificates are public, so they are the one thing read from a Secret that the
//! configuration carries (once per Secret key, in `backendCas`; each connector gets them
//! inlined in its group's slice). Only `CERTIFICATE` blocks that parse as X.509 pass, and
//! they are re-encoded from their DER: nothing else the key holds (a private key pasted
//! by mistake, comments) can reach the configuration.
//!
//! The status step reads the Secret when it reconciles the app (the PublishedApp
//! controller's Secret watch maps a change of the Secret to the apps naming it); the
//! fleet configuration loop keeps a [`BackendCaCache`], reading a Secret again only when
//! its `resourceVersion` in the metadata cache changed.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use sallyport_api::PublishedApp;
use sallyport_api::fleet_config::SecretKeyRef;
use x509_parser::pem::Pem;

/// The largest CA bundle accepted, in bytes of the Secret's value: every bundle is copied
/// into the fleet configuration, whose stored form must stay under 1 MiB.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;

/// The status reason of a backend CA Secret or key that does not exist.
pub const NOT_FOUND: &str = "BackendCASecretNotFound";
/// The status reason of a backend CA Secret key that does not hold PEM certificates.
pub const INVALID: &str = "BackendCASecretInvalid";

/// What an app's backend CA reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendCaLookup {
    /// The app names no backend CA (or, compiling without a cluster, it is not read).
    NotNeeded,
    /// The key holds CA certificates, here re-encoded as PEM.
    Found {
        /// `CERTIFICATE` blocks only.
        pem: String,
    },
    /// The Secret or its key does not exist.
    NotFound {
        /// What is missing, naming the Secret and key.
        what: String,
    },
    /// The key holds something other than PEM certificates.
    Invalid {
        /// What is wrong, naming the Secret and key.
        what: String,
    },
}

impl BackendCaLookup {
    /// The status reason and message when the reference did not resolve.
    pub fn problem(&self) -> Option<(&'static str, &str)> {
        match self {
            Self::NotNeeded | Self::Found { .. } => None,
            Self::NotFound { what } => Some((NOT_FOUND, what)),
            Self::Invalid { what } => Some((INVALID, what)),
        }
    }
}

/// What every backend CA Secret key the apps name resolved to, for the compiler.
pub type BackendCas = BTreeMap<SecretKeyRef, BackendCaLookup>;

/// The backend CA Secret key `app` names, in the app's namespace.
pub fn app_reference(app: &PublishedApp) -> Option<SecretKeyRef> {
    let reference = app.spec.backend.tls.as_ref()?.ca_secret_ref.as_ref()?;
    Some(SecretKeyRef {
        namespace: app.metadata.namespace.clone().unwrap_or_default(),
        name: reference.name.clone(),
        key: reference.key.clone(),
    })
}

/// Every backend CA Secret key `apps` name.
pub fn references<'a>(apps: impl IntoIterator<Item = &'a PublishedApp>) -> BTreeSet<SecretKeyRef> {
    apps.into_iter().filter_map(app_reference).collect()
}

/// The certificates of a CA bundle, re-encoded as PEM; or why it is not one.
pub fn check_bundle(bytes: &[u8]) -> Result<String, String> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "is {} bytes, more than the {MAX_BUNDLE_BYTES} a CA bundle may have",
            bytes.len()
        ));
    }
    let mut pem = String::new();
    let mut count = 0usize;
    for (index, block) in Pem::iter_from_buffer(bytes).enumerate() {
        let number = index + 1;
        let block = block.map_err(|e| format!("is not PEM (block {number}: {e})"))?;
        if block.label != "CERTIFICATE" {
            return Err(format!(
                "holds a {} block (number {number}); only CERTIFICATE blocks are allowed",
                block.label
            ));
        }
        block
            .parse_x509()
            .map_err(|e| format!("holds a CERTIFICATE (number {number}) that is not X.509: {e}"))?;
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = STANDARD.encode(&block.contents);
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        count += 1;
    }
    if count == 0 {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(pem)
}

/// What `reference` resolves to, given its Secret as read (`None`: it does not exist).
pub fn lookup(secret: Option<&Secret>, reference: &SecretKeyRef) -> BackendCaLookup {
    let SecretKeyRef {
        namespace,
        name,
        key,
    } = reference;
    let Some(secret) = secret else {
        return BackendCaLookup::NotFound {
            what: format!("backend CA Secret {namespace}/{name} does not exist"),
        };
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|bytes| bytes.0.as_slice())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|data| data.get(key))
                .map(|text| text.as_bytes())
        });
    let Some(value) = value else {
        return BackendCaLookup::NotFound {
            what: format!("backend CA Secret {namespace}/{name} has no key {key}"),
        };
    };
    match check_bundle(value) {
        Ok(pem) => BackendCaLookup::Found { pem },
        Err(reason) => BackendCaLookup::Invalid {
            what: format!("backend CA Secret {namespace}/{name} key {key} {reason}"),
        },
    }
}

/// Reads the Secret of `reference` and resolves it; with the `resourceVersion` read.
pub async fn read(
    client: &Client,
    reference: &SecretKeyRef,
) -> Result<(Option<String>, BackendCaLookup), kube::Error> {
    let secret = Api::<Secret>::namespaced(client.clone(), &reference.namespace)
        .get_opt(&reference.name)
        .await?;
    let version = secret.as_ref().and_then(|s| s.resource_version());
    Ok((version, lookup(secret.as_ref(), reference)))
}

/// The `resourceVersion` of the Secret of `reference` in the metadata cache.
fn cached_version(
    secrets: &Store<PartialObjectMeta<Secret>>,
    reference: &SecretKeyRef,
) -> Option<String> {
    secrets
        .get(&ObjectRef::new(&reference.name).within(&reference.namespace))
        .and_then(|secret| secret.resource_version())
}

/// Hashes, for every backend CA Secret key `apps` name, the reference and the version of
/// its Secret in `secrets`: a value that changes when any of them changes.
pub fn fingerprint(
    apps: &Store<PublishedApp>,
    secrets: &Store<PartialObjectMeta<Secret>>,
    hasher: &mut DefaultHasher,
) {
    let apps = apps.state();
    for reference in references(apps.iter().map(|app| app.as_ref())) {
        let version = cached_version(secrets, &reference);
        (reference, version).hash(hasher);
    }
}

/// The backend CA lookups of the fleet configuration loop: a Secret is read again only
/// when its `resourceVersion` in the metadata cache differs from the one read last.
#[derive(Debug, Default)]
pub struct BackendCaCache {
    entries: BTreeMap<SecretKeyRef, (Option<String>, BackendCaLookup)>,
}

impl BackendCaCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// What every one of `wanted` resolves to now, reading the Secrets that changed;
    /// forgets references no longer wanted.
    pub async fn resolve(
        &mut self,
        client: &Client,
        secrets: &Store<PartialObjectMeta<Secret>>,
        wanted: &BTreeSet<SecretKeyRef>,
    ) -> Result<BackendCas, kube::Error> {
        self.entries
            .retain(|reference, _| wanted.contains(reference));
        let mut resolved = BackendCas::new();
        for reference in wanted {
            let version = cached_version(secrets, reference);
            let lookup = match self.entries.get(reference) {
                Some((read_version, lookup)) if *read_version == version => lookup.clone(),
                _ => {
                    let (read_version, lookup) = read(client, reference).await?;
                    self.entries
                        .insert(reference.clone(), (read_version, lookup.clone()));
                    lookup
                }
            };
            resolved.insert(reference.clone(), lookup);
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn certificate(name: &str) -> (String, Vec<u8>) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = CertificateParams::new(vec![name.to_owned()])
            .and_then(|p| p.self_signed(&key))
            .unwrap_or_else(|e| panic!("{e}"));
        (cert.pem(), cert.der().to_vec())
    }

    fn reference() -> SecretKeyRef {
        SecretKeyRef {
            namespace: "team-a".to_owned(),
            name: "corp-ca".to_owned(),
            key: "ca.crt".to_owned(),
        }
    }

    fn secret(key: &str, value: &[u8]) -> Secret {
        Secret {
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(value.to_vec()),
            )])),
            ..Secret::default()
        }
    }

    #[test]
    fn certificates_pass_re_encoded_and_nothing_else() {
        let (one, one_der) = certificate("one.corp");
        let (two, two_der) = certificate("two.corp");
        let bundle = format!("# corporate roots\n{one}\nsome comment\n{two}");
        let pem = check_bundle(bundle.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!pem.contains('#') && !pem.contains("comment"), "{pem}");
        let ders: Vec<Vec<u8>> = Pem::iter_from_buffer(pem.as_bytes())
            .map(|block| block.map(|b| b.contents).unwrap_or_default())
            .collect();
        assert_eq!(ders, [one_der, two_der]);
        assert!(pem.lines().all(|line| line.len() <= 64));
    }

    #[test]
    fn keys_garbage_and_empty_bundles_are_refused() {
        let (one, _) = certificate("one.corp");
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let with_key = format!("{one}{}", key.serialize_pem());
        let refused = check_bundle(with_key.as_bytes());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("PRIVATE KEY") && e.contains("only CERTIFICATE")),
            "{refused:?}"
        );
        for (bytes, expected) in [
            (&b""[..], "no PEM certificate"),
            (b"just text\n", "no PEM certificate"),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not X.509",
            ),
            (b"-----BEGIN CERTIFICATE-----\n", "not PEM"),
        ] {
            let result = check_bundle(bytes);
            assert!(
                result.as_ref().is_err_and(|e| e.contains(expected)),
                "{:?}: {result:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let huge = vec![b'a'; MAX_BUNDLE_BYTES + 1];
        assert!(check_bundle(&huge).is_err_and(|e| e.contains("more than")));
    }

    #[test]
    fn lookups_name_the_secret_and_key() {
        let (one, _) = certificate("one.corp");
        assert_eq!(
            lookup(None, &reference()).problem(),
            Some((NOT_FOUND, "backend CA Secret team-a/corp-ca does not exist"))
        );
        assert_eq!(
            lookup(Some(&secret("other", one.as_bytes())), &reference()).problem(),
            Some((
                NOT_FOUND,
                "backend CA Secret team-a/corp-ca has no key ca.crt"
            ))
        );
        let invalid = lookup(Some(&secret("ca.crt", b"not pem")), &reference());
        assert_eq!(
            invalid.problem(),
            Some((
                INVALID,
                "backend CA Secret team-a/corp-ca key ca.crt holds no PEM certificate"
            ))
        );
        let found = lookup(Some(&secret("ca.crt", one.as_bytes())), &reference());
        assert!(matches!(found, BackendCaLookup::Found { .. }), "{found:?}");
        assert_eq!(found.problem(), None);
    }
}
