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
//! are the status's business.
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
use sallyport_api::fleet_config::{FleetConfigError, Route, SecretKeyRef, SecretRef};
use sallyport_api::published_app::RateLimit;
use sallyport_api::{
    ConditionalAccessPolicy, Connector, ConnectorGroup, FleetConfig, PublishedApp,
};

use crate::external_url::ExternalUrl;

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
            },
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

/// Compiles `inputs` into the fleet configuration.
pub fn compile(inputs: &CompileInputs<'_>) -> Result<Compiled, CompileError> {
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
    let groups = group::Groups::new(inputs.connector_groups, &group_ids, &mut skipped);
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
        match app::compile_app(app, id, same_route, &groups, &policies, inputs) {
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
        match value.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                revoked.insert(value.clone());
            }
            _ => {
                return Err(CompileError::InvalidRevokedConnector {
                    value: value.clone(),
                });
            }
        }
    }
    for (connector, id) in inputs.connectors.iter().zip(connector_ids) {
        if connector.metadata.deletion_timestamp.is_some() {
            revoked.insert(id);
        }
    }

    skipped.sort();
    let config = FleetConfig::new(
        routes,
        policies,
        groups.configs(),
        revoked.into_iter().collect(),
    )?;
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
