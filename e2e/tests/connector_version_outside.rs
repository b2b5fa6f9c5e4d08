//! Connectors outside the cluster and the version their group wants: when a
//! ConnectorGroup asks for another version, its connectors learn it from their
//! configuration and report it, their Connector status and `UpToDate` condition say an
//! update is due (with a Warning Event saying how), and the group's rollout waits for
//! them. The documented upgrade (stop with SIGTERM, start the new binary on the same
//! state) loses no request while users keep the group busy, and the restarted connector
//! reports again without registering anew.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use sallyport_api::connector_group::RolloutPhase;
use sallyport_api::{Connector, ConnectorGroup};
use sallyport_e2e::dataplane::{
    Fleet, LoadOutcome, LoadTarget, StepError, TrafficBackend, eventually, run_load,
};
use serde_json::json;
use tokio::time::Instant;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.version.test";
/// The version every connector binary of this build reports.
const RUNNING: &str = env!("CARGO_PKG_VERSION");
/// A version the group asks for that no binary here has.
const WANTED: &str = "99.0.0";
/// How long the operator and connectors get to react.
const REACTION: Duration = Duration::from_secs(30);

fn condition<'a>(connector: &'a Connector, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
    connector
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

fn versions(connector: &Connector) -> (Option<&str>, Option<&str>) {
    connector.status.as_ref().map_or((None, None), |s| {
        (s.version.as_deref(), s.desired_version.as_deref())
    })
}

/// Waits until every Connector of the namespace (`expected` of them) reports `running`
/// and `desired`, with the `UpToDate` condition `status`/`reason`.
async fn connectors_report(
    connectors: &Api<Connector>,
    expected: usize,
    desired: &str,
    up_to_date: (&str, &str),
) -> Result<Vec<Connector>, StepError> {
    eventually(
        &format!(
            "{expected} Connectors reporting {RUNNING}, wanting {desired}, UpToDate {up_to_date:?}"
        ),
        REACTION,
        async || {
            let list = connectors.list(&ListParams::default()).await?.items;
            let agree = list.len() == expected
                && list.iter().all(|c| {
                    versions(c) == (Some(RUNNING), Some(desired))
                        && condition(c, "UpToDate").map(|(s, r, _)| (s, r)) == Some(up_to_date)
                });
            Ok(agree.then_some(list))
        },
    )
    .await
}

