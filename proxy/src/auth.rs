//! OpenID Connect pre-authentication on the user request path.
//!
//! For an app whose `preAuthentication.type` is `OIDC`:
//!
//! 1. Sallyport's own paths under [`RESERVED_PREFIX`] on every app host are answered here:
//!    `sign-in` (start the authorization-code flow with PKCE), `callback` (finish it),
//!    `sign-out`, `signed-out` and `jwks.json` (the keys backends verify assertions with).
//! 2. Every other request is gated: the session cookie is opened (a tampered, expired,
//!    foreign-key or other-app cookie is simply absent). Without a session, a browser
//!    navigation gets a tiny interstitial page that keeps the URL's `#fragment` and goes
//!    to `sign-in`; a script (fetch/XHR) gets 401 with a JSON body naming the sign-in URL.
//!    With a session, conditional access decides ([`crate::access`]): the app's
//!    assignment (users, groups) first, then its ConditionalAccessPolicies. A block or
//!    an unmet requirement that signing in again cannot meet is refused with 403; MFA, an
//!    authentication strength or a lapsed sign-in frequency sends the browser back to
//!    the provider to step up (`acr_values`, `max_age`, `prompt=login`). A step-up that
//!    comes back still short is refused, never repeated.
//! 3. What reaches the backend: never Sallyport's cookies, never a client-sent copy of an
//!    identity header or the assertion header; the configured claim headers and a
//!    short-lived ES256 assertion are added.
//!
//! State stays in the browser (sealed cookies), so any replica finishes a sign-in another
//! one started. Passthrough apps never come here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use sallyport_api::conditional_access_policy::PersistentBrowserSession;
use sallyport_api::fleet_config::{OidcClient, Route, SecretKeyRef};
use sallyport_api::published_app::SameSite as ApiSameSite;
use sallyport_identity::{
    AssertionCache, AssertionKeys, AssertionRequest, Binding, CookieSettings,
    DEFAULT_COOKIE_BUDGET, SameSite, Session, SessionKeys, Transaction, cookie, random_id,
    safe_return_path, unix_now,
};
use sallyport_oidc::{
    AuthenticationRequirements, ClientSettings, OidcError, Providers, SignInSecrets, SignedIn,
};
use sallyport_policy::{Decision, Outcome, SignInStage, platform_from_user_agent};
use sallyport_risk::{Assessment, RiskEngine, SignInAttempt};
use sallyport_tunnel::body::{TunnelBody, full};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::access::{
    AccessControl, AccessSettings, DETECTED_SIGN_IN_RISK_CLAIM, DETECTED_USER_RISK_CLAIM, Subject,
};
use crate::app_tls::SecretSource;
use crate::pages;
use crate::router::{AppRoute, Router};

/// The path prefix Sallyport answers itself on every app host.
pub const RESERVED_PREFIX: &str = "/.sallyport/";
/// How many signed assertions a proxy keeps for reuse (each a few hundred bytes to a few
/// KiB, with its key): one per active session and app, the least recently used go first.
const ASSERTIONS_KEPT: usize = 50_000;
/// Starts a sign-in; `?return=<same-origin path>`.
pub const SIGN_IN_PATH: &str = "/.sallyport/sign-in";
/// The redirect URI registered at the provider, on every app host.
pub const CALLBACK_PATH: &str = "/.sallyport/callback";
/// Ends the session (and, where the provider supports it, the provider's).
pub const SIGN_OUT_PATH: &str = "/.sallyport/sign-out";
/// Where the provider sends the browser after signing out (post-logout redirect URI).
pub const SIGNED_OUT_PATH: &str = "/.sallyport/signed-out";
/// The JWKS of the assertion signing keys.
pub const JWKS_PATH: &str = "/.sallyport/jwks.json";

/// How long a client secret read from its Secret is used before it is read again.
pub const CLIENT_SECRET_TTL: Duration = Duration::from_secs(60);

/// The binding of sign-in transactions: not yet tied to an app (the sealed transaction
/// names it), only to the host.
const TRANSACTION_PURPOSE: &str = "sign-in";

const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");

/// The interstitial's only script: go to sign-in, keeping path, query and fragment.
const INTERSTITIAL_SCRIPT: &str = "location.replace(\"/.sallyport/sign-in?return=\"+encodeURIComponent(location.pathname+location.search+location.hash));";

/// What the gate decided for a request.
pub enum Gate {
    /// Forward it, as this user, under the decision's session controls.
    Pass(Arc<Subject>, Arc<Decision>),
    /// Answer it with this (sign-in interstitial, 401, 403 ...).
    Answer(Response<TunnelBody>),
}

/// The fleet-wide settings of pre-authentication.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `iss` of the signed assertions: the fleet's public identity, e.g. its base URL.
    pub assertion_issuer: String,
    /// Conditional access: how MFA and risk are read.
    pub access: AccessSettings,
    /// Risk detection at sign-in (see [`crate::risk`]).
    pub risk: Arc<RiskEngine>,
}

/// Sign-in, sessions and identity for OIDC apps. Keys are swapped in as their Secrets
/// change.
pub struct Authenticator {
    settings: AuthSettings,
    providers: Providers,
    secrets: SecretSource,
    session_keys: ArcSwapOption<SessionKeys>,
    assertion_keys: ArcSwapOption<AssertionKeys>,
    /// Signed assertions reused for a session's further requests (a fifth of their
    /// lifetime, at most a minute): signing is the largest cost of a signed-in request.
    assertions: AssertionCache,
    client_secrets: Mutex<HashMap<SecretKeyRef, (String, Instant)>>,
    interstitial_csp: HeaderValue,
    access: Arc<AccessControl>,
    risk: Arc<RiskEngine>,
}

