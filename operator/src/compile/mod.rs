//! Compiling the Sallyport objects into the fleet configuration.
//!
//! [`compile`] turns PublishedApps, ConnectorGroups, ConditionalAccessPolicies and
//! Connectors into one [`FleetConfig`] that every proxy replica watches. It is pure (no
//! IO, no clock, no randomness): the same inputs, in any order, give a byte-identical
//! configuration with the same content-derived version.
//!
//! It applies the acceptance rules of the PublishedApp status (the same
//! [`assess`](crate::published_app::validate::assess) over references resolved within
//! the inputs, [`route_holder`](crate::published_app::routes::route_holder) for route
//! conflicts, [`applied_policies`](crate::policy_selection::applied_policies) for
//! policies). An app that would not be accepted or whose references do not resolve is
//! left out and listed in [`Compiled::skipped`] with the reason its status gives. Secrets
//! are not inputs: the configuration references them, and their existence and validity
//! are the status's business. The one exception is public data: the backend CA bundles
//! apps name (`spec.backend.tls.caSecretRef`), which the caller reads and hands in to
//! [`compile_with_backend_cas`], and which are copied into the configuration.
//!
//! On top of the status rules, the compile step refuses what admission would have
//! refused but what manifests read from disk may still hold (malformed durations or
//! internal URLs), so that a proxy never receives a value it cannot parse; anything that
//! depends on a refused object is left out too, never served without it.
//!
//! [`manifests`] and [`command`] read YAML files for `sallyport-operator compile`; they
//! are the only parts of this module that do IO.

pub mod command;
pub mod manifests;

mod app;
mod group;
mod policy;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sallyport_api::fleet_config::{
    BackendCaBundle, FleetConfigError, Route, SecretKeyRef, SecretRef,
};
use sallyport_api::published_app::RateLimit;
use sallyport_api::{
    ConditionalAccessPolicy, Connector, ConnectorGroup, FleetConfig, PublishedApp,
};

use crate::external_url::ExternalUrl;
pub use crate::published_app::backend_ca::{BackendCaLookup, BackendCas};
pub use policy::{INVALID_POLICY, check_policy};

/// Everything the configuration is compiled from.
#[derive(Debug, Clone, Copy)]
pub struct CompileInputs<'a> {
    /// Every PublishedApp of the fleet.
    pub apps: &'a [PublishedApp],
    /// Every ConnectorGroup.
    pub connector_groups: &'a [ConnectorGroup],
    /// Every ConditionalAccessPolicy.
    pub policies: &'a [ConditionalAccessPolicy],
    /// Every Connector; those being deleted are revoked.
    pub connectors: &'a [Connector],
    /// Labels of the namespaces, for `allowedNamespaces.from: Selector`; a namespace
    /// missing here has no labels.
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// Ids (`namespace/name`) of connectors whose Connector object was deleted.
    pub revoked_connectors: &'a [String],
    /// The operator's namespace: its policies are fleet-wide baselines.
    pub operator_namespace: &'a str,
    /// Fleet-wide defaults for apps that leave settings out.
    pub defaults: &'a FleetDefaults,
}

/// Fleet-wide defaults for apps that leave settings out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetDefaults {
    /// The TLS Secret served for apps without `spec.tls`.
    pub tls_secret: Option<SecretRef>,
    /// The OpenID Connect provider and client for OIDC apps without
    /// `spec.preAuthentication.oidc`.
    pub oidc: Option<DefaultOidcClient>,
    /// The rate limit of apps without `spec.rateLimit`.
    pub rate_limit: RateLimit,
    /// The connector version of groups without `spec.version` (the operator's release);
    /// `None` leaves it out of their configuration.
    pub connector_version: Option<String>,
}

