//! Deciding one sign-in: assignment, each policy's verdict, and the outcome.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use sallyport_api::conditional_access_policy::{
    ContentType, PersistentBrowserSession, RequirementOperator,
};
use serde::Serialize;

use crate::compile::{AppPolicies, CompiledPolicy, CompiledRequirements, NameList};
use crate::context::{MfaSettings, SignInContext};

/// What the engine decided for a sign-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What happens to the request.
    pub outcome: Outcome,

    /// Every enabled and report-only policy of the app, with its verdict, in the order
    /// the configuration lists them (sorted by id).
    pub policies: Vec<PolicyResult>,

    /// Session controls of the enforced policies that applied.
    pub session: SessionControls,

    /// The per-request session controls the report-only policies that applied would
    /// have put in force: logged, never enforced.
    pub report_only_session: RequestControls,
}

/// What happens to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Let it through.
    Allowed,
    /// The app's assignment does not name the user or any of their groups.
    NotAssigned,
    /// An enforced policy blocks it.
    Blocked {
        /// The first blocking policy, by id.
        policy: Arc<str>,
    },
    /// An enforced policy requires what signing in again cannot give (a group).
    Denied {
        /// The first such policy, by id.
        policy: Arc<str>,
        /// Its unmet requirements.
        unmet: Vec<Requirement>,
    },
    /// Signing in again, more strongly or more recently, can satisfy every enforced
    /// policy.
    StepUp(StepUp),
}

impl Outcome {
    /// The outcome's name in logs: `allowed`, `notAssigned`, `blocked`, `denied` or
    /// `stepUp`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::NotAssigned => "notAssigned",
            Self::Blocked { .. } => "blocked",
            Self::Denied { .. } => "denied",
            Self::StepUp(_) => "stepUp",
        }
    }

    /// True for [`Outcome::Allowed`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed)
    }
}

/// The authentication request that can satisfy the enforced policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepUp {
    /// The policies that asked for it, by id.
    pub policies: Vec<Arc<str>>,
    /// What is missing.
    pub unmet: Vec<Requirement>,
    /// `acr_values` to request (any one satisfies the provider), from the policies'
    /// authentication strengths and the fleet's MFA acr values.
    pub acr_values: Vec<String>,
    /// `max_age` to request: the shortest sign-in frequency that lapsed.
    pub max_age: Option<Duration>,
}

/// A grant requirement or session control a sign-in can fail to meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Requirement {
    /// Multi-factor authentication.
    Mfa,
    /// An authentication strength (`acr` / `amr`).
    AuthenticationStrength,
    /// Membership of one of the required groups.
    Groups,
    /// A sign-in more recent than the sign-in frequency.
    SignInFrequency,
}

impl Requirement {
    /// Whether authenticating again can meet it.
    pub fn step_up_can_meet(self) -> bool {
        !matches!(self, Self::Groups)
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mfa => "multi-factor authentication",
            Self::AuthenticationStrength => "the required authentication strength",
            Self::Groups => "membership of a required group",
            Self::SignInFrequency => "a recent sign-in",
        })
    }
}

/// One policy's verdict on a sign-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyResult {
    /// The policy's id, `namespace/name`.
    pub policy: Arc<str>,
    /// The policy is `ReportOnly`: its verdict is logged, not enforced.
    pub report_only: bool,
    /// The verdict.
    pub verdict: PolicyVerdict,
}

/// A policy's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// The policy does not apply to the sign-in.
    NotApplied(NotApplied),
    /// It applies and blocks.
    Blocked,
    /// It applies and every requirement is met.
    Granted,
    /// It applies and these requirements are not met.
    Unmet(Vec<Requirement>),
    /// It cannot be evaluated (why) and blocks, failing closed.
    Invalid(String),
}

impl PolicyVerdict {
    /// The verdict's name in the sign-in log, following the reference product's result
    /// names: `notApplied`, `success`, `failure` (blocked, unmet or invalid), each with
    /// a `reportOnly` prefix for report-only policies.
    pub fn result_name(&self, report_only: bool) -> &'static str {
        match (self, report_only) {
            (Self::NotApplied(_), false) => "notApplied",
            (Self::NotApplied(_), true) => "reportOnlyNotApplied",
            (Self::Granted, false) => "success",
            (Self::Granted, true) => "reportOnlySuccess",
            (_, false) => "failure",
            (_, true) => "reportOnlyFailure",
        }
    }
}

