//! Two operator replicas as real processes: one holds the Lease and reconciles; when it
//! dies, the other takes over and reconciles.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use sallyport_api::PublishedApp;
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::process::start_operator_as;
use sallyport_e2e::testbed::Testbed;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Short lease timings so a takeover happens within seconds.
const LEASE: [&str; 6] = [
    "--leader-elect-lease-duration",
    "3s",
    "--leader-elect-renew-deadline",
    "2s",
    "--leader-elect-retry-period",
    "500ms",
];
const TIMEOUT: Duration = Duration::from_secs(30);

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("sallyport-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

async fn wait_for_holder(leases: &Api<Lease>, identity: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if holder(leases).await.as_deref() == Some(identity) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "{identity} did not take the Lease within {TIMEOUT:?}; holder: {:?}",
        holder(leases).await
    ))
}

async fn wait_for_status(apps: &Api<PublishedApp>, name: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        let app = apps.get_opt(name).await.map_err(|e| e.to_string())?;
        if app
            .and_then(|a| a.status)
            .is_some_and(|s| !s.conditions.is_empty())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "no operator wrote the status of {name} within {TIMEOUT:?}"
    ))
}

fn app(name: &str) -> Result<PublishedApp, serde_yaml::Error> {
    serde_yaml::from_str(&format!(
        "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {{name: {name}}}\nspec:\n  externalUrl: https://{name}.apps.example.com/\n  internalUrl: http://{name}.corp.internal/\n  connectorGroup: {{name: dc}}\n"
    ))
}

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_it_dies() -> TestResult {
    let Testbed {
        control_plane: _,
        client,
        operator_namespace,
        namespace,
        operator_kubeconfig,
    } = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "team",
    )
    .await?;
    let leases = Api::<Lease>::namespaced(client.clone(), &operator_namespace);
    let apps = Api::<PublishedApp>::namespaced(client.clone(), &namespace);

    let first = start_operator_as(
        "replica-a",
        &operator_kubeconfig,
        &operator_namespace,
        &LEASE,
    )?;
    wait_for_holder(&leases, "replica-a").await?;
    let _second = start_operator_as(
        "replica-b",
        &operator_kubeconfig,
        &operator_namespace,
        &LEASE,
    )?;

    apps.create(&PostParams::default(), &app("before")?).await?;
    wait_for_status(&apps, "before").await?;
    // The standby keeps waiting: the leader renews well within the lease duration.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));

    // The leader dies without releasing; the standby takes over after the lease expires.
    first.stop();
    wait_for_holder(&leases, "replica-b").await?;
    apps.create(&PostParams::default(), &app("after")?).await?;
    wait_for_status(&apps, "after").await?;
    Ok(())
}
