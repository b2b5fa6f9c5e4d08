//! Conditional access asks for MFA by sending the user back to the provider: a real
//! control plane, operator, proxy (`--mfa-acr-value`), connector, OpenID provider and
//! headless Chromium.
//!
//! A policy requires MFA on the app. Alice asks for a deep link and signs in with a
//! password only: the proxy sends her straight back to the provider's login
//! (`prompt=login`, `acr_values` naming the MFA acr); she signs in with MFA and lands on
//! the deep link, which the backend serves. Carol, in another browser, signs in with a
//! password twice: the second time she gets the 403 "Sign-in not strong enough" page
//! rather than a third trip to the provider, and nothing reaches the backend for her.

use std::path::Path;

use sallyport_e2e::access::{
    AccessBed, AccessBedConfig, AccessProxy, MFA_ACR, PASSWORD_ACR, app_policy,
};
use sallyport_e2e::dataplane::StepError;
use sallyport_e2e::sign_in::check;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_sign_in_steps_up_to_mfa_once_and_is_refused_when_still_short()
-> Result<(), StepError> {
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "ca-step-up".to_owned(),
            proxies: vec![AccessProxy::new("proxy-a", &["--mfa-acr-value", MFA_ACR])],
            assignment: serde_json::json!({"users": ["alice", "carol"]}),
            policies: vec![app_policy(
                "require-mfa",
                "Enabled",
                serde_json::json!({}),
                serde_json::json!({"require": {"mfa": true}}),
            )],
        },
    )
    .await?;
    let issuer = bed.provider.issuer().to_owned();
    let on_provider_login = |url: &url::Url| {
        url.as_str().starts_with(&issuer) && url.path().starts_with("/interaction/")
    };

    // Alice: a password only, then straight back to the provider for MFA.
    let browser = bed.browser().await?;
    let deep_link = format!("{}docs/page?x=1#part-2", bed.app_url);
    browser.goto(&deep_link).await?;
    let first_login = browser
        .wait_for_url("the provider's login page", on_provider_login)
        .await?;
    check(
        !browser.has("#acr-values").await?,
        "the first sign-in asked for an acr already",
    )?;
    browser.sign_in("alice", "alice-password", false).await?;
    let second_login = browser
        .wait_for_url("the provider's login page again (step-up)", |url| {
            on_provider_login(url) && url != &first_login
        })
        .await?;
    let requested = browser.text_of("#acr-values").await?;
    check(
        requested.contains(MFA_ACR),
        format!("the step-up asks for {MFA_ACR}: {requested:?} ({second_login})"),
    )?;
    let reasons = browser.text_of("#prompt-reasons").await?;
    check(
        reasons.contains("login_prompt"),
        format!("the step-up forces a login (prompt=login): {reasons:?}"),
    )?;
    check(
        bed.backend.last_for("/docs/page").is_none(),
        "the backend saw the deep link before the step-up",
    )?;
    browser.sign_in("alice", "alice-password", true).await?;
    let landed = browser
        .wait_for_url("back on the app", |url| {
            url.host_str() == Some(sallyport_e2e::access::APP_HOST) && url.path() == "/docs/page"
        })
        .await?;
    check(
        landed.query() == Some("x=1") && landed.fragment() == Some("part-2"),
        format!("landed on {landed}, not the deep link {deep_link}"),
    )?;
    let page = browser.page_text().await?;
    check(
        page.contains("user=alice") && page.contains("target=/docs/page?x=1"),
        format!("the backend's answer: {page}"),
    )?;
    let seen = bed
        .backend
        .last_for("/docs/page")
        .ok_or("the backend never saw the deep link")?;
    check(
        seen.header("x-remote-user") == Some("alice"),
        format!("the backend's request: {:?}", seen.headers),
    )?;
    // The sign-in log: the password sign-in asked to step up, the MFA one was allowed.
    let log = &bed.logs[0];
    let policy = bed.policy_id("require-mfa");
    log.wait_for("alice's password sign-in logged as a step-up", |event| {
        event["stage"] == "signIn"
            && event["user"] == "alice"
            && event["acr"] == PASSWORD_ACR
            && event["decision"] == "stepUp"
    })
    .await?;
    log.wait_for("alice's MFA sign-in logged as allowed", |event| {
        event["stage"] == "signIn"
            && event["user"] == "alice"
            && event["acr"] == MFA_ACR
            && event["decision"] == "allowed"
            && event["policies"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p["id"] == policy && p["result"] == "success")
            })
    })
    .await?;
    browser.close().await?;

    // Carol: a password twice; the second time a clear refusal, no loop.
    let browser = bed.browser().await?;
    browser.goto(&format!("{}carol", bed.app_url)).await?;
    let first_login = browser
        .wait_for_url("the provider's login page", on_provider_login)
        .await?;
    browser.sign_in("carol", "carol-password", false).await?;
    browser
        .wait_for_url("the provider's login page again (step-up)", |url| {
            on_provider_login(url) && url != &first_login
        })
        .await?;
    browser.sign_in("carol", "carol-password", false).await?;
    let refused = browser
        .wait_for_url("back on the app", |url| {
            url.host_str() == Some(sallyport_e2e::access::APP_HOST)
        })
        .await?;
    let title = browser.title().await?;
    let text = browser.page_text().await?;
    check(
        title.contains("Sign-in not strong enough") && text.contains("Sign-in not strong enough"),
        format!("carol's page at {refused}: {title}: {text}"),
    )?;
    check(
        refused.path() == "/.sallyport/callback",
        format!("the refusal is the callback's answer, not another redirect: {refused}"),
    )?;
    // Still there a while later: the refusal is not a page that sends her on again (a
    // redirect or refresh would have left it within milliseconds).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let still = browser.current_url().await?;
    check(
        still == refused,
        format!("the browser moved on from the refusal to {still}"),
    )?;
    let carol_sign_ins = log
        .events()
        .iter()
        .filter(|event| {
            event["stage"] == "signIn" && event["user"] == "carol" && event["decision"] == "stepUp"
        })
        .count();
    check(
        carol_sign_ins == 2,
        format!(
            "carol signed in {carol_sign_ins} times, not twice:\n{}",
            log.dump()
        ),
    )?;
    check(
        bed.backend.last_for("/carol").is_none(),
        "a request of carol's reached the backend",
    )?;
    browser.close().await?;
    Ok(())
}
