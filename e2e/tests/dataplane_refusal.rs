//! Registration refusals end to end, with real processes: a connector with a wrong
//! token, and one with another group's token, are refused at registration. The process
//! exits non-zero naming the fleet's reason, saves no state, no Connector object appears
//! and no token use is spent; the same connector with its group's own token registers.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use sallyport_api::Connector;
use sallyport_e2e::dataplane::{Fleet, REACTION_TIMEOUT, StepError, eventually};
use serde_json::json;

type TestResult = Result<(), StepError>;

/// How long a connector refused at registration may take to exit.
const REFUSAL_EXIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_with_a_wrong_or_foreign_token_are_refused() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "refusal",
        &["proxy-a"],
    )
    .await?;
    let alpha = fleet.create_group("alpha", json!({})).await?;
    let beta = fleet.create_group("beta", json!({})).await?;
    let connectors = Api::<Connector>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);

    let cases = [
        ("a wrong token", "not-the-token-of-any-group".to_owned()),
        ("the token of group beta", beta.token.clone()),
    ];
    for (what, token) in &cases {
        let state = tempfile::tempdir()?;
        let mut launch = fleet.connector(&alpha, state.path());
        launch.token = token.as_str();
        launch.capture_output = true;
        let mut connector = launch.start()?;
        let status = connector.wait_for_exit(REFUSAL_EXIT).await.ok_or_else(|| {
            format!(
                "a connector with {what} still runs after {REFUSAL_EXIT:?}: {}",
                connector.output()
            )
        })?;
        let output = connector.output();
        eprintln!("connector with {what}: {status}");
        assert!(
            !status.success(),
            "a connector with {what} exited with {status}"
        );
        assert!(
            output.contains("refused the registration") && output.contains("TokenInvalid"),
            "a connector with {what} says why it stopped: {output}"
        );
        assert!(
            !state.path().join("connector-state.json").exists(),
            "a refused connector saved no state"
        );
    }
    let list = connectors.list(&ListParams::default()).await?;
    assert!(
        list.items.is_empty(),
        "refused connectors left Connector objects: {:?}",
        list.items
            .iter()
            .map(|c| c.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let secrets = Api::<Secret>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);
    for group in ["alpha", "beta"] {
        let uses = secrets
            .get(&format!("{group}-registration"))
            .await?
            .metadata
            .annotations
            .unwrap_or_default()
            .get("sallyport.dev/uses")
            .cloned();
        assert!(
            uses.is_none() || uses.as_deref() == Some("0"),
            "a refused registration spent a use of {group}'s token: {uses:?}"
        );
    }

    // The same connector with alpha's own token registers: the refusals were the tokens'.
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&alpha, state.path()).start()?;
    let registered = eventually("a Connector of alpha", REACTION_TIMEOUT, async || {
        let list = connectors.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().next())
    })
    .await?;
    assert_eq!(registered.spec.connector_group, "alpha");
    Ok(())
}