impl fmt::Display for PolicyVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotApplied(reason) => write!(f, "not applied: {reason}"),
            Self::Blocked => f.write_str("applies and blocks access"),
            Self::Granted => f.write_str("applies; every requirement is met"),
            Self::Unmet(unmet) => {
                f.write_str("applies; not met: ")?;
                for (index, requirement) in unmet.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{requirement}")?;
                }
                Ok(())
            }
            Self::Invalid(why) => write!(f, "cannot be evaluated, so it blocks: {why}"),
        }
    }
}

/// Why a policy does not apply to a sign-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NotApplied {
    /// Neither the user nor any of their groups is included.
    UserNotIncluded,
    /// The user is excluded.
    UserExcluded,
    /// One of the user's groups is excluded.
    GroupExcluded,
    /// The client IP is in no included location.
    LocationNotIncluded,
    /// The client IP is in an excluded location.
    LocationExcluded,
    /// The client platform is not among the policy's platforms, or is unknown.
    PlatformNotIncluded,
    /// The sign-in risk is not among the policy's levels.
    SignInRiskNotIncluded,
    /// The user risk is not among the policy's levels.
    UserRiskNotIncluded,
    /// The time is outside every window of the policy.
    OutsideTimes,
}

impl fmt::Display for NotApplied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UserNotIncluded => "neither the user nor their groups are included",
            Self::UserExcluded => "the user is excluded",
            Self::GroupExcluded => "one of the user's groups is excluded",
            Self::LocationNotIncluded => "the client IP is in no included location",
            Self::LocationExcluded => "the client IP is in an excluded location",
            Self::PlatformNotIncluded => "the client platform is not included",
            Self::SignInRiskNotIncluded => "the sign-in risk level is not included",
            Self::UserRiskNotIncluded => "the user risk level is not included",
            Self::OutsideTimes => "the time is outside the policy's windows",
        })
    }
}

/// Session controls of the enforced policies that applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionControls {
    /// The shortest sign-in frequency.
    pub sign_in_frequency: Option<Duration>,
    /// Whether the session cookie survives a browser restart: `Never` wins over
    /// `Always`.
    pub persistent_browser_session: Option<PersistentBrowserSession>,
    /// When the session must authenticate again (its authentication time plus the
    /// shortest sign-in frequency).
    pub reauthenticate_at: Option<Timestamp>,
    /// The controls on each request of the session.
    pub request: RequestControls,
}

/// Session controls that act on each request of a session (`monitor`, `readOnly`,
/// `blockDownloads`), each with the policies that ask for it, by id in the order the
/// configuration lists them. Policies combine by union: one policy asking is enough.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestControls {
    /// Policies asking to monitor the session.
    pub monitor: Vec<Arc<str>>,
    /// Policies allowing only safe methods.
    pub read_only: Vec<Arc<str>>,
    /// Policies blocking downloads.
    pub block_downloads: Vec<Arc<str>>,
    /// The media types that count as downloads: every blocking policy's, without
    /// repeats.
    pub download_content_types: Vec<ContentType>,
}

/// The names of the per-request session controls, as the API and the sign-in log spell
/// them.
pub const MONITOR: &str = "monitor";
/// See [`MONITOR`].
pub const READ_ONLY: &str = "readOnly";
/// See [`MONITOR`].
pub const BLOCK_DOWNLOADS: &str = "blockDownloads";

impl RequestControls {
    /// True when no control is in force.
    pub fn is_empty(&self) -> bool {
        self.monitor.is_empty() && self.read_only.is_empty() && self.block_downloads.is_empty()
    }

    /// Whether every request of the session is written to the audit stream.
    pub fn monitors(&self) -> bool {
        !self.monitor.is_empty()
    }

    /// Whether only safe methods may pass.
    pub fn is_read_only(&self) -> bool {
        !self.read_only.is_empty()
    }

    /// Whether downloads are blocked.
    pub fn blocks_downloads(&self) -> bool {
        !self.block_downloads.is_empty()
    }

    /// Whether `method` may pass under `readOnly`: `GET`, `HEAD` and `OPTIONS` only.
    pub fn is_safe_method(method: &str) -> bool {
        matches!(method, "GET" | "HEAD" | "OPTIONS")
    }

