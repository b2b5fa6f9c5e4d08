//! The sign-in log: one JSON line per decision, in a stable schema.
//!
//! The schema is documented in `docs/sign-in-log.md`; fields are only ever added, and a
//! breaking change would get a new [`SIGN_IN_LOG_SCHEMA`] value.

use std::net::IpAddr;

use jiff::Timestamp;
use sallyport_api::conditional_access_policy::{
    ClientPlatform, PersistentBrowserSession, RiskLevel,
};
use serde::Serialize;

use crate::context::SignInContext;
use crate::evaluate::{
    Decision, NotApplied, Outcome, PolicyVerdict, RequestControls, Requirement, SessionControls,
};
use crate::risk_detection::RiskDetection;

/// The value of every sign-in log line's `schema` field.
pub const SIGN_IN_LOG_SCHEMA: &str = "sallyport.dev/sign-in/v1";

/// When in a session's life the decision was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SignInStage {
    /// The provider just signed the user in (the callback).
    SignIn,
    /// A request of an existing session, decided afresh: first on this replica, or
    /// after the configuration, the client IP or the time changed the inputs.
    Request,
    /// An open WebSocket or stream re-checked after a configuration change.
    Stream,
    /// The what-if tool, for a sign-in described on its command line.
    WhatIf,
}

/// One line of the sign-in log.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignInEvent<'a> {
    /// Always [`SIGN_IN_LOG_SCHEMA`].
    pub schema: &'static str,
    /// When the decision was made (RFC 3339, UTC).
    pub time: Timestamp,
    /// The request's id (also in the `X-Request-Id` answered to the client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// When in the session's life the decision was made.
    pub stage: SignInStage,
    /// The app's id, `namespace/name`.
    pub app: &'a str,
    /// The user name (`preferred_username`, else `email`).
    pub user: &'a str,
    /// The session's id; absent before a session exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    /// The client IP address policy saw.
    pub client_ip: IpAddr,
    /// What is known of the client's location.
    pub location: Location,
    /// The client platform read from the User-Agent, if any.
    pub platform: Option<ClientPlatform>,
    /// Authentication methods of the sign-in (`amr`).
    pub amr: &'a [String],
    /// Authentication context class of the sign-in (`acr`).
    pub acr: Option<&'a str>,
    /// When the user last authenticated at the provider.
    pub auth_time: Timestamp,
    /// The sign-in risk level, if any risk was detected.
    pub sign_in_risk: Option<RiskLevel>,
    /// The user risk level, if any risk was detected.
    pub user_risk: Option<RiskLevel>,
    /// The risk detections that fired at this sign-in (`signIn` stage only; absent when
    /// none did).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub risk_detections: &'a [RiskDetection],
    /// Every enforced and report-only policy of the app with its result.
    pub policies: Vec<SignInEventPolicy<'a>>,
    /// The session controls in force, from the enforced policies that apply; absent
    /// when none is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_controls: Option<SignInEventSessionControls<'a>>,
    /// The per-request session controls (`monitor`, `readOnly`, `blockDownloads`) the
    /// report-only policies that apply would put in force; never enforced. Absent when
    /// none would.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_only_session_controls: Option<SignInEventSessionControls<'a>>,
    /// The final decision: `allowed`, `notAssigned`, `blocked`, `denied` or `stepUp`.
    pub decision: &'static str,
    /// Why, in words.
    pub reason: String,
}

/// What is known of a client's location.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Location {
    /// `loopback`, `private` (RFC 1918, unique local, link-local) or `public`.
    pub network: &'static str,
}

/// Session controls in a sign-in log line. The per-request controls list the policies
/// (`namespace/name`) that ask for them; a control no policy asks for is left out.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignInEventSessionControls<'a> {
    /// The shortest sign-in frequency, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign_in_frequency_seconds: Option<u64>,
    /// When the session must authenticate again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reauthenticate_at: Option<Timestamp>,
    /// `Always` or `Never`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_browser_session: Option<PersistentBrowserSession>,
    /// Policies asking to monitor every request of the session.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub monitor: Vec<&'a str>,
    /// Policies allowing only safe methods.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub read_only: Vec<&'a str>,
    /// Policies blocking downloads.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub block_downloads: Vec<&'a str>,
    /// The media types that count as downloads (with `blockDownloads`).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub download_content_types: Vec<&'a str>,
}

impl<'a> SignInEventSessionControls<'a> {
    /// The session controls of a decision, `None` when none is in force.
    fn of(session: &'a SessionControls) -> Option<Self> {
        let mut controls = Self::request(&session.request);
        controls.sign_in_frequency_seconds = session.sign_in_frequency.map(|f| f.as_secs());
        controls.reauthenticate_at = session.reauthenticate_at;
        controls.persistent_browser_session = session.persistent_browser_session;
        let none = controls.sign_in_frequency_seconds.is_none()
            && controls.persistent_browser_session.is_none()
            && session.request.is_empty();
        (!none).then_some(controls)
    }

    /// The per-request controls alone.
    fn request(request: &'a RequestControls) -> Self {
        let ids = |policies: &'a [std::sync::Arc<str>]| {
            policies
                .iter()
                .map(|p| p.as_ref())
                .collect::<Vec<&'a str>>()
        };
        Self {
            monitor: ids(&request.monitor),
            read_only: ids(&request.read_only),
            block_downloads: ids(&request.block_downloads),
            download_content_types: request
                .download_content_types
                .iter()
                .map(|t| t.as_str())
                .collect(),
            ..Self::default()
        }
    }
}

