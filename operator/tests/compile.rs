//! The fleet configuration compiled from the small YAML fixtures in
//! `tests/fixtures/compile/`.

use std::path::PathBuf;

use sallyport_api::fleet_config::{SecretKeyRef, SecretRef};
use sallyport_api::published_app::PreAuthenticationType;
use sallyport_operator::compile::manifests::Manifests;
use sallyport_operator::compile::{
    CompileError, Compiled, DefaultOidcClient, FleetDefaults, Skipped, compile,
};

const OPERATOR_NAMESPACE: &str = "sallyport-system";

fn fixture(names: &[&str]) -> Manifests {
    let mut manifests = Manifests::default();
    for name in names {
        let path = PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("tests/fixtures/compile")
        .join(name);
        if let Err(error) = manifests.read_path(&path, "default") {
            panic!("{error}");
        }
    }
    manifests
}

fn defaults() -> FleetDefaults {
    FleetDefaults {
        tls_secret: Some(SecretRef {
            namespace: OPERATOR_NAMESPACE.into(),
            name: "wildcard-tls".into(),
        }),
        oidc: Some(DefaultOidcClient::new(
            "https://login.example.com/",
            "sallyport",
        )),
        ..FleetDefaults::default()
    }
}

fn compiled_with(manifests: &Manifests, defaults: &FleetDefaults) -> Compiled {
    compile(&manifests.inputs(OPERATOR_NAMESPACE, defaults, &[])).unwrap_or_else(|e| panic!("{e}"))
}

fn compiled(manifests: &Manifests) -> Compiled {
    compiled_with(manifests, &defaults())
}

fn route_ids(compiled: &Compiled) -> Vec<&str> {
    compiled
        .config
        .routes
        .iter()
        .map(|r| r.app.as_str())
        .collect()
}

fn reasons(skipped: &[Skipped]) -> Vec<(&str, &str, &str)> {
    skipped
        .iter()
        .map(|s| (s.kind, s.id.as_str(), s.reason))
        .collect()
}

#[test]
fn routes_come_most_specific_first_exact_hosts_before_wildcards() {
    let compiled = compiled(&fixture(&["routes.yaml"]));
    assert_eq!(
        route_ids(&compiled),
        [
            "team-a/status-api",
            "team-a/status",
            "team-a/root",
            "team-c/wiki",
            "team-c/wiki-admin",
            "team-b/every-env-docs",
            "team-b/every-env",
        ]
    );
    let route = |id: &str| {
        compiled
            .config
            .route(id)
            .unwrap_or_else(|| panic!("{id} has a route"))
    };
    let status = route("team-a/status");
    assert_eq!(status.path_prefix, "/status/");
    assert_eq!(status.url, "https://apps.example.com/status/");
    assert_eq!(
        status.pre_authentication.kind,
        PreAuthenticationType::Passthrough
    );
    assert_eq!(status.pre_authentication.oidc, None);
    let wildcard = route("team-b/every-env");
    assert_eq!(
        (wildcard.host.as_str(), wildcard.port),
        ("*.example.com", 443)
    );
    assert_eq!(wildcard.connector_group, "infra/west");
    let admin = route("team-c/wiki-admin");
    assert_eq!(admin.port, 8443);
    assert_eq!(admin.url, "https://wiki.example.com:8443/");
    let root = route("team-a/root");
    let oidc = root.pre_authentication.oidc.as_ref();
    assert_eq!(
        oidc.map(|o| (o.issuer_url.as_str(), o.client_id.as_str())),
        Some(("https://login.example.com/", "sallyport")),
        "an app without its own provider gets the fleet default"
    );
    assert_eq!(
        root.tls.secret_ref,
        SecretRef {
            namespace: OPERATOR_NAMESPACE.into(),
            name: "wildcard-tls".into()
        }
    );
    assert_eq!(
        (root.rate_limit.requests_per_second, root.rate_limit.burst),
        (500, 1000)
    );
}

#[test]
fn the_older_app_keeps_a_contested_route() {
    let compiled = compiled(&fixture(&["routes.yaml"]));
    assert_eq!(
        reasons(&compiled.skipped),
        [("PublishedApp", "team-a/wiki-copy", "HostConflict")]
    );
    assert!(
        compiled.skipped[0]
            .message
            .contains("already published by the older PublishedApp team-c/wiki"),
        "{}",
        compiled.skipped[0].message
    );
    assert_eq!(
        compiled
            .config
            .route("team-c/wiki")
            .map(|r| r.host.as_str()),
        Some("wiki.example.com")
    );
}

