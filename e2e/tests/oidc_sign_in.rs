//! OpenID Connect pre-authentication end to end: the real control plane and operator, two
//! proxy replicas and a connector as real processes, a real OpenID provider
//! (`oidc-provider` on Node.js), a real backend and a real headless Chromium.
//!
//! A user asks for a deep link with a query and a `#fragment`, signs in at the provider,
//! and lands on exactly that URL; the backend sees the mapped identity headers and an
//! ES256 assertion that verifies against the fleet's JWKS, never Sallyport's cookie, never
//! a client-sent identity header. The session opens on the other replica too (state lives
//! in the browser). A tampered cookie is simply absent (sign-in again, not an error), a
//! script gets 401 with a JSON body naming the sign-in URL, a user outside the app's
//! assignment gets a clear 403, a user with 200 groups gets a cookie under 4 KB, and
//! sign-out ends the session here and at the provider.

use std::path::Path;

use http::StatusCode;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sallyport_e2e::browser::{Browser, BrowserConfig};
use sallyport_e2e::dataplane::{
    FLEET_TUNNEL_HOST, Fleet, REACTION_TIMEOUT, StepError, eventually, https_get,
};
use sallyport_e2e::echo::EchoBackend;
use sallyport_e2e::sign_in::{check, get, sign_in_at, sign_out, start_provider, start_proxies};
use sallyport_e2e::test_ca::TestCa;

