//! The pure part of the fleet's PKI: what to keep, what to (re)issue, and the Secrets.
//!
//! | Secret | holds | held by |
//! | --- | --- | --- |
//! | `sallyport-root-ca` | the root CA certificate and key | the operator only |
//! | `sallyport-connector-issuer` | the CA that signs connector client certificates | the proxy fleet (registration) |
//! | `sallyport-tunnel-tls` | the serving certificate connectors verify when they dial | the proxy fleet |
//! | `sallyport-session-keys` | the key ring that encrypts session cookies | the proxy fleet |
//! | `sallyport-assertion-signing` | the key that signs identity assertions, and its JWKS | the proxy fleet |

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use crate::managed::{MANAGED_BY, MANAGED_BY_LABEL};

/// The Secret of the root CA.
pub const ROOT_CA: &str = "sallyport-root-ca";
/// The Secret of the connector-certificate issuer.
pub const CONNECTOR_ISSUER: &str = "sallyport-connector-issuer";
/// The Secret of the tunnel serving certificate.
pub const TUNNEL_TLS: &str = "sallyport-tunnel-tls";
/// The Secret of the session-cookie key ring.
pub const SESSION_KEYS: &str = "sallyport-session-keys";
/// The Secret of the identity-assertion signing key.
pub const ASSERTION_SIGNING: &str = "sallyport-assertion-signing";
/// The label naming a PKI Secret's role.
pub const PKI_ROLE_LABEL: &str = "sallyport.dev/pki";

const DAY: u64 = 86_400;
/// Lifetimes: (validity, renew when less than this remains).
pub const ROOT_LIFETIME: (Duration, Duration) = (
    Duration::from_secs(10 * 365 * DAY),
    Duration::from_secs(365 * DAY),
);
/// The issuer outlives any connector certificate it signs (at most 8760h) by a margin.
pub const ISSUER_LIFETIME: (Duration, Duration) = (
    Duration::from_secs(3 * 365 * DAY),
    Duration::from_secs(400 * DAY),
);
/// The tunnel serving certificate is short-lived.
pub const TUNNEL_LIFETIME: (Duration, Duration) =
    (Duration::from_secs(90 * DAY), Duration::from_secs(30 * DAY));

/// The PKI could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating a key or certificate failed.
    #[error("cannot generate the {what}: {source}")]
    Generate {
        /// Which object.
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },
    /// The root CA Secret cannot be used to sign.
    #[error("Secret {ROOT_CA} is unusable: {0}")]
    RootUnusable(String),
    /// The operating system gave no random bytes.
    #[error("cannot generate a session key: {0}")]
    Random(getrandom::Error),
    /// Serializing the key ring failed.
    #[error("cannot serialize the session key ring: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Whether a PKI Secret stays or is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Good as it is.
    Keep,
    /// Replace it, for this reason.
    Issue(&'static str),
}

fn field<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
}

/// Whether the certificate Secret `existing` can stay: present, readable, far enough
/// from expiry, valid for `names`, and issued by `ca_pem` (when given).
pub fn plan_certificate(
    existing: Option<&Secret>,
    now: Timestamp,
    renew_before: Duration,
    names: &[String],
    ca_pem: Option<&[u8]>,
) -> Plan {
    let Some(secret) = existing else {
        return Plan::Issue("missing");
    };
    let (Some(cert_pem), Some(_key)) = (field(secret, "tls.crt"), field(secret, "tls.key")) else {
        return Plan::Issue("incomplete");
    };
    let Ok((_, pem)) = parse_x509_pem(cert_pem) else {
        return Plan::Issue("unreadable");
    };
    let Ok(cert) = pem.parse_x509() else {
        return Plan::Issue("unreadable");
    };
    let renew_at = cert.validity().not_after.timestamp()
        - i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
    if now.as_second() >= renew_at {
        return Plan::Issue("near expiry");
    }
    let mut present = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                present.push((*dns).to_owned());
            }
        }
    }
    if !names.iter().all(|n| present.contains(n)) {
        return Plan::Issue("host names changed");
    }
    if let Some(ca) = ca_pem
        && field(secret, "ca.crt") != Some(ca)
    {
        return Plan::Issue("issued by another CA");
    }
    Plan::Keep
}

fn labels(role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (PKI_ROLE_LABEL.to_owned(), role.to_owned()),
    ])
}

fn secret(
    name: &str,
    namespace: &str,
    role: &str,
    type_: &str,
    data: BTreeMap<String, Vec<u8>>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(role)),
            ..ObjectMeta::default()
        },
        type_: Some(type_.to_owned()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    }
}

