//! The local control plane itself: it serves the pinned Kubernetes version, stores objects,
//! rolls out Deployments on the kwok node when the controllers run, and leaves nothing
//! behind when stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::wait::await_condition;
use sallyport_e2e::controlplane::{ControlPlane, Error, FAKE_NODE, Mode};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Generous: tests assert behaviour, not speed, on a slow and busy 2-core machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

fn control_plane(mode: Mode) -> Result<&'static ControlPlane, Error> {
    ControlPlane::shared(Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")), mode)
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

#[tokio::test]
async fn apiserver_serves_the_pinned_kubernetes_version() -> TestResult {
    let expected = std::env::var("KUBE_VERSION").unwrap_or_else(|_| "v1.34.4".to_owned());
    let client = control_plane(Mode::ApiServer)?.client().await?;

    let version = client.apiserver_version().await?;

    assert_eq!(version.git_version, expected);
    Ok(())
}

#[tokio::test]
async fn namespaces_are_unique_and_hold_objects() -> TestResult {
    let control_plane = control_plane(Mode::ApiServer)?;
    let client = control_plane.client().await?;

    let first = control_plane.create_namespace("controlplane").await?;
    let second = control_plane.create_namespace("controlplane").await?;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &first);
    let configmap = ConfigMap {
        metadata: meta("greeting"),
        data: Some(BTreeMap::from([("hello".to_owned(), "world".to_owned())])),
        ..ConfigMap::default()
    };
    configmaps
        .create(&PostParams::default(), &configmap)
        .await?;

    assert_ne!(first, second);
    assert!(first.starts_with("controlplane-"), "namespace {first}");
    let namespace = Api::<Namespace>::all(client.clone()).get(&first).await?;
    assert_eq!(
        namespace.status.and_then(|status| status.phase).as_deref(),
        Some("Active")
    );
    let stored = configmaps.get("greeting").await?;
    assert_eq!(stored.data, configmap.data);
    let elsewhere = Api::<ConfigMap>::namespaced(client, &second)
        .get_opt("greeting")
        .await?;
    assert!(elsewhere.is_none());
    Ok(())
}

#[tokio::test]
async fn deployment_becomes_available_on_the_kwok_node() -> TestResult {
    let control_plane = control_plane(Mode::WithControllers)?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace("rollout").await?;
    let labels = BTreeMap::from([("app".to_owned(), "pause".to_owned())]);
    let deployment = Deployment {
        metadata: meta("pause"),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "pause".to_owned(),
                        // Never pulled: kwok only pretends to run it.
                        image: Some("registry.k8s.io/pause:3.10".to_owned()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;

    let available = |deployment: Option<&Deployment>| {
        deployment
            .and_then(|deployment| deployment.status.as_ref())
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
            })
    };
    let rolled_out = tokio::time::timeout(
        ROLLOUT_TIMEOUT,
        await_condition(deployments.clone(), "pause", available),
    )
    .await;

    let status = deployments.get("pause").await?.status.unwrap_or_default();
    assert!(
        matches!(rolled_out, Ok(Ok(Some(_)))),
        "Deployment not Available within {ROLLOUT_TIMEOUT:?}: {status:?}"
    );
    assert_eq!(status.available_replicas, Some(1));
    let pods = Api::<Pod>::namespaced(client, &namespace)
        .list(&ListParams::default())
        .await?;
    let [pod] = pods.items.as_slice() else {
        panic!("expected one pod, got {:?}", pods.items);
    };
    let spec = pod.spec.as_ref();
    assert_eq!(
        spec.and_then(|spec| spec.node_name.as_deref()),
        Some(FAKE_NODE)
    );
    let phase = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref());
    assert_eq!(phase, Some("Running"));
    Ok(())
}

#[tokio::test]
async fn dropping_the_handle_stops_the_control_plane_and_deletes_its_state() -> TestResult {
    let supervisor = Path::new(env!("CARGO_BIN_EXE_sallyport-cluster"));
    let control_plane = ControlPlane::start(supervisor, Mode::ApiServer)?;
    let state_dir = control_plane
        .state_dir()
        .ok_or("kubeconfig has no parent")?
        .to_owned();
    let client = control_plane.client().await?;
    client.apiserver_version().await?;
    assert!(state_dir.join("logs/kube-apiserver.log").is_file());

    drop(control_plane);

    assert!(!state_dir.exists(), "{} still exists", state_dir.display());
    let after = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await;
    assert!(
        matches!(after, Ok(Err(_))),
        "apiserver still answers: {after:?}"
    );
    Ok(())
}
