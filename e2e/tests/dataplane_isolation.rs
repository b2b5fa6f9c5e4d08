//! Connector groups as boundaries, end to end with real processes: two groups, each with
//! its connector, its app and its own backend; requests for an app only ever reach its
//! own backend through its own group's connector (counted and attributed at the
//! backends), apps published while the connectors already run are picked up, and
//! stopping one group's connector gives its app a 503 naming the group while the other
//! app keeps working.

use std::path::Path;
use std::time::Duration;

use kube::api::{Api, ListParams};
use sallyport_api::Connector;
use sallyport_e2e::dataplane::{
    Fleet, REACTION_TIMEOUT, StepError, TrafficBackend, eventually, https_get,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_carries_only_its_own_apps() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "isolation",
        &["proxy-a", "proxy-b"],
    )
    .await?;
    let (alpha_backend, beta_backend) = (
        TrafficBackend::start("alpha").await?,
        TrafficBackend::start("beta").await?,
    );
    let alpha = fleet.create_group("alpha", json!({})).await?;
    let beta = fleet.create_group("beta", json!({})).await?;
    // The connectors come up first and the apps are published while they run, as when
    // an app is added to a working group.
    let (alpha_state, beta_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let alpha_connector = fleet.connector(&alpha, alpha_state.path()).start()?;
    let mut beta_connector = fleet.connector(&beta, beta_state.path()).start()?;
    for backend in [&alpha_backend, &beta_backend] {
        backend.watch(&alpha_connector, "alpha-connector");
        backend.watch(&beta_connector, "beta-connector");
    }
    let connectors = Api::<Connector>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);
    eventually("both connectors registered", REACTION_TIMEOUT, async || {
        let list = connectors.list(&ListParams::default()).await?;
        Ok((list.items.len() == 2).then_some(()))
    })
    .await?;
    let (alpha_host, beta_host) = ("alpha.groups.test", "beta.groups.test");
    let alpha_ca = fleet
        .publish_app("alpha", alpha_host, &alpha_backend.url(), "alpha")
        .await?;
    let beta_ca = fleet
        .publish_app("beta", beta_host, &beta_backend.url(), "beta")
        .await?;
    let apps = [
        (alpha_host, &alpha_ca, "backend=alpha"),
        (beta_host, &beta_ca, "backend=beta"),
    ];
    let addresses = fleet.addresses();
    for (host, ca, expect) in apps {
        for address in &addresses {
            let answer = eventually(
                &format!("{host} served through {address}"),
                REACTION_TIMEOUT,
                async || {
                    let answer = https_get(*address, host, ca, "/").await?;
                    Ok((answer.status == 200).then_some(answer))
                },
            )
            .await?;
            assert!(answer.text().contains(expect), "{host}: {}", answer.text());
        }
    }

    // Counted at the backends: every request reaches its own app's backend and nothing
    // else does.
    let before = (alpha_backend.requests(), beta_backend.requests());
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        for (host, ca, expect) in apps {
            for address in &addresses {
                let path = format!("/{host}/{round}");
                let answer = https_get(*address, host, ca, &path).await?;
                assert_eq!(answer.status, 200, "{host}: {}", answer.text());
                assert!(answer.text().contains(expect), "{host}: {}", answer.text());
                assert!(
                    answer.text().contains(&format!("target={path}")),
                    "{}",
                    answer.text()
                );
            }
        }
    }
    let sent_each = ROUNDS * addresses.len();
    assert_eq!(
        (
            alpha_backend.requests() - before.0,
            beta_backend.requests() - before.1
        ),
        (sent_each, sent_each),
        "requests counted at the alpha and beta backends"
    );
    for (backend, app, own, other) in [
        (
            &alpha_backend,
            alpha_host,
            "alpha-connector",
            "beta-connector",
        ),
        (
            &beta_backend,
            beta_host,
            "beta-connector",
            "alpha-connector",
        ),
    ] {
        let arrivals = backend.arrivals();
        assert!(
            arrivals
                .iter()
                .all(|a| a.target == "/" || a.target.starts_with(&format!("/{app}/"))),
            "the {app} backend got another app's request: {arrivals:?}"
        );
        assert!(
            arrivals.iter().all(|a| a.from.as_deref() == Some(own)),
            "the {app} backend got requests from elsewhere than {own} (e.g. {other}): {:?}",
            arrivals.iter().map(|a| a.from.clone()).collect::<Vec<_>>()
        );
    }

    // Stopping beta's connector: beta's app answers 503 naming its group, alpha's works.
    beta_connector.terminate()?;
    beta_connector
        .wait_for_exit(Duration::from_secs(15))
        .await
        .ok_or("beta's connector did not stop")?;
    let beta_served = beta_backend.requests();
    for address in &addresses {
        let answer = eventually(
            &format!("a 503 for beta through {address}"),
            REACTION_TIMEOUT,
            async || {
                let answer = https_get(*address, beta_host, &beta_ca, "/").await?;
                Ok((answer.status == 503).then_some(answer))
            },
        )
        .await?;
        assert!(answer.text().contains("beta"), "{}", answer.text());
        for _ in 0..5 {
            let answer = https_get(*address, alpha_host, &alpha_ca, "/").await?;
            assert_eq!(answer.status, 200, "alpha: {}", answer.text());
            assert!(answer.text().contains("backend=alpha"), "{}", answer.text());
        }
    }
    assert_eq!(
        beta_backend.requests(),
        beta_served,
        "nothing reached beta's backend once its connector was gone"
    );
    Ok(())
}
