//! Session controls on every request of a session: a real control plane, operator,
//! proxy, connector, OpenID provider and headless Chromium.
//!
//! Three policies apply to the app: `watch` monitors every request, `lockdown` allows
//! only reading and blocks downloads, `trial` (ReportOnly) would monitor. Alice signs in
//! in the browser; the app's backend is one of the test's, serving a page with a link to
//! a file, the file itself (`Content-Disposition: attachment`), an octet-stream export
//! and a form.
//!
//! - In the browser the page loads (200, its content visible); following the link to
//!   the file lands on the proxy's "Download blocked" page (a download that got through
//!   would leave the browser on the page instead); a `fetch` POST from the page gets 403.
//! - With Alice's session cookie, five requests: the page, the file, the export, a POST
//!   and a GET of the form. The page and the GET pass; the file and the export are 403
//!   without a byte of theirs; the POST is 403 and the backend never sees a POST.
//! - The proxy's audit stream holds exactly one `session.request` record for each of
//!   the five requests (by request id), with the method, the path without its query,
//!   the status and the bytes the client received; never a body.
//! - The sign-in log shows the controls in force and the report-only one.

use std::path::Path;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kube::api::{Patch, PatchParams};
use sallyport_e2e::access::{
    APP_HOST, APP_NAME, AccessBed, AccessBedConfig, AccessProxy, HOME, connect_from, request_id,
    session_cookie,
};
use sallyport_e2e::dataplane::{Answer, REACTION_TIMEOUT, StepError, eventually};
use sallyport_e2e::echo::{RecordingBackend, SeenRequest};
use sallyport_e2e::sign_in::{check, connect_tls};
use serde_json::{Value, json};

/// What the file's body holds: it must never reach a client.
const FILE_BYTES: &str = "FILE-BYTES-THAT-MUST-NOT-LEAVE";
/// What the page shows.
const PAGE_MARK: &str = "Quarterly figures";

