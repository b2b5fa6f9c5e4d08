//! The key ring that seals Sallyport's cookies: 256-bit AES-GCM keys with ids.
//!
//! One key is *active* and seals; every key in the ring opens. To rotate without signing
//! anyone out, add a new key, make it active, and keep the old one until every cookie it
//! sealed has expired ([`SessionKeys::rotate`] does exactly that).
//!
//! The text form (a Kubernetes Secret value or a file) is JSON:
//!
//! ```json
//! {"active": "k2",
//!  "keys": [{"id": "k2", "secret": "<base64url of 32 bytes>", "created": 1764403200},
//!           {"id": "k1", "secret": "<base64url of 32 bytes>", "created": 1761811200,
//!            "retired": 1764403200}]}
//! ```
//!
//! `id` is 1-64 characters of `A-Z a-z 0-9 . _ -`; `secret` is 32 bytes in base64 (URL-safe
//! or standard alphabet, padding optional, so `openssl rand -base64 32` works); `created`
//! and `retired` (Unix seconds, optional) drive [`SessionKeys::rotate`].
//!
//! A sealed value is `base64url-nopad(tag || nonce || ciphertext)`: `tag` is the first 4
//! bytes of SHA-256 of the key id (which key opens it), `nonce` 12 random bytes, and
//! `ciphertext` the AES-256-GCM output with its 16-byte authentication tag. The additional
//! authenticated data binds the purpose, app and host (see [`crate::Binding`]).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::{RandomUnavailable, random_bytes};

/// Length of a key's secret in bytes (AES-256).
pub const SECRET_LEN: usize = 32;

/// Length of the key tag that starts a sealed value.
const TAG_LEN: usize = 4;

/// Length of AES-GCM's authentication tag.
const AEAD_TAG_LEN: usize = 16;

/// Longest key id accepted.
const MAX_ID_LEN: usize = 64;

/// A key ring that cannot be parsed or built; each variant names the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum SessionKeysError {
    /// The text is not the JSON object described in the module docs.
    #[error(
        "session key ring: not a JSON object of the form {{\"active\": ..., \"keys\": [...]}}: {0}"
    )]
    Json(#[source] serde_json::Error),
    /// `keys` is empty.
    #[error("session key ring: keys must hold at least one key")]
    NoKeys,
    /// A key id has the wrong length or characters.
    #[error(
        "session key ring: keys[{index}].id {id:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
    )]
    InvalidId {
        /// Position of the key in `keys`.
        index: usize,
        /// The offending id.
        id: String,
    },
    /// Two keys share an id.
    #[error("session key ring: keys[{index}].id {id:?} is used by an earlier key too")]
    DuplicateId {
        /// Position of the second key with this id.
        index: usize,
        /// The duplicated id.
        id: String,
    },
    /// Two different ids hash to the same 4-byte tag (astronomically unlikely): rename one.
    #[error(
        "session key ring: keys[{index}].id {id:?} has the same tag as key {other:?}; choose another id"
    )]
    TagCollision {
        /// Position of the second key.
        index: usize,
        /// Its id.
        id: String,
        /// The earlier key's id.
        other: String,
    },
    /// A secret is not base64.
    #[error("session key ring: keys[{index}].secret (key {id:?}) is not base64: {reason}")]
    SecretNotBase64 {
        /// Position of the key in `keys`.
        index: usize,
        /// The key's id.
        id: String,
        /// What the decoder said.
        reason: String,
    },
    /// A secret does not decode to 32 bytes.
    #[error(
        "session key ring: keys[{index}].secret (key {id:?}) must decode to 32 bytes, found {len}"
    )]
    SecretLength {
        /// Position of the key in `keys`.
        index: usize,
        /// The key's id.
        id: String,
        /// Decoded length found.
        len: usize,
    },
    /// `active` names no key of the ring.
    #[error("session key ring: active {active:?} names no key in keys (ids: {ids})")]
    ActiveMissing {
        /// The `active` value.
        active: String,
        /// The ids present, comma-separated.
        ids: String,
    },
    /// The AEAD implementation refused a key (never expected for 32-byte secrets).
    #[error("session key ring: key {id:?} was refused by AES-256-GCM")]
    KeyRejected {
        /// The key's id.
        id: String,
    },
    /// A new key could not be made.
    #[error("session key ring: {0}")]
    Random(#[from] RandomUnavailable),
}

