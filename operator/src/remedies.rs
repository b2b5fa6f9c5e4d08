//! What a person should do about a condition: one sentence per (kind, reason) that a
//! user can cause, appended to Warning Events (`kubectl describe`) and printed by
//! `kubectl sallyport status`. The condition's own message names the object at fault;
//! the remedy says which field to change or what to create.

/// The fix for a condition of `kind` (`PublishedApp`, `ConnectorGroup`, `Connector`,
/// `ConditionalAccessPolicy`) that is False with `reason`, when there is one a user can
/// apply.
pub fn remedy(kind: &str, reason: &str) -> Option<&'static str> {
    let fix = match (kind, reason) {
        ("PublishedApp", "InvalidExternalUrl") => {
            "fix spec.externalUrl: an https:// URL, at most one wildcard as its left-most label, an optional path prefix"
        }
        ("PublishedApp", "HostConflict") => {
            "change spec.externalUrl (another host or path prefix), or delete the older app that holds the route"
        }
        ("PublishedApp", "ConnectorGroupNotFound") => {
            "create that ConnectorGroup, or point spec.connectorGroup (name, namespace) at an existing one (kubectl get connectorgroups -A)"
        }
        ("PublishedApp", "NamespaceNotAllowed") => {
            "let the app's namespace use the group (its spec.allowedNamespaces: from All, or a selector matching the namespace's labels), or set spec.connectorGroup to a group that allows it"
        }
        ("PublishedApp", "TLSSecretNotConfigured") => {
            "set spec.tls.secretName to a kubernetes.io/tls Secret of the app's namespace, or run the operator with --default-tls-secret"
        }
        ("PublishedApp", "TLSSecretNotFound") => {
            "create it (kubectl create secret tls NAME -n NAMESPACE --cert=FILE --key=FILE) with a certificate for the app's host, or change spec.tls.secretName"
        }
        ("PublishedApp", "TLSSecretInvalid") => {
            "replace the Secret's tls.crt and tls.key with an unexpired certificate and its key covering the app's host (type kubernetes.io/tls)"
        }
        ("PublishedApp", "OIDCProviderNotConfigured") => {
            "set spec.preAuthentication.oidc (issuerUrl, clientId), or run the operator with --default-oidc-issuer"
        }
        ("PublishedApp", "OIDCClientSecretNotFound") => {
            "create the Secret with the client secret under the key spec.preAuthentication.oidc.clientSecretRef names, or fix that reference"
        }
        ("PublishedApp", "BackendCASecretNotFound") => {
            "create the Secret spec.backend.tls.caSecretRef names, with the PEM certificate(s) of the CA that signed the backend's certificate under its key, or fix the reference"
        }
        ("PublishedApp", "BackendCASecretInvalid") => {
            "put PEM CA certificate(s) under the key spec.backend.tls.caSecretRef names"
        }
        ("PublishedApp", "PolicyNotFound") => {
            "create the ConditionalAccessPolicy in the app's namespace, or remove its name from spec.conditionalAccessPolicies"
        }
        ("PublishedApp", "PolicyInvalid") => {
            "fix the policy (kubectl describe conditionalaccesspolicy NAME says which field); the app is not served until then"
        }
        ("PublishedApp", "NotAccepted") => "see the Accepted condition",
        ("PublishedApp", "RefsNotResolved") => "see the ResolvedRefs condition",
        ("PublishedApp", "NoConnectedConnectors") => {
            "run a connector of the group (kubectl get connectorgroup,connectors -n GROUP_NAMESPACE shows them and why they are not connected)"
        }
        ("ConnectorGroup", "NoConnectedConnectors") => {
            "run connectors with the registration token of Secret <group>-registration (spec.deployment runs them in this cluster); kubectl describe connector NAME says why a registered one is not connected"
        }
        ("ConnectorGroup", "RolloutHalted") => {
            "set spec.version (or spec.deployment.image) back to the version that ran, or to a fixed one; kubectl logs on the failing pod says why it did not become ready"
        }
        ("ConnectorGroup", "UpgradeAvailable") => {
            "upgrade the connectors outside the cluster: install the new binary and restart the service (it drains first), as docs/connector-install.md#upgrade says"
        }
        ("Connector", "UpdateAvailable") => {
            "install the connector version its group wants and restart it (it drains first), as docs/connector-install.md#upgrade says"
        }
        ("Connector", "NoTunnels") => {
            "check that the connector runs and reaches the fleet's tunnel address (its log says why it cannot connect); a connector whose certificate expired must register again"
        }
        ("Connector", "Stale") => {
            "the proxy replicas that held its tunnels stopped renewing them: check the proxy fleet, then the connector"
        }
        ("ConditionalAccessPolicy", "InvalidSelector") => {
            "fix spec.assignments.apps.selector: a valid label selector"
        }
        ("ConditionalAccessPolicy", "InvalidPolicy") => {
            "fix the field the message names; until then the apps the policy applies to are not served"
        }
        ("ConditionalAccessPolicy", "NotAccepted") => "see the Accepted condition",
        ("ConditionalAccessPolicy", "NoMatchedApps") => {
            "label the apps to match spec.assignments.apps.selector, fix spec.assignments.apps.names, or name the policy in an app's spec.conditionalAccessPolicies"
        }
        _ => return None,
    };
    Some(fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_reason_a_user_causes_has_a_remedy() {
        let user_caused = [
            ("PublishedApp", "InvalidExternalUrl"),
            ("PublishedApp", "HostConflict"),
            ("PublishedApp", "ConnectorGroupNotFound"),
            ("PublishedApp", "NamespaceNotAllowed"),
            ("PublishedApp", "TLSSecretNotConfigured"),
            ("PublishedApp", "TLSSecretNotFound"),
            ("PublishedApp", "TLSSecretInvalid"),
            ("PublishedApp", "OIDCProviderNotConfigured"),
            ("PublishedApp", "OIDCClientSecretNotFound"),
            ("PublishedApp", crate::published_app::backend_ca::NOT_FOUND),
            ("PublishedApp", crate::published_app::backend_ca::INVALID),
            ("PublishedApp", "PolicyNotFound"),
            ("PublishedApp", "PolicyInvalid"),
            ("PublishedApp", "NoConnectedConnectors"),
            ("ConnectorGroup", "NoConnectedConnectors"),
            ("Connector", "NoTunnels"),
            ("Connector", "Stale"),
            ("ConditionalAccessPolicy", "InvalidSelector"),
            ("ConditionalAccessPolicy", crate::compile::INVALID_POLICY),
            ("ConditionalAccessPolicy", "NoMatchedApps"),
        ];
        for (kind, reason) in user_caused {
            assert!(remedy(kind, reason).is_some(), "{kind} {reason}");
        }
        assert_eq!(remedy("PublishedApp", "Ready"), None);
        assert_eq!(remedy("Connector", "TLSSecretNotFound"), None);
    }
}