    /// Whether a response with these `Content-Disposition` and `Content-Type` header
    /// values is a download: its disposition type is `attachment`, or its media type
    /// (without parameters) is one of [`RequestControls::download_content_types`]. Always
    /// false when downloads are not blocked.
    pub fn is_download(
        &self,
        content_disposition: Option<&str>,
        content_type: Option<&str>,
    ) -> bool {
        if !self.blocks_downloads() {
            return false;
        }
        let attachment = content_disposition.is_some_and(|value| {
            value
                .split(';')
                .next()
                .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("attachment"))
        });
        if attachment {
            return true;
        }
        let Some(essence) = content_type
            .and_then(|value| value.split(';').next())
            .map(|essence| essence.trim().to_ascii_lowercase())
            .filter(|essence| !essence.is_empty())
        else {
            return false;
        };
        self.download_content_types
            .iter()
            .any(|listed| listed.matches(&essence))
    }

    /// The controls (`monitor`, `readOnly`, `blockDownloads`) that policy `id` asks
    /// for.
    pub fn of_policy(&self, id: &str) -> Vec<&'static str> {
        [
            (MONITOR, &self.monitor),
            (READ_ONLY, &self.read_only),
            (BLOCK_DOWNLOADS, &self.block_downloads),
        ]
        .into_iter()
        .filter(|(_, policies)| policies.iter().any(|p| p.as_ref() == id))
        .map(|(name, _)| name)
        .collect()
    }

    /// Adds `policy`'s controls.
    fn add(&mut self, policy: &CompiledPolicy) {
        if policy.monitor {
            self.monitor.push(Arc::clone(&policy.id));
        }
        if policy.read_only {
            self.read_only.push(Arc::clone(&policy.id));
        }
        if let Some(types) = &policy.block_downloads {
            self.block_downloads.push(Arc::clone(&policy.id));
            for content_type in types.iter() {
                if !self
                    .download_content_types
                    .iter()
                    .any(|t| t.as_str().eq_ignore_ascii_case(content_type.as_str()))
                {
                    self.download_content_types.push(content_type.clone());
                }
            }
        }
    }
}

impl AppPolicies {
    /// Decides `context` for this app.
    pub fn evaluate(&self, context: &SignInContext<'_>) -> Decision {
        if !self.is_assigned(context) {
            return Decision {
                outcome: Outcome::NotAssigned,
                policies: Vec::new(),
                session: SessionControls::default(),
                report_only_session: RequestControls::default(),
            };
        }
        let user = context.user_name.to_ascii_lowercase();
        let email = context.email.map(str::to_ascii_lowercase);
        let subject = Subject {
            user: &user,
            email: email.as_deref(),
            context,
            mfa: &self.mfa,
        };
        let mut policies = Vec::with_capacity(self.policies.len());
        let mut blocked: Option<Arc<str>> = None;
        let mut denied: Option<(Arc<str>, Vec<Requirement>)> = None;
        let mut step_up = StepUp::default();
        let mut session = SessionControls::default();
        let mut report_only_session = RequestControls::default();
        for policy in &self.policies {
            let verdict = subject.verdict(policy);
            if !policy.report_only {
                match &verdict {
                    PolicyVerdict::Blocked | PolicyVerdict::Invalid(_) => {
                        blocked.get_or_insert_with(|| Arc::clone(&policy.id));
                    }
                    PolicyVerdict::Unmet(unmet) => {
                        if step_up_can_satisfy(policy, unmet) {
                            add_step_up(&mut step_up, &self.mfa, policy, unmet);
                        } else if denied.is_none() {
                            denied = Some((Arc::clone(&policy.id), unmet.clone()));
                        }
                    }
                    PolicyVerdict::NotApplied(_) | PolicyVerdict::Granted => {}
                }
                if !matches!(verdict, PolicyVerdict::NotApplied(_)) {
                    add_session_controls(&mut session, policy, context);
                }
            } else if !matches!(verdict, PolicyVerdict::NotApplied(_)) {
                report_only_session.add(policy);
            }
            policies.push(PolicyResult {
                policy: Arc::clone(&policy.id),
                report_only: policy.report_only,
                verdict,
            });
        }
        let outcome = if let Some(policy) = blocked {
            Outcome::Blocked { policy }
        } else if let Some((policy, unmet)) = denied {
            Outcome::Denied { policy, unmet }
        } else if !step_up.unmet.is_empty() {
            step_up.unmet.sort_unstable();
            step_up.unmet.dedup();
            Outcome::StepUp(step_up)
        } else {
            Outcome::Allowed
        };
        Decision {
            outcome,
            policies,
            session,
            report_only_session,
        }
    }