impl Default for FleetDefaults {
    /// No default TLS Secret or provider; 500 requests/s with bursts of 1000, as the
    /// PublishedApp API documents.
    fn default() -> Self {
        Self {
            tls_secret: None,
            oidc: None,
            rate_limit: RateLimit {
                requests_per_second: 500,
                burst: 1000,
                per_client_ip: None,
            },
            connector_version: None,
        }
    }
}

/// The fleet's default OpenID Connect provider and client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultOidcClient {
    /// The provider's issuer URL.
    pub issuer_url: String,
    /// The client ID registered at the provider for the fleet.
    pub client_id: String,
    /// Where the client secret is kept; `None` for a public client.
    pub client_secret_ref: Option<SecretKeyRef>,
    /// Scopes to request; must include `openid`.
    pub scopes: Vec<String>,
}

impl DefaultOidcClient {
    /// A public client of `issuer_url` requesting `openid`, `email` and `profile`, as the
    /// PublishedApp API defaults scopes.
    pub fn new(issuer_url: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            issuer_url: issuer_url.into(),
            client_id: client_id.into(),
            client_secret_ref: None,
            scopes: ["openid", "email", "profile"].map(String::from).to_vec(),
        }
    }
}

/// The compiled configuration and what was left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// The fleet configuration.
    pub config: FleetConfig,
    /// Objects left out, sorted by kind and id.
    pub skipped: Vec<Skipped>,
}

/// An object left out of the configuration, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Skipped {
    /// The object's kind, e.g. `PublishedApp`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub id: String,
    /// A PascalCase reason; for apps the one their status gives, e.g. `HostConflict`.
    pub reason: &'static str,
    /// What to fix, naming the objects and fields involved.
    pub message: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.kind, self.id, self.reason, self.message
        )
    }
}

