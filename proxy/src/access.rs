//! Conditional access on the user request path.
//!
//! Every request of a signed-in session of an OIDC app is decided by the app's
//! [`AppPolicies`] (compiled once per configuration by the [`Router`](crate::router::Router)):
//!
//! - [`AccessControl::decide`] keeps a decision per session, route, configuration
//!   generation, client IP and platform for at most [`DECISION_TTL`] (less when a sign-in
//!   frequency lapses sooner). A new configuration (a policy edited) has a new generation
//!   and a move to another address is another key, so either is decided afresh on the
//!   next request; the cache only spares the evaluation and the log line for the
//!   requests in between.
//! - Every evaluation is written to the sign-in log ([`SignInLog`]): one JSON line on
//!   standard output in the schema of [`sallyport_policy::SignInEvent`] plus a unique
//!   `id` (`docs/sign-in-log.md`), next to the proxy's own log lines on standard error,
//!   and delivered to the SIEM sinks of [`sallyport_events`] (`docs/siem.md`).
//! - [`StreamGuard`] keeps deciding for as long as a WebSocket or a response body is
//!   open: after every configuration change and every [`STREAM_RECHECK`], it decides the
//!   session again and ends the stream when it is no longer allowed.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use jiff::Timestamp;
use sallyport_api::conditional_access_policy::{ClientPlatform, RiskLevel};
use sallyport_identity::Session;
use sallyport_policy::{
    AppPolicies, Decision, MfaSettings, RiskDetection, SignInContext, SignInEvent, SignInStage,
    platform_from_user_agent,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::router::Router;

/// The longest a decision is reused for the same session, route, configuration, client
/// IP and platform: time windows take effect within it.
pub const DECISION_TTL: Duration = Duration::from_secs(30);

/// How often open streams are decided again even when the configuration stays the
/// same (time windows, sign-in frequency): the proxy re-announces its router this often.
pub const STREAM_RECHECK: Duration = Duration::from_secs(30);

/// About how many decisions are kept.
const DECISION_CACHE_ITEMS: usize = 100_000;

/// The most policy results the kept decisions hold together (each is a few dozen bytes):
/// with thousands of policies per app, fewer decisions are kept rather than more memory
/// used.
const DECISION_CACHE_WEIGHT: u64 = 1_000_000;

/// Weighs a kept decision by its policy results, so the cache's memory stays bounded
/// whatever the number of policies per app.
#[derive(Debug, Clone, Copy)]
struct DecisionWeight;

impl quick_cache::Weighter<DecisionKey, CachedDecision> for DecisionWeight {
    fn weight(&self, _key: &DecisionKey, cached: &CachedDecision) -> u64 {
        1 + u64::try_from(cached.decision.policies.len()).unwrap_or(u64::MAX / 2)
    }
}

/// The fleet-wide settings of conditional access.
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// How MFA is recognised, and the `acr_values` an MFA step-up asks for.
    pub mfa: MfaSettings,
    /// The ID token claim holding the sign-in risk level (`low`, `medium`, `high`), if
    /// the provider sends one.
    pub sign_in_risk_claim: Option<String>,
    /// The ID token claim holding the user risk level, if the provider sends one.
    pub user_risk_claim: Option<String>,
}

impl AccessSettings {
    /// The claims a session must keep for policy, besides the ones it always keeps.
    pub fn session_claims(&self) -> impl Iterator<Item = &str> {
        self.sign_in_risk_claim
            .iter()
            .chain(&self.user_risk_claim)
            .map(String::as_str)
    }
}

/// The session claim holding the sign-in risk level Sallyport's own detections found at
/// sign-in (see [`crate::risk`]); a name no provider claim is kept under.
pub const DETECTED_SIGN_IN_RISK_CLAIM: &str = "sallyport:signInRisk";

/// The session claim holding the user risk level Sallyport's detections found at
/// sign-in.
pub const DETECTED_USER_RISK_CLAIM: &str = "sallyport:userRisk";

/// A session's request as policy sees it, owned so that a stream can keep it.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The session.
    pub session: Arc<Session>,
    /// The client's IP address.
    pub client_ip: IpAddr,
    /// The client platform from the User-Agent.
    pub platform: Option<ClientPlatform>,
    sign_in_risk: Option<RiskLevel>,
    user_risk: Option<RiskLevel>,
    risk_detections: Arc<[RiskDetection]>,
}

