//! A signed-in session's user risk follows the risk store between sign-ins, end to end:
//! a real control plane, operator, two proxy replicas sharing a `redis-server` of the
//! test's own, a connector and the OpenID provider.
//!
//! Policies block users with high user risk, and block the app from 127.0.0.4/32 (so that
//! Alice's sign-ins from there are refused: failed sign-ins of a known user). Four
//! failures of a user within the window make the user high risk
//! (`--risk-user-failures 4`), read again at most every second
//! (`--risk-user-refresh 1s`).
//!
//! Alice signs in through proxy A from 127.0.0.2 and uses her session. Four of her
//! sign-ins through proxy B from 127.0.0.4 are then blocked; without signing in again,
//! her existing session on proxy A is blocked within a bounded wait, and proxy A's
//! sign-in log shows the request decided with high user risk.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::StatusCode;
use sallyport_e2e::access::{AccessBed, AccessBedConfig, AccessProxy, app_policy, policy_results};
use sallyport_e2e::dataplane::{REACTION_TIMEOUT, StepError, eventually};
use sallyport_e2e::risk::{RedisServer, sign_in_from};
use sallyport_e2e::sign_in::check;
use serde_json::json;

const HOME_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const BLOCKED_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_sign_ins_raise_the_user_risk_of_an_existing_session() -> Result<(), StepError> {
    let redis = RedisServer::start().await?;
    let args = [
        "--risk-store",
        redis.url.as_str(),
        "--risk-user-failures",
        "4",
        "--risk-user-refresh",
        "1s",
    ];
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "risk-user-fresh".to_owned(),
            proxies: vec![
                AccessProxy::new("proxy-a", &args),
                AccessProxy::new("proxy-b", &args),
            ],
            assignment: json!({"groups": ["staff"]}),
            policies: vec![
                app_policy(
                    "block-high-user-risk",
                    "Enabled",
                    json!({"userRisk": ["high"]}),
                    json!({"block": true}),
                ),
                app_policy(
                    "block-from-127-0-0-4",
                    "Enabled",
                    json!({"locations": {"include": ["127.0.0.4/32"]}}),
                    json!({"block": true}),
                ),
            ],
        },
    )
    .await?;
    let policy = bed.policy_id("block-high-user-risk");

    // Alice signs in through A and uses her session.
    let signed_in = sign_in_from(&bed, 0, HOME_IP, "alice").await?;
    let cookie = signed_in.session_cookie.clone().ok_or_else(|| {
        format!(
            "alice's sign-in through proxy A: {} {}",
            signed_in.answer.status,
            signed_in.answer.text()
        )
    })?;
    for n in 0..3 {
        let home = bed
            .get(0, HOME_IP, "/home", &[("cookie", cookie.as_str())])
            .await?;
        check(
            home.status == StatusCode::OK && home.text().contains("user=alice"),
            format!(
                "alice's session, request {n}: {} {}",
                home.status,
                home.text()
            ),
        )?;
    }

    // Four of her sign-ins through B from a blocked address: failures of the user.
    for n in 0..4 {
        let refused = sign_in_from(&bed, 1, BLOCKED_IP, "alice").await?;
        check(
            refused.answer.status == StatusCode::FORBIDDEN && refused.session_cookie.is_none(),
            format!(
                "alice's sign-in {n} from 127.0.0.4 through proxy B: {} {}",
                refused.answer.status,
                refused.answer.text()
            ),
        )?;
    }

    // Her existing session on A, without a new sign-in, is blocked within a bounded wait.
    eventually(
        "alice's existing session on proxy A blocked",
        REACTION_TIMEOUT,
        async || {
            let home = bed
                .get(0, HOME_IP, "/home", &[("cookie", cookie.as_str())])
                .await?;
            match home.status {
                StatusCode::OK => Ok(None),
                StatusCode::FORBIDDEN if home.text().contains("Access blocked") => Ok(Some(())),
                other => Err(format!("unexpected {other}: {}", home.text()).into()),
            }
        },
    )
    .await?;
    let event = bed.logs[0]
        .wait_for("the blocked request in proxy A's sign-in log", |e| {
            e["stage"] == "request" && e["decision"] == "blocked" && e["clientIp"] == "127.0.0.2"
        })
        .await?;
    check(
        event["user"] == "alice"
            && event["userRisk"] == "high"
            && policy_results(&event).get(&policy).map(String::as_str) == Some("failure"),
        format!("the sign-in log of the blocked request: {event}"),
    )?;
    Ok(())
}