fn validity(params: &mut CertificateParams, now: Timestamp, lifetime: Duration) {
    let start = time::OffsetDateTime::from_unix_timestamp(now.as_second() - 300)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    params.not_before = start;
    params.not_after = start + lifetime;
}

/// A new self-signed root CA, as the `sallyport-root-ca` Secret.
pub fn root_ca(namespace: &str, now: Timestamp) -> Result<Secret, PkiError> {
    let generate = |source| PkiError::Generate {
        what: "root CA",
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Sallyport root CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sallyport");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, now, ROOT_LIFETIME.0);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok(secret(
        ROOT_CA,
        namespace,
        "root-ca",
        "kubernetes.io/tls",
        BTreeMap::from([
            ("tls.crt".to_owned(), cert.pem().into_bytes()),
            ("tls.key".to_owned(), key.serialize_pem().into_bytes()),
        ]),
    ))
}

/// The root CA's certificate PEM and a signer, from its Secret.
pub struct Root {
    /// The certificate, PEM.
    pub certificate_pem: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Root {
    /// Reads the root CA Secret.
    pub fn from_secret(secret: &Secret) -> Result<Self, PkiError> {
        let certificate_pem = field(secret, "tls.crt")
            .ok_or_else(|| PkiError::RootUnusable("no tls.crt".into()))?
            .to_vec();
        let key_pem =
            field(secret, "tls.key").ok_or_else(|| PkiError::RootUnusable("no tls.key".into()))?;
        let key_text =
            std::str::from_utf8(key_pem).map_err(|e| PkiError::RootUnusable(e.to_string()))?;
        let key = KeyPair::from_pem(key_text).map_err(|e| PkiError::RootUnusable(e.to_string()))?;
        let cert_text = std::str::from_utf8(&certificate_pem)
            .map_err(|e| PkiError::RootUnusable(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_text, key)
            .map_err(|e| PkiError::RootUnusable(e.to_string()))?;
        Ok(Self {
            certificate_pem,
            issuer,
        })
    }

    fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
        what: &'static str,
    ) -> Result<String, PkiError> {
        Ok(params
            .signed_by(key, &self.issuer)
            .map_err(|source| PkiError::Generate { what, source })?
            .pem())
    }
}

/// A new connector-certificate issuer (an intermediate CA that signs only client
/// certificates), as the `sallyport-connector-issuer` Secret.
pub fn connector_issuer(namespace: &str, root: &Root, now: Timestamp) -> Result<Secret, PkiError> {
    let what = "connector issuer";
    let key = KeyPair::generate().map_err(|source| PkiError::Generate { what, source })?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Sallyport connector issuer");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sallyport");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, now, ISSUER_LIFETIME.0);
    let cert = root.sign(&params, &key, what)?;
    Ok(secret(
        CONNECTOR_ISSUER,
        namespace,
        "connector-issuer",
        "kubernetes.io/tls",
        BTreeMap::from([
            ("tls.crt".to_owned(), cert.into_bytes()),
            ("tls.key".to_owned(), key.serialize_pem().into_bytes()),
            ("ca.crt".to_owned(), root.certificate_pem.clone()),
        ]),
    ))
}

/// A new tunnel serving certificate for `names`, as the `sallyport-tunnel-tls` Secret.
pub fn tunnel_serving(
    namespace: &str,
    root: &Root,
    names: &[String],
    now: Timestamp,
) -> Result<Secret, PkiError> {
    let what = "tunnel serving certificate";
    let key = KeyPair::generate().map_err(|source| PkiError::Generate { what, source })?;
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|source| PkiError::Generate { what, source })?;
    params.distinguished_name.push(
        DnType::CommonName,
        names
            .first()
            .map(String::as_str)
            .unwrap_or("sallyport-tunnel"),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, now, TUNNEL_LIFETIME.0);
    let cert = root.sign(&params, &key, what)?;
    Ok(secret(
        TUNNEL_TLS,
        namespace,
        "tunnel-tls",
        "kubernetes.io/tls",
        BTreeMap::from([
            ("tls.crt".to_owned(), cert.into_bytes()),
            ("tls.key".to_owned(), key.serialize_pem().into_bytes()),
            ("ca.crt".to_owned(), root.certificate_pem.clone()),
        ]),
    ))
}

/// One session-cookie encryption key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionKey {
    /// Key id, carried in each cookie so the right key opens it.
    pub id: String,
    /// 32 random bytes, base64.
    pub key: String,
    /// When the key was made.
    pub created_at: Timestamp,
}

