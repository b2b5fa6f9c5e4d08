//! Sallyport's cookies on the wire: their names, `Set-Cookie` values, reading them from a
//! request, and removing them before the request goes to a backend.
//!
//! Two cookies, both `Path=/` and without `Domain`:
//!
//! - the session cookie, `__Host-sallyport` when `Secure` (the `__Host-` prefix makes
//!   browsers accept it only from the exact host, over HTTPS, for the whole site), else
//!   `sallyport`;
//! - one sign-in transaction cookie per sign-in in flight, `__Host-sallyport-tx-<first 16
//!   characters of the OAuth state>` (or `sallyport-tx-...`), so that sign-ins in several
//!   tabs do not overwrite each other. It is `SameSite=Lax` (`None` if the app's cookie
//!   is), because the provider's redirect back is a cross-site navigation.
//!
//! The session cookie and its attributes come from the app's [`CookieSettings`].

use http::HeaderMap;
use http::header::{COOKIE, HeaderValue};

use crate::transaction::TRANSACTION_LIFETIME_SECS;

/// Session cookie name when `Secure`.
const HOST_SESSION_NAME: &str = "__Host-sallyport";
/// Session cookie name without `Secure` (the `__Host-` prefix requires it).
const PLAIN_SESSION_NAME: &str = "sallyport";
/// What follows the session cookie name in a transaction cookie's name.
const TRANSACTION_INFIX: &str = "-tx-";
/// How many characters of the state go into a transaction cookie's name.
const STATE_CHARS_IN_NAME: usize = 16;
/// The largest `Max-Age` digits counted when budgeting a persistent cookie.
const WIDEST_MAX_AGE: u64 = 9_999_999_999;

/// The `SameSite` attribute of the session cookie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only with same-site requests.
    Strict,
    /// Sent with same-site requests and top-level navigations from other sites.
    #[default]
    Lax,
    /// Sent with every request; requires `secure`.
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// Attributes of an app's session cookie (the PublishedApp's `session.cookie`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieSettings {
    /// Hide the cookie from scripts (`HttpOnly`).
    pub http_only: bool,
    /// Send it over HTTPS only (`Secure`); also selects the `__Host-` name.
    pub secure: bool,
    /// Keep it across browser restarts until the session expires (`Max-Age`), instead of
    /// a browser-session cookie.
    pub persistent: bool,
    /// The `SameSite` attribute.
    pub same_site: SameSite,
}

impl Default for CookieSettings {
    /// HttpOnly, Secure, not persistent, SameSite=Lax (the API's defaults).
    fn default() -> Self {
        Self {
            http_only: true,
            secure: true,
            persistent: false,
            same_site: SameSite::Lax,
        }
    }
}