impl Subject {
    /// `session` requesting from `client_ip` with `user_agent`. Each risk level is the
    /// higher of the provider's (the session's claim that `settings` names) and
    /// Sallyport's detections at sign-in ([`DETECTED_SIGN_IN_RISK_CLAIM`],
    /// [`DETECTED_USER_RISK_CLAIM`]).
    pub fn new(
        session: Arc<Session>,
        client_ip: IpAddr,
        user_agent: Option<&HeaderValue>,
        settings: &AccessSettings,
    ) -> Self {
        let platform = user_agent
            .and_then(|ua| ua.to_str().ok())
            .and_then(platform_from_user_agent);
        let risk = |claim: Option<&str>| {
            claim
                .and_then(|claim| session.claims.get(claim))
                .and_then(|value| risk_level(value))
        };
        Self {
            sign_in_risk: risk(settings.sign_in_risk_claim.as_deref())
                .max(risk(Some(DETECTED_SIGN_IN_RISK_CLAIM))),
            user_risk: risk(settings.user_risk_claim.as_deref())
                .max(risk(Some(DETECTED_USER_RISK_CLAIM))),
            risk_detections: Arc::from([]),
            session,
            client_ip,
            platform,
        }
    }

    /// The same subject with the risk detections that fired at its sign-in, for the
    /// sign-in log.
    pub fn with_risk_detections(mut self, detections: Vec<RiskDetection>) -> Self {
        self.risk_detections = detections.into();
        self
    }

    /// The same subject with the user risk the risk state holds now for the user
    /// ([`sallyport_risk::RiskEngine::current_user_risk`]): the session's user risk
    /// becomes the higher of it and the sign-in's, so failures recorded since the
    /// sign-in (by any replica sharing the store) reach the session without a new one.
    pub fn with_current_user_risk(mut self, current: Option<RiskLevel>) -> Self {
        self.user_risk = self.user_risk.max(current);
        self
    }

    /// The risk detections that fired at the sign-in (only at the sign-in itself).
    pub fn risk_detections(&self) -> &[RiskDetection] {
        &self.risk_detections
    }

    /// The sign-in risk level policy sees.
    pub fn sign_in_risk(&self) -> Option<RiskLevel> {
        self.sign_in_risk
    }

    /// The user risk level policy sees.
    pub fn user_risk(&self) -> Option<RiskLevel> {
        self.user_risk
    }

    /// The context of a decision at `now`.
    pub fn context(&self, now: Timestamp) -> SignInContext<'_> {
        let session = &self.session;
        SignInContext {
            user_name: &session.user_name,
            email: session.email.as_deref(),
            groups: &session.groups,
            client_ip: self.client_ip,
            platform: self.platform,
            now,
            auth_time: unix_timestamp(session.auth_time),
            amr: &session.amr,
            acr: session.acr.as_deref(),
            sign_in_risk: self.sign_in_risk,
            user_risk: self.user_risk,
        }
    }
}

/// A risk level claim's value: `low`, `medium` or `high` in any case; anything else
/// (`none`, `hidden`, unknown words) is no risk.
pub fn risk_level(value: &str) -> Option<RiskLevel> {
    match value.trim().to_ascii_lowercase().as_str() {
        "low" => Some(RiskLevel::Low),
        "medium" => Some(RiskLevel::Medium),
        "high" => Some(RiskLevel::High),
        _ => None,
    }
}

/// A Unix time in seconds as a timestamp (the epoch when out of range).
pub fn unix_timestamp(seconds: u64) -> Timestamp {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// What a cached decision is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    generation: u64,
    route: usize,
    session: Box<str>,
    client_ip: IpAddr,
    platform: Option<ClientPlatform>,
    /// The user risk policy sees (0 none, 1 low ... 3 high): a risk raised between
    /// sign-ins is decided afresh at once.
    user_risk: u8,
}

#[derive(Debug, Clone)]
struct CachedDecision {
    decision: Arc<Decision>,
    expires: Instant,
}

