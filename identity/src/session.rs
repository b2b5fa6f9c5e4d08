//! The signed-in user's session, carried in an encrypted cookie.
//!
//! [`Session::seal`] encodes the session as compact JSON (short field names, empty fields
//! left out) and seals it with the active key of a [`SessionKeys`] ring, bound to the app
//! and host ([`Binding`]). [`Session::open`] returns `None` for anything that is not a
//! current session of this app on this host: tampered, sealed by a key no longer in the
//! ring, sealed for another app or host, expired, or undecodable. Why is logged at debug.
//!
//! Cookies are limited to about 4 KB each by browsers (name, value and attributes).
//! [`Session::fit_groups`] keeps a session under a budget by keeping the groups the app's
//! assignment and policies name and cutting the rest, marking [`Session::groups_cut`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::session_keys::SessionKeys;
use crate::{Binding, SealError};

/// Purpose string in the additional authenticated data of session cookies.
const PURPOSE: &str = "session";

/// The default budget for the whole `Set-Cookie` of the session cookie (name, value and
/// attributes), in bytes: under the 4096 bytes every browser accepts, with room to spare.
pub const DEFAULT_COOKIE_BUDGET: usize = 3800;

/// A signed-in user's session: who they are, what policy needs to know about how they
/// signed in, and when the session ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// A random id for this session (see [`crate::random_id`]), for logs and audit.
    #[serde(rename = "sid")]
    pub id: String,

    /// The provider's stable subject identifier (`sub`).
    #[serde(rename = "sub")]
    pub subject: String,

    /// The user name as policy sees it: `preferred_username`, else `email`.
    #[serde(rename = "usr")]
    pub user_name: String,

    /// The display name (`name`), when the provider sent one.
    #[serde(rename = "nam", default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,

    /// The e-mail address (`email`), when the provider sent one.
    #[serde(rename = "eml", default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,

    /// Group names (`groups`); possibly only part of them, see `groups_cut`.
    #[serde(rename = "grp", default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,

    /// Whether groups were cut to fit the cookie: `groups` then holds every group the app's
    /// assignment and policies name that the user is in, but not necessarily the others.
    #[serde(rename = "gct", default, skip_serializing_if = "is_false")]
    pub groups_cut: bool,

    /// Further claims that identity header mappings need, as strings (claim name to value).
    #[serde(rename = "clm", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,

    /// The provider's issuer URL (`iss` of the ID token).
    #[serde(rename = "iss")]
    pub issuer: String,

    /// When the user last authenticated at the provider (`auth_time`, else the token's
    /// `iat`), Unix seconds.
    #[serde(rename = "ath")]
    pub auth_time: u64,

    /// When this session was created, Unix seconds.
    #[serde(rename = "iat")]
    pub issued_at: u64,

    /// When this session ends, Unix seconds: never later than the ID token's `exp`.
    #[serde(rename = "exp")]
    pub expires_at: u64,

    /// Authentication methods (`amr`), for example `["pwd", "mfa"]`.
    #[serde(rename = "amr", default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,

    /// Authentication context class (`acr`), when the provider sent one.
    #[serde(rename = "acr", default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A session does not fit the cookie budget even with only the groups that are needed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error(
    "session cookie value needs {len} bytes even with only the needed groups, over the budget of {budget} bytes"
)]
pub struct SessionTooLarge {
    /// The sealed length with only the needed groups.
    pub len: usize,
    /// The budget it had to fit.
    pub budget: usize,
}

impl Session {
    /// Seals this session into a cookie value for `binding` with the ring's active key.
    pub fn seal(&self, keys: &SessionKeys, binding: &Binding) -> Result<String, SealError> {
        let plaintext = serde_json::to_vec(self)?;
        Ok(keys.seal(&binding.aad(PURPOSE), &plaintext)?)
    }

    /// Opens a session cookie value: `None` unless it was sealed by a key of the ring for
    /// this `binding`, is intact, decodes, and has not expired at `now` (Unix seconds).
    pub fn open(keys: &SessionKeys, binding: &Binding, value: &str, now: u64) -> Option<Session> {
        let plaintext = match keys.open(&binding.aad(PURPOSE), value) {
            Ok(plaintext) => plaintext,
            Err(reason) => {
                tracing::debug!(app = binding.app(), host = binding.host(), %reason, "session cookie ignored");
                return None;
            }
        };
        let session: Session = match serde_json::from_slice(&plaintext) {
            Ok(session) => session,
            Err(error) => {
                tracing::debug!(app = binding.app(), host = binding.host(), %error, "session cookie ignored: undecodable");
                return None;
            }
        };
        if now >= session.expires_at {
            tracing::debug!(
                app = binding.app(),
                host = binding.host(),
                session = %session.id,
                expires_at = session.expires_at,
                now,
                "session cookie ignored: expired"
            );
            return None;
        }
        Some(session)
    }

