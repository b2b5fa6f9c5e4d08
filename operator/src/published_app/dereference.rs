//! The first step of the PublishedApp reconcile: read what the app references.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use sallyport_api::published_app::PreAuthenticationType;
use sallyport_api::{ConditionalAccessPolicy, ConnectorGroup, PublishedApp};

use super::backend_ca::{self, BackendCaLookup};
use super::routes::route_holder;
use super::validate::{ClientSecretLookup, GroupLookup, References, TlsLookup};
use crate::compile::check_policy;
use crate::context::Context;
use crate::error::Error;
use crate::external_url::ExternalUrl;
use crate::policy_selection::{AppliedPolicies, applied_policies};
use crate::tls::check_tls_secret;

/// Reads the app's ConnectorGroup, namespace, TLS Secret, OIDC client Secret, backend CA
/// Secret and policies, and finds any older app holding its route.
pub async fn dereference(
    app: &PublishedApp,
    ctx: &Context,
) -> Result<(References, AppliedPolicies), Error> {
    let namespace = app.namespace().unwrap_or_default();
    let group_ref = &app.spec.connector_group;
    let group_namespace = group_ref
        .namespace
        .clone()
        .unwrap_or_else(|| namespace.clone());
    let group = Api::<ConnectorGroup>::namespaced(ctx.client.clone(), &group_namespace)
        .get_opt(&group_ref.name)
        .await?;
    let group = match group {
        None => GroupLookup::NotFound {
            reference: format!("{group_namespace}/{}", group_ref.name),
        },
        Some(group) => {
            let labels = Api::<Namespace>::all(ctx.client.clone())
                .get_opt(&namespace)
                .await?
                .map(|ns| ns.labels().clone())
                .unwrap_or_else(BTreeMap::new);
            GroupLookup::Found {
                group: Box::new(group),
                app_namespace_labels: labels,
            }
        }
    };

    let tls = match (&app.spec.tls, &ctx.config.default_tls_secret) {
        (Some(tls), _) => tls_lookup(ctx, app, &namespace, &tls.secret_name).await?,
        (None, Some((default_namespace, name))) => {
            tls_lookup(ctx, app, default_namespace, name).await?
        }
        (None, None) => TlsLookup::NotConfigured,
    };

    let pre_authentication = &app.spec.pre_authentication;
    let secret_ref = pre_authentication
        .oidc
        .as_ref()
        .and_then(|oidc| oidc.client_secret_ref.as_ref())
        .filter(|_| pre_authentication.kind == PreAuthenticationType::Oidc);
    let client_secret = match secret_ref {
        None => ClientSecretLookup::NotNeeded,
        Some(secret_ref) => {
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
                .get_opt(&secret_ref.name)
                .await?;
            let has_key = |s: &Secret| {
                s.data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&secret_ref.key))
                    || s.string_data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&secret_ref.key))
            };
            match secret {
                None => ClientSecretLookup::Missing {
                    what: format!(
                        "OIDC client Secret {namespace}/{} does not exist",
                        secret_ref.name
                    ),
                },
                Some(secret) if !has_key(&secret) => ClientSecretLookup::Missing {
                    what: format!(
                        "OIDC client Secret {namespace}/{} has no key {}",
                        secret_ref.name, secret_ref.key
                    ),
                },
                Some(_) => ClientSecretLookup::Found,
            }
        }
    };

    let backend_ca = match backend_ca::app_reference(app) {
        None => BackendCaLookup::NotNeeded,
        Some(reference) => backend_ca::read(&ctx.client, &reference).await?.1,
    };

    let mut policies = Api::<ConditionalAccessPolicy>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;
    if namespace != ctx.config.operator_namespace {
        policies.extend(
            Api::<ConditionalAccessPolicy>::namespaced(
                ctx.client.clone(),
                &ctx.config.operator_namespace,
            )
            .list(&ListParams::default())
            .await?
            .items,
        );
    }
    let applied = applied_policies(app, &policies, &ctx.config.operator_namespace);
    let invalid_policies = invalid_policies(&applied, &policies, &namespace);

    let apps = ctx.apps.state();
    let references = References {
        group,
        tls,
        client_secret,
        backend_ca,
        default_oidc_provider: ctx.config.default_oidc_provider,
        missing_policies: applied.missing.clone(),
        invalid_policies,
        route_holder: route_holder(app, apps.iter().map(|a| a.as_ref())),
    };
    Ok((references, applied))
}

/// Why each of the `applied` policies (names of `namespace`, or `namespace/name` for
/// baselines) that the conditional access engine cannot evaluate is refused: the compile
/// step leaves the app out while one of them applies.
fn invalid_policies(
    applied: &AppliedPolicies,
    policies: &[ConditionalAccessPolicy],
    namespace: &str,
) -> Vec<String> {
    applied
        .applied
        .iter()
        .filter_map(|name| {
            let (policy_namespace, policy_name) = name.split_once('/').unwrap_or((namespace, name));
            let policy = policies.iter().find(|p| {
                p.namespace().as_deref() == Some(policy_namespace) && p.name_any() == policy_name
            })?;
            let id = format!("{policy_namespace}/{policy_name}");
            check_policy(policy, &id)
                .err()
                .map(|message| format!("ConditionalAccessPolicy {id}: {message}"))
        })
        .collect()
}

async fn tls_lookup(
    ctx: &Context,
    app: &PublishedApp,
    namespace: &str,
    name: &str,
) -> Result<TlsLookup, Error> {
    let reference = format!("{namespace}/{name}");
    let Some(secret) = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await?
    else {
        return Ok(TlsLookup::NotFound { reference });
    };
    let Ok(url) = ExternalUrl::parse(&app.spec.external_url) else {
        // The Accepted condition reports the URL; nothing to check the certificate against.
        return Ok(TlsLookup::Valid);
    };
    Ok(match check_tls_secret(&secret, &url, Timestamp::now()) {
        Ok(()) => TlsLookup::Valid,
        Err(reason) => TlsLookup::Invalid { reference, reason },
    })
}
