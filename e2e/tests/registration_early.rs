//! A connector that registers before the proxies have loaded its group (the operator
//! mints a group's token before the compiled configuration holding the group reaches
//! the proxies) is told to come back (503 `GroupNotLoaded`, no use of the token spent),
//! keeps retrying, and registers and serves once the group arrives; a connector started
//! the instant a new group's token appears registers too.
//!
//! The first case is made deterministic: the token Secret is written (as the operator
//! would) before the ConnectorGroup exists, so the proxies cannot know the group while
//! the connector starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use sallyport_api::Connector;
use sallyport_api::registration::{
    EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, MAX_USES_ANNOTATION, TOKEN_KEY, TOKEN_SECRET_TYPE,
    USES_ANNOTATION, token_secret_name,
};
use sallyport_e2e::dataplane::{
    Backend, ConnectorLaunch, FLEET_TUNNEL_HOST, Fleet, REACTION_TIMEOUT, StepError, eventually,
    https_get,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

/// A token Secret for `group` as the operator writes it, before the group exists.
fn token_secret(group: &str, token: &str) -> Secret {
    let now = Timestamp::now();
    let expires_at = now
        .checked_add(SignedDuration::from_hours(1))
        .unwrap_or(now);
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(group)),
            annotations: Some(BTreeMap::from([
                (ISSUED_AT_ANNOTATION.to_owned(), now.to_string()),
                (EXPIRES_AT_ANNOTATION.to_owned(), expires_at.to_string()),
                (MAX_USES_ANNOTATION.to_owned(), "0".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The names of the Connector objects of `group` in the test namespace.
async fn connectors_of(fleet: &Fleet, group: &str) -> Result<Vec<String>, StepError> {
    let connectors = Api::<Connector>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace)
        .list(&Default::default())
        .await?;
    Ok(connectors
        .into_iter()
        .filter(|c| c.spec.connector_group == group)
        .map(|c| c.name_any())
        .collect())
}

/// How to start a connector of group `id` (`namespace/name`) with `token`.
fn launch<'a>(
    fleet: &Fleet,
    fleet_ca: &'a Path,
    id: &'a str,
    token: &'a str,
    state_dir: &'a Path,
    capture_output: bool,
) -> ConnectorLaunch<'a> {
    ConnectorLaunch {
        fleet_addresses: fleet.addresses(),
        tunnel_hostname: FLEET_TUNNEL_HOST,
        fleet_ca,
        group: id,
        token,
        state_dir,
        drain_timeout: "10s",
        capture_output,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_registering_before_its_group_is_loaded_waits_and_joins() -> TestResult {
    let mut fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "early",
        &["proxy-a"],
    )
    .await?;
    // A group made the usual way, for the fleet's CA and a baseline.
    let first = fleet.create_group("first", json!({})).await?;
    let secrets = Api::<Secret>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);

    // The token exists, the group does not: no proxy can know it.
    let token = "early-token-0123456789abcdef0123456789abcdef";
    secrets
        .create(&PostParams::default(), &token_secret("early", token))
        .await?;
    let early_id = format!("{}/early", fleet.bed.namespace);
    let state = tempfile::tempdir()?;
    let mut connector = launch(
        &fleet,
        &first.fleet_ca,
        &early_id,
        token,
        state.path(),
        true,
    )
    .start()?;
    eventually(
        "the connector told the group is not loaded yet, and retrying",
        REACTION_TIMEOUT,
        async || {
            let output = connector.output();
            Ok((output.matches("GroupNotLoaded").count() >= 2).then_some(()))
        },
    )
    .await?;
    assert!(connector.is_running(), "{}", connector.output());
    let uses = secrets
        .get(&token_secret_name("early"))
        .await?
        .annotations()
        .get(USES_ANNOTATION)
        .cloned();
    assert_eq!(uses, None, "waiting spent a use of the token");
    assert_eq!(connectors_of(&fleet, "early").await?, Vec::<String>::new());

    // The group arrives (the operator keeps the valid token): the connector registers
    // on a later attempt and serves.
    sallyport_e2e::manifests::create(
        fleet.bed.client.clone(),
        &fleet.bed.namespace,
        &json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup",
            "metadata": {"name": "early"}, "spec": {}
        }),
    )
    .await?;
    let backend = Backend::start("early-backend").await?;
    let host = "early.registration.test";
    let app_ca = fleet
        .publish_app("early-app", host, &backend.url(), "early")
        .await?;
    let address = fleet.proxies[0].ports.listen;
    eventually(
        "the early connector serving",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(address, host, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(()))
        },
    )
    .await?;
    assert!(connector.is_running(), "{}", connector.output());
    assert_eq!(connectors_of(&fleet, "early").await?.len(), 1);
    let output = connector.output();
    assert!(output.contains("registered"), "{output}");

    // A group applied now and a connector started the instant its token appears.
    sallyport_e2e::manifests::create(
        fleet.bed.client.clone(),
        &fleet.bed.namespace,
        &json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup",
            "metadata": {"name": "instant"}, "spec": {}
        }),
    )
    .await?;
    let instant_token = eventually("the token of group instant", REACTION_TIMEOUT, async || {
        let secret = secrets.get_opt(&token_secret_name("instant")).await?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(TOKEN_KEY))
            .and_then(|t| String::from_utf8(t.0).ok()))
    })
    .await?;
    let instant_id = format!("{}/instant", fleet.bed.namespace);
    let instant_state = tempfile::tempdir()?;
    let mut instant_connector = launch(
        &fleet,
        &first.fleet_ca,
        &instant_id,
        &instant_token,
        instant_state.path(),
        false,
    )
    .start()?;
    eventually(
        "the instant connector registered",
        REACTION_TIMEOUT,
        async || Ok((connectors_of(&fleet, "instant").await?.len() == 1).then_some(())),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        instant_connector.is_running(),
        "the instant connector exited"
    );
    for proxy in &mut fleet.proxies {
        assert!(proxy.process.is_running(), "proxy {} exited", proxy.name);
    }
    Ok(())
}
