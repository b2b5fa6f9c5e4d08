//! The sign-in transaction: what the proxy must remember between sending a browser to the
//! provider and the provider sending it back (OAuth `state`, OIDC `nonce`, PKCE verifier,
//! where to return), sealed into its own short-lived cookie so that any proxy replica can
//! finish a sign-in another began.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::session_keys::SessionKeys;
use crate::{Binding, RandomUnavailable, SealError, random_id};

/// Purpose string in the additional authenticated data of transaction cookies.
const PURPOSE: &str = "signin";

/// How long a sign-in may take, from leaving for the provider to coming back, in seconds.
pub const TRANSACTION_LIFETIME_SECS: u64 = 600;

/// How far in the future a transaction's creation time may be (clock skew between
/// replicas), in seconds.
const CLOCK_SKEW_SECS: u64 = 60;

/// Longest return path kept (a longer one returns to `/`).
const MAX_RETURN_PATH_LEN: usize = 2048;

/// One sign-in in flight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// The OAuth `state` sent to the provider and expected back on the callback.
    #[serde(rename = "st")]
    pub state: String,
    /// The OIDC `nonce` sent to the provider and expected in the ID token.
    #[serde(rename = "nc")]
    pub nonce: String,
    /// The PKCE code verifier (RFC 7636) whose S256 challenge went to the provider.
    #[serde(rename = "pv")]
    pub pkce_verifier: String,
    /// Where to send the browser once signed in: a same-origin path (see
    /// [`safe_return_path`]).
    #[serde(rename = "rt")]
    pub return_to: String,
    /// The app being signed in to.
    #[serde(rename = "app")]
    pub app: String,
    /// The provider (OIDC client configuration) the sign-in went to.
    #[serde(rename = "idp")]
    pub provider: String,
    /// When the sign-in began, Unix seconds.
    #[serde(rename = "iat")]
    pub created_at: u64,
    /// The sign-in is a step-up: conditional access asked for a stronger or more recent
    /// authentication. A step-up that comes back still short is refused rather than
    /// sent to the provider again, so a provider that cannot satisfy a policy never
    /// loops the browser.
    #[serde(rename = "su", default, skip_serializing_if = "is_false")]
    pub step_up: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Transaction {
    /// A new sign-in to `app` through `provider` begun at `now`, with fresh random `state`,
    /// `nonce` and PKCE verifier (256 bits each). `return_to` is checked with
    /// [`safe_return_path`]; an unsafe one becomes `/`.
    pub fn new(
        app: impl Into<String>,
        provider: impl Into<String>,
        return_to: &str,
        now: u64,
    ) -> Result<Self, RandomUnavailable> {
        Ok(Self {
            state: random_id()?,
            nonce: random_id()?,
            pkce_verifier: random_id()?,
            return_to: safe_return_path(return_to).unwrap_or_else(|| "/".to_owned()),
            app: app.into(),
            provider: provider.into(),
            created_at: now,
            step_up: false,
        })
    }

    /// The PKCE `code_challenge` for `code_challenge_method=S256`:
    /// base64url(SHA-256(verifier)).
    pub fn pkce_challenge(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.pkce_verifier.as_bytes());
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    /// Seals this transaction into a cookie value for `binding` (set it with
    /// [`crate::CookieSettings::transaction_set_cookie`]).
    pub fn seal(&self, keys: &SessionKeys, binding: &Binding) -> Result<String, SealError> {
        let plaintext = serde_json::to_vec(self)?;
        Ok(keys.seal(&binding.aad(PURPOSE), &plaintext)?)
    }

    /// Opens a transaction cookie value on the callback: `None` unless it was sealed by a
    /// key of the ring for this `binding`, is intact, is for the `state` the provider sent
    /// back, and began at most [`TRANSACTION_LIFETIME_SECS`] before `now`.
    pub fn open(
        keys: &SessionKeys,
        binding: &Binding,
        value: &str,
        state: &str,
        now: u64,
    ) -> Option<Transaction> {
        let plaintext = match keys.open(&binding.aad(PURPOSE), value) {
            Ok(plaintext) => plaintext,
            Err(reason) => {
                tracing::debug!(app = binding.app(), host = binding.host(), %reason, "sign-in transaction cookie ignored");
                return None;
            }
        };
        let tx: Transaction = match serde_json::from_slice(&plaintext) {
            Ok(tx) => tx,
            Err(error) => {
                tracing::debug!(app = binding.app(), host = binding.host(), %error, "sign-in transaction cookie ignored: undecodable");
                return None;
            }
        };
        if tx.state != state {
            tracing::debug!(
                app = binding.app(),
                host = binding.host(),
                "sign-in transaction cookie ignored: other state"
            );
            return None;
        }
        let expired = now >= tx.created_at.saturating_add(TRANSACTION_LIFETIME_SECS);
        let from_future = tx.created_at > now.saturating_add(CLOCK_SKEW_SECS);
        if expired || from_future {
            tracing::debug!(
                app = binding.app(),
                host = binding.host(),
                created_at = tx.created_at,
                now,
                "sign-in transaction cookie ignored: expired"
            );
            return None;
        }
        Some(tx)
    }
}

