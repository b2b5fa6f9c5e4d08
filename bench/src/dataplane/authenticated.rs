//! The authenticated app of the data-plane fleet: the same backend published a second
//! time with OpenID Connect pre-authentication, an assignment, identity headers, a signed
//! assertion and two conditional access policies (an Enabled one that requires MFA from
//! every location, and a ReportOnly baseline), so a request pays for everything a signed-in
//! user's request pays for: opening the encrypted session cookie, stripping client-sent
//! identity headers, the policy decision (cached per session and configuration version),
//! the identity headers and the signed assertion.
//!
//! The load generator cannot sign in through a browser, so the benchmark writes the
//! fleet's session key ring where the standalone proxy reads it (`--tls-dir`, laid out
//! like the Secret `sallyport-session-keys`) and seals a session cookie with the same key,
//! as the proxy does at the end of a sign-in. No provider is contacted: the proxy needs its
//! issuer only to sign users in, not to open their sessions.

use std::path::Path;

use sallyport_identity::{Binding, CookieSettings, Session, SessionKeys};

use super::error::DataplaneError;

/// The authenticated PublishedApp.
pub const APP: &str = "bench-auth-app";
/// Its host name (users' SNI and `Host`).
pub const APP_HOST: &str = "auth.bench.test";
/// Its TLS Secret (a directory under the proxy's `--tls-dir`).
pub const TLS_SECRET: &str = "bench-auth-app-tls";
/// The Enabled policy requiring MFA.
pub const MFA_POLICY: &str = "bench-require-mfa";
/// The ReportOnly baseline policy.
pub const BASELINE_POLICY: &str = "bench-block-high-risk";
/// The issuer the app names (never contacted during the benchmark).
pub const ISSUER: &str = "https://login.bench.test/";
/// The user the sealed session belongs to.
pub const USER: &str = "ada@bench.test";
/// The group the app's assignment requires and the user is in.
pub const GROUP: &str = "engineering";
/// The fleet namespace of the standalone proxy (its `--namespace` default), where it reads
/// the session keys.
const FLEET_NAMESPACE: &str = "sallyport-system";
/// The Secret name and key of the session key ring.
const SESSION_KEYS: (&str, &str) = ("sallyport-session-keys", "keys.json");

/// The YAML of the authenticated app and its policies, in `namespace`, served at
/// `https://APP_HOST:proxy_port/` from `backend_url` through connector group `group`.
pub fn manifests(namespace: &str, group: &str, proxy_port: u16, backend_url: &str) -> String {
    format!(
        "apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata:
  name: {APP}
  namespace: {namespace}
  labels: {{tier: internal}}
spec:
  externalUrl: https://{APP_HOST}:{proxy_port}/
  internalUrl: {backend_url}
  connectorGroup:
    name: {group}
  preAuthentication:
    type: OIDC
    oidc:
      issuerUrl: {ISSUER}
      clientId: bench
      clientSecretRef: {{name: bench-oidc, key: client-secret}}
  assignment:
    groups: [{GROUP}]
  conditionalAccessPolicies: [{MFA_POLICY}]
  tls:
    secretName: {TLS_SECRET}
  identity:
    headers:
      - {{name: X-Remote-User, claim: preferred_username}}
      - {{name: X-Remote-Groups, claim: groups}}
    signedAssertion: {{enabled: true, header: X-Sallyport-Assertion, lifetime: 5m}}
  rateLimit: {{requestsPerSecond: 1000000, burst: 10000000}}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata:
  name: {MFA_POLICY}
  namespace: {namespace}
spec:
  state: Enabled
  assignments:
    apps:
      selector:
        matchLabels: {{tier: internal}}
    users:
      include: [\"*\"]
      exclude: [breakglass@bench.test]
  conditions:
    locations:
      include: [Any]
      exclude: [192.0.2.0/24]
  grant:
    require:
      operator: AND
      mfa: true
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata:
  name: {BASELINE_POLICY}
  namespace: {namespace}
spec:
  state: ReportOnly
  assignments:
    apps:
      selector: {{}}
    users:
      include: [\"*\"]
  conditions:
    signInRisk: [high]
  grant:
    block: true
"
    )
}

/// Writes a fresh session key ring under `tls_dir` (where the standalone proxy reads it)
/// and returns a `Cookie` header value carrying a session of [`USER`] (password and MFA,
/// in [`GROUP`]) sealed for `namespace/APP` on [`APP_HOST`], valid for a day.
pub fn write_keys_and_seal_cookie(
    tls_dir: &Path,
    namespace: &str,
) -> Result<String, DataplaneError> {
    let failed = |message: String| DataplaneError::Pki {
        what: "session keys and cookie",
        message,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .map_err(|error| failed(error.to_string()))?;
    let keys = SessionKeys::generate(now).map_err(|error| failed(error.to_string()))?;
    let (secret, key) = SESSION_KEYS;
    let dir = tls_dir.join(FLEET_NAMESPACE).join(secret);
    std::fs::create_dir_all(&dir)
        .map_err(DataplaneError::io(format!("creating {}", dir.display())))?;
    let file = dir.join(key);
    std::fs::write(&file, keys.to_json())
        .map_err(DataplaneError::io(format!("writing {}", file.display())))?;
    let session = Session {
        id: format!("bench-{now}"),
        subject: "bench-subject-1".to_owned(),
        user_name: USER.to_owned(),
        display_name: Some("Ada Bench".to_owned()),
        email: Some(USER.to_owned()),
        groups: vec![GROUP.to_owned()],
        groups_cut: false,
        claims: Default::default(),
        issuer: ISSUER.to_owned(),
        auth_time: now,
        issued_at: now,
        expires_at: now + 24 * 3600,
        amr: vec!["pwd".to_owned(), "mfa".to_owned()],
        acr: None,
    };
    let binding = Binding::new(format!("{namespace}/{APP}"), APP_HOST);
    let sealed = session
        .seal(&keys, &binding)
        .map_err(|error| failed(error.to_string()))?;
    Ok(format!(
        "{}={sealed}",
        CookieSettings::default().session_cookie_name()
    ))
}
