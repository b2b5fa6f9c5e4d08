//! The signed assertion of the user's identity for backends: a short-lived ES256 JWT
//! (`aud` = the app, `iss` = the fleet, `kid` = the RFC 7638 thumbprint of the signing
//! key), and the JWKS that backends verify it with.
//!
//! Key material is a PEM bundle (a Secret value or file):
//!
//! - the **first** block is a `PRIVATE KEY` (PKCS#8, P-256): the active key, which signs;
//! - further `PRIVATE KEY` or `PUBLIC KEY` (SubjectPublicKeyInfo, P-256) blocks are
//!   published in the JWKS but never sign: the previous key while assertions it signed
//!   may still be in flight, or the next key so that backends' JWKS caches know it before
//!   it becomes active.
//!
//! `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes such a key;
//! [`AssertionKeys::generate_pem`] and [`AssertionKeys::rotated_pem`] make them without
//! OpenSSL.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

use crate::session::Session;
use crate::{RandomUnavailable, random_id};

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1), followed by the
/// 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Length of an uncompressed P-256 point (`0x04 || x || y`).
const POINT_LEN: usize = 65;

/// Signing key material that cannot be used; each variant names the PEM block (counted
/// from 1) to fix.
#[derive(Debug, thiserror::Error)]
pub enum AssertionKeysError {
    /// No PEM block at all.
    #[error(
        "assertion signing keys: no PEM block found; expected a PKCS#8 \"PRIVATE KEY\" block first"
    )]
    NoKeys,
    /// A block has no END line.
    #[error("assertion signing keys: PEM block {block} ({label}) has no END line")]
    Unterminated {
        /// Position of the block, from 1.
        block: usize,
        /// Its label.
        label: String,
    },
    /// A block's body is not base64.
    #[error("assertion signing keys: PEM block {block} ({label}) is not valid base64: {reason}")]
    Base64 {
        /// Position of the block, from 1.
        block: usize,
        /// Its label.
        label: String,
        /// What the decoder said.
        reason: String,
    },
    /// A block of a kind other than `PRIVATE KEY` or `PUBLIC KEY`.
    #[error(
        "assertion signing keys: PEM block {block} is \"{label}\"; expected \"PRIVATE KEY\" (PKCS#8) or \"PUBLIC KEY\" (convert SEC1 \"EC PRIVATE KEY\" with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    UnsupportedBlock {
        /// Position of the block, from 1.
        block: usize,
        /// Its label.
        label: String,
    },
    /// A `PRIVATE KEY` block is not an unencrypted PKCS#8 P-256 key with its public key.
    #[error(
        "assertion signing keys: PEM block {block} (PRIVATE KEY) is not a usable P-256 PKCS#8 key: {reason}"
    )]
    PrivateKey {
        /// Position of the block, from 1.
        block: usize,
        /// What ring said.
        reason: String,
    },
    /// A `PUBLIC KEY` block is not a P-256 key.
    #[error(
        "assertion signing keys: PEM block {block} (PUBLIC KEY) is not an uncompressed P-256 public key"
    )]
    PublicKey {
        /// Position of the block, from 1.
        block: usize,
    },
    /// The first block is not a private key, so nothing can sign.
    #[error(
        "assertion signing keys: the first PEM block must be the active \"PRIVATE KEY\", found \"{label}\""
    )]
    FirstNotPrivate {
        /// The first block's label.
        label: String,
    },
    /// The same key appears twice.
    #[error("assertion signing keys: PEM block {block} repeats key {kid}")]
    Duplicate {
        /// Position of the second occurrence, from 1.
        block: usize,
        /// The key's id.
        kid: String,
    },
    /// A new key could not be generated.
    #[error("assertion signing keys: generating a P-256 key failed: {0}")]
    Random(#[from] RandomUnavailable),
}

