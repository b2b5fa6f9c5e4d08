//! A connector stopped the way Kubernetes stops a pod (SIGTERM) while users keep its
//! group busy with quick and slow requests: not one request fails. The draining
//! connector finishes the requests it holds, the other connector of the group takes
//! every new one, and the stopped process exits cleanly well within its drain timeout.

use std::path::Path;
use std::time::Duration;

use sallyport_e2e::dataplane::{
    Fleet, LoadOutcome, LoadTarget, StepError, TrafficBackend, eventually, run_load,
};
use serde_json::json;
use tokio::time::Instant;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.drain.test";
/// How long the backend takes to answer a slow request.
const SLOW: Duration = Duration::from_secs(1);
/// The connectors' `--drain-timeout` (see `Fleet::connector`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the load runs in all.
const LOAD: Duration = Duration::from_secs(7);
/// After SIGTERM the draining connector sends GOAWAY at once; requests the proxy had
/// already put on its tunnels may still reach the backend within this time.
const GOAWAY_MARGIN: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_stopped_with_sigterm_drains_without_failing_a_request() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "drain",
        &["proxy-a", "proxy-b"],
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let (one_state, two_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut draining, _staying) = fleet
        .start_two_connectors(
            &group,
            [one_state.path(), two_state.path()],
            &backend,
            ["draining", "staying"],
            APP_HOST,
            &app_ca,
        )
        .await?;
    let addresses = fleet.addresses();

    // Quick requests from 8 users and slow ones (1 s at the backend) from 4 more, through
    // both replicas.
    let target =
        |path: &str| LoadTarget::per_replica(&addresses, APP_HOST, &app_ca, path, "backend=app");
    let (quick, slow) = (target("/"), target(&format!("/slow/{}", SLOW.as_millis())));
    let started = Instant::now();
    let until = started + LOAD;
    let request_timeout = Duration::from_secs(15);
    let quick_load = tokio::spawn(async move { run_load(&quick, 8, until, request_timeout).await });
    let slow_load = tokio::spawn(async move { run_load(&slow, 4, until, request_timeout).await });

    // SIGTERM once the draining connector holds a slow request that started moments ago,
    // so that it is still in flight for most of a second.
    let in_flight = eventually(
        "a slow request in flight on the connector to stop",
        Duration::from_secs(4),
        async || {
            let now = Instant::now();
            Ok(backend
                .arrivals()
                .into_iter()
                .filter(|a| a.target.starts_with("/slow/") && a.from.as_deref() == Some("draining"))
                .any(|a| now - a.at < Duration::from_millis(200) && a.at - started > SLOW)
                .then_some(()))
        },
    )
    .await;
    if let Err(error) = in_flight {
        quick_load.abort();
        slow_load.abort();
        return Err(error);
    }
    let terminated_at = Instant::now();
    draining.terminate()?;
    let status = draining
        .wait_for_exit(DRAIN_TIMEOUT + Duration::from_secs(5))
        .await;
    let exited_after = terminated_at.elapsed();
    let quick = quick_load.await?;
    let slow = slow_load.await?;

    let failures: Vec<&LoadOutcome> = quick
        .iter()
        .chain(&slow)
        .filter(|o| o.result.is_err())
        .collect();
    let arrivals = backend.arrivals();
    let held = arrivals
        .iter()
        .filter(|a| {
            a.from.as_deref() == Some("draining")
                && a.target.starts_with("/slow/")
                && a.at <= terminated_at
                && terminated_at - a.at < SLOW
        })
        .count();
    let late_draining = arrivals
        .iter()
        .filter(|a| a.from.as_deref() == Some("draining") && a.at > terminated_at + GOAWAY_MARGIN)
        .count();
    let late_staying = arrivals
        .iter()
        .filter(|a| a.from.as_deref() == Some("staying") && a.at > terminated_at + GOAWAY_MARGIN)
        .count();
    eprintln!(
        "SIGTERM after {:?} of load; the connector exited ({status:?}) {exited_after:?} later, holding {held} slow requests at the signal; {} quick and {} slow requests, {} failed; after the signal the draining connector got {late_draining} requests, the other {late_staying}",
        terminated_at - started,
        quick.len(),
        slow.len(),
        failures.len()
    );
    for failure in &failures {
        eprintln!(
            "failed: client {} sent {:?} after the start: {:?}",
            failure.client,
            failure.started - started,
            failure.result
        );
    }

    let status = status.ok_or_else(|| {
        format!("the connector still ran {DRAIN_TIMEOUT:?} after SIGTERM (its drain timeout)")
    })?;
    assert!(
        status.success(),
        "the drained connector exited with {status}"
    );
    assert!(
        exited_after < DRAIN_TIMEOUT,
        "the connector took {exited_after:?} to drain, beyond its drain timeout"
    );
    assert!(
        failures.is_empty(),
        "{} requests failed while a connector drained",
        failures.len()
    );
    assert!(
        held >= 1,
        "the stopped connector held no slow request at the signal"
    );
    assert_eq!(
        late_draining, 0,
        "the draining connector still got new requests after its GOAWAY"
    );
    assert!(
        late_staying >= 20,
        "the other connector took the new requests"
    );
    assert!(
        quick.iter().filter(|o| o.started > terminated_at).count() >= 20,
        "the load went on after the signal"
    );
    Ok(())
}
