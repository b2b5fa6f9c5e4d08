//! The connector certificate issuer: checks a connector's certificate signing request
//! and signs a client certificate for it.
//!
//! Only the CSR's public key is used. Everything else in the certificate is the fleet's
//! choice: subject CN = the connector's name, exactly one URI SAN = the connector's
//! identity ([`ConnectorIdentity::uri`]), extended key usage `clientAuth` only, key usage
//! `digitalSignature`, not a CA, a random 128-bit serial, valid from five minutes ago
//! (clock skew) for the group's `certificate.validity`, never past the issuer's own
//! expiry.
//!
//! **Accepted keys** are those a TLS handshake with the fleet can verify (rustls with
//! `ring`): ECDSA P-256 and P-384 (uncompressed points), Ed25519, and RSA
//! (`rsaEncryption`) of 2048 to 8192 bits. RSA-PSS-only keys, P-521, DSA and anything
//! else are refused, as are CSRs signed with SHA-1.
//!
//! **Refused requests**: a CSR that asks for a CA (basicConstraints `cA=true`, or key
//! usage `keyCertSign`/`cRLSign`) or for any extended key usage but `clientAuth`. Other
//! requested names and extensions are ignored, not refused: the fleet writes its own.
//!
//! **Renewal time**: `renew_at = now + min(renewAfter, 2/3 of the certificate's
//! lifetime)`, so a connector asks for a new certificate with a third of the lifetime
//! left at the latest, even when the lifetime was cut short by the issuer's expiry.

use std::path::{Path, PathBuf};

use rcgen::{
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use sallyport_api::connector_group::CertificatePolicy;
use sallyport_tunnel::ConnectorIdentity;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The largest CSR, as PEM text, that is looked at.
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// How far before the moment of issue a certificate becomes valid, for clock skew.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// The largest RSA modulus accepted, in bits (what rustls with `ring` verifies).
pub const MAX_RSA_BITS: usize = 8192;

/// The files of the mounted `sallyport-connector-issuer` Secret.
pub const ISSUER_CERT_FILE: &str = "tls.crt";
/// The issuer's private key file.
pub const ISSUER_KEY_FILE: &str = "tls.key";
/// The fleet root CA file.
pub const ROOT_CA_FILE: &str = "ca.crt";

/// The issuer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// A file of the mounted issuer Secret could not be read.
    #[error("cannot read the connector issuer's {what} at {path}: {source}")]
    Read {
        /// Which part: certificate, key or root CA.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A part is not usable as given.
    #[error("the connector issuer's {what} is unusable: {reason}")]
    Invalid {
        /// Which part: certificate, key or root CA.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// A CSR was refused, or no certificate could be made from it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    /// The PEM text is larger than [`MAX_CSR_PEM_LEN`].
    #[error("the CSR is {size} bytes long; at most {limit} bytes of PEM are accepted")]
    TooLarge {
        /// The size given.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The text is not one PEM `CERTIFICATE REQUEST` holding a PKCS#10 request.
    #[error("the CSR is not a PEM PKCS#10 certificate signing request: {reason}")]
    Malformed {
        /// What the parser found.
        reason: String,
    },
    /// The request's self-signature does not verify with its own public key.
    #[error("the CSR's signature does not verify with its public key: {reason}")]
    BadSignature {
        /// Why.
        reason: String,
    },
    /// The public key is not of an accepted type or size.
    #[error(
        "the CSR's public key is not accepted: {reason}; use ECDSA P-256 or P-384, Ed25519, or RSA of 2048 to 8192 bits"
    )]
    UnacceptableKey {
        /// What the key is.
        reason: String,
    },
    /// The request asks for a CA certificate.
    #[error(
        "the CSR asks for a CA certificate ({detail}); connectors only get client certificates"
    )]
    RequestsCa {
        /// Which extension asked for it.
        detail: String,
    },
    /// The request asks for an extended key usage other than `clientAuth`.
    #[error(
        "the CSR asks for the extended key usage {usage}; connectors only get clientAuth certificates"
    )]
    RequestsUsage {
        /// The usage asked for.
        usage: String,
    },
    /// The group's certificate policy cannot be applied.
    #[error("the ConnectorGroup's certificate.{field} {value:?} is unusable: {reason}")]
    Policy {
        /// `validity` or `renewAfter`.
        field: &'static str,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The issuer failed to sign (its fault, not the CSR's).
    #[error("the connector issuer cannot sign: {reason}")]
    Signing {
        /// Why.
        reason: String,
    },
}