/// Waits until the group's rollout is in `phase` with the `UpToDate` reason `reason`.
async fn group_rollout(
    groups: &Api<ConnectorGroup>,
    name: &str,
    phase: RolloutPhase,
    reason: &str,
) -> Result<ConnectorGroup, StepError> {
    eventually(
        &format!("group {name}'s rollout {phase:?} ({reason})"),
        REACTION,
        async || {
            let group = groups.get(name).await?;
            let status = group.status.clone().unwrap_or_default();
            let in_phase = status.rollout.as_ref().is_some_and(|r| r.phase == phase);
            let reason_matches = status
                .conditions
                .iter()
                .any(|c| c.type_ == "UpToDate" && c.reason == reason);
            Ok((in_phase && reason_matches).then_some(group))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_connectors_report_the_wanted_version_and_upgrade_without_losing_requests()
-> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "version",
        &["proxy-a", "proxy-b"],
    )
    .await?;
    let namespace = fleet.bed.namespace.clone();
    let client = fleet.bed.client.clone();
    let connectors = Api::<Connector>::namespaced(client.clone(), &namespace);
    let groups = Api::<ConnectorGroup>::namespaced(client.clone(), &namespace);
    let backend = TrafficBackend::start("app").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let (one_state, two_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut upgraded, _other) = fleet
        .start_two_connectors(
            &group,
            [one_state.path(), two_state.path()],
            &backend,
            ["upgraded", "other"],
            APP_HOST,
            &app_ca,
        )
        .await?;

    // The operator's release is this build's version: nothing to do.
    connectors_report(&connectors, 2, RUNNING, ("True", "DesiredVersion")).await?;
    group_rollout(&groups, "dc", RolloutPhase::Complete, "AllUpToDate").await?;
    eventually(
        "the group counting 2 connected connectors on this version",
        REACTION,
        async || {
            let status = groups.get("dc").await?.status.unwrap_or_default();
            let counted: Vec<(String, i32, i32)> = status
                .versions
                .iter()
                .map(|v| (v.version.clone(), v.connectors, v.ready))
                .collect();
            Ok((counted == [(RUNNING.to_owned(), 2, 2)]).then_some(()))
        },
    )
    .await?;

    // The group asks for a newer version: the connectors learn it and report it.
    groups
        .patch(
            "dc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"version": WANTED}})),
        )
        .await?;
    let behind = connectors_report(&connectors, 2, WANTED, ("False", "UpdateAvailable")).await?;
    for connector in &behind {
        let (_, _, message) = condition(connector, "UpToDate").unwrap_or_default();
        assert!(
            message.contains(RUNNING) && message.contains(WANTED),
            "the UpToDate message names both versions: {message}"
        );
    }
    let waiting = group_rollout(&groups, "dc", RolloutPhase::Waiting, "UpgradeAvailable").await?;
    let rollout = waiting
        .status
        .and_then(|s| s.rollout)
        .ok_or("the group has no rollout status")?;
    assert_eq!(
        (
            rollout.target_version.as_str(),
            rollout.updated_connectors,
            rollout.desired_connectors
        ),
        (WANTED, 0, 2)
    );
    assert!(
        rollout.message.contains(&format!("2 on {RUNNING}")),
        "{}",
        rollout.message
    );
    // The update due is a Warning on each Connector, saying what to do.
    let events = Api::<Event>::namespaced(client.clone(), &namespace);
    eventually(
        "a Warning Event UpdateAvailable with its fix",
        REACTION,
        async || {
            let list = events.list(&ListParams::default()).await?.items;
            Ok(list
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("UpdateAvailable")
                        && e.type_.as_deref() == Some("Warning")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("Fix: install"))
                })
                .then_some(()))
        },
    )
    .await?;

    // The documented upgrade, under load: SIGTERM (the connector drains), then the new
    // binary on the same state directory. No request fails.
    let targets =
        LoadTarget::per_replica(&fleet.addresses(), APP_HOST, &app_ca, "/", "backend=app");
    let until = Instant::now() + Duration::from_secs(8);
    let load =
        tokio::spawn(async move { run_load(&targets, 6, until, Duration::from_secs(15)).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names_before: Vec<String> = connectors
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    upgraded.terminate()?;
    let exit = upgraded.wait_for_exit(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "the stopped connector drains and exits 0: {exit:?}"
    );
    let restarted = fleet.connector(&group, one_state.path()).start()?;
    backend.watch(&restarted, "restarted");
    let outcomes = load.await?;
    let failures: Vec<&LoadOutcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(!outcomes.is_empty(), "the load sent requests");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the upgrade: {:?}",
        failures.len(),
        outcomes.len(),
        failures.first().map(|f| &f.result)
    );
    eventually(
        "the restarted connector carrying requests",
        REACTION,
        async || {
            let answer =
                sallyport_e2e::dataplane::https_get(fleet.addresses()[0], APP_HOST, &app_ca, "/")
                    .await?;
            let served = answer.status == 200
                && backend
                    .arrivals()
                    .iter()
                    .any(|a| a.from.as_deref() == Some("restarted"));
            Ok(served.then_some(()))
        },
    )
    .await?;
    // Same identity, no new Connector: it reported again on its first pull.
    let after = connectors_report(&connectors, 2, WANTED, ("False", "UpdateAvailable")).await?;
    let mut names_after: Vec<String> = after
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    let mut names_before = names_before;
    names_before.sort();
    names_after.sort();
    assert_eq!(names_before, names_after, "the upgrade kept the identities");

    // Back to the version the binaries run: up to date again.
    groups
        .patch(
            "dc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"version": RUNNING}})),
        )
        .await?;
    connectors_report(&connectors, 2, RUNNING, ("True", "DesiredVersion")).await?;
    group_rollout(&groups, "dc", RolloutPhase::Complete, "AllUpToDate").await?;
    Ok(())
}