/// The JSON form of a ring.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RingText {
    active: String,
    keys: Vec<KeyText>,
}

/// The JSON form of one key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyText {
    id: String,
    secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired: Option<u64>,
}

/// One key of the ring.
struct SessionKey {
    id: String,
    tag: [u8; TAG_LEN],
    secret: [u8; SECRET_LEN],
    aead: LessSafeKey,
    created: Option<u64>,
    retired: Option<u64>,
}

impl SessionKey {
    fn new(
        id: String,
        secret: [u8; SECRET_LEN],
        created: Option<u64>,
        retired: Option<u64>,
    ) -> Result<Self, SessionKeysError> {
        let tag = key_tag(&id);
        let aead = UnboundKey::new(&AES_256_GCM, &secret)
            .map(LessSafeKey::new)
            .map_err(|_| SessionKeysError::KeyRejected { id: id.clone() })?;
        Ok(Self {
            id,
            tag,
            secret,
            aead,
            created,
            retired,
        })
    }
}

/// The first 4 bytes of SHA-256 of a key id.
fn key_tag(id: &str) -> [u8; TAG_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&digest.as_ref()[..TAG_LEN]);
    tag
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Decodes a secret written in base64, URL-safe or standard, padded or not.
fn decode_secret(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let normalised: String = text
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE_NO_PAD.decode(normalised)
}

/// Why a sealed value did not open (for debug logs only: callers treat all as absent).
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Not base64url.
    #[error("not base64url")]
    NotBase64,
    /// Shorter than a tag, nonce and authentication tag.
    #[error("too short")]
    TooShort,
    /// Sealed by a key not in the ring.
    #[error("sealed by a key not in the ring")]
    UnknownKey,
    /// Authentication failed: tampered, or sealed for another purpose, app or host.
    #[error("authentication failed (tampered, or sealed for another purpose, app or host)")]
    Rejected,
}