impl CsrError {
    /// The stable, machine-readable reason the fleet API reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "CsrTooLarge",
            Self::Malformed { .. } => "CsrMalformed",
            Self::BadSignature { .. } => "CsrBadSignature",
            Self::UnacceptableKey { .. } => "CsrUnacceptableKey",
            Self::RequestsCa { .. } => "CsrRequestsCa",
            Self::RequestsUsage { .. } => "CsrRequestsUsage",
            Self::Policy { .. } => "CertificatePolicyInvalid",
            Self::Signing { .. } => "IssuerFailed",
        }
    }

    /// Whether the caller's request is at fault (as opposed to the fleet).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Policy { .. } | Self::Signing { .. })
    }
}

/// The kind of an accepted public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with a modulus of this many bits.
    Rsa(usize),
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EcdsaP256 => f.write_str("ECDSA P-256"),
            Self::EcdsaP384 => f.write_str("ECDSA P-384"),
            Self::Ed25519 => f.write_str("Ed25519"),
            Self::Rsa(bits) => write!(f, "RSA-{bits}"),
        }
    }
}

/// A CSR that passed every check: what is kept of it is its public key.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    public_key: rcgen::SubjectPublicKeyInfo,
    kind: KeyKind,
}

impl CheckedCsr {
    /// The kind of the requested key.
    pub fn key_kind(&self) -> KeyKind {
        self.kind
    }
}

/// A certificate the issuer made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// PEM: the connector's certificate followed by the issuer's.
    pub chain_pem: String,
    /// The certificate's serial number, lower-case hexadecimal without separators.
    pub serial_hex: String,
    /// When it was issued (to the second).
    pub issued_at: OffsetDateTime,
    /// When it becomes valid ([`BACKDATE`] before it was issued).
    pub not_before: OffsetDateTime,
    /// When it expires.
    pub not_after: OffsetDateTime,
    /// When the connector should ask for a new one.
    pub renew_at: OffsetDateTime,
}

/// The connector certificate issuer: the intermediate CA of the
/// `sallyport-connector-issuer` Secret, and the fleet root CA above it.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    certificate_pem: String,
    root_ca_pem: String,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn invalid(what: &'static str) -> impl Fn(String) -> IssuerError {
    move |reason| IssuerError::Invalid { what, reason }
}

/// The DER of the first PEM certificate of `pem`.
fn first_certificate_der(what: &'static str, pem: &str) -> Result<Vec<u8>, IssuerError> {
    let certificates = sallyport_tunnel::tls::certificates_from_pem(what, pem.as_bytes())
        .map_err(|e| invalid(what)(e.to_string()))?;
    certificates
        .into_iter()
        .next()
        .map(|c| c.to_vec())
        .ok_or_else(|| invalid(what)("no certificate".to_owned()))
}

fn with_newline(pem: &str) -> String {
    let mut text = pem.trim_end().to_owned();
    text.push('\n');
    text
}