/// Decides requests, caching decisions, and writes the sign-in log.
pub struct AccessControl {
    settings: AccessSettings,
    cache: quick_cache::sync::Cache<DecisionKey, CachedDecision, DecisionWeight>,
    log: SignInLog,
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl")
            .field("settings", &self.settings)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl AccessControl {
    /// Conditional access with `settings`, logging through the process's event pipeline
    /// (standard output and the SIEM sinks).
    pub fn new(settings: AccessSettings) -> Self {
        Self {
            settings,
            cache: quick_cache::sync::Cache::with_weighter(
                DECISION_CACHE_ITEMS,
                DECISION_CACHE_WEIGHT,
                DecisionWeight,
            ),
            log: SignInLog::Events,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &AccessSettings {
        &self.settings
    }

    /// The decision for `subject`'s request to route `route` (its index in the
    /// configuration of `generation`), reused while fresh; an evaluation is logged.
    pub fn decide(
        &self,
        generation: u64,
        route: usize,
        policies: &AppPolicies,
        subject: &Subject,
        request_id: &str,
    ) -> Arc<Decision> {
        let key = DecisionKey {
            generation,
            route,
            session: subject.session.id.as_str().into(),
            client_ip: subject.client_ip,
            platform: subject.platform,
            user_risk: match subject.user_risk {
                None => 0,
                Some(RiskLevel::Low) => 1,
                Some(RiskLevel::Medium) => 2,
                Some(RiskLevel::High) => 3,
            },
        };
        let now = Instant::now();
        if let Some(cached) = self.cache.get(&key)
            && cached.expires > now
        {
            return cached.decision;
        }
        let decision =
            Arc::new(self.evaluate(policies, subject, SignInStage::Request, Some(request_id)));
        let mut ttl = DECISION_TTL;
        if let Some(at) = decision.session.reauthenticate_at {
            let left = Timestamp::now().duration_until(at);
            ttl = ttl.min(Duration::try_from(left).unwrap_or(Duration::ZERO));
        }
        self.cache.insert(
            key,
            CachedDecision {
                decision: Arc::clone(&decision),
                expires: now + ttl,
            },
        );
        decision
    }

    /// Evaluates `subject` afresh (sign-in, streams), and logs the decision.
    pub fn evaluate(
        &self,
        policies: &AppPolicies,
        subject: &Subject,
        stage: SignInStage,
        request_id: Option<&str>,
    ) -> Decision {
        let context = subject.context(Timestamp::now());
        let decision = policies.evaluate(&context);
        self.log(policies, subject, &context, &decision, stage, request_id);
        decision
    }

    /// Writes `decision` on `context` to the sign-in log.
    fn log(
        &self,
        policies: &AppPolicies,
        subject: &Subject,
        context: &SignInContext<'_>,
        decision: &Decision,
        stage: SignInStage,
        request_id: Option<&str>,
    ) {
        crate::metrics::policy_decision(policies.app(), stage, &decision.outcome);
        let mut event = SignInEvent::new(policies.app(), stage, context, decision)
            .with_session_id(&subject.session.id)
            .with_risk_detections(subject.risk_detections());
        if let Some(request_id) = request_id {
            event = event.with_request_id(request_id);
        }
        self.log.write(&event);
    }
}

/// Where sign-in log lines go.
#[derive(Debug)]
enum SignInLog {
    /// The process's event pipeline ([`sallyport_events::global`]): one JSON line on
    /// standard output, each written whole under stdout's lock (`main` must not hold that
    /// lock while the proxy runs), and every configured SIEM sink.
    Events,
}

/// A sign-in event with its unique `id` (appended after the other fields, so lines
/// still start with `{"schema":...`): receivers of the SIEM sinks de-duplicate by it.
#[derive(serde::Serialize)]
struct IdentifiedSignInEvent<'e, 'a> {
    #[serde(flatten)]
    event: &'e SignInEvent<'a>,
    id: &'e str,
}

impl SignInLog {
    fn write(&self, event: &SignInEvent<'_>) {
        match self {
            Self::Events => {
                let id = sallyport_events::new_event_id();
                let severity = if event.decision == "allowed" {
                    sallyport_events::Severity::Info
                } else {
                    sallyport_events::Severity::Warn
                };
                let record = sallyport_events::Record::serialize(
                    &id,
                    event.schema,
                    "signIn",
                    event.time,
                    severity,
                    &IdentifiedSignInEvent { event, id: &id },
                );
                match record {
                    Ok(record) => sallyport_events::global().emit(record),
                    Err(error) => {
                        warn!(%error, app = event.app, "cannot serialise a sign-in log line")
                    }
                }
            }
        }
    }
}

/// Keeps deciding an open stream's session: [`StreamGuard::revoked`] completes when a
/// configuration change (or the passing of time) no longer allows it.
#[derive(Clone)]
pub struct StreamGuard {
    routers: watch::Receiver<Arc<Router>>,
    access: Arc<AccessControl>,
    app: Arc<str>,
    subject: Arc<Subject>,
}

impl StreamGuard {
    /// A guard of `subject`'s stream to `app`, re-deciding with each router `routers`
    /// announces.
    pub fn new(
        routers: watch::Receiver<Arc<Router>>,
        access: Arc<AccessControl>,
        app: Arc<str>,
        subject: Arc<Subject>,
    ) -> Self {
        Self {
            routers,
            access,
            app,
            subject,
        }
    }

    /// Completes once the session may no longer use the app: a new router (a new
    /// configuration, or the proxy's periodic re-announcement every [`STREAM_RECHECK`])
    /// no longer allows it, or the app is gone. Never completes otherwise.
    pub async fn revoked(mut self) {
        loop {
            if self.routers.changed().await.is_err() {
                // The proxy is gone; its drain ends the streams.
                std::future::pending::<()>().await;
            }
            let router = self.routers.borrow_and_update().clone();
            let Some(policies) = router.policies_of(&self.app) else {
                info!(app = %self.app, session = %self.subject.session.id, "stream closed: the app is no longer published");
                return;
            };
            // Only a withdrawal is a new decision worth a sign-in log line; a stream
            // that may go on was already logged when its request was decided.
            let context = self.subject.context(Timestamp::now());
            let decision = policies.evaluate(&context);
            if !decision.outcome.is_allowed() {
                self.access.log(
                    policies,
                    &self.subject,
                    &context,
                    &decision,
                    SignInStage::Stream,
                    None,
                );
                info!(
                    app = %self.app,
                    user = %self.subject.session.user_name,
                    session = %self.subject.session.id,
                    decision = decision.outcome.name(),
                    "stream closed: conditional access no longer allows the session"
                );
                return;
            }
        }
    }
}

/// A response body that ends with an error when its stream's guard revokes it: hyper
/// then resets the HTTP/2 stream or closes the HTTP/1.1 connection, so the client sees
/// the stream cut rather than complete.
pub struct GuardedBody<B> {
    inner: B,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<B> GuardedBody<B> {
    /// `inner`, cut when `guard` revokes it.
    pub fn new(inner: B, guard: StreamGuard) -> Self {
        Self {
            inner,
            revoked: Box::pin(guard.revoked()),
        }
    }
}

/// The error a revoked stream ends with.
#[derive(Debug, thiserror::Error)]
#[error("conditional access no longer allows this session; the stream was closed")]
pub struct StreamRevoked;

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(StreamRevoked))));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_levels_are_read_leniently() {
        assert_eq!(risk_level("HIGH"), Some(RiskLevel::High));
        assert_eq!(risk_level(" medium "), Some(RiskLevel::Medium));
        assert_eq!(risk_level("low"), Some(RiskLevel::Low));
        assert_eq!(risk_level("none"), None);
        assert_eq!(risk_level("hidden"), None);
    }

