//! The data plane end to end, as real processes against the real control plane: the
//! operator, two proxy replicas (running as their least-privileged ServiceAccount) and
//! a connector that registers with its group's token and dials out to both; a
//! passthrough app served from a real backend through the tunnel; revocation by deleting
//! the Connector object.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sallyport_api::{Connector, ConnectorGroup, PublishedApp};
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::dataplane::{
    Backend, StepError, https_get, start_connector, start_proxy, wait_for_port, write_secret_dir,
};
use sallyport_e2e::identity::proxy_kubeconfig;
use sallyport_e2e::manifests::self_signed_tls_secret;
use sallyport_e2e::process::start_operator;
use sallyport_e2e::testbed::Testbed;
use serde_json::json;

type TestResult = Result<(), StepError>;

/// Generous for a busy 2-core machine.
const REACTION_TIMEOUT: Duration = Duration::from_secs(30);
const TUNNEL_HOST: &str = "tunnel.dataplane.test";
const APP_HOST: &str = "wiki.dataplane.test";

async fn eventually<T>(
    what: &str,
    mut step: impl AsyncFnMut() -> Result<Option<T>, StepError>,
) -> Result<T, StepError> {
    let deadline = tokio::time::Instant::now() + REACTION_TIMEOUT;
    let mut last_error = None;
    loop {
        match step().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error.to_string()),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{what} did not happen within {REACTION_TIMEOUT:?} (last error: {last_error:?})"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_passthrough_app_is_served_through_outbound_tunnels_and_revocation_cuts_them()
-> TestResult {
    let bed = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "dataplane",
    )
    .await
    .map_err(|e| e.to_string())?;
    let client = bed.client.clone();
    let _operator = start_operator(
        &bed.operator_kubeconfig,
        &bed.operator_namespace,
        &["--tunnel-hostname", TUNNEL_HOST],
    )?;

    // The app: a ConnectorGroup, a TLS Secret and a passthrough PublishedApp whose
    // internal URL is a real backend.
    let backend = Backend::start("wiki").await?;
    let group: ConnectorGroup = serde_json::from_value(json!({
        "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup",
        "metadata": {"name": "dc"}, "spec": {}
    }))?;
    Api::<ConnectorGroup>::namespaced(client.clone(), &bed.namespace)
        .create(&PostParams::default(), &group)
        .await?;
    let tls = self_signed_tls_secret("wiki-tls", APP_HOST)?;
    let app_ca = tls
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|v| v.0.clone())
        .ok_or("the TLS Secret has no tls.crt")?;
    Api::<Secret>::namespaced(client.clone(), &bed.namespace)
        .create(&PostParams::default(), &tls)
        .await?;
    let app: PublishedApp = serde_json::from_value(json!({
        "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
        "metadata": {"name": "wiki"},
        "spec": {
            "externalUrl": format!("https://{APP_HOST}/"),
            "internalUrl": backend.url(),
            "preAuthentication": {"type": "Passthrough"},
            "connectorGroup": {"name": "dc"},
            "tls": {"secretName": "wiki-tls"}
        }
    }))?;
    Api::<PublishedApp>::namespaced(client.clone(), &bed.namespace)
        .create(&PostParams::default(), &app)
        .await?;

    // The fleet's PKI, as the proxy pods would mount it.
    let pki = tempfile::tempdir()?;
    for (secret, dir) in [
        ("sallyport-tunnel-tls", "tunnel-tls"),
        ("sallyport-connector-issuer", "connector-issuer"),
    ] {
        eventually(&format!("Secret {secret}"), async || {
            let files = write_secret_dir(
                &client,
                &bed.operator_namespace,
                secret,
                &pki.path().join(dir),
            )
            .await?;
            Ok(files.contains_key("tls.key").then_some(()))
        })
        .await?;
    }

    // Two proxy replicas, as the proxy's ServiceAccount.
    let proxy_kubeconfig = proxy_kubeconfig(bed.control_plane, &bed.operator_namespace)
        .await
        .map_err(|e| e.to_string())?;
    let (_proxy_a, a) = start_proxy(
        &proxy_kubeconfig,
        &bed.operator_namespace,
        "proxy-a",
        pki.path(),
        TUNNEL_HOST,
    )?;
    let (_proxy_b, b) = start_proxy(
        &proxy_kubeconfig,
        &bed.operator_namespace,
        "proxy-b",
        pki.path(),
        TUNNEL_HOST,
    )?;
    for ports in [a, b] {
        wait_for_port(ports.listen, REACTION_TIMEOUT).await?;
    }

    // Before any connector: a clear 503 naming the group, quickly.
    let answer = eventually("a 503 without connectors", async || {
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
    let token_secret = eventually("the registration token with the fleet CA", async || {
        let secret = Api::<Secret>::namespaced(client.clone(), &bed.namespace)
            .get_opt("dc-registration")
            .await?;
        Ok(secret
            .and_then(|s| s.data)
            .filter(|d| d.contains_key("ca.crt") && d.contains_key("token")))
    })
    .await?;
    let token = String::from_utf8(
        token_secret
            .get("token")
            .map(|t| t.0.clone())
            .unwrap_or_default(),
    )?;
    let state = tempfile::tempdir()?;
    let fleet_ca = state.path().join("fleet-ca.crt");
    std::fs::write(
        &fleet_ca,
        token_secret
            .get("ca.crt")
            .map(|c| c.0.clone())
            .unwrap_or_default(),
    )?;
    let group_id = format!("{}/dc", bed.namespace);
    let _connector = start_connector(
        &[a.listen, b.listen],
        TUNNEL_HOST,
        &fleet_ca,
        &group_id,
        &token,
        &state.path().join("connector"),
    )?;

    // Through either replica, the backend answers, with forwarding headers set and the
    // internal header stripped.
    for address in [a.listen, b.listen] {
        let answer = eventually(&format!("a 200 through {address}"), async || {
            let answer = https_get(address, APP_HOST, &app_ca, "/pages/home?tab=1").await?;
            Ok((answer.status == 200).then_some(answer))
        })
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
    let connector = eventually("a Connector object", async || {
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
        eventually(&format!("revocation reaching {address}"), async || {
            let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 503).then_some(()))
        })
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