    /// Whether the app's assignment names the user or one of their groups (an empty
    /// assignment admits every signed-in user).
    fn is_assigned(&self, context: &SignInContext<'_>) -> bool {
        if self.assigned_users.is_empty() && self.assigned_groups.is_empty() {
            return true;
        }
        let named = |name: &str| {
            !self.assigned_users.is_empty()
                && self.assigned_users.contains(&name.to_ascii_lowercase())
        };
        named(context.user_name)
            || context.email.is_some_and(named)
            || context
                .groups
                .iter()
                .any(|group| self.assigned_groups.contains(group))
    }
}

/// Whether signing in again can satisfy `policy`, which left `unmet` unmet. A lapsed
/// sign-in frequency always can; the grant requirements combine by the policy's
/// operator: under `OR` one that a step-up can meet is enough, under `AND` every unmet
/// one must be. The sign-in frequency is a session control, not one of the `OR`'s
/// alternatives: a fresh sign-in does not make up for a missing group.
fn step_up_can_satisfy(policy: &CompiledPolicy, unmet: &[Requirement]) -> bool {
    let mut grant = unmet
        .iter()
        .filter(|r| **r != Requirement::SignInFrequency)
        .peekable();
    if grant.peek().is_none() {
        return true;
    }
    match policy.require.as_ref().map(|r| r.operator) {
        Some(RequirementOperator::Or) => grant.any(|r| r.step_up_can_meet()),
        _ => grant.all(|r| r.step_up_can_meet()),
    }
}

/// Adds what `policy` needs, `unmet`, to the step-up request.
fn add_step_up(
    step_up: &mut StepUp,
    mfa: &MfaSettings,
    policy: &CompiledPolicy,
    unmet: &[Requirement],
) {
    step_up.policies.push(Arc::clone(&policy.id));
    let mut add_acr = |values: &[String]| {
        for value in values {
            if !step_up.acr_values.contains(value) {
                step_up.acr_values.push(value.clone());
            }
        }
    };
    for requirement in unmet {
        match requirement {
            Requirement::Mfa => add_acr(&mfa.acr_values),
            Requirement::AuthenticationStrength => {
                if let Some((acr_values, _)) =
                    policy.require.as_ref().and_then(|r| r.strength.as_ref())
                {
                    add_acr(acr_values);
                }
            }
            Requirement::SignInFrequency | Requirement::Groups => {}
        }
    }
    if unmet.contains(&Requirement::SignInFrequency)
        && let Some(frequency) = policy.sign_in_frequency
    {
        step_up.max_age = Some(step_up.max_age.map_or(frequency, |m| m.min(frequency)));
    }
    step_up
        .unmet
        .extend(unmet.iter().copied().filter(|r| r.step_up_can_meet()));
}

/// Adds an applying enforced policy's session controls.
fn add_session_controls(
    session: &mut SessionControls,
    policy: &CompiledPolicy,
    context: &SignInContext<'_>,
) {
    if let Some(frequency) = policy.sign_in_frequency {
        let shortest = session
            .sign_in_frequency
            .map_or(frequency, |current| current.min(frequency));
        session.sign_in_frequency = Some(shortest);
        session.reauthenticate_at = jiff::SignedDuration::try_from(shortest)
            .ok()
            .and_then(|d| context.auth_time.checked_add(d).ok());
    }
    match (
        session.persistent_browser_session,
        policy.persistent_browser_session,
    ) {
        (_, None) | (Some(PersistentBrowserSession::Never), _) => {}
        (_, Some(choice)) => session.persistent_browser_session = Some(choice),
    }
    session.request.add(policy);
}

/// The sign-in being decided, with the user's names folded once.
struct Subject<'a> {
    user: &'a str,
    email: Option<&'a str>,
    context: &'a SignInContext<'a>,
    mfa: &'a MfaSettings,
}

