//! OpenID Connect sign-in failures end to end, with the real provider and browser: each
//! gets a clear page naming its category, the request id and the time, and leaks nothing
//! secret. Covered: an unreachable provider, a callback whose state this browser never
//! started (forged or replayed), a sign-in the user declined, an open-redirect attempt
//! through the return target (the user lands on the app, never elsewhere), signing-key
//! rotation at the provider (new keys are fetched, nobody is locked out), and a session
//! that ends when its ID token does.

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sallyport_e2e::browser::{Browser, BrowserConfig};
use sallyport_e2e::dataplane::{
    Fleet, REACTION_TIMEOUT, StepError, eventually, free_port, https_get,
};
use sallyport_e2e::echo::EchoBackend;
use sallyport_e2e::sign_in::{check, get, start_provider, start_proxies};
use sallyport_e2e::test_ca::TestCa;

const APP_HOST: &str = "wiki.sallyport.test";
const DEAD_HOST: &str = "dead.sallyport.test";

fn oidc_app(
    app_url: &str,
    backend: &EchoBackend,
    issuer: &str,
    tls_secret: &str,
) -> serde_json::Value {
    serde_json::json!({
        "externalUrl": app_url,
        "internalUrl": backend.url(),
        "connectorGroup": {"name": "dc"},
        "tls": {"secretName": tls_secret},
        "preAuthentication": {"type": "OIDC", "oidc": {
            "issuerUrl": issuer,
            "clientId": "wiki",
            "clientSecretRef": {"name": "wiki-oidc", "key": "client-secret"},
            "scopes": ["openid", "profile", "email"]
        }},
        "identity": {"headers": [{"name": "X-Remote-User", "claim": "preferred_username"}]}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_in_failures_get_clear_pages_and_never_leave_the_apps_origin() -> Result<(), StepError>
{
    let ca = TestCa::new("Sallyport e2e sign-in failures CA")?;
    let mut fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "oidcfail",
        &[],
    )
    .await?;
    start_proxies(&mut fleet, &ca, &["proxy-a"]).await?;
    let a = fleet.proxies[0].ports.listen;
    let authority = format!("{APP_HOST}:{}", a.port());
    let app_url = format!("https://{authority}/");
    let dead_authority = format!("{DEAD_HOST}:{}", a.port());
    let provider = start_provider(&ca, &app_url).await?;

    let namespace = fleet.bed.namespace.clone();
    let secrets = Api::<Secret>::namespaced(fleet.bed.client.clone(), &namespace);
    for (name, host) in [("wiki-tls", APP_HOST), ("dead-tls", DEAD_HOST)] {
        let certificate = ca.issue_server(&[host])?;
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": certificate.cert_pem, "tls.key": certificate.key_pem},
        }))?;
        secrets.create(&Default::default(), &secret).await?;
    }
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "wiki-oidc"},
        "stringData": {"client-secret": "wiki-client-secret"},
    }))?;
    secrets.create(&Default::default(), &secret).await?;
    let group = fleet.create_group("dc", serde_json::json!({})).await?;
    let backend = EchoBackend::start().await?;
    // A provider nobody listens on: the port was free a moment ago.
    let dead_issuer = format!("https://127.0.0.1:{}/", free_port()?);
    for (name, url, issuer, tls) in [
        (
            "wiki",
            app_url.clone(),
            provider.issuer().to_owned(),
            "wiki-tls",
        ),
        (
            "dead",
            format!("https://{dead_authority}/"),
            dead_issuer,
            "dead-tls",
        ),
    ] {
        sallyport_e2e::manifests::create(
            fleet.bed.client.clone(),
            &namespace,
            &serde_json::json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
                "metadata": {"name": name},
                "spec": oidc_app(&url, &backend, &issuer, tls),
            }),
        )
        .await?;
    }
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&group, state.path()).start()?;
    let probe_ca = fleet
        .publish_app("probe", "probe.sallyport.test", &backend.url(), "dc")
        .await?;
    eventually(
        "the connector carrying requests",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(a, "probe.sallyport.test", &probe_ca, "/probe").await?;
            Ok((answer.status == StatusCode::OK).then_some(()))
        },
    )
    .await?;
    eventually("both OIDC apps routed", REACTION_TIMEOUT, async || {
        let wiki = get(a, APP_HOST, &authority, &ca.pem(), "/", &[]).await?;
        let dead = get(a, DEAD_HOST, &dead_authority, &ca.pem(), "/", &[]).await?;
        Ok(
            (wiki.status == StatusCode::UNAUTHORIZED && dead.status == StatusCode::UNAUTHORIZED)
                .then_some(()),
        )
    })
    .await?;

    // An unreachable provider: 502, the category, the request id, the time; no secret.
    let answer = get(
        a,
        DEAD_HOST,
        &dead_authority,
        &ca.pem(),
        "/.sallyport/sign-in?return=%2F",
        &[],
    )
    .await?;
    let request_id = answer
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = answer.text();
    check(
        answer.status == StatusCode::BAD_GATEWAY
            && text.contains("identity provider unreachable")
            && !request_id.is_empty()
            && text.contains(&request_id)
            && text.contains("T")
            && !text.contains("wiki-client-secret"),
        format!("unreachable provider: {} {text}", answer.status),
    )?;

    // A callback this browser never started: 400, no session.
    let answer = get(
        a,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/.sallyport/callback?state=forged-state&code=stolen-code",
        &[],
    )
    .await?;
    check(
        answer.status == StatusCode::BAD_REQUEST
            && answer.text().contains("not started here")
            && answer
                .headers
                .get_all("set-cookie")
                .iter()
                .all(|c| !String::from_utf8_lossy(c.as_bytes()).starts_with("__Host-sallyport=")),
        format!("forged callback: {} {}", answer.status, answer.text()),
    )?;

    let browser = Browser::start(
        &BrowserConfig::default()
            .trust_ca("sallyport-e2e", &ca.pem())
            .resolve(APP_HOST, "127.0.0.1"),
    )
    .await?;

    // The user declines at the provider: the provider sends `error=access_denied` back
    // with the state of the sign-in this browser started.
    browser.goto(&format!("{app_url}declined")).await?;
    browser
        .wait_for_url("the provider's login page", |url| {
            url.as_str().starts_with(provider.issuer())
        })
        .await?;
    browser.click("#cancel").await?;
    browser
        .wait_for_url("back on the app's callback", |url| {
            url.path() == "/.sallyport/callback"
        })
        .await?;
    let text = browser.page_text().await?;
    check(
        text.contains("Sign-in declined"),
        format!("declined sign-in page: {text}"),
    )?;
    check(
        backend.last_for("/declined").is_none(),
        "a declined sign-in reached the backend",
    )?;

    // An open-redirect attempt: the return target leaves the app's origin, so the user
    // lands on the app's root instead.
    browser
        .goto(&format!(
            "{app_url}.sallyport/sign-in?return=%2F%2Fevil.example%2Fsteal"
        ))
        .await?;
    browser
        .wait_for_url("the provider's login page", |url| {
            url.as_str().starts_with(provider.issuer())
        })
        .await?;
    browser.sign_in("alice", "alice-password", false).await?;
    let landed = browser
        .wait_for_url("back on the app", |url| url.host_str() != Some("127.0.0.1"))
        .await?;
    check(
        landed.host_str() == Some(APP_HOST) && landed.path() == "/",
        format!("the return target left the app: {landed}"),
    )?;

    // The provider rotates its signing keys and retires the old ones: the next sign-in's
    // token names a new key, which the proxy fetches (at most one fetch per 10 s).
    provider.rotate_keys().await?;
    provider.retire_old_keys().await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    // Short ID tokens from now on: the session must end with its token.
    provider
        .set_token_ttl(Duration::from_secs(8), Duration::from_secs(8))
        .await?;
    browser
        .goto(&format!("{app_url}.sallyport/sign-out"))
        .await?;
    browser.goto(&format!("{app_url}rotated")).await?;
    browser
        .wait_for_url("the provider's login page or the app", |url| {
            url.as_str().starts_with(provider.issuer()) || url.path() == "/rotated"
        })
        .await?;
    if browser
        .current_url()
        .await?
        .as_str()
        .starts_with(provider.issuer())
    {
        browser.sign_in("alice", "alice-password", false).await?;
    }
    browser
        .wait_for_url("back on the app", |url| url.path() == "/rotated")
        .await?;
    check(
        backend
            .last_for("/rotated")
            .is_some_and(|r| r.header("x-remote-user") == Some("alice")),
        "sign-in after key rotation did not reach the backend as alice",
    )?;
    let cookie = browser
        .cookies()
        .await?
        .into_iter()
        .find(|c| c.name == "__Host-sallyport")
        .ok_or("no session after rotation")?;
    let cookie = format!("__Host-sallyport={}", cookie.value);
    let fresh = get(
        a,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/fresh",
        &[("cookie", &cookie)],
    )
    .await?;
    check(
        fresh.status == StatusCode::OK,
        format!("fresh session: {}", fresh.status),
    )?;
    // The ID token lived 8 s; the session does not outlive it (60 s clock skew is for
    // validation only, never added to the session).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let expired = get(
        a,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/expired",
        &[("cookie", &cookie)],
    )
    .await?;
    check(
        expired.status == StatusCode::UNAUTHORIZED && backend.last_for("/expired").is_none(),
        format!(
            "a session past its token's expiry: {} {}",
            expired.status,
            expired.text()
        ),
    )?;
    browser.close().await?;
    Ok(())
}
