//! The detections themselves: pure functions of a sign-in and what the store knows.

use std::net::IpAddr;

use ipnet::IpNet;
use sallyport_api::conditional_access_policy::{ClientPlatform, RiskLevel};
use sallyport_policy::{RiskDetection, RiskDetectionKind, RiskScope};

use crate::engine::SignInAttempt;
use crate::geo::{Place, distance_km};
use crate::store::{Observation, SignInRecord};

/// Levels and thresholds of the detections.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionSettings {
    /// The sign-in risk of a sign-in from an anonymizing network.
    pub anonymizer_level: RiskLevel,
    /// The sign-in risk of impossible travel.
    pub travel_level: RiskLevel,
    /// The fastest plausible travel between two sign-ins, in km/h (an airliner's
    /// speed).
    pub travel_max_kmh: f64,
    /// Distances below this (km) are never impossible travel: GeoIP places addresses
    /// only roughly.
    pub travel_min_km: f64,
    /// Failed or denied sign-ins from one IP in the failure window that make sign-ins
    /// from it high risk (`maliciousIpAddress`); half as many (rounded up) make them
    /// medium risk. 0 turns the detection off.
    pub ip_failures: u64,
    /// Distinct users failing from one IP in the failure window that make sign-ins from
    /// it high risk (`passwordSpray`). 0 turns the detection off.
    pub spray_users: u64,
    /// Failed or denied sign-ins of one user in the failure window that make the user
    /// high risk (`bruteForce`); half as many (rounded up) medium risk. 0 turns the
    /// detection off.
    pub user_failures: u64,
    /// How many earlier sign-ins a user needs before new properties count as
    /// unfamiliar.
    pub unfamiliar_min_history: usize,
}

impl Default for DetectionSettings {
    fn default() -> Self {
        Self {
            anonymizer_level: RiskLevel::Medium,
            travel_level: RiskLevel::Medium,
            travel_max_kmh: 900.0,
            travel_min_km: 300.0,
            ip_failures: 10,
            spray_users: 5,
            user_failures: 10,
            unfamiliar_min_history: 3,
        }
    }
}

/// A sign-in's risk: the detections that fired and the levels they make.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// The highest level of the sign-in detections; `None` when none fired.
    pub sign_in_risk: Option<RiskLevel>,
    /// The highest level of the user detections; `None` when none fired.
    pub user_risk: Option<RiskLevel>,
    /// Every detection that fired.
    pub detections: Vec<RiskDetection>,
    /// The sign-in as the user's history will keep it, should it succeed.
    pub record: SignInRecord,
}

impl Assessment {
    /// The levels of `detections` for the sign-in `record`.
    pub fn new(detections: Vec<RiskDetection>, record: SignInRecord) -> Self {
        let highest = |scope: RiskScope| {
            detections
                .iter()
                .filter(|d| d.risk == scope)
                .map(|d| d.level)
                .max()
        };
        Self {
            sign_in_risk: highest(RiskScope::SignIn),
            user_risk: highest(RiskScope::User),
            detections,
            record,
        }
    }
}

/// The network a client is counted in for unfamiliar sign-in properties: its /24
/// (IPv4) or /48 (IPv6).
pub fn network_of(ip: IpAddr) -> IpNet {
    let ip = ip.to_canonical();
    let prefix = if ip.is_ipv4() { 24 } else { 48 };
    IpNet::new(ip, prefix).map_or(IpNet::from(ip), |net| net.trunc())
}

/// Half of `threshold`, rounded up (the medium level of a high threshold).
fn half(threshold: u64) -> u64 {
    threshold.div_ceil(2)
}

fn detection(
    kind: RiskDetectionKind,
    risk: RiskScope,
    level: RiskLevel,
    detail: String,
) -> RiskDetection {
    RiskDetection {
        kind,
        risk,
        level,
        detail,
    }
}

