//! Sallyport's conditional access engine: pure evaluation, no IO.
//!
//! The proxy (on every sign-in and request), the operator (to validate policies) and the
//! what-if tool share this crate, so all three reach the same decision for the same
//! sign-in.
//!
//! 1. [`PolicySet::compile`] turns the configuration's policies
//!    ([`sallyport_api::fleet_config::Policy`]) into a form that is cheap to evaluate:
//!    CIDRs parsed, time zones resolved, names folded to lower case.
//! 2. [`PolicySet::app`] picks the policies of one app, together with the app's own
//!    assignment, once per configuration.
//! 3. [`AppPolicies::evaluate`] decides one [`SignInContext`]:
//!    - the app's assignment is checked first: a user it does not name is
//!      [`Outcome::NotAssigned`];
//!    - every `Enabled` and `ReportOnly` policy is matched against the sign-in: its users
//!      and groups, then its conditions (location, client platform, risk, time);
//!    - a block in any applying `Enabled` policy blocks; otherwise every grant
//!      requirement and sign-in frequency of the applying `Enabled` policies must be met.
//!      What the user can meet by authenticating again (MFA, an authentication strength,
//!      a fresh sign-in) is a [`Outcome::StepUp`]; what they cannot (group membership) is
//!      [`Outcome::Denied`];
//!    - `ReportOnly` policies get a result in [`Decision::policies`] and never change the
//!      outcome;
//!    - the session controls of the applying `Enabled` policies combine into
//!      [`Decision::session`]: the shortest sign-in frequency, `Never` over `Always`, and
//!      the union of the per-request controls ([`RequestControls`]: `monitor`,
//!      `readOnly`, `blockDownloads`). Applying `ReportOnly` policies' per-request
//!      controls are reported in [`Decision::report_only_session`], never enforced.
//!
//! [`SignInEvent`] is the sign-in log's line: the decision with its context, in a stable,
//! documented JSON schema (`docs/sign-in-log.md`).

mod compile;
mod context;
mod evaluate;
mod risk_detection;
mod sign_in_log;
mod time_window;

pub use compile::{AppPolicies, CompileError, PolicySet};
pub use context::{MfaSettings, SignInContext, platform_from_user_agent};
pub use evaluate::{
    BLOCK_DOWNLOADS, Decision, MONITOR, NotApplied, Outcome, PolicyResult, PolicyVerdict,
    READ_ONLY, RequestControls, Requirement, SessionControls, StepUp,
};
pub use risk_detection::{RiskDetection, RiskDetectionKind, RiskScope};
pub use sign_in_log::{
    Location, SIGN_IN_LOG_SCHEMA, SignInEvent, SignInEventPolicy, SignInEventSessionControls,
    SignInStage,
};
