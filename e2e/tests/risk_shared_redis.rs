//! Risk state shared through Redis, end to end: a real control plane, operator, two
//! proxy replicas sharing a `redis-server` of the test's own, a connector and the OpenID
//! provider.
//!
//! A policy blocks sign-ins with high sign-in risk; 4 failures from one IP within the
//! window are high (`--risk-ip-failures 4`). Four sign-ins from 127.0.0.2 fail on proxy
//! A; Alice's sign-in from 127.0.0.2 through proxy B is then blocked (proxy B never saw
//! the failures), while her sign-in through proxy B from 127.0.0.3 goes through.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::StatusCode;
use sallyport_e2e::access::{AccessBed, AccessBedConfig, AccessProxy, app_policy};
use sallyport_e2e::dataplane::StepError;
use sallyport_e2e::risk::{RedisServer, detections, fail_sign_in, sign_in_from};
use sallyport_e2e::sign_in::check;
use serde_json::json;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_seen_by_one_replica_raise_risk_on_another() -> Result<(), StepError> {
    let redis = RedisServer::start().await?;
    let args = [
        "--risk-store",
        redis.url.as_str(),
        "--risk-ip-failures",
        "4",
    ];
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "risk-redis".to_owned(),
            proxies: vec![
                AccessProxy::new("proxy-a", &args),
                AccessProxy::new("proxy-b", &args),
            ],
            assignment: json!({"groups": ["staff"]}),
            policies: vec![app_policy(
                "block-high-sign-in-risk",
                "Enabled",
                json!({"signInRisk": ["high"]}),
                json!({"block": true}),
            )],
        },
    )
    .await?;

    for n in 0..4 {
        let failed = fail_sign_in(&bed, 0, ATTACKER).await?;
        check(
            failed.status == StatusCode::FORBIDDEN,
            format!(
                "failed sign-in {n} on proxy A: {} {}",
                failed.status,
                failed.text()
            ),
        )?;
    }

    let blocked = sign_in_from(&bed, 1, ATTACKER, "alice").await?;
    check(
        blocked.answer.status == StatusCode::FORBIDDEN
            && blocked.answer.text().contains("Access blocked"),
        format!(
            "alice's sign-in from 127.0.0.2 on proxy B: {} {}",
            blocked.answer.status,
            blocked.answer.text()
        ),
    )?;
    let event = bed.logs[1]
        .wait_for("the blocked sign-in in proxy B's sign-in log", |e| {
            e["stage"] == "signIn" && e["clientIp"] == "127.0.0.2"
        })
        .await?;
    check(
        event["decision"] == "blocked"
            && event["signInRisk"] == "high"
            && detections(&event).contains(&"maliciousIpAddress".to_owned()),
        format!("proxy B's log of the blocked sign-in: {event}"),
    )?;

    let elsewhere = sign_in_from(&bed, 1, ELSEWHERE, "alice").await?;
    check(
        elsewhere.answer.status == StatusCode::FOUND && elsewhere.session_cookie.is_some(),
        format!(
            "alice's sign-in from 127.0.0.3 on proxy B: {} {}",
            elsewhere.answer.status,
            elsewhere.answer.text()
        ),
    )?;
    Ok(())
}
