//! Sallyport's user identity, as pure functions without network IO.
//!
//! - [`session_keys`]: the ring of AES-256-GCM keys that seals cookies, with rotation that
//!   signs no one out.
//! - [`session`]: the signed-in user's [`Session`], sealed into the session cookie and
//!   opened from it; tampered, expired, foreign-key and other-app cookies open to `None`.
//! - [`transaction`]: the short-lived sign-in [`Transaction`] (state, nonce, PKCE verifier,
//!   return path) sealed into its own cookie, and [`safe_return_path`].
//! - [`cookie`]: `Set-Cookie` values for both cookies, reading them from a request, and
//!   removing them before a request goes to a backend.
//! - [`assertion`]: the ES256 signed assertion (a JWT) of the user's identity for backends,
//!   and the JWKS they verify it with.
//!
//! Times are Unix seconds (`u64`) throughout; [`unix_now`] reads the clock.
//! docs/identity.md describes the formats.

pub mod assertion;
pub mod cookie;
pub mod session;
pub mod session_keys;
pub mod transaction;

pub use assertion::{
    AssertionCache, AssertionClaims, AssertionKeys, AssertionKeysError, AssertionRequest, SignError,
};
pub use cookie::{CookieSettings, SameSite, cookie_values, strip_own_cookies};
pub use session::{DEFAULT_COOKIE_BUDGET, Session, SessionTooLarge};
pub use session_keys::{SessionKeys, SessionKeysError};
pub use transaction::{TRANSACTION_LIFETIME_SECS, Transaction, safe_return_path};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};

/// What a sealed cookie is bound to: the app and the host it was issued for. A cookie
/// sealed for one binding does not open under another, so a cookie copied from one app
/// (or one host of a wildcard app) to another is treated as absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    app: String,
    host: String,
}

impl Binding {
    /// The binding for `app` (a stable app id, for example `team-a/wiki`) served on `host`
    /// (the host the browser addressed, without port; compared case-insensitively and
    /// without a trailing dot).
    pub fn new(app: impl Into<String>, host: &str) -> Self {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        Self {
            app: app.into(),
            host,
        }
    }

    /// The app id this binding names.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The normalised host this binding names.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The additional authenticated data for a sealed value of `purpose`: the JSON array
    /// `["sallyport-v1", purpose, app, host]`, unambiguous whatever the strings hold.
    pub(crate) fn aad(&self, purpose: &str) -> Vec<u8> {
        serde_json::to_vec(&["sallyport-v1", purpose, &self.app, &self.host]).unwrap_or_else(|_| {
            format!("sallyport-v1|{purpose}|{}|{}", self.app, self.host).into_bytes()
        })
    }
}

/// The system's random generator failed (no entropy available); nothing can be sealed or
/// signed safely.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("the system random generator failed")]
pub struct RandomUnavailable;

/// A value could not be sealed into a cookie.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// No random nonce could be drawn.
    #[error("cannot seal: {0}")]
    Random(#[from] RandomUnavailable),
    /// The value could not be encoded as JSON.
    #[error("cannot seal: encoding failed: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The current time in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `N` random bytes from the system generator.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], RandomUnavailable> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RandomUnavailable)?;
    Ok(bytes)
}

/// A fresh random identifier: 32 random bytes (256 bits) in base64url without padding
/// (43 characters). Used for session ids, OAuth `state`, `nonce` and PKCE verifiers.
pub fn random_id() -> Result<String, RandomUnavailable> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}