impl CookieSettings {
    /// The session cookie's name: `__Host-sallyport` when `secure`, else `sallyport`.
    pub fn session_cookie_name(&self) -> &'static str {
        if self.secure {
            HOST_SESSION_NAME
        } else {
            PLAIN_SESSION_NAME
        }
    }

    /// The name of the transaction cookie of the sign-in whose OAuth state is `state`.
    pub fn transaction_cookie_name(&self, state: &str) -> String {
        let suffix: String = state
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(STATE_CHARS_IN_NAME)
            .collect();
        format!("{}{TRANSACTION_INFIX}{suffix}", self.session_cookie_name())
    }

    /// The `Set-Cookie` value for a session cookie holding `value` (a sealed [`crate::Session`])
    /// that expires at `expires_at`; `now` gives a persistent cookie's `Max-Age`.
    pub fn session_set_cookie(&self, value: &str, expires_at: u64, now: u64) -> String {
        let max_age = self.persistent.then(|| expires_at.saturating_sub(now));
        self.set_cookie(self.session_cookie_name(), value, self.same_site, max_age)
    }

    /// The `Set-Cookie` value that deletes the session cookie (sign-out, or a cookie that
    /// did not open).
    pub fn session_removal(&self) -> String {
        self.set_cookie(self.session_cookie_name(), "", self.same_site, Some(0))
    }

    /// The `Set-Cookie` value for the transaction cookie of the sign-in with OAuth `state`,
    /// holding `value` (a sealed [`crate::Transaction`]); it lives
    /// [`TRANSACTION_LIFETIME_SECS`].
    pub fn transaction_set_cookie(&self, state: &str, value: &str) -> String {
        self.set_cookie(
            &self.transaction_cookie_name(state),
            value,
            self.transaction_same_site(),
            Some(TRANSACTION_LIFETIME_SECS),
        )
    }

    /// The `Set-Cookie` value that deletes the transaction cookie of `state` (once the
    /// sign-in completed or failed).
    pub fn transaction_removal(&self, state: &str) -> String {
        self.set_cookie(
            &self.transaction_cookie_name(state),
            "",
            self.transaction_same_site(),
            Some(0),
        )
    }

    /// How many bytes a session cookie's value may take for its whole `Set-Cookie` (name,
    /// value and attributes, counting the widest `Max-Age`) to stay within `total`
    /// (for example [`crate::DEFAULT_COOKIE_BUDGET`]); pass it to
    /// [`crate::Session::fit_groups`].
    pub fn session_value_budget(&self, total: usize) -> usize {
        let max_age = self.persistent.then_some(WIDEST_MAX_AGE);
        let overhead = self
            .set_cookie(self.session_cookie_name(), "", self.same_site, max_age)
            .len();
        total.saturating_sub(overhead)
    }

    fn transaction_same_site(&self) -> SameSite {
        if self.same_site == SameSite::None && self.secure {
            SameSite::None
        } else {
            SameSite::Lax
        }
    }

    fn set_cookie(
        &self,
        name: &str,
        value: &str,
        same_site: SameSite,
        max_age: Option<u64>,
    ) -> String {
        let mut out = format!("{name}={value}; Path=/");
        if self.secure {
            out.push_str("; Secure");
        }
        // The transaction cookie is always HttpOnly: scripts never need it.
        if self.http_only || name.contains(TRANSACTION_INFIX) {
            out.push_str("; HttpOnly");
        }
        out.push_str("; SameSite=");
        out.push_str(same_site.as_str());
        if let Some(max_age) = max_age {
            out.push_str(&format!("; Max-Age={max_age}"));
        }
        out
    }
}

/// Whether a cookie name is one of Sallyport's own (session or transaction cookie, with or
/// without the `__Host-` prefix; the prefix compared without case, as browsers do).
pub fn is_own_cookie(name: &[u8]) -> bool {
    let lower = name.to_ascii_lowercase();
    let rest = lower.strip_prefix(b"__host-").unwrap_or(&lower);
    match rest.strip_prefix(PLAIN_SESSION_NAME.as_bytes()) {
        Some(after) => after.is_empty() || after.starts_with(TRANSACTION_INFIX.as_bytes()),
        None => false,
    }
}

/// Splits a `Cookie` header value into `(name, value)` pairs, trimming spaces; the value is
/// `None` for a bare name without `=`.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
    header.split(|b| *b == b';').filter_map(|pair| {
        let pair = pair.trim_ascii();
        if pair.is_empty() {
            return None;
        }
        match pair.iter().position(|b| *b == b'=') {
            Some(at) => Some((pair[..at].trim_ascii(), Some(pair[at + 1..].trim_ascii()))),
            None => Some((pair, None)),
        }
    })
}

/// The values of every cookie named exactly `name` in the request's `Cookie` headers, in
/// order (a browser may send several, for example one set for a parent domain: try each).
pub fn cookie_values<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers.get_all(COOKIE).iter().flat_map(move |header| {
        cookie_pairs(header.as_bytes()).filter_map(move |(n, v)| {
            if n == name.as_bytes() {
                v.and_then(|v| std::str::from_utf8(v).ok())
            } else {
                None
            }
        })
    })
}

