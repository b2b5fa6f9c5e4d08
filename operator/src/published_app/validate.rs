//! The pure step of the PublishedApp reconcile: from the app and what its references
//! resolved to, the conditions, URL and readiness to report.

use std::collections::BTreeMap;

use kube::core::{Selector, SelectorExt};
use sallyport_api::connector_group::NamespacesFrom;
use sallyport_api::published_app::{ConnectorGroupReadiness, PreAuthenticationType};
use sallyport_api::{ConnectorGroup, PublishedApp};

use super::backend_ca::BackendCaLookup;
use crate::conditions::Verdict;
use crate::external_url::ExternalUrl;

/// Condition types of a PublishedApp.
pub mod condition {
    /// The app's route is valid and not claimed by an older app.
    pub const ACCEPTED: &str = "Accepted";
    /// Every object the app references exists and is usable.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The app is accepted, resolved, and its connector group has a connected connector.
    pub const READY: &str = "Ready";
}

/// What the app's ConnectorGroup reference resolved to.
#[derive(Debug, Clone)]
pub enum GroupLookup {
    /// No such ConnectorGroup.
    NotFound {
        /// `namespace/name` looked up.
        reference: String,
    },
    /// The group, with the labels of the app's namespace (for `from: Selector`).
    Found {
        /// The ConnectorGroup.
        group: Box<ConnectorGroup>,
        /// Labels of the app's namespace.
        app_namespace_labels: BTreeMap<String, String>,
    },
}

/// What the app's TLS Secret resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsLookup {
    /// The Secret serves the host.
    Valid,
    /// Neither `spec.tls` nor a fleet default names a Secret.
    NotConfigured,
    /// The named Secret does not exist.
    NotFound {
        /// `namespace/name` looked up.
        reference: String,
    },
    /// The Secret exists but cannot serve the host.
    Invalid {
        /// `namespace/name` of the Secret.
        reference: String,
        /// Why not.
        reason: String,
    },
}

/// What the app's OIDC client Secret resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSecretLookup {
    /// The app needs no client Secret (passthrough, public client, or fleet default).
    NotNeeded,
    /// The Secret and key exist.
    Found,
    /// The Secret does not exist, or lacks the key.
    Missing {
        /// What is missing, e.g. `Secret team-a/wiki-oidc has no key client-secret`.
        what: String,
    },
}

/// Everything the dereference step found for one app.
#[derive(Debug, Clone)]
pub struct References {
    /// The ConnectorGroup.
    pub group: GroupLookup,
    /// The TLS Secret.
    pub tls: TlsLookup,
    /// The OIDC client Secret.
    pub client_secret: ClientSecretLookup,
    /// The backend CA Secret key (`spec.backend.tls.caSecretRef`).
    pub backend_ca: BackendCaLookup,
    /// Whether the fleet has a default OIDC provider, for apps that name none.
    pub default_oidc_provider: bool,
    /// Policies the app names that do not exist.
    pub missing_policies: Vec<String>,
    /// Why policies that apply to the app cannot be evaluated, one message each.
    pub invalid_policies: Vec<String>,
    /// `namespace/name` of an older app that already holds this app's route.
    pub route_holder: Option<String>,
}

/// The status the operator concludes for an app.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// Accepted, ResolvedRefs and Ready, in that order.
    pub verdicts: Vec<Verdict>,
    /// The canonical external URL, once accepted.
    pub url: Option<String>,
    /// Readiness of the app's ConnectorGroup, when it resolved.
    pub group: Option<ConnectorGroupReadiness>,
}

/// Whether `group` lets apps of `app_namespace` (labelled `labels`) use it.
pub fn namespace_allowed(
    group: &ConnectorGroup,
    app_namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let allowed = &group.spec.allowed_namespaces;
    match allowed.from {
        NamespacesFrom::All => true,
        NamespacesFrom::Same => group.metadata.namespace.as_deref() == Some(app_namespace),
        NamespacesFrom::Selector => allowed
            .selector
            .clone()
            .and_then(|s| Selector::try_from(s).ok())
            .is_some_and(|s| s.matches(labels)),
    }
}