/// A sign-in failure as users see it: a category, never a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInFailure {
    /// The provider could not be reached.
    ProviderUnreachable,
    /// The user (or the provider) declined the sign-in.
    Denied,
    /// The callback's state matches no sign-in this browser started (expired, replayed
    /// or forged).
    StateMismatch,
    /// The provider's answer failed validation.
    TokenInvalid,
    /// The proxy cannot sign anyone in (no keys, misconfigured app).
    Unavailable,
}

impl SignInFailure {
    fn status(self) -> StatusCode {
        match self {
            Self::ProviderUnreachable => StatusCode::BAD_GATEWAY,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::StateMismatch | Self::TokenInvalid => StatusCode::BAD_REQUEST,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::ProviderUnreachable => "Sign-in failed: identity provider unreachable",
            Self::Denied => "Sign-in declined",
            Self::StateMismatch => "Sign-in failed: the sign-in expired or was not started here",
            Self::TokenInvalid => "Sign-in failed: the identity provider's answer is invalid",
            Self::Unavailable => "Sign-in unavailable",
        }
    }

    fn detail(self) -> &'static str {
        match self {
            Self::ProviderUnreachable => {
                "The identity provider did not answer. Try again in a moment."
            }
            Self::Denied => "The identity provider reports that the sign-in was declined.",
            Self::StateMismatch => {
                "Start again from the application's address; sign-ins must finish within 10 minutes in the browser that started them."
            }
            Self::TokenInvalid => {
                "The identity token could not be verified. Try again; if it persists, tell the application's administrators."
            }
            Self::Unavailable => {
                "This proxy cannot sign you in right now. Nothing was sent to the application."
            }
        }
    }

    /// The category name in logs.
    pub fn category(self) -> &'static str {
        match self {
            Self::ProviderUnreachable => "ProviderUnreachable",
            Self::Denied => "Denied",
            Self::StateMismatch => "StateMismatch",
            Self::TokenInvalid => "TokenInvalid",
            Self::Unavailable => "Unavailable",
        }
    }
}

impl From<&OidcError> for SignInFailure {
    fn from(error: &OidcError) -> Self {
        match error {
            OidcError::ProviderUnreachable { .. } => Self::ProviderUnreachable,
            OidcError::ProviderRefused { .. } | OidcError::TokenInvalid { .. } => {
                Self::TokenInvalid
            }
            OidcError::Settings { .. } => Self::Unavailable,
        }
    }
}

/// The host a request addressed (no port, lower case) and the authority to build URLs
/// back to it with.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Host without port.
    pub host: String,
    /// `host[:port]` as addressed.
    pub authority: String,
}

impl Origin {
    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority)
    }
}

impl Authenticator {
    /// An authenticator with no keys yet (see [`Authenticator::set_session_keys`] and
    /// [`Authenticator::set_assertion_keys`]).
    pub fn new(settings: AuthSettings, providers: Providers, secrets: SecretSource) -> Self {
        let digest = ring_sha256(INTERSTITIAL_SCRIPT.as_bytes());
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
        let access = Arc::new(AccessControl::new(settings.access.clone()));
        let risk = settings.risk.clone();
        Self {
            access,
            risk,
            settings,
            providers,
            secrets,
            session_keys: ArcSwapOption::empty(),
            assertion_keys: ArcSwapOption::empty(),
            assertions: AssertionCache::new(ASSERTIONS_KEPT),
            client_secrets: Mutex::new(HashMap::new()),
            interstitial_csp: HeaderValue::try_from(csp)
                .unwrap_or(HeaderValue::from_static("default-src 'none'")),
        }
    }

    /// Conditional access: decisions and the sign-in log.
    pub fn access(&self) -> &Arc<AccessControl> {
        &self.access
    }

    /// Risk detection at sign-in.
    pub fn risk(&self) -> &Arc<RiskEngine> {
        &self.risk
    }

    /// Swaps in the session key ring.
    pub fn set_session_keys(&self, keys: SessionKeys) {
        self.session_keys.store(Some(Arc::new(keys)));
    }

    /// Whether a session key ring is loaded.
    pub fn has_session_keys(&self) -> bool {
        self.session_keys.load().is_some()
    }

    /// Whether assertion signing keys are loaded.
    pub fn has_assertion_keys(&self) -> bool {
        self.assertion_keys.load().is_some()
    }

    /// Swaps in the assertion signing keys.
    pub fn set_assertion_keys(&self, keys: AssertionKeys) {
        self.assertion_keys.store(Some(Arc::new(keys)));
    }

    /// Answers Sallyport's own paths under [`RESERVED_PREFIX`]; `None` for other paths.
    pub async fn reserved<B>(
        &self,
        router: &Router,
        request: &Request<B>,
        origin: &Origin,
        port: u16,
        client_ip: IpAddr,
        request_id: &str,
    ) -> Option<Response<TunnelBody>> {
        let path = request.uri().path();
        if !path.starts_with(RESERVED_PREFIX) {
            return None;
        }
        let query = request.uri().query().unwrap_or("");
        let answer = match path {
            SIGN_IN_PATH => {
                let visit = Visit {
                    headers: request.headers(),
                    origin,
                    client_ip,
                    request_id,
                };
                self.sign_in(router, &visit, port, query_value(query, "return"))
                    .await
            }
            CALLBACK_PATH => {
                let visit = Visit {
                    headers: request.headers(),
                    origin,
                    client_ip,
                    request_id,
                };
                self.callback(router, &visit, query).await
            }
            SIGN_OUT_PATH => {
                self.sign_out(router, origin, port, query_value(query, "return"))
                    .await
            }
            SIGNED_OUT_PATH => signed_out_page(request_id),
            JWKS_PATH => self.jwks(request_id),
            _ => pages::not_found(request.headers().get(header::ACCEPT), request_id),
        };
        Some(answer)
    }