/// A ring of AES-256-GCM keys: one active key seals, every key opens.
pub struct SessionKeys {
    /// Index of the active key in `keys`.
    active: usize,
    keys: Vec<SessionKey>,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets.
        f.debug_struct("SessionKeys")
            .field("active", &self.active_id())
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

impl SessionKeys {
    /// Parses the JSON text form (module docs), checking every field.
    pub fn parse(text: &str) -> Result<Self, SessionKeysError> {
        let ring: RingText = serde_json::from_str(text).map_err(SessionKeysError::Json)?;
        if ring.keys.is_empty() {
            return Err(SessionKeysError::NoKeys);
        }
        let mut keys: Vec<SessionKey> = Vec::with_capacity(ring.keys.len());
        for (index, key) in ring.keys.into_iter().enumerate() {
            if !valid_id(&key.id) {
                return Err(SessionKeysError::InvalidId { index, id: key.id });
            }
            if keys.iter().any(|k| k.id == key.id) {
                return Err(SessionKeysError::DuplicateId { index, id: key.id });
            }
            let tag = key_tag(&key.id);
            if let Some(other) = keys.iter().find(|k| k.tag == tag) {
                return Err(SessionKeysError::TagCollision {
                    index,
                    other: other.id.clone(),
                    id: key.id,
                });
            }
            let bytes =
                decode_secret(&key.secret).map_err(|e| SessionKeysError::SecretNotBase64 {
                    index,
                    id: key.id.clone(),
                    reason: e.to_string(),
                })?;
            let secret: [u8; SECRET_LEN] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| SessionKeysError::SecretLength {
                        index,
                        id: key.id.clone(),
                        len: bytes.len(),
                    })?;
            keys.push(SessionKey::new(key.id, secret, key.created, key.retired)?);
        }
        let active = keys
            .iter()
            .position(|k| k.id == ring.active)
            .ok_or_else(|| SessionKeysError::ActiveMissing {
                active: ring.active.clone(),
                ids: keys
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(Self { active, keys })
    }

    /// A new ring holding one fresh random key, active, created `now`. Its id is `k<now>`.
    pub fn generate(now: u64) -> Result<Self, SessionKeysError> {
        let secret = random_bytes::<SECRET_LEN>()?;
        Ok(Self {
            active: 0,
            keys: vec![SessionKey::new(format!("k{now}"), secret, Some(now), None)?],
        })
    }

    /// Rotates the ring: adds a fresh random key (id `k<now>`, or `k<now>-<n>` if taken) and
    /// makes it active; the previously active key is marked retired at `now`; and keys
    /// retired more than `keep_retired_secs` ago are dropped. Keys without a retirement
    /// time (written by hand) are marked retired at `now`, so they too are kept for
    /// `keep_retired_secs`.
    ///
    /// Choose `keep_retired_secs` at least as long as the longest session a cookie can
    /// carry: a cookie sealed just before the rotation then stays readable until it expires.
    pub fn rotate(&mut self, now: u64, keep_retired_secs: u64) -> Result<(), SessionKeysError> {
        let secret = random_bytes::<SECRET_LEN>()?;
        let mut id = format!("k{now}");
        let mut n = 1;
        while self
            .keys
            .iter()
            .any(|k| k.id == id || k.tag == key_tag(&id))
        {
            n += 1;
            id = format!("k{now}-{n}");
        }
        let new_key = SessionKey::new(id, secret, Some(now), None)?;
        let mut keys = std::mem::take(&mut self.keys);
        for key in &mut keys {
            key.retired.get_or_insert(now);
        }
        keys.retain(|k| {
            k.retired
                .is_some_and(|r| r.saturating_add(keep_retired_secs) >= now)
        });
        keys.insert(0, new_key);
        self.keys = keys;
        self.active = 0;
        Ok(())
    }

    /// The JSON text form (module docs) of this ring, secrets included: store it in a
    /// Secret, never log it.
    pub fn to_json(&self) -> String {
        let text = RingText {
            active: self.active_id().to_owned(),
            keys: self
                .keys
                .iter()
                .map(|k| KeyText {
                    id: k.id.clone(),
                    secret: URL_SAFE_NO_PAD.encode(k.secret),
                    created: k.created,
                    retired: k.retired,
                })
                .collect(),
        };
        serde_json::to_string_pretty(&text).unwrap_or_default()
    }

    /// The id of the key that seals.
    pub fn active_id(&self) -> &str {
        self.keys.get(self.active).map_or("", |k| k.id.as_str())
    }

    /// When the active key was made (Unix seconds), when the ring says.
    pub fn active_created(&self) -> Option<u64> {
        self.keys.get(self.active).and_then(|k| k.created)
    }

    /// The ids of all keys, in ring order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// The length of the sealed form of a plaintext of `plaintext_len` bytes.
    pub(crate) fn sealed_len(plaintext_len: usize) -> usize {
        let raw = TAG_LEN + NONCE_LEN + plaintext_len + AEAD_TAG_LEN;
        (raw * 4).div_ceil(3)
    }

    /// Seals `plaintext` with the active key, authenticating `aad` along with it.
    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, RandomUnavailable> {
        let Some(key) = self.keys.get(self.active) else {
            return Err(RandomUnavailable);
        };
        let nonce_bytes = random_bytes::<NONCE_LEN>()?;
        let mut buffer = Vec::with_capacity(TAG_LEN + NONCE_LEN + plaintext.len() + AEAD_TAG_LEN);
        buffer.extend_from_slice(&key.tag);
        buffer.extend_from_slice(&nonce_bytes);
        let mut body = plaintext.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| RandomUnavailable)?;
        buffer.extend_from_slice(&body);
        Ok(URL_SAFE_NO_PAD.encode(buffer))
    }

