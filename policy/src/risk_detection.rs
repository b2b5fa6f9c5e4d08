//! What a risk detection reports: the sign-in log carries them (`riskDetections`), and
//! the risk levels policy sees are the highest of them (see `sallyport-risk`).

use sallyport_api::conditional_access_policy::RiskLevel;
use serde::{Deserialize, Serialize};

/// Which detection fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RiskDetectionKind {
    /// The client IP is in a listed anonymizing network (Tor, VPN, proxy egress).
    AnonymizedIpAddress,
    /// The user's previous sign-in was too far away for the time since.
    ImpossibleTravel,
    /// Many failed or denied sign-ins came from the client IP.
    MaliciousIpAddress,
    /// Many distinct users failed to sign in from the client IP.
    PasswordSpray,
    /// Many failed or denied sign-ins of the user.
    BruteForce,
    /// A country, network or platform the user has not signed in from before.
    UnfamiliarFeatures,
}

impl RiskDetectionKind {
    /// The name in logs and the sign-in log.
    pub fn name(self) -> &'static str {
        match self {
            Self::AnonymizedIpAddress => "anonymizedIpAddress",
            Self::ImpossibleTravel => "impossibleTravel",
            Self::MaliciousIpAddress => "maliciousIpAddress",
            Self::PasswordSpray => "passwordSpray",
            Self::BruteForce => "bruteForce",
            Self::UnfamiliarFeatures => "unfamiliarFeatures",
        }
    }
}

/// Which risk level a detection raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RiskScope {
    /// The sign-in's (`signInRisk`).
    SignIn,
    /// The user's (`userRisk`).
    User,
}

/// One detection that fired for a sign-in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RiskDetection {
    /// Which detection.
    #[serde(rename = "type")]
    pub kind: RiskDetectionKind,
    /// Which risk it raises.
    pub risk: RiskScope,
    /// To which level.
    pub level: RiskLevel,
    /// Why, in words.
    pub detail: String,
}