/// The session-cookie key ring: the first key seals new cookies; every key opens them,
/// so rotating signs nobody out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    /// Newest first.
    pub keys: Vec<SessionKey>,
}

/// How often the session key rotates and how many keys the ring keeps.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// A new primary key once the current one is this old.
    pub every: Duration,
    /// Keys kept in the ring (the primary included).
    pub keep: usize,
}

impl KeyRing {
    /// Reads the ring from its Secret; an unreadable ring counts as empty.
    pub fn from_secret(secret: Option<&Secret>) -> Self {
        secret
            .and_then(|s| field(s, "keys.json"))
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }

    /// The ring after rotation at `now`, or `None` when the primary key is still fresh.
    pub fn rotated(&self, now: Timestamp, rotation: Rotation) -> Result<Option<Self>, PkiError> {
        let fresh = self.keys.first().is_some_and(|primary| {
            let age = now.duration_since(primary.created_at);
            age >= SignedDuration::ZERO
                && age < SignedDuration::try_from(rotation.every).unwrap_or(SignedDuration::MAX)
        });
        if fresh {
            return Ok(None);
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(PkiError::Random)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(PkiError::Random)?;
        let mut keys = vec![SessionKey {
            id: URL_SAFE_NO_PAD.encode(id),
            key: STANDARD.encode(bytes),
            created_at: now,
        }];
        keys.extend(
            self.keys
                .iter()
                .take(rotation.keep.saturating_sub(1))
                .cloned(),
        );
        Ok(Some(Self { keys }))
    }

    /// The ring as its Secret.
    pub fn to_secret(&self, namespace: &str) -> Result<Secret, PkiError> {
        Ok(secret(
            SESSION_KEYS,
            namespace,
            "session-keys",
            "Opaque",
            BTreeMap::from([("keys.json".to_owned(), serde_json::to_vec_pretty(self)?)]),
        ))
    }
}

/// A new ES256 key for identity assertions, with its public JWKS, as the
/// `sallyport-assertion-signing` Secret.
pub fn assertion_signing_key(namespace: &str, now: Timestamp) -> Result<Secret, PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "assertion signing key",
        source,
    })?;
    // The raw public key is the uncompressed P-256 point: 0x04 || x || y.
    let point = key.public_key_raw();
    let (x, y) = point
        .get(1..)
        .map(|xy| xy.split_at(xy.len() / 2))
        .unwrap_or_default();
    let kid = format!("sallyport-{}", now.as_second());
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    }]});
    Ok(secret(
        ASSERTION_SIGNING,
        namespace,
        "assertion-signing",
        "Opaque",
        BTreeMap::from([
            ("key.pem".to_owned(), key.serialize_pem().into_bytes()),
            ("kid".to_owned(), kid.into_bytes()),
            ("jwks.json".to_owned(), serde_json::to_vec_pretty(&jwks)?),
        ]),
    ))
}