/// The inputs cannot be compiled at all. Problems of single objects never end here: those
/// objects are left out and reported in [`Compiled::skipped`].
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// An object has no name.
    #[error("{kind} number {position} of the inputs has no metadata.name")]
    MissingName {
        /// The object's kind.
        kind: &'static str,
        /// Its 1-based position among the inputs of its kind.
        position: usize,
    },
    /// A namespaced object has no namespace.
    #[error("{kind} {name} has no metadata.namespace")]
    MissingNamespace {
        /// The object's kind.
        kind: &'static str,
        /// The object's name.
        name: String,
    },
    /// Two inputs are the same object.
    #[error("{kind} {id} appears more than once in the inputs")]
    Duplicate {
        /// The object's kind.
        kind: &'static str,
        /// `namespace/name`.
        id: String,
    },
    /// A revoked connector id is not `namespace/name`.
    #[error(
        "revoked connector {value:?} is not NAMESPACE/NAME (the namespace and name of its Connector object)"
    )]
    InvalidRevokedConnector {
        /// The id as given.
        value: String,
    },
    /// A fleet default or the operator namespace is unusable.
    #[error("{field} {value:?} {expected}")]
    InvalidSetting {
        /// The setting, e.g. `defaults.oidc.issuerUrl`.
        field: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// Hashing the configuration failed.
    #[error(transparent)]
    Config(#[from] FleetConfigError),
}

/// Compiles `inputs` into the fleet configuration, without reading any Secret: backend
/// CA references stay references (as `sallyport-operator compile` does; connectors then
/// verify such backends against their own trust store).
pub fn compile(inputs: &CompileInputs<'_>) -> Result<Compiled, CompileError> {
    compile_apps(inputs, None)
}

/// Compiles `inputs` into the fleet configuration, with the backend CA bundles the apps
/// name as read from their Secrets (as the operator does): each bundle found is copied
/// into [`FleetConfig::backend_cas`] once; an app whose bundle is missing, invalid or
/// absent from `backend_cas` is left out with the reason its status gives
/// (`BackendCASecretNotFound`, `BackendCASecretInvalid`), never served unverified.
pub fn compile_with_backend_cas(
    inputs: &CompileInputs<'_>,
    backend_cas: &BackendCas,
) -> Result<Compiled, CompileError> {
    compile_apps(inputs, Some(backend_cas))
}

fn compile_apps(
    inputs: &CompileInputs<'_>,
    backend_cas: Option<&BackendCas>,
) -> Result<Compiled, CompileError> {
    check_settings(inputs)?;
    let operator_namespace = inputs.operator_namespace;
    let app_ids = object_ids("PublishedApp", inputs.apps.iter().map(|a| &a.metadata))?;
    let group_ids = object_ids(
        "ConnectorGroup",
        inputs.connector_groups.iter().map(|g| &g.metadata),
    )?;
    let policy_ids = object_ids(
        "ConditionalAccessPolicy",
        inputs.policies.iter().map(|p| &p.metadata),
    )?;
    let connector_ids = object_ids("Connector", inputs.connectors.iter().map(|c| &c.metadata))?;

    let mut skipped = Vec::new();
    let groups = group::Groups::new(
        inputs.connector_groups,
        &group_ids,
        inputs.defaults.connector_version.as_deref(),
        &mut skipped,
    );
    let policies = policy::Policies::new(
        inputs.policies,
        &policy_ids,
        operator_namespace,
        &mut skipped,
    );

    // Apps claiming one route decide among themselves; grouping first keeps it linear.
    let mut by_route: HashMap<ExternalUrl, Vec<&PublishedApp>> = HashMap::new();
    for app in inputs.apps {
        if let Ok(url) = ExternalUrl::parse(&app.spec.external_url) {
            by_route.entry(url).or_default().push(app);
        }
    }

    let mut routes: Vec<Route> = Vec::new();
    for (app, id) in inputs.apps.iter().zip(&app_ids) {
        let same_route = ExternalUrl::parse(&app.spec.external_url)
            .ok()
            .and_then(|url| by_route.get(&url))
            .map_or(&[][..], Vec::as_slice);
        match app::compile_app(app, id, same_route, &groups, &policies, inputs, backend_cas) {
            Ok(route) => routes.push(route),
            Err(problem) => skipped.push(Skipped {
                kind: "PublishedApp",
                id: id.clone(),
                reason: problem.reason,
                message: problem.message,
            }),
        }
    }
    routes.sort_by(|a, b| route_order(a).cmp(&route_order(b)));

    let used: BTreeSet<&str> = routes
        .iter()
        .flat_map(|r| r.policies.iter().map(String::as_str))
        .collect();
    let policies = policies.configs(&used);

    let mut revoked = BTreeSet::new();
    for value in inputs.revoked_connectors {
        if split_namespaced_name(value).is_none() {
            return Err(CompileError::InvalidRevokedConnector {
                value: value.clone(),
            });
        }
        revoked.insert(value.clone());
    }
    for (connector, id) in inputs.connectors.iter().zip(connector_ids) {
        if connector.metadata.deletion_timestamp.is_some() {
            revoked.insert(id);
        }
    }

    // Every bundle a route names, once; `compile_app` served no route without its bundle.
    let bundles: Vec<BackendCaBundle> = routes
        .iter()
        .filter_map(|route| route.backend.tls.as_ref()?.ca_secret_ref.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter_map(|reference| match backend_cas?.get(&reference)? {
            BackendCaLookup::Found { pem } => Some(BackendCaBundle {
                secret_ref: reference,
                pem: pem.clone(),
            }),
            _ => None,
        })
        .collect();

    skipped.sort();
    let config = FleetConfig::new(
        routes,
        policies,
        groups.configs(),
        revoked.into_iter().collect(),
    )?
    .with_backend_cas(bundles)?;
    Ok(Compiled { config, skipped })
}

/// Most specific first: exact hosts before wildcards, longer path prefixes first; then
/// host, port, prefix and app id, so that the order is total.
fn route_order(route: &Route) -> (bool, std::cmp::Reverse<usize>, &str, u16, &str, &str) {
    (
        route.host.starts_with("*."),
        std::cmp::Reverse(route.path_prefix.len()),
        &route.host,
        route.port,
        &route.path_prefix,
        &route.app,
    )
}

/// Checks the operator namespace and the fleet defaults.
fn check_settings(inputs: &CompileInputs<'_>) -> Result<(), CompileError> {
    let invalid = |field, value: &str, expected| {
        Err(CompileError::InvalidSetting {
            field,
            value: value.to_owned(),
            expected,
        })
    };
    if !is_dns_label(inputs.operator_namespace) {
        return invalid(
            "operatorNamespace",
            inputs.operator_namespace,
            "must be a namespace name",
        );
    }
    let defaults = inputs.defaults;
    if let Some(tls) = &defaults.tls_secret {
        if !is_dns_label(&tls.namespace) {
            return invalid(
                "defaults.tlsSecret.namespace",
                &tls.namespace,
                "must be a namespace name",
            );
        }
        if tls.name.is_empty() {
            return invalid("defaults.tlsSecret.name", &tls.name, "must not be empty");
        }
    }
    if let Some(oidc) = &defaults.oidc {
        if !app::is_issuer_url(&oidc.issuer_url) {
            return invalid(
                "defaults.oidc.issuerUrl",
                &oidc.issuer_url,
                "must be an https:// URL (http:// only for localhost)",
            );
        }
        if oidc.client_id.is_empty() {
            return invalid(
                "defaults.oidc.clientId",
                &oidc.client_id,
                "must not be empty",
            );
        }
        if !oidc.scopes.iter().any(|s| s == "openid") {
            return invalid(
                "defaults.oidc.scopes",
                &oidc.scopes.join(" "),
                "must include openid",
            );
        }
    }
    let limit = &defaults.rate_limit;
    if limit.requests_per_second == 0 || limit.burst < limit.requests_per_second {
        return invalid(
            "defaults.rateLimit",
            &format!("{}/{}", limit.requests_per_second, limit.burst),
            "must allow at least 1 request/s with a burst no smaller than the rate",
        );
    }
    Ok(())
}

/// Whether `text` is a namespace name (a DNS-1123 label).
fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// The namespace and name of `text` when it is `NAMESPACE/NAME` (both parts non-empty,
/// one slash), as revoked connectors and the what-if tool's `--app` are given.
pub(crate) fn split_namespaced_name(text: &str) -> Option<(&str, &str)> {
    text.split_once('/').filter(|(namespace, name)| {
        !namespace.is_empty() && !name.is_empty() && !name.contains('/')
    })
}

/// `namespace/name` of every object, in input order; refuses nameless, namespace-less and
/// duplicate objects.
fn object_ids<'a>(
    kind: &'static str,
    objects: impl Iterator<Item = &'a ObjectMeta>,
) -> Result<Vec<String>, CompileError> {
    let mut seen = BTreeSet::new();
    let mut ids = Vec::new();
    for (index, metadata) in objects.enumerate() {
        let name = metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or(
            CompileError::MissingName {
                kind,
                position: index + 1,
            },
        )?;
        let namespace = metadata
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CompileError::MissingNamespace {
                kind,
                name: name.to_owned(),
            })?;
        let id = format!("{namespace}/{name}");
        if !seen.insert(id.clone()) {
            return Err(CompileError::Duplicate { kind, id });
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Why one object is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    /// PascalCase reason.
    reason: &'static str,
    /// What to fix.
    message: String,
}

impl Problem {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// One problem out of several: the first gives the reason, all are named, as in the
    /// ResolvedRefs condition.
    fn combine(problems: Vec<Problem>) -> Option<Problem> {
        let reason = problems.first()?.reason;
        let message = problems
            .into_iter()
            .map(|p| p.message)
            .collect::<Vec<_>>()
            .join("; ");
        Some(Problem { reason, message })
    }
}

/// Checks a duration field, naming it in the problem.
fn check_duration(
    field: &str,
    value: &sallyport_api::Duration,
    problems: &mut Vec<Problem>,
) -> Option<std::time::Duration> {
    match value.to_std() {
        Ok(length) => Some(length),
        Err(error) => {
            problems.push(Problem::new("InvalidField", format!("{field}: {error}")));
            None
        }
    }
}

/// What the tests of the compile step and of the what-if tool build their objects from.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::manifests::Manifests;

    /// ConnectorGroup `team-a/dc`, the group of the fixtures' apps.
    pub const GROUP_DC: &str = "
apiVersion: sallyport.dev/v1alpha1
kind: ConnectorGroup
metadata: {name: dc, namespace: team-a}
spec: {}
";

    /// The objects of the YAML streams `documents`; those that name no namespace are put
    /// in `default`.
    pub fn manifests(documents: &[&str]) -> Manifests {
        let mut manifests = Manifests::default();
        for yaml in documents {
            manifests
                .add_yaml("test", yaml, "default")
                .unwrap_or_else(|e| panic!("{e}"));
        }
        manifests
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::GROUP_DC;
    use super::manifests::Manifests;
    use super::*;

    /// Besides [`GROUP_DC`].
    const MANIFESTS: &str = "
apiVersion: sallyport.dev/v1alpha1
kind: ConnectorGroup
metadata: {name: other, namespace: team-a}
spec: {}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: wiki, namespace: team-a}
spec:
  externalUrl: https://wiki.example.com/
  internalUrl: https://wiki.corp.internal/
  connectorGroup: {name: dc}
  preAuthentication: {type: Passthrough}
  tls: {secretName: wiki-tls}
  backend:
    tls:
      caSecretRef: {name: corp-ca, key: ca.crt}
      serverName: wiki.corp.internal
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: chat, namespace: team-a}
spec:
  externalUrl: https://chat.example.com/
  internalUrl: https://chat.corp.internal/
  connectorGroup: {name: dc}
  preAuthentication: {type: Passthrough}
  tls: {secretName: chat-tls}
  backend:
    tls:
      caSecretRef: {name: corp-ca, key: ca.crt}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: crm, namespace: team-a}