#[test]
fn objects_left_out_are_reported_with_their_reason() {
    let compiled = compiled(&fixture(&["skipped.yaml"]));
    assert_eq!(route_ids(&compiled), ["team-a/served"]);
    assert_eq!(
        reasons(&compiled.skipped),
        [
            (
                "ConditionalAccessPolicy",
                "team-a/bad-frequency",
                "InvalidField"
            ),
            (
                "ConditionalAccessPolicy",
                "team-a/bad-selector",
                "InvalidSelector"
            ),
            ("ConnectorGroup", "infra/broken", "InvalidField"),
            ("PublishedApp", "team-a/bad-timeout", "InvalidField"),
            ("PublishedApp", "team-a/leaving", "BeingDeleted"),
            (
                "PublishedApp",
                "team-a/names-missing-policy",
                "PolicyNotFound"
            ),
            ("PublishedApp", "team-a/no-group", "ConnectorGroupNotFound"),
            (
                "PublishedApp",
                "team-a/other-namespace",
                "NamespaceNotAllowed"
            ),
            ("PublishedApp", "team-a/plain-http", "InvalidExternalUrl"),
            ("PublishedApp", "team-a/uses-bad-policy", "PolicyInvalid"),
            (
                "PublishedApp",
                "team-a/uses-broken-group",
                "ConnectorGroupInvalid"
            ),
            ("PublishedApp", "team-b/not-selected", "NamespaceNotAllowed"),
        ]
    );
    let message = |id: &str| {
        compiled
            .skipped
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.message.as_str())
            .unwrap_or_default()
    };
    for (id, part) in [
        (
            "team-a/no-group",
            "ConnectorGroup infra/missing does not exist",
        ),
        (
            "team-b/not-selected",
            "does not allow PublishedApps of namespace team-b",
        ),
        ("team-a/names-missing-policy", "require-mfa"),
        ("team-a/bad-timeout", "spec.backend.timeout"),
        ("infra/broken", "spec.certificate.renewAfter"),
        ("team-a/uses-broken-group", "ConnectorGroup infra/broken"),
        ("team-a/bad-frequency", "spec.session.signInFrequency"),
        (
            "team-a/uses-bad-policy",
            "ConditionalAccessPolicy team-a/bad-frequency",
        ),
    ] {
        assert!(message(id).contains(part), "{id}: {:?}", message(id));
    }
    let groups: Vec<&str> = compiled
        .config
        .connector_groups
        .iter()
        .map(|g| g.id.as_str())
        .collect();
    assert_eq!(groups, ["infra/own-only", "infra/selected"]);
}

#[test]
fn apps_without_a_tls_secret_or_provider_are_left_out() {
    let manifests = fixture(&["routes.yaml"]);
    let nothing = compiled_with(&manifests, &FleetDefaults::default());
    assert!(nothing.config.routes.is_empty());
    assert!(
        nothing
            .skipped
            .iter()
            .filter(|s| s.id != "team-a/wiki-copy")
            .all(|s| s.reason == "TLSSecretNotConfigured")
    );
    let tls_only = FleetDefaults {
        oidc: None,
        ..defaults()
    };
    let compiled = compiled_with(&manifests, &tls_only);
    assert_eq!(route_ids(&compiled), ["team-a/status"], "passthrough only");
    assert!(
        compiled
            .skipped
            .iter()
            .any(|s| s.id == "team-a/root" && s.reason == "OIDCProviderNotConfigured")
    );
}

