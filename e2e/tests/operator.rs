//! The operator as a real process against a real kube-apiserver: PublishedApp and
//! ConditionalAccessPolicy status tell the truth as references appear, break and get
//! fixed, routes conflict, policies change, and a restart changes nothing.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use sallyport_api::{
    ConditionalAccessPolicy, Connector, ConnectorGroup, FleetConfig, PublishedApp,
};
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::manifests::self_signed_tls_secret;
use sallyport_e2e::process::{
    OwnedProcess, ProcessError, start_operator as start_operator_process,
};
use sallyport_e2e::testbed::Testbed;
use serde::de::DeserializeOwned;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Bound on waiting for the operator to react; generous for a busy 2-core machine.
const REACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `name` until `check` holds, returning it; on timeout, the error shows the object.
async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    check: impl Fn(&K) -> bool,
) -> Result<K, String>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = tokio::time::Instant::now() + REACTION_TIMEOUT;
    loop {
        let current = api.get_opt(name).await.map_err(|e| e.to_string())?;
        if let Some(object) = current.as_ref().filter(|o| check(o)) {
            return Ok(object.clone());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{name}: {what} did not happen within {REACTION_TIMEOUT:?}; last seen: {current:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(status, reason)` of the condition `type_` of an app.
fn condition(app: &PublishedApp, type_: &str) -> Option<(String, String)> {
    let conditions = &app.status.as_ref()?.conditions;
    let found = conditions.iter().find(|c| c.type_ == type_)?;
    Some((found.status.clone(), found.reason.clone()))
}

fn has(app: &PublishedApp, type_: &str, status: &str, reason: &str) -> bool {
    condition(app, type_) == Some((status.to_owned(), reason.to_owned()))
}

fn from_yaml<K: DeserializeOwned>(yaml: &str) -> Result<K, serde_yaml::Error> {
    serde_yaml::from_str(yaml)
}

/// resourceVersions of every Sallyport object in `namespaces`: equal snapshots mean the
/// operator wrote nothing in between.
async fn snapshot(
    client: &kube::Client,
    namespaces: &[&str],
) -> Result<BTreeMap<String, String>, kube::Error> {
    let mut versions = BTreeMap::new();
    for namespace in namespaces {
        let lp = ListParams::default();
        for o in Api::<PublishedApp>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
        {
            versions.insert(
                format!("papp/{namespace}/{}", o.name_any()),
                o.resource_version().unwrap_or_default(),
            );
        }
        for o in Api::<ConditionalAccessPolicy>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
        {
            versions.insert(
                format!("cap/{namespace}/{}", o.name_any()),
                o.resource_version().unwrap_or_default(),
            );
        }
        for o in Api::<ConnectorGroup>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
        {
            versions.insert(
                format!("cg/{namespace}/{}", o.name_any()),
                o.resource_version().unwrap_or_default(),
            );
        }
        let events = Api::<Event>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?;
        versions.insert(
            format!("events/{namespace}"),
            events.items.len().to_string(),
        );
    }
    Ok(versions)
}

/// The fleet configuration the operator published, decoded.
async fn fleet_config(client: &kube::Client, namespace: &str) -> Option<FleetConfig> {
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt("sallyport-fleet-config")
        .await
        .ok()??;
    let bytes = config_map.binary_data?.remove("fleet-config.json.gz")?;
    FleetConfig::from_gzip_json(&bytes.0).ok()
}

/// Waits until the published configuration satisfies `check`.
async fn wait_for_config(
    client: &kube::Client,
    namespace: &str,
    what: &str,
    check: impl Fn(&FleetConfig) -> bool,
) -> Result<FleetConfig, String> {
    let deadline = tokio::time::Instant::now() + REACTION_TIMEOUT;
    loop {
        let current = fleet_config(client, namespace).await;
        if let Some(config) = current.as_ref().filter(|c| check(c)) {
            return Ok(config.clone());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "fleet configuration: {what} did not happen within {REACTION_TIMEOUT:?}; last seen: {current:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start_operator(kubeconfig: &Path, namespace: &str) -> Result<OwnedProcess, ProcessError> {
    start_operator_process(
        kubeconfig,
        namespace,
        &[
            "--default-oidc-issuer",
            "https://login.example.com/",
            // The Connector's tunnel entry written below is never renewed.
            "--tunnel-stale-after",
            "1h",
        ],
    )
}

#[tokio::test]
async fn the_operator_reports_the_truth_about_apps_and_policies() -> TestResult {
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
    // The operator runs as its own ServiceAccount, with only the RBAC it ships with.
    let can_i = |verb: &str, resource: &str| -> Result<String, Box<dyn std::error::Error>> {
        let output = control_plane
            .kubectl()
            .env("KUBECONFIG", &operator_kubeconfig)
            .args(["auth", "can-i", verb, resource, "--all-namespaces"])
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    assert_eq!(can_i("list", "publishedapps.sallyport.dev")?, "yes");
    assert_eq!(
        can_i("delete", "secrets")?,
        "no",
        "the operator must not delete Secrets"
    );
    assert_eq!(
        can_i("update", "publishedapps.sallyport.dev")?,
        "no",
        "the operator must not change specs"
    );
    let mut operator = start_operator(&operator_kubeconfig, &operator_namespace)?;

    let apps = Api::<PublishedApp>::namespaced(client.clone(), &namespace);
    let groups = Api::<ConnectorGroup>::namespaced(client.clone(), &namespace);
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let policies = Api::<ConditionalAccessPolicy>::namespaced(client.clone(), &namespace);
    let pp = PostParams::default();

    // 1. A dangling ConnectorGroup reference is reported, with an Event.
    let wiki: PublishedApp = from_yaml(
        "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {name: wiki, labels: {tier: internal}}\nspec:\n  externalUrl: https://wiki.apps.example.com/\n  internalUrl: http://wiki.corp.internal/\n  connectorGroup: {name: dc}\n  tls: {secretName: wiki-tls}\n",
    )?;
    apps.create(&pp, &wiki).await?;
    let seen = wait_for(&apps, "wiki", "ConnectorGroupNotFound", |a| {
        has(a, "ResolvedRefs", "False", "ConnectorGroupNotFound")
    })
    .await?;
    assert!(has(&seen, "Accepted", "True", "Accepted"));
    assert!(has(&seen, "Ready", "False", "RefsNotResolved"));
    assert_eq!(
        seen.status.as_ref().and_then(|s| s.url.as_deref()),
        Some("https://wiki.apps.example.com/")
    );
    let events = Api::<Event>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ConnectorGroupNotFound")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("wiki")),
        "no ConnectorGroupNotFound Event for wiki: {events:#?}"
    );

    // The fleet's PKI and keys exist in the operator's namespace.
    let fleet_secrets = Api::<Secret>::namespaced(client.clone(), &operator_namespace);
    let pki = [
        ("sallyport-root-ca", "tls.key"),
        ("sallyport-connector-issuer", "tls.key"),
        ("sallyport-tunnel-tls", "ca.crt"),
        ("sallyport-session-keys", "keys.json"),
        ("sallyport-assertion-signing", "jwks.json"),
    ];
    for (name, key) in pki {
        let holds_key = |s: &Secret| {
            s.data
                .as_ref()
                .is_some_and(|d| d.get(key).is_some_and(|v| !v.0.is_empty()))
        };
        wait_for(&fleet_secrets, name, "the PKI Secret", holds_key).await?;
    }

    // 2. The group appears; the TLS Secret is missing, then wrong, then right.
    groups.create(&pp, &from_yaml("apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {name: dc}\nspec: {}\n")?).await?;
    wait_for(&apps, "wiki", "TLSSecretNotFound", |a| {
        has(a, "ResolvedRefs", "False", "TLSSecretNotFound")
    })
    .await?;
    secrets
        .create(
            &pp,
            &self_signed_tls_secret("wiki-tls", "other.example.com")?,
        )
        .await?;
    let seen = wait_for(&apps, "wiki", "TLSSecretInvalid", |a| {
        has(a, "ResolvedRefs", "False", "TLSSecretInvalid")
    })
    .await?;
    let message = seen
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "ResolvedRefs"))
        .map(|c| c.message.clone());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("not for wiki.apps.example.com")),
        "{message:?}"
    );
    secrets
        .replace(
            "wiki-tls",
            &pp,
            &self_signed_tls_secret("wiki-tls", "*.apps.example.com")?,
        )
        .await?;
    wait_for(&apps, "wiki", "NoConnectedConnectors", |a| {
        has(a, "ResolvedRefs", "True", "ResolvedRefs")
            && has(a, "Ready", "False", "NoConnectedConnectors")
    })
    .await?;

    // 3. A connector of the group connects: the group counts it, and the app is Ready.
    let connectors = Api::<Connector>::namespaced(client.clone(), &namespace);
    connectors
        .create(&pp, &from_yaml("apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {name: conn-1}\nspec: {connectorGroup: dc}\n")?)
        .await?;
    // A proxy replica reports a tunnel of it; the operator makes it Connected.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let connected = json!({
        "apiVersion": "sallyport.dev/v1alpha1", "kind": "Connector",
        "status": {"tunnels": [{"proxy": "proxy-x", "since": now, "renewedAt": now}]},
    });
    connectors
        .patch_status(
            "conn-1",
            &PatchParams::apply("sallyport-proxy/proxy-x").force(),
            &Patch::Apply(&connected),
        )
        .await?;
    let seen = wait_for(&apps, "wiki", "Ready", |a| has(a, "Ready", "True", "Ready")).await?;
    let group_readiness = seen.status.and_then(|s| s.connector_group);
    assert_eq!(
        group_readiness.map(|g| (g.ready, g.connected_connectors)),
        Some((true, 1))
    );

    // The compiled fleet configuration carries the app's route to its group.
    let wiki_id = format!("{namespace}/wiki");
    let config = wait_for_config(&client, &operator_namespace, "the wiki route", |c| {
        c.route(&wiki_id).is_some()
    })
    .await?;
    let route = config.route(&wiki_id).ok_or("no wiki route")?;
    assert_eq!(
        (route.host.as_str(), route.path_prefix.as_str()),
        ("wiki.apps.example.com", "/")
    );
    assert_eq!(route.connector_group, format!("{namespace}/dc"));

    // 4. Policies: one of the app's namespace selecting it, and a fleet-wide baseline.
    let policy = |name: &str, apps: &str| {
        from_yaml::<ConditionalAccessPolicy>(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: {name}}}\nspec:\n  assignments: {{apps: {apps}, users: {{include: ['*']}}}}\n  grant: {{require: {{mfa: true}}}}\n"
        ))
    };
    policies
        .create(
            &pp,
            &policy("require-mfa", "{selector: {matchLabels: {tier: internal}}}")?,
        )
        .await?;
    Api::<ConditionalAccessPolicy>::namespaced(client.clone(), &operator_namespace)
        .create(&pp, &policy("baseline", "{selector: {}}")?)
        .await?;
    let expected = vec![
        "require-mfa".to_owned(),
        format!("{operator_namespace}/baseline"),
    ];
    wait_for(&apps, "wiki", "appliedPolicies", |a| {
        a.status
            .as_ref()
            .is_some_and(|s| s.applied_policies == expected)
    })
    .await?;
    let seen = wait_for(&policies, "require-mfa", "matchedApps 1", |p| {
        p.status.as_ref().is_some_and(|s| s.matched_apps == 1)
    })
    .await?;
    let ready = seen
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"));
    assert_eq!(
        ready.map(|c| (c.status, c.reason)),
        Some(("True".to_owned(), "Enforced".to_owned()))
    );

    // 5. A second app on the same route is refused while the first holds it.
    let copy: PublishedApp = from_yaml(
        "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {name: wiki-copy}\nspec:\n  externalUrl: https://wiki.apps.example.com\n  internalUrl: http://wiki2.corp.internal/\n  connectorGroup: {name: dc}\n  tls: {secretName: wiki-tls}\n",
    )?;
    apps.create(&pp, &copy).await?;
    let seen = wait_for(&apps, "wiki-copy", "HostConflict", |a| {
        has(a, "Accepted", "False", "HostConflict")
    })
    .await?;
    let message = seen
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"))
        .map(|c| c.message.clone());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains(&format!("{namespace}/wiki"))),
        "{message:?}"
    );
    assert!(
        has(&apps.get("wiki").await?, "Accepted", "True", "Accepted"),
        "the older app must keep its route"
    );

    apps.delete("wiki", &DeleteParams::default()).await?;
    wait_for(&apps, "wiki-copy", "route released", |a| {
        has(a, "Accepted", "True", "Accepted") && has(a, "Ready", "True", "Ready")
    })
    .await?;
    wait_for(&policies, "require-mfa", "matchedApps 0", |p| {
        p.status.as_ref().is_some_and(|s| s.matched_apps == 0)
    })
    .await?;

    // 6. Settled, the operator writes nothing, and a restarted operator writes nothing either.
    let watched = [namespace.as_str(), operator_namespace.as_str()];
    let before = snapshot(&client, &watched).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        snapshot(&client, &watched).await?,
        before,
        "the operator wrote to a settled cluster"
    );
    operator.stop();
    operator = start_operator(&operator_kubeconfig, &operator_namespace)?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        snapshot(&client, &watched).await?,
        before,
        "a restarted operator wrote to a settled cluster"
    );

    // ... and it is alive: a label change is picked up.
    let label = json!({"metadata": {"labels": {"tier": "internal"}}});
    apps.patch("wiki-copy", &PatchParams::default(), &Patch::Merge(&label))
        .await?;
    wait_for(
        &policies,
        "require-mfa",
        "matchedApps 1 after restart",
        |p| p.status.as_ref().is_some_and(|s| s.matched_apps == 1),
    )
    .await?;
    operator.stop();
    Ok(())
}
