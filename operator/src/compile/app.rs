//! One PublishedApp: accepted and resolved as its status would say, then its route.

use sallyport_api::PublishedApp;
use sallyport_api::fleet_config::{
    Backend, BackendTls, OidcClient, PreAuthentication, Route, RouteTls, SecretKeyRef, SecretRef,
};
use sallyport_api::published_app::{PreAuthenticationType, RateLimit};

use super::group::Groups;
use super::policy::Policies;
use super::{BackendCaLookup, BackendCas, CompileInputs, Problem, check_duration};
use crate::external_url::ExternalUrl;
use crate::policy_selection::applied_policies;
use crate::published_app::backend_ca;
use crate::published_app::routes::route_holder;
use crate::published_app::validate::{
    ClientSecretLookup, GroupLookup, References, TlsLookup, assess, condition,
};

/// The route of `app` (whose id is `id`), or why it is left out. `same_route` holds the
/// apps of the inputs that claim the same route, `app` among them. `backend_cas`, when
/// given, is what the backend CA Secrets resolved to; without it a CA reference counts
/// as found.
pub(super) fn compile_app(
    app: &PublishedApp,
    id: &str,
    same_route: &[&PublishedApp],
    groups: &Groups,
    policies: &Policies,
    inputs: &CompileInputs<'_>,
    backend_cas: Option<&BackendCas>,
) -> Result<Route, Problem> {
    if app.metadata.deletion_timestamp.is_some() {
        return Err(Problem::new(
            "BeingDeleted",
            "the PublishedApp is being deleted",
        ));
    }
    let namespace = app.metadata.namespace.as_deref().unwrap_or_default();
    let spec = &app.spec;
    let group_namespace = spec
        .connector_group
        .namespace
        .as_deref()
        .unwrap_or(namespace);
    let group_id = format!("{group_namespace}/{}", spec.connector_group.name);
    let group = groups.get(&group_id);
    let applied = applied_policies(
        app,
        policies.candidates(namespace),
        inputs.operator_namespace,
    );

    // The status rules, over references resolved within the inputs. Secrets are not
    // inputs: a named TLS or client Secret counts as found. Backend CAs are checked when
    // the caller read them.
    let backend_ca = match (backend_ca::app_reference(app), backend_cas) {
        (None, _) | (Some(_), None) => BackendCaLookup::NotNeeded,
        (Some(reference), Some(cas)) => {
            cas.get(&reference)
                .cloned()
                .unwrap_or_else(|| BackendCaLookup::NotFound {
                    what: format!(
                        "backend CA Secret {}/{} was not read",
                        reference.namespace, reference.name
                    ),
                })
        }
    };
    let references = References {
        group: match group {
            None => GroupLookup::NotFound {
                reference: group_id.clone(),
            },
            Some(group) => GroupLookup::Found {
                group: Box::new(group.lookup.clone()),
                app_namespace_labels: inputs
                    .namespace_labels
                    .get(namespace)
                    .cloned()
                    .unwrap_or_default(),
            },
        },
        tls: if spec.tls.is_some() || inputs.defaults.tls_secret.is_some() {
            TlsLookup::Valid
        } else {
            TlsLookup::NotConfigured
        },
        client_secret: ClientSecretLookup::NotNeeded,
        backend_ca,
        default_oidc_provider: inputs.defaults.oidc.is_some(),
        missing_policies: applied.missing.clone(),
        // Reported below as PolicyInvalid, from the compiled policies.
        invalid_policies: Vec::new(),
        route_holder: route_holder(app, same_route.iter().copied()),
    };
    let assessment = assess(app, &references);
    if let Some(verdict) = assessment
        .verdicts
        .iter()
        .find(|v| v.type_ != condition::READY && !v.status)
    {
        return Err(Problem::new(verdict.reason, verdict.message.clone()));
    }

    // What admission refuses and a manifest on disk may still hold, and what depends on
    // a refused object.
    let mut problems = Vec::new();
    if let Some(Err(problem)) = group.map(|g| &g.config) {
        problems.push(Problem::new(
            "ConnectorGroupInvalid",
            format!("ConnectorGroup {group_id} is left out: {}", problem.message),
        ));
    }
    let mut policy_ids: Vec<String> = applied
        .applied
        .iter()
        .map(|name| {
            if name.contains('/') {
                name.clone()
            } else {
                format!("{namespace}/{name}")
            }
        })
        .collect();
    policy_ids.sort();
    policy_ids.dedup();
    for policy_id in &policy_ids {
        if let Some(Err(problem)) = policies.get(policy_id) {
            problems.push(Problem::new(
                "PolicyInvalid",
                format!(
                    "ConditionalAccessPolicy {policy_id} applies to this app but is left out ({}); the app is not served without it",
                    problem.message
                ),
            ));
        }
    }
    let url = ExternalUrl::parse(&spec.external_url)
        .map_err(|error| Problem::new("InvalidExternalUrl", error.to_string()))?;
    if !is_internal_url(&spec.internal_url) {
        problems.push(Problem::new(
            "InvalidField",
            format!(
                "spec.internalUrl {:?} must be an absolute http:// or https:// URL with a host, and no query, fragment or wildcard",
                spec.internal_url
            ),
        ));
    }
    let pre_authentication = pre_authentication(app, namespace, inputs, &mut problems);
    let tls = match (&spec.tls, &inputs.defaults.tls_secret) {
        (Some(tls), _) => Some(SecretRef {
            namespace: namespace.to_owned(),
            name: tls.secret_name.clone(),
        }),
        (None, default) => default.clone(),
    };
    check_duration("spec.backend.timeout", &spec.backend.timeout, &mut problems);
    let backend_tls = spec.backend.tls.as_ref().map(|tls| BackendTls {
        ca_secret_ref: tls.ca_secret_ref.as_ref().map(|r| SecretKeyRef {
            namespace: namespace.to_owned(),
            name: r.name.clone(),
            key: r.key.clone(),
        }),
        // Routes share the bundles in `FleetConfig::backend_cas`; slices inline them.
        ca_pem: None,
        server_name: tls.server_name.clone(),
        insecure_skip_verify: tls.insecure_skip_verify,
    });
    if backend_tls.is_some() && !spec.internal_url.starts_with("https://") {
        problems.push(Problem::new(
            "InvalidField",
            "spec.backend.tls applies only when spec.internalUrl uses https://",
        ));
    }
    let signed_assertion = &spec.identity.signed_assertion;
    if signed_assertion.enabled {
        check_duration(
            "spec.identity.signedAssertion.lifetime",
            &signed_assertion.lifetime,
            &mut problems,
        );
    }
    let rate_limit = spec
        .rate_limit
        .clone()
        .unwrap_or_else(|| inputs.defaults.rate_limit.clone());
    if !is_rate_limit(&rate_limit) {
        problems.push(Problem::new(
            "InvalidField",
            "spec.rateLimit must allow at least 1 request/s, with a burst no smaller than requestsPerSecond",
        ));
    }
    if let Some(per_client) = &rate_limit.per_client_ip
        && (per_client.requests_per_second == 0
            || per_client.burst < per_client.requests_per_second)
    {
        problems.push(Problem::new(
            "InvalidField",
            "spec.rateLimit.perClientIp must allow at least 1 request/s, with a burst no smaller than requestsPerSecond",
        ));
    }
    let max_request_body_bytes = spec
        .limits
        .as_ref()
        .and_then(|limits| limits.max_request_body_bytes);
    if max_request_body_bytes == Some(0) {
        problems.push(Problem::new(
            "InvalidField",
            "spec.limits.maxRequestBodyBytes must be at least 1 (omit it for the fleet's limit)",
        ));
    }
    if let Some(problem) = Problem::combine(problems) {
        return Err(problem);
    }
    let (Some(pre_authentication), Some(tls)) = (pre_authentication, tls) else {
        // `assess` already refuses an app without a provider or a TLS Secret.
        return Err(Problem::new(
            "Unresolved",
            "the OIDC provider or TLS Secret did not resolve",
        ));
    };

    Ok(Route {
        app: id.to_owned(),
        host: url.host.clone(),
        port: url.port,
        path_prefix: url.path_prefix.clone(),
        url: url.canonical(),
        internal_url: spec.internal_url.clone(),
        connector_group: group_id,
        pre_authentication,
        assignment: spec.assignment.clone(),
        policies: policy_ids,
        tls: RouteTls { secret_ref: tls },
        session: spec.session.clone(),
        identity: spec.identity.clone(),
        translation: spec.translation.clone(),
        backend: Backend {
            timeout: spec.backend.timeout.clone(),
            websockets: spec.backend.websockets,
            tls: backend_tls,
        },
        maintenance_mode: spec.maintenance_mode,
        rate_limit,
        max_request_body_bytes,
    })
}

