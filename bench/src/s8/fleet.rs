//! A generated fleet for the compile benchmark, varied the way a real one is.
//!
//! The same recipe as `operator/tests/compile_scale.rs` (which asserts the sizes at 10,000
//! apps): 100 namespaces, 20 ConnectorGroups, two fleet-wide baseline policies and one
//! policy per namespace by app name; apps with their own or the default provider (own
//! clients with GUID-like client IDs, which compress as badly as real ones), their own or
//! the default certificate, 10% passthrough, path prefixes on shared hosts, wildcards,
//! https backends with private CAs, identity headers, assignments and rate limits.

use std::collections::BTreeMap;

use sallyport_api::fleet_config::SecretRef;
use sallyport_api::published_app::IdentitySettings;
use sallyport_api::{ConditionalAccessPolicy, ConnectorGroup, PublishedApp};
use sallyport_operator::compile::{CompileInputs, DefaultOidcClient, FleetDefaults};
use serde::de::DeserializeOwned;

use crate::error::BenchError;

/// Namespaces the apps are spread over.
pub const NAMESPACES: usize = 100;
/// ConnectorGroups the apps are spread over.
pub const GROUPS: usize = 20;
/// The operator's namespace in the generated fleet.
pub const OPERATOR_NAMESPACE: &str = "sallyport-system";

/// The objects of a generated fleet, and the compiler's other inputs.
pub struct Fleet {
    /// The PublishedApps.
    pub apps: Vec<PublishedApp>,
    /// The ConnectorGroups, all in the operator's namespace.
    pub groups: Vec<ConnectorGroup>,
    /// Two baselines and one policy per namespace.
    pub policies: Vec<ConditionalAccessPolicy>,
    /// Every namespace's labels (all carry `sallyport.dev/publish: "true"`).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// A default certificate and provider, as `sallyport-operator run` would have.
    pub defaults: FleetDefaults,
}

impl Fleet {
    /// The compiler's inputs for this fleet.
    pub fn inputs(&self) -> CompileInputs<'_> {
        CompileInputs {
            apps: &self.apps,
            connector_groups: &self.groups,
            policies: &self.policies,
            connectors: &[],
            namespace_labels: &self.namespace_labels,
            revoked_connectors: &[],
            operator_namespace: OPERATOR_NAMESPACE,
            defaults: &self.defaults,
        }
    }
}