impl Issuer {
    /// The issuer from its certificate and key and the root CA above it, all PEM. The
    /// key must belong to the certificate, the certificate must be a CA and must be
    /// signed by the root.
    pub fn from_pem(
        issuer_cert_pem: &str,
        issuer_key_pem: &str,
        root_ca_pem: &str,
    ) -> Result<Self, IssuerError> {
        const CERT: &str = "certificate (tls.crt)";
        const KEY: &str = "private key (tls.key)";
        const ROOT: &str = "root CA (ca.crt)";
        let issuer_der = first_certificate_der(CERT, issuer_cert_pem)?;
        let root_der = first_certificate_der(ROOT, root_ca_pem)?;
        let (_, issuer_cert) = x509_parser::parse_x509_certificate(&issuer_der)
            .map_err(|e| invalid(CERT)(e.to_string()))?;
        let (_, root_cert) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| invalid(ROOT)(e.to_string()))?;
        if !issuer_cert.is_ca() {
            return Err(invalid(CERT)("it is not a CA certificate".to_owned()));
        }
        issuer_cert
            .verify_signature(Some(root_cert.public_key()))
            .map_err(|e| invalid(CERT)(format!("it is not signed by the root CA: {e}")))?;
        let key = KeyPair::from_pem(issuer_key_pem).map_err(|e| invalid(KEY)(e.to_string()))?;
        if key.subject_public_key_info() != issuer_cert.public_key().raw {
            return Err(invalid(KEY)(
                "it does not belong to the issuer certificate".to_owned(),
            ));
        }
        let not_after = issuer_cert.validity().not_after.to_datetime();
        let signer = rcgen::Issuer::from_ca_cert_der(&issuer_der.clone().into(), key)
            .map_err(|e| invalid(CERT)(e.to_string()))?;
        Ok(Self {
            signer,
            certificate_pem: with_newline(issuer_cert_pem),
            root_ca_pem: with_newline(root_ca_pem),
            not_after,
        })
    }

    /// The issuer from a directory holding the `sallyport-connector-issuer` Secret's
    /// files: [`ISSUER_CERT_FILE`], [`ISSUER_KEY_FILE`] and [`ROOT_CA_FILE`].
    pub fn from_dir(dir: &Path) -> Result<Self, IssuerError> {
        let read = |what: &'static str, file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| IssuerError::Read {
                what,
                path,
                source,
            })
        };
        Self::from_pem(
            &read("certificate", ISSUER_CERT_FILE)?,
            &read("private key", ISSUER_KEY_FILE)?,
            &read("root CA", ROOT_CA_FILE)?,
        )
    }

    /// The fleet root CA, PEM, as connectors should trust it.
    pub fn root_ca_pem(&self) -> &str {
        &self.root_ca_pem
    }

    /// The issuer's certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// When the issuer's certificate expires; no certificate it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Checks `csr_pem` (size, syntax, self-signature, key, requested extensions)
    /// without signing anything.
    pub fn check(csr_pem: &str) -> Result<CheckedCsr, CsrError> {
        if csr_pem.len() > MAX_CSR_PEM_LEN {
            return Err(CsrError::TooLarge {
                size: csr_pem.len(),
                limit: MAX_CSR_PEM_LEN,
            });
        }
        let malformed = |reason: String| CsrError::Malformed { reason };
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| malformed(format!("no CERTIFICATE REQUEST PEM block: {e}")))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} bytes follow the request",
                rest.len()
            )));
        }
        let info = &csr.certification_request_info;
        let kind = check_key(&info.subject_pki)?;
        let algorithm = &csr.signature_algorithm.algorithm;
        if *algorithm == OID_PKCS1_SHA1WITHRSA || *algorithm == OID_SHA1_WITH_RSA {
            return Err(CsrError::BadSignature {
                reason: "it is made with SHA-1, which is not accepted".to_owned(),
            });
        }
        csr.verify_signature().map_err(|e| CsrError::BadSignature {
            reason: e.to_string(),
        })?;
        check_requested_extensions(&csr)?;
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw).map_err(|e| {
                CsrError::UnacceptableKey {
                    reason: e.to_string(),
                }
            })?;
        Ok(CheckedCsr { public_key, kind })
    }

    /// Checks `csr_pem` and signs a client certificate for `identity` with its public
    /// key, valid as `policy` says from `now`.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &ConnectorIdentity,
        policy: &CertificatePolicy,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CsrError> {
        let csr = Self::check(csr_pem)?;
        self.sign_checked(&csr, identity, policy, now)
    }

    /// Signs a client certificate for `identity` with the public key of an already
    /// checked CSR.
    pub fn sign_checked(
        &self,
        csr: &CheckedCsr,
        identity: &ConnectorIdentity,
        policy: &CertificatePolicy,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CsrError> {
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let validity = policy_duration("validity", &policy.validity)?;
        let renew_after = policy_duration("renewAfter", &policy.renew_after)?;
        let signing = |reason: String| CsrError::Signing { reason };
        let not_after = now
            .checked_add(validity)
            .map_or(self.not_after, |t| t.min(self.not_after));
        if not_after <= now {
            return Err(signing(format!(
                "its certificate expired at {}; the operator renews the sallyport-connector-issuer Secret",
                self.not_after
            )));
        }
        let lifetime = not_after - now;
        let two_thirds = lifetime.checked_mul(2).map_or(lifetime, |d| d / 3);
        let renew_at = now + renew_after.min(two_thirds);
        let not_before = now - BACKDATE;

        let serial = random_serial().map_err(|e| signing(format!("no random serial: {e}")))?;
        let uri = rcgen::string::Ia5String::try_from(identity.uri())
            .map_err(|e| signing(format!("identity URI: {e}")))?;
        let mut params = rcgen::CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.name());
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&csr.public_key, &self.signer)
            .map_err(|e| signing(e.to_string()))?;
        Ok(IssuedCertificate {
            chain_pem: format!(
                "{}{}",
                with_newline(&certificate.pem()),
                self.certificate_pem
            ),
            serial_hex: serial.iter().map(|b| format!("{b:02x}")).collect(),
            issued_at: now,
            not_before,
            not_after,
            renew_at,
        })
    }
}

fn policy_duration(
    field: &'static str,
    value: &sallyport_api::Duration,
) -> Result<time::Duration, CsrError> {
    let policy = |reason: String| CsrError::Policy {
        field,
        value: value.to_string(),
        reason,
    };
    let length = value.to_std().map_err(|e| policy(e.to_string()))?;
    time::Duration::try_from(length).map_err(|e| policy(e.to_string()))
}

/// 16 random bytes, the first with its top bit clear (a positive DER integer) and not
/// zero (so the encoding keeps all 16 bytes).
fn random_serial() -> Result<[u8; 16], getrandom::Error> {
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial)?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    Ok(serial)
}