/// The detections that fire for `attempt`, placed at `place` (if a GeoIP database
/// knows), from the anonymizing network `anonymizer` (if listed), given what the store
/// `observed`.
pub fn detect(
    settings: &DetectionSettings,
    attempt: &SignInAttempt<'_>,
    place: Option<&Place>,
    anonymizer: Option<IpNet>,
    observed: &Observation,
) -> Vec<RiskDetection> {
    let mut found = Vec::new();
    if let Some(network) = anonymizer {
        found.push(detection(
            RiskDetectionKind::AnonymizedIpAddress,
            RiskScope::SignIn,
            settings.anonymizer_level,
            format!("the client IP is in the anonymizing network {network}"),
        ));
    }
    if let Some(travel) = impossible_travel(settings, attempt, place, &observed.history) {
        found.push(travel);
    }
    if settings.ip_failures > 0 && observed.ip_failures >= half(settings.ip_failures) {
        let level = if observed.ip_failures >= settings.ip_failures {
            RiskLevel::High
        } else {
            RiskLevel::Medium
        };
        found.push(detection(
            RiskDetectionKind::MaliciousIpAddress,
            RiskScope::SignIn,
            level,
            format!(
                "{} failed or denied sign-ins from the client IP recently",
                observed.ip_failures
            ),
        ));
    }
    if settings.spray_users > 0 && observed.ip_failed_users >= settings.spray_users {
        found.push(detection(
            RiskDetectionKind::PasswordSpray,
            RiskScope::SignIn,
            RiskLevel::High,
            format!(
                "{} distinct users failed to sign in from the client IP recently",
                observed.ip_failed_users
            ),
        ));
    }
    if let Some(level) = user_risk_of(settings, observed.user_failures) {
        found.push(detection(
            RiskDetectionKind::BruteForce,
            RiskScope::User,
            level,
            format!(
                "{} failed or denied sign-ins of the user recently",
                observed.user_failures
            ),
        ));
    }
    if let Some(unfamiliar) = unfamiliar(settings, attempt, place, &observed.history) {
        found.push(unfamiliar);
    }
    found
}

/// The level of the `bruteForce` user detection for `user_failures` failed or denied
/// sign-ins of the user in the window: high from the threshold, medium from half of it.
pub fn user_risk_of(settings: &DetectionSettings, user_failures: u64) -> Option<RiskLevel> {
    if settings.user_failures == 0 || user_failures < half(settings.user_failures) {
        return None;
    }
    Some(if user_failures >= settings.user_failures {
        RiskLevel::High
    } else {
        RiskLevel::Medium
    })
}

/// The user's previous located sign-in was too far away for the time since.
fn impossible_travel(
    settings: &DetectionSettings,
    attempt: &SignInAttempt<'_>,
    place: Option<&Place>,
    history: &[SignInRecord],
) -> Option<RiskDetection> {
    let here = place?.coordinates?;
    let (previous, there) = history.iter().find_map(|record| {
        record
            .place
            .as_ref()
            .and_then(|p| p.coordinates)
            .map(|c| (record, c))
    })?;
    if previous.ip == attempt.ip.to_canonical() {
        return None;
    }
    let km = distance_km(there, here);
    if km < settings.travel_min_km {
        return None;
    }
    // At least a second apart, so that simultaneous sign-ins are infinitely fast.
    let elapsed_ms = attempt.now_ms.saturating_sub(previous.at_ms).max(1_000);
    #[allow(clippy::cast_precision_loss)]
    let hours = elapsed_ms as f64 / 3_600_000.0;
    let speed = km / hours;
    if speed <= settings.travel_max_kmh {
        return None;
    }
    let from = previous
        .place
        .as_ref()
        .map_or_else(|| "an unknown place".to_owned(), Place::describe);
    let to = place.map_or_else(|| "an unknown place".to_owned(), Place::describe);
    Some(detection(
        RiskDetectionKind::ImpossibleTravel,
        RiskScope::SignIn,
        settings.travel_level,
        format!(
            "from {to} {} min after a sign-in from {from} ({}), {km:.0} km away: {speed:.0} km/h",
            elapsed_ms / 60_000,
            previous.ip
        ),
    ))
}

/// A country (medium), network or platform (low) the user's history has not seen.
fn unfamiliar(
    settings: &DetectionSettings,
    attempt: &SignInAttempt<'_>,
    place: Option<&Place>,
    history: &[SignInRecord],
) -> Option<RiskDetection> {
    if history.is_empty() || history.len() < settings.unfamiliar_min_history {
        return None;
    }
    let mut new = Vec::new();
    let mut level = RiskLevel::Low;
    let known_countries: Vec<&str> = history
        .iter()
        .filter_map(|r| r.place.as_ref().and_then(|p| p.country.as_deref()))
        .collect();
    if let Some(country) = place.and_then(|p| p.country.as_deref())
        && !known_countries.is_empty()
        && !known_countries.contains(&country)
    {
        new.push(format!("country {country}"));
        level = RiskLevel::Medium;
    }
    let network = network_of(attempt.ip).to_string();
    if !history.iter().any(|r| r.network == network) {
        new.push(format!("network {network}"));
    }
    if let Some(platform) = attempt.platform
        && !history.iter().any(|r| r.platform == Some(platform))
    {
        new.push(format!("platform {}", platform_name(platform)));
    }
    if new.is_empty() {
        return None;
    }
    Some(detection(
        RiskDetectionKind::UnfamiliarFeatures,
        RiskScope::SignIn,
        level,
        format!(
            "new for the user after {} sign-ins: {}",
            history.len(),
            new.join(", ")
        ),
    ))
}

