//! Connector objects with the operator as a real process: an unseen connector is removed
//! after its group's inactiveConnectorTTL, and a deleted connector lands in the revocation
//! list with its certificate's serial.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sallyport_api::{Connector, ConnectorGroup};
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::process::start_operator;
use sallyport_e2e::testbed::Testbed;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const REACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `probe` until it yields a value, for at most [`REACTION_TIMEOUT`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + REACTION_TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what} did not happen within {REACTION_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn revocation(list: Option<&ConfigMap>, key: &str) -> Option<Value> {
    let text = list?.data.as_ref()?.get(key)?;
    serde_json::from_str(text).ok()
}

#[tokio::test]
async fn unseen_connectors_expire_and_deleted_ones_are_revoked() -> TestResult {
    let Testbed {
        control_plane: _,
        client,
        operator_namespace,
        namespace,
        operator_kubeconfig,
    } = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "network",
    )
    .await?;
    let _operator = start_operator(&operator_kubeconfig, &operator_namespace, &[])?;
    let pp = PostParams::default();
    let groups = Api::<ConnectorGroup>::namespaced(client.clone(), &namespace);
    let connectors = Api::<Connector>::namespaced(client.clone(), &namespace);
    let revocations = Api::<ConfigMap>::namespaced(client.clone(), &operator_namespace);
    let group = |name: &str, ttl: &str| {
        serde_yaml::from_str::<ConnectorGroup>(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: {name}}}\nspec: {{inactiveConnectorTTL: {ttl}}}\n"
        ))
    };
    let connector = |name: &str, group: &str| {
        serde_yaml::from_str::<Connector>(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {{name: {name}}}\nspec: {{connectorGroup: {group}}}\n"
        ))
    };

    // A connector never seen again is removed once its group's TTL has passed.
    groups.create(&pp, &group("short-lived", "3s")?).await?;
    connectors
        .create(&pp, &connector("stale", "short-lived")?)
        .await?;
    eventually("the stale connector's removal", || async {
        connectors
            .get_opt("stale")
            .await
            .ok()
            .and_then(|c| c.is_none().then_some(()))
    })
    .await?;
    let events = Api::<Event>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ConnectorExpired")),
        "no ConnectorExpired Event"
    );
    let list = revocations.get_opt("sallyport-revoked-connectors").await?;
    assert!(
        revocation(list.as_ref(), &format!("{namespace}.stale")).is_some(),
        "stale not revoked: {list:?}"
    );

    // Deleting a connector revokes its certificate.
    groups.create(&pp, &group("long-lived", "240h")?).await?;
    connectors
        .create(&pp, &connector("retired", "long-lived")?)
        .await?;
    let certificate = json!({"status": {
        "lastSeen": k8s_openapi::jiff::Timestamp::now().to_string(),
        "certificate": {"serial": "0abc", "issuedAt": "2026-11-01T00:00:00Z", "notAfter": "2099-01-01T00:00:00Z"},
    }});
    connectors
        .patch_status(
            "retired",
            &PatchParams::default(),
            &Patch::Merge(&certificate),
        )
        .await?;
    eventually("the revocation finalizer", || async {
        let c = connectors.get_opt("retired").await.ok().flatten()?;
        c.metadata
            .finalizers
            .as_ref()?
            .iter()
            .any(|f| f == "sallyport.dev/revoke-connector")
            .then_some(())
    })
    .await?;
    connectors
        .delete("retired", &DeleteParams::default())
        .await?;
    let entry = eventually("the revocation entry", || async {
        let list = revocations
            .get_opt("sallyport-revoked-connectors")
            .await
            .ok()
            .flatten();
        revocation(list.as_ref(), &format!("{namespace}.retired"))
    })
    .await?;
    assert_eq!(entry["serial"], "0abc");
    assert_eq!(entry["notAfter"], "2099-01-01T00:00:00Z");
    eventually("the retired connector's removal", || async {
        connectors
            .get_opt("retired")
            .await
            .ok()
            .and_then(|c| c.is_none().then_some(()))
    })
    .await?;
    Ok(())
}