fn check_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let unacceptable = |reason: String| CsrError::UnacceptableKey { reason };
    let algorithm = &spki.algorithm.algorithm;
    let point = spki.subject_public_key.data.as_ref();
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let (kind, length) = match curve {
            Some(oid) if oid == OID_EC_P256 => (KeyKind::EcdsaP256, 65),
            Some(oid) if oid == OID_NIST_EC_P384 => (KeyKind::EcdsaP384, 97),
            Some(oid) => return Err(unacceptable(format!("an EC key on the curve {oid}"))),
            None => return Err(unacceptable("an EC key without a named curve".to_owned())),
        };
        if point.len() != length || point.first() != Some(&4) {
            return Err(unacceptable(format!(
                "a {kind} key that is not an uncompressed point of {length} bytes"
            )));
        }
        Ok(kind)
    } else if *algorithm == OID_SIG_ED25519 {
        if spki.algorithm.parameters.is_some() || point.len() != 32 {
            return Err(unacceptable("a malformed Ed25519 key".to_owned()));
        }
        Ok(KeyKind::Ed25519)
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(unacceptable("a malformed RSA key".to_owned()));
        };
        let bits = modulus_bits(rsa.modulus);
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(unacceptable(format!("an RSA key of {bits} bits")));
        }
        Ok(KeyKind::Rsa(bits))
    } else {
        Err(unacceptable(format!("a key of the algorithm {algorithm}")))
    }
}

/// The bit length of a big-endian unsigned integer.
fn modulus_bits(modulus: &[u8]) -> usize {
    let start = modulus
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(modulus.len());
    match modulus.get(start..) {
        Some([first, rest @ ..]) => rest.len() * 8 + (8 - first.leading_zeros() as usize),
        _ => 0,
    }
}