/// The app's pre-authentication with its provider resolved (the app's own or the fleet
/// default); `None` when there is no provider to resolve.
fn pre_authentication(
    app: &PublishedApp,
    namespace: &str,
    inputs: &CompileInputs<'_>,
    problems: &mut Vec<Problem>,
) -> Option<PreAuthentication> {
    let kind = app.spec.pre_authentication.kind;
    if kind == PreAuthenticationType::Passthrough {
        return Some(PreAuthentication { kind, oidc: None });
    }
    let oidc = match &app.spec.pre_authentication.oidc {
        Some(client) => {
            let scopes: Vec<String> = client.scopes.iter().map(|s| s.to_string()).collect();
            if !is_issuer_url(&client.issuer_url) {
                problems.push(Problem::new(
                    "InvalidField",
                    format!(
                        "spec.preAuthentication.oidc.issuerUrl {:?} must be an https:// URL (http:// only for localhost)",
                        client.issuer_url
                    ),
                ));
            }
            if !scopes.iter().any(|s| s == "openid") {
                problems.push(Problem::new(
                    "InvalidField",
                    "spec.preAuthentication.oidc.scopes must include openid",
                ));
            }
            OidcClient {
                issuer_url: client.issuer_url.clone(),
                client_id: client.client_id.clone(),
                scopes,
                client_secret_ref: client.client_secret_ref.as_ref().map(|r| SecretKeyRef {
                    namespace: namespace.to_owned(),
                    name: r.name.clone(),
                    key: r.key.clone(),
                }),
            }
        }
        None => {
            let default = inputs.defaults.oidc.as_ref()?;
            OidcClient {
                issuer_url: default.issuer_url.clone(),
                client_id: default.client_id.clone(),
                scopes: default.scopes.clone(),
                client_secret_ref: default.client_secret_ref.clone(),
            }
        }
    };
    Some(PreAuthentication {
        kind,
        oidc: Some(oidc),
    })
}