const APP_HOST: &str = "wiki.sallyport.test";
const SESSION_COOKIE: &str = "__Host-sallyport";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_sign_in_with_a_real_provider_and_backends_see_only_the_proxys_identity()
-> Result<(), StepError> {
    let ca = TestCa::new("Sallyport e2e sign-in CA")?;
    let mut fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "oidc",
        &[],
    )
    .await?;
    start_proxies(&mut fleet, &ca, &["proxy-a", "proxy-b"]).await?;
    let (a, b) = (fleet.proxies[0].ports.listen, fleet.proxies[1].ports.listen);
    let authority = format!("{APP_HOST}:{}", a.port());
    let app_url = format!("https://{authority}/");

    let provider = start_provider(&ca, &app_url).await?;

    // The app: its certificate from the test CA the browser trusts, its client secret in
    // a Secret, staff and group-199 assigned, two claim headers and the assertion.
    let namespace = fleet.bed.namespace.clone();
    let secrets = Api::<Secret>::namespaced(fleet.bed.client.clone(), &namespace);
    let certificate = ca.issue_server(&[APP_HOST])?;
    for (name, type_, data) in [
        (
            "wiki-tls",
            "kubernetes.io/tls",
            vec![
                ("tls.crt", certificate.cert_pem.clone()),
                ("tls.key", certificate.key_pem.clone()),
            ],
        ),
        (
            "wiki-oidc",
            "Opaque",
            vec![("client-secret", "wiki-client-secret".to_owned())],
        ),
    ] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "type": type_,
            "stringData": data.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        }))?;
        secrets.create(&Default::default(), &secret).await?;
    }
    let group = fleet.create_group("dc", serde_json::json!({})).await?;
    let backend = EchoBackend::start().await?;
    sallyport_e2e::manifests::create(
        fleet.bed.client.clone(),
        &namespace,
        &serde_json::json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
            "metadata": {"name": "wiki"},
            "spec": {
                "externalUrl": app_url,
                "internalUrl": backend.url(),
                "connectorGroup": {"name": "dc"},
                "tls": {"secretName": "wiki-tls"},
                "preAuthentication": {"type": "OIDC", "oidc": {
                    "issuerUrl": provider.issuer(),
                    "clientId": "wiki",
                    "clientSecretRef": {"name": "wiki-oidc", "key": "client-secret"},
                    "scopes": ["openid", "profile", "email", "groups"]
                }},
                "assignment": {"groups": ["staff", "group-199"]},
                "identity": {
                    "headers": [
                        {"name": "X-Remote-User", "claim": "preferred_username"},
                        {"name": "X-Remote-Groups", "claim": "groups"}
                    ],
                    "signedAssertion": {"enabled": true}
                }
            }
        }),
    )
    .await?;
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&group, state.path()).start()?;
    // Routed (the proxy asks for sign-in) and carried (a connector is connected).
    eventually(
        "the app asking for sign-in on both replicas",
        REACTION_TIMEOUT,
        async || {
            for address in [a, b] {
                let answer = get(address, APP_HOST, &authority, &ca.pem(), "/", &[]).await?;
                if answer.status != StatusCode::UNAUTHORIZED {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    // A passthrough app on the same group shows when the connector carries requests.
    let probe_ca = fleet
        .publish_app("probe", "probe.sallyport.test", &backend.url(), "dc")
        .await?;
    eventually(
        "the connector carrying requests of both replicas",
        REACTION_TIMEOUT,
        async || {
            for address in [a, b] {
                let answer =
                    https_get(address, "probe.sallyport.test", &probe_ca, "/probe").await?;
                if answer.status != StatusCode::OK {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;

    // A script without a session: 401 with JSON naming the sign-in URL, no redirect.
    let scripted = get(
        a,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/api/items?x=1",
        &[("sec-fetch-mode", "cors")],
    )
    .await?;
    check(
        scripted.status == StatusCode::UNAUTHORIZED,
        format!(
            "a script without a session: {} {}",
            scripted.status,
            scripted.text()
        ),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&scripted.body)?;
    check(
        json["signInUrl"]
            == serde_json::Value::String(format!(
                "{app_url}.sallyport/sign-in?return=/api/items%3Fx%3D1"
            )),
        format!("the 401 names the sign-in URL: {json}"),
    )?;

    // The browser asks for a deep link, signs in, and lands on exactly that link.
    let browser = Browser::start(
        &BrowserConfig::default()
            .trust_ca("sallyport-e2e", &ca.pem())
            .resolve(APP_HOST, "127.0.0.1"),
    )
    .await?;
    browser
        .goto(&format!("{app_url}docs/page?x=1&y=two#section-3"))
        .await?;
    browser
        .wait_for_url("the provider's login page", |url| {
            url.as_str().starts_with(provider.issuer())
        })
        .await?;
    browser.sign_in("alice", "alice-password", false).await?;
    let landed = browser
        .wait_for_url("back on the app", |url| url.host_str() == Some(APP_HOST))
        .await?;
    check(
        landed.path() == "/docs/page"
            && landed.query() == Some("x=1&y=two")
            && landed.fragment() == Some("section-3"),
        format!("landed on {landed}, not the deep link asked for"),
    )?;
    let page = browser.page_text().await?;
    check(
        page.contains("x-remote-user: alice")
            && page.contains("x-remote-groups: staff,engineering"),
        format!("the backend's page shows the identity headers:\n{page}"),
    )?;

    // What reached the backend: identity headers, a verifiable assertion, no Sallyport
    // cookie.
    let seen = backend
        .last_for("/docs/page")
        .ok_or("the backend never saw /docs/page")?;
    check(
        seen.headers
            .get_all(http::header::COOKIE)
            .iter()
            .all(|c| !String::from_utf8_lossy(c.as_bytes()).contains("sallyport")),
        format!("Sallyport's cookie reached the backend: {:?}", seen.headers),
    )?;
    let jwks = get(
        a,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/.sallyport/jwks.json",
        &[],
    )
    .await?;
    check(
        jwks.status == StatusCode::OK,
        format!("JWKS: {}", jwks.status),
    )?;
    let jwks: JwkSet = serde_json::from_slice(&jwks.body)?;
    let verify = |token: &str| -> Result<serde_json::Value, StepError> {
        let header = jsonwebtoken::decode_header(token)?;
        let kid = header.kid.ok_or("the assertion has no kid")?;
        let jwk = jwks
            .find(&kid)
            .ok_or("the assertion's kid is not in the JWKS")?;
        let mut validation = Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&[app_url.as_str()]);
        validation.set_issuer(&[format!("https://{FLEET_TUNNEL_HOST}")]);
        Ok(jsonwebtoken::decode::<serde_json::Value>(
            token,
            &DecodingKey::from_jwk(jwk)?,
            &validation,
        )?
        .claims)
    };
    let assertion = seen
        .header("x-sallyport-assertion")
        .ok_or("no assertion reached the backend")?;
    let claims = verify(assertion)?;
    check(
        claims["sub"] == "alice" && claims["preferred_username"] == "alice",
        format!("assertion claims: {claims}"),
    )?;

    // A script of the page sends its own identity headers: they are replaced.
    let fetched = browser
        .fetch(
            "/docs/other",
            serde_json::json!({"headers": {"X-Remote-User": "mallory", "X-Sallyport-Assertion": "forged"}}),
        )
        .await?;
    check(
        fetched.status == 200,
        format!("fetch with a session: {fetched:?}"),
    )?;
    let seen = backend
        .last_for("/docs/other")
        .ok_or("the backend never saw /docs/other")?;
    check(
        seen.header("x-remote-user") == Some("alice")
            && seen.headers.get_all("x-remote-user").iter().count() == 1,
        format!("a client-sent X-Remote-User survived: {:?}", seen.headers),
    )?;
    verify(seen.header("x-sallyport-assertion").ok_or("no assertion")?)?;

    // The session cookie: host-bound, HttpOnly, Secure, a browser-session cookie.
    let cookies = browser.cookies().await?;
    let session = cookies
        .iter()
        .find(|c| c.name == SESSION_COOKIE)
        .ok_or_else(|| format!("no {SESSION_COOKIE} cookie: {cookies:?}"))?;
    check(
        session.secure
            && session.http_only
            && session.path.as_deref() == Some("/")
            && session.expires.is_none(),
        format!("session cookie attributes: {session:?}"),
    )?;
    check(
        !cookies.iter().any(|c| c.name.contains("-tx-")),
        format!("the sign-in transaction cookie stayed: {cookies:?}"),
    )?;

    // The other replica opens the same session: state lives in the browser.
    let cookie = format!("{SESSION_COOKIE}={}", session.value);
    let on_b = get(
        b,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/docs/b",
        &[("cookie", &cookie)],
    )
    .await?;
    check(
        on_b.status == StatusCode::OK && on_b.text().contains("x-remote-user: alice"),
        format!(
            "replica B with replica A's session: {} {}",
            on_b.status,
            on_b.text()
        ),
    )?;

    // A tampered cookie is absent: sign in again, never an error.
    let mut tampered = session.value.clone().into_bytes();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{SESSION_COOKIE}={}", String::from_utf8(tampered)?);
    let answer = get(
        a,
        APP_HOST,
        &authority,
        &ca.pem(),
        "/docs/t",
        &[("cookie", &tampered)],
    )
    .await?;
    check(
        answer.status == StatusCode::UNAUTHORIZED && answer.text().contains("Signing you in"),
        format!("a tampered cookie: {} {}", answer.status, answer.text()),
    )?;
    check(
        backend.last_for("/docs/t").is_none(),
        "a request with a tampered cookie reached the backend",
    )?;

    // Sign-out ends the session here and at the provider.
    let signed_out = sign_out(&browser, &app_url, provider.issuer()).await?;
    let text = browser.page_text().await?;
    check(text.contains("signed out"), format!("{signed_out}: {text}"))?;
    check(
        !browser
            .cookies()
            .await?
            .iter()
            .any(|c| c.name == SESSION_COOKIE),
        "the session cookie outlived sign-out",
    )?;

    // Carol is not assigned: a clear 403 after signing in.
    sign_in_at(&browser, &app_url, provider.issuer(), "carol").await?;
    let text = browser.page_text().await?;
    check(
        text.contains("carol is not assigned"),
        format!("carol's page: {text}"),
    )?;

    // Bob has 200 groups: his cookie stays under 4 KB and keeps the assigned group.
    sign_out(&browser, &app_url, provider.issuer()).await?;
    let landed = sign_in_at(&browser, &format!("{app_url}bob"), provider.issuer(), "bob").await?;
    check(landed.path() == "/bob", format!("bob landed on {landed}"))?;
    let cookies = browser.cookies().await?;
    let session = cookies
        .iter()
        .find(|c| c.name == SESSION_COOKIE)
        .ok_or("bob has no session cookie")?;
    check(
        session.name.len() + session.value.len() < 4000,
        format!("bob's cookie is {} bytes", session.value.len()),
    )?;
    let seen = backend
        .last_for("/bob")
        .ok_or("the backend never saw /bob")?;
    check(
        seen.header("x-remote-user") == Some("bob")
            && seen
                .header("x-remote-groups")
                .is_some_and(|g| g.split(',').any(|g| g == "group-199")),
        format!("bob's headers: {:?}", seen.headers),
    )?;
    browser.close().await?;
    Ok(())
}