    /// The length of this session's cookie value once sealed, in bytes.
    pub fn sealed_len(&self) -> usize {
        SessionKeys::sealed_len(self.encoded_len())
    }

    fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |v| v.len())
    }

    /// Cuts groups until the sealed cookie value is at most `max_sealed_len` bytes (see
    /// [`crate::CookieSettings::session_value_budget`]). Groups for which `needed` is true
    /// (those the app's assignment and policies name) are always kept, first; the others
    /// are kept in their order while they fit, and `groups_cut` is set if any was dropped.
    ///
    /// Fails if the session is too large even with only the needed groups (then the
    /// session holds only those); the caller should refuse the sign-in with a clear page.
    pub fn fit_groups(
        &mut self,
        needed: impl Fn(&str) -> bool,
        max_sealed_len: usize,
    ) -> Result<(), SessionTooLarge> {
        if self.sealed_len() <= max_sealed_len {
            return Ok(());
        }
        let (kept, optional): (Vec<String>, Vec<String>) = std::mem::take(&mut self.groups)
            .into_iter()
            .partition(|g| needed(g));
        self.groups = kept;
        self.groups_cut = true;
        let len = self.sealed_len();
        if len > max_sealed_len {
            return Err(SessionTooLarge {
                len,
                budget: max_sealed_len,
            });
        }
        // Adding a group to a non-empty JSON array adds its encoding and a comma; count
        // that instead of re-encoding the whole session for each group.
        let mut plain_len = self.encoded_len();
        for group in optional {
            if self.groups.is_empty() {
                self.groups.push(group);
                plain_len = self.encoded_len();
                if SessionKeys::sealed_len(plain_len) > max_sealed_len {
                    self.groups.pop();
                    plain_len = self.encoded_len();
                }
                continue;
            }
            let added = serde_json::to_string(&group)
                .map_or(usize::MAX, |g| g.len())
                .saturating_add(1);
            if SessionKeys::sealed_len(plain_len.saturating_add(added)) <= max_sealed_len {
                plain_len += added;
                self.groups.push(group);
            }
        }
        // The count is exact; check it all the same, never to exceed the budget.
        while self.sealed_len() > max_sealed_len {
            let needed_count = self.groups.iter().filter(|g| needed(g)).count();
            if self.groups.len() <= needed_count {
                break;
            }
            self.groups.pop();
        }
        Ok(())
    }

    /// The value of claim `name` for an identity header: the `claims` map first, then the
    /// session's own fields (`sub`, `preferred_username`, `email`, `name`, `groups` and
    /// `amr` joined with commas, `acr`, `iss`). `None` when the user has no such claim.
    pub fn claim_value(&self, name: &str) -> Option<String> {
        if let Some(value) = self.claims.get(name) {
            return Some(value.clone());
        }
        match name {
            "sub" => Some(self.subject.clone()),
            "preferred_username" => Some(self.user_name.clone()),
            "email" => self.email.clone(),
            "name" => self.display_name.clone(),
            "groups" => (!self.groups.is_empty()).then(|| self.groups.join(",")),
            "amr" => (!self.amr.is_empty()).then(|| self.amr.join(",")),
            "acr" => self.acr.clone(),
            "iss" => Some(self.issuer.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;
    use crate::CookieSettings;

    pub(crate) fn keys(active: &str, ids: &[(&str, u8)]) -> SessionKeys {
        let keys: Vec<_> = ids
            .iter()
            .map(
                |(id, b)| serde_json::json!({"id": id, "secret": URL_SAFE_NO_PAD.encode([*b; 32])}),
            )
            .collect();
        SessionKeys::parse(&serde_json::json!({"active": active, "keys": keys}).to_string())
            .unwrap_or_else(|e| panic!("parse ring: {e}"))
    }

    pub(crate) fn session() -> Session {
        Session {
            id: "sid-1".to_owned(),
            subject: "00u1abcd".to_owned(),
            user_name: "alice@example.com".to_owned(),
            display_name: Some("Alice Example".to_owned()),
            email: Some("alice@example.com".to_owned()),
            groups: vec!["wiki-readers".to_owned(), "staff".to_owned()],
            groups_cut: false,
            claims: BTreeMap::from([("department".to_owned(), "R&D".to_owned())]),
            issuer: "https://login.example.com/".to_owned(),
            auth_time: 1_000,
            issued_at: 1_010,
            expires_at: 4_600,
            amr: vec!["pwd".to_owned(), "mfa".to_owned()],
            acr: Some("urn:example:mfa".to_owned()),
        }
    }

    fn wiki() -> Binding {
        Binding::new("team-a/wiki", "Wiki.Apps.Example.com.")
    }

    fn seal(s: &Session, k: &SessionKeys, b: &Binding) -> String {
        s.seal(k, b).unwrap_or_else(|e| panic!("seal: {e}"))
    }

    #[test]
    fn round_trip() {
        let k = keys("k1", &[("k1", 1)]);
        let cookie = seal(&session(), &k, &wiki());
        assert_eq!(cookie.len(), session().sealed_len());
        // The host is compared without case and trailing dot.
        let same = Binding::new("team-a/wiki", "wiki.apps.example.com");
        assert_eq!(Session::open(&k, &same, &cookie, 2_000), Some(session()));
        // Minimal session (no optional fields) too.
        let minimal = Session {
            display_name: None,
            email: None,
            groups: vec![],
            claims: BTreeMap::new(),
            amr: vec![],
            acr: None,
            ..session()
        };
        let cookie = seal(&minimal, &k, &wiki());
        assert_eq!(Session::open(&k, &wiki(), &cookie, 2_000), Some(minimal));
    }

    #[test]
    fn any_tampered_byte_makes_it_absent() {
        let k = keys("k1", &[("k1", 1)]);
        let cookie = seal(&session(), &k, &wiki());
        let raw = URL_SAFE_NO_PAD
            .decode(&cookie)
            .unwrap_or_else(|e| panic!("decode: {e}"));
        for i in 0..raw.len() {
            for flip in [0x01u8, 0x80] {
                let mut bad = raw.clone();
                bad[i] ^= flip;
                let bad = URL_SAFE_NO_PAD.encode(&bad);
                assert_eq!(
                    Session::open(&k, &wiki(), &bad, 2_000),
                    None,
                    "byte {i} ^ {flip:#x}"
                );
            }
        }
        // Truncated, extended, empty and non-base64 values too.
        assert_eq!(
            Session::open(&k, &wiki(), &cookie[..cookie.len() - 1], 2_000),
            None
        );
        assert_eq!(
            Session::open(&k, &wiki(), &format!("{cookie}A"), 2_000),
            None
        );
        assert_eq!(Session::open(&k, &wiki(), "", 2_000), None);
        assert_eq!(Session::open(&k, &wiki(), "not a cookie!", 2_000), None);
    }

    #[test]
    fn other_app_host_or_purpose_makes_it_absent() {
        let k = keys("k1", &[("k1", 1)]);
        let cookie = seal(&session(), &k, &wiki());
        for other in [
            Binding::new("team-a/blog", "wiki.apps.example.com"),
            Binding::new("team-a/wiki", "blog.apps.example.com"),
            Binding::new("team-b/wiki", "wiki.apps.example.com"),
        ] {
            assert_eq!(Session::open(&k, &other, &cookie, 2_000), None, "{other:?}");
        }
        // A sign-in transaction cookie of the same app does not open as a session.
        let tx = crate::Transaction::new("team-a/wiki", "default", "/", 1_000)
            .unwrap_or_else(|e| panic!("tx: {e}"));
        let tx_cookie = tx
            .seal(&k, &wiki())
            .unwrap_or_else(|e| panic!("seal tx: {e}"));
        assert_eq!(Session::open(&k, &wiki(), &tx_cookie, 1_001), None);
    }

    #[test]
    fn expired_makes_it_absent() {
        let k = keys("k1", &[("k1", 1)]);
        let cookie = seal(&session(), &k, &wiki());
        assert!(Session::open(&k, &wiki(), &cookie, 4_599).is_some());
        assert_eq!(Session::open(&k, &wiki(), &cookie, 4_600), None);
        assert_eq!(Session::open(&k, &wiki(), &cookie, 9_999), None);
    }

    #[test]
    fn removed_key_makes_it_absent_rotation_keeps_it() {
        let old = keys("k1", &[("k1", 1)]);
        let cookie = seal(&session(), &old, &wiki());
        // Rotated: k2 active, k1 kept; old sessions open, new ones are sealed by k2.
        let rotated = keys("k2", &[("k2", 2), ("k1", 1)]);
        assert_eq!(
            Session::open(&rotated, &wiki(), &cookie, 2_000),
            Some(session())
        );
        let new_cookie = seal(&session(), &rotated, &wiki());
        assert_eq!(Session::open(&old, &wiki(), &new_cookie, 2_000), None);
        let only_new = keys("k2", &[("k2", 2)]);
        assert_eq!(
            Session::open(&only_new, &wiki(), &new_cookie, 2_000),
            Some(session())
        );
        // k1 removed: its sessions are gone.
        assert_eq!(Session::open(&only_new, &wiki(), &cookie, 2_000), None);
    }

    #[test]
    fn many_long_groups_fit_the_budget_keeping_the_needed_ones() {
        let k = keys("k1", &[("k1", 1)]);
        let settings = CookieSettings::default();
        let budget = settings.session_value_budget(DEFAULT_COOKIE_BUDGET);
        let mut s = session();
        s.groups = (0..200)
            .map(|i| format!("CN=group-{i:03}-with-a-rather-long-distinguished-name,OU=Groups,DC=corp,DC=example,DC=com"))
            .collect();
        let needed = ["CN=group-007-", "CN=group-150-", "CN=group-199-"];
        let is_needed = |g: &str| needed.iter().any(|n| g.starts_with(n));
        assert!(s.sealed_len() > budget, "the test must start over budget");
        s.fit_groups(is_needed, budget)
            .unwrap_or_else(|e| panic!("fit: {e}"));
        assert!(s.groups_cut);
        assert!(s.sealed_len() <= budget, "{} > {budget}", s.sealed_len());
        // Needed groups first, then as many others as fit: the budget is used well.
        assert_eq!(s.groups.iter().take(3).filter(|g| is_needed(g)).count(), 3);
        assert!(s.groups.len() > 20, "only {} groups kept", s.groups.len());
        let one_more = serde_json::to_string(&s.groups[3]).map_or(0, |g| g.len()) + 1;
        assert!(
            s.sealed_len() + one_more * 4 / 3 > budget - 3,
            "room for another group was left"
        );
        // The whole Set-Cookie stays under the budget, and the cookie opens.
        let value = seal(&s, &k, &wiki());
        let header = settings.session_set_cookie(&value, s.expires_at, 2_000);
        assert!(
            header.len() <= DEFAULT_COOKIE_BUDGET,
            "{} bytes",
            header.len()
        );
        let opened =
            Session::open(&k, &wiki(), &value, 2_000).unwrap_or_else(|| panic!("must open"));
        assert_eq!(opened, s);
        // A persistent cookie (with Max-Age) fits too.
        let persistent = CookieSettings {
            persistent: true,
            ..CookieSettings::default()
        };
        let header = persistent.session_set_cookie(&value, s.expires_at, 2_000);
        assert!(
            header.len() <= DEFAULT_COOKIE_BUDGET,
            "{} bytes",
            header.len()
        );
    }

    #[test]
    fn fitting_sessions_are_untouched_and_impossible_ones_fail() {
        let mut s = session();
        s.fit_groups(|_| false, 3_000)
            .unwrap_or_else(|e| panic!("fit: {e}"));
        assert_eq!(s, session());
        s.groups = (0..100)
            .map(|i| format!("needed-group-number-{i:04}"))
            .collect();
        match s.fit_groups(|_| true, 1_000) {
            Err(SessionTooLarge { len, budget: 1_000 }) => assert!(len > 1_000),
            other => panic!("expected SessionTooLarge, got {other:?}"),
        }
        // No needed group at all: optional ones fill the budget from the empty list.
        let mut s = session();
        s.groups = (0..100)
            .map(|i| format!("optional-group-number-{i:04}"))
            .collect();
        s.fit_groups(|_| false, 700)
            .unwrap_or_else(|e| panic!("fit: {e}"));
        assert!(s.groups_cut && !s.groups.is_empty() && s.sealed_len() <= 700);
        assert_eq!(s.groups[0], "optional-group-number-0000");
    }

    #[test]
    fn claim_values_for_headers() {
        let s = session();
        assert_eq!(s.claim_value("department").as_deref(), Some("R&D"));
        assert_eq!(
            s.claim_value("preferred_username").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(
            s.claim_value("groups").as_deref(),
            Some("wiki-readers,staff")
        );
        assert_eq!(s.claim_value("amr").as_deref(), Some("pwd,mfa"));
        assert_eq!(s.claim_value("sub").as_deref(), Some("00u1abcd"));
        assert_eq!(s.claim_value("nickname"), None);
    }

    #[test]
    fn encoding_is_compact() {
        let text = serde_json::to_string(&session()).unwrap_or_else(|e| panic!("encode: {e}"));
        assert!(
            text.starts_with(r#"{"sid":"sid-1","sub":"00u1abcd","usr":"#),
            "{text}"
        );
        assert!(
            !text.contains("gct"),
            "false groups_cut is left out: {text}"
        );
    }
}