/// The conditions, URL and group readiness for `app` given its `references`.
pub fn assess(app: &PublishedApp, references: &References) -> Assessment {
    use condition::{ACCEPTED, READY, RESOLVED_REFS};
    let namespace = app.metadata.namespace.as_deref().unwrap_or_default();

    let url = ExternalUrl::parse(&app.spec.external_url);
    let accepted = match (&url, &references.route_holder) {
        (Err(error), _) => Verdict::failed(ACCEPTED, "InvalidExternalUrl", error.to_string()),
        (Ok(url), Some(holder)) => Verdict::failed(
            ACCEPTED,
            "HostConflict",
            format!(
                "{} is already published by the older PublishedApp {holder}; change externalUrl or remove that app",
                url.canonical()
            ),
        ),
        (Ok(url), None) => Verdict::ok(
            ACCEPTED,
            "Accepted",
            format!("published on {}", url.canonical()),
        ),
    };

    // Every unresolved reference is named; the first one gives the reason.
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    let mut group_readiness = None;
    match &references.group {
        GroupLookup::NotFound { reference } => {
            problems.push((
                "ConnectorGroupNotFound",
                format!("ConnectorGroup {reference} does not exist"),
            ));
        }
        GroupLookup::Found {
            group,
            app_namespace_labels,
        } => {
            let reference = format!(
                "{}/{}",
                group.metadata.namespace.as_deref().unwrap_or_default(),
                group.metadata.name.as_deref().unwrap_or_default()
            );
            if namespace_allowed(group, namespace, app_namespace_labels) {
                let connected = group.status.as_ref().map_or(0, |s| s.connected_connectors);
                group_readiness = Some(ConnectorGroupReadiness {
                    ready: connected > 0,
                    connected_connectors: connected,
                });
            } else {
                problems.push((
                    "NamespaceNotAllowed",
                    format!("ConnectorGroup {reference} does not allow PublishedApps of namespace {namespace} (see its spec.allowedNamespaces)"),
                ));
            }
        }
    }
    match &references.tls {
        TlsLookup::Valid => {}
        TlsLookup::NotConfigured => problems.push((
            "TLSSecretNotConfigured",
            "no TLS Secret: set spec.tls.secretName or a fleet default TLS Secret".to_owned(),
        )),
        TlsLookup::NotFound { reference } => problems.push((
            "TLSSecretNotFound",
            format!("TLS Secret {reference} does not exist"),
        )),
        TlsLookup::Invalid { reference, reason } => problems.push((
            "TLSSecretInvalid",
            format!("TLS Secret {reference} {reason}"),
        )),
    }
    let uses_default_provider = app.spec.pre_authentication.kind == PreAuthenticationType::Oidc
        && app.spec.pre_authentication.oidc.is_none();
    if uses_default_provider && !references.default_oidc_provider {
        problems.push((
            "OIDCProviderNotConfigured",
            "spec.preAuthentication.oidc is not set and the fleet has no default OpenID Connect provider".to_owned(),
        ));
    }
    if let ClientSecretLookup::Missing { what } = &references.client_secret {
        problems.push(("OIDCClientSecretNotFound", what.clone()));
    }
    if let Some((reason, what)) = references.backend_ca.problem() {
        problems.push((reason, format!("{what} (spec.backend.tls.caSecretRef)")));
    }
    if !references.missing_policies.is_empty() {
        problems.push((
            "PolicyNotFound",
            format!(
                "ConditionalAccessPolicy {} named in spec.conditionalAccessPolicies does not exist in namespace {namespace}",
                references.missing_policies.join(", ")
            ),
        ));
    }
    if !references.invalid_policies.is_empty() {
        problems.push((
            "PolicyInvalid",
            format!(
                "{}; the app is not served until the policy is fixed",
                references.invalid_policies.join("; ")
            ),
        ));
    }
    let resolved = match problems.first() {
        None => Verdict::ok(RESOLVED_REFS, "ResolvedRefs", "all references resolved"),
        Some((reason, _)) => Verdict::failed(
            RESOLVED_REFS,
            reason,
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };

    let ready = if !accepted.status {
        Verdict::failed(READY, "NotAccepted", accepted.message.clone())
    } else if !resolved.status {
        Verdict::failed(READY, "RefsNotResolved", resolved.message.clone())
    } else {
        match &group_readiness {
            Some(g) if g.ready => Verdict::ok(
                READY,
                "Ready",
                format!("{} connected connector(s)", g.connected_connectors),
            ),
            _ => Verdict::failed(
                READY,
                "NoConnectedConnectors",
                format!(
                    "ConnectorGroup {} has no connected connector",
                    app.spec.connector_group.name
                ),
            ),
        }
    };

    Assessment {
        url: match (&url, accepted.status) {
            (Ok(url), true) => Some(url.canonical()),
            _ => None,
        },
        verdicts: vec![accepted, resolved, ready],
        group: group_readiness,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(extra_spec: &str) -> PublishedApp {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {{name: wiki, namespace: team-a}}\nspec:\n  externalUrl: https://wiki.apps.example.com/\n  internalUrl: http://wiki.corp.internal/\n  connectorGroup: {{name: dc, namespace: sallyport-system}}\n{extra_spec}"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn group(allowed: &str, connected: i32) -> Box<ConnectorGroup> {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: dc, namespace: sallyport-system}}\nspec:\n  allowedNamespaces: {allowed}\nstatus: {{connectedConnectors: {connected}}}\n"
        );
        Box::new(serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}")))
    }

    fn resolved(group: Box<ConnectorGroup>) -> References {
        References {
            group: GroupLookup::Found {
                group,
                app_namespace_labels: BTreeMap::from([("team".into(), "a".into())]),
            },
            tls: TlsLookup::Valid,
            client_secret: ClientSecretLookup::NotNeeded,
            backend_ca: BackendCaLookup::NotNeeded,
            default_oidc_provider: true,
            missing_policies: vec![],
            invalid_policies: vec![],
            route_holder: None,
        }
    }

    fn reasons(assessment: &Assessment) -> Vec<(&str, bool, &str)> {
        assessment
            .verdicts
            .iter()
            .map(|v| (v.type_, v.status, v.reason))
            .collect()
    }

    #[test]
    fn a_fully_resolved_app_with_a_connected_group_is_ready() {
        let assessment = assess(&app(""), &resolved(group("{from: All}", 2)));
        assert_eq!(
            reasons(&assessment),
            [
                ("Accepted", true, "Accepted"),
                ("ResolvedRefs", true, "ResolvedRefs"),
                ("Ready", true, "Ready")
            ]
        );
        assert_eq!(
            assessment.url.as_deref(),
            Some("https://wiki.apps.example.com/")
        );
        assert_eq!(
            assessment.group,
            Some(ConnectorGroupReadiness {
                ready: true,
                connected_connectors: 2
            })
        );
    }

    #[test]
    fn no_connected_connector_means_not_ready() {
        let assessment = assess(&app(""), &resolved(group("{from: All}", 0)));
        assert_eq!(assessment.verdicts[2].reason, "NoConnectedConnectors");
        assert!(!assessment.verdicts[2].status);
    }

    #[test]
    fn a_missing_group_is_named() {
        let mut references = resolved(group("{from: All}", 1));
        references.group = GroupLookup::NotFound {
            reference: "sallyport-system/dc".into(),
        };
        let assessment = assess(&app(""), &references);
        assert_eq!(
            reasons(&assessment)[1],
            ("ResolvedRefs", false, "ConnectorGroupNotFound")
        );
        assert!(
            assessment.verdicts[1]
                .message
                .contains("ConnectorGroup sallyport-system/dc does not exist")
        );
        assert_eq!(reasons(&assessment)[2], ("Ready", false, "RefsNotResolved"));
        assert_eq!(assessment.group, None);
    }

    #[test]
    fn allowed_namespaces_same_all_and_selector() {
        let same = assess(&app(""), &resolved(group("{from: Same}", 1)));
        assert_eq!(same.verdicts[1].reason, "NamespaceNotAllowed");
        let selected = assess(
            &app(""),
            &resolved(group(
                "{from: Selector, selector: {matchLabels: {team: a}}}",
                1,
            )),
        );
        assert!(selected.verdicts[1].status);
        let not_selected = assess(
            &app(""),
            &resolved(group(
                "{from: Selector, selector: {matchLabels: {team: b}}}",
                1,
            )),
        );
        assert_eq!(not_selected.verdicts[1].reason, "NamespaceNotAllowed");
    }

    #[test]
    fn every_unresolved_reference_is_listed_and_the_first_gives_the_reason() {
        let mut references = resolved(group("{from: All}", 1));
        references.tls = TlsLookup::Invalid {
            reference: "team-a/wiki-tls".into(),
            reason: "has no tls.key".into(),
        };
        references.missing_policies = vec!["require-mfa".into()];
        references.client_secret = ClientSecretLookup::Missing {
            what: "Secret team-a/wiki-oidc does not exist".into(),
        };
        let assessment = assess(&app(""), &references);
        let resolved_refs = &assessment.verdicts[1];
        assert_eq!(resolved_refs.reason, "TLSSecretInvalid");
        for part in [
            "TLS Secret team-a/wiki-tls has no tls.key",
            "Secret team-a/wiki-oidc does not exist",
            "require-mfa",
        ] {
            assert!(
                resolved_refs.message.contains(part),
                "{part} missing from {}",
                resolved_refs.message
            );
        }
    }

    #[test]
    fn a_policy_the_engine_cannot_evaluate_is_an_unresolved_reference() {
        let mut references = resolved(group("{from: All}", 1));
        references.invalid_policies = vec![
            "ConditionalAccessPolicy team-a/hours: spec.conditions.times[0].timeZone: \"Mars/Olympus\" is not a known IANA time zone".into(),
        ];
        let assessment = assess(&app(""), &references);
        let resolved_refs = &assessment.verdicts[1];
        assert_eq!(resolved_refs.reason, "PolicyInvalid");
        assert!(
            resolved_refs.message.contains("team-a/hours")
                && resolved_refs.message.contains("timeZone")
                && resolved_refs.message.contains("not served"),
            "{}",
            resolved_refs.message
        );
    }

    #[test]
    fn an_unusable_backend_ca_is_an_unresolved_reference() {
        let mut references = resolved(group("{from: All}", 1));
        references.backend_ca = BackendCaLookup::NotFound {
            what: "backend CA Secret team-a/corp-ca has no key ca.crt".into(),
        };
        let assessment = assess(&app(""), &references);
        let resolved_refs = &assessment.verdicts[1];
        assert_eq!(
            (resolved_refs.status, resolved_refs.reason),
            (false, "BackendCASecretNotFound")
        );
        assert_eq!(
            resolved_refs.message,
            "backend CA Secret team-a/corp-ca has no key ca.crt (spec.backend.tls.caSecretRef)"
        );
        assert_eq!(assessment.verdicts[2].reason, "RefsNotResolved");
        references.backend_ca = BackendCaLookup::Invalid {
            what: "backend CA Secret team-a/corp-ca key ca.crt holds no PEM certificate".into(),
        };
        assert_eq!(
            assess(&app(""), &references).verdicts[1].reason,
            "BackendCASecretInvalid"
        );
        references.backend_ca = BackendCaLookup::Found { pem: "PEM".into() };
        assert!(assess(&app(""), &references).verdicts[1].status);
    }

    #[test]
    fn an_app_without_a_provider_needs_a_fleet_default_unless_passthrough() {
        let mut references = resolved(group("{from: All}", 1));
        references.default_oidc_provider = false;
        assert_eq!(
            assess(&app(""), &references).verdicts[1].reason,
            "OIDCProviderNotConfigured"
        );
        let passthrough = app("  preAuthentication: {type: Passthrough}\n");
        assert!(assess(&passthrough, &references).verdicts[1].status);
    }

    #[test]
    fn the_newer_of_two_apps_on_one_route_is_not_accepted() {
        let mut references = resolved(group("{from: All}", 1));
        references.route_holder = Some("team-b/old-wiki".into());
        let assessment = assess(&app(""), &references);
        assert_eq!(reasons(&assessment)[0], ("Accepted", false, "HostConflict"));
        assert!(assessment.verdicts[0].message.contains("team-b/old-wiki"));
        assert_eq!(assessment.url, None);
        assert_eq!(assessment.verdicts[2].reason, "NotAccepted");
    }
}
