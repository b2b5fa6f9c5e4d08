//! The Sallyport API as a real kube-apiserver serves it: the generated CRDs install and
//! become Established, every example is accepted, malformed objects are rejected with a
//! message naming the field, and kubectl shows the printer columns and field docs.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use sallyport_e2e::controlplane::{ControlPlane, Mode};
use sallyport_e2e::manifests::{api_for, create, install_crds, repo_path, yaml_documents};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The shared control plane with the committed CRDs (crds/*.yaml) installed and
/// Established.
async fn control_plane() -> Result<&'static ControlPlane, Box<dyn std::error::Error>> {
    let control_plane = ControlPlane::shared(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
    )?;
    install_crds(&control_plane.client().await?).await?;
    Ok(control_plane)
}

fn kubectl(
    control_plane: &ControlPlane,
    args: &[&str],
) -> Result<String, Box<dyn std::error::Error>> {
    let output = control_plane.kubectl().args(args).output()?;
    if !output.status.success() {
        return Err(format!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test]
async fn crds_are_established_with_names_scope_and_status() -> TestResult {
    let crds = Api::<CustomResourceDefinition>::all(control_plane().await?.client().await?);
    let expected = [
        ("publishedapps", "PublishedApp", "papp"),
        ("connectorgroups", "ConnectorGroup", "cg"),
        (
            "conditionalaccesspolicies",
            "ConditionalAccessPolicy",
            "cap",
        ),
        ("connectors", "Connector", "conn"),
    ];
    for (plural, kind, short_name) in expected {
        let crd = crds.get(&format!("{plural}.sallyport.dev")).await?;
        let names = &crd.spec.names;
        assert_eq!(names.kind, kind);
        assert_eq!(
            names.short_names.as_deref(),
            Some(&[short_name.to_owned()][..])
        );
        assert_eq!(
            names.categories.as_deref(),
            Some(&["sallyport".to_owned()][..])
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            "{kind} has no status subresource"
        );
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{kind} is not Established");
    }
    Ok(())
}

#[tokio::test]
async fn every_example_is_accepted() -> TestResult {
    let control_plane = control_plane().await?;
    let namespace = control_plane.create_namespace("examples").await?;
    let client = control_plane.client().await?;
    let examples = yaml_documents(&repo_path("examples"))?;
    assert!(
        examples.len() >= 5,
        "expected the examples/ directory to hold examples"
    );
    for example in &examples {
        let name = example["metadata"]["name"].as_str().unwrap_or_default();
        create(client.clone(), &namespace, example)
            .await
            .map_err(|e| format!("example {} {name} was rejected: {e}", example["kind"]))?;
    }
    Ok(())
}

/// A minimal valid object of `kind`; each invalid case patches one field of it.
fn valid(kind: &str) -> Value {
    let spec = match kind {
        "PublishedApp" => json!({
            "externalUrl": "https://wiki.apps.example.com/",
            "internalUrl": "http://wiki.corp.internal:8080/",
            "connectorGroup": {"name": "datacenter-east"},
        }),
        "ConnectorGroup" => json!({}),
        "ConditionalAccessPolicy" => json!({
            "assignments": {"apps": {"selector": {}}, "users": {"include": ["*"]}},
            "grant": {"require": {"mfa": true}},
        }),
        "Connector" => json!({"connectorGroup": "datacenter-east"}),
        _ => Value::Null,
    };
    json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": kind,
        "metadata": {"generateName": "invalid-"},
        "spec": spec,
    })
}

/// One malformed object: `spec_patch` is merged into a valid `kind`; the apiserver must
/// refuse it with an error on `field` whose message contains `expect`.
struct Invalid {
    kind: &'static str,
    spec_patch: Value,
    field: &'static str,
    expect: &'static str,
}

fn invalid_cases() -> Vec<Invalid> {
    let case = |kind, spec_patch, field, expect| Invalid {
        kind,
        spec_patch,
        field,
        expect,
    };
    vec![
        // PublishedApp
        case(
            "PublishedApp",
            json!({"externalUrl": "http://wiki.apps.example.com/"}),
            "spec.externalUrl",
            "must start with https://",
        ),
        case(
            "PublishedApp",
            json!({"externalUrl": "https://wiki*.apps.example.com/"}),
            "spec.externalUrl",
            "only as the whole left-most label",
        ),
        case(
            "PublishedApp",
            json!({"externalUrl": "https://wiki.*.example.com/"}),
            "spec.externalUrl",
            "only as the whole left-most label",
        ),
        case(
            "PublishedApp",
            json!({"externalUrl": "https://wiki.apps.example.com/?tab=1"}),
            "spec.externalUrl",
            "no user info, query or fragment",
        ),
        case(
            "PublishedApp",
            json!({"externalUrl": "https://wiki/"}),
            "spec.externalUrl",
            "two or more labels",
        ),
        case(
            "PublishedApp",
            json!({"internalUrl": "ftp://files.corp.internal/"}),
            "spec.internalUrl",
            "must start with http:// or https://",
        ),
        case(
            "PublishedApp",
            json!({"internalUrl": "http://wiki.corp.internal/#top"}),
            "spec.internalUrl",
            "must not hold a query, a fragment or a wildcard",
        ),
        case(
            "PublishedApp",
            json!({"connectorGroup": {"name": "Datacenter_East"}}),
            "spec.connectorGroup.name",
            "must be a Kubernetes object name",
        ),
        case(
            "PublishedApp",
            json!({"connectorGroup": null}),
            "spec.connectorGroup",
            "Required value",
        ),
        case(
            "PublishedApp",
            json!({"preAuthentication": {"type": "SAML"}}),
            "spec.preAuthentication.type",
            "supported values: \"OIDC\", \"Passthrough\"",
        ),
        case(
            "PublishedApp",
            json!({"preAuthentication": {"type": "Passthrough", "oidc": {"issuerUrl": "https://login.example.com/", "clientId": "wiki"}}}),
            "spec.preAuthentication.oidc",
            "only when type is OIDC",
        ),
        case(
            "PublishedApp",
            json!({"preAuthentication": {"oidc": {"issuerUrl": "http://login.example.com/", "clientId": "wiki"}}}),
            "spec.preAuthentication.oidc.issuerUrl",
            "must be an https:// URL",
        ),
        case(
            "PublishedApp",
            json!({"preAuthentication": {"oidc": {"issuerUrl": "https://login.example.com/", "clientId": "wiki", "scopes": ["email"]}}}),
            "spec.preAuthentication.oidc.scopes",
            "must include openid",
        ),
        case(
            "PublishedApp",
            json!({"session": {"cookie": {"sameSite": "None", "secure": false}}}),
            "spec.session.cookie.sameSite",
            "requires secure: true",
        ),
        case(
            "PublishedApp",
            json!({"identity": {"headers": [{"name": "Cookie", "claim": "sub"}]}}),
            "spec.identity.headers[0].name",
            "must not be a header that carries routing, framing or credentials",
        ),
        case(
            "PublishedApp",
            json!({"identity": {"headers": [{"name": "X-User", "claim": "sub"}, {"name": "x-user", "claim": "email"}]}}),
            "spec.identity.headers",
            "must be unique (case-insensitively)",
        ),
        case(
            "PublishedApp",
            json!({"backend": {"timeout": "ten minutes"}}),
            "spec.backend.timeout",
            "must be a positive duration such as 85s",
        ),
        case(
            "PublishedApp",
            json!({"backend": {"tls": {"serverName": "wiki.corp.internal"}}}),
            "spec.backend.tls",
            "only when internalUrl uses https://",
        ),
        case(
            "PublishedApp",
            json!({"internalUrl": "https://wiki.corp.internal/", "backend": {"tls": {"insecureSkipVerify": true, "caSecretRef": {"name": "corp-ca", "key": "ca.crt"}}}}),
            "spec.backend.tls.insecureSkipVerify",
            "mutually exclusive",
        ),
        case(
            "PublishedApp",
            json!({"rateLimit": {"requestsPerSecond": 100, "burst": 10}}),
            "spec.rateLimit.burst",
            "burst must be at least requestsPerSecond",
        ),
        case(
            "PublishedApp",
            json!({"conditionalAccessPolicies": ["require-mfa", "require-mfa"]}),
            "spec.conditionalAccessPolicies[1]",
            "Duplicate value",
        ),
        // ConnectorGroup
        case(
            "ConnectorGroup",
            json!({"certificate": {"validity": "720h", "renewAfter": "720h"}}),
            "spec.certificate.renewAfter",
            "renewAfter must be shorter than validity",
        ),
        case(
            "ConnectorGroup",
            json!({"registration": {"tokenTTL": "-1h"}}),
            "spec.registration.tokenTTL",
            "must be a positive duration",
        ),
        case(
            "ConnectorGroup",
            json!({"registration": {"maxUses": -1}}),
            "spec.registration.maxUses",
            "greater than or equal to 0",
        ),
        case(
            "ConnectorGroup",
            json!({"inactiveConnectorTTL": "0s"}),
            "spec.inactiveConnectorTTL",
            "must be a positive duration",
        ),
        case(
            "ConnectorGroup",
            json!({"allowedNamespaces": {"from": "Selector"}}),
            "spec.allowedNamespaces.selector",
            "must be set when from is Selector",
        ),
        case(
            "ConnectorGroup",
            json!({"allowedNamespaces": {"from": "All", "selector": {"matchLabels": {"team": "a"}}}}),
            "spec.allowedNamespaces.selector",
            "must be set when from is Selector, and only then",
        ),
        case(
            "ConnectorGroup",
            json!({"allowedNamespaces": {"from": "Everyone"}}),
            "spec.allowedNamespaces.from",
            "supported values: \"Same\", \"All\", \"Selector\"",
        ),
        case(
            "ConnectorGroup",
            json!({"deployment": {"replicas": -1}}),
            "spec.deployment.replicas",
            "greater than or equal to 0",
        ),
        case(
            "ConnectorGroup",
            json!({"version": "-1.0"}),
            "spec.version",
            "must be a version usable as an image tag",
        ),
        // ConditionalAccessPolicy
        case(
            "ConditionalAccessPolicy",
            json!({"session": {"blockDownloads": true, "downloadContentTypes": ["zip"]}}),
            "spec.session.downloadContentTypes[0]",
            "must be a media type",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"state": "Enforced"}),
            "spec.state",
            "supported values: \"Enabled\", \"ReportOnly\", \"Disabled\"",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"grant": {"block": true, "require": {"mfa": true}}}),
            "spec.grant.require",
            "block and require are mutually exclusive",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"grant": {"require": {"operator": "AND", "mfa": null}}}),
            "spec.grant.require",
            "must require something",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"assignments": {"users": null}}),
            "spec.assignments",
            "must include users or groups",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"assignments": {"apps": {"selector": null}}}),
            "spec.assignments.apps",
            "must select apps by selector or by names",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"assignments": {"users": {"include": ["*"], "exclude": ["*"]}}}),
            "spec.assignments.users.exclude",
            "must not hold \"*\"",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"locations": {"include": ["Any", "10.20.0.0/33"]}}}),
            "spec.conditions.locations.include[1]",
            "must be Any or a CIDR",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"locations": {"exclude": ["10.20.0.1/16"]}}}),
            "spec.conditions.locations.exclude[0]",
            "host bits zero",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"locations": {"exclude": ["Any"]}}}),
            "spec.conditions.locations.exclude[0]",
            "must be a CIDR",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"signInRisk": ["extreme"]}}),
            "spec.conditions.signInRisk[0]",
            "supported values: \"low\", \"medium\", \"high\"",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"clientPlatforms": ["beos"]}}),
            "spec.conditions.clientPlatforms[0]",
            "supported values: \"windows\", \"macOS\", \"linux\", \"iOS\", \"android\"",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"times": [{"from": "8am", "to": "18:00"}]}}),
            "spec.conditions.times[0].from",
            "must be a 24-hour time HH:MM",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"conditions": {"times": [{"from": "08:00", "to": "08:00"}]}}),
            "spec.conditions.times[0].to",
            "from and to must differ",
        ),
        case(
            "ConditionalAccessPolicy",
            json!({"session": {"signInFrequency": "8 hours"}}),
            "spec.session.signInFrequency",
            "must be a positive duration",
        ),
        // Connector
        case(
            "Connector",
            json!({"connectorGroup": "Bad Group"}),
            "spec.connectorGroup",
            "must be a Kubernetes object name",
        ),
    ]
}

#[tokio::test]
async fn invalid_manifests_are_rejected_naming_the_field() -> TestResult {
    let control_plane = control_plane().await?;
    let namespace = control_plane.create_namespace("invalid").await?;
    let client = control_plane.client().await?;
    let cases = invalid_cases();
    assert!(cases.len() >= 20);

    let mut failures = Vec::new();
    for Invalid {
        kind,
        spec_patch,
        field,
        expect,
    } in cases
    {
        let mut object = valid(kind);
        json_patch::merge(&mut object["spec"], &spec_patch);
        match create(client.clone(), &namespace, &object).await {
            Err(kube::Error::Api(status)) if status.code == 422 => {
                // The apiserver reports each failed rule as "<field>: <what is wrong>".
                let names_field = status.message.contains(&format!("{field}: "));
                if !names_field || !status.message.contains(expect) {
                    failures.push(format!(
                        "{kind} {spec_patch}: expected an error on {field} saying {expect:?}, got: {}",
                        status.message
                    ));
                }
            }
            Err(other) => failures.push(format!("{kind} {spec_patch}: unexpected error {other}")),
            Ok(_) => failures.push(format!(
                "{kind} {spec_patch}: was accepted, expected an error on {field}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn valid_base_objects_are_accepted() -> TestResult {
    // Guards the table above: each invalid case differs from an accepted object only by
    // its patch, so the rejection is due to that patch.
    let control_plane = control_plane().await?;
    let namespace = control_plane.create_namespace("valid").await?;
    let client = control_plane.client().await?;
    for kind in [
        "PublishedApp",
        "ConnectorGroup",
        "ConditionalAccessPolicy",
        "Connector",
    ] {
        create(client.clone(), &namespace, &valid(kind))
            .await
            .map_err(|e| format!("the valid {kind} was rejected: {e}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_connectors_group_is_immutable() -> TestResult {
    let control_plane = control_plane().await?;
    let namespace = control_plane.create_namespace("immutable").await?;
    let client = control_plane.client().await?;
    let created = create(client.clone(), &namespace, &valid("Connector")).await?;
    let name = created
        .metadata
        .name
        .clone()
        .ok_or("created without a name")?;

    let api = api_for(client, &namespace, &valid("Connector"));
    let change = json!({"spec": {"connectorGroup": "datacenter-west"}});
    let result = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&change))
        .await;

    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422);
            assert!(
                status.message.contains("spec.connectorGroup: "),
                "{}",
                status.message
            );
            assert!(
                status.message.contains("is immutable"),
                "{}",
                status.message
            );
        }
        other => panic!("changing spec.connectorGroup must be refused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() -> TestResult {
    let control_plane = control_plane().await?;
    let namespace = control_plane.create_namespace("columns").await?;
    let client = control_plane.client().await?;
    for document in yaml_documents(&repo_path("examples"))? {
        create(client.clone(), &namespace, &document).await?;
    }
    let connector = json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "Connector",
        "metadata": {"name": "conn-0001", "labels": {"sallyport.dev/connector-group": "datacenter-east"}},
        "spec": {"connectorGroup": "datacenter-east"},
    });
    create(client.clone(), &namespace, &connector).await?;
    let status = json!({"status": {
        "version": "0.1.0-test",
        "certificate": {"serial": "0a1b", "issuedAt": "2026-01-01T00:00:00Z", "notAfter": "2027-01-01T00:00:00Z"},
        "lastSeen": "2026-11-01T00:00:00Z",
        "conditions": [{"type": "Connected", "status": "True", "reason": "TunnelsUp", "message": "2 tunnels", "lastTransitionTime": "2026-11-01T00:00:00Z"}],
    }});
    api_for(client, &namespace, &connector)
        .patch_status("conn-0001", &PatchParams::default(), &Patch::Merge(&status))
        .await?;

    let headers = |output: &str| {
        output
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let expected: [(&str, &[&str]); 4] = [
        (
            "publishedapps",
            &["NAME", "URL", "PREAUTH", "GROUP", "READY", "REASON", "AGE"],
        ),
        (
            "connectorgroups",
            &[
                "NAME",
                "DESIRED",
                "CONNECTED",
                "READY",
                "VERSION",
                "UP-TO-DATE",
                "AGE",
            ],
        ),
        (
            "conditionalaccesspolicies",
            &["NAME", "STATE", "MATCHED", "READY", "AGE"],
        ),
        (
            "connectors",
            &[
                "NAME",
                "GROUP",
                "CONNECTED",
                "VERSION",
                "CERT-EXPIRES",
                "LAST-SEEN",
            ],
        ),
    ];
    for (resource, columns) in expected {
        let output = kubectl(control_plane, &["get", resource, "-n", &namespace])?;
        assert_eq!(
            headers(&output),
            columns,
            "kubectl get {resource}:\n{output}"
        );
    }

    // Short names and the category reach all four kinds at once.
    let output = kubectl(
        control_plane,
        &["get", "papp,cg,cap,conn", "-n", &namespace, "-o", "name"],
    )?;
    for name in [
        "publishedapp.sallyport.dev/wiki",
        "connectorgroup.sallyport.dev/datacenter-east",
        "conditionalaccesspolicy.sallyport.dev/block-high-risk",
        "connector.sallyport.dev/conn-0001",
    ] {
        assert!(
            output.contains(name),
            "{name} missing from kubectl get papp,cg,cap,conn:\n{output}"
        );
    }
    let by_category = kubectl(
        control_plane,
        &["get", "sallyport", "-n", &namespace, "-o", "name"],
    )?;
    assert_eq!(
        by_category.lines().count(),
        output.lines().count(),
        "kubectl get sallyport:\n{by_category}"
    );

    // Values reach the columns: the passthrough app's PREAUTH and the connector's version.
    let apps = kubectl(
        control_plane,
        &[
            "get",
            "papp",
            "status-page",
            "-n",
            &namespace,
            "--no-headers",
        ],
    )?;
    assert!(
        apps.contains("Passthrough") && apps.contains("datacenter-east"),
        "{apps}"
    );
    let connectors = kubectl(
        control_plane,
        &["get", "conn", "conn-0001", "-n", &namespace, "--no-headers"],
    )?;
    assert!(
        connectors.contains("0.1.0-test") && connectors.contains("True"),
        "{connectors}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_prints_the_field_docs() -> TestResult {
    let control_plane = control_plane().await?;
    let explained = [
        ("publishedapp.spec.externalUrl", "The public URL users open"),
        (
            "publishedapp",
            "PublishedApp publishes one internal web application",
        ),
        (
            "connectorgroup.spec.certificate.renewAfter",
            "asks for a new certificate",
        ),
        (
            "conditionalaccesspolicy.spec.grant.block",
            "Block access outright",
        ),
        (
            "connector.status.lastSeen",
            "When the fleet last heard from the connector",
        ),
    ];
    for (field, doc) in explained {
        // explain reads the published OpenAPI, which may lag the CRD by a moment.
        let mut last = String::new();
        for _ in 0..30 {
            last = kubectl(control_plane, &["explain", field]).unwrap_or_else(|e| e.to_string());
            if last.contains(doc) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(
            last.contains(doc),
            "kubectl explain {field} lacks {doc:?}:\n{last}"
        );
    }
    Ok(())
}