    /// Opens the session of `route` (the configuration's route `route_index` of router
    /// generation `generation`) from the request's cookies, removing every copy of
    /// Sallyport's cookies and of the app's identity headers from the request on the way,
    /// and lets conditional access decide.
    #[allow(clippy::too_many_arguments)]
    pub fn gate<B>(
        &self,
        route: &AppRoute,
        route_index: usize,
        generation: u64,
        request: &mut Request<B>,
        origin: &Origin,
        client_ip: IpAddr,
        request_id: &str,
    ) -> Gate {
        let session = self.open_session(route, request.headers(), origin);
        strip_identity(route, request.headers_mut());
        let Some(session) = session else {
            return Gate::Answer(self.sign_in_required(request, origin, request_id, false));
        };
        let current_user_risk = self.risk.current_user_risk(&session.user_name);
        let subject = Arc::new(
            Subject::new(
                Arc::new(session),
                client_ip,
                request.headers().get(header::USER_AGENT),
                self.access.settings(),
            )
            .with_current_user_risk(current_user_risk),
        );
        let Some(policies) = route.policies() else {
            // Only OIDC routes come here, and each has its policies.
            return Gate::Answer(self.failure(
                SignInFailure::Unavailable,
                request_id,
                "the route has no compiled access policies",
                None,
            ));
        };
        let decision = self
            .access
            .decide(generation, route_index, policies, &subject, request_id);
        match &decision.outcome {
            Outcome::Allowed => Gate::Pass(subject, Arc::clone(&decision)),
            Outcome::StepUp(_) => {
                info!(app = %route.app, user = %subject.session.user_name, session = %subject.session.id, %request_id, "conditional access asks the user to sign in again (step-up)");
                Gate::Answer(self.sign_in_required(request, origin, request_id, true))
            }
            _ => Gate::Answer(refusal(
                request.headers().get(header::ACCEPT),
                &subject.session.user_name,
                &decision,
                request_id,
            )),
        }
    }

    /// The session of `route` in `headers`' cookies, if one opens.
    fn open_session(&self, route: &Route, headers: &HeaderMap, origin: &Origin) -> Option<Session> {
        let settings = cookie_settings(route);
        let keys = self.session_keys.load_full()?;
        let binding = Binding::new(route.app.clone(), &origin.host);
        cookie::cookie_values(headers, settings.session_cookie_name())
            .find_map(|value| Session::open(&keys, &binding, value, unix_now()))
    }

    /// Adds the app's identity headers and signed assertion for `session`.
    pub fn add_identity(
        &self,
        route: &Route,
        session: &Session,
        headers: &mut HeaderMap,
        request_id: &str,
    ) {
        for mapping in &route.identity.headers {
            let Ok(name) = HeaderName::try_from(mapping.name.as_str()) else {
                continue;
            };
            let Some(value) = claim_text(session, &mapping.claim) else {
                continue;
            };
            match HeaderValue::from_bytes(value.as_bytes()) {
                Ok(value) => {
                    headers.insert(name, value);
                }
                Err(_) => {
                    warn!(app = %route.app, header = %mapping.name, claim = %mapping.claim, %request_id, "claim value cannot be a header value; header left out");
                }
            }
        }
        let assertion = &route.identity.signed_assertion;
        if !assertion.enabled {
            return;
        }
        let Ok(name) = HeaderName::try_from(assertion.header.as_str()) else {
            return;
        };
        let Some(keys) = self.assertion_keys.load_full() else {
            warn!(app = %route.app, %request_id, "no assertion signing key loaded; assertion left out");
            return;
        };
        let request = AssertionRequest {
            issuer: &self.settings.assertion_issuer,
            audience: &route.url,
            lifetime_secs: assertion
                .lifetime
                .to_std()
                .map(|d| d.as_secs())
                .unwrap_or(300),
            now: unix_now(),
        };
        match keys.sign_reusing(session, &request, &self.assertions) {
            Ok(token) => {
                if let Ok(value) = HeaderValue::try_from(token) {
                    headers.insert(name, value);
                }
            }
            Err(error) => {
                warn!(app = %route.app, %error, %request_id, "cannot sign the identity assertion; assertion left out");
            }
        }
    }