fn parse<T: DeserializeOwned>(yaml: &str) -> Result<T, BenchError> {
    serde_yaml::from_str(yaml).map_err(|error| BenchError::Fixture {
        what: "the generated fleet".into(),
        message: format!("{error} in:\n{yaml}"),
    })
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

/// A fleet of `apps` apps (at least one per namespace makes every namespace used).
pub fn generate(apps: usize) -> Result<Fleet, BenchError> {
    let per_namespace = (apps / NAMESPACES).max(1);
    let groups = (0..GROUPS)
        .map(|g| {
            parse(&format!(
                "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: site-{g:02}, namespace: {OPERATOR_NAMESPACE}}}\nspec:\n  registration: {{tokenTTL: 2h, maxUses: 3}}\n  allowedNamespaces: {{from: Selector, selector: {{matchLabels: {{sallyport.dev/publish: 'true'}}}}}}\n"
            ))
        })
        .collect::<Result<_, _>>()?;

    let mut policies: Vec<ConditionalAccessPolicy> = vec![
        parse(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: block-high-risk, namespace: {OPERATOR_NAMESPACE}}}\nspec:\n  state: ReportOnly\n  assignments: {{apps: {{selector: {{}}}}, users: {{include: ['*']}}}}\n  conditions: {{signInRisk: [high], userRisk: [high]}}\n  grant: {{block: true}}\n",
        ))?,
        parse(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: require-mfa-outside-office, namespace: {OPERATOR_NAMESPACE}}}\nspec:\n  assignments:\n    apps: {{selector: {{matchLabels: {{tier: internal}}}}}}\n    users: {{include: ['*'], exclude: [breakglass@example.com]}}\n  conditions: {{locations: {{include: [Any], exclude: [10.20.0.0/16, 192.0.2.0/24]}}}}\n  grant: {{require: {{operator: AND, mfa: true}}}}\n  session: {{signInFrequency: 8h, persistentBrowserSession: Never}}\n",
        ))?,
    ];
    let mut namespace_labels = BTreeMap::new();
    for n in 0..NAMESPACES {
        namespace_labels.insert(
            format!("team-{n:03}"),
            BTreeMap::from([("sallyport.dev/publish".to_owned(), "true".to_owned())]),
        );
        policies.push(parse(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: contractors, namespace: team-{n:03}}}\nspec:\n  assignments:\n    apps: {{names: [app-{a:05}, app-{b:05}]}}\n    groups: {{include: [team-{n:03}-contractors]}}\n  conditions:\n    clientPlatforms: [windows, macOS]\n    times: [{{days: [Mon, Tue, Wed, Thu, Fri], from: '08:00', to: '18:00', timeZone: Europe/Berlin}}]\n  grant: {{require: {{authenticationStrength: {{amr: [hwk]}}}}}}\n",
            a = n * per_namespace,
            b = n * per_namespace + 1,
        ))?);
    }

    let template: PublishedApp = parse(
        "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {name: x, namespace: x}\nspec: {externalUrl: 'https://x.example.com/', internalUrl: 'http://x/', connectorGroup: {name: x, namespace: sallyport-system}}\n",
    )?;
    let identity: IdentitySettings = parse(
        "headers: [{name: X-Remote-User, claim: preferred_username}, {name: X-Remote-Groups, claim: groups}]\nsignedAssertion: {enabled: true, header: X-Sallyport-Assertion, lifetime: 5m}\n",
    )?;
    let apps = (0..apps)
        .map(|i| {
            let n = (i / per_namespace).min(NAMESPACES - 1);
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
                ))?);
            }
            match i % 10 {
                0 => spec.pre_authentication = parse("type: Passthrough\n")?,
                k if k % 2 == 1 => {
                    spec.pre_authentication = parse(&format!(
                        "type: OIDC\noidc: {{issuerUrl: 'https://login.example.com/realms/{team}', clientId: '{client}', clientSecretRef: {{name: app-{i:05}-oidc, key: client-secret}}, scopes: [openid, email, profile, groups]}}\n",
                        client = client_id(i as u64),
                    ))?
                }
                _ => {}
            }
            if i % 3 == 0 {
                spec.tls = Some(parse(&format!("secretName: app-{i:05}-tls\n"))?);
            }
            if i % 2 == 1 {
                spec.identity = identity.clone();
                spec.assignment.groups = vec![format!("{team}-users"), format!("app-{i:05}-admins")];
            }
            if i % 4 == 0 {
                spec.rate_limit = Some(parse("{requestsPerSecond: 200, burst: 400}\n")?);
            }
            Ok(app)
        })
        .collect::<Result<_, BenchError>>()?;

    let defaults = FleetDefaults {
        tls_secret: Some(SecretRef {
            namespace: OPERATOR_NAMESPACE.into(),
            name: "wildcard-tls".into(),
        }),
        oidc: Some(DefaultOidcClient::new(
            "https://login.example.com/",
            "sallyport",
        )),
        ..FleetDefaults::default()
    };
    Ok(Fleet {
        apps,
        groups,
        policies,
        namespace_labels,
        defaults,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_generated_fleet_compiles_without_skipping_anything() -> Result<(), BenchError> {
        let fleet = generate(250)?;
        let compiled = sallyport_operator::compile::compile(&fleet.inputs())?;
        assert!(
            compiled.skipped.is_empty(),
            "{:?}",
            compiled.skipped.first()
        );
        assert_eq!(compiled.config.routes.len(), 250);
        Ok(())
    }
}