fn check_requested_extensions(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let requested = csr
        .certification_request_info
        .iter_attributes()
        .filter_map(|attribute| match attribute.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(request) => Some(request.extensions.iter()),
            _ => None,
        })
        .flatten();
    for extension in requested {
        match extension.parsed_extension() {
            ParsedExtension::BasicConstraints(constraints) if constraints.ca => {
                return Err(CsrError::RequestsCa {
                    detail: "basicConstraints cA=true".to_owned(),
                });
            }
            ParsedExtension::KeyUsage(usage) if usage.key_cert_sign() || usage.crl_sign() => {
                return Err(CsrError::RequestsCa {
                    detail: "keyUsage keyCertSign or cRLSign".to_owned(),
                });
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let named = [
                    (eku.any, "anyExtendedKeyUsage"),
                    (eku.server_auth, "serverAuth"),
                    (eku.code_signing, "codeSigning"),
                    (eku.email_protection, "emailProtection"),
                    (eku.time_stamping, "timeStamping"),
                    (eku.ocsp_signing, "OCSPSigning"),
                ];
                if let Some((_, usage)) = named.iter().find(|(asked, _)| *asked) {
                    return Err(CsrError::RequestsUsage {
                        usage: (*usage).to_owned(),
                    });
                }
                if let Some(oid) = eku.other.first() {
                    return Err(CsrError::RequestsUsage {
                        usage: oid.to_id_string(),
                    });
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Malformed {
                    reason: format!(
                        "the requested extension {} does not parse: {error}",
                        extension.oid
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base64::Engine;
    use rcgen::{BasicConstraints, CertificateParams, KeyPair};
    use rustls::RootCertStore;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::{CertificateDer, UnixTime};
    use sallyport_api::Duration;
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(text: &str) -> OffsetDateTime {
        ok(OffsetDateTime::parse(
            text,
            &time::format_description::well_known::Rfc3339,
        ))
    }

    /// The root CA and connector issuer, made as the operator makes them.
    struct Pki {
        root_pem: String,
        issuer_pem: String,
        issuer_key_pem: String,
    }

    fn ca_params(name: &str, path_len: u8, lifetime_days: i64) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(lifetime_days);
        params
    }

    fn pki_with_issuer_lifetime(days: i64) -> Pki {
        let root_key = ok(KeyPair::generate());
        let root_params = ca_params("Sallyport root CA", 1, 3650);
        let root = ok(root_params.self_signed(&root_key));
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let issuer_key = ok(KeyPair::generate());
        let mut issuer_params = ca_params("Sallyport connector issuer", 0, days);
        issuer_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = ok(issuer_params.signed_by(&issuer_key, &root_issuer));
        Pki {
            root_pem: root.pem(),
            issuer_pem: issuer.pem(),
            issuer_key_pem: issuer_key.serialize_pem(),
        }
    }

    fn pki() -> Pki {
        pki_with_issuer_lifetime(3 * 365)
    }

    fn issuer(pki: &Pki) -> Issuer {
        ok(Issuer::from_pem(
            &pki.issuer_pem,
            &pki.issuer_key_pem,
            &pki.root_pem,
        ))
    }

    fn identity() -> ConnectorIdentity {
        ok(ConnectorIdentity::new("infra", "east", "vm-1-x7k2p"))
    }

    fn csr_with(key: &KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> String {
        let mut params = CertificateParams::default();
        edit(&mut params);
        ok(ok(params.serialize_request(key)).pem())
    }

    fn csr(key: &KeyPair) -> String {
        csr_with(key, |_| {})
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .filter_map(|c| std::str::from_utf8(c).ok())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        ok(sallyport_tunnel::tls::certificates_from_pem(
            "chain",
            pem.as_bytes(),
        ))
    }

    /// Verifies `chain_pem` as a TLS client certificate chain under `root_pem`, the way
    /// the fleet's listener does.
    fn verify_as_client(chain_pem: &str, root_pem: &str) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        for root in ders(root_pem) {
            ok(roots.add(root));
        }
        let verifier = ok(WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            sallyport_tunnel::tls::provider(),
        )
        .build());
        let chain = ders(chain_pem);
        let (leaf, intermediates) = chain.split_first().unwrap_or_else(|| panic!("no leaf"));
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
    }

    fn policy(validity: &str, renew_after: &str) -> CertificatePolicy {
        CertificatePolicy {
            validity: ok(Duration::parse(validity)),
            renew_after: ok(Duration::parse(renew_after)),
        }
    }

    #[test]
    fn the_certificate_is_the_fleets_choice_whatever_the_csr_asks() {
        let pki = pki();
        let issuer = issuer(&pki);
        let key = ok(KeyPair::generate());
        let request = csr_with(&key, |params| {
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, "admin");
            params.subject_alt_names = vec![
                SanType::DnsName(ok("fleet.example.com".try_into())),
                SanType::URI(ok(
                    "spiffe://sallyport.dev/ns/infra/group/west/connector/other".try_into(),
                )),
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        });
        let now = at("2026-03-01T12:00:00.750Z");
        let issued = ok(issuer.sign(&request, &identity(), &CertificatePolicy::default(), now));
        let start = at("2026-03-01T12:00:00Z");
        assert_eq!(issued.not_before, start - time::Duration::minutes(5));
        assert_eq!(issued.not_after, start + time::Duration::hours(8760));
        assert_eq!(issued.renew_at, start + time::Duration::hours(4320));
        assert_eq!(issued.serial_hex.len(), 32);

        let chain = ders(&issued.chain_pem);
        assert_eq!(chain.len(), 2, "leaf and issuer");
        assert_eq!(chain[1], ders(&pki.issuer_pem)[0]);
        let (_, leaf) = ok(x509_parser::parse_x509_certificate(&chain[0]));
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let common_names: Vec<&str> = leaf
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .collect();
        assert_eq!(common_names, ["vm-1-x7k2p"]);
        let san = ok(leaf.subject_alternative_name()).unwrap_or_else(|| panic!("no SAN"));
        assert_eq!(
            san.value.general_names,
            [GeneralName::URI(
                "spiffe://sallyport.dev/ns/infra/group/east/connector/vm-1-x7k2p"
            )]
        );
        let eku = ok(leaf.extended_key_usage()).unwrap_or_else(|| panic!("no EKU"));
        assert!(eku.value.client_auth);
        assert!(!eku.value.server_auth && !eku.value.any && eku.value.other.is_empty());
        let usage = ok(leaf.key_usage()).unwrap_or_else(|| panic!("no key usage"));
        assert!(usage.value.digital_signature());
        assert!(!usage.value.key_cert_sign());
        assert!(!leaf.is_ca());
        assert_eq!(
            leaf.raw_serial_as_string().replace(':', ""),
            issued.serial_hex
        );
        assert_eq!(leaf.validity().not_after.to_datetime(), issued.not_after);
        assert_eq!(
            ConnectorIdentity::from_certificate_der(&chain[0]),
            Ok(identity())
        );
    }

    #[test]
    fn the_certificate_chains_to_the_root_as_a_client_certificate() {
        let pki = pki();
        let issuer = issuer(&pki);
        let key = ok(KeyPair::generate());
        let issued = ok(issuer.sign(
            &csr(&key),
            &identity(),
            &CertificatePolicy::default(),
            OffsetDateTime::now_utc(),
        ));
        ok(verify_as_client(&issued.chain_pem, &pki.root_pem));
        // The same chain under another root is refused.
        let other = pki_with_issuer_lifetime(30);
        assert!(verify_as_client(&issued.chain_pem, &other.root_pem).is_err());
    }

    #[test]
    fn serials_are_random() {
        let pki = pki();
        let issuer = issuer(&pki);
        let key = ok(KeyPair::generate());
        let sign = || {
            ok(issuer.sign(
                &csr(&key),
                &identity(),
                &CertificatePolicy::default(),
                OffsetDateTime::now_utc(),
            ))
            .serial_hex
        };
        assert_ne!(sign(), sign());
    }

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime_at_the_latest() {
        let pki = pki();
        let issuer = issuer(&pki);
        let key = ok(KeyPair::generate());
        let now = at("2026-03-01T12:00:00Z");
        let issued = ok(issuer.sign(&csr(&key), &identity(), &policy("3h", "2h59m"), now));
        assert_eq!(issued.not_after, now + time::Duration::hours(3));
        assert_eq!(issued.renew_at, now + time::Duration::hours(2));
        let issued = ok(issuer.sign(&csr(&key), &identity(), &policy("3h", "1h"), now));
        assert_eq!(issued.renew_at, now + time::Duration::hours(1));
    }

    #[test]
    fn no_certificate_outlives_its_issuer() {
        let pki = pki_with_issuer_lifetime(30);
        let issuer = issuer(&pki);
        let key = ok(KeyPair::generate());
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|e| panic!("{e}"));
        let issued = ok(issuer.sign(&csr(&key), &identity(), &CertificatePolicy::default(), now));
        assert_eq!(issued.not_after, issuer.not_after());
        let lifetime = issued.not_after - now;
        assert_eq!(issued.renew_at, now + lifetime * 2 / 3);

        let after_expiry = issuer.not_after() + time::Duration::days(1);
        let expired = issuer.sign(
            &csr(&key),
            &identity(),
            &CertificatePolicy::default(),
            after_expiry,
        );
        assert!(
            matches!(expired, Err(CsrError::Signing { .. })),
            "{expired:?}"
        );
    }

    #[test]
    fn accepts_p384_ed25519_and_rsa_2048_keys() {
        let pki = pki();
        let issuer = issuer(&pki);
        for (algorithm, kind) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcdsaP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcdsaP384),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519),
        ] {
            let key = ok(KeyPair::generate_for(algorithm));
            let request = csr(&key);
            assert_eq!(ok(Issuer::check(&request)).key_kind(), kind);
            let issued = ok(issuer.sign(
                &request,
                &identity(),
                &CertificatePolicy::default(),
                OffsetDateTime::now_utc(),
            ));
            let chain = ders(&issued.chain_pem);
            let (_, leaf) = ok(x509_parser::parse_x509_certificate(&chain[0]));
            assert_eq!(
                leaf.public_key().raw,
                key.subject_public_key_info().as_slice()
            );
            ok(verify_as_client(&issued.chain_pem, &pki.root_pem));
        }
        let checked = ok(Issuer::check(RSA_2048_CSR));
        assert_eq!(checked.key_kind(), KeyKind::Rsa(2048));
        let issued = ok(issuer.sign_checked(
            &checked,
            &identity(),
            &CertificatePolicy::default(),
            OffsetDateTime::now_utc(),
        ));
        ok(verify_as_client(&issued.chain_pem, &pki.root_pem));
    }

    fn refusal(request: &str) -> CsrError {
        match Issuer::check(request) {
            Ok(_) => panic!("accepted {request}"),
            Err(error) => error,
        }
    }

    #[test]
    fn refuses_what_is_not_a_csr() {
        assert!(matches!(
            refusal(&"A".repeat(MAX_CSR_PEM_LEN + 1)),
            CsrError::TooLarge { .. }
        ));
        assert!(matches!(refusal("garbage"), CsrError::Malformed { .. }));
        let pki = pki();
        assert!(matches!(refusal(&pki.root_pem), CsrError::Malformed { .. }));
        assert!(matches!(
            refusal(&pem("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00")),
            CsrError::Malformed { .. }
        ));
        let key = ok(KeyPair::generate());
        let mut der = ok(CertificateSigningRequestDer::from_pem_slice(
            csr(&key).as_bytes(),
        ))
        .to_vec();
        der.extend_from_slice(b"\0\0");
        assert!(matches!(
            refusal(&pem("CERTIFICATE REQUEST", &der)),
            CsrError::Malformed { .. }
        ));
    }

    #[test]
    fn refuses_a_broken_signature() {
        let key = ok(KeyPair::generate());
        let request = csr_with(&key, |params| {
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "tamper-me");
        });
        let mut der = ok(CertificateSigningRequestDer::from_pem_slice(
            request.as_bytes(),
        ))
        .to_vec();
        let at = der
            .windows(9)
            .position(|w| w == b"tamper-me")
            .unwrap_or_else(|| panic!("no CN in the CSR"));
        der[at] = b'T';
        let error = refusal(&pem("CERTIFICATE REQUEST", &der));
        assert!(matches!(error, CsrError::BadSignature { .. }), "{error}");
        assert_eq!(error.reason(), "CsrBadSignature");

        let error = refusal(SHA1_CSR);
        assert!(matches!(error, CsrError::BadSignature { .. }), "{error}");
    }

    #[test]
    fn refuses_unacceptable_keys() {
        for request in [RSA_1024_CSR, P521_CSR] {
            let error = refusal(request);
            assert!(matches!(error, CsrError::UnacceptableKey { .. }), "{error}");
        }
        assert!(
            refusal(RSA_1024_CSR)
                .to_string()
                .contains("RSA key of 1024 bits")
        );
    }

    #[test]
    fn refuses_requests_for_a_ca_or_other_usages() {
        let key = ok(KeyPair::generate());
        let ca = csr_with(&key, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
        });
        let error = refusal(&ca);
        assert!(matches!(error, CsrError::RequestsCa { .. }), "{error}");
        let signer = csr_with(&key, |p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]);
        assert!(matches!(refusal(&signer), CsrError::RequestsCa { .. }));
        let server = csr_with(&key, |p| {
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ]
        });
        assert_eq!(
            refusal(&server),
            CsrError::RequestsUsage {
                usage: "serverAuth".to_owned()
            }
        );
        let other = csr_with(&key, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 4, 1, 99])]
        });
        assert_eq!(
            refusal(&other),
            CsrError::RequestsUsage {
                usage: "1.3.6.1.4.1.99".to_owned()
            }
        );
        // A request that says nothing, or asks for a plain non-CA, is fine.
        let plain = csr_with(&key, |p| p.is_ca = IsCa::ExplicitNoCa);
        assert!(Issuer::check(&plain).is_ok());
    }

    #[test]
    fn refuses_an_issuer_that_does_not_fit_together() {
        let pki = pki();
        let other = self::pki();
        let mismatched_key =
            Issuer::from_pem(&pki.issuer_pem, &other.issuer_key_pem, &pki.root_pem);
        assert!(
            matches!(mismatched_key, Err(IssuerError::Invalid { what, .. }) if what.contains("tls.key"))
        );
        let other_root = Issuer::from_pem(&pki.issuer_pem, &pki.issuer_key_pem, &other.root_pem);
        assert!(
            matches!(other_root, Err(IssuerError::Invalid { what, .. }) if what.contains("tls.crt"))
        );
        let not_a_ca = Issuer::from_pem(&pki.root_pem, &pki.issuer_key_pem, "garbage");
        assert!(matches!(not_a_ca, Err(IssuerError::Invalid { .. })));
    }

    #[test]
    fn reads_the_mounted_issuer_secret() {
        let pki = pki();
        let dir = ok(tempfile::tempdir());
        ok(std::fs::write(
            dir.path().join(ISSUER_CERT_FILE),
            &pki.issuer_pem,
        ));
        ok(std::fs::write(
            dir.path().join(ISSUER_KEY_FILE),
            &pki.issuer_key_pem,
        ));
        let missing = Issuer::from_dir(dir.path());
        let Err(IssuerError::Read { path, .. }) = missing else {
            panic!("{missing:?}")
        };
        assert_eq!(path, dir.path().join(ROOT_CA_FILE));
        ok(std::fs::write(dir.path().join(ROOT_CA_FILE), &pki.root_pem));
        let issuer = ok(Issuer::from_dir(dir.path()));
        assert_eq!(issuer.root_ca_pem().trim(), pki.root_pem.trim());
    }

    /// `openssl req -new -newkey rsa:2048 -sha256 -subj /CN=rsa2048`
    const RSA_2048_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIICVzCCAT8CAQAwEjEQMA4GA1UEAwwHcnNhMjA0ODCCASIwDQYJKoZIhvcNAQEB
