//! The size of a 10,000-app fleet configuration, against what one Kubernetes object holds.
//!
//! The sizes are asserted (a regression in the format shows here); the compile time is
//! only printed, since timing belongs in benchmarks. For the numbers:
//!
//! ```sh
//! cargo test --release -p sallyport-operator --test compile_scale -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use sallyport_api::fleet_config::SecretRef;
use sallyport_api::{ConditionalAccessPolicy, ConnectorGroup, PublishedApp};
use sallyport_operator::compile::{CompileInputs, DefaultOidcClient, FleetDefaults, compile};

/// What a ConfigMap (and a Secret) holds at most: the sum of its data's sizes.
const CONFIG_MAP_LIMIT: usize = 1024 * 1024;

const APPS: usize = 10_000;
const NAMESPACES: usize = 100;
const GROUPS: usize = 20;

fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// A fleet of `APPS` apps in `NAMESPACES` namespaces on `GROUPS` groups, varied the way a
/// real fleet is: own and default providers and certificates, passthrough apps, path
/// prefixes on shared hosts, wildcards, https backends with private CAs, identity
/// headers, assignments, rate limits, and policies by label, by name and as baselines.
struct Fleet {
    apps: Vec<PublishedApp>,
    groups: Vec<ConnectorGroup>,
    policies: Vec<ConditionalAccessPolicy>,
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// A GUID-like client ID, as identity providers such as Entra ID issue them: 122 bits that
/// compress as badly as the real ones (SplitMix64, seeded by the app's number).
fn client_id(seed: u64) -> String {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

fn fleet() -> Fleet {
    let groups = (0..GROUPS)
        .map(|g| {
            parse(&format!(
                "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: site-{g:02}, namespace: sallyport-system}}\nspec:\n  registration: {{tokenTTL: 2h, maxUses: 3}}\n  allowedNamespaces: {{from: Selector, selector: {{matchLabels: {{sallyport.dev/publish: 'true'}}}}}}\n"
            ))
        })
        .collect();

    let mut policies: Vec<ConditionalAccessPolicy> = vec![
        parse(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {name: block-high-risk, namespace: sallyport-system}\nspec:\n  state: ReportOnly\n  assignments: {apps: {selector: {}}, users: {include: ['*']}}\n  conditions: {signInRisk: [high], userRisk: [high]}\n  grant: {block: true}\n",
        ),
        parse(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {name: require-mfa-outside-office, namespace: sallyport-system}\nspec:\n  assignments:\n    apps: {selector: {matchLabels: {tier: internal}}}\n    users: {include: ['*'], exclude: [breakglass@example.com]}\n  conditions: {locations: {include: [Any], exclude: [10.20.0.0/16, 192.0.2.0/24]}}\n  grant: {require: {operator: AND, mfa: true}}\n  session: {signInFrequency: 8h, persistentBrowserSession: Never}\n",
        ),
    ];
    let mut namespace_labels = BTreeMap::new();
    for n in 0..NAMESPACES {
        namespace_labels.insert(
            format!("team-{n:03}"),
            BTreeMap::from([("sallyport.dev/publish".to_owned(), "true".to_owned())]),
        );
        policies.push(parse(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: contractors, namespace: team-{n:03}}}\nspec:\n  assignments:\n    apps: {{names: [app-{a:05}, app-{b:05}]}}\n    groups: {{include: [team-{n:03}-contractors]}}\n  conditions:\n    clientPlatforms: [windows, macOS]\n    times: [{{days: [Mon, Tue, Wed, Thu, Fri], from: '08:00', to: '18:00', timeZone: Europe/Berlin}}]\n  grant: {{require: {{authenticationStrength: {{amr: [hwk]}}}}}}\n",
            a = n * (APPS / NAMESPACES),
            b = n * (APPS / NAMESPACES) + 1,
        )));
    }

    let template: PublishedApp = parse(
        "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {name: x, namespace: x}\nspec: {externalUrl: 'https://x.example.com/', internalUrl: 'http://x/', connectorGroup: {name: x, namespace: sallyport-system}}\n",
    );
    let identity: sallyport_api::published_app::IdentitySettings = parse(
        "headers: [{name: X-Remote-User, claim: preferred_username}, {name: X-Remote-Groups, claim: groups}]\nsignedAssertion: {enabled: true, header: X-Sallyport-Assertion, lifetime: 5m}\n",
    );
    let apps = (0..APPS)
        .map(|i| {
            let n = i / (APPS / NAMESPACES);
            let team = format!("team-{n:03}");
            let mut app = template.clone();
            app.metadata.name = Some(format!("app-{i:05}"));
            app.metadata.namespace = Some(team.clone());
            if i % 2 == 0 {
                app.metadata.labels = Some(BTreeMap::from([("tier".into(), "internal".into())]));
            }
            let spec = &mut app.spec;
            spec.external_url = match i % 50 {
                0 => format!("https://*.env-{i:05}.example.com/"),
                k if k % 10 == 1 => format!("https://{team}.apps.example.com/svc-{i:05}/"),
                _ => format!("https://app-{i:05}.{team}.apps.example.com/"),
            };
            spec.connector_group.name = format!("site-{:02}", i % GROUPS);
            spec.internal_url = if i % 5 == 0 {
                format!("https://app-{i:05}.{team}.svc.corp.internal:8443/")
            } else {
                format!("http://app-{i:05}.{team}.svc.corp.internal:8080/")
            };
            if i % 5 == 0 {
                spec.backend.tls = Some(parse(&format!(
                    "caSecretRef: {{name: {team}-ca, key: ca.crt}}\nserverName: app-{i:05}.{team}.svc.corp.internal\n"
                )));
            }
            match i % 10 {
                0 => spec.pre_authentication = parse("type: Passthrough\n"),
                k if k % 2 == 1 => {
                    spec.pre_authentication = parse(&format!(
                        "type: OIDC\noidc: {{issuerUrl: 'https://login.example.com/realms/{team}', clientId: '{client}', clientSecretRef: {{name: app-{i:05}-oidc, key: client-secret}}, scopes: [openid, email, profile, groups]}}\n",
                        client = client_id(i as u64),
                    ))
                }
                _ => {}
            }
            if i % 3 == 0 {
                spec.tls = Some(parse(&format!("secretName: app-{i:05}-tls\n")));
            }
            if i % 2 == 1 {
                spec.identity = identity.clone();
                spec.assignment.groups = vec![format!("{team}-users"), format!("app-{i:05}-admins")];
            }
            if i % 4 == 0 {
                spec.rate_limit = Some(parse("{requestsPerSecond: 200, burst: 400}\n"));
            }
            app
        })
        .collect();
    Fleet {
        apps,
        groups,
        policies,
        namespace_labels,
    }
}