    /// The answer that sends the browser to sign in (`step_up`: again, more strongly).
    fn sign_in_required<B>(
        &self,
        request: &Request<B>,
        origin: &Origin,
        request_id: &str,
        step_up: bool,
    ) -> Response<TunnelBody> {
        let target = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let sign_in = origin.url(&format!("{SIGN_IN_PATH}?return={}", percent_encode(target)));
        if is_scripted(request.headers(), request.method()) {
            let (error, detail) = if step_up {
                (
                    "step_up_required",
                    "This application's access policy asks you to sign in again.",
                )
            } else {
                (
                    "authentication_required",
                    "Sign in to this application first.",
                )
            };
            let body = serde_json::json!({
                "error": error,
                "detail": detail,
                "signInUrl": sign_in,
                "requestId": request_id,
            });
            return own_answer(StatusCode::UNAUTHORIZED, JSON, body.to_string(), None);
        }
        let fallback = html_escape(&sign_in);
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signing in</title>\
             <script>{INTERSTITIAL_SCRIPT}</script>\
             <noscript><meta http-equiv=\"refresh\" content=\"0;url={fallback}\"></noscript></head>\
             <body><p>Signing you in&hellip; <a href=\"{fallback}\">Continue</a></p></body></html>"
        );
        own_answer(
            StatusCode::UNAUTHORIZED,
            HTML,
            body,
            Some(self.interstitial_csp.clone()),
        )
    }

    async fn sign_in(
        &self,
        router: &Router,
        visit: &Visit<'_>,
        port: u16,
        return_to: Option<String>,
    ) -> Response<TunnelBody> {
        let return_to = return_target(return_to);
        let path = target_path(&return_to);
        let Some(matched) = router
            .lookup(&visit.origin.host, port, path)
            .filter(|m| m.route.pre_authentication.oidc.is_some())
        else {
            return pages::not_found(None, visit.request_id);
        };
        let route = matched.route;
        // A session that conditional access sends back to step up says what to ask for.
        let step_up = self
            .open_session(route, visit.headers, visit.origin)
            .zip(route.policies())
            .and_then(|(session, policies)| {
                let subject = self.subject(session, visit);
                match policies
                    .evaluate(&subject.context(jiff::Timestamp::now()))
                    .outcome
                {
                    Outcome::StepUp(step_up) => Some(AuthenticationRequirements {
                        acr_values: step_up.acr_values,
                        max_age: step_up.max_age,
                        force_login: true,
                    }),
                    _ => None,
                }
            });
        self.start_sign_in(route, visit, &return_to, step_up).await
    }

    /// Runs the risk detections on the sign-in of `session` on this visit and notes the
    /// levels they found in the session.
    async fn assess_risk(&self, session: &mut Session, visit: &Visit<'_>) -> Assessment {
        let platform = visit
            .headers
            .get(header::USER_AGENT)
            .and_then(|ua| ua.to_str().ok())
            .and_then(platform_from_user_agent);
        let assessed = self
            .risk
            .assess(&SignInAttempt {
                user: &session.user_name,
                ip: visit.client_ip,
                platform,
                now_ms: crate::risk::now_ms(),
            })
            .await;
        for (claim, level) in [
            (DETECTED_SIGN_IN_RISK_CLAIM, assessed.sign_in_risk),
            (DETECTED_USER_RISK_CLAIM, assessed.user_risk),
        ] {
            match level {
                Some(level) => {
                    let text = serde_json::to_value(level)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    session.claims.insert(claim.to_owned(), text);
                }
                None => {
                    session.claims.remove(claim);
                }
            }
        }
        for detection in &assessed.detections {
            crate::metrics::risk_detection(detection.kind.name());
        }
        if !assessed.detections.is_empty() {
            let detections: Vec<String> = assessed
                .detections
                .iter()
                .map(|d| format!("{}={:?}", d.kind.name(), d.level))
                .collect();
            info!(
                user = %session.user_name,
                client_ip = %visit.client_ip,
                sign_in_risk = ?assessed.sign_in_risk,
                user_risk = ?assessed.user_risk,
                ?detections,
                request_id = %visit.request_id,
                "risk detected at sign-in"
            );
        }
        assessed
    }

    /// Feeds the sign-in's outcome back to risk detection: a refusal counts as a failed
    /// sign-in of the user from the IP, an allowed sign-in joins the user's history.
    async fn record_risk_outcome(
        &self,
        subject: &Subject,
        outcome: &Outcome,
        assessed: &Assessment,
    ) {
        let user = subject.session.user_name.as_str();
        match outcome {
            Outcome::Allowed => self.risk.record_sign_in(user, assessed).await,
            Outcome::NotAssigned | Outcome::Blocked { .. } | Outcome::Denied { .. } => {
                self.risk
                    .record_failure(Some(user), subject.client_ip, crate::risk::now_ms())
                    .await;
            }
            Outcome::StepUp(_) => {}
        }
    }

    /// The subject of `session` on this visit.
    fn subject(&self, session: Session, visit: &Visit<'_>) -> Subject {
        Subject::new(
            Arc::new(session),
            visit.client_ip,
            visit.headers.get(header::USER_AGENT),
            self.access.settings(),
        )
    }

    /// Sends the browser to the provider to sign in to `route` and come back to
    /// `return_to`; `step_up` says what conditional access requires of the sign-in.
    async fn start_sign_in(
        &self,
        route: &Route,
        visit: &Visit<'_>,
        return_to: &str,
        step_up: Option<AuthenticationRequirements>,
    ) -> Response<TunnelBody> {
        let request_id = visit.request_id;
        let Some(keys) = self.session_keys.load_full() else {
            return self.failure(
                SignInFailure::Unavailable,
                request_id,
                "no session keys loaded",
                None,
            );
        };
        let Some(oidc) = &route.pre_authentication.oidc else {
            return pages::not_found(None, request_id);
        };
        let now = unix_now();
        let mut transaction =
            match Transaction::new(route.app.clone(), provider_key(oidc), return_to, now) {
                Ok(transaction) => transaction,
                Err(error) => {
                    return self.failure(
                        SignInFailure::Unavailable,
                        request_id,
                        &error.to_string(),
                        None,
                    );
                }
            };
        transaction.step_up = step_up.is_some();
        let requirements = step_up.unwrap_or_default();
        let client = match self.client_settings(oidc).await {
            Ok(client) => client,
            Err(detail) => {
                return self.failure(SignInFailure::Unavailable, request_id, &detail, None);
            }
        };
        let provider = match self.providers.get(&oidc.issuer_url).await {
            Ok(provider) => provider,
            Err(error) => {
                return self.failure((&error).into(), request_id, &error.to_string(), None);
            }
        };
        let secrets = SignInSecrets {
            state: &transaction.state,
            nonce: &transaction.nonce,
            pkce_verifier: &transaction.pkce_verifier,
        };
        let url = match provider.authorization_url(
            &client,
            &visit.origin.url(CALLBACK_PATH),
            &secrets,
            &requirements,
        ) {
            Ok(url) => url,
            Err(error) => {
                return self.failure((&error).into(), request_id, &error.to_string(), None);
            }
        };
        let settings = cookie_settings(route);
        let binding = Binding::new(TRANSACTION_PURPOSE, &visit.origin.host);
        let sealed = match transaction.seal(&keys, &binding) {
            Ok(sealed) => sealed,
            Err(error) => {
                return self.failure(
                    SignInFailure::Unavailable,
                    request_id,
                    &error.to_string(),
                    None,
                );
            }
        };
        info!(
            app = %route.app,
            issuer = %oidc.issuer_url,
            step_up = transaction.step_up,
            acr_values = ?requirements.acr_values,
            max_age = ?requirements.max_age,
            %request_id,
            "sign-in started"
        );
        let mut response = redirect(&url);
        append_cookie(
            response.headers_mut(),
            &settings.transaction_set_cookie(&transaction.state, &sealed),
        );
        response
    }

    async fn callback(
        &self,
        router: &Router,
        visit: &Visit<'_>,
        query: &str,
    ) -> Response<TunnelBody> {
        let (headers, origin, request_id) = (visit.headers, visit.origin, visit.request_id);
        let Some(state) = query_value(query, "state") else {
            return self.failure(
                SignInFailure::StateMismatch,
                request_id,
                "no state parameter",
                None,
            );
        };
        let Some(keys) = self.session_keys.load_full() else {
            return self.failure(
                SignInFailure::Unavailable,
                request_id,
                "no session keys loaded",
                None,
            );
        };
        let binding = Binding::new(TRANSACTION_PURPOSE, &origin.host);
        // Which of the app's cookie settings applies is only known from the transaction;
        // transaction cookies are looked for under both names.
        let now = unix_now();
        let candidates = [
            CookieSettings::default(),
            CookieSettings {
                secure: false,
                ..CookieSettings::default()
            },
        ];
        let found = candidates.iter().find_map(|settings| {
            let name = settings.transaction_cookie_name(&state);
            cookie::cookie_values(headers, &name)
                .find_map(|value| Transaction::open(&keys, &binding, value, &state, now))
        });
        let Some(transaction) = found else {
            return self.failure(
                SignInFailure::StateMismatch,
                request_id,
                "no transaction cookie opens for this state",
                None,
            );
        };
        let Some(route) = router
            .config()
            .routes
            .iter()
            .find(|r| r.app == transaction.app)
        else {
            return self.failure(
                SignInFailure::Unavailable,
                request_id,
                "the app is gone",
                None,
            );
        };
        let settings = cookie_settings(route);
        let removal = settings.transaction_removal(&state);
        if let Some(error) = query_value(query, "error") {
            // The provider refused or the user gave up: a failed sign-in from this IP.
            self.risk
                .record_failure(None, visit.client_ip, crate::risk::now_ms())
                .await;
            let failure = if error == "access_denied" {
                SignInFailure::Denied
            } else {
                SignInFailure::ProviderUnreachable
            };
            return self.failure(
                failure,
                request_id,
                &format!("the provider answered error={error}"),
                Some(&removal),
            );
        }
        let Some(code) = query_value(query, "code") else {
            return self.failure(
                SignInFailure::TokenInvalid,
                request_id,
                "no code parameter",
                Some(&removal),
            );
        };
        let Some(oidc) = &route.pre_authentication.oidc else {
            return self.failure(
                SignInFailure::Unavailable,
                request_id,
                "the app no longer uses OIDC",
                Some(&removal),
            );
        };
        if provider_key(oidc) != transaction.provider {
            return self.failure(
                SignInFailure::StateMismatch,
                request_id,
                "the app's provider changed during the sign-in",
                Some(&removal),
            );
        }
        let client = match self.client_settings(oidc).await {
            Ok(client) => client,
            Err(detail) => {
                return self.failure(
                    SignInFailure::Unavailable,
                    request_id,
                    &detail,
                    Some(&removal),
                );
            }
        };
        let provider = match self.providers.get(&oidc.issuer_url).await {
            Ok(provider) => provider,
            Err(error) => {
                return self.failure(
                    (&error).into(),
                    request_id,
                    &error.to_string(),
                    Some(&removal),
                );
            }
        };
        let signed_in = match provider
            .finish(
                &client,
                &origin.url(CALLBACK_PATH),
                &code,
                &transaction.pkce_verifier,
                &transaction.nonce,
            )
            .await
        {
            Ok(signed_in) => signed_in,
            Err(error) => {
                // A refused code or an ID token that fails validation is a failed
                // sign-in; an unreachable provider is nobody's failure.
                if matches!(
                    error,
                    OidcError::ProviderRefused { .. } | OidcError::TokenInvalid { .. }
                ) {
                    self.risk
                        .record_failure(None, visit.client_ip, crate::risk::now_ms())
                        .await;
                }
                return self.failure(
                    (&error).into(),
                    request_id,
                    &error.to_string(),
                    Some(&removal),
                );
            }
        };
        let mut session = match new_session(route, &signed_in, self.access.settings(), now) {
            Ok(session) => session,
            Err(detail) => {
                return self.failure(
                    SignInFailure::Unavailable,
                    request_id,
                    &detail,
                    Some(&removal),
                );
            }
        };
        // Risk is assessed before policy decides, and its levels travel in the session.
        let assessed = self.assess_risk(&mut session, visit).await;
        let Some(policies) = router.policies_of(&route.app) else {
            return self.failure(
                SignInFailure::Unavailable,
                request_id,
                "the app has no compiled access policies",
                Some(&removal),
            );
        };
        let budget = settings.session_value_budget(DEFAULT_COOKIE_BUDGET);
        let needed = policies.named_groups();
        if let Err(error) = session.fit_groups(|g| needed.contains(g), budget) {
            return self.failure(
                SignInFailure::Unavailable,
                request_id,
                &error.to_string(),
                Some(&removal),
            );
        }
        let subject = self
            .subject(session, visit)
            .with_risk_detections(assessed.detections.clone());
        let decision =
            self.access
                .evaluate(policies, &subject, SignInStage::SignIn, Some(request_id));
        self.record_risk_outcome(&subject, &decision.outcome, &assessed)
            .await;
        crate::metrics::sign_in(decision.outcome.name());
        match &decision.outcome {
            Outcome::Allowed => {}
            Outcome::StepUp(step_up) if !transaction.step_up => {
                info!(app = %route.app, user = %subject.session.user_name, %request_id, unmet = ?step_up.unmet, "signed in, but conditional access asks for more: stepping up");
                let requirements = AuthenticationRequirements {
                    acr_values: step_up.acr_values.clone(),
                    max_age: step_up.max_age,
                    force_login: true,
                };
                let mut response = self
                    .start_sign_in(route, visit, &transaction.return_to, Some(requirements))
                    .await;
                append_cookie(response.headers_mut(), &removal);
                return response;
            }
            _ => {
                let mut response = refusal(None, &subject.session.user_name, &decision, request_id);
                append_cookie(response.headers_mut(), &removal);
                return response;
            }
        }
        let session = &subject.session;
        let settings = match decision.session.persistent_browser_session {
            Some(choice) => CookieSettings {
                persistent: choice == PersistentBrowserSession::Always,
                ..settings
            },
            None => settings,
        };
        let sealed = match session.seal(&keys, &Binding::new(route.app.clone(), &origin.host)) {
            Ok(sealed) => sealed,
            Err(error) => {
                return self.failure(
                    SignInFailure::Unavailable,
                    request_id,
                    &error.to_string(),
                    Some(&removal),
                );
            }
        };
        info!(
            app = %route.app,
            user = %session.user_name,
            issuer = %session.issuer,
            session = %session.id,
            groups = session.groups.len(),
            groups_cut = session.groups_cut,
            %request_id,
            "signed in"
        );
        // A SameSite=Strict cookie is not sent on a navigation that a redirect from the
        // provider's site started: go on from a page of the app's own site instead.
        let mut response = if settings.same_site == SameSite::Strict {
            continue_page(&transaction.return_to)
        } else {
            redirect(&transaction.return_to)
        };
        let headers = response.headers_mut();
        append_cookie(headers, &removal);
        append_cookie(
            headers,
            &settings.session_set_cookie(&sealed, session.expires_at, now),
        );
        response
    }

    async fn sign_out(
        &self,
        router: &Router,
        origin: &Origin,
        port: u16,
        return_to: Option<String>,
    ) -> Response<TunnelBody> {
        let return_to = return_target(return_to);
        let route = router.find(&origin.host, port, target_path(&return_to));
        let signed_out = origin.url(SIGNED_OUT_PATH);
        let mut location = signed_out.clone();
        if let Some(oidc) = route.and_then(|r| r.pre_authentication.oidc.as_ref())
            && let Ok(provider) = self.providers.get(&oidc.issuer_url).await
            && let Some(url) = provider.end_session_url(&oidc.client_id, &signed_out)
        {
            location = url;
        }
        let mut response = redirect(&location);
        let headers = response.headers_mut();
        // Both names: the app's cookie settings decide which one it used.
        append_cookie(headers, &CookieSettings::default().session_removal());
        append_cookie(
            headers,
            &CookieSettings {
                secure: false,
                ..CookieSettings::default()
            }
            .session_removal(),
        );
        if let Some(route) = route {
            info!(app = %route.app, "signed out");
        }
        response
    }

    fn jwks(&self, request_id: &str) -> Response<TunnelBody> {
        let Some(keys) = self.assertion_keys.load_full() else {
            return pages::error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "No signing keys",
                "The assertion signing keys are not loaded yet.",
                request_id,
            );
        };
        let mut response = Response::new(full(keys.jwks().to_owned()));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, JSON);
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
        response
    }

    fn failure(
        &self,
        failure: SignInFailure,
        request_id: &str,
        detail: &str,
        removal: Option<&str>,
    ) -> Response<TunnelBody> {
        warn!(category = failure.category(), %request_id, detail, "sign-in failed");
        crate::metrics::sign_in("failed");
        let mut response = pages::error_page(
            failure.status(),
            failure.title(),
            &format!("{} ({})", failure.detail(), now_text()),
            request_id,
        );
        if let Some(removal) = removal {
            append_cookie(response.headers_mut(), removal);
        }
        response
    }

    async fn client_settings(&self, oidc: &OidcClient) -> Result<ClientSettings, String> {
        let secret = match &oidc.client_secret_ref {
            None => None,
            Some(reference) => Some(self.client_secret(reference).await?),
        };
        Ok(ClientSettings {
            client_id: oidc.client_id.clone(),
            client_secret: secret,
            scopes: oidc.scopes.clone(),
        })
    }

    async fn client_secret(&self, reference: &SecretKeyRef) -> Result<String, String> {
        let mut cache = self.client_secrets.lock().await;
        if let Some((value, read)) = cache.get(reference)
            && read.elapsed() < CLIENT_SECRET_TTL
        {
            return Ok(value.clone());
        }
        let bytes = self
            .secrets
            .read_key(&reference.namespace, &reference.name, &reference.key)
            .await
            .map_err(|e| e.to_string())?;
        let value = String::from_utf8(bytes)
            .map_err(|_| {
                format!(
                    "Secret {}/{} key {} is not UTF-8",
                    reference.namespace, reference.name, reference.key
                )
            })?
            .trim()
            .to_owned();
        cache.insert(reference.clone(), (value.clone(), Instant::now()));
        Ok(value)
    }
}