/// An assertion could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The session has expired: there is nothing left to assert.
    #[error(
        "cannot sign an assertion for session {session}: it expired at {expires_at}, now is {now}"
    )]
    SessionExpired {
        /// The session id.
        session: String,
        /// When it expired, Unix seconds.
        expires_at: u64,
        /// The time of signing, Unix seconds.
        now: u64,
    },
    /// The claims could not be encoded.
    #[error("cannot sign an assertion: encoding failed: {0}")]
    Encode(#[from] serde_json::Error),
    /// No randomness for the `jti` or the signature.
    #[error("cannot sign an assertion: {0}")]
    Random(#[from] RandomUnavailable),
}

/// What an assertion is for: who issues it, to whom, when, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssertionRequest<'a> {
    /// `iss`: the fleet (for example its public base URL); backends pin it.
    pub issuer: &'a str,
    /// `aud`: the app (for example its external URL); backends pin it.
    pub audience: &'a str,
    /// How long the assertion is valid, in seconds (the app's `signedAssertion.lifetime`);
    /// `exp` is never past the session's expiry.
    pub lifetime_secs: u64,
    /// The time of signing, Unix seconds (`iat` and `nbf`).
    pub now: u64,
}

/// The longest an assertion is reused for further requests of its session, seconds.
pub const MAX_REUSE_SECS: u64 = 60;

/// How long an assertion of `lifetime_secs` is reused: a fifth of its lifetime, at most
/// [`MAX_REUSE_SECS`] (0 for lifetimes under 5 s: every request then gets its own).
pub fn reuse_window(lifetime_secs: u64) -> u64 {
    (lifetime_secs / 5).min(MAX_REUSE_SECS)
}

/// Assertions kept for reuse by [`AssertionKeys::sign_reusing`], at most a fixed number
/// (the least recently used go first).
pub struct AssertionCache {
    entries: quick_cache::sync::Cache<String, KeptAssertion>,
}

impl AssertionCache {
    /// A cache of at most `capacity` assertions.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
        }
    }

    /// How many assertions are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for AssertionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionCache")
            .field("kept", &self.entries.len())
            .finish()
    }
}

/// A signed assertion and when it was signed and ends.
#[derive(Clone)]
struct KeptAssertion {
    token: String,
    iat: u64,
    exp: u64,
}

/// Everything an assertion's content depends on but its times and `jti`: the whole
/// session (so a session whose content changed never gets another's assertion), the
/// signing key, the issuer, the app and the lifetime.
#[derive(Serialize)]
struct ReuseKey<'a> {
    kid: &'a str,
    iss: &'a str,
    aud: &'a str,
    lifetime: u64,
    session: &'a Session,
}

/// The claims of a signed assertion (the JWT payload).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AssertionClaims {
    /// The fleet.
    pub iss: String,
    /// The app.
    pub aud: String,
    /// The provider's subject identifier of the user.
    pub sub: String,
    /// The user name as policy saw it (`preferred_username`, else the e-mail address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
    /// The e-mail address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Group names (see `groups_cut`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Present and true when groups were cut to fit the session cookie: `groups` then lists
    /// the groups the app's assignment and policies name, and perhaps not all others.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub groups_cut: bool,
    /// Authentication methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    /// Authentication context class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// When the user authenticated at the provider, Unix seconds.
    pub auth_time: u64,
    /// The identity provider's issuer URL.
    pub idp: String,
    /// The Sallyport session id.
    pub sid: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// A unique id of this assertion.
    pub jti: String,
}

/// A public key as published in the JWKS, and where it came from.
struct PublishedKey {
    /// The uncompressed point `0x04 || x || y`.
    point: Vec<u8>,
    /// RFC 7638 thumbprint.
    kid: String,
    /// The PKCS#8 document if the bundle held the private key.
    pkcs8: Option<Vec<u8>>,
}

impl PublishedKey {
    fn new(point: &[u8], pkcs8: Option<Vec<u8>>) -> Self {
        Self {
            point: point.to_vec(),
            kid: thumbprint(point),
            pkcs8,
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let (x, y) = coordinates(&self.point);
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": x,
            "y": y,
            "kid": self.kid,
            "use": "sig",
            "alg": "ES256",
        })
    }

    fn pem(&self) -> String {
        match &self.pkcs8 {
            Some(der) => pem("PRIVATE KEY", der),
            None => pem("PUBLIC KEY", &[&P256_SPKI_PREFIX[..], &self.point].concat()),
        }
    }
}

/// The base64url `x` and `y` of an uncompressed point.
fn coordinates(point: &[u8]) -> (String, String) {
    let xy = point.get(1..).unwrap_or_default();
    let (x, y) = xy.split_at(xy.len() / 2);
    (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y))
}