#[test]
fn policies_reach_apps_by_namespace_by_name_and_as_baseline_never_disabled() {
    let compiled = compiled(&fixture(&["policies.yaml"]));
    assert!(compiled.skipped.is_empty(), "{:?}", compiled.skipped);
    let policies_of = |id: &str| {
        compiled
            .config
            .route(id)
            .map(|r| r.policies.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        policies_of("team-a/wiki"),
        [
            "sallyport-system/baseline",
            "team-a/by-label",
            "team-a/by-name",
            "team-a/named-by-app",
        ]
    );
    assert_eq!(
        policies_of("team-b/crm"),
        ["sallyport-system/baseline", "team-b/team-b-wide"]
    );
    let included: Vec<&str> = compiled
        .config
        .policies
        .iter()
        .map(|p| p.id.as_str())
        .collect();
    assert_eq!(
        included,
        [
            "sallyport-system/baseline",
            "team-a/by-label",
            "team-a/by-name",
            "team-a/named-by-app",
            "team-b/team-b-wide",
        ],
        "only policies a route applies; never Disabled or unused ones"
    );
    let by_label = compiled
        .config
        .policy("team-a/by-label")
        .unwrap_or_else(|| panic!("by-label is included"));
    assert_eq!(
        by_label.assignments.users.exclude,
        ["breakglass@example.com"]
    );
    assert!(by_label.grant.require.as_ref().is_some_and(|r| r.mfa));
    assert!(
        by_label
            .session
            .as_ref()
            .is_some_and(|s| s.sign_in_frequency.as_ref().map(|d| d.as_str()) == Some("8h"))
    );
    let by_name = compiled.config.policy("team-a/by-name");
    assert_eq!(
        by_name.map(|p| p.state),
        Some(sallyport_api::conditional_access_policy::PolicyState::ReportOnly)
    );
}

#[test]
fn the_configuration_references_secrets_and_never_holds_their_data() {
    let compiled = compiled_with(&fixture(&["secrets.yaml"]), &FleetDefaults::default());
    assert!(compiled.skipped.is_empty(), "{:?}", compiled.skipped);
    let json = serde_json::to_string(&compiled.config).unwrap_or_else(|e| panic!("{e}"));
    let yaml = serde_yaml::to_string(&compiled.config).unwrap_or_else(|e| panic!("{e}"));
    for text in [&json, &yaml] {
        for material in ["s3cr3t", "LS0tLS1", "BEGIN", "stringData", "tls.key"] {
            assert!(!text.contains(material), "{material} leaked: {text}");
        }
    }
    let route = compiled
        .config
        .route("team-a/wiki")
        .unwrap_or_else(|| panic!("wiki is served"));
    let key = |name: &str, key: &str| SecretKeyRef {
        namespace: "team-a".into(),
        name: name.into(),
        key: key.into(),
    };
    let oidc = route.pre_authentication.oidc.as_ref();
    assert_eq!(
        oidc.and_then(|o| o.client_secret_ref.clone()),
        Some(key("wiki-oidc", "client-secret"))
    );
    assert_eq!(
        oidc.map(|o| o.scopes.clone()),
        Some(vec!["openid".to_owned(), "groups".to_owned()])
    );
    assert_eq!(route.tls.secret_ref.name, "wiki-tls");
    let backend_tls = route.backend.tls.as_ref();
    assert_eq!(
        backend_tls.and_then(|t| t.ca_secret_ref.clone()),
        Some(key("corp-ca", "ca.crt"))
    );
    assert_eq!(
        backend_tls.and_then(|t| t.server_name.as_deref()),
        Some("wiki.corp.internal")
    );
    assert_eq!(route.backend.timeout.as_str(), "30s");
    assert!(!route.backend.websockets);
    assert!(route.maintenance_mode);
    assert_eq!(
        (route.rate_limit.requests_per_second, route.rate_limit.burst),
        (50, 100)
    );
    assert_eq!(
        route
            .rate_limit
            .per_client_ip
            .as_ref()
            .map(|l| (l.requests_per_second, l.burst)),
        Some((5, 10))
    );
    assert_eq!(route.max_request_body_bytes, Some(1 << 20));
    assert_eq!(route.identity.headers[0].name, "X-Remote-User");
    assert_eq!(route.identity.signed_assertion.lifetime.as_str(), "2m");
    assert_eq!(route.connector_group, "team-a/dc");
}

/// The same objects in another order.
fn shuffled(manifests: &Manifests) -> Manifests {
    let mut other = manifests.clone();
    other.apps.reverse();
    other.apps.rotate_left(3);
    other.connector_groups.reverse();
    other.policies.rotate_left(2);
    other.policies.reverse();
    other.connectors.reverse();
    other
}

#[test]
fn the_same_objects_in_any_order_compile_to_the_same_bytes_and_version() {
    let manifests = fixture(&["routes.yaml", "policies.yaml", "skipped.yaml"]);
    let first = compiled(&manifests);
    let second = compiled(&shuffled(&manifests));
    let bytes = |c: &Compiled| serde_json::to_vec(&c.config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bytes(&first), bytes(&second));
    assert_eq!(first.config.version, second.config.version);
    assert_eq!(first.skipped, second.skipped);
    assert_eq!(
        first.config.content_version().ok().as_deref(),
        Some(first.config.version.as_str())
    );

    let mut changed = manifests.clone();
    if let Some(app) = changed
        .apps
        .iter_mut()
        .find(|a| a.metadata.name.as_deref() == Some("crm"))
    {
        app.spec.internal_url = "http://crm-v2.corp.internal/".into();
    }
    assert_ne!(compiled(&changed).config.version, first.config.version);

    let mut changed = manifests.clone();
    if let Some(policy) = changed
        .policies
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("baseline"))
    {
        policy.spec.grant.block = false;
    }
    assert_ne!(compiled(&changed).config.version, first.config.version);

    // Status and metadata the configuration does not use leave the version alone.
    let mut relabelled = manifests.clone();
    for app in &mut relabelled.apps {
        app.metadata.resource_version = Some("12345".into());
        app.status = Some(Default::default());
    }
    assert_eq!(compiled(&relabelled).config.version, first.config.version);
}

