//! A connector dies (SIGKILL, as when its VM fails) while users keep a group under load:
//! two connectors share the group and two proxy replicas the users; only requests in
//! flight on the dead connector fail, requests succeed again within a second, and the
//! survivor carries every request from then on.

use std::path::Path;
use std::time::Duration;

use sallyport_e2e::dataplane::{
    Fleet, LoadOutcome, LoadTarget, StepError, TrafficBackend, eventually, https_get, run_load,
};
use serde_json::json;
use tokio::time::Instant;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.failover.test";
/// Users.
const CLIENTS: usize = 8;
/// How long the load runs in all.
const LOAD: Duration = Duration::from_secs(6);
/// Requests succeed again within this time of the kill.
const RECOVERY: Duration = Duration::from_secs(1);
/// How long after the dead connector was reaped the backend may still read requests it
/// had written before dying.
const STRAY_MARGIN: Duration = Duration::from_millis(250);

/// The longest stretch after `from` in which no request completed successfully.
fn longest_gap(outcomes: &[LoadOutcome], from: Instant) -> Duration {
    let mut successes: Vec<Instant> = outcomes
        .iter()
        .filter(|o| o.result.is_ok() && o.finished >= from)
        .map(|o| o.finished)
        .collect();
    successes.sort();
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for at in successes {
        longest = longest.max(at - previous);
        previous = at;
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_connector_under_load_fails_only_its_requests_in_flight() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "failover",
        &["proxy-a", "proxy-b"],
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let (one_state, two_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut doomed, _survivor) = fleet
        .start_two_connectors(
            &group,
            [one_state.path(), two_state.path()],
            &backend,
            ["doomed", "survivor"],
            APP_HOST,
            &app_ca,
        )
        .await?;
    let addresses = fleet.addresses();

    let targets = LoadTarget::per_replica(&addresses, APP_HOST, &app_ca, "/", "backend=app");
    let started = Instant::now();
    let load = tokio::spawn(async move {
        run_load(&targets, CLIENTS, started + LOAD, Duration::from_secs(5)).await
    });

    // Once the load reaches both connectors, kill one.
    let loaded = eventually(
        "the load reaching both connectors",
        Duration::from_secs(3),
        async || {
            let arrivals = backend.arrivals();
            let count = |label: &str| {
                arrivals
                    .iter()
                    .filter(|a| a.at >= started && a.from.as_deref() == Some(label))
                    .count()
            };
            Ok((count("doomed") >= 20 && count("survivor") >= 20).then_some(()))
        },
    )
    .await;
    if let Err(error) = loaded {
        load.abort();
        return Err(error);
    }
    let killed_at = Instant::now();
    doomed.signal(nix::sys::signal::Signal::SIGKILL)?;
    let status = doomed
        .wait_for_exit(Duration::from_secs(5))
        .await
        .ok_or("the killed connector did not exit")?;
    let reaped_at = Instant::now();
    eprintln!(
        "connector killed ({status}) after {:?} of load",
        killed_at - started
    );

    let outcomes = load.await?;
    let failures: Vec<&LoadOutcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    for failure in &failures {
        eprintln!(
            "failed: client {} sent at kill{:+.3}s, ended at kill{:+.3}s: {:?}",
            failure.client,
            signed_secs(failure.started, killed_at),
            signed_secs(failure.finished, killed_at),
            failure.result
        );
    }
    let recovered_at = outcomes
        .iter()
        .filter(|o| o.result.is_ok() && o.started >= killed_at)
        .map(|o| o.finished)
        .min()
        .ok_or("no request succeeded after the kill")?;
    let gap = longest_gap(&outcomes, killed_at);
    let after = outcomes
        .iter()
        .filter(|o| o.started >= killed_at + RECOVERY);
    eprintln!(
        "{} requests, {} failed; first success sent after the kill ended {:?} after it; longest stretch without a success after the kill: {gap:?}; {} requests sent from a second after the kill",
        outcomes.len(),
        failures.len(),
        recovered_at - killed_at,
        after.clone().count()
    );

    assert!(
        outcomes
            .iter()
            .filter(|o| o.finished < killed_at)
            .all(|o| o.result.is_ok()),
        "requests failed before the kill"
    );
    assert!(
        failures.len() <= CLIENTS,
        "{} requests failed: more than the {CLIENTS} that can be in flight at the kill",
        failures.len()
    );
    assert!(
        failures.iter().all(|f| f.started < killed_at + RECOVERY),
        "requests sent more than {RECOVERY:?} after the kill failed"
    );
    assert!(
        recovered_at - killed_at <= RECOVERY,
        "the first success after the kill came {:?} after it",
        recovered_at - killed_at
    );
    assert!(
        gap <= RECOVERY,
        "no request succeeded for {gap:?} after the kill"
    );
    assert!(
        after.clone().count() >= 50,
        "the load went on after the kill"
    );

    // The survivor serves everything from the kill on: the dead connector's last requests
    // may still be read from the backend's socket buffers just after it died, none later.
    let late: Vec<_> = backend
        .arrivals()
        .into_iter()
        .filter(|a| a.at >= reaped_at + STRAY_MARGIN)
        .collect();
    let strays: Vec<_> = late
        .iter()
        .filter(|a| a.from.as_deref() != Some("survivor"))
        .collect();
    assert!(!late.is_empty());
    assert!(
        strays.is_empty(),
        "requests after the kill came from elsewhere than the survivor: {strays:?}"
    );
    for address in &addresses {
        for _ in 0..5 {
            let answer = https_get(*address, APP_HOST, &app_ca, "/").await?;
            assert_eq!(answer.status, 200, "{}", answer.text());
        }
    }
    Ok(())
}

/// `at - origin` in seconds, negative when `at` came first.
fn signed_secs(at: Instant, origin: Instant) -> f64 {
    if at >= origin {
        (at - origin).as_secs_f64()
    } else {
        -(origin - at).as_secs_f64()
    }
}