#[cfg(test)]
mod tests {
    use x509_parser::certificate::X509Certificate;

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    fn certificate(secret: &Secret) -> X509Certificate<'static> {
        let pem_bytes = field(secret, "tls.crt").unwrap_or_default().to_vec();
        let (_, pem) = ok(parse_x509_pem(&pem_bytes));
        let der: &'static [u8] = Box::leak(pem.contents.into_boxed_slice());
        ok(x509_parser::parse_x509_certificate(der)).1
    }

    #[test]
    fn the_root_is_kept_until_a_year_before_it_expires() {
        let now = at("2026-01-01T00:00:00Z");
        assert_eq!(
            plan_certificate(None, now, ROOT_LIFETIME.1, &[], None),
            Plan::Issue("missing")
        );
        let root = ok(root_ca("ops", now));
        assert_eq!(
            plan_certificate(Some(&root), now, ROOT_LIFETIME.1, &[], None),
            Plan::Keep
        );
        let nine_and_a_half_years = at("2035-07-01T00:00:00Z");
        assert_eq!(
            plan_certificate(
                Some(&root),
                nine_and_a_half_years,
                ROOT_LIFETIME.1,
                &[],
                None
            ),
            Plan::Issue("near expiry")
        );
        let cert = certificate(&root);
        assert!(cert.is_ca());
        assert_eq!(cert.subject(), cert.issuer());
    }

    #[test]
    fn the_connector_issuer_is_a_client_auth_ca_under_the_root() {
        let now = at("2026-01-01T00:00:00Z");
        let root_secret = ok(root_ca("ops", now));
        let root = ok(Root::from_secret(&root_secret));
        let issuer = ok(connector_issuer("ops", &root, now));
        let cert = certificate(&issuer);
        assert!(cert.is_ca());
        assert_eq!(cert.issuer(), certificate(&root_secret).subject());
        let eku = ok(cert.extended_key_usage()).map(|e| (e.value.client_auth, e.value.server_auth));
        assert_eq!(eku, Some((true, false)));
        assert_eq!(
            plan_certificate(
                Some(&issuer),
                now,
                ISSUER_LIFETIME.1,
                &[],
                Some(&root.certificate_pem)
            ),
            Plan::Keep
        );

        let other_root = ok(Root::from_secret(&ok(root_ca("ops", now))));
        let plan = plan_certificate(
            Some(&issuer),
            now,
            ISSUER_LIFETIME.1,
            &[],
            Some(&other_root.certificate_pem),
        );
        assert_eq!(plan, Plan::Issue("issued by another CA"));
    }

    #[test]
    fn the_tunnel_certificate_follows_its_host_names_and_age() {
        let now = at("2026-01-01T00:00:00Z");
        let root = ok(Root::from_secret(&ok(root_ca("ops", now))));
        let names = vec!["tunnel.example.com".to_owned()];
        let tunnel = ok(tunnel_serving("ops", &root, &names, now));
        let ca = Some(root.certificate_pem.as_slice());
        assert_eq!(
            plan_certificate(Some(&tunnel), now, TUNNEL_LIFETIME.1, &names, ca),
            Plan::Keep
        );
        let more = vec![
            "tunnel.example.com".to_owned(),
            "tunnel2.example.com".to_owned(),
        ];
        assert_eq!(
            plan_certificate(Some(&tunnel), now, TUNNEL_LIFETIME.1, &more, ca),
            Plan::Issue("host names changed")
        );
        let day_61 = at("2026-03-02T00:00:00Z");
        assert_eq!(
            plan_certificate(Some(&tunnel), day_61, TUNNEL_LIFETIME.1, &names, ca),
            Plan::Issue("near expiry")
        );
        let eku = ok(certificate(&tunnel).extended_key_usage()).map(|e| e.value.server_auth);
        assert_eq!(eku, Some(true));
    }

    #[test]
    fn the_key_ring_rotates_and_keeps_older_keys_to_open_old_cookies() {
        let rotation = Rotation {
            every: Duration::from_secs(86_400),
            keep: 3,
        };
        let first = ok(KeyRing::default().rotated(at("2026-01-01T00:00:00Z"), rotation))
            .unwrap_or_default();
        assert_eq!(first.keys.len(), 1);
        assert_eq!(ok(STANDARD.decode(&first.keys[0].key)).len(), 32);
        assert_eq!(
            ok(first.rotated(at("2026-01-01T12:00:00Z"), rotation)),
            None
        );
        let mut ring = first.clone();
        for day in 2..=5 {
            ring = ok(ring.rotated(at(&format!("2026-01-0{day}T00:00:00Z")), rotation))
                .unwrap_or_default();
        }
        assert_eq!(ring.keys.len(), 3);
        assert_eq!(ring.keys[0].created_at, at("2026-01-05T00:00:00Z"));
        assert!(
            !ring.keys.iter().any(|k| k.id == first.keys[0].id),
            "the oldest key must have left the ring"
        );
        let secret = ok(ring.to_secret("ops"));
        assert_eq!(KeyRing::from_secret(Some(&secret)), ring);
    }

    #[test]
    fn the_assertion_key_publishes_its_public_half() {
        let secret = ok(assertion_signing_key("ops", at("2026-01-01T00:00:00Z")));
        let jwks: serde_json::Value = ok(serde_json::from_slice(
            field(&secret, "jwks.json").unwrap_or_default(),
        ));
        let key = &jwks["keys"][0];
        assert_eq!(
            (
                key["kty"].as_str(),
                key["crv"].as_str(),
                key["alg"].as_str()
            ),
            (Some("EC"), Some("P-256"), Some("ES256"))
        );
        for coordinate in ["x", "y"] {
            let bytes = ok(URL_SAFE_NO_PAD.decode(key[coordinate].as_str().unwrap_or_default()));
            assert_eq!(bytes.len(), 32, "{coordinate}");
        }
        assert!(
            String::from_utf8_lossy(field(&secret, "key.pem").unwrap_or_default())
                .contains("PRIVATE KEY")
        );
        assert!(
            !String::from_utf8_lossy(field(&secret, "jwks.json").unwrap_or_default())
                .contains("\"d\"")
        );
    }
}
