//! The operator rides out a kube-apiserver restart: it keeps running, and changes made
//! after the restart are reconciled.

use std::path::Path;
use std::time::Duration;

use kube::api::{Api, PostParams};
use sallyport_api::PublishedApp;
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::process::start_operator;
use sallyport_e2e::testbed::Testbed;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The operator's watches retry at most every 5 s while the apiserver is away, then re-list
/// once on "resource version too old"; a restarted apiserver also refuses requests (403)
/// until its RBAC caches are warm. The bound is generous for a busy machine.
const TIMEOUT: Duration = Duration::from_secs(90);

fn app(name: &str) -> Result<PublishedApp, serde_yaml::Error> {
    serde_yaml::from_str(&format!(
        "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {{name: {name}}}\nspec:\n  externalUrl: https://{name}.apps.example.com/\n  internalUrl: http://{name}.corp.internal/\n  connectorGroup: {{name: dc}}\n"
    ))
}

async fn wait_for_status(apps: &Api<PublishedApp>, name: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(app)) = apps.get_opt(name).await
            && app.status.is_some_and(|s| !s.conditions.is_empty())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "the status of {name} was not written within {TIMEOUT:?}"
    ))
}

#[tokio::test]
async fn the_operator_rides_out_an_apiserver_restart() -> TestResult {
    let Testbed {
        control_plane,
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
    // A graceful apiserver restart here takes about ten seconds: a renew deadline longer
    // than that keeps the Lease (with a shorter one the operator exits by design, and its
    // Deployment restarts it).
    let lease = [
        "--leader-elect-lease-duration",
        "40s",
        "--leader-elect-renew-deadline",
        "30s",
        "--leader-elect-retry-period",
        "2s",
    ];
    let mut operator = start_operator(&operator_kubeconfig, &operator_namespace, &lease)?;
    let apps = Api::<PublishedApp>::namespaced(client.clone(), &namespace);
    apps.create(&PostParams::default(), &app("before")?).await?;
    wait_for_status(&apps, "before").await?;

    control_plane.restart_apiserver().await?;

    // A client made before the restart reconnects; so must the operator's watches.
    let apps = Api::<PublishedApp>::namespaced(control_plane.client().await?, &namespace);
    apps.create(&PostParams::default(), &app("after")?).await?;
    wait_for_status(&apps, "after").await?;
    assert!(
        operator.is_running(),
        "the operator exited during the apiserver restart"
    );
    Ok(())
}