#[test]
fn a_group_slice_holds_only_that_groups_apps() {
    let compiled = compiled(&fixture(&["routes.yaml"]));
    let slice = compiled
        .config
        .group_slice("infra/west")
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("infra/west is in the configuration"));
    let apps: Vec<(&str, &str)> = slice
        .apps
        .iter()
        .map(|a| (a.app.as_str(), a.internal_url.as_str()))
        .collect();
    assert_eq!(
        apps,
        [
            ("team-a/status-api", "http://status-api.corp.internal/v2/"),
            ("team-b/every-env", "http://env-router.corp.internal/"),
            ("team-b/every-env-docs", "http://docs.corp.internal/"),
        ]
    );
    assert_eq!(slice.group.id, "infra/west");
    let json = serde_json::to_string(&slice).unwrap_or_else(|e| panic!("{e}"));
    for foreign in ["infra/east", "portal.corp.internal", "wiki", "example.com"] {
        assert!(!json.contains(foreign), "{foreign} in {json}");
    }
}

#[test]
fn deleted_connectors_and_the_revocation_list_are_revoked() {
    let yaml = r#"
apiVersion: sallyport.dev/v1alpha1
kind: Connector
metadata: {name: c-1, namespace: infra, deletionTimestamp: "2026-01-01T00:00:00Z", finalizers: [x]}
spec: {connectorGroup: east}
---
apiVersion: sallyport.dev/v1alpha1
kind: Connector
metadata: {name: c-2, namespace: infra}
spec: {connectorGroup: east}
"#;
    let mut manifests = Manifests::default();
    if let Err(error) = manifests.add_yaml("connectors", yaml, "default") {
        panic!("{error}");
    }
    let defaults = defaults();
    let revoked = ["infra/c-9".to_owned(), "infra/c-1".to_owned()];
    let compiled = compile(&manifests.inputs(OPERATOR_NAMESPACE, &defaults, &revoked))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        compiled.config.revoked_connectors,
        ["infra/c-1", "infra/c-9"]
    );

    let bad = ["c-9".to_owned()];
    assert!(matches!(
        compile(&manifests.inputs(OPERATOR_NAMESPACE, &defaults, &bad)),
        Err(CompileError::InvalidRevokedConnector { value }) if value == "c-9"
    ));
}

#[test]
fn inputs_that_cannot_come_from_a_cluster_are_errors_that_name_the_object() {
    let mut manifests = fixture(&["routes.yaml"]);
    let copy = manifests.apps[0].clone();
    manifests.apps.push(copy);
    let error = compile(&manifests.inputs(OPERATOR_NAMESPACE, &defaults(), &[]))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some("PublishedApp team-a/root appears more than once in the inputs")
    );

    let mut manifests = fixture(&["routes.yaml"]);
    manifests.connector_groups[1].metadata.namespace = None;
    let error = compile(&manifests.inputs(OPERATOR_NAMESPACE, &defaults(), &[]))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some("ConnectorGroup west has no metadata.namespace")
    );

    let manifests = fixture(&["routes.yaml"]);
    let bad_default = FleetDefaults {
        oidc: Some(DefaultOidcClient::new("http://login.example.com/", "x")),
        ..defaults()
    };
    let error = compile(&manifests.inputs(OPERATOR_NAMESPACE, &bad_default, &[]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.starts_with("defaults.oidc.issuerUrl"), "{error}");
}
