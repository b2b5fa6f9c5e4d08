//! Failed sign-ins raise the sign-in risk of their IP, end to end: a real control plane,
//! operator, proxy, connector and OpenID provider; clients whose sockets are bound to
//! other loopback addresses play users elsewhere.
//!
//! A policy blocks sign-ins with high sign-in risk; the proxy counts 4 failures from one
//! IP within the window as high (`--risk-ip-failures 4`). Alice first signs in from
//! 127.0.0.2 unhindered. Then four sign-ins from 127.0.0.2 come back from the provider
//! with `error=access_denied`; Alice's next sign-in from there is blocked (the sign-in
//! log shows `maliciousIpAddress` and high sign-in risk), while her sign-in from
//! 127.0.0.3 goes through and her session works.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::StatusCode;
use sallyport_e2e::access::{AccessBed, AccessBedConfig, AccessProxy, app_policy, policy_results};
use sallyport_e2e::dataplane::StepError;
use sallyport_e2e::risk::{detections, fail_sign_in, sign_in_from};
use sallyport_e2e::sign_in::check;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_sign_ins_from_an_ip_make_its_sign_ins_high_risk() -> Result<(), StepError> {
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "risk-failures".to_owned(),
            proxies: vec![AccessProxy::new("proxy-a", &["--risk-ip-failures", "4"])],
            assignment: serde_json::json!({"groups": ["staff"]}),
            policies: vec![app_policy(
                "block-high-sign-in-risk",
                "Enabled",
                serde_json::json!({"signInRisk": ["high"]}),
                serde_json::json!({"block": true}),
            )],
        },
    )
    .await?;
    let policy = bed.policy_id("block-high-sign-in-risk");

    // Before any failure, Alice signs in from 127.0.0.2.
    let before = sign_in_from(&bed, 0, ATTACKER, "alice").await?;
    check(
        before.answer.status == StatusCode::FOUND && before.session_cookie.is_some(),
        format!(
            "alice's first sign-in from 127.0.0.2: {} {}",
            before.answer.status,
            before.answer.text()
        ),
    )?;

    // Four sign-ins from 127.0.0.2 that the provider declines.
    for n in 0..4 {
        let failed = fail_sign_in(&bed, 0, ATTACKER).await?;
        check(
            failed.status == StatusCode::FORBIDDEN && failed.text().contains("Sign-in declined"),
            format!("failed sign-in {n}: {} {}", failed.status, failed.text()),
        )?;
    }

    // Now Alice's sign-in from there is blocked...
    let blocked = sign_in_from(&bed, 0, ATTACKER, "alice").await?;
    check(
        blocked.answer.status == StatusCode::FORBIDDEN
            && blocked.answer.text().contains("Access blocked")
            && blocked.session_cookie.is_none(),
        format!(
            "alice's sign-in from 127.0.0.2 after the failures: {} {}",
            blocked.answer.status,
            blocked.answer.text()
        ),
    )?;
    let event = bed.logs[0]
        .wait_for("the blocked sign-in in the sign-in log", |e| {
            e["stage"] == "signIn" && e["decision"] == "blocked" && e["clientIp"] == "127.0.0.2"
        })
        .await?;
    check(
        event["user"] == "alice"
            && event["signInRisk"] == "high"
            && detections(&event).contains(&"maliciousIpAddress".to_owned())
            && policy_results(&event).get(&policy).map(String::as_str) == Some("failure"),
        format!("the sign-in log of the blocked sign-in: {event}"),
    )?;

    // ...while from 127.0.0.3 she signs in, and her session works.
    let elsewhere = sign_in_from(&bed, 0, ELSEWHERE, "alice").await?;
    let cookie = elsewhere.session_cookie.clone().ok_or_else(|| {
        format!(
            "no session from 127.0.0.3: {} {}",
            elsewhere.answer.status,
            elsewhere.answer.text()
        )
    })?;
    let home = bed
        .get(0, ELSEWHERE, "/home", &[("cookie", cookie.as_str())])
        .await?;
    check(
        home.status == StatusCode::OK && home.text().contains("user=alice"),
        format!(
            "alice's session from 127.0.0.3: {} {}",
            home.status,
            home.text()
        ),
    )?;
    let allowed = bed.logs[0]
        .wait_for("the sign-in from 127.0.0.3 in the sign-in log", |e| {
            e["stage"] == "signIn" && e["clientIp"] == "127.0.0.3"
        })
        .await?;
    check(
        allowed["decision"] == "allowed" && allowed["signInRisk"].is_null(),
        format!("the sign-in log of the sign-in from 127.0.0.3: {allowed}"),
    )?;
    Ok(())
}