BQADggEPADCCAQoCggEBANJAWSMxbmfRUl5a4Np4Cdt4/hn/g1C4sBx4gh+AW64C
VDzU7kiEfkJ9UeH+ij8secjfP9awRVg/7l7RZBETqbCX3L9umQJxQXOQHwxC5mtW
g+DZMUEEF4t+mdmOnEOw9kiutOKZviIQWgwt+7qPUVhM7n++7BWN+uaki1znuWsj
IeT0cNawLWBL4+xKphMjAaRyQv2GGLiZAeFeMHfBDn3Nk4cvwLdO+ZiWjSH7MN/a
dS2HYyVAgFvOM5k+cQl0OaPyZphyQrMJndAiursSvRw4SbYr8C8G03KzvDVcWZ4S
h6HIZ1re66zsxcCHTz51P3wSHJLB2iD33SdheqESvqECAwEAAaAAMA0GCSqGSIb3
DQEBCwUAA4IBAQCsug+s8JEywvD9NJK5fbLtzyYnjgzcDY7HLs24FQyBK6c8G0gP
UtA08SErIii85xHij/dsDrnaRNpawoTt0cK6HBxNLfsnWN5Kf6qrU1hBUc+VXs9A
HGlb3aCz8mzI0eboAfrcHuDMvtI+Hssthgr6ZnHGdJhsBCKpjGxSVVpIEl+uk1Wp
EgYDjsKGM0wVOawLzwfa3y0bDKTD3TNgxSd+Ru8DkybTWiYGi2AZSJMPyNujdkj7
1bXofgp1dxyqDgkW73Fnf+ky5NnLUnirW8qxOHJlClCvSMn54BAyYCnra/e4WGQR
aU+UOSeO1fNIB2//m7ytYyFuKuMVZJCTiTKf
-----END CERTIFICATE REQUEST-----
";

    /// `openssl req -new -newkey rsa:1024 -sha256 -subj /CN=rsa1024`
    const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBUTCBuwIBADASMRAwDgYDVQQDDAdyc2ExMDI0MIGfMA0GCSqGSIb3DQEBAQUA
