//! What a decision is about: the sign-in's user, client and authentication.

use std::net::IpAddr;

use jiff::Timestamp;
use sallyport_api::conditional_access_policy::{ClientPlatform, RiskLevel};

/// One sign-in (or one request of a signed-in session) as policy sees it.
#[derive(Clone, Debug)]
pub struct SignInContext<'a> {
    /// The user name: `preferred_username`, else `email`.
    pub user_name: &'a str,

    /// The e-mail address, when the provider sent one. Users are matched by name or by
    /// e-mail, ignoring ASCII case.
    pub email: Option<&'a str>,

    /// The user's groups (the `groups` claim), matched exactly.
    pub groups: &'a [String],

    /// The client's IP address (from the socket, or from a trusted proxy's headers).
    pub client_ip: IpAddr,

    /// The client platform, read from the User-Agent with [`platform_from_user_agent`].
    pub platform: Option<ClientPlatform>,

    /// When the decision is made.
    pub now: Timestamp,

    /// When the user last authenticated at the provider.
    pub auth_time: Timestamp,

    /// Authentication methods of the sign-in (`amr`).
    pub amr: &'a [String],

    /// Authentication context class of the sign-in (`acr`).
    pub acr: Option<&'a str>,

    /// The sign-in's risk level; `None` is no risk detected.
    pub sign_in_risk: Option<RiskLevel>,

    /// The user's risk level; `None` is no risk detected.
    pub user_risk: Option<RiskLevel>,
}

/// How the fleet recognises multi-factor authentication in a sign-in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MfaSettings {
    /// `acr` values that mean the user completed MFA. They are also sent as `acr_values`
    /// when stepping up to satisfy an `mfa` requirement.
    pub acr_values: Vec<String>,
}

impl MfaSettings {
    /// Whether a sign-in with these `amr` and `acr` completed MFA: `amr` holds `mfa`
    /// (RFC 8176), or `acr` is one of the MFA values.
    pub fn satisfied_by(&self, amr: &[String], acr: Option<&str>) -> bool {
        amr.iter().any(|method| method == "mfa")
            || acr.is_some_and(|acr| self.acr_values.iter().any(|value| value == acr))
    }
}

/// The client platform a User-Agent names, or `None` when it names none of them.
///
/// Mobile platforms are recognised before the desktop ones whose names their
/// User-Agents also carry: Android before Linux, iOS (iPhone, iPad, iPod) before macOS.
/// ChromeOS counts as Linux. A User-Agent is the client's claim, not proof: policies
/// that include platforms are a convenience, and excluding a platform is no barrier.
pub fn platform_from_user_agent(user_agent: &str) -> Option<ClientPlatform> {
    let has = |needle: &str| user_agent.contains(needle);
    if has("Android") {
        Some(ClientPlatform::Android)
    } else if has("iPhone") || has("iPad") || has("iPod") {
        Some(ClientPlatform::Ios)
    } else if has("Windows") {
        Some(ClientPlatform::Windows)
    } else if has("Macintosh") || has("Mac OS X") {
        Some(ClientPlatform::MacOs)
    } else if has("Linux") || has("X11") || has("CrOS") {
        Some(ClientPlatform::Linux)
    } else {
        None
    }
}