/// `s` if it is safe to redirect to after sign-in: a same-origin relative reference that
/// starts with a single `/` (not `//` or `/\`, which browsers read as another host), of
/// visible ASCII only (no spaces, control characters such as tabs and newlines that
/// browsers strip, or non-ASCII), without backslashes anywhere, and at most 2048 bytes.
/// Path, query and `#fragment` are kept as they are; percent-escapes stay escaped (so
/// `/%2F%2Fevil.com` is a path on this host). `None` otherwise: redirect to `/` instead.
pub fn safe_return_path(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let safe = bytes.len() <= MAX_RETURN_PATH_LEN
        && bytes.first() == Some(&b'/')
        && bytes.get(1) != Some(&b'/')
        && bytes
            .iter()
            .all(|b| (0x21..=0x7e).contains(b) && *b != b'\\');
    safe.then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::tests::keys;

    fn wiki() -> Binding {
        Binding::new("team-a/wiki", "wiki.apps.example.com")
    }

    fn tx() -> Transaction {
        Transaction::new("team-a/wiki", "default", "/docs?page=2#top", 1_000)
            .unwrap_or_else(|e| panic!("new: {e}"))
    }

    #[test]
    fn new_transactions_are_random_and_keep_safe_paths() {
        let a = tx();
        let b = tx();
        assert_ne!(a.state, b.state);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.pkce_verifier, b.pkce_verifier);
        assert_eq!(a.state.len(), 43);
        // RFC 7636: a verifier is 43-128 unreserved characters.
        assert!(
            a.pkce_verifier
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(a.return_to, "/docs?page=2#top");
        let unsafe_return =
            Transaction::new("a", "p", "//evil.com", 1).unwrap_or_else(|e| panic!("new: {e}"));
        assert_eq!(unsafe_return.return_to, "/");
    }

    #[test]
    fn pkce_challenge_matches_rfc_7636_appendix_b() {
        let t = Transaction {
            pkce_verifier: "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".to_owned(),
            ..tx()
        };
        assert_eq!(
            t.pkce_challenge(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn round_trip_and_every_reason_to_refuse() {
        let k = keys("k1", &[("k1", 1)]);
        let t = tx();
        let cookie = t.seal(&k, &wiki()).unwrap_or_else(|e| panic!("seal: {e}"));
        assert_eq!(
            Transaction::open(&k, &wiki(), &cookie, &t.state, 1_300),
            Some(t.clone())
        );
        // Wrong state, other app, expired, from the future, tampered, unknown key.
        assert_eq!(
            Transaction::open(&k, &wiki(), &cookie, "other", 1_300),
            None
        );
        let blog = Binding::new("team-a/blog", "wiki.apps.example.com");
        assert_eq!(Transaction::open(&k, &blog, &cookie, &t.state, 1_300), None);
        assert_eq!(
            Transaction::open(&k, &wiki(), &cookie, &t.state, 1_599),
            Some(t.clone())
        );
        assert_eq!(
            Transaction::open(&k, &wiki(), &cookie, &t.state, 1_600),
            None
        );
        assert_eq!(Transaction::open(&k, &wiki(), &cookie, &t.state, 900), None);
        let mut tampered = cookie.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Transaction::open(&k, &wiki(), &tampered, &t.state, 1_300),
            None
        );
        let other_ring = keys("k2", &[("k2", 2)]);
        assert_eq!(
            Transaction::open(&other_ring, &wiki(), &cookie, &t.state, 1_300),
            None
        );
        // A session cookie does not open as a transaction.
        let session = crate::session::tests::session()
            .seal(&k, &wiki())
            .unwrap_or_else(|e| panic!("seal: {e}"));
        assert_eq!(
            Transaction::open(&k, &wiki(), &session, &t.state, 1_300),
            None
        );
    }

    #[test]
    fn sealed_transaction_is_small() {
        let k = keys("k1", &[("k1", 1)]);
        let cookie = tx()
            .seal(&k, &wiki())
            .unwrap_or_else(|e| panic!("seal: {e}"));
        assert!(cookie.len() < 500, "{} bytes", cookie.len());
    }

    #[test]
    fn return_path_safety_table() {
        let accepted = [
            "/",
            "/wiki",
            "/wiki/page?x=1&y=%20z#section-2",
            "/%2F%2Fevil.com",
            "/%5Cevil.com",
            "/a//b",
            "/a/../../b",
            "/?next=//evil.com",
            "/#//evil.com",
            "/:/evil",
            "/@evil.com",
        ];
        for s in accepted {
            assert_eq!(
                safe_return_path(s).as_deref(),
                Some(s),
                "{s:?} must be accepted"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_RETURN_PATH_LEN));
        let rejected = [
            "",
            "//evil.com",
            "///evil.com",
            "//",
            "/\\evil.com",
            "\\\\evil.com",
            "\\/evil.com",
            "/a\\b",
            "https://evil.com",
            "http:evil.com",
            "HTTPS://evil.com/",
            "javascript:alert(1)",
            "JaVaScRiPt:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "evil.com",
            "./x",
            "?x=1",
            "#frag",
            "/\t/evil.com",
            "/\n/evil.com",
            "/\r\nLocation: https://evil.com",
            "\t//evil.com",
            " /x",
            "/ /evil.com",
            "/\u{0}x",
            "/\u{7f}",
            "/caf\u{e9}",
            "/\u{ff0f}evil.com",
            "/\u{2028}",
            long.as_str(),
        ];
        for s in rejected {
            assert_eq!(safe_return_path(s), None, "{s:?} must be rejected");
        }
    }
}