    /// Opens a value sealed by any key of the ring for the same `aad`.
    pub(crate) fn open(&self, aad: &[u8], sealed: &str) -> Result<Vec<u8>, OpenError> {
        let raw = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| OpenError::NotBase64)?;
        if raw.len() < TAG_LEN + NONCE_LEN + AEAD_TAG_LEN {
            return Err(OpenError::TooShort);
        }
        let (tag, rest) = raw.split_at(TAG_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let key = self
            .keys
            .iter()
            .find(|k| k.tag == tag)
            .ok_or(OpenError::UnknownKey)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::TooShort)?;
        let mut body = ciphertext.to_vec();
        let plaintext = key
            .aead
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .map_err(|_| OpenError::Rejected)?;
        Ok(plaintext.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> String {
        URL_SAFE_NO_PAD.encode([byte; SECRET_LEN])
    }

    fn ring(active: &str, ids: &[(&str, u8)]) -> SessionKeys {
        let keys: Vec<_> = ids
            .iter()
            .map(|(id, b)| serde_json::json!({"id": id, "secret": secret(*b)}))
            .collect();
        let text = serde_json::json!({"active": active, "keys": keys}).to_string();
        SessionKeys::parse(&text).unwrap_or_else(|e| panic!("parse ring: {e}"))
    }

    #[test]
    fn parses_and_round_trips_the_text_form() {
        let keys = ring("k2", &[("k1", 1), ("k2", 2)]);
        assert_eq!(keys.active_id(), "k2");
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["k1", "k2"]);
        let again = SessionKeys::parse(&keys.to_json()).unwrap_or_else(|e| panic!("reparse: {e}"));
        assert_eq!(again.active_id(), "k2");
        let sealed = keys
            .seal(b"aad", b"hello")
            .unwrap_or_else(|e| panic!("seal: {e}"));
        assert_eq!(again.open(b"aad", &sealed), Ok(b"hello".to_vec()));
        assert_eq!(sealed.len(), SessionKeys::sealed_len(5));
    }

