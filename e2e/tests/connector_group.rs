//! The ConnectorGroup controller as a real process, with kube-controller-manager,
//! kube-scheduler and kwok running: the hardened connector Deployment becomes Available,
//! the registration token is minted and rotated, Connectors are counted, and removing
//! `spec.deployment` removes the Deployment.

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use sallyport_api::{Connector, ConnectorGroup};
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::process::start_operator;
use sallyport_e2e::testbed::Testbed;
use serde::de::DeserializeOwned;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Bound on waiting for the operator and the controllers to react.
const REACTION_TIMEOUT: Duration = Duration::from_secs(60);

async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    check: impl Fn(Option<&K>) -> bool,
) -> Result<Option<K>, String>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = tokio::time::Instant::now() + REACTION_TIMEOUT;
    loop {
        let current = api.get_opt(name).await.map_err(|e| e.to_string())?;
        if check(current.as_ref()) {
            return Ok(current);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{name}: {what} did not happen within {REACTION_TIMEOUT:?}; last seen: {current:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn token(secret: Option<&Secret>) -> Option<String> {
    let bytes = secret?.data.as_ref()?.get("token")?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn group_status(group: Option<&ConnectorGroup>) -> Option<(i32, i32, String, String)> {
    let status = group?.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((
        status.desired_connectors,
        status.connected_connectors,
        ready.status.clone(),
        ready.reason.clone(),
    ))
}

#[tokio::test]
async fn a_connector_group_runs_hardened_connectors_with_a_rotating_token() -> TestResult {
    let Testbed {
        control_plane: _,
        client,
        operator_namespace,
        namespace,
        operator_kubeconfig,
    } = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::WithControllers,
        "network",
    )
    .await?;
    let _operator = start_operator(
        &operator_kubeconfig,
        &operator_namespace,
        &[
            "--connector-image",
            "example.test/sallyport-connector:e2e",
            // The tunnel entry written below, as a proxy replica would, is never renewed.
            "--tunnel-stale-after",
            "1h",
        ],
    )?;

    let groups = Api::<ConnectorGroup>::namespaced(client.clone(), &namespace);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let group: ConnectorGroup = serde_yaml::from_str(
        "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {name: east}\nspec:\n  deployment: {replicas: 2}\n  registration: {tokenTTL: 4s, maxUses: 5}\n",
    )?;
    groups.create(&PostParams::default(), &group).await?;

    // The token Secret exists, and the status names it.
    let secret = wait_for(&secrets, "east-registration", "token Secret", |s| {
        token(s).is_some()
    })
    .await?;
    let first_token = token(secret.as_ref()).ok_or("no token")?;
    assert_eq!(
        secret.as_ref().and_then(|s| s.type_.clone()).as_deref(),
        Some("sallyport.dev/registration-token")
    );
    // It carries the fleet's root CA, the very certificate of sallyport-root-ca.
    let secret = wait_for(
        &secrets,
        "east-registration",
        "fleet CA in the token Secret",
        |s| {
            s.and_then(|s| s.data.as_ref())
                .is_some_and(|d| d.contains_key("ca.crt"))
        },
    )
    .await?;
    let root = Api::<Secret>::namespaced(client.clone(), &operator_namespace)
        .get("sallyport-root-ca")
        .await?;
    let token_ca = secret
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get("ca.crt").cloned());
    let root_ca = root.data.as_ref().and_then(|d| d.get("tls.crt").cloned());
    assert!(token_ca.is_some());
    assert_eq!(token_ca, root_ca);
    let seen = wait_for(&groups, "east", "status", |g| group_status(g).is_some()).await?;
    assert_eq!(
        group_status(seen.as_ref()),
        Some((2, 0, "False".into(), "NoConnectedConnectors".into()))
    );
    assert_eq!(
        seen.and_then(|g| g.status)
            .and_then(|s| s.registration_token_secret)
            .as_deref(),
        Some("east-registration")
    );

    // The hardened Deployment rolls out on the kwok node.
    let available = |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.available_replicas == Some(2))
    };
    let deployment = wait_for(
        &deployments,
        "east-connector",
        "Available with 2 replicas",
        available,
    )
    .await?
    .ok_or("no Deployment")?;
    assert_eq!(
        deployment
            .owner_references()
            .first()
            .map(|o| o.kind.as_str()),
        Some("ConnectorGroup")
    );
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .ok_or("no pod template")?;
    let container = pod.containers.first().ok_or("no container")?;
    assert_eq!(
        container.image.as_deref(),
        Some("example.test/sallyport-connector:e2e")
    );
    let security = container
        .security_context
        .clone()
        .ok_or("no securityContext")?;
    assert_eq!(
        (security.read_only_root_filesystem, security.run_as_non_root),
        (Some(true), Some(true))
    );

    // The proxy fleet runs in the operator's namespace: hardened pods behind a Service on
    // 443 with a disruption budget.
    let fleet_deployments = Api::<Deployment>::namespaced(client.clone(), &operator_namespace);
    let fleet_available = |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.available_replicas == Some(2))
    };
    wait_for(
        &fleet_deployments,
        "sallyport-proxy",
        "the proxy fleet Available with 2 replicas",
        fleet_available,
    )
    .await?;
    let service = Api::<Service>::namespaced(client.clone(), &operator_namespace)
        .get("sallyport-proxy")
        .await?;
    let ports = service.spec.and_then(|s| s.ports).unwrap_or_default();
    assert_eq!(ports.first().map(|p| p.port), Some(443));
    let budget = Api::<PodDisruptionBudget>::namespaced(client.clone(), &operator_namespace)
        .get("sallyport-proxy")
        .await?;
    assert!(budget.spec.and_then(|s| s.max_unavailable).is_some());

    // The token rotates once its 4s TTL is over.
    let rotated = wait_for(&secrets, "east-registration", "token rotation", |s| {
        token(s).is_some_and(|t| t != first_token)
    })
    .await?;
    assert!(token(rotated.as_ref()).is_some_and(|t| t.len() >= 43));

    // Connectors are counted; a connected one makes the group Ready.
    let connectors = Api::<Connector>::namespaced(client.clone(), &namespace);
    for name in ["conn-a", "conn-b"] {
        let connector: Connector = serde_yaml::from_str(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {{name: {name}}}\nspec: {{connectorGroup: east}}\n"
        ))?;
        connectors
            .create(&PostParams::default(), &connector)
            .await?;
    }
    // A proxy replica reports a tunnel of conn-a; the operator makes it Connected.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let connected = json!({
        "apiVersion": "sallyport.dev/v1alpha1", "kind": "Connector",
        "status": {"tunnels": [{"proxy": "proxy-x", "since": now, "renewedAt": now}]},
    });
    connectors
        .patch_status(
            "conn-a",
            &PatchParams::apply("sallyport-proxy/proxy-x").force(),
            &Patch::Apply(&connected),
        )
        .await?;
    wait_for(&groups, "east", "Ready", |g| {
        group_status(g) == Some((2, 1, "True".into(), "Connected".into()))
    })
    .await?;

    // Without spec.deployment the Deployment goes, and desired counts registered connectors.
    let remove = json!({"spec": {"deployment": null}});
    groups
        .patch("east", &PatchParams::default(), &Patch::Merge(&remove))
        .await?;
    wait_for(&deployments, "east-connector", "Deployment removal", |d| {
        d.is_none_or(|d| d.metadata.deletion_timestamp.is_some())
    })
    .await?;
    wait_for(&groups, "east", "desired from Connectors", |g| {
        group_status(g).is_some_and(|s| s.0 == 2 && s.1 == 1)
    })
    .await?;
    Ok(())
}