fn platform_name(platform: ClientPlatform) -> String {
    serde_json::to_value(platform)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{platform:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn place(country: &str, coordinates: (f64, f64)) -> Place {
        Place {
            country: Some(country.to_owned()),
            city: None,
            coordinates: Some(coordinates),
        }
    }

    const PARIS: (f64, f64) = (48.8566, 2.3522);
    const LYON: (f64, f64) = (45.764, 4.8357);
    const TOKYO: (f64, f64) = (35.6762, 139.6503);

    fn record(at_ms: i64, from: &str, place: Option<Place>) -> SignInRecord {
        SignInRecord {
            at_ms,
            ip: ip(from),
            network: network_of(ip(from)).to_string(),
            platform: Some(ClientPlatform::Linux),
            place,
        }
    }

    fn attempt(from: &str, now_ms: i64) -> SignInAttempt<'static> {
        SignInAttempt {
            user: "alice",
            ip: ip(from),
            platform: Some(ClientPlatform::Linux),
            now_ms,
        }
    }

    fn kinds(found: &[RiskDetection]) -> Vec<(RiskDetectionKind, RiskLevel)> {
        found.iter().map(|d| (d.kind, d.level)).collect()
    }

    #[test]
    fn nothing_known_is_no_risk() {
        let found = detect(
            &DetectionSettings::default(),
            &attempt("203.0.113.1", 0),
            None,
            None,
            &Observation::default(),
        );
        assert!(found.is_empty(), "{found:?}");
        let assessed = Assessment::new(found, record(0, "203.0.113.1", None));
        assert_eq!((assessed.sign_in_risk, assessed.user_risk), (None, None));
    }

    #[test]
    fn anonymizers_are_medium_by_default() {
        let network: IpNet = "203.0.113.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
        let found = detect(
            &DetectionSettings::default(),
            &attempt("203.0.113.1", 0),
            None,
            Some(network),
            &Observation::default(),
        );
        assert_eq!(
            kinds(&found),
            vec![(RiskDetectionKind::AnonymizedIpAddress, RiskLevel::Medium)]
        );
        assert!(found[0].detail.contains("203.0.113.0/24"));
    }

    #[test]
    fn travel_faster_than_a_plane_is_impossible() {
        let settings = DetectionSettings::default();
        let history = vec![record(0, "198.51.100.1", Some(place("FR", PARIS)))];
        let observed = Observation {
            history,
            ..Observation::default()
        };
        let tokyo = place("JP", TOKYO);
        // Paris to Tokyo (~9700 km) in 30 minutes: impossible; in 13 hours: a flight.
        let fast = detect(
            &settings,
            &attempt("203.0.113.1", 30 * MINUTE),
            Some(&tokyo),
            None,
            &observed,
        );
        assert_eq!(
            kinds(&fast),
            vec![(RiskDetectionKind::ImpossibleTravel, RiskLevel::Medium)]
        );
        assert!(fast[0].detail.contains("FR"), "{}", fast[0].detail);
        let flight = detect(
            &settings,
            &attempt("203.0.113.1", 13 * 60 * MINUTE),
            Some(&tokyo),
            None,
            &observed,
        );
        assert!(flight.is_empty(), "{flight:?}");
        // Paris to Lyon (~390 km) in a minute is fast, but below the minimum distance
        // of 500 km it is GeoIP noise.
        let near = detect(
            &DetectionSettings {
                travel_min_km: 500.0,
                ..settings.clone()
            },
            &attempt("203.0.113.1", MINUTE),
            Some(&place("FR", LYON)),
            None,
            &observed,
        );
        assert!(near.is_empty(), "{near:?}");
        // No place for the sign-in: nothing to compare.
        let unknown = detect(
            &settings,
            &attempt("203.0.113.1", MINUTE),
            None,
            None,
            &observed,
        );
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    #[test]
    fn failures_from_an_ip_raise_sign_in_risk() {
        let settings = DetectionSettings::default();
        let observed = |ip_failures, ip_failed_users| Observation {
            ip_failures,
            ip_failed_users,
            ..Observation::default()
        };
        let at = |o: Observation| {
            let found = detect(&settings, &attempt("203.0.113.1", 0), None, None, &o);
            Assessment::new(found, record(0, "203.0.113.1", None))
        };
        assert_eq!(at(observed(4, 1)).sign_in_risk, None);
        assert_eq!(at(observed(5, 1)).sign_in_risk, Some(RiskLevel::Medium));
        let many = at(observed(10, 1));
        assert_eq!(many.sign_in_risk, Some(RiskLevel::High));
        assert_eq!(
            kinds(&many.detections),
            vec![(RiskDetectionKind::MaliciousIpAddress, RiskLevel::High)]
        );
        let spray = at(observed(5, 5));
        assert_eq!(
            kinds(&spray.detections),
            vec![
                (RiskDetectionKind::MaliciousIpAddress, RiskLevel::Medium),
                (RiskDetectionKind::PasswordSpray, RiskLevel::High)
            ]
        );
        assert_eq!(
            spray.sign_in_risk,
            Some(RiskLevel::High),
            "the highest counts"
        );
        assert_eq!(spray.user_risk, None);
        let off = detect(
            &DetectionSettings {
                ip_failures: 0,
                spray_users: 0,
                ..settings.clone()
            },
            &attempt("203.0.113.1", 0),
            None,
            None,
            &observed(100, 100),
        );
        assert!(off.is_empty(), "0 turns them off: {off:?}");
    }

    #[test]
    fn failures_of_a_user_raise_user_risk() {
        let settings = DetectionSettings::default();
        let at = |user_failures| {
            let o = Observation {
                user_failures,
                ..Observation::default()
            };
            let found = detect(&settings, &attempt("203.0.113.1", 0), None, None, &o);
            Assessment::new(found, record(0, "203.0.113.1", None))
        };
        assert_eq!(at(4).user_risk, None);
        assert_eq!(at(5).user_risk, Some(RiskLevel::Medium));
        let high = at(12);
        assert_eq!(
            (high.user_risk, high.sign_in_risk),
            (Some(RiskLevel::High), None)
        );
        assert_eq!(high.detections[0].risk, RiskScope::User);
    }

    #[test]
    fn unfamiliar_properties_need_history() {
        let settings = DetectionSettings::default();
        let fr = || Some(place("FR", PARIS));
        let history: Vec<SignInRecord> = (0..3)
            .map(|i| record(i * MINUTE, "198.51.100.1", fr()))
            .collect();
        let observed = Observation {
            history: history.clone(),
            ..Observation::default()
        };
        // Same network, platform and country: familiar.
        let familiar = detect(
            &settings,
            &attempt("198.51.100.77", 10 * MINUTE),
            fr().as_ref(),
            None,
            &observed,
        );
        assert!(familiar.is_empty(), "{familiar:?}");
        // A new network only: low.
        let network = detect(
            &settings,
            &attempt("192.0.2.1", 10 * MINUTE),
            fr().as_ref(),
            None,
            &observed,
        );
        assert_eq!(
            kinds(&network),
            vec![(RiskDetectionKind::UnfamiliarFeatures, RiskLevel::Low)]
        );
        assert!(
            network[0].detail.contains("192.0.2.0/24"),
            "{}",
            network[0].detail
        );
        // A new platform: low.
        let windows = detect(
            &settings,
            &SignInAttempt {
                platform: Some(ClientPlatform::Windows),
                ..attempt("198.51.100.1", 10 * MINUTE)
            },
            fr().as_ref(),
            None,
            &observed,
        );
        assert_eq!(
            kinds(&windows),
            vec![(RiskDetectionKind::UnfamiliarFeatures, RiskLevel::Low)]
        );
        // A new country (Lyon is not far, but say it were Belgium): medium.
        let country = detect(
            &settings,
            &attempt("198.51.100.1", 10 * MINUTE),
            Some(&place("BE", LYON)),
            None,
            &observed,
        );
        assert_eq!(
            kinds(&country),
            vec![(RiskDetectionKind::UnfamiliarFeatures, RiskLevel::Medium)]
        );
        // Too little history: nothing is unfamiliar yet.
        let young = detect(
            &settings,
            &attempt("192.0.2.1", 10 * MINUTE),
            None,
            None,
            &Observation {
                history: history[..2].to_vec(),
                ..Observation::default()
            },
        );
        assert!(young.is_empty(), "{young:?}");
    }

    #[test]
    fn networks_are_slash_24_and_slash_48() {
        assert_eq!(network_of(ip("203.0.113.77")).to_string(), "203.0.113.0/24");
        assert_eq!(
            network_of(ip("::ffff:203.0.113.77")).to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            network_of(ip("2001:db8:1:2:3::4")).to_string(),
            "2001:db8:1::/48"
        );
    }
}
