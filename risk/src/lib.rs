//! Sallyport's risk detections: what makes a sign-in (or a user) risky, as the
//! `signInRisk` and `userRisk` conditions of ConditionalAccessPolicies see it.
//!
//! At every sign-in the proxy asks [`RiskEngine::assess`] about the user and the
//! client, before policy decides:
//!
//! - [`Anonymizers`]: the client IP is in a known anonymizing network (Tor exits, VPN
//!   egress, open proxies) → `anonymizedIpAddress`;
//! - [`GeoDatabase`]: a MaxMind-format database places the client; the last sign-in of
//!   the same user was too far away for the time between them → `impossibleTravel`;
//! - failed or denied sign-ins counted in sliding windows: many from the client IP →
//!   `maliciousIpAddress`, many distinct users failing from it → `passwordSpray` (both
//!   sign-in risk), many for the user → `bruteForce` (user risk);
//! - the user has history, and the country, network or platform is new →
//!   `unfamiliarFeatures`.
//!
//! The sign-in risk is the highest level of the sign-in detections, the user risk the
//! highest of the user detections ([`Assessment`]). [`detect`] is the pure part; what it
//! needs to remember (each user's last sign-ins, the failure counters) lives in a
//! [`RiskStore`]: [`MemoryStore`] per replica, or [`RedisStore`] shared by the fleet.

mod anonymizers;
mod detect;
mod engine;
mod geo;
mod store;

pub use anonymizers::{AnonymizerError, Anonymizers};
pub use detect::{Assessment, DetectionSettings, detect, network_of, user_risk_of};
pub use engine::{DEFAULT_USER_RISK_REFRESH, RiskEngine, SignInAttempt};
pub use geo::{GeoDatabase, GeoError, Place, distance_km};
pub use sallyport_policy::{RiskDetection, RiskDetectionKind, RiskScope};
pub use store::{
    MemoryStore, Observation, RedisStore, RiskStore, SignInRecord, StoreError, StoreSettings,
};