/// Identifies the provider registration a transaction was started with.
fn provider_key(oidc: &OidcClient) -> String {
    format!("{} {}", oidc.issuer_url, oidc.client_id)
}

fn new_session(
    route: &Route,
    signed_in: &SignedIn,
    access: &AccessSettings,
    now: u64,
) -> Result<Session, String> {
    let user_name = signed_in
        .preferred_username
        .clone()
        .or_else(|| signed_in.email.clone())
        .unwrap_or_else(|| signed_in.subject.clone());
    let expires_at = u64::try_from(signed_in.expires_at).unwrap_or(0);
    if expires_at <= now {
        return Err("the ID token has already expired".to_owned());
    }
    let mut claims = std::collections::BTreeMap::new();
    let wanted = route
        .identity
        .headers
        .iter()
        .map(|mapping| mapping.claim.as_str())
        .chain(access.session_claims());
    for claim in wanted {
        if is_session_claim(claim) {
            continue;
        }
        if let Some(value) = signed_in.extra.get(claim) {
            claims.insert(claim.to_owned(), json_text(value));
        }
    }
    Ok(Session {
        id: random_id().map_err(|e| e.to_string())?,
        subject: signed_in.subject.clone(),
        user_name,
        display_name: signed_in.name.clone(),
        email: signed_in.email.clone(),
        groups: signed_in.groups.clone(),
        groups_cut: false,
        claims,
        issuer: signed_in.issuer.clone(),
        auth_time: u64::try_from(signed_in.auth_time).unwrap_or(now),
        issued_at: now,
        expires_at,
        amr: signed_in.amr.clone(),
        acr: signed_in.acr.clone(),
    })
}

