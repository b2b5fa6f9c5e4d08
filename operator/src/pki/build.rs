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

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sallyport_identity::{AssertionKeys, AssertionKeysError, SessionKeys, SessionKeysError};
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
/// The key of the session key ring (JSON) in [`SESSION_KEYS`].
pub const SESSION_KEYS_KEY: &str = "keys.json";
/// The key of the signing key (PEM bundle) in [`ASSERTION_SIGNING`].
pub const ASSERTION_KEY: &str = "key.pem";
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
    /// The session key ring could not be made or rotated.
    #[error("Secret {SESSION_KEYS}: {0}")]
    SessionKeys(#[source] SessionKeysError),
    /// The assertion signing key could not be made.
    #[error("Secret {ASSERTION_SIGNING}: {0}")]
    AssertionKey(#[source] AssertionKeysError),
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

/// The session-cookie key ring (the format is `sallyport_identity::SessionKeys`'s: one
/// active key seals, every key opens, so rotating signs nobody out).
#[derive(Debug)]
pub struct KeyRing(pub Option<SessionKeys>);

/// How often the session key rotates and how many keys the ring keeps.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// A new active key once the current one is this old.
    pub every: Duration,
    /// Keys kept in the ring (the active one included): a retired key stays for
    /// `every x (keep - 1)`, so sessions younger than that still open.
    pub keep: usize,
}

impl KeyRing {
    /// Reads the ring from its Secret; an absent or unreadable ring is `None` (and is
    /// replaced: everyone signs in again).
    pub fn from_secret(secret: Option<&Secret>) -> Self {
        Self(
            secret
                .and_then(|s| field(s, SESSION_KEYS_KEY))
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|text| SessionKeys::parse(text).ok()),
        )
    }

    /// The ring after rotation at `now`, or `None` when the active key is still fresh.
    pub fn rotated(
        &self,
        now: Timestamp,
        rotation: Rotation,
    ) -> Result<Option<SessionKeys>, PkiError> {
        let now = u64::try_from(now.as_second()).unwrap_or(0);
        let every = rotation.every.as_secs();
        let Some(ring) = &self.0 else {
            return SessionKeys::generate(now)
                .map(Some)
                .map_err(PkiError::SessionKeys);
        };
        let fresh = ring
            .active_created()
            .is_some_and(|created| created <= now && now - created < every);
        if fresh {
            return Ok(None);
        }
        // A key retired exactly `every x (keep - 1)` ago goes: the ring then holds `keep`.
        let keep_retired = every
            .saturating_mul(rotation.keep.saturating_sub(1) as u64)
            .saturating_sub(1);
        let mut rotated = SessionKeys::parse(&ring.to_json()).map_err(PkiError::SessionKeys)?;
        rotated
            .rotate(now, keep_retired)
            .map_err(PkiError::SessionKeys)?;
        Ok(Some(rotated))
    }
}

/// The Secret of `ring`.
pub fn session_keys_secret(ring: &SessionKeys, namespace: &str) -> Secret {
    secret(
        SESSION_KEYS,
        namespace,
        "session-keys",
        "Opaque",
        BTreeMap::from([(SESSION_KEYS_KEY.to_owned(), ring.to_json().into_bytes())]),
    )
}

/// A new ES256 key for identity assertions as the `sallyport-assertion-signing` Secret:
/// `key.pem` (the PEM bundle the proxies sign with), and for reference its `kid` and
/// public `jwks.json` (what every app host serves at `/.sallyport/jwks.json`).
pub fn assertion_signing_key(namespace: &str) -> Result<Secret, PkiError> {
    let pem = AssertionKeys::generate_pem().map_err(PkiError::AssertionKey)?;
    let keys = AssertionKeys::from_pem(&pem).map_err(PkiError::AssertionKey)?;
    Ok(secret(
        ASSERTION_SIGNING,
        namespace,
        "assertion-signing",
        "Opaque",
        BTreeMap::from([
            (ASSERTION_KEY.to_owned(), pem.into_bytes()),
            ("kid".to_owned(), keys.kid().as_bytes().to_vec()),
            ("jwks.json".to_owned(), keys.jwks().as_bytes().to_vec()),
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
        let first = ok(KeyRing(None).rotated(at("2026-01-01T00:00:00Z"), rotation))
            .unwrap_or_else(|| panic!("an empty ring gets a key"));
        assert_eq!(first.ids().count(), 1);
        let first_id = first.active_id().to_owned();
        let secret = session_keys_secret(&first, "ops");
        assert_eq!(
            ok(KeyRing::from_secret(Some(&secret)).rotated(at("2026-01-01T12:00:00Z"), rotation))
                .map(|r| r.active_id().to_owned()),
            None,
            "a fresh key stays"
        );
        let mut secret = secret;
        for day in 2..=6 {
            let rotated = ok(KeyRing::from_secret(Some(&secret))
                .rotated(at(&format!("2026-01-0{day}T00:00:00Z")), rotation))
            .unwrap_or_else(|| panic!("day {day}: the key is a day old"));
            secret = session_keys_secret(&rotated, "ops");
        }
        let ring = KeyRing::from_secret(Some(&secret))
            .0
            .unwrap_or_else(|| panic!("the ring reads back"));
        assert_eq!(ring.ids().count(), 3, "{ring:?}");
        assert!(
            !ring.ids().any(|id| id == first_id),
            "the oldest key must have left the ring"
        );
    }

    #[test]
    fn the_assertion_key_publishes_its_public_half() {
        let secret = ok(assertion_signing_key("ops"));
        let pem =
            String::from_utf8_lossy(field(&secret, ASSERTION_KEY).unwrap_or_default()).into_owned();
        let keys = ok(AssertionKeys::from_pem(&pem));
        let jwks: serde_json::Value = ok(serde_json::from_slice(
            field(&secret, "jwks.json").unwrap_or_default(),
        ));
        let key = &jwks["keys"][0];
        assert_eq!(
            (
                key["kty"].as_str(),
                key["crv"].as_str(),
                key["kid"].as_str()
            ),
            (Some("EC"), Some("P-256"), Some(keys.kid()))
        );
        assert!(
            !String::from_utf8_lossy(field(&secret, "jwks.json").unwrap_or_default())
                .contains("\"d\""),
            "the JWKS must not carry the private key"
        );
    }
}