/// One policy's result in a sign-in log line.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignInEventPolicy<'a> {
    /// The policy's id, `namespace/name`.
    pub id: &'a str,
    /// `enabled` or `reportOnly`.
    pub state: &'static str,
    /// `success`, `failure` or `notApplied`; report-only policies have these with a
    /// `reportOnly` prefix (`reportOnlyFailure` …).
    pub result: &'static str,
    /// Why the policy did not apply, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_applied: Option<NotApplied>,
    /// The requirements it found unmet.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub unmet: &'a [Requirement],
    /// The verdict in words, for a policy that applied (`notApplied` says why one did
    /// not, and keeps a line of a thousand policies short).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl<'a> SignInEvent<'a> {
    /// The log line of `decision` about `context` for `app`.
    pub fn new(
        app: &'a str,
        stage: SignInStage,
        context: &'a SignInContext<'a>,
        decision: &'a Decision,
    ) -> Self {
        let policies = decision
            .policies
            .iter()
            .map(|result| SignInEventPolicy {
                id: &result.policy,
                state: if result.report_only {
                    "reportOnly"
                } else {
                    "enabled"
                },
                result: result.verdict.result_name(result.report_only),
                not_applied: match result.verdict {
                    PolicyVerdict::NotApplied(reason) => Some(reason),
                    _ => None,
                },
                unmet: match &result.verdict {
                    PolicyVerdict::Unmet(unmet) => unmet,
                    _ => &[],
                },
                detail: match result.verdict {
                    PolicyVerdict::NotApplied(_) => None,
                    _ => Some(result.verdict.to_string()),
                },
            })
            .collect();
        Self {
            schema: SIGN_IN_LOG_SCHEMA,
            time: context.now,
            request_id: None,
            stage,
            app,
            user: context.user_name,
            session_id: None,
            client_ip: context.client_ip,
            location: Location {
                network: network_of(context.client_ip),
            },
            platform: context.platform,
            amr: context.amr,
            acr: context.acr,
            auth_time: context.auth_time,
            sign_in_risk: context.sign_in_risk,
            user_risk: context.user_risk,
            risk_detections: &[],
            policies,
            session_controls: SignInEventSessionControls::of(&decision.session),
            report_only_session_controls: (!decision.report_only_session.is_empty())
                .then(|| SignInEventSessionControls::request(&decision.report_only_session)),
            decision: decision.outcome.name(),
            reason: reason(decision),
        }
    }

    /// Sets the request id.
    pub fn with_request_id(mut self, request_id: &'a str) -> Self {
        self.request_id = Some(request_id);
        self
    }

    /// Sets the risk detections that fired at the sign-in.
    pub fn with_risk_detections(mut self, detections: &'a [RiskDetection]) -> Self {
        self.risk_detections = detections;
        self
    }

    /// Sets the session id.
    pub fn with_session_id(mut self, session_id: &'a str) -> Self {
        self.session_id = Some(session_id);
        self
    }

    /// The event as one JSON line, without the newline.
    pub fn to_json(&self) -> String {
        // Every field serialises infallibly (strings, numbers, enums, timestamps).
        serde_json_line(self)
    }
}

fn serde_json_line(event: &SignInEvent<'_>) -> String {
    match serde_json::to_string(event) {
        Ok(line) => line,
        Err(error) => format!(
            "{{\"schema\":\"{SIGN_IN_LOG_SCHEMA}\",\"error\":\"cannot serialise the sign-in event: {}\"}}",
            error.to_string().replace(['"', '\\'], "'")
        ),
    }
}

/// The final decision in words.
pub(crate) fn reason(decision: &Decision) -> String {
    match &decision.outcome {
        Outcome::Allowed => {
            let applied = decision
                .policies
                .iter()
                .filter(|p| !p.report_only && !matches!(p.verdict, PolicyVerdict::NotApplied(_)))
                .count();
            if applied == 0 {
                "assigned, and no enforced policy applies".to_owned()
            } else {
                format!("assigned, and the {applied} enforced policies that apply are satisfied")
            }
        }
        Outcome::NotAssigned => {
            "the app's assignment names neither the user nor any of their groups".to_owned()
        }
        Outcome::Blocked { policy } => format!("blocked by policy {policy}"),
        Outcome::Denied { policy, unmet } => format!(
            "policy {policy} requires {}, which signing in again cannot provide",
            list(unmet)
        ),
        Outcome::StepUp(step_up) => format!(
            "policies {} require {}: the user must sign in again",
            step_up
                .policies
                .iter()
                .map(|p| p.as_ref())
                .collect::<Vec<_>>()
                .join(", "),
            list(&step_up.unmet)
        ),
    }
}

fn list(requirements: &[Requirement]) -> String {
    requirements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The kind of network `ip` is in.
fn network_of(ip: IpAddr) -> &'static str {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => "loopback",
        IpAddr::V4(v4) if v4.is_private() || v4.is_link_local() => "private",
        IpAddr::V6(v6) if v6.is_loopback() => "loopback",
        IpAddr::V6(v6) if v6.is_unique_local() || v6.is_unicast_link_local() => "private",
        _ => "public",
    }
}