fn is_session_claim(claim: &str) -> bool {
    matches!(
        claim,
        "sub" | "preferred_username" | "email" | "name" | "groups" | "amr" | "acr" | "iss"
    )
}

fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => {
            items.iter().map(json_text).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

/// The text of `claim` for an identity header.
fn claim_text(session: &Session, claim: &str) -> Option<String> {
    match claim {
        "sub" => Some(session.subject.clone()),
        "preferred_username" => Some(session.user_name.clone()),
        "email" => session.email.clone(),
        "name" => session.display_name.clone(),
        "groups" => Some(session.groups.join(",")),
        "amr" => Some(session.amr.join(",")),
        "acr" => session.acr.clone(),
        "iss" => Some(session.issuer.clone()),
        other => session.claim_value(other),
    }
}

/// The `return` parameter of sign-in and sign-out if it is a safe same-origin path,
/// else `/`.
fn return_target(return_to: Option<String>) -> String {
    return_to
        .as_deref()
        .and_then(safe_return_path)
        .unwrap_or_else(|| "/".to_owned())
}

/// The path of a return target, without query and fragment, which picks its route.
fn target_path(target: &str) -> &str {
    target
        .split(['?', '#'])
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
}

/// What a request to one of Sallyport's own paths carries that sign-in needs.
struct Visit<'a> {
    headers: &'a HeaderMap,
    origin: &'a Origin,
    client_ip: IpAddr,
    request_id: &'a str,
}