#[test]
fn ten_thousand_apps_fit_one_config_map_when_compressed() {
    let fleet = fleet();
    let defaults = FleetDefaults {
        tls_secret: Some(SecretRef {
            namespace: "sallyport-system".into(),
            name: "wildcard-tls".into(),
        }),
        oidc: Some(DefaultOidcClient::new(
            "https://login.example.com/",
            "sallyport",
        )),
        ..FleetDefaults::default()
    };
    let inputs = CompileInputs {
        apps: &fleet.apps,
        connector_groups: &fleet.groups,
        policies: &fleet.policies,
        connectors: &[],
        namespace_labels: &fleet.namespace_labels,
        revoked_connectors: &[],
        operator_namespace: "sallyport-system",
        defaults: &defaults,
    };
    let started = Instant::now();
    let compiled = compile(&inputs).unwrap_or_else(|e| panic!("{e}"));
    let compile_time = started.elapsed();
    assert!(
        compiled.skipped.is_empty(),
        "{:?}",
        compiled.skipped.first()
    );
    assert_eq!(compiled.config.routes.len(), APPS);
    assert_eq!(compiled.config.policies.len(), 2 + NAMESPACES);

    let json = serde_json::to_vec(&compiled.config).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let gzip = compiled
        .config
        .to_gzip_json()
        .unwrap_or_else(|e| panic!("{e}"));
    let gzip_time = started.elapsed();
    println!(
        "{APPS} apps: compile {compile_time:?}; JSON {} bytes ({:.0} per route); gzip {} bytes ({:.1}x, {:.0}% of a ConfigMap) in {gzip_time:?}",
        json.len(),
        json.len() as f64 / APPS as f64,
        gzip.len(),
        json.len() as f64 / gzip.len() as f64,
        100.0 * gzip.len() as f64 / CONFIG_MAP_LIMIT as f64,
    );

    // Measured: JSON 11,037,483 bytes (1,104 per route), gzip 376,474 bytes (29x, 36% of
    // a ConfigMap). The bounds leave about 10% for growth and catch a format regression;
    // the gzip one also keeps the proposed storage (gzip in one ConfigMap's binaryData,
    // docs/fleet-config.md) well within the object limit.
    assert!(json.len() < 12_200_000, "JSON grew to {} bytes", json.len());
    assert!(gzip.len() < 420_000, "gzip grew to {} bytes", gzip.len());
    assert!(gzip.len() < CONFIG_MAP_LIMIT / 2);

    let back = sallyport_api::FleetConfig::from_gzip_json(&gzip).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, compiled.config);
}
