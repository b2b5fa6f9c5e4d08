//! The kubectl experience against a real kube-apiserver, operator, proxy and connector:
//! `kubectl get sallyport` lists the objects of all four kinds; `kubectl describe` of an
//! app whose TLS Secret is missing shows the condition and a Warning Event naming the
//! Secret and the fix, and after the fix the app is Ready and describe says so; a policy
//! that applies to no app gets a Warning naming what it asks for; the
//! plugin `kubectl sallyport`, found by kubectl's plugin discovery on PATH, reports the
//! broken app with its reason and fix and exits non-zero, then zero once fixed; and
//! `kubectl sallyport whatif` prints a decision.

use std::path::Path;
use std::process::Output;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};
use sallyport_e2e::controlplane::ControlPlane;
use sallyport_e2e::dataplane::{Fleet, REACTION_TIMEOUT, StepError, eventually};
use sallyport_e2e::manifests::{create, self_signed_tls_secret};
use sallyport_e2e::process::workspace_binary;
use serde_json::json;

type TestResult = Result<(), StepError>;

/// Runs kubectl with `args` (the plugin's directory first on PATH) and returns its
/// output.
async fn kubectl(control_plane: &ControlPlane, args: &[&str]) -> Result<Output, StepError> {
    let plugin_dir = workspace_binary("kubectl-sallyport")?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("the plugin has no directory")?;
    let path = std::env::join_paths(std::iter::once(plugin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    let mut command = control_plane.kubectl();
    command.args(args).env("PATH", path);
    Ok(tokio::process::Command::from(command).output().await?)
}

/// kubectl's stdout, failing on a non-zero exit status.
async fn kubectl_ok(control_plane: &ControlPlane, args: &[&str]) -> Result<String, StepError> {
    let output = kubectl(control_plane, args).await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "kubectl {args:?}: {}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(stdout)
}

/// The `(status, reason)` of condition `type_` of app `name`.
async fn app_condition(
    apps: &Api<PublishedApp>,
    name: &str,
    type_: &str,
) -> Result<Option<(String, String)>, StepError> {
    Ok(apps
        .get(name)
        .await?
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_))
        .map(|c| (c.status, c.reason)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_describe_and_the_plugin_tell_what_to_fix() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "kubectl",
        &["proxy-a"],
    )
    .await?;
    let bed = &fleet.bed;
    let (cp, ns, ops) = (
        bed.control_plane,
        bed.namespace.as_str(),
        bed.operator_namespace.as_str(),
    );

    // A group with a real connector, an OIDC app with its TLS Secret, one whose Secret
    // is missing, and a policy requiring MFA on the first.
    let group = fleet.create_group("dc", json!({})).await?;
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&group, state.path()).start()?;
    let groups = Api::<ConnectorGroup>::namespaced(bed.client.clone(), ns);
    eventually(
        "a connected connector in group dc",
        REACTION_TIMEOUT,
        async || {
            let connected = groups
                .get("dc")
                .await?
                .status
                .map_or(0, |s| s.connected_connectors);
            Ok((connected > 0).then_some(()))
        },
    )
    .await?;
    Api::<Secret>::namespaced(bed.client.clone(), ns)
        .create(
            &PostParams::default(),
            &self_signed_tls_secret("wiki-tls", "wiki.kubectl.test")?,
        )
        .await?;
    for (name, secret) in [("wiki", "wiki-tls"), ("crm", "crm-tls")] {
        create(
            bed.client.clone(),
            ns,
            &json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
                "metadata": {"name": name},
                "spec": {
                    "externalUrl": format!("https://{name}.kubectl.test/"),
                    "internalUrl": format!("http://{name}.corp.internal/"),
                    "connectorGroup": {"name": "dc"},
                    "preAuthentication": {"type": "OIDC", "oidc": {
                        "issuerUrl": "https://login.kubectl.test/", "clientId": name}},
                    "tls": {"secretName": secret},
                }
            }),
        )
        .await?;
    }
    for (name, app) in [("require-mfa", "wiki"), ("orphan", "gone")] {
        create(
            bed.client.clone(),
            ns,
            &json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConditionalAccessPolicy",
                "metadata": {"name": name},
                "spec": {
                    "assignments": {"apps": {"names": [app]}, "users": {"include": ["*"]}},
                    "grant": {"require": {"mfa": true}},
                }
            }),
        )
        .await?;
    }
    let policies = Api::<ConditionalAccessPolicy>::namespaced(bed.client.clone(), ns);
    eventually(
        "policy require-mfa matching app wiki",
        REACTION_TIMEOUT,
        async || {
            let matched = policies
                .get("require-mfa")
                .await?
                .status
                .map_or(0, |s| s.matched_apps);
            Ok((matched == 1).then_some(()))
        },
    )
    .await?;
    let apps = Api::<PublishedApp>::namespaced(bed.client.clone(), ns);
    for (name, expected) in [("wiki", "True"), ("crm", "False")] {
        eventually(
            &format!("app {name} Ready={expected}"),
            REACTION_TIMEOUT,
            async || {
                Ok(app_condition(&apps, name, "Ready")
                    .await?
                    .filter(|(status, _)| status == expected))
            },
        )
        .await?;
    }

    // kubectl get sallyport: every object of the four kinds.
    let connectors = Api::<Connector>::namespaced(bed.client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let registered = connectors.items.first().ok_or("no Connector registered")?;
    let connector = registered.metadata.name.clone().unwrap_or_default();
    let not_after = registered
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .map(|c| c.not_after.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .ok_or("the Connector has no certificate in its status")?;
    let listed = kubectl_ok(cp, &["get", "sallyport", "-n", ns, "-o", "name"]).await?;
    let mut names: Vec<&str> = listed.lines().collect();
    names.sort_unstable();
    let connector_name = format!("connector.sallyport.dev/{connector}");
    let mut expected = vec![
        "conditionalaccesspolicy.sallyport.dev/orphan",
        "conditionalaccesspolicy.sallyport.dev/require-mfa",
        "connectorgroup.sallyport.dev/dc",
        connector_name.as_str(),
        "publishedapp.sallyport.dev/crm",
        "publishedapp.sallyport.dev/wiki",
    ];
    expected.sort_unstable();
    assert_eq!(names, expected, "kubectl get sallyport -o name:\n{listed}");
    // The default table: each kind's columns, the broken app's READY and REASON.
    let table = kubectl_ok(cp, &["get", "sallyport", "-n", ns]).await?;
    let crm = table
        .lines()
        .find(|l| l.starts_with("publishedapp.sallyport.dev/crm"))
        .unwrap_or_default();
    // A future expiry reads as a time, not as kubectl's `<invalid>` age.
    let connector_row = table
        .lines()
        .find(|l| l.starts_with(&connector_name))
        .unwrap_or_default();
    assert!(
        connector_row.contains(&not_after),
        "CERT-EXPIRES {not_after} missing from kubectl get sallyport:\n{table}"
    );
    assert!(
        table.contains("REASON")
            && crm.contains("False")
            && crm.contains("RefsNotResolved")
            && table.contains("CONNECTED")
            && table.contains("MATCHED"),
        "kubectl get sallyport:\n{table}"
    );

    // kubectl describe: the condition, and a Warning Event naming the Secret and the fix.
    let missing = format!("TLS Secret {ns}/crm-tls does not exist");
    let described = eventually(
        "a TLSSecretNotFound Warning Event in kubectl describe",
        REACTION_TIMEOUT,
        async || {
            let described = kubectl_ok(cp, &["describe", "publishedapp", "crm", "-n", ns]).await?;
            let events = described.split("Events:").nth(1).unwrap_or_default();
            Ok(events
                .lines()
                .any(|l| l.contains("Warning") && l.contains("TLSSecretNotFound"))
                .then_some(described))
        },
    )
    .await?;
    let events = described.split("Events:").nth(1).unwrap_or_default();
    let flat: String = events.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        described.contains("ResolvedRefs")
            && described.contains(&missing)
            && flat.contains(&format!("{missing}. Fix: create it"))
            && flat.contains("spec.tls.secretName"),
        "kubectl describe publishedapp crm:\n{described}"
    );

    // A policy that applies to no app: a Warning naming what it asks for.
    let described = eventually(
        "a NoMatchedApps Warning Event in kubectl describe",
        REACTION_TIMEOUT,
        async || {
            let described = kubectl_ok(
                cp,
                &["describe", "conditionalaccesspolicy", "orphan", "-n", ns],
            )
            .await?;
            let events = described.split("Events:").nth(1).unwrap_or_default();
            Ok(events
                .lines()
                .any(|l| l.contains("Warning") && l.contains("NoMatchedApps"))
                .then_some(described))
        },
    )
    .await?;
    let events = described.split("Events:").nth(1).unwrap_or_default();
    let flat: String = events.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(&format!(
            "spec.assignments.apps (names gone) matches no app of namespace {ns}"
        )) && flat.contains("Fix: label the apps"),
        "kubectl describe conditionalaccesspolicy orphan:\n{described}"
    );

    // kubectl sallyport status, found on PATH by kubectl: the broken app, its reason and
    // fix; exit status 3.
    let status_args = ["sallyport", "status", "-n", ns, "--operator-namespace", ops];
    let status = kubectl(cp, &status_args).await?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status.status.code(),
        Some(3),
        "kubectl sallyport status: {text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for part in [
        format!("Operator: ready, namespace {ops}, leader e2e-operator-{ops}"),
        format!("{ns}/crm"),
        "TLSSecretNotFound".to_owned(),
        missing.clone(),
        "fix: create it (kubectl create secret tls".to_owned(),
        format!("{ns}/dc"),
        "1/1".to_owned(),
        "Policies: 2 enabled, 0 report-only, 0 disabled.".to_owned(),
        "applies to no app; label the apps".to_owned(),
        format!("Not ready: PublishedApp {ns}/crm (TLSSecretNotFound)."),
    ] {
        assert!(text.contains(&part), "{part:?} missing from\n{text}");
    }

    // The fix: the Secret. The app turns Ready, and describe says so.
    Api::<Secret>::namespaced(bed.client.clone(), ns)
        .create(
            &PostParams::default(),
            &self_signed_tls_secret("crm-tls", "crm.kubectl.test")?,
        )
        .await?;
    eventually("app crm Ready", REACTION_TIMEOUT, async || {
        Ok(app_condition(&apps, "crm", "Ready")
            .await?
            .filter(|(status, _)| status == "True"))
    })
    .await?;
    let described = eventually(
        "a Normal Ready Event in kubectl describe",
        REACTION_TIMEOUT,
        async || {
            let described = kubectl_ok(cp, &["describe", "publishedapp", "crm", "-n", ns]).await?;
            let events = described.split("Events:").nth(1).unwrap_or_default();
            Ok(events
                .lines()
                .any(|l| l.contains("Normal") && l.contains("Ready is true"))
                .then_some(described))
        },
    )
    .await?;
    let conditions = described.split("Events:").next().unwrap_or_default();
    let flat: String = conditions.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        !conditions.contains("TLSSecretNotFound")
            && flat.contains("Reason: Ready Status: True Type: Ready"),
        "kubectl describe publishedapp crm after the fix:\n{described}"
    );
    let status = kubectl(cp, &status_args).await?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status.status.code(),
        Some(0),
        "kubectl sallyport status: {text}"
    );
    assert!(
        text.contains("All ready: 2 app(s), 1 group(s), 2 policy(ies)."),
        "{text}"
    );

    // kubectl sallyport whatif: the operator's what-if, from the cluster.
    let whatif = kubectl(
        cp,
        &[
            "sallyport",
            "whatif",
            "--operator-namespace",
            ops,
            "--app",
            &format!("{ns}/wiki"),
            "--user",
            "alice",
            "--ip",
            "203.0.113.7",
            "--amr",
            "pwd",
        ],
    )
    .await?;
    let text = String::from_utf8_lossy(&whatif.stdout);
    assert_eq!(
        whatif.status.code(),
        Some(3),
        "kubectl sallyport whatif: {text}{}",
        String::from_utf8_lossy(&whatif.stderr)
    );
    assert!(
        text.contains("stepUp") && text.contains(&format!("{ns}/require-mfa")),
        "{text}"
    );
    let help = kubectl_ok(cp, &["sallyport", "--help"]).await?;
    assert!(help.contains("kubectl sallyport status -A"), "{help}");
    Ok(())
}