/// Whether `url` is an issuer URL the proxy may use: https, or http on localhost.
pub(super) fn is_issuer_url(url: &str) -> bool {
    if let Some(rest) = url.strip_prefix("https://") {
        return has_host(rest);
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    ["localhost", "127.0.0.1", "[::1]"].iter().any(|host| {
        rest.strip_prefix(host)
            .is_some_and(|after| after.is_empty() || after.starts_with([':', '/']))
    })
}

/// Whether `url` is an internal URL a connector can reach: http or https with a host, no
/// query, fragment, wildcard or user info.
fn is_internal_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return false;
    };
    has_host(rest) && !url.contains(['?', '#', '*']) && !url.contains(char::is_whitespace)
}

/// Whether the part of a URL after `scheme://` starts with a host and holds no user info.
fn has_host(rest: &str) -> bool {
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']') {
                host
            } else {
                authority
            }
        });
    !host.is_empty() && !authority.contains('@') && !authority.contains(char::is_whitespace)
}

/// Whether a rate limit can be enforced: at least 1 request/s, burst no smaller.
fn is_rate_limit(limit: &RateLimit) -> bool {
    limit.requests_per_second >= 1 && limit.burst >= limit.requests_per_second
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_urls() {
        for good in [
            "https://login.example.com/",
            "https://login.example.com",
            "http://localhost:5556/dex",
            "http://127.0.0.1",
            "http://[::1]:8080/",
        ] {
            assert!(is_issuer_url(good), "{good}");
        }
        for bad in [
            "http://login.example.com/",
            "http://localhost.evil.com/",
            "https://",
            "https://user@login.example.com/",
            "login.example.com",
        ] {
            assert!(!is_issuer_url(bad), "{bad}");
        }
    }

    #[test]
    fn internal_urls() {
        for good in [
            "http://wiki.corp.internal:8080/",
            "https://10.0.0.5/app/",
            "http://[fd00::1]:80/",
            "http://wiki",
        ] {
            assert!(is_internal_url(good), "{good}");
        }
        for bad in [
            "ftp://wiki/",
            "http:///path",
            "http://wiki/?q=1",
            "http://*.corp/",
            "http://user:pw@wiki/",
            "http://wi ki/",
        ] {
            assert!(!is_internal_url(bad), "{bad}");
        }
    }
}