/// The test's app: a page, a file, an export and a form.
fn answer(seen: &SeenRequest, _request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = seen.target.split('?').next().unwrap_or_default();
    let (content_type, disposition, body) = match path {
        "/files/report.zip" => (
            "application/zip",
            Some("attachment; filename=\"report.zip\""),
            FILE_BYTES.repeat(100),
        ),
        "/export.bin" => ("application/octet-stream", None, FILE_BYTES.repeat(10)),
        "/form" => (
            "text/html; charset=utf-8",
            None,
            format!(
                "<!doctype html><title>form</title><p id=\"method\">{}</p>",
                seen.method
            ),
        ),
        _ => (
            "text/html; charset=utf-8",
            None,
            format!(
                "<!doctype html><html><head><title>{PAGE_MARK}</title></head><body>\
                 <h1 id=\"mark\">{PAGE_MARK}</h1>\
                 <a id=\"download\" href=\"/files/report.zip\">report.zip</a>\
                 </body></html>"
            ),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    if let Some(disposition) = disposition {
        headers.insert(
            http::header::CONTENT_DISPOSITION,
            http::HeaderValue::from_static(disposition),
        );
    }
    response
}

fn policy(name: &str, state: &str, session: Value) -> Value {
    json!({
        "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConditionalAccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "state": state,
            "assignments": {"apps": {"names": [APP_NAME]}, "users": {"include": ["*"]}},
            "session": session
        }
    })
}

/// `method path` to the app through the proxy at `bed`'s first replica, with `cookie`.
async fn send(
    bed: &AccessBed,
    method: &str,
    path: &str,
    cookie: &str,
) -> Result<Answer, StepError> {
    let tcp = connect_from(HOME, bed.proxy(0)).await?;
    let tls = connect_tls(tcp, APP_HOST, &bed.ca.pem()).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let body = if method == "POST" { "amount=100" } else { "" };
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, &bed.authority)
        .header(http::header::COOKIE, cookie)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

/// The `session.request` audit records the proxy wrote to its standard output.
fn session_records(bed: &AccessBed) -> Vec<Value> {
    let text = std::fs::read_to_string(bed.logs[0].path()).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| {
            event["schema"] == "sallyport.dev/audit/v1" && event["action"] == "session.request"
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monitored_read_only_sessions_without_downloads() -> Result<(), StepError> {
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "ca-session".to_owned(),
            proxies: vec![AccessProxy::new("proxy-a", &[])],
            assignment: json!({"users": ["alice"]}),
            policies: vec![
                policy("watch", "Enabled", json!({"monitor": true})),
                policy(
                    "lockdown",
                    "Enabled",
                    json!({"readOnly": true, "blockDownloads": true}),
                ),
                policy("trial", "ReportOnly", json!({"monitor": true})),
            ],
        },
    )
    .await?;
    let (watch, lockdown, trial) = (
        bed.policy_id("watch"),
        bed.policy_id("lockdown"),
        bed.policy_id("trial"),
    );

    // The app's backend becomes the test's.
    let backend = RecordingBackend::start(answer).await?;
    let apps = sallyport_e2e::manifests::api_for(
        bed.fleet.bed.client.clone(),
        &bed.fleet.bed.namespace,
        &json!({"apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp"}),
    );
    apps.patch(
        APP_NAME,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"internalUrl": backend.url()}})),
    )
    .await?;

    // Alice signs in; the page loads in the browser.
    let browser = bed.browser().await?;
    browser.goto(&format!("{}page", bed.app_url)).await?;
    let issuer = bed.provider.issuer().to_owned();
    browser
        .wait_for_url("the provider's login page", |url| {
            url.as_str().starts_with(&issuer) && url.path().starts_with("/interaction/")
        })
        .await?;
    browser.sign_in("alice", "alice-password", false).await?;
    browser
        .wait_for_url("back on the app", |url| {
            url.host_str() == Some(APP_HOST) && url.path() == "/page"
        })
        .await?;
    let cookie = session_cookie(&browser).await?;
    // Until the connector follows the new internal URL, the page is the old backend's.
    eventually(
        "the page served by the test's backend",
        REACTION_TIMEOUT,
        async || {
            let page = send(&bed, "GET", "/page", &cookie).await?;
            Ok((page.status == StatusCode::OK && page.text().contains(PAGE_MARK)).then_some(()))
        },
    )
    .await?;
    browser.goto(&format!("{}page", bed.app_url)).await?;
    let text = browser.page_text().await?;
    check(
        text.contains(PAGE_MARK) && browser.has("#download").await?,
        format!("the page in the browser: {text}"),
    )?;

    // The link to the file lands on the block page; browsing goes on.
    browser.click("#download").await?;
    let blocked = browser
        .wait_for_url("the download answered by the block page", |url| {
            url.path() == "/files/report.zip"
        })
        .await?;
    let title = browser.title().await?;
    let text = browser.page_text().await?;
    check(
        title.contains("Download blocked")
            && text.contains(&lockdown)
            && !text.contains(FILE_BYTES),
        format!("the browser at {blocked}: {title}: {text}"),
    )?;
    browser.goto(&format!("{}page", bed.app_url)).await?;
    check(
        browser.page_text().await?.contains(PAGE_MARK),
        "the page after the blocked download",
    )?;
    // A POST from the page's own script is refused.
    let posted = browser
        .fetch(
            &format!("{}form", bed.app_url),
            json!({"method": "POST", "body": "amount=1"}),
        )
        .await?;
    check(
        posted.status == 403 && posted.body.contains("Read-only access"),
        format!("the page's POST: {posted:?}"),
    )?;
    browser.close().await?;

    // Five requests with the session cookie.
    let requests = [
        ("GET", "/page?q=private", StatusCode::OK),
        ("GET", "/files/report.zip", StatusCode::FORBIDDEN),
        ("GET", "/export.bin", StatusCode::FORBIDDEN),
        ("POST", "/form", StatusCode::FORBIDDEN),
        ("GET", "/form", StatusCode::OK),
    ];
    let mut sent = Vec::new();
    for (method, path, status) in requests {
        let answer = send(&bed, method, path, &cookie).await?;
        check(
            answer.status == status,
            format!("{method} {path}: {} {}", answer.status, answer.text()),
        )?;
        check(
            !answer.text().contains(FILE_BYTES),
            format!("{method} {path}: the file's bytes reached the client"),
        )?;
        sent.push((method, path, request_id(&answer)?, answer));
    }
    check(
        sent[3].3.text().contains("Read-only access") && sent[3].3.text().contains(&lockdown),
        format!("the POST's refusal: {}", sent[3].3.text()),
    )?;
    check(
        sent[1].3.text().contains("Download blocked")
            && sent[1]
                .3
                .headers
                .get(http::header::CONTENT_DISPOSITION)
                .is_none(),
        format!(
            "the file's refusal: {:?} {}",
            sent[1].3.headers,
            sent[1].3.text()
        ),
    )?;
    check(
        sent[4].3.text().contains("<p id=\"method\">GET</p>"),
        format!("the GET of the form: {}", sent[4].3.text()),
    )?;
    let posts: Vec<SeenRequest> = backend
        .seen()
        .into_iter()
        .filter(|seen| seen.method != "GET")
        .collect();
    check(
        posts.is_empty(),
        format!("the backend saw requests other than GET: {posts:?}"),
    )?;

    // Exactly one audit record per request, with what was answered.
    let ids: Vec<String> = sent.iter().map(|(_, _, id, _)| id.clone()).collect();
    let records = eventually(
        "a session.request record for each request",
        REACTION_TIMEOUT,
        async || {
            let records = session_records(&bed);
            let all = ids.iter().all(|id| {
                records
                    .iter()
                    .any(|r| r["details"]["requestId"] == id.as_str())
            });
            Ok(all.then_some(records))
        },
    )
    .await?;
    for (method, path, id, answer) in &sent {
        let mine: Vec<&Value> = records
            .iter()
            .filter(|r| r["details"]["requestId"] == id.as_str())
            .collect();
        check(
            mine.len() == 1,
            format!("{method} {path}: {} records: {mine:?}", mine.len()),
        )?;
        let record = mine[0];
        let details = &record["details"];
        let expected_path = path.split('?').next().unwrap_or_default();
        check(
            details["method"] == *method
                && details["path"] == expected_path
                && details["status"] == answer.status.as_u16()
                && details["bytes"] == answer.body.len()
                && details["complete"] == true
                && details["user"] == "alice"
                && details["clientIp"] == "127.0.0.1"
                && details["policies"] == json!([watch])
                && record["object"]["kind"] == "PublishedApp"
                && record["object"]["name"] == APP_NAME,
            format!("{method} {path} ({} bytes): {record}", answer.body.len()),
        )?;
        let refused = answer.status == StatusCode::FORBIDDEN;
        check(
            (record["outcome"] == "refused") == refused,
            format!("{method} {path}: outcome {}", record["outcome"]),
        )?;
        let line = record.to_string();
        check(
            !line.contains("private") && !line.contains(FILE_BYTES) && !line.contains("amount="),
            format!("a record holds a query or a body: {line}"),
        )?;
    }
    let reasons: Vec<&Value> = sent
        .iter()
        .map(|(_, _, id, _)| {
            records
                .iter()
                .find(|r| r["details"]["requestId"] == id.as_str())
                .map_or(&Value::Null, |r| &r["reason"])
        })
        .collect();
    check(
        reasons
            == [
                &Value::Null,
                &json!("DownloadBlocked"),
                &json!("DownloadBlocked"),
                &json!("ReadOnly"),
                &Value::Null,
            ],
        format!("the records' reasons: {reasons:?}"),
    )?;
    // The browser's requests were monitored too: its page load is there.
    check(
        records.iter().any(|r| {
            r["details"]["path"] == "/page"
                && r["details"]["status"] == 200
                && !ids.contains(&r["details"]["requestId"].as_str().unwrap_or("").to_owned())
        }),
        "no record of the browser's page load",
    )?;

    // The sign-in log: the controls in force, and the report-only one.
    bed.logs[0]
        .wait_for("a decision with the session controls", |event| {
            event["user"] == "alice"
                && event["decision"] == "allowed"
                && event["sessionControls"]["monitor"] == json!([watch])
                && event["sessionControls"]["readOnly"] == json!([lockdown])
                && event["sessionControls"]["blockDownloads"] == json!([lockdown])
                && event["reportOnlySessionControls"]["monitor"] == json!([trial])
        })
        .await?;
    Ok(())
}