/// The 403 page of a request or sign-in that conditional access refuses.
fn refusal(
    accept: Option<&HeaderValue>,
    user: &str,
    decision: &Decision,
    request_id: &str,
) -> Response<TunnelBody> {
    let (title, detail) = match &decision.outcome {
        Outcome::NotAssigned => (
            "Access denied",
            format!(
                "{user} is not assigned to this application. Ask its administrators for access."
            ),
        ),
        Outcome::Blocked { .. } => (
            "Access blocked",
            "Your organization's access policy does not allow this application from where, \
             when or how you are signing in now."
                .to_owned(),
        ),
        Outcome::Denied { unmet, .. } => (
            "Access denied",
            format!(
                "This application requires {}, which {user} does not have.",
                requirement_list(unmet)
            ),
        ),
        Outcome::StepUp(step_up) => (
            "Sign-in not strong enough",
            format!(
                "This application requires {}, which the sign-in did not provide. \
                 Sign in again and complete it, or ask your administrators.",
                requirement_list(&step_up.unmet)
            ),
        ),
        Outcome::Allowed => ("Access denied", String::new()),
    };
    pages::error_response(
        accept,
        StatusCode::FORBIDDEN,
        title,
        &format!("{detail} ({})", now_text()),
        request_id,
    )
}