/// The RFC 7638 JWK thumbprint (SHA-256, base64url) of a P-256 public key.
fn thumbprint(point: &[u8]) -> String {
    let (x, y) = coordinates(point);
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// A PEM block with 64-character lines.
fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The `(label, DER)` blocks of a PEM text; text outside blocks is ignored.
fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, AssertionKeysError> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let block = blocks.len() + 1;
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut ended = false;
        for line in lines.by_ref() {
            if line == end {
                ended = true;
                break;
            }
            body.push_str(line);
        }
        if !ended {
            return Err(AssertionKeysError::Unterminated {
                block,
                label: label.to_owned(),
            });
        }
        let der = STANDARD
            .decode(body)
            .map_err(|e| AssertionKeysError::Base64 {
                block,
                label: label.to_owned(),
                reason: e.to_string(),
            })?;
        blocks.push((label.to_owned(), der));
    }
    Ok(blocks)
}

/// The keys that sign assertions (the first) and those published for verification (all).
pub struct AssertionKeys {
    signer: EcdsaKeyPair,
    /// The active key first, then the others in bundle order.
    published: Vec<PublishedKey>,
    jwks: String,
}

impl fmt::Debug for AssertionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private keys.
        f.debug_struct("AssertionKeys")
            .field("kid", &self.kid())
            .field(
                "published",
                &self
                    .published
                    .iter()
                    .map(|k| k.kid.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl AssertionKeys {
    /// Parses a PEM bundle (module docs): the first block the active private key, then any
    /// further keys to publish.
    pub fn from_pem(text: &str) -> Result<Self, AssertionKeysError> {
        let blocks = pem_blocks(text)?;
        let rng = SystemRandom::new();
        let mut signer = None;
        let mut published: Vec<PublishedKey> = Vec::with_capacity(blocks.len());
        for (index, (label, der)) in blocks.into_iter().enumerate() {
            let block = index + 1;
            let key = match label.as_str() {
                "PRIVATE KEY" => {
                    let pair =
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
                            .map_err(|e| AssertionKeysError::PrivateKey {
                                block,
                                reason: e.to_string(),
                            })?;
                    let key = PublishedKey::new(pair.public_key().as_ref(), Some(der));
                    if index == 0 {
                        signer = Some(pair);
                    }
                    key
                }
                "PUBLIC KEY" => {
                    let point = der
                        .strip_prefix(&P256_SPKI_PREFIX[..])
                        .filter(|p| p.len() == POINT_LEN && p.first() == Some(&0x04))
                        .ok_or(AssertionKeysError::PublicKey { block })?;
                    PublishedKey::new(point, None)
                }
                _ => return Err(AssertionKeysError::UnsupportedBlock { block, label }),
            };
            if index == 0 && signer.is_none() {
                return Err(AssertionKeysError::FirstNotPrivate { label });
            }
            if published.iter().any(|k| k.kid == key.kid) {
                return Err(AssertionKeysError::Duplicate {
                    block,
                    kid: key.kid,
                });
            }
            published.push(key);
        }
        let signer = signer.ok_or(AssertionKeysError::NoKeys)?;
        let jwks = serde_json::json!({"keys": published.iter().map(PublishedKey::jwk).collect::<Vec<_>>()}).to_string();
        Ok(Self {
            signer,
            published,
            jwks,
        })
    }

    /// A new random P-256 key as a PKCS#8 `PRIVATE KEY` PEM block: a bundle of one key.
    pub fn generate_pem() -> Result<String, AssertionKeysError> {
        let document =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| RandomUnavailable)?;
        Ok(pem("PRIVATE KEY", document.as_ref()))
    }

    /// The bundle after a rotation: a new active key, then the current active key's public
    /// key (so assertions it signed still verify until they expire). Other published keys
    /// are dropped.
    pub fn rotated_pem(&self) -> Result<String, AssertionKeysError> {
        let mut out = Self::generate_pem()?;
        if let Some(current) = self.published.first() {
            out.push_str(
                &PublishedKey {
                    point: current.point.clone(),
                    kid: current.kid.clone(),
                    pkcs8: None,
                }
                .pem(),
            );
        }
        Ok(out)
    }

    /// The bundle as PEM, private keys included: store it in a Secret, never log it.
    pub fn to_pem(&self) -> String {
        self.published.iter().map(PublishedKey::pem).collect()
    }

    /// The key id (`kid`) of the active key: its RFC 7638 thumbprint.
    pub fn kid(&self) -> &str {
        self.published.first().map_or("", |k| k.kid.as_str())
    }

    /// The JWKS (RFC 7517) of every published key, active first, as JSON text:
    /// `{"keys":[{"kty":"EC","crv":"P-256","x":..,"y":..,"kid":..,"use":"sig","alg":"ES256"},..]}`.
    /// Serve it as `application/json` at `/.sallyport/jwks.json`.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// Signs an assertion of `session` for `request`: the claims of [`AssertionClaims`],
    /// with `exp` at `now + lifetime_secs` but never past the session's expiry.
    pub fn sign(
        &self,
        session: &Session,
        request: &AssertionRequest<'_>,
    ) -> Result<String, SignError> {
        self.sign_claims(session, request).map(|(token, _)| token)
    }

    /// The assertion for `session` and `request`: one signed for the same session, app,
    /// issuer, lifetime and key less than [`reuse_window`] seconds ago is taken from
    /// `cache`, else a new one is signed and kept there. Signing (ES256) is the largest
    /// cost of a signed-in user's request; a session's requests within the window carry
    /// the same assertion (same `jti`, `iat` at most the window old, still at least four
    /// fifths of its lifetime to run).
    pub fn sign_reusing(
        &self,
        session: &Session,
        request: &AssertionRequest<'_>,
        cache: &AssertionCache,
    ) -> Result<String, SignError> {
        let window = reuse_window(request.lifetime_secs);
        if window == 0 {
            return self.sign(session, request);
        }
        let key = serde_json::to_string(&ReuseKey {
            kid: self.kid(),
            iss: request.issuer,
            aud: request.audience,
            lifetime: request.lifetime_secs,
            session,
        })?;
        if let Some(kept) = cache.entries.get(&key)
            && request.now >= kept.iat
            && request.now < kept.iat.saturating_add(window)
            && request.now < kept.exp
        {
            return Ok(kept.token);
        }
        let (token, claims) = self.sign_claims(session, request)?;
        cache.entries.insert(
            key,
            KeptAssertion {
                token: token.clone(),
                iat: claims.iat,
                exp: claims.exp,
            },
        );
        Ok(token)
    }

    /// Signs, returning the token and its claims.
    fn sign_claims(
        &self,
        session: &Session,
        request: &AssertionRequest<'_>,
    ) -> Result<(String, AssertionClaims), SignError> {
        let now = request.now;
        let exp = now
            .saturating_add(request.lifetime_secs)
            .min(session.expires_at);
        if exp <= now {
            return Err(SignError::SessionExpired {
                session: session.id.clone(),
                expires_at: session.expires_at,
                now,
            });
        }
        let claims = AssertionClaims {
            iss: request.issuer.to_owned(),
            aud: request.audience.to_owned(),
            sub: session.subject.clone(),
            preferred_username: Some(session.user_name.clone()).filter(|u| !u.is_empty()),
            email: session.email.clone(),
            name: session.display_name.clone(),
            groups: session.groups.clone(),
            groups_cut: session.groups_cut,
            amr: session.amr.clone(),
            acr: session.acr.clone(),
            auth_time: session.auth_time,
            idp: session.issuer.clone(),
            sid: session.id.clone(),
            iat: now,
            nbf: now,
            exp,
            jti: random_id()?,
        };
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid()});
        let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?));
        let signature = self
            .signer
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| RandomUnavailable)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok((token, claims))
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

    use super::*;
    use crate::session::tests::session;

    const ISSUER: &str = "https://fleet.example.com/";
    const AUDIENCE: &str = "https://wiki.apps.example.com/";

    fn keys() -> AssertionKeys {
        let pem = AssertionKeys::generate_pem().unwrap_or_else(|e| panic!("generate: {e}"));
        AssertionKeys::from_pem(&pem).unwrap_or_else(|e| panic!("parse: {e}"))
    }

    /// A session valid for an hour from now (jsonwebtoken checks `exp` against the clock).
    fn live_session(now: u64) -> Session {
        Session {
            auth_time: now - 30,
            issued_at: now - 20,
            expires_at: now + 3_600,
            ..session()
        }
    }

    fn request(now: u64) -> AssertionRequest<'static> {
        AssertionRequest {
            issuer: ISSUER,
            audience: AUDIENCE,
            lifetime_secs: 300,
            now,
        }
    }

    fn sign(keys: &AssertionKeys, session: &Session, request: &AssertionRequest<'_>) -> String {
        keys.sign(session, request)
            .unwrap_or_else(|e| panic!("sign: {e}"))
    }

    /// Verifies with jsonwebtoken (RustCrypto, not ring), using the key from a JWKS text.
    fn verify(jwks: &str, token: &str) -> Result<AssertionClaims, jsonwebtoken::errors::Error> {
        let set: JwkSet = serde_json::from_str(jwks).unwrap_or_else(|e| panic!("JWKS: {e}"));
        let header = decode_header(token)?;
        let kid = header.kid.unwrap_or_default();
        let jwk = set.find(&kid).ok_or_else(|| {
            jsonwebtoken::errors::Error::from(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)
        })?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        validation.leeway = 0;
        decode::<AssertionClaims>(token, &DecodingKey::from_jwk(jwk)?, &validation)
            .map(|d| d.claims)
    }

    #[test]
    fn assertions_verify_independently_with_the_jwks() {
        let k = keys();
        let now = crate::unix_now();
        let s = live_session(now);
        let token = sign(&k, &s, &request(now));
        let claims = verify(k.jwks(), &token).unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.aud, AUDIENCE);
        assert_eq!(claims.sub, s.subject);
        assert_eq!(
            claims.preferred_username.as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(claims.email, s.email);
        assert_eq!(claims.name, s.display_name);
        assert_eq!(claims.groups, s.groups);
        assert!(!claims.groups_cut);
        assert_eq!(claims.amr, s.amr);
        assert_eq!(claims.acr, s.acr);
        assert_eq!(claims.auth_time, now - 30);
        assert_eq!((claims.iat, claims.nbf, claims.exp), (now, now, now + 300));
        assert_eq!(claims.idp, s.issuer);
        assert_eq!(claims.sid, s.id);
        assert_eq!(claims.jti.len(), 43);
        let header = decode_header(&token).unwrap_or_else(|e| panic!("header: {e}"));
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(k.kid()));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        // Every assertion has its own jti.
        let again = verify(k.jwks(), &sign(&k, &s, &request(now)))
            .unwrap_or_else(|e| panic!("verify: {e}"));
        assert_ne!(again.jti, claims.jti);
    }

    #[test]
    fn kid_is_the_rfc_7638_thumbprint_and_jwks_has_every_field() {
        let k = keys();
        let set: JwkSet = serde_json::from_str(k.jwks()).unwrap_or_else(|e| panic!("JWKS: {e}"));
        assert_eq!(set.keys.len(), 1);
        let thumbprint = set.keys[0]
            .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .unwrap_or_else(|e| panic!("thumbprint: {e}"));
        assert_eq!(thumbprint, k.kid());
        let raw: serde_json::Value =
            serde_json::from_str(k.jwks()).unwrap_or_else(|e| panic!("{e}"));
        let jwk = &raw["keys"][0];
        for (field, value) in [
            ("kty", "EC"),
            ("crv", "P-256"),
            ("use", "sig"),
            ("alg", "ES256"),
        ] {
            assert_eq!(jwk[field], value, "{field}");
        }
        assert_eq!(jwk["kid"], k.kid());
        assert_eq!(jwk["x"].as_str().map(str::len), Some(43));
        assert_eq!(jwk["y"].as_str().map(str::len), Some(43));
    }

    #[test]
    fn another_key_a_tampered_payload_or_signature_fails() {
        let k = keys();
        let other = keys();
        let now = crate::unix_now();
        let s = live_session(now);
        let token = sign(&other, &s, &request(now));
        // Signed by another key: its kid is not in k's JWKS; forced onto k's key, it fails.
        assert!(verify(k.jwks(), &token).is_err());
        let forced = k.jwks().replace(k.kid(), other.kid());
        assert!(verify(&forced, &token).is_err());

        let token = sign(&k, &s, &request(now));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let mut payload: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        payload["sub"] = "mallory".into();
        let changed = URL_SAFE_NO_PAD.encode(payload.to_string());
        let tampered = format!("{}.{changed}.{}", parts[0], parts[2]);
        assert!(verify(k.jwks(), &tampered).is_err());
        let mut signature = URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap_or_else(|e| panic!("{e}"));
        signature[10] ^= 1;
        let bad_signature = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            URL_SAFE_NO_PAD.encode(&signature)
        );
        assert!(verify(k.jwks(), &bad_signature).is_err());
        // The untouched token still verifies, so the failures above are the tampering's.
        assert!(verify(k.jwks(), &token).is_ok());
    }

    #[test]
    fn wrong_audience_issuer_or_expired_fails() {
        let k = keys();
        let now = crate::unix_now();
        let s = live_session(now);
        let other_app = AssertionRequest {
            audience: "https://blog.apps.example.com/",
            ..request(now)
        };
        assert!(verify(k.jwks(), &sign(&k, &s, &other_app)).is_err());
        let other_fleet = AssertionRequest {
            issuer: "https://elsewhere.example.com/",
            ..request(now)
        };
        assert!(verify(k.jwks(), &sign(&k, &s, &other_fleet)).is_err());
        let old = AssertionRequest {
            now: now - 1_000,
            ..request(now)
        };
        let stale = Session {
            expires_at: now + 3_600,
            ..live_session(now - 1_000)
        };
        assert!(verify(k.jwks(), &sign(&k, &stale, &old)).is_err());
    }

    #[test]
    fn exp_never_passes_the_session_and_expired_sessions_are_refused() {
        let k = keys();
        let now = crate::unix_now();
        let ending = Session {
            expires_at: now + 60,
            ..live_session(now)
        };
        let claims = verify(k.jwks(), &sign(&k, &ending, &request(now)))
            .unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(claims.exp, now + 60);
        let ended = Session {
            expires_at: now,
            ..live_session(now)
        };
        match k.sign(&ended, &request(now)) {
            Err(SignError::SessionExpired { expires_at, .. }) => assert_eq!(expires_at, now),
            other => panic!("expected SessionExpired, got {other:?}"),
        }
        // Cut groups are flagged.
        let cut = Session {
            groups_cut: true,
            ..live_session(now)
        };
        let claims = verify(k.jwks(), &sign(&k, &cut, &request(now)))
            .unwrap_or_else(|e| panic!("verify: {e}"));
        assert!(claims.groups_cut);
    }

    #[test]
    fn rotation_publishes_the_previous_key_and_signs_with_the_new() {
        let old = keys();
        let now = crate::unix_now();
        let s = live_session(now);
        let old_token = sign(&old, &s, &request(now));
        let rotated_pem = old.rotated_pem().unwrap_or_else(|e| panic!("rotate: {e}"));
        assert!(rotated_pem.contains("-----BEGIN PUBLIC KEY-----"));
        let rotated =
            AssertionKeys::from_pem(&rotated_pem).unwrap_or_else(|e| panic!("parse rotated: {e}"));
        assert_ne!(rotated.kid(), old.kid());
        let set: JwkSet = serde_json::from_str(rotated.jwks()).unwrap_or_else(|e| panic!("{e}"));
        let kids: Vec<_> = set
            .keys
            .iter()
            .filter_map(|k| k.common.key_id.clone())
            .collect();
        assert_eq!(kids, [rotated.kid().to_owned(), old.kid().to_owned()]);
        // Old assertions verify with the new JWKS; new ones are signed by the new key.
        assert!(verify(rotated.jwks(), &old_token).is_ok());
        let new_token = sign(&rotated, &s, &request(now));
        let header = decode_header(&new_token).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(header.kid.as_deref(), Some(rotated.kid()));
        assert!(verify(rotated.jwks(), &new_token).is_ok());
        // The PEM form round-trips.
        let again =
            AssertionKeys::from_pem(&rotated.to_pem()).unwrap_or_else(|e| panic!("reparse: {e}"));
        assert_eq!(again.jwks(), rotated.jwks());
    }

    /// A throwaway test key from `openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256`, and its public key from `openssl pkey -pubout`.
    const OPENSSL_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBiMRgT6JX7hBPFyU
