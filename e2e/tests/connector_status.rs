//! Connector status follows the live tunnels, with the operator, two proxy replicas and a
//! connector as real processes: each replica holding tunnels of the connector keeps an
//! entry in its `status.tunnels` (renewed by heartbeat), so the Connector is
//! `Connected`, its group counts it and the app it serves is Ready. A replica killed
//! without a chance to clean up (SIGKILL) stops renewing and its entry lapses; a killed
//! connector's entries go as its tunnels close, and the group and app follow.
//!
//! The proxies renew every second (`--tunnel-status-heartbeat 1s`) and the operator
//! lets an entry lapse after 6 s (`--tunnel-stale-after 6s`), so that the test does not
//! wait a minute; the deadlines below are generous for a busy machine.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use nix::sys::signal::Signal;
use sallyport_api::{Connector, ConnectorGroup, PublishedApp};
use sallyport_e2e::dataplane::{
    Fleet, ProxyOptions, StepError, TrafficBackend, eventually, https_get,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.status.test";
/// How long anything here may take to show (generous for a busy 2-core machine).
const WITHIN: Duration = Duration::from_secs(60);
/// The proxies' heartbeat and the operator's staleness, short for the test.
const HEARTBEAT: &str = "1s";
const STALE_AFTER: &str = "6s";

/// The fleet of [`Fleet::start`], with the short heartbeat and staleness above.
async fn fleet(replicas: &[&str]) -> Result<Fleet, StepError> {
    Fleet::start_with(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "connstatus",
        replicas,
        &["--tunnel-stale-after", STALE_AFTER],
        &ProxyOptions {
            extra_args: vec!["--tunnel-status-heartbeat".to_owned(), HEARTBEAT.to_owned()],
            stdout_file: None,
        },
    )
    .await
}

fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The `Connected` condition of `connector` and the replicas of its tunnel entries.
fn connected(connector: &Connector) -> (Option<Condition>, Vec<String>) {
    let status = connector.status.clone().unwrap_or_default();
    let mut replicas: Vec<String> = status.tunnels.iter().map(|t| t.proxy.clone()).collect();
    replicas.sort();
    (
        condition(&status.conditions, "Connected").cloned(),
        replicas,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_status_follows_live_tunnels() -> TestResult {
    let mut fleet = fleet(&["proxy-a", "proxy-b"]).await?;
    let namespace = fleet.bed.namespace.clone();
    let connectors = Api::<Connector>::namespaced(fleet.bed.client.clone(), &namespace);
    let groups = Api::<ConnectorGroup>::namespaced(fleet.bed.client.clone(), &namespace);
    let apps = Api::<PublishedApp>::namespaced(fleet.bed.client.clone(), &namespace);
    let backend = TrafficBackend::start("app").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let state = tempfile::tempdir()?;
    let mut connector = fleet.connector(&group, state.path()).start()?;

    // Traffic flows through both replicas.
    let addresses = fleet.addresses();
    eventually(
        "the app answering through both replicas",
        WITHIN,
        async || {
            for address in &addresses {
                if https_get(*address, APP_HOST, &app_ca, "/").await?.status != 200 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;

    // The Connector: Connected, with one renewed entry per replica, and seen.
    let both = vec!["proxy-a".to_owned(), "proxy-b".to_owned()];
    let name = eventually(
        "the Connector Connected with entries of both replicas",
        WITHIN,
        async || {
            let list = connectors.list(&ListParams::default()).await?;
            Ok(list.items.into_iter().find_map(|c| {
                let (condition, replicas) = connected(&c);
                let up = condition.is_some_and(|c| {
                    c.status == "True"
                        && c.reason == "TunnelsUp"
                        && c.message.contains("proxy-a")
                        && c.message.contains("proxy-b")
                });
                (up && replicas == both).then(|| c.metadata.name.unwrap_or_default())
            }))
        },
    )
    .await?;
    let object = connectors.get(&name).await?;
    let status = object.status.clone().unwrap_or_default();
    assert!(status.last_seen.is_some(), "no lastSeen: {status:?}");
    assert!(
        status.tunnels.iter().all(|t| t.renewed_at.is_some()),
        "entries without renewedAt: {:?}",
        status.tunnels
    );
    let renewed = |c: &Connector, replica: &str| {
        c.status
            .as_ref()
            .and_then(|s| s.tunnels.iter().find(|t| t.proxy == replica))
            .and_then(|t| t.renewed_at.clone())
            .map(|t| t.0)
    };
    let first = renewed(&object, "proxy-a");
    eventually("proxy-a renewing its entry", WITHIN, async || {
        let now = connectors.get(&name).await?;
        Ok((renewed(&now, "proxy-a") > first).then_some(()))
    })
    .await?;

    // The group counts it; the app is Ready.
    eventually(
        "the group counting one connected connector",
        WITHIN,
        async || {
            let group = groups.get("dc").await?;
            Ok((group.status.map(|s| s.connected_connectors) == Some(1)).then_some(()))
        },
    )
    .await?;
    let app_ready = async |status: &str, reason: Option<&str>| {
        eventually(&format!("the app Ready={status}"), WITHIN, async || {
            let app = apps.get("app").await?;
            let conditions = app.status.map(|s| s.conditions).unwrap_or_default();
            Ok(condition(&conditions, "Ready")
                .filter(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
                .map(|_| ()))
        })
        .await
    };
    app_ready("True", None).await?;

    // proxy-b dies without removing its entry: the entry lapses and goes, and the
    // connector stays Connected through proxy-a (whose heartbeat keeps its entry).
    let proxy_b = fleet
        .proxies
        .iter_mut()
        .find(|p| p.name == "proxy-b")
        .ok_or("no proxy-b")?;
    proxy_b.process.signal(Signal::SIGKILL)?;
    let _ = proxy_b.process.wait_for_exit(WITHIN).await;
    let only_a = vec!["proxy-a".to_owned()];
    eventually("proxy-b's entry lapsing", WITHIN, async || {
        let (condition, replicas) = connected(&connectors.get(&name).await?);
        let up = condition.is_some_and(|c| {
            c.status == "True" && !c.message.contains("proxy-b") && c.message.contains("proxy-a")
        });
        Ok((up && replicas == only_a).then_some(()))
    })
    .await?;
    let group_status = groups.get("dc").await?.status.unwrap_or_default();
    assert_eq!(group_status.connected_connectors, 1, "{group_status:?}");

    // The connector dies: proxy-a removes its entry as the tunnels close.
    connector.signal(Signal::SIGKILL)?;
    let _ = connector.wait_for_exit(WITHIN).await;
    let gone = eventually("the Connector no longer Connected", WITHIN, async || {
        let (condition, replicas) = connected(&connectors.get(&name).await?);
        Ok(condition
            .filter(|c| c.status == "False" && replicas.is_empty())
            .map(|c| c.reason))
    })
    .await?;
    assert_eq!(
        gone, "NoTunnels",
        "proxy-a removes its entry when the tunnels close, before it could lapse"
    );
    eventually(
        "the group counting no connected connector",
        WITHIN,
        async || {
            let group = groups.get("dc").await?;
            Ok((group.status.map(|s| s.connected_connectors) == Some(0)).then_some(()))
        },
    )
    .await?;
    app_ready("False", Some("NoConnectedConnectors")).await?;
    Ok(())
}
