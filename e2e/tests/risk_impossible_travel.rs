//! Impossible travel, end to end: a real control plane, operator, proxy, connector and
//! OpenID provider, and a GeoIP database in MaxMind's format that the test writes, which
//! places 127.0.0.2 in Paris and 127.0.0.3 in Tokyo.
//!
//! A policy blocks sign-ins with medium or high sign-in risk. Alice signs in from
//! 127.0.0.2 (Paris); a moment later her sign-in from 127.0.0.3 (Tokyo, 9700 km away)
//! is impossible travel: blocked, and the sign-in log says `impossibleTravel`. Carol,
//! with no sign-in before, signs in from Tokyo unhindered.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::StatusCode;
use ipnet::IpNet;
use sallyport_e2e::access::{AccessBed, AccessBedConfig, AccessProxy, app_policy};
use sallyport_e2e::dataplane::StepError;
use sallyport_e2e::risk::{detections, sign_in_from};
use sallyport_e2e::sign_in::check;
use serde_json::json;

const PARIS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const TOKYO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A City database in GeoLite2's layout: 127.0.0.2 in Paris, 127.0.0.3 in Tokyo.
fn geoip_database(path: &Path) -> Result<(), StepError> {
    let mut writer = mmdb_writer::Writer::new("Sallyport-Test-City");
    let cities = [
        ("127.0.0.2/32", "Paris", "FR", 48.8566, 2.3522),
        ("127.0.0.3/32", "Tokyo", "JP", 35.6762, 139.6503),
    ];
    for (network, city, country, latitude, longitude) in cities {
        let network: IpNet = network.parse()?;
        writer.insert(
            network,
            &json!({
                "city": {"names": {"en": city}},
                "country": {"iso_code": country},
                "location": {"latitude": latitude, "longitude": longitude},
            }),
        )?;
    }
    std::fs::write(path, writer.to_bytes()?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sign_in_too_far_from_the_last_one_is_impossible_travel() -> Result<(), StepError> {
    let geoip = tempfile::tempdir()?;
    let database = geoip.path().join("city.mmdb");
    geoip_database(&database)?;
    let database = database.display().to_string();
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "risk-travel".to_owned(),
            proxies: vec![AccessProxy::new(
                "proxy-a",
                &["--geoip-database", &database],
            )],
            assignment: json!({}),
            policies: vec![app_policy(
                "block-risky-sign-ins",
                "Enabled",
                json!({"signInRisk": ["medium", "high"]}),
                json!({"block": true}),
            )],
        },
    )
    .await?;

    let paris = sign_in_from(&bed, 0, PARIS, "alice").await?;
    check(
        paris.answer.status == StatusCode::FOUND && paris.session_cookie.is_some(),
        format!(
            "alice's sign-in from Paris: {} {}",
            paris.answer.status,
            paris.answer.text()
        ),
    )?;

    let tokyo = sign_in_from(&bed, 0, TOKYO, "alice").await?;
    check(
        tokyo.answer.status == StatusCode::FORBIDDEN
            && tokyo.answer.text().contains("Access blocked")
            && tokyo.session_cookie.is_none(),
        format!(
            "alice's sign-in from Tokyo moments later: {} {}",
            tokyo.answer.status,
            tokyo.answer.text()
        ),
    )?;
    let event = bed.logs[0]
        .wait_for("alice's sign-in from Tokyo in the sign-in log", |e| {
            e["stage"] == "signIn" && e["user"] == "alice" && e["clientIp"] == "127.0.0.3"
        })
        .await?;
    let detail = event["riskDetections"][0]["detail"]
        .as_str()
        .unwrap_or_default();
    check(
        event["decision"] == "blocked"
            && event["signInRisk"] == "medium"
            && detections(&event) == vec!["impossibleTravel".to_owned()]
            && detail.contains("Tokyo")
            && detail.contains("Paris"),
        format!("the sign-in log of the sign-in from Tokyo: {event}"),
    )?;

    // Carol has not signed in from anywhere else: Tokyo is fine for her.
    let carol = sign_in_from(&bed, 0, TOKYO, "carol").await?;
    check(
        carol.answer.status == StatusCode::FOUND && carol.session_cookie.is_some(),
        format!(
            "carol's sign-in from Tokyo: {} {}",
            carol.answer.status,
            carol.answer.text()
        ),
    )?;
    let event = bed.logs[0]
        .wait_for("carol's sign-in in the sign-in log", |e| {
            e["stage"] == "signIn" && e["user"] == "carol"
        })
        .await?;
    check(
        event["decision"] == "allowed" && detections(&event).is_empty(),
        format!("the sign-in log of carol's sign-in: {event}"),
    )?;
    Ok(())
}