/// A `Cookie` header value without Sallyport's own cookies: `Some` unchanged bytes if it
/// holds none of them, `Some` the remaining pairs joined with `"; "` if it held some, or
/// `None` if nothing else is left.
pub fn strip_own_cookies_from_value(header: &[u8]) -> Option<Vec<u8>> {
    let pairs: Vec<(&[u8], Option<&[u8]>)> = cookie_pairs(header).collect();
    if !pairs.iter().any(|(name, _)| is_own_cookie(name)) {
        return (!pairs.is_empty()).then(|| header.to_vec());
    }
    let mut out = Vec::with_capacity(header.len());
    for (name, value) in pairs.into_iter().filter(|(name, _)| !is_own_cookie(name)) {
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(name);
        if let Some(value) = value {
            out.push(b'=');
            out.extend_from_slice(value);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Removes Sallyport's own cookies from every `Cookie` header of a request (they must never
/// reach a backend), keeping all others; a header left empty is removed.
pub fn strip_own_cookies(headers: &mut HeaderMap) {
    let touched = headers
        .get_all(COOKIE)
        .iter()
        .any(|h| cookie_pairs(h.as_bytes()).any(|(name, _)| is_own_cookie(name)));
    if !touched {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    headers.remove(COOKIE);
    for value in values {
        if let Some(kept) = strip_own_cookies_from_value(value.as_bytes()) {
            // Kept bytes are a subset of a valid header value joined with "; ": valid.
            if let Ok(kept) = HeaderValue::from_bytes(&kept) {
                headers.append(COOKIE, kept);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                COOKIE,
                HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{v}: {e}")),
            );
        }
        h.append("x-other", HeaderValue::from_static("kept"));
        h
    }

    fn cookies(h: &HeaderMap) -> Vec<&str> {
        h.get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    #[test]
    fn names_follow_secure() {
        let secure = CookieSettings::default();
        assert_eq!(secure.session_cookie_name(), "__Host-sallyport");
        assert_eq!(
            secure.transaction_cookie_name("AbCdEfGhIjKlMnOpQrStUv"),
            "__Host-sallyport-tx-AbCdEfGhIjKlMnOp"
        );
        let plain = CookieSettings {
            secure: false,
            ..CookieSettings::default()
        };
        assert_eq!(plain.session_cookie_name(), "sallyport");
        assert_eq!(
            plain.transaction_cookie_name("a;b=c d"),
            "sallyport-tx-abcd"
        );
    }

    #[test]
    fn set_cookie_attributes() {
        let default = CookieSettings::default();
        assert_eq!(
            default.session_set_cookie("V", 5_000, 1_400),
            "__Host-sallyport=V; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        let persistent = CookieSettings {
            persistent: true,
            same_site: SameSite::Strict,
            ..default
        };
        assert_eq!(
            persistent.session_set_cookie("V", 5_000, 1_400),
            "__Host-sallyport=V; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=3600"
        );
        let plain = CookieSettings {
            http_only: false,
            secure: false,
            persistent: false,
            same_site: SameSite::Lax,
        };
        assert_eq!(
            plain.session_set_cookie("V", 5_000, 1_400),
            "sallyport=V; Path=/; SameSite=Lax"
        );
        let none = CookieSettings {
            same_site: SameSite::None,
            ..default
        };
        assert_eq!(
            none.session_set_cookie("V", 5_000, 1_400),
            "__Host-sallyport=V; Path=/; Secure; HttpOnly; SameSite=None"
        );
        assert_eq!(
            default.session_removal(),
            "__Host-sallyport=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
        );
        // Expired already: a persistent cookie gets Max-Age=0, never a wrapped number.
        assert!(
            persistent
                .session_set_cookie("V", 1_000, 1_400)
                .ends_with("Max-Age=0")
        );
    }

    #[test]
    fn transaction_cookie_attributes() {
        let strict = CookieSettings {
            same_site: SameSite::Strict,
            http_only: false,
            ..CookieSettings::default()
        };
        assert_eq!(
            strict.transaction_set_cookie("state123", "T"),
            "__Host-sallyport-tx-state123=T; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=600"
        );
        assert_eq!(
            strict.transaction_removal("state123"),
            "__Host-sallyport-tx-state123=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
        );
        let none = CookieSettings {
            same_site: SameSite::None,
            ..CookieSettings::default()
        };
        assert!(
            none.transaction_set_cookie("s", "T")
                .contains("SameSite=None")
        );
    }

    #[test]
    fn value_budget_counts_name_and_attributes() {
        let default = CookieSettings::default();
        let overhead = "__Host-sallyport=; Path=/; Secure; HttpOnly; SameSite=Lax".len();
        assert_eq!(default.session_value_budget(3_800), 3_800 - overhead);
        let persistent = CookieSettings {
            persistent: true,
            ..default
        };
        assert_eq!(
            persistent.session_value_budget(3_800),
            3_800 - overhead - "; Max-Age=9999999999".len()
        );
        assert_eq!(default.session_value_budget(10), 0);
    }

    #[test]
    fn reads_every_value_of_a_cookie() {
        let h = headers(&[
            "a=1; __Host-sallyport=first",
            "__Host-sallyport = second ;b=2",
            "sallyport=plain",
        ]);
        assert_eq!(
            cookie_values(&h, "__Host-sallyport").collect::<Vec<_>>(),
            ["first", "second"]
        );
        assert_eq!(
            cookie_values(&h, "sallyport").collect::<Vec<_>>(),
            ["plain"]
        );
        assert_eq!(cookie_values(&h, "c").count(), 0);
    }

    #[test]
    fn own_cookie_names() {
        for own in [
            "__Host-sallyport",
            "sallyport",
            "__host-SALLYPORT",
            "__Host-sallyport-tx-abc",
            "sallyport-tx-abc",
        ] {
            assert!(is_own_cookie(own.as_bytes()), "{own}");
        }
        for other in [
            "sallyportx",
            "my-sallyport",
            "__Host-other",
            "sallyport-session",
            "__Secure-sallyport",
            "",
        ] {
            assert!(!is_own_cookie(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn strips_only_our_cookies() {
        let mut h = headers(&["a=1; __Host-sallyport=x; b=2"]);
        strip_own_cookies(&mut h);
        assert_eq!(cookies(&h), ["a=1; b=2"]);
        assert_eq!(h.get("x-other").map(|v| v.as_bytes()), Some(&b"kept"[..]));

        // Several Cookie headers (HTTP/2 sends one per cookie): each filtered, empty ones go.
        let mut h = headers(&[
            "__Host-sallyport=x",
            "a=1",
            "__Host-sallyport-tx-abc=t;c=3",
            "b=2;sallyport=y",
        ]);
        strip_own_cookies(&mut h);
        assert_eq!(cookies(&h), ["a=1", "c=3", "b=2"]);

        // Only ours: the header is removed.
        let mut h = headers(&["__Host-sallyport=x; __Host-sallyport-tx-s=y", "sallyport=z"]);
        strip_own_cookies(&mut h);
        assert!(h.get(COOKIE).is_none());
        assert!(h.get("x-other").is_some());

        // None of ours: headers untouched byte for byte, odd spacing included.
        let mut h = headers(&["a=1;b=2 ;  c=\"q\"", "d"]);
        strip_own_cookies(&mut h);
        assert_eq!(cookies(&h), ["a=1;b=2 ;  c=\"q\"", "d"]);
    }

    #[test]
    fn strip_keeps_empty_values_and_bare_names() {
        assert_eq!(
            strip_own_cookies_from_value(b"a=; sallyport=x; flag; b=2"),
            Some(b"a=; flag; b=2".to_vec())
        );
        assert_eq!(strip_own_cookies_from_value(b" ; sallyport=x ; "), None);
        assert_eq!(strip_own_cookies_from_value(b""), None);
    }
}
