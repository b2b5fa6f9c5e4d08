//! A ConnectorGroup that admits namespaces by label: labelling and unlabelling an app's
//! namespace changes the app's status and the compiled fleet configuration promptly
//! (namespace labels are watched, not polled).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sallyport_api::{ConnectorGroup, FleetConfig, PublishedApp};
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::manifests::self_signed_tls_secret;
use sallyport_e2e::process::start_operator;
use sallyport_e2e::testbed::Testbed;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Generous for a busy 2-core machine; the periodic safety-net recompile is 60 s, so a
/// pass within this bound shows the label change was seen through the watch.
const REACTION_TIMEOUT: Duration = Duration::from_secs(20);

async fn routed_apps(client: &kube::Client, operator_namespace: &str) -> Option<Vec<String>> {
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace)
        .get_opt("sallyport-fleet-config")
        .await
        .ok()??;
    let bytes = config_map.binary_data?.remove("fleet-config.json.gz")?;
    let config = FleetConfig::from_gzip_json(&bytes.0).ok()?;
    Some(config.routes.into_iter().map(|r| r.app).collect())
}

async fn wait_until(
    what: &str,
    mut check: impl AsyncFnMut() -> Result<bool, Box<dyn std::error::Error>>,
) -> TestResult {
    let deadline = tokio::time::Instant::now() + REACTION_TIMEOUT;
    while !check().await? {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what} did not happen within {REACTION_TIMEOUT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn reason(app: &PublishedApp, type_: &str) -> Option<String> {
    let status = app.status.as_ref()?;
    let condition = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some(condition.reason.clone())
}

#[tokio::test]
async fn namespace_labels_admit_and_evict_apps_promptly() -> TestResult {
    let bed = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "labels",
    )
    .await?;
    let client = bed.client.clone();
    let group_namespace = bed.control_plane.create_namespace("connectors").await?;
    let _operator = start_operator(&bed.operator_kubeconfig, &bed.operator_namespace, &[])?;

    let group: ConnectorGroup = serde_json::from_value(json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "ConnectorGroup",
        "metadata": {"name": "dc"},
        "spec": {"allowedNamespaces": {
            "from": "Selector",
            "selector": {"matchLabels": {"sallyport.dev/publish": "true"}}
        }}
    }))?;
    Api::<ConnectorGroup>::namespaced(client.clone(), &group_namespace)
        .create(&PostParams::default(), &group)
        .await?;
    let app: PublishedApp = serde_json::from_value(json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "PublishedApp",
        "metadata": {"name": "wiki"},
        "spec": {
            "externalUrl": "https://wiki.labels.example.com/",
            "internalUrl": "http://wiki.corp.internal/",
            "preAuthentication": {"type": "Passthrough"},
            "connectorGroup": {"name": "dc", "namespace": group_namespace},
            "tls": {"secretName": "wiki-tls"},
        }
    }))?;
    Api::<Secret>::namespaced(client.clone(), &bed.namespace)
        .create(
            &PostParams::default(),
            &self_signed_tls_secret("wiki-tls", "wiki.labels.example.com")?,
        )
        .await?;
    let apps = Api::<PublishedApp>::namespaced(client.clone(), &bed.namespace);
    apps.create(&PostParams::default(), &app).await?;
    let app_id = format!("{}/wiki", bed.namespace);

    // Unlabelled: not allowed, not routed.
    wait_until("NamespaceNotAllowed on wiki", async || {
        let app = apps.get("wiki").await?;
        Ok(reason(&app, "ResolvedRefs").as_deref() == Some("NamespaceNotAllowed"))
    })
    .await?;
    let routed = routed_apps(&client, &bed.operator_namespace).await;
    assert!(
        routed.as_ref().is_some_and(|r| !r.contains(&app_id)),
        "an app of a namespace the group does not admit is routed: {routed:?}"
    );

    // Labelling the namespace admits the app into status and the configuration.
    let namespaces = Api::<Namespace>::all(client.clone());
    let label =
        |value: Option<&str>| json!({"metadata": {"labels": {"sallyport.dev/publish": value}}});
    namespaces
        .patch(
            &bed.namespace,
            &PatchParams::default(),
            &Patch::Merge(label(Some("true"))),
        )
        .await?;
    wait_until("wiki routed after its namespace was labelled", async || {
        Ok(routed_apps(&client, &bed.operator_namespace)
            .await
            .is_some_and(|r| r.contains(&app_id)))
    })
    .await?;
    wait_until("wiki's references resolved", async || {
        let app = apps.get("wiki").await?;
        Ok(reason(&app, "ResolvedRefs").as_deref() == Some("ResolvedRefs"))
    })
    .await?;

    // Removing the label evicts it again.
    namespaces
        .patch(
            &bed.namespace,
            &PatchParams::default(),
            &Patch::Merge(label(None)),
        )
        .await?;
    wait_until("wiki unrouted after the label was removed", async || {
        Ok(routed_apps(&client, &bed.operator_namespace)
            .await
            .is_some_and(|r| !r.contains(&app_id)))
    })
    .await?;
    let app = apps.get("wiki").await?;
    let ns = namespaces.get(&bed.namespace).await?;
    assert!(!ns.labels().contains_key("sallyport.dev/publish"));
    wait_until("NamespaceNotAllowed on wiki again", async || {
        let app = apps.get("wiki").await?;
        Ok(reason(&app, "ResolvedRefs").as_deref() == Some("NamespaceNotAllowed"))
    })
    .await
    .map_err(|e| format!("{e}; last seen {:?}", app.status))?;
    Ok(())
}