kIWNJsVBeMPOYhkpzce91iV+0A2hRANCAATf835XVW7e4RR3llAqiXGWcg73H3A3
N+yOGNLLJ/wqdKGgXnj7XVitsTCRxSco/GoCzCvF+uTI+9ZxF4pXKcrn
-----END PRIVATE KEY-----
";
    const OPENSSL_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE3/N+V1Vu3uEUd5ZQKolxlnIO9x9w
NzfsjhjSyyf8KnShoF54+11YrbEwkcUnKPxqAswrxfrkyPvWcReKVynK5w==
-----END PUBLIC KEY-----
";

    #[test]
    fn openssl_keys_sign_and_publish() {
        let signing =
            AssertionKeys::from_pem(OPENSSL_PRIVATE).unwrap_or_else(|e| panic!("openssl key: {e}"));
        // Another bundle that only publishes the OpenSSL key (as the next or previous key).
        let bundle = format!(
            "{}\n{OPENSSL_PUBLIC}",
            AssertionKeys::generate_pem().unwrap_or_else(|e| panic!("{e}"))
        );
        let publishing = AssertionKeys::from_pem(&bundle).unwrap_or_else(|e| panic!("bundle: {e}"));
        assert_ne!(publishing.kid(), signing.kid());
        let now = crate::unix_now();
        let token = sign(&signing, &live_session(now), &request(now));
        assert!(
            verify(publishing.jwks(), &token).is_ok(),
            "a published key verifies"
        );
        // The public block yields the same key (same kid) as the private one.
        assert!(publishing.jwks().contains(signing.kid()));
    }

    #[test]
    fn pem_errors_name_the_block() {
        let one = AssertionKeys::generate_pem().unwrap_or_else(|e| panic!("{e}"));
        let public_only = keys().rotated_pem().unwrap_or_else(|e| panic!("{e}"));
        let public_block = &public_only[public_only.find("-----BEGIN PUBLIC KEY").unwrap_or(0)..];
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "no PEM block found"),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n".to_owned(),
                "block 1 (PRIVATE KEY) has no END line",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n".to_owned(),
                "block 1 (PRIVATE KEY) is not valid base64",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_owned(),
                "block 1 (PRIVATE KEY) is not a usable P-256 PKCS#8 key",
            ),
            (
                "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n".to_owned(),
                "openssl pkcs8 -topk8 -nocrypt",
            ),
            (
                public_block.to_owned(),
                "first PEM block must be the active \"PRIVATE KEY\"",
            ),
            (format!("{one}{one}"), "block 2 repeats key"),
            (
                format!("{one}-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
                "block 2 (PUBLIC KEY) is not an uncompressed P-256 public key",
            ),
        ];
        for (text, expected) in cases {
            match AssertionKeys::from_pem(&text) {
                Ok(_) => panic!("{text:?} must be rejected"),
                Err(e) => assert!(e.to_string().contains(expected), "{e} lacks {expected:?}"),
            }
        }
        // Debug never shows private material.
        let k = keys();
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }

    /// The claims of `token`, unverified (for tokens signed for other audiences).
    fn payload(token: &str) -> AssertionClaims {
        let part = token.split('.').nth(1).unwrap_or_default();
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .unwrap_or_else(|e| panic!("payload: {e}"));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("payload: {e}"))
    }

    #[test]
    fn a_sessions_requests_within_the_window_reuse_one_assertion_and_no_other_session_gets_it() {
        let keys = keys();
        let cache = AssertionCache::new(100);
        let now = crate::unix_now();
        let session = live_session(now);
        let first = keys
            .sign_reusing(&session, &request(now), &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reuse_window(300), 60);
        // Within the window: the same token, still valid for the backend.
        let again = keys
            .sign_reusing(&session, &request(now + 59), &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, first);
        assert!(verify(keys.jwks(), &again).is_ok());
        // Past it: a new one, signed then.
        let later = keys
            .sign_reusing(&session, &request(now + 60), &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(later, first);
        assert_eq!(payload(&later).iat, now + 60);
        // Another session (here: the same id with one more group) never gets it.
        let mut other = session.clone();
        other.groups.push("admins".to_owned());
        let theirs = keys
            .sign_reusing(&other, &request(now + 61), &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(theirs, later);
        assert!(payload(&theirs).groups.contains(&"admins".to_owned()));
        // Another app never gets it either.
        let blog = AssertionRequest {
            audience: "https://blog.apps.example.com/",
            ..request(now + 61)
        };
        let for_blog = keys
            .sign_reusing(&session, &blog, &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(payload(&for_blog).aud, "https://blog.apps.example.com/");
        // Nor a request after a key rotation.
        let rotated =
            AssertionKeys::from_pem(&keys.rotated_pem().unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
        let new_key = rotated
            .sign_reusing(&session, &request(now + 61), &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(new_key, later);
        // A lifetime under 5 s: every request its own assertion.
        let short = AssertionRequest {
            lifetime_secs: 4,
            ..request(now)
        };
        let one = keys
            .sign_reusing(&session, &short, &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        let two = keys
            .sign_reusing(&session, &short, &cache)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(payload(&one).jti, payload(&two).jti);
    }
}