spec:
  externalUrl: https://crm.example.com/
  internalUrl: https://crm.corp.internal/
  connectorGroup: {name: other}
  preAuthentication: {type: Passthrough}
  tls: {secretName: crm-tls}
  backend:
    tls:
      caSecretRef: {name: crm-ca, key: ca.crt}
";

    fn manifests() -> Manifests {
        fixtures::manifests(&[GROUP_DC, MANIFESTS])
    }

    fn ca_ref(name: &str) -> SecretKeyRef {
        SecretKeyRef {
            namespace: "team-a".to_owned(),
            name: name.to_owned(),
            key: "ca.crt".to_owned(),
        }
    }

    fn route_ids(compiled: &Compiled) -> Vec<&str> {
        compiled
            .config
            .routes
            .iter()
            .map(|r| r.app.as_str())
            .collect()
    }

    #[test]
    fn backend_cas_are_copied_once_and_inlined_into_their_groups_slices() {
        let manifests = manifests();
        let defaults = FleetDefaults::default();
        let inputs = manifests.inputs("sallyport-system", &defaults, &[]);
        let cas = BackendCas::from([
            (
                ca_ref("corp-ca"),
                BackendCaLookup::Found {
                    pem: "CORP CA PEM".to_owned(),
                },
            ),
            (
                ca_ref("crm-ca"),
                BackendCaLookup::Found {
                    pem: "CRM CA PEM".to_owned(),
                },
            ),
        ]);
        let compiled = compile_with_backend_cas(&inputs, &cas).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.skipped, []);
        assert_eq!(
            route_ids(&compiled),
            ["team-a/chat", "team-a/crm", "team-a/wiki"]
        );
        let bundles: Vec<(&str, &str)> = compiled
            .config
            .backend_cas
            .iter()
            .map(|b| (b.secret_ref.name.as_str(), b.pem.as_str()))
            .collect();
        assert_eq!(
            bundles,
            [("corp-ca", "CORP CA PEM"), ("crm-ca", "CRM CA PEM")]
        );
        let json = serde_json::to_string(&compiled.config).unwrap_or_default();
        assert_eq!(json.matches("CORP CA PEM").count(), 1, "{json}");

        let slice = compiled
            .config
            .group_slice("team-a/dc")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("team-a/dc has a slice"));
        let tls: Vec<(&str, Option<&str>, Option<&str>)> = slice
            .apps
            .iter()
            .filter_map(|a| {
                let tls = a.backend.tls.as_ref()?;
                Some((
                    a.app.as_str(),
                    tls.ca_pem.as_deref(),
                    tls.server_name.as_deref(),
                ))
            })
            .collect();
        assert_eq!(
            tls,
            [
                ("team-a/chat", Some("CORP CA PEM"), None),
                (
                    "team-a/wiki",
                    Some("CORP CA PEM"),
                    Some("wiki.corp.internal")
                ),
            ]
        );
        let slice_json = serde_json::to_string(&slice).unwrap_or_default();
        assert!(!slice_json.contains("CRM CA PEM"), "{slice_json}");

        // A new CA in the Secret is a new configuration.
        let mut rotated = cas.clone();
        rotated.insert(
            ca_ref("corp-ca"),
            BackendCaLookup::Found {
                pem: "NEW CORP CA PEM".to_owned(),
            },
        );
        let again = compile_with_backend_cas(&inputs, &rotated).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(again.config.version, compiled.config.version);
    }

    #[test]
    fn an_app_whose_backend_ca_does_not_resolve_is_left_out() {
        let manifests = manifests();
        let defaults = FleetDefaults::default();
        let inputs = manifests.inputs("sallyport-system", &defaults, &[]);
        let cas = BackendCas::from([(
            ca_ref("corp-ca"),
            BackendCaLookup::Invalid {
                what: "backend CA Secret team-a/corp-ca key ca.crt holds no PEM certificate"
                    .to_owned(),
            },
        )]);
        let compiled = compile_with_backend_cas(&inputs, &cas).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(route_ids(&compiled), Vec::<&str>::new());
        let skipped: Vec<(&str, &str)> = compiled
            .skipped
            .iter()
            .map(|s| (s.id.as_str(), s.reason))
            .collect();
        assert_eq!(
            skipped,
            [
                ("team-a/chat", "BackendCASecretInvalid"),
                ("team-a/crm", "BackendCASecretNotFound"),
                ("team-a/wiki", "BackendCASecretInvalid"),
            ]
        );
        let crm = compiled.skipped.iter().find(|s| s.id == "team-a/crm");
        assert_eq!(
            crm.map(|s| s.message.as_str()),
            Some("backend CA Secret team-a/crm-ca was not read (spec.backend.tls.caSecretRef)")
        );
        assert!(compiled.config.backend_cas.is_empty());
    }

    #[test]
    fn without_reading_secrets_backend_cas_stay_references() {
        let manifests = manifests();
        let defaults = FleetDefaults::default();
        let compiled = compile(&manifests.inputs("sallyport-system", &defaults, &[]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(route_ids(&compiled).len(), 3);
        assert!(compiled.config.backend_cas.is_empty());
        let wiki = compiled.config.route("team-a/wiki");
        let tls = wiki.and_then(|r| r.backend.tls.clone());
        assert_eq!(
            tls.as_ref().and_then(|t| t.ca_secret_ref.clone()),
            Some(ca_ref("corp-ca"))
        );
        assert_eq!(tls.and_then(|t| t.ca_pem), None);
    }
}
