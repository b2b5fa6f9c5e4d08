//! The data plane end to end, as real processes against the real control plane: the
//! operator, two proxy replicas (running as their least-privileged ServiceAccount) and
//! a connector that registers with its group's token and dials out to both; a
//! passthrough app served from a real backend through the tunnel; revocation by deleting
//! the Connector object.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams};
use sallyport_api::Connector;
use sallyport_e2e::dataplane::{
    Backend, Fleet, REACTION_TIMEOUT, StepError, eventually, https_get,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "wiki.dataplane.test";

#[tokio::test]
async fn a_passthrough_app_is_served_through_outbound_tunnels_and_revocation_cuts_them()
-> TestResult {
    // The operator, the fleet's PKI as the proxy pods would mount it, and two proxy
    // replicas running as the proxy's ServiceAccount.
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "dataplane",
        &["proxy-a", "proxy-b"],
    )
    .await?;
    let client = fleet.bed.client.clone();
    let bed = &fleet.bed;
    let (a, b) = (fleet.proxies[0].ports, fleet.proxies[1].ports);

    // The app: a ConnectorGroup, a TLS Secret and a passthrough PublishedApp whose
    // internal URL is a real backend.
    let backend = Backend::start("wiki").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("wiki", APP_HOST, &backend.url(), "dc")
        .await?;

    // Before any connector: a clear 503 naming the group, quickly.
    let answer = eventually("a 503 without connectors", REACTION_TIMEOUT, async || {
        let answer = https_get(a.listen, APP_HOST, &app_ca, "/").await?;
        Ok((answer.status == 503).then_some(answer))
    })
    .await?;
    assert!(answer.text().contains("dc"), "{}", answer.text());
    assert!(answer.headers.contains_key("x-request-id"));
    assert_eq!(backend.requests(), 0);

    // robots.txt is answered by the proxy itself.
    let robots = https_get(a.listen, APP_HOST, &app_ca, "/robots.txt").await?;
    assert_eq!(robots.status, 200);
    assert_eq!(robots.text(), "User-agent: *\nDisallow: /\n");

    // A connector registers with the group's token and dials out to both replicas.
    let state = tempfile::tempdir()?;
    let _connector = fleet
        .connector(&group, &state.path().join("connector"))
        .start()?;

    // Through either replica, the backend answers, with forwarding headers set and the
    // internal header stripped.
    for address in [a.listen, b.listen] {
        let answer = eventually(
            &format!("a 200 through {address}"),
            REACTION_TIMEOUT,
            async || {
                let answer = https_get(address, APP_HOST, &app_ca, "/pages/home?tab=1").await?;
                Ok((answer.status == 200).then_some(answer))
            },
        )
        .await?;
        let text = answer.text();
        assert!(text.contains("backend=wiki"), "{text}");
        assert!(text.contains("target=/pages/home?tab=1"), "{text}");
        assert!(text.contains("x-forwarded-for=127.0.0.1"), "{text}");
        assert!(
            text.contains(&format!("x-forwarded-host={APP_HOST}")),
            "{text}"
        );
        assert!(text.contains("x-forwarded-proto=https"), "{text}");
        assert!(text.contains("sallyport-app=-"), "{text}");
    }

    // The registration is recorded as a Connector object with its certificate.
    let connectors = Api::<Connector>::namespaced(client.clone(), &bed.namespace);
    let connector = eventually("a Connector object", REACTION_TIMEOUT, async || {
        let list = connectors.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|c| c.spec.connector_group == "dc"))
    })
    .await?;
    let name = connector
        .metadata
        .name
        .clone()
        .ok_or("the Connector has no name")?;
    assert!(
        connector
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some(),
        "{connector:?}"
    );
    let token_uses = Api::<Secret>::namespaced(client.clone(), &bed.namespace)
        .get("dc-registration")
        .await?
        .metadata
        .annotations
        .unwrap_or_default()
        .get("sallyport.dev/uses")
        .cloned();
    assert_eq!(token_uses.as_deref(), Some("1"));

    // Deleting the Connector revokes it: its tunnels close within seconds, and requests
    // get the clear 503 again, never reaching the backend.
    connectors.delete(&name, &DeleteParams::default()).await?;
    for address in [a.listen, b.listen] {
        eventually(
            &format!("revocation reaching {address}"),
            REACTION_TIMEOUT,
            async || {
                let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
                Ok((answer.status == 503).then_some(()))
            },
        )
        .await?;
    }
    let served_before = backend.requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for address in [a.listen, b.listen] {
        let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
        assert_eq!(
            answer.status, 503,
            "a revoked connector still carries traffic via {address}"
        );
    }
    assert_eq!(backend.requests(), served_before);
    Ok(())
}