impl Subject<'_> {
    fn verdict(&self, policy: &CompiledPolicy) -> PolicyVerdict {
        if let Err(reason) = self.applies(policy) {
            return PolicyVerdict::NotApplied(reason);
        }
        if let Some(why) = &policy.invalid {
            return PolicyVerdict::Invalid(why.clone());
        }
        if policy.block {
            return PolicyVerdict::Blocked;
        }
        let mut unmet = policy
            .require
            .as_ref()
            .map(|require| self.unmet_requirements(require))
            .unwrap_or_default();
        if let Some(frequency) = policy.sign_in_frequency
            && self.older_than(frequency)
        {
            unmet.push(Requirement::SignInFrequency);
        }
        if unmet.is_empty() {
            PolicyVerdict::Granted
        } else {
            PolicyVerdict::Unmet(unmet)
        }
    }

    /// Whether the policy applies: its users and groups, then its conditions.
    fn applies(&self, policy: &CompiledPolicy) -> Result<(), NotApplied> {
        let context = self.context;
        let user_named = |set: &NameList| {
            !set.is_empty()
                && (set.contains(self.user) || self.email.is_some_and(|e| set.contains(e)))
        };
        let in_group =
            |set: &NameList| !set.is_empty() && context.groups.iter().any(|g| set.contains(g));
        let included = policy.users.everyone
            || policy.groups.everyone
            || user_named(&policy.users.include)
            || in_group(&policy.groups.include);
        if !included {
            return Err(NotApplied::UserNotIncluded);
        }
        if user_named(&policy.users.exclude) {
            return Err(NotApplied::UserExcluded);
        }
        if in_group(&policy.groups.exclude) {
            return Err(NotApplied::GroupExcluded);
        }
        if let Some(locations) = &policy.locations {
            let ip = context.client_ip.to_canonical();
            if !locations.any && !locations.include.iter().any(|net| net.contains(&ip)) {
                return Err(NotApplied::LocationNotIncluded);
            }
            if locations.exclude.iter().any(|net| net.contains(&ip)) {
                return Err(NotApplied::LocationExcluded);
            }
        }
        if !policy.platforms.is_empty()
            && !context
                .platform
                .is_some_and(|platform| policy.platforms.contains(&platform))
        {
            return Err(NotApplied::PlatformNotIncluded);
        }
        if !policy.sign_in_risk.is_empty()
            && !context
                .sign_in_risk
                .is_some_and(|level| policy.sign_in_risk.contains(&level))
        {
            return Err(NotApplied::SignInRiskNotIncluded);
        }
        if !policy.user_risk.is_empty()
            && !context
                .user_risk
                .is_some_and(|level| policy.user_risk.contains(&level))
        {
            return Err(NotApplied::UserRiskNotIncluded);
        }
        if !policy.times.is_empty() && !policy.times.iter().any(|w| w.contains(context.now)) {
            return Err(NotApplied::OutsideTimes);
        }
        Ok(())
    }

    /// The requirements of `require` the sign-in does not meet: all of them under `OR`
    /// when none is met, else the unmet ones under `AND`.
    fn unmet_requirements(&self, require: &CompiledRequirements) -> Vec<Requirement> {
        let context = self.context;
        let mut checks: Vec<(Requirement, bool)> = Vec::with_capacity(3);
        if require.mfa {
            checks.push((
                Requirement::Mfa,
                self.mfa.satisfied_by(context.amr, context.acr),
            ));
        }
        if let Some((acr_values, amr)) = &require.strength {
            let acr_ok = acr_values.is_empty()
                || context
                    .acr
                    .is_some_and(|acr| acr_values.iter().any(|value| value == acr));
            let amr_ok = amr.iter().all(|method| context.amr.contains(method));
            checks.push((Requirement::AuthenticationStrength, acr_ok && amr_ok));
        }
        if !require.groups.is_empty() {
            let member = require.groups.iter().any(|g| context.groups.contains(g));
            checks.push((Requirement::Groups, member));
        }
        let any_met = checks.iter().any(|(_, met)| *met);
        match require.operator {
            RequirementOperator::Or if any_met => Vec::new(),
            RequirementOperator::Or => checks.into_iter().map(|(r, _)| r).collect(),
            RequirementOperator::And => checks
                .into_iter()
                .filter(|(_, met)| !met)
                .map(|(r, _)| r)
                .collect(),
        }
    }

    /// Whether the user authenticated longer than `frequency` ago.
    fn older_than(&self, frequency: Duration) -> bool {
        let age = self.context.now.duration_since(self.context.auth_time);
        jiff::SignedDuration::try_from(frequency).is_ok_and(|frequency| age >= frequency)
    }
}