    #[test]
    fn detected_and_claimed_risk_combine_to_the_higher() {
        let session = |claims: &[(&str, &str)]| {
            Arc::new(Session {
                id: "s".to_owned(),
                subject: "alice".to_owned(),
                user_name: "alice".to_owned(),
                display_name: None,
                email: None,
                groups: Vec::new(),
                groups_cut: false,
                claims: claims
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                issuer: "https://idp".to_owned(),
                auth_time: 0,
                issued_at: 0,
                expires_at: 1,
                amr: Vec::new(),
                acr: None,
            })
        };
        let settings = AccessSettings {
            sign_in_risk_claim: Some("sirisk".to_owned()),
            user_risk_claim: Some("urisk".to_owned()),
            ..AccessSettings::default()
        };
        let ip = IpAddr::from([203, 0, 113, 1]);
        let subject = |claims: &[(&str, &str)]| Subject::new(session(claims), ip, None, &settings);
        let none = subject(&[]);
        assert_eq!((none.sign_in_risk(), none.user_risk()), (None, None));
        let detected = subject(&[
            (DETECTED_SIGN_IN_RISK_CLAIM, "high"),
            (DETECTED_USER_RISK_CLAIM, "low"),
        ]);
        assert_eq!(
            (detected.sign_in_risk(), detected.user_risk()),
            (Some(RiskLevel::High), Some(RiskLevel::Low))
        );
        let both = subject(&[
            ("sirisk", "low"),
            (DETECTED_SIGN_IN_RISK_CLAIM, "medium"),
            ("urisk", "high"),
            (DETECTED_USER_RISK_CLAIM, "low"),
        ]);
        assert_eq!(
            (both.sign_in_risk(), both.user_risk()),
            (Some(RiskLevel::Medium), Some(RiskLevel::High)),
            "the higher of the provider's and the detections' level counts"
        );
        let context = both.context(Timestamp::UNIX_EPOCH);
        assert_eq!(context.sign_in_risk, Some(RiskLevel::Medium));
        assert!(both.risk_detections().is_empty());
    }

    #[test]
    fn unix_times_convert() {
        assert_eq!(unix_timestamp(0), Timestamp::UNIX_EPOCH);
        assert_eq!(unix_timestamp(1_700_000_000).as_second(), 1_700_000_000);
        assert_eq!(unix_timestamp(u64::MAX), Timestamp::UNIX_EPOCH);
    }
}