    #[test]
    fn accepts_standard_base64_with_padding() {
        let standard = base64::engine::general_purpose::STANDARD.encode([0xfb; SECRET_LEN]);
        assert!(standard.contains('+') || standard.contains('/'));
        assert!(standard.ends_with('='));
        let text = format!(r#"{{"active":"a","keys":[{{"id":"a","secret":"{standard}"}}]}}"#);
        assert!(SessionKeys::parse(&text).is_ok());
    }

    #[test]
    fn parse_errors_name_the_field() {
        let cases = [
            ("not json", "not a JSON object"),
            (r#"{"active":"a","keys":[]}"#, "at least one key"),
            (
                &format!(
                    r#"{{"active":"a","keys":[{{"id":"a b","secret":"{}"}}]}}"#,
                    secret(1)
                ),
                "keys[0].id \"a b\"",
            ),
            (
                &format!(
                    r#"{{"active":"a","keys":[{{"id":"a","secret":"{0}"}},{{"id":"a","secret":"{0}"}}]}}"#,
                    secret(1)
                ),
                "keys[1].id \"a\" is used by an earlier key",
            ),
            (
                r#"{"active":"a","keys":[{"id":"a","secret":"c2hvcnQ"}]}"#,
                "keys[0].secret (key \"a\") must decode to 32 bytes, found 5",
            ),
            (
                r#"{"active":"a","keys":[{"id":"a","secret":"!!!"}]}"#,
                "keys[0].secret (key \"a\") is not base64",
            ),
            (
                &format!(
                    r#"{{"active":"b","keys":[{{"id":"a","secret":"{}"}}]}}"#,
                    secret(1)
                ),
                "active \"b\" names no key in keys (ids: a)",
            ),
            (
                &format!(
                    r#"{{"active":"a","keys":[{{"id":"a","secret":"{}","extra":1}}]}}"#,
                    secret(1)
                ),
                "unknown field `extra`",
            ),
        ];
        for (text, expected) in cases {
            match SessionKeys::parse(text) {
                Ok(_) => panic!("{text} must be rejected"),
                Err(e) => assert!(
                    e.to_string().contains(expected),
                    "{text}: {e} lacks {expected:?}"
                ),
            }
        }
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let keys = ring("k1", &[("k1", 7)]);
        let debug = format!("{keys:?}");
        assert!(debug.contains("k1"));
        assert!(!debug.contains(&secret(7)));
    }

    #[test]
    fn every_key_opens_only_the_active_key_seals() {
        let old = ring("k1", &[("k1", 1)]);
        let sealed_old = old
            .seal(b"x", b"old")
            .unwrap_or_else(|e| panic!("seal: {e}"));
        let both = ring("k2", &[("k2", 2), ("k1", 1)]);
        assert_eq!(both.open(b"x", &sealed_old), Ok(b"old".to_vec()));
        let sealed_new = both
            .seal(b"x", b"new")
            .unwrap_or_else(|e| panic!("seal: {e}"));
        assert_eq!(old.open(b"x", &sealed_new), Err(OpenError::UnknownKey));
        // A key with the old id but another secret does not open it either.
        let impostor = ring("k1", &[("k1", 9)]);
        assert_eq!(impostor.open(b"x", &sealed_old), Err(OpenError::Rejected));
    }

    #[test]
    fn rejects_other_aad_and_garbage() {
        let keys = ring("k1", &[("k1", 1)]);
        let sealed = keys
            .seal(b"one", b"value")
            .unwrap_or_else(|e| panic!("seal: {e}"));
        assert_eq!(keys.open(b"two", &sealed), Err(OpenError::Rejected));
        assert_eq!(keys.open(b"one", "***"), Err(OpenError::NotBase64));
        assert_eq!(keys.open(b"one", "AAAA"), Err(OpenError::TooShort));
        // Two seals of the same value differ (random nonces).
        let again = keys
            .seal(b"one", b"value")
            .unwrap_or_else(|e| panic!("seal: {e}"));
        assert_ne!(sealed, again);
    }

    #[test]
    fn generate_then_rotate_keeps_retired_keys_for_the_given_time() {
        let mut keys = SessionKeys::generate(1_000).unwrap_or_else(|e| panic!("generate: {e}"));
        assert_eq!(keys.active_id(), "k1000");
        let first = keys
            .seal(b"a", b"first")
            .unwrap_or_else(|e| panic!("seal: {e}"));

        keys.rotate(2_000, 500)
            .unwrap_or_else(|e| panic!("rotate: {e}"));
        assert_eq!(keys.active_id(), "k2000");
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["k2000", "k1000"]);
        assert_eq!(keys.open(b"a", &first), Ok(b"first".to_vec()));
        let second = keys
            .seal(b"a", b"second")
            .unwrap_or_else(|e| panic!("seal: {e}"));

        // Through the text form, as the operator would store it.
        let mut keys =
            SessionKeys::parse(&keys.to_json()).unwrap_or_else(|e| panic!("reparse: {e}"));
        // Same second: the new id gets a suffix.
        keys.rotate(2_000, 500)
            .unwrap_or_else(|e| panic!("rotate: {e}"));
        assert_eq!(keys.active_id(), "k2000-2");
        let third = keys
            .seal(b"a", b"third")
            .unwrap_or_else(|e| panic!("seal: {e}"));
        // Within 500 s of their retirement (2000) every key stays.
        keys.rotate(2_400, 500)
            .unwrap_or_else(|e| panic!("rotate: {e}"));
        assert_eq!(
            keys.ids().collect::<Vec<_>>(),
            ["k2400", "k2000-2", "k2000", "k1000"]
        );
        assert_eq!(keys.open(b"a", &first), Ok(b"first".to_vec()));
        // At 2600, k2000 and k1000 (retired at 2000) are older than 500 s and go.
        keys.rotate(2_600, 500)
            .unwrap_or_else(|e| panic!("rotate: {e}"));
        assert_eq!(
            keys.ids().collect::<Vec<_>>(),
            ["k2600", "k2400", "k2000-2"]
        );
        assert_eq!(keys.open(b"a", &first), Err(OpenError::UnknownKey));
        assert_eq!(keys.open(b"a", &second), Err(OpenError::UnknownKey));
        assert_eq!(keys.open(b"a", &third), Ok(b"third".to_vec()));
    }
}