fn requirement_list(requirements: &[sallyport_policy::Requirement]) -> String {
    requirements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Removes Sallyport's cookies and every client-sent copy of the app's identity headers
/// and assertion header.
pub fn strip_identity(route: &Route, headers: &mut HeaderMap) {
    cookie::strip_own_cookies(headers);
    for mapping in &route.identity.headers {
        if let Ok(name) = HeaderName::try_from(mapping.name.as_str()) {
            headers.remove(name);
        }
    }
    if let Ok(name) = HeaderName::try_from(route.identity.signed_assertion.header.as_str()) {
        headers.remove(name);
    }
}

/// The cookie settings of `route`'s session.
pub fn cookie_settings(route: &Route) -> CookieSettings {
    let cookie = &route.session.cookie;
    CookieSettings {
        http_only: cookie.http_only,
        secure: cookie.secure,
        persistent: cookie.persistent,
        same_site: match cookie.same_site {
            ApiSameSite::Strict => SameSite::Strict,
            ApiSameSite::Lax => SameSite::Lax,
            ApiSameSite::None => SameSite::None,
        },
    }
}

/// Whether a request comes from a script (fetch/XHR), which must get 401 + JSON rather
/// than a page or a redirect it cannot follow across origins.
pub fn is_scripted(headers: &HeaderMap, method: &Method) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(mode) = text("sec-fetch-mode") {
        return mode != "navigate";
    }
    if text("x-requested-with").is_some_and(|v| v.eq_ignore_ascii_case("XMLHttpRequest")) {
        return true;
    }
    let accept = text("accept").unwrap_or("");
    let wants_json = accept.contains("application/json") || accept.contains("+json");
    let wants_html = accept.contains("text/html");
    let is_read = method == Method::GET || method == Method::HEAD;
    // A page is what HTML-accepting clients and plain reads get; JSON-only clients and
    // other methods without HTML are scripts.
    !(wants_html || (is_read && !wants_json))
}

fn redirect(location: &str) -> Response<TunnelBody> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::try_from(location) {
        headers.insert(header::LOCATION, value);
    }
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    response
}

/// A page that navigates to `location` (same origin) by itself, without script.
fn continue_page(location: &str) -> Response<TunnelBody> {
    let target = html_escape(location);
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signed in</title>\
         <meta http-equiv=\"refresh\" content=\"0;url={target}\"></head>\
         <body><p>Signed in. <a href=\"{target}\">Continue</a></p></body></html>"
    );
    own_answer(
        StatusCode::OK,
        HTML,
        body,
        Some(HeaderValue::from_static(
            "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )),
    )
}

/// One of the proxy's own sign-in answers: never cached, never sniffed, with `csp`.
fn own_answer(
    status: StatusCode,
    content_type: HeaderValue,
    body: String,
    csp: Option<HeaderValue>,
) -> Response<TunnelBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    if let Some(csp) = csp {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

fn append_cookie(headers: &mut HeaderMap, cookie: &str) {
    if let Ok(value) = HeaderValue::try_from(cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

fn signed_out_page(request_id: &str) -> Response<TunnelBody> {
    let mut response = pages::error_page(
        StatusCode::OK,
        "Signed out",
        "You are signed out of this application.",
        request_id,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, NO_STORE);
    response
}

/// The decoded value of `name` in a query string.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key).as_deref() == Some(name))
            .then(|| percent_decode(value))
            .flatten()
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ring_sha256(bytes: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

fn now_text() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).unwrap_or_else(|e| panic!("{e}")),
                HeaderValue::try_from(*value).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        map
    }

    #[test]
    fn scripts_are_told_apart_from_navigations() {
        let get = Method::GET;
        assert!(!is_scripted(
            &headers(&[("sec-fetch-mode", "navigate")]),
            &get
        ));
        assert!(is_scripted(&headers(&[("sec-fetch-mode", "cors")]), &get));
        assert!(is_scripted(
            &headers(&[("sec-fetch-mode", "same-origin")]),
            &get
        ));
        assert!(is_scripted(
            &headers(&[("x-requested-with", "XMLHttpRequest")]),
            &get
        ));
        assert!(is_scripted(
            &headers(&[("accept", "application/json")]),
            &get
        ));
        assert!(!is_scripted(
            &headers(&[("accept", "text/html,application/xhtml+xml,*/*")]),
            &get
        ));
        assert!(
            !is_scripted(&headers(&[]), &get),
            "curl-like GET is a navigation"
        );
        assert!(
            is_scripted(&headers(&[]), &Method::POST),
            "a bare POST is an API call"
        );
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("a=1&return=%2Fwiki%3Fq%3D1%23top", "return").as_deref(),
            Some("/wiki?q=1#top")
        );
        assert_eq!(
            query_value("state=abc&code=x+y", "code").as_deref(),
            Some("x y")
        );
        assert_eq!(query_value("a=1", "b"), None);
        assert_eq!(query_value("a=%zz", "a"), None, "a bad escape is no value");
    }

    #[test]
    fn return_targets_are_encoded_for_the_sign_in_url() {
        assert_eq!(
            percent_encode("/a b?q=1&r=2#f"),
            "/a%20b%3Fq%3D1%26r%3D2%23f"
        );
        assert_eq!(
            query_value(&format!("return={}", percent_encode("/x?y=1#z")), "return").as_deref(),
            Some("/x?y=1#z")
        );
    }
}
