//! Conditional access by client IP range, end to end: a real control plane, operator, two
//! proxies, connector, OpenID provider and headless Chromium; clients whose sockets are
//! bound to other loopback addresses play users elsewhere.
//!
//! A policy blocks the app from 127.0.0.2/32. Alice signs in with the browser (from
//! 127.0.0.1); her session cookie, used from 127.0.0.2, gets the 403 "Access blocked"
//! page, and from 127.0.0.1 the app. Proxy B trusts the proxy at 127.0.0.3: a request
//! from there whose `X-Forwarded-For` names 127.0.0.2 is blocked (the sign-in log shows
//! the client as 127.0.0.2), while the same header sent from 127.0.0.1, which is not
//! trusted, is ignored. What the proxy decided, `sallyport-operator whatif` decides too.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::StatusCode;
use sallyport_e2e::access::{
    ALICE_WITH_PASSWORD, AccessBed, AccessBedConfig, AccessProxy, HOME, app_policy, policy_results,
    request_id, session_cookie,
};
use sallyport_e2e::dataplane::{Answer, StepError};
use sallyport_e2e::sign_in::{check, sign_in_at};

const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const FRONT_PROXY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

fn shows(answer: &Answer, status: StatusCode, text: &str) -> bool {
    answer.status == status && answer.text().contains(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_location_policy_blocks_a_session_from_a_blocked_range_and_trusts_only_trusted_proxies()
-> Result<(), StepError> {
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "ca-location".to_owned(),
            proxies: vec![
                AccessProxy::new("proxy-a", &[]),
                AccessProxy::new("proxy-b", &["--trusted-proxy", "127.0.0.3/32"]),
            ],
            assignment: serde_json::json!({"groups": ["staff"]}),
            policies: vec![app_policy(
                "block-elsewhere",
                "Enabled",
                serde_json::json!({"locations": {"include": ["127.0.0.2/32"]}}),
                serde_json::json!({"block": true}),
            )],
        },
    )
    .await?;
    let policy = bed.policy_id("block-elsewhere");

    // Alice signs in from 127.0.0.1: not blocked.
    let browser = bed.browser().await?;
    let landed = sign_in_at(
        &browser,
        &format!("{}home", bed.app_url),
        bed.provider.issuer(),
        "alice",
    )
    .await?;
    check(
        landed.path() == "/home" && browser.page_text().await?.contains("user=alice"),
        format!("alice landed on {landed}"),
    )?;
    let cookie = session_cookie(&browser).await?;
    browser.close().await?;
    let with_cookie = [("cookie", cookie.as_str())];

    // Proxy A: the same session from 127.0.0.2 is blocked, from 127.0.0.1 it is not.
    let blocked = bed.get(0, ELSEWHERE, "/from-2", &with_cookie).await?;
    check(
        shows(&blocked, StatusCode::FORBIDDEN, "Access blocked"),
        format!(
            "from 127.0.0.2 through proxy A: {} {}",
            blocked.status,
            blocked.text()
        ),
    )?;
    let allowed = bed.get(0, HOME, "/from-1", &with_cookie).await?;
    check(
        shows(&allowed, StatusCode::OK, "user=alice"),
        format!(
            "from 127.0.0.1 through proxy A: {} {}",
            allowed.status,
            allowed.text()
        ),
    )?;
    check(
        bed.backend.last_for("/from-2").is_none(),
        "the blocked request reached the backend",
    )?;
    let event = bed.logs[0]
        .wait_for("the block from 127.0.0.2 in proxy A's sign-in log", |e| {
            e["requestId"] == request_id(&blocked).unwrap_or_default().as_str()
        })
        .await?;
    check(
        event["clientIp"] == "127.0.0.2"
            && event["decision"] == "blocked"
            && policy_results(&event).get(&policy).map(String::as_str) == Some("failure"),
        format!("proxy A's log of the block: {event}"),
    )?;

    // Proxy B trusts 127.0.0.3 to name the client; nobody else.
    let forwarded = [
        ("cookie", cookie.as_str()),
        ("x-forwarded-for", "127.0.0.2"),
    ];
    let via_trusted = bed
        .get(1, FRONT_PROXY, "/forwarded-by-3", &forwarded)
        .await?;
    check(
        shows(&via_trusted, StatusCode::FORBIDDEN, "Access blocked"),
        format!(
            "X-Forwarded-For: 127.0.0.2 from the trusted 127.0.0.3: {} {}",
            via_trusted.status,
            via_trusted.text()
        ),
    )?;
    let event = bed.logs[1]
        .wait_for("the forwarded block in proxy B's sign-in log", |e| {
            e["requestId"] == request_id(&via_trusted).unwrap_or_default().as_str()
        })
        .await?;
    check(
        event["clientIp"] == "127.0.0.2" && event["decision"] == "blocked",
        format!("proxy B's log of the forwarded block: {event}"),
    )?;
    let via_untrusted = bed.get(1, HOME, "/forwarded-by-1", &forwarded).await?;
    check(
        shows(&via_untrusted, StatusCode::OK, "user=alice"),
        format!(
            "X-Forwarded-For: 127.0.0.2 from the untrusted 127.0.0.1: {} {}",
            via_untrusted.status,
            via_untrusted.text()
        ),
    )?;
    let trusted_itself = bed
        .get(1, FRONT_PROXY, "/alone-from-3", &with_cookie)
        .await?;
    check(
        shows(&trusted_itself, StatusCode::OK, "user=alice"),
        format!(
            "the trusted 127.0.0.3 without X-Forwarded-For: {} {}",
            trusted_itself.status,
            trusted_itself.text()
        ),
    )?;
    let direct_blocked = bed.get(1, ELSEWHERE, "/direct-2", &with_cookie).await?;
    check(
        shows(&direct_blocked, StatusCode::FORBIDDEN, "Access blocked"),
        format!(
            "from 127.0.0.2 through proxy B: {} {}",
            direct_blocked.status,
            direct_blocked.text()
        ),
    )?;
    check(
        bed.backend.last_for("/forwarded-by-3").is_none()
            && bed.backend.last_for("/direct-2").is_none(),
        "a blocked request reached the backend",
    )?;

    // The what-if tool, asked about the sign-in proxy A just blocked, agrees with it.
    let logged = bed.logs[0]
        .for_request(&request_id(&blocked)?)
        .ok_or("proxy A's log of the block is gone")?;
    let answer = bed.what_if_as_logged(
        &[&ALICE_WITH_PASSWORD[..], &["--ip", "127.0.0.2"]].concat(),
        &logged,
    )?;
    check(
        answer["decision"] == "blocked"
            && answer["decision"] == logged["decision"]
            && policy_results(&answer) == policy_results(&logged),
        format!("whatif answered\n{answer}\nthe proxy logged\n{logged}"),
    )?;
    Ok(())
}