A4GNADCBiQKBgQDGs8cjvu3XqHEaiJfnwUpgUPyPhwnXVjpbH1slnY+oCnvGc8qa
C2M1CLg8iz0SoAxzx+1TmfhApfpdGyNHhD9/KKX0Iou+KNtbj52MyRebtgL9Mg0d
ZMSrPkN06abRCYL8QtY3bVHCIkf2u9+ajwewAtonlbBasy3ICUHHo8tq2wIDAQAB
oAAwDQYJKoZIhvcNAQELBQADgYEAAjKiyIl5jd27UvN7ROMeXCH3Rsze5fXqabHc
Qm+MtcXSIbw6jhc3MAfzDVkiZzZsGmMNOpk3uJA/jFY12/I5XAHR9gRa95c7EW3m
954AN5f68AuzP8lbx6AbnWsCScJlnDNeHGDrQ++VrdKHOOR64Eg4m+jZ4xUIaqbi
usXGYSc=
-----END CERTIFICATE REQUEST-----
";

    /// `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-521 -sha512 -subj /CN=p521`
    const P521_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBUTCBtAIBADAPMQ0wCwYDVQQDDARwNTIxMIGbMBAGByqGSM49AgEGBSuBBAAj
A4GGAAQBQtJi1WBZweyLkI319WTPoMmXEBYbZB6qRADMpJ3JS+It/ON4uo13vXJl
2r7fvasm+xAuMNOHFM4Ijjh4DJmrrqgBZURfMSMZ8odi6+qQH3+eBCaHLGAR4RQt
zGHc7caxIoBUBiG961HhDrE3J9/eIgAGy8U2qwuG66oeBCXjUTaq/I2gADAKBggq
hkjOPQQDBAOBiwAwgYcCQgGzn6nCUU6rsz0/AAnHNsyYOi7f6z0C7zwHUV7e1Ijs
cqDHmzy6sMVKqgI56jgukmbQDtmeuwv56/8DoZp6XvNXlwJBaReajvfEJhgUOW7m
GEr1tJbV8qdsgfuHr6lVyHqCzLcb5QNAfOteM+TcNc4X3RxdCoYxm2TRgUS8Jio/
rJhy46E=
-----END CERTIFICATE REQUEST-----
";

    /// `openssl req -new -newkey rsa:2048 -sha1 -subj /CN=sha1`
    const SHA1_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIICVDCCATwCAQAwDzENMAsGA1UEAwwEc2hhMTCCASIwDQYJKoZIhvcNAQEBBQAD
