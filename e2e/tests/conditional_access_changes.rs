//! Conditional access as policies change under a signed-in user, end to end: a real
//! control plane, operator, proxy, connector, OpenID provider and headless Chromium.
//!
//! Alice signs in. A report-only blocking policy lets her through, and the proxy's
//! sign-in log shows it with `reportOnlyFailure` next to the enforced policy's `success`
//! (and `sallyport-operator whatif` agrees with that line). With a WebSocket and a
//! never-ending download open, the enforced policy is edited to block: within seconds her
//! next request gets 403, the proxy closes the WebSocket and cuts the download, and a new
//! WebSocket is refused. Set back, she is let in again.

use std::path::Path;

use futures::StreamExt as _;
use http::StatusCode;
use http_body_util::BodyExt as _;
use sallyport_e2e::access::{
    ALICE_WITH_PASSWORD, AccessBed, AccessBedConfig, AccessProxy, HOME, app_policy, echo_over,
    open_stream, open_websocket, policy_results, request_id, session_cookie,
};
use sallyport_e2e::dataplane::{REACTION_TIMEOUT, StepError, eventually};
use sallyport_e2e::sign_in::{check, sign_in_at};
use tokio_tungstenite::tungstenite::Error as WsError;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn report_only_policies_are_logged_and_edited_policies_end_open_streams()
-> Result<(), StepError> {
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "ca-changes".to_owned(),
            proxies: vec![AccessProxy::new("proxy-a", &[])],
            assignment: serde_json::json!({"groups": ["staff"]}),
            policies: vec![
                app_policy(
                    "report-block",
                    "ReportOnly",
                    serde_json::json!({}),
                    serde_json::json!({"block": true}),
                ),
                app_policy(
                    "staff-only",
                    "Enabled",
                    serde_json::json!({}),
                    serde_json::json!({"require": {"groups": ["staff"]}}),
                ),
            ],
        },
    )
    .await?;
    let report_block = bed.policy_id("report-block");
    let staff_only = bed.policy_id("staff-only");
    let log = &bed.logs[0];
    let proxy = bed.proxy(0);
    let ca = bed.ca.pem();

    let browser = bed.browser().await?;
    sign_in_at(
        &browser,
        &format!("{}start", bed.app_url),
        bed.provider.issuer(),
        "alice",
    )
    .await?;
    let cookie = session_cookie(&browser).await?;
    browser.close().await?;
    let with_cookie = [("cookie", cookie.as_str())];

    // Report-only: allowed, and logged with the result it would have had.
    let answer = bed.get(0, HOME, "/report", &with_cookie).await?;
    check(
        answer.status == StatusCode::OK && answer.text().contains("user=alice"),
        format!(
            "with a report-only block: {} {}",
            answer.status,
            answer.text()
        ),
    )?;
    let id = request_id(&answer)?;
    let logged = log
        .wait_for("the decision of /report in the sign-in log", |e| {
            e["requestId"] == id.as_str()
        })
        .await?;
    let results = policy_results(&logged);
    let report_entry = logged["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["id"] == report_block.as_str()));
    check(
        logged["stage"] == "request"
            && logged["user"] == "alice"
            && logged["decision"] == "allowed"
            && results.get(&report_block).map(String::as_str) == Some("reportOnlyFailure")
            && report_entry.is_some_and(|p| p["state"] == "reportOnly")
            && results.get(&staff_only).map(String::as_str) == Some("success"),
        format!("the sign-in log line of /report: {logged}"),
    )?;

    // The what-if tool, asked about the same sign-in, agrees with the proxy.
    let answer = bed.what_if_as_logged(
        &[&ALICE_WITH_PASSWORD[..], &["--ip", "127.0.0.1"]].concat(),
        &logged,
    )?;
    check(
        answer["decision"] == logged["decision"] && policy_results(&answer) == results,
        format!("whatif answered\n{answer}\nthe proxy logged\n{logged}"),
    )?;

    // A WebSocket and a download that never ends, both working.
    let mut socket = open_websocket(proxy, &bed.authority, &ca, "/ws", &cookie)
        .await?
        .map_err(|e| format!("the WebSocket handshake: {e}"))?;
    echo_over(&mut socket, "before the change").await?;
    let mut download = open_stream(proxy, &bed.authority, &ca, "/stream", &cookie).await?;
    check(
        download.status == StatusCode::OK,
        format!("the download: {}", download.status),
    )?;
    for _ in 0..2 {
        let frame = tokio::time::timeout(REACTION_TIMEOUT, download.body.frame())
            .await
            .map_err(|_| "no tick of the download in time")?
            .ok_or("the download ended at once")??;
        check(frame.is_data(), "the download sends data")?;
    }

    // The enforced policy now blocks: within seconds the next request is refused.
    bed.patch_policy(
        "staff-only",
        serde_json::json!({"spec": {"grant": {"block": true, "require": null}}}),
    )
    .await?;
    let mut attempt = 0;
    let (refused, refused_path) = eventually(
        "a request refused after the policy blocks",
        REACTION_TIMEOUT,
        async || {
            attempt += 1;
            let path = format!("/after-{attempt}");
            let answer = bed.get(0, HOME, &path, &with_cookie).await?;
            Ok((answer.status == StatusCode::FORBIDDEN).then_some((answer, path)))
        },
    )
    .await?;
    check(
        refused.text().contains("Access blocked"),
        format!("the refusal: {}", refused.text()),
    )?;

    // The open WebSocket is closed by the proxy, the download cut (not ended).
    let closed = tokio::time::timeout(REACTION_TIMEOUT, async {
        loop {
            match socket.next().await {
                None => return "ended".to_owned(),
                Some(Err(error)) => return format!("broken off: {error}"),
                Some(Ok(message)) if message.is_close() => return "closed".to_owned(),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("the WebSocket stayed open {REACTION_TIMEOUT:?} after the block"))?;
    eprintln!("the WebSocket after the block: {closed}");
    let cut = tokio::time::timeout(REACTION_TIMEOUT, async {
        loop {
            match download.body.frame().await {
                None => return Err("the download ended as if complete"),
                Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("the download went on {REACTION_TIMEOUT:?} after the block"))?;
    cut?;
    log.wait_for("the streams' withdrawal in the sign-in log", |e| {
        e["stage"] == "stream" && e["user"] == "alice" && e["decision"] == "blocked"
    })
    .await?;
    match open_websocket(proxy, &bed.authority, &ca, "/ws", &cookie).await? {
        Err(WsError::Http(response)) if response.status() == StatusCode::FORBIDDEN => {}
        Err(error) => return Err(format!("a new WebSocket after the block: {error}").into()),
        Ok(_) => return Err("a new WebSocket was accepted after the block".into()),
    }
    check(
        bed.backend.last_for(&refused_path).is_none(),
        "a blocked request reached the backend",
    )?;

    // Set back: let in again, WebSockets too.
    bed.patch_policy(
        "staff-only",
        serde_json::json!({"spec": {"grant": {"block": false, "require": {"groups": ["staff"]}}}}),
    )
    .await?;
    let again = eventually(
        "a request allowed after the policy is set back",
        REACTION_TIMEOUT,
        async || {
            let answer = bed.get(0, HOME, "/again", &with_cookie).await?;
            Ok((answer.status == StatusCode::OK).then_some(answer))
        },
    )
    .await?;
    check(
        again.text().contains("user=alice"),
        format!("after setting back: {}", again.text()),
    )?;
    let mut socket = open_websocket(proxy, &bed.authority, &ca, "/ws", &cookie)
        .await?
        .map_err(|e| format!("the WebSocket handshake after setting back: {e}"))?;
    echo_over(&mut socket, "after setting back").await?;
    Ok(())
}