ggEPADCCAQoCggEBAKmmp7Md198vI2F2hARkXfGU1B7izZhnaqX0TfumNG7s9Pu0
2Y6wTjkJGmSl+YFrx45h3lzWjv9sue8fxr/s8MjoHH2HCFzUafTTMTZmTd+LWxH1
RHaeMoV2aMPxQ7toPZLEbLM8DVOCsY2dq4Ufq28AwcgIkjRAt7F6A7GtSOtMWmxT
HMdjm8RvmGTKDuygRgnppNIsmyEEYQ7PQMn67ACAggoKB38YTlB8RI6K/gWIP20a
cbvWTWIJXUuIUeNkx91CcI7cLv0jrrTD5LgufYCbLMHimx0hJKvYLYKgKOdoMjdN
GPUmm1WVkETe5KhXPAzMsUsFxodiJQklC8HNLvUCAwEAAaAAMA0GCSqGSIb3DQEB
BQUAA4IBAQCFaRzQD96yiiPqD7QA02kLVMSuhinKgusBUh0Pg0iI+ISZt0Rm1Vc4
UBALFYNoLXuCBEHPBU9DjBn/TecsT73WySH5LgeOVflGz3wZFakmzz1Y053/0afY
xX29bQRhKm6gqyQDnyTP/6twfjiJ06I4c8g799f4c2UKrjwblrFWq8sfF9b7Wa1X
ObYRl92CEvTcPif/CLgR3qtrJHk1P72wsJqtpLSQxuZmXwuZ7I5MKURkWPNE7RmB
oyKWdbQ5+XtJmMjUZCKPT0vcdA4PVjzWP3J3XQ0CO77zpJbRC4gIGYGLAx1Mfj+5
n/vwfoop0CrW1PT8O5lFzBz3xaOa82bR
-----END CERTIFICATE REQUEST-----
";
}
